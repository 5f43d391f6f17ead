"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) as pure JAX functions over a pytree.

Parameters are a `flax.struct` pytree with the layers stacked on a leading L axis, so the
decoder runs as one `lax.scan` (one layer compiled, not L). Query heads are grouped by the
kv head they read (HF's `repeat_kv` order: query head n reads kv head n // Q), and q, k and v
projections are fused into one [D, K, Q+2, H] matrix per layer: slice [..., :Q, :] is q,
[..., Q, :] is k and [..., Q+1, :] is v. Splitting the K axis over devices therefore splits
q, k, v and o consistently, which is what tensor parallelism needs.

The pieces (`embed`, `qkv`, `attend`, `attn_out`, `mlp`, `unembed`) are shared by the dense
forward below and by the paged forward of the engines (raypd/engine/paged.py).
Shape letters: see models/config.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig

MASK_VALUE = -1e30


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [L, D]
    wqkv: jax.Array  # [L, D, K, Q+2, H]
    bqkv: jax.Array | None  # [L, K, Q+2, H]; Qwen2 / attention_bias only
    q_norm: jax.Array | None  # [L, H]; Qwen3 only
    k_norm: jax.Array | None  # [L, H]; Qwen3 only
    wo: jax.Array  # [L, K, Q, H, D]
    bo: jax.Array | None  # [L, D]; Llama attention_bias only
    mlp_norm: jax.Array  # [L, D]
    w_gate_up: jax.Array  # [L, D, 2, F]; [..., 0, :] gate, [..., 1, :] up
    w_down: jax.Array  # [L, F, D]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: LayerParams
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when embeddings are tied


def logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same tree as Params, tuples as leaves)."""
    opt = lambda present, axes: axes if present else None  # noqa: E731
    return Params(
        embed=("vocab", "embed"),
        layers=LayerParams(
            attn_norm=("layers", "embed"),
            wqkv=("layers", "embed", "kv_heads", "q_group", "head_dim"),
            bqkv=opt(cfg.qkv_bias, ("layers", "kv_heads", "q_group", "head_dim")),
            q_norm=opt(cfg.qk_norm, ("layers", "head_dim")),
            k_norm=opt(cfg.qk_norm, ("layers", "head_dim")),
            wo=("layers", "kv_heads", "q_group", "head_dim", "embed"),
            bo=opt(cfg.o_bias, ("layers", "embed")),
            mlp_norm=("layers", "embed"),
            w_gate_up=("layers", "embed", "gate_up", "mlp"),
            w_down=("layers", "mlp", "embed"),
        ),
        final_norm=("embed",),
        lm_head=opt(not cfg.tie_word_embeddings, ("embed", "vocab")),
    )


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter (same tree as Params, tuples as leaves)."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    K, Q, H = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    opt = lambda present, shape: shape if present else None  # noqa: E731
    return Params(
        embed=(V, D),
        layers=LayerParams(
            attn_norm=(L, D), wqkv=(L, D, K, Q + 2, H), bqkv=opt(cfg.qkv_bias, (L, K, Q + 2, H)),
            q_norm=opt(cfg.qk_norm, (L, H)), k_norm=opt(cfg.qk_norm, (L, H)),
            wo=(L, K, Q, H, D), bo=opt(cfg.o_bias, (L, D)), mlp_norm=(L, D),
            w_gate_up=(L, D, 2, F), w_down=(L, F, D)),
        final_norm=(D,),
        lm_head=opt(not cfg.tie_word_embeddings, (D, V)),
    )


def is_axes_leaf(x) -> bool:
    return isinstance(x, tuple)


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Params:
    """Random parameters from a fixed seed: N(0, std) matrices and biases, unit norms."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_axes_leaf)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_axes_leaf)[0]]
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    dtype = jnp.dtype(cfg.dtype)
    out = []
    for key, path, shape in zip(keys, paths, leaves):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as HF computes it: statistics in float32, scale applied in the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate-half RoPE (the HF checkpoint convention). x: [B, T, ..., H], positions: [B, T]."""
    inv_freq = jnp.asarray(cfg.inv_freq())  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    extra = x.ndim - 3
    cos = jnp.cos(emb).astype(x.dtype).reshape(emb.shape[:2] + (1,) * extra + emb.shape[2:])
    sin = jnp.sin(emb).astype(x.dtype).reshape(cos.shape)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> hidden [B, T, D]."""
    return jnp.take(params.embed, tokens, axis=0)


def qkv(lp: LayerParams, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """Normed input projections of one layer. x [B, T, D] -> q [B, T, K, Q, H], k, v [B, T, K, H]."""
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    fused = jnp.einsum("btd,dkqh->btkqh", h, lp.wqkv)
    if lp.bqkv is not None:
        fused = fused + lp.bqkv
    Q = cfg.q_per_kv
    q, k, v = fused[..., :Q, :], fused[..., Q, :], fused[..., Q + 1, :]
    if lp.q_norm is not None:
        q = rms_norm(q, lp.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, lp.k_norm, cfg.rms_norm_eps)
    return rope(q, positions, cfg), rope(k, positions, cfg), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention, scores in float32.

    q [B, T, K, Q, H], k/v [B, S, K, H], mask [B, T, S] (True = may attend) -> [B, T, K, Q, H].
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btkqh,bskh->bkqts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkqts,bskh->btkqh", probs, v)


def attn_out(lp: LayerParams, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual add of the attention output projection. attn [B, T, K, Q, H] -> x [B, T, D]."""
    o = jnp.einsum("btkqh,kqhd->btd", attn, lp.wo)
    if lp.bo is not None:
        o = o + lp.bo
    return x + o


def mlp(lp: LayerParams, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Residual SwiGLU block. x [B, T, D] -> [B, T, D]."""
    h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
    gu = jnp.einsum("btd,dcf->btcf", h, lp.w_gate_up)
    act = jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
    return x + jnp.einsum("btf,fd->btd", act, lp.w_down)


def unembed(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and vocabulary projection. x [B, T, D] -> logits [B, T, V] in float32."""
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    if params.lm_head is None:
        return jnp.einsum("btd,vd->btv", h, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", h, params.lm_head, preferred_element_type=jnp.float32)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, cfg: ModelConfig) -> jax.Array:
    """q_pos [B, T], k_pos [B, S] -> [B, T, S]: key at or before the query (and inside the window)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if cfg.sliding_window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - cfg.sliding_window
    return mask


# ----------------------------------------------------------------------------- dense forward


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Teacher-forced forward pass with no cache. tokens [B, T] -> logits [B, T, V] (float32)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = causal_mask(positions, positions, cfg)

    def layer(x, lp):
        q, k, v = qkv(lp, x, positions, cfg)
        x = attn_out(lp, x, attend(q, k, v, mask))
        return mlp(lp, x, cfg), None

    x, _ = jax.lax.scan(layer, embed(params, tokens), params.layers)
    return unembed(params, x, cfg)
