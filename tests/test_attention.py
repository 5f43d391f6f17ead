"""Paged attention implementations against the reference, on ragged batches.

The blockwise (CPU) and Pallas (GPU, run here in interpret mode) implementations read the pool
in blocks and fold scores with an online softmax; the bugs they invite are a block that reads
past a row's context (page boundaries, 0-padded page tables), a causal block skipped that holds
a visible key, a sliding window applied off by one, and a fully masked block poisoning the
running max. Each case below is built so one of those would change valid outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.config import ModelConfig
from raypd.engine import attention
from raypd.engine.attention import AttentionMeta

K, Q, H, G, P = 2, 3, 8, 4, 40


def make_case(rows, T, Pc, seed=0):
    """rows: per batch row (ctx_len, [segment lengths]); segment 0 continues the context.

    -> (q, k, v, pool_k, pool_v, meta, valid [B, T]) with each row's pages drawn at random."""
    rng = np.random.default_rng(seed)
    B = len(rows)
    q = rng.standard_normal((B, T, K, Q, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    pool_k = rng.standard_normal((K, P, G, H)).astype(np.float32)
    pool_v = rng.standard_normal((K, P, G, H)).astype(np.float32)
    positions = np.full((B, T), -1, np.int32)
    segments = np.full((B, T), -1, np.int32)
    ctx_pages = np.zeros((B, Pc), np.int32)
    ctx_lens = np.zeros((B,), np.int32)
    free = list(rng.permutation(np.arange(1, P)))
    for b, (ctx_len, segs) in enumerate(rows):
        n_pages = -(-ctx_len // G)
        assert n_pages <= Pc and sum(segs) <= T
        ctx_pages[b, :n_pages] = [free.pop() for _ in range(n_pages)]
        ctx_lens[b] = ctx_len
        at = 0
        for s, n in enumerate(segs):
            positions[b, at:at + n] = np.arange(n) + (ctx_len if s == 0 else 0)
            segments[b, at:at + n] = s
            at += n
    meta = AttentionMeta(*map(jnp.asarray, (positions, segments, ctx_pages, ctx_lens)))
    arrays = tuple(map(jnp.asarray, (q, k, v, pool_k, pool_v)))
    return arrays + (meta, segments >= 0)


DECODE = dict(rows=[(1, [1]), (4, [1]), (5, [1]), (16, [1]), (0, [1]), (23, [1]), (0, [])], T=1, Pc=6)
PREFILL_PACKED = dict(rows=[(0, [10, 7, 1, 5])], T=32, Pc=0)
PREFILL_CONTINUED = dict(rows=[(13, [19]), (4, [1, 6]), (0, [32]), (8, [])], T=32, Pc=4)
# One long row alone, so the window (not a shorter row) decides which context blocks are skipped.
DECODE_ONE = dict(rows=[(23, [1])], T=1, Pc=6)
CASES = {"decode": DECODE, "decode_one": DECODE_ONE, "prefill_packed": PREFILL_PACKED, "prefill_continued": PREFILL_CONTINUED}


def assert_close_on_valid(got, want, valid):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ctx_block_pages,q_block", [(1, 8), (2, 16), (4, 256), (None, 8)])
def test_blockwise_equals_reference(case, window, ctx_block_pages, q_block):
    *arrays, meta, valid = make_case(**CASES[case])
    want = attention.reference(*arrays, meta, window)
    got = jax.jit(lambda *a: attention.blockwise(*a, meta, window, ctx_block_pages=ctx_block_pages,
                                                 q_block=q_block))(*arrays)
    assert_close_on_valid(got, want, valid)
    assert not np.asarray(got)[~valid].any(), "padding queries must come out as zeros"


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_interpret_equals_reference(case, window):
    from raypd.engine.attention_pallas import paged_attention

    *arrays, meta, valid = make_case(**CASES[case], seed=1)
    want = attention.reference(*arrays, meta, window)
    got = paged_attention(*arrays, meta, window, q_block=8, interpret=True)
    assert_close_on_valid(got, want, valid)


def test_reference_equals_dense_attention():
    """The oracle itself: one sequence split into context pages + a chunk equals llama.attend."""
    S, T = 11, 6
    *arrays, meta, valid = make_case([(S, [T])], T=8, Pc=3, seed=2)
    q, k, v, pool_k, pool_v = arrays
    pages = np.asarray(meta.ctx_pages[0])
    ctx = lambda pool: pool[:, pages].reshape(K, -1, H)[:, :S].transpose(1, 0, 2)  # noqa: E731
    full_k = jnp.concatenate([ctx(pool_k), k[0, :T]])[None]  # [1, S+T, K, H]
    full_v = jnp.concatenate([ctx(pool_v), v[0, :T]])[None]
    cfg = ModelConfig(architecture="mistral", vocab_size=8, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=K * Q, num_kv_heads=K, head_dim=H, sliding_window=4)
    for window in (None, 4):
        c = cfg.replace(sliding_window=window)
        q_pos = jnp.arange(S, S + T)[None]
        mask = llama.causal_mask(q_pos, jnp.arange(S + T)[None], c)
        want = llama.attend(q[:, :T], full_k, full_v, mask)
        got = attention.reference(*arrays, meta, window)[:, :T]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_default_impl_by_platform():
    assert attention.default_impl("cpu") == "blockwise"
    assert attention.default_impl("gpu") == "pallas"
    assert attention.default_impl("gpu", num_devices=2) == "blockwise"
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.attend("gather", *make_case(**DECODE)[:6], None)


def test_cpu_runner_uses_blockwise_and_rejects_unknown_impl():
    import models
    from raypd.engine import paged
    from raypd.engine.runner import EngineConfig, ModelRunner

    model = models.load("tiny-random")
    runner = ModelRunner(model, EngineConfig(num_pages=8, max_seq_len=64, prefill_buckets=(16,)))
    assert runner.params.attention == "blockwise"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        paged.unstack(model.params, "gather")
