"""Paged forward pass: one function serves prefill chunks and decode steps.

Every row of a batch attends to two things (raypd/engine/attention.py):
  1. its *context*: K/V already in the page pool, read through the row's page table
     (keys at positions < ctx_len), and
  2. the *chunk*: the K/V of the tokens computed in this call (causal within a segment).
The chunk's K/V are scattered into the pool at slots the host computed
(`write_pages`, `write_offsets`); padded tokens write into the null page 0.

Decode is B slots x T=1 with context = each slot's earlier tokens. Prefill is one row of T
packed tokens: several fresh prompts separated by segment ids, or one prompt continuing from
cached pages (segment 0 is the only segment that sees context).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models import llama
from models.config import ModelConfig
from raypd.engine import attention
from raypd.engine.pages import NULL_PAGE
from raypd.engine.sampling import PenaltyTable, Sampled, SamplingArrays, sample


@struct.dataclass
class KVCache:
    """One array per layer, so each layer's scatter updates its donated buffer in place."""

    k: tuple[jax.Array, ...]  # L x [K, P, G, H]
    v: tuple[jax.Array, ...]  # L x [K, P, G, H]


@struct.dataclass
class EngineParams:
    """Params with the layers unstacked (a list), for the unrolled paged forward."""

    embed: jax.Array  # [V, D]
    layers: tuple[llama.LayerParams, ...]  # L x LayerParams with the L axis removed
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]
    # Paged attention implementation (raypd/engine/attention.py), chosen once at load time.
    attention: str = struct.field(pytree_node=False, default="blockwise")


def unstack(params: llama.Params, attention_impl: str = "blockwise") -> EngineParams:
    if attention_impl not in attention.IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {attention.IMPLEMENTATIONS}, got {attention_impl!r}")
    L = params.layers.attn_norm.shape[0]
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], params.layers) for i in range(L))
    return EngineParams(params.embed, layers, params.final_norm, params.lm_head, attention_impl)


@struct.dataclass
class Batch:
    """Host-built inputs of one forward call."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32; -1 for padding
    segments: jax.Array  # [B, T] int32; -1 for padding
    write_pages: jax.Array  # [B, T] int32; page each token's K/V goes to (0 for padding)
    write_offsets: jax.Array  # [B, T] int32; offset inside that page
    ctx_pages: jax.Array  # [B, Pc] int32; page table of the context (0-padded)
    ctx_lens: jax.Array  # [B] int32; number of context tokens visible to segment 0
    sample_index: jax.Array  # [B, R] int32; chunk index of each token to sample from


def kv_bytes_per_page(cfg: ModelConfig, page_size: int) -> int:
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def init_cache(cfg: ModelConfig, num_pages: int, page_size: int, sharding=None) -> KVCache:
    """Allocate (and touch) the whole pool once, up front."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=sharding)
    return KVCache(k=tuple(zeros() for _ in range(cfg.num_layers)),
                   v=tuple(zeros() for _ in range(cfg.num_layers)))


def run_layers(layers, cache_k, cache_v, x: jax.Array, b: Batch, cfg: ModelConfig,
               attention_impl: str = "blockwise"):
    """Run a contiguous group of layers. x [B, T, D] -> (x, new cache_k, new cache_v).

    Layers are unrolled (not scanned): with a scan the pool would be a loop carry that XLA's
    CPU backend copies per layer; unrolled, each layer's pool buffer is updated in place.
    """
    meta = attention.AttentionMeta(b.positions, b.segments, b.ctx_pages, b.ctx_lens)
    positions = jnp.maximum(b.positions, 0)
    new_k, new_v = [], []
    for lp, ck, cv in zip(layers, cache_k, cache_v):
        q, k, v = llama.qkv(lp, x, positions, cfg)  # q [B,T,K,Q,H]; k, v [B,T,K,H]
        # Write first, then read the context from the written pool: the reads then depend on
        # the scatter, so XLA updates the donated pool in place instead of copying it.
        # (The context is positions < ctx_len, which this call's writes never touch.)
        ck = ck.at[:, b.write_pages, b.write_offsets].set(k.transpose(2, 0, 1, 3))
        cv = cv.at[:, b.write_pages, b.write_offsets].set(v.transpose(2, 0, 1, 3))
        out = attention.attend(attention_impl, q, k, v, ck, cv, meta, cfg.sliding_window)
        x = llama.attn_out(lp, x, out)
        x = llama.mlp(lp, x, cfg)
        new_k.append(ck)
        new_v.append(cv)
    return x, tuple(new_k), tuple(new_v)


