"""Paged attention as one Pallas kernel: the contract of raypd/engine/attention.py, for GPUs.

Grid: (batch row b, kv head k, query block i). One program holds the t*Q query rows of block i
that read kv head k (rows in (t, q) order), walks that row's context one page at a time through
the page table (pages are read where they lie in the pool; nothing is gathered first), then the
chunk's own keys block by block up to block i (later blocks are causally invisible), folding
each [rows, keys] score tile into an online softmax in float32.

CI runs it on CPU with `interpret=True` (tests/test_attention.py); the engines pick it on GPU
(attention.default_impl). Query rows are padded to a multiple of 16, the smallest tile a
GPU matrix unit takes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from raypd.engine.attention_meta import MASK_VALUE, AttentionMeta

ROW_MULTIPLE = 16


def _fold(state, s, mask, v_tile):
    """Online-softmax update with scores s [R, S], mask [R, S], values v_tile [S, H]."""
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = lax.dot_general(p.astype(v_tile.dtype), v_tile, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + pv


def _scores(q_tile, k_tile):
    """[R, H] x [S, H] -> [R, S] in float32."""
    return lax.dot_general(q_tile, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, pool_k_ref, pool_v_ref, pages_ref, lens_ref, rpos_ref, rseg_ref,
            kpos_ref, kseg_ref, o_ref, *, G: int, tq: int, nq: int, has_ctx: bool, window):
    i = pl.program_id(2)
    R, H = q_ref.shape
    q_tile = q_ref[...] * jnp.asarray(H ** -0.5, q_ref.dtype)  # [R, H]
    rpos, rseg = rpos_ref[...], rseg_ref[...]  # [R]
    state = (jnp.full((R,), MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32),
             jnp.zeros((R, H), jnp.float32))

    def in_window(kpos):  # kpos [1, S] -> [R, S]
        return True if window is None else kpos > rpos[:, None] - window

    if has_ctx:
        ctx_len = lens_ref[0]
        sees_ctx = rseg == 0

        def ctx_body(j, st):
            page = pages_ref[j]
            k_tile = pool_k_ref[page, :, :]  # [G, H], read in place
            v_tile = pool_v_ref[page, :, :]
            kpos = j * G + lax.broadcasted_iota(jnp.int32, (1, G), 1)
            mask = (kpos < ctx_len) & sees_ctx[:, None] & in_window(kpos)
            return _fold(st, _scores(q_tile, k_tile), mask, v_tile)

        lo = 0
        if window is not None:
            first = jnp.min(jnp.where(sees_ctx, rpos - window + 1, 2 ** 30))
            lo = jnp.maximum(first, 0) // G
        hi = jnp.where(jnp.any(sees_ctx), (ctx_len + G - 1) // G, 0)
        state = lax.fori_loop(lo, jnp.minimum(hi, pages_ref.shape[0]), ctx_body, state)

    def chunk_body(j, st):
        k_tile = k_ref[pl.ds(j * tq, tq), :]  # [u, H]
        v_tile = v_ref[pl.ds(j * tq, tq), :]
        kpos = kpos_ref[pl.ds(j * tq, tq)][None, :]  # [1, u]
        kseg = kseg_ref[pl.ds(j * tq, tq)][None, :]
        mask = (kseg == rseg[:, None]) & (rseg >= 0)[:, None] & (kpos <= rpos[:, None]) & in_window(kpos)
        return _fold(st, _scores(q_tile, k_tile), mask, v_tile)

    state = lax.fori_loop(0, i + 1, chunk_body, state) if nq > 1 else chunk_body(0, state)
    _, l, acc = state
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


def paged_attention(q, k, v, pool_k, pool_v, meta: AttentionMeta, window: int | None, *,
                    q_block: int = 64, interpret: bool = False):
    """The attention.py contract as one pallas_call. interpret=True runs it on any backend."""
    B, T, K, Q, H = q.shape
    P, G = pool_k.shape[1], pool_k.shape[2]
    Pc = meta.ctx_pages.shape[1]
    tq = q_block if T % q_block == 0 else T
    nq = T // tq
    R = tq * Q  # query rows per block
    Rp = -(-R // ROW_MULTIPLE) * ROW_MULTIPLE
    pad = Rp - R

    def rows(x, fill):  # [n, T*Q, ...] -> [n, nq * Rp, ...]: rows of each query block padded
        n = x.shape[0]
        x = x.reshape((n, nq, R) + x.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        return x.reshape((n, nq * Rp) + x.shape[3:])

    # [B, T, K, Q, H] -> [B, K, T*Q, H] -> padded per query block -> [B, K, nq*Rp, H]
    qt = q.transpose(0, 2, 1, 3, 4).reshape(B * K, T * Q, H)
    qt = rows(qt, 0).reshape(B, K, nq * Rp, H)
    rpos = rows(jnp.repeat(meta.positions, Q, axis=1), -1)  # [B, nq*Rp]
    rseg = rows(jnp.repeat(meta.segments, Q, axis=1), -1)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    pages = meta.ctx_pages if Pc else jnp.zeros((B, 1), jnp.int32)

    kernel = functools.partial(_kernel, G=G, tq=tq, nq=nq, has_ctx=Pc > 0, window=window)
    out = pl.pallas_call(
        kernel,
        grid=(B, K, nq),
        in_specs=[
            pl.BlockSpec((None, None, Rp, H), lambda b, h, i: (b, h, i, 0)),  # q rows
            pl.BlockSpec((None, None, T, H), lambda b, h, i: (b, h, 0, 0)),  # chunk k
            pl.BlockSpec((None, None, T, H), lambda b, h, i: (b, h, 0, 0)),  # chunk v
            pl.BlockSpec((None, P, G, H), lambda b, h, i: (h, 0, 0, 0)),  # pool k (read by page)
            pl.BlockSpec((None, P, G, H), lambda b, h, i: (h, 0, 0, 0)),  # pool v
            pl.BlockSpec((None, pages.shape[1]), lambda b, h, i: (b, 0)),  # page table
            pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),  # ctx_len
            pl.BlockSpec((None, Rp), lambda b, h, i: (b, i)),  # row positions
            pl.BlockSpec((None, Rp), lambda b, h, i: (b, i)),  # row segments
            pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),  # key positions
            pl.BlockSpec((None, T), lambda b, h, i: (b, 0)),  # key segments
        ],
        out_specs=pl.BlockSpec((None, None, Rp, H), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, nq * Rp, H), q.dtype),
        interpret=interpret,
    )(qt, kt, vt, pool_k, pool_v, pages, meta.ctx_lens[:, None], rpos, rseg, meta.positions,
      meta.segments)
    out = out.reshape(B, K, nq, Rp, H)[:, :, :, :R].reshape(B, K, T, Q, H)
    return out.transpose(0, 2, 1, 3, 4)
