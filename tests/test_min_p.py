"""min_p in the on-device sampler: a token less likely than min_p x the top token is never drawn.

Guards against: min_p applied before temperature (vLLM and the OpenAI-compatible servers apply
it to the tempered distribution), min_p = 0 filtering anything, greedy rows touched by it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from raypd.engine.api import SamplingParams
from raypd.engine.sampling import SamplingArrays, sample

R = 400  # rows: the same logits, each with its own seed


def draw(logits, min_p: float, temperature: float = 1.0) -> set[int]:
    arrays = SamplingArrays(temperature=jnp.full(R, temperature, jnp.float32), top_k=jnp.zeros(R, jnp.int32),
                            top_p=jnp.ones(R, jnp.float32), seed=jnp.arange(R, dtype=jnp.uint32),
                            position=jnp.zeros(R, jnp.int32), min_p=jnp.full(R, min_p, jnp.float32))
    tokens = sample(jnp.tile(jnp.asarray(logits, jnp.float32), (R, 1)), arrays).tokens
    return set(np.asarray(tokens).tolist())


def test_min_p_keeps_tokens_within_its_ratio_of_the_top_token():
    logits = [0.0, -1.0, -2.0, -8.0]  # probs relative to the top: 1, 0.37, 0.14, 0.0003
    assert draw(logits, 0.0) == {0, 1, 2}  # off: the 14% token shows up in 400 draws
    assert draw(logits, 0.3) == {0, 1}
    assert draw(logits, 0.5) == {0}
    assert draw(logits, 0.3, temperature=2.0) == {0, 1, 2}  # tempered: 0.61, 0.37 both >= 0.3
    assert draw(logits, 0.0, temperature=0.0) == {0}  # greedy rows are untouched


def test_min_p_range_is_checked():
    assert SamplingParams(min_p=0.5).min_p == 0.5
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"min_p must be a number in \[0, 1\]"):
            SamplingParams(min_p=bad)
