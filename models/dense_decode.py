"""Greedy decoding with a dense (unpaged) KV cache, and batched per-token losses: the evaluation
path of scripts/train_default_model.py and tests/test_model_gates.py. The serving engines use
the paged cache of raypd/engine/paged.py; this is the smallest correct cache for a handful of
prompts, built from the same pieces of models/llama.py.
Shape letters: see models/config.py; P is the padded prompt length, S = P + num_new.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.config import ModelConfig
from models.llama import Params, attend, attn_out, embed, forward, mlp, qkv, unembed


@functools.partial(jax.jit, static_argnums=2)
def _window_nll(params: Params, windows: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits = forward(params, windows[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def window_nll(params: Params, cfg: ModelConfig, windows: np.ndarray) -> np.ndarray:
    """windows [W, T+1] -> nats of every predicted token [W, T] (float64), one window at a time."""
    return np.stack([np.asarray(_window_nll(params, jnp.asarray(w[None], jnp.int32), cfg)[0], np.float64)
                     for w in np.asarray(windows)])


def _layers(params: Params, cache_k, cache_v, x, positions, mask, write_at, cfg: ModelConfig):
    """Run every layer on x [B, T, D], writing its k/v at cache positions write_at [B, T].
    cache_k/v [L, B, S, K, H]; mask [B, T, S]."""
    rows = jnp.arange(x.shape[0])[:, None]

    def layer(x, xs):
        lp, ck, cv = xs
        q, k, v = qkv(lp, x, positions, cfg)
        ck, cv = ck.at[rows, write_at].set(k), cv.at[rows, write_at].set(v)
        x = attn_out(lp, x, attend(q, ck, cv, mask))
        return mlp(lp, x, cfg), (ck, cv)

    x, (cache_k, cache_v) = jax.lax.scan(layer, x, (params.layers, cache_k, cache_v))
    return x, cache_k, cache_v


@functools.partial(jax.jit, static_argnums=(3, 4))
def _greedy(params: Params, prompts: jax.Array, lens: jax.Array, cfg: ModelConfig, num_new: int):
    B, P = prompts.shape
    S = P + num_new
    dtype = params.embed.dtype
    shape = (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    cache_k, cache_v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    key_pos = jnp.arange(S, dtype=jnp.int32)
    mask = key_pos[None, None, :] <= pos[:, :, None]  # [B, P, S]
    x, cache_k, cache_v = _layers(params, cache_k, cache_v, embed(params, prompts), pos, mask, pos, cfg)
    logits = unembed(params, x, cfg)  # [B, P, V]
    first = jnp.argmax(logits[jnp.arange(B), lens - 1], axis=-1).astype(jnp.int32)  # [B]

    def step(carry, _):
        tok, cur, ck, cv = carry  # tok [B] sits at position cur [B]
        p = cur[:, None]
        m = key_pos[None, None, :] <= p[:, :, None]  # [B, 1, S]
        x, ck, cv = _layers(params, ck, cv, embed(params, tok[:, None]), p, m, p, cfg)
        nxt = jnp.argmax(unembed(params, x, cfg)[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, cur + 1, ck, cv), tok

    _, out = jax.lax.scan(step, (first, lens, cache_k, cache_v), None, length=num_new)
    return out.T  # [B, num_new]


def greedy(params: Params, cfg: ModelConfig, prompts: list[list[int]], num_new: int, pad_id: int) -> list[list[int]]:
    """Greedy continuation of every prompt (num_new tokens each), batched, with a KV cache."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    P = max(len(p) for p in prompts)
    if P + num_new > cfg.max_position_embeddings:
        raise ValueError(f"longest prompt ({P}) + num_new ({num_new}) exceeds the context "
                         f"({cfg.max_position_embeddings})")
    padded = np.full((len(prompts), P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    lens = np.asarray([len(p) for p in prompts], np.int32)
    out = _greedy(params, jnp.asarray(padded), jnp.asarray(lens), cfg, num_new)
    return np.asarray(out).tolist()
