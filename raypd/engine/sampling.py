"""On-device sampling for a batch of rows, each with its own parameters.

Greedy rows (temperature 0) take the argmax; the others sample from the temperature-scaled,
top-k-, top-p- and min-p-filtered distribution with a key derived from (seed, position), so a request
samples the same tokens whatever slot or batch it runs in. The full sort that top-k/top-p need
runs only when some row samples (`lax.cond`). The returned logprob is that of the chosen token
under the model's unmodified distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingArrays:
    """Per-row sampling parameters, all shaped [R]."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    seed: jax.Array  # uint32
    position: jax.Array  # int32; position of the token being sampled (folds into the key)
    min_p: jax.Array  # float32; keep tokens with prob >= min_p * the top prob (after temperature); 0 = off


def _filtered_sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    V = logits.shape[-1]
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    desc = -jnp.sort(-scaled, axis=-1)  # [R, V]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [R, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p: index of the first cum >= p
    cut = jnp.sum(cum < s.top_p[:, None], axis=-1)
    cut = jnp.minimum(cut, V - 1)
    threshold = jnp.maximum(jnp.take_along_axis(desc, cut[:, None], axis=-1), kth)
    # min_p: log(prob / top prob) >= log(min_p), i.e. scaled >= top scaled + log(min_p) (log 0 = -inf: off)
    threshold = jnp.maximum(threshold, desc[:, :1] + jnp.log(s.min_p)[:, None])
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, s.position)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """logits [R, V] (float32) -> (tokens [R] int32, logprobs [R] float32)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: jnp.where(s.temperature > 0, _filtered_sample(logits, s), greedy),
        lambda: greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
