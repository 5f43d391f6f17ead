"""Paged attention: the queries of one forward call against the page pool and their own chunk.

One contract, three implementations:
  - `reference`: gathers every context page into one contiguous copy and runs a single softmax
    over [context keys, chunk keys]. Simple; kept as the test oracle and the benchmark baseline.
  - `blockwise` (XLA; what the engines use on CPU): an online softmax over blocks of context
    pages read from the pool in place (each block is gathered right before its score matmul and
    stays in cache; the whole context is never copied), then over blocks of the chunk's own
    keys. Long chunks are split into query blocks and a query block skips the key blocks after
    it (causality), so a 2048-token prefill does about half the work of the dense scores and
    never holds a [T, T] score tensor. Blocks wholly outside every row's sliding window or
    context are skipped (the loop bounds are computed on the device).
  - `pallas` (raypd/engine/attention_pallas.py; what the engines use on GPU): the same contract
    as one Pallas kernel.

Contract (letters as in models/config.py; Pc context pages, t a query block):
  q [B, T, K, Q, H]; k, v [B, T, K, H]: the chunk's own keys and values;
  pool_k, pool_v [K, P, G, H]: the page pool (this call's writes may already be in it);
  positions, segments [B, T] (segment -1 marks padding); ctx_pages [B, Pc]; ctx_lens [B];
  window: cfg.sliding_window or None  ->  [B, T, K, Q, H].
Query t of row b sees context keys s < ctx_lens[b] when segments[b, t] == 0, and chunk keys u
of its own segment with positions[b, u] <= positions[b, t]; with a window, only keys at
positions > positions[b, t] - window. Padding queries see nothing (blockwise and pallas return
zeros for them, reference returns an average; callers never read them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from raypd.engine.attention_meta import MASK_VALUE, AttentionMeta  # noqa: F401 - re-exported

IMPLEMENTATIONS = ("reference", "blockwise", "pallas")



def _window_ok(k_pos, q_pos, window):
    return True if window is None else k_pos > q_pos - window


def reference(q, k, v, pool_k, pool_v, meta: AttentionMeta, window: int | None):
    """Gather the whole context, one softmax over [context, chunk] scores."""
    B, T, K, Q, H = q.shape
    G = pool_k.shape[2]
    Pc = meta.ctx_pages.shape[1]
    ctx_k = pool_k[:, meta.ctx_pages].reshape(K, B, Pc * G, H)  # [K, B, Sc, H]
    ctx_v = pool_v[:, meta.ctx_pages].reshape(K, B, Pc * G, H)
    q_pos, q_seg = meta.positions, meta.segments
    valid_q = (q_seg >= 0)[:, :, None]
    ctx_pos = jnp.arange(Pc * G, dtype=jnp.int32)[None, None, :]  # [1, 1, Sc]
    ctx_mask = (ctx_pos < meta.ctx_lens[:, None, None]) & (q_seg == 0)[:, :, None]
    ctx_mask &= _window_ok(ctx_pos, q_pos[:, :, None], window) & valid_q
    chunk_mask = (q_seg[:, :, None] == q_seg[:, None, :]) & (q_pos[:, None, :] <= q_pos[:, :, None])
    chunk_mask &= _window_ok(q_pos[:, None, :], q_pos[:, :, None], window) & valid_q
    scale = H ** -0.5
    f32 = jnp.float32
    s_ctx = jnp.einsum("btkqh,kbsh->bkqts", q, ctx_k, preferred_element_type=f32) * scale
    s_chunk = jnp.einsum("btkqh,bukh->bkqtu", q, k, preferred_element_type=f32) * scale
    scores = jnp.concatenate([jnp.where(ctx_mask[:, None, None], s_ctx, MASK_VALUE),
                              jnp.where(chunk_mask[:, None, None], s_chunk, MASK_VALUE)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    Sc = Pc * G
    return (jnp.einsum("bkqts,kbsh->btkqh", probs[..., :Sc], ctx_v)
            + jnp.einsum("bkqtu,bukh->btkqh", probs[..., Sc:], v))


def _online_update(state, s, mask, v_block, pv_spec):
    """Fold one block of scores s [B, K, Q, t, S] (mask [B, t, S]) into (max, sum, acc)."""
    m, l, acc = state
    mask = mask[:, None, None]
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum(pv_spec, p.astype(v_block.dtype), v_block, preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv


def blockwise(q, k, v, pool_k, pool_v, meta: AttentionMeta, window: int | None, *,
              ctx_block_pages: int | None = None, q_block: int = 256):
    """Online softmax over page blocks of the pool and key blocks of the chunk (see module doc).

    q_block: query (and chunk key) block length. ctx_block_pages: context pages per block; by
    default 8 pages for up to 4 rows, else 4, and at least q_block keys for prefill chunks
    (scripts/bench_kernels.py, section attn, measured these on CPU).
    """
    if (ctx_block_pages is not None and ctx_block_pages < 1) or q_block < 1:
        raise ValueError(f"ctx_block_pages and q_block must be >= 1, got {ctx_block_pages}, {q_block}")
    B, T, K, Q, H = q.shape
    G = pool_k.shape[2]
    Pc = meta.ctx_pages.shape[1]
    f32 = jnp.float32
    tq = q_block if T % q_block == 0 else T  # query block length t
    nq = T // tq
    if ctx_block_pages is None:  # 8 pages for up to 4 rows, else 4; prefill: >= one query block
        ctx_block_pages = max(min(8, max(4, 32 // B)), tq // G if tq > 1 else 1)
    q = q * jnp.asarray(H ** -0.5, q.dtype)
    n = min(ctx_block_pages, max(Pc, 1))
    nb_ctx = -(-Pc // n)
    pages = jnp.pad(meta.ctx_pages, ((0, 0), (0, nb_ctx * n - Pc)))  # [B, nb_ctx * n]
    S = n * G  # context keys per block
    big = jnp.int32(2 ** 30)

    def query_block(i):
        q_i = lax.dynamic_slice_in_dim(q, i * tq, tq, axis=1)  # [B, t, K, Q, H]
        pos_i = lax.dynamic_slice_in_dim(meta.positions, i * tq, tq, axis=1)  # [B, t]
        seg_i = lax.dynamic_slice_in_dim(meta.segments, i * tq, tq, axis=1)
        state = (jnp.full((B, K, Q, tq), MASK_VALUE, f32), jnp.zeros((B, K, Q, tq), f32),
                 jnp.zeros((B, K, Q, tq, H), f32))
        if Pc:
            sees_ctx = seg_i == 0  # [B, t]

            def ctx_body(j, st):
                blk = lax.dynamic_slice_in_dim(pages, j * n, n, axis=1)  # [B, n]
                kb = pool_k[:, blk].reshape(K, B, S, H)  # [K, B, S, H]: this block only
                vb = pool_v[:, blk].reshape(K, B, S, H)
                s = jnp.einsum("btkqh,kbsh->bkqts", q_i, kb, preferred_element_type=f32)
                kpos = j * S + jnp.arange(S, dtype=jnp.int32)  # [S]
                mask = (kpos[None, None] < meta.ctx_lens[:, None, None]) & sees_ctx[:, :, None]
                mask &= _window_ok(kpos[None, None], pos_i[:, :, None], window)
                return _online_update(st, s, mask, vb, "bkqts,kbsh->bkqth")

            hi = (jnp.max(jnp.where(jnp.any(sees_ctx, axis=1), meta.ctx_lens, 0)) + S - 1) // S
            lo = jnp.int32(0)
            if window is not None:  # blocks entirely before every query's window
                first = jnp.min(jnp.where(sees_ctx, pos_i - window + 1, big))
                lo = jnp.clip(first, 0, None) // S
            state = lax.fori_loop(lo, jnp.minimum(hi, nb_ctx), ctx_body, state)

        def chunk_body(j, st):
            kb = lax.dynamic_slice_in_dim(k, j * tq, tq, axis=1)  # [B, u, K, H]
            vb = lax.dynamic_slice_in_dim(v, j * tq, tq, axis=1)
            kpos = lax.dynamic_slice_in_dim(meta.positions, j * tq, tq, axis=1)  # [B, u]
            kseg = lax.dynamic_slice_in_dim(meta.segments, j * tq, tq, axis=1)
            s = jnp.einsum("btkqh,bukh->bkqtu", q_i, kb, preferred_element_type=f32)
            mask = (seg_i[:, :, None] == kseg[:, None, :]) & (seg_i >= 0)[:, :, None]
            mask &= (kpos[:, None, :] <= pos_i[:, :, None])
            mask &= _window_ok(kpos[:, None, :], pos_i[:, :, None], window)
            return _online_update(st, s, mask, vb, "bkqtu,bukh->bkqth")

        # Chunk tokens are packed in causal order, so key blocks after query block i see nothing.
        if nq == 1:
            state = chunk_body(0, state)
        else:
            state = lax.fori_loop(0, i + 1, chunk_body, state)
        _, l, acc = state
        out = acc / jnp.maximum(l, 1e-30)[..., None]  # padding queries: l == 0 -> zeros
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B, t, K, Q, H]

    if nq == 1:
        return query_block(0)
    blocks = lax.map(query_block, jnp.arange(nq))  # [nq, B, t, K, Q, H]
    return blocks.transpose(1, 0, 2, 3, 4, 5).reshape(B, T, K, Q, H)


def attend(impl: str, q, k, v, pool_k, pool_v, meta: AttentionMeta, window: int | None):
    """Dispatch to one implementation by name (a static choice made at load time)."""
    if impl == "blockwise":
        return blockwise(q, k, v, pool_k, pool_v, meta, window)
    if impl == "reference":
        return reference(q, k, v, pool_k, pool_v, meta, window)
    if impl == "pallas":
        from raypd.engine.attention_pallas import paged_attention

        return paged_attention(q, k, v, pool_k, pool_v, meta, window)
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")


def default_impl(platform: str, num_devices: int = 1) -> str:
    """The implementation the engines use on a device platform ("cpu", "gpu", "cuda", "tpu").

    The Pallas kernel runs on one device (it is not wrapped in a shard_map yet), so a
    tensor-parallel mesh uses the blockwise XLA version, which XLA partitions by kv head."""
    on_gpu = platform in ("gpu", "cuda", "rocm")
    return "pallas" if on_gpu and num_devices == 1 else "blockwise"