def _head(params: EngineParams, x: jax.Array, b: Batch, s: SamplingArrays, cfg: ModelConfig,
          table: PenaltyTable | None = None) -> Sampled:
    """Hidden states at b.sample_index -> Sampled (tokens [B*R], ...)."""
    picked = jnp.take_along_axis(x, b.sample_index[:, :, None], axis=1)  # [B, R, D]
    B, R, D = picked.shape
    logits = llama.unembed(params, picked.reshape(1, B * R, D), cfg)[0]  # [B*R, V]
    return sample(logits, s, table)


@functools.partial(jax.jit, static_argnums=4, donate_argnums=1)
def step(params: EngineParams, cache: KVCache, b: Batch, s: SamplingArrays, cfg: ModelConfig,
         table: PenaltyTable | None = None):
    """Forward + sampling in one program. The cache is donated: use the returned one.
    `table`: the penalty state `s.table_row` points into (raypd/engine/sampling.py).

    -> (cache, Sampled: tokens [B*R], logprobs [B*R], top alternatives [B*R, K])
    """
    x, k, v = run_layers(params.layers, cache.k, cache.v, llama.embed(params, b.tokens), b, cfg,
                         params.attention)
    return KVCache(k=k, v=v), _head(params, x, b, s, cfg, table)


# The same step as separate programs per layer group, for streaming K/V out while later layers
# still compute: embed_step, then layers_step per group (its pools donated), then head_step.
embed_step = jax.jit(lambda params, b: llama.embed(params, b.tokens))
layers_step = jax.jit(run_layers, static_argnums=(5, 6), donate_argnums=(1, 2))
head_step = jax.jit(_head, static_argnums=4)


# ---------------------------------------------------------------- page-count buckets


def page_bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= n (at most ~33% padding)."""
    if n < 1:
        raise ValueError(f"a transfer has at least one page, got {n}")
    b = 1
    while True:
        for c in (b, 3 * b // 2):
            if c >= n:
                return c
        b *= 2


def padded_ids(pages) -> jax.Array:
    """pages [n] -> int32 [page_bucket(n)], padded with the null page (read: ignored; written: a sink)."""
    ids = np.full(page_bucket(len(pages)), NULL_PAGE, np.int32)
    ids[: len(pages)] = pages
    return jnp.asarray(ids)


def pad_pages(x: np.ndarray, n: int) -> np.ndarray:
    """[L, m, ...] -> [L, n, ...] with zero pages appended (n >= m)."""
    x = np.asarray(x)
    if x.shape[1] == n:
        return x
    return np.concatenate([x, np.zeros((x.shape[0], n - x.shape[1]) + x.shape[2:], x.dtype)], axis=1)


def read_pages_to_host(cache: KVCache, pages) -> tuple[np.ndarray, np.ndarray]:
    """k, v [L, n, G, K, H] of `pages` as numpy, by the bucketed gather (`read_pages`)."""
    k, v = jax.device_get(read_pages(cache, padded_ids(pages)))
    return k[:, : len(pages)], v[:, : len(pages)]


def write_pages_from_host(cache: KVCache, pages, k: np.ndarray, v: np.ndarray) -> KVCache:
    """`write_pages` of k, v [L, n, G, K, H] into `pages` (n of them), bucketed; the cache is donated."""
    ids = padded_ids(pages)
    B = int(ids.shape[0])
    return write_pages(cache, ids, pad_pages(k, B), pad_pages(v, B))


@functools.partial(jax.jit, donate_argnums=0)
def write_pages(cache: KVCache, pages: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Scatter whole pages into the pool. pages [n], k/v [L, n, G, K, H]. The cache is donated."""
    put = lambda c, x: c.at[:, pages].set(x.transpose(2, 0, 1, 3).astype(c.dtype))  # noqa: E731
    return KVCache(k=tuple(put(c, k[i]) for i, c in enumerate(cache.k)),
                   v=tuple(put(c, v[i]) for i, c in enumerate(cache.v)))


@jax.jit
def read_pages(cache: KVCache, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gather whole pages from the pool. pages [n] -> k, v [L, n, G, K, H]."""
    get = lambda c: c[:, pages].transpose(1, 2, 0, 3)  # noqa: E731  [K, n, G, H] -> [n, G, K, H]
    return jnp.stack([get(c) for c in cache.k]), jnp.stack([get(c) for c in cache.v])
