"""K/V codec for transfers: whole pages out of one pool, into another, optionally as INT8.

Sender (prefill process): `encode(cache, pages, num_tokens, compression)` gathers a request's
pages from the per-layer pools and, for "int8", quantizes them in the same jitted call, then
runs the accuracy guard: pages whose quantization error exceeds `GUARD_THRESHOLD` are also
sent in the pool's own dtype, and the receiver writes those instead. -> `EncodedKV` (numpy).
Receiver (decode process): `decode_into(cache, pages, enc)` writes an `EncodedKV` into newly
allocated pages: int8 pages are dequantized and scattered in one jitted call (in the
receiver's KV dtype, pools donated), then the guarded pages are overwritten with raw values.

Quantization: symmetric absmax per (token, KV head) over H. The scale is absmax / 127 stored
as bfloat16 rounded *up* (toward +inf), so |x / scale| <= 127 still holds and nothing clips;
q = clip(round(x / scale), -127, 127) (not ±127.5: XLA saturates, NumPy wraps), and a zero
scale gives q = 0 (never NaN). Per-element round-trip error is <= scale / 2 with the stored
bfloat16 scale (at most 2^-7 relative above absmax / 127, so the step grows by < 0.8%).
Why per (token, head) and not per (page, head): measured on bench-random's K/V (1024 tokens)
with random weights, per-page scales have 1.27x the RMS error (0.76% vs 0.60% of the
values' RMS, for K and V alike), and far more on pages holding an outlier token (one large token sets the step for all G of them). The price is
2 / H bytes of scale per element: INT8 is 3.88x smaller than float32 and 1.94x smaller than
bfloat16 at H = 64 (3.94x / 1.97x at H = 128); float32 scales gave 3.76x / 1.88x at H = 64.
Per-token scales also keep a page's tokens independent, so pages could be re-cut to another page size on the host.

Accuracy guard: per page, the worst relative RMS error ||x - x'|| / ||x|| of any of its rows
(a token's H values of one KV head, in any layer, K or V). Gaussian-like rows give ~0.6% (a
uniform step of absmax/127 over values of std ~absmax/2.5; measured 0.60% on bench-random);
the worst a row of H values can reach is sqrt(H) / 254 (3.1% at H = 64, 4.5% at H = 128),
when one channel holds the row's magnitude and the rest sit just under half a step and round
to zero: the row's direction is then mostly lost, which attention scores (q . k) feel.
GUARD_THRESHOLD = 2% is ~3x the typical error and 2/3 of the H = 64 worst case: ordinary
pages pass and outlier-dominated rows are caught. Non-finite K/V (error NaN) is always sent
raw. (With H <= 25 the bound is under 2%, so only non-finite pages can trigger it.)

Page counts are padded to `page_bucket(n)` (1, 2, 3, 4, 6, 8, 12, ...) with the null page inside
the jitted gathers and scatters, so a handful of programs serve every prompt length (a new n
would otherwise compile a program mid-request: ~40-200 ms on a CPU, on every transfer of a
length not seen before); `ModelRunner.warmup` compiles them. The payload itself has n pages.

Shapes: L layers, n pages, m guarded pages, G tokens per page, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from raypd.engine.api import KV_COMPRESSIONS as COMPRESSIONS  # noqa: F401 - ("int8", "none"), re-exported
from raypd.engine.api import EncodedKV  # noqa: F401 - the payload type, re-exported
from raypd.engine.api import check_kv_compression
from raypd.engine.paged import (KVCache, pad_pages, padded_ids, read_pages, read_pages_to_host, write_pages,
                                write_pages_from_host)
from raypd.engine.paged import page_bucket  # noqa: F401 - re-exported

QMAX = 127
GUARD_THRESHOLD = 0.02  # relative RMS error per page above which the page is sent raw


def check_compression(compression: str) -> str:
    """A named compression (not None): raypd.engine.api.check_kv_compression, the one check."""
    return check_kv_compression(compression, allow_default=False)


# ---------------------------------------------------------------- pure kernels


def round_up_bf16(x: jax.Array) -> jax.Array:
    """float32 [...] >= 0 -> the smallest bfloat16 >= x (x itself when representable; NaN and
    +inf stay). Incrementing the bit pattern of a positive finite bfloat16 gives the next one."""
    near = x.astype(jnp.bfloat16)  # round to nearest even: may be below x
    bits = jax.lax.bitcast_convert_type(near, jnp.uint16)
    up = jax.lax.bitcast_convert_type(bits + jnp.uint16(1), jnp.bfloat16)
    return jnp.where(near.astype(jnp.float32) < x, up, near)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (q int8 [..., H], scale bfloat16 [...]). Zero rows give q = 0, scale = 0."""
    x = x.astype(jnp.float32)
    scale = round_up_bf16(jnp.max(jnp.abs(x), axis=-1) / QMAX)
    s32 = scale.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, 1.0)[..., None]
    q = jnp.clip(jnp.round(x / safe), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q int8 [..., H], scale [...] -> [..., H] in dtype."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def _rel_rms_error(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [L, n, G, K, H] -> [n]: per page, the worst row's ||x - x'|| / ||x|| over H (rows:
    layers x tokens x kv heads; all-zero rows count 0)."""
    x = x.astype(jnp.float32)
    err = jnp.sum(jnp.square(x - dequantize(q, scale, jnp.float32)), axis=-1)  # [L, n, G, K]
    ref = jnp.sum(jnp.square(x), axis=-1)
    rel = jnp.sqrt(err / jnp.where(ref > 0, ref, 1.0))
    return jnp.max(rel, axis=(0, 2, 3))  # NaN propagates: non-finite pages are caught by the guard


@jax.jit
def gather_quantize(cache: KVCache, pages: jax.Array):
    """Fused gather + quantize. pages [n] ->
    (kq, vq int8 [L, n, G, K, H], k_scale, v_scale bfloat16 [L, n, G, K], page_error [n])."""
    k, v = read_pages(cache, pages)  # [L, n, G, K, H] each (inlined into this jit)
    kq, ks = quantize(k)
    vq, vs = quantize(v)
    err = jnp.maximum(_rel_rms_error(k, kq, ks), _rel_rms_error(v, vq, vs))
    return kq, vq, ks, vs, err


@functools.partial(jax.jit, donate_argnums=0)
def dequantize_scatter(cache: KVCache, pages, kq, vq, ks, vs) -> KVCache:
    """Fused dequantize + scatter into `pages` [n] (kq/vq int8 [L, n, G, K, H], scales
    [L, n, G, K]), written in the pool's dtype. The cache is donated."""
    dt = cache.k[0].dtype
    return write_pages(cache, pages, dequantize(kq, ks, dt), dequantize(vq, vs, dt))


def guarded_pages(page_error: np.ndarray, threshold: float = GUARD_THRESHOLD) -> np.ndarray:
    """page_error [n] -> indices [m] of pages to send raw (error above threshold or not finite)."""
    page_error = np.asarray(page_error)
    return np.flatnonzero(~(page_error <= threshold)).astype(np.int32)


# ---------------------------------------------------------------- host-facing wrappers


def layer_slice(cache: KVCache, lo: int, hi: int) -> KVCache:
    """The pools of layers [lo, hi) as a KVCache of their own (no copy)."""
    return KVCache(k=tuple(cache.k[lo:hi]), v=tuple(cache.v[lo:hi]))


def encode(cache: KVCache, pages: list[int], num_tokens: int, compression: str = "int8",
           threshold: float = GUARD_THRESHOLD) -> EncodedKV:
    """Read a request's pages out of `cache` (not modified) into an `EncodedKV` of numpy.
    For one layer group, pass `layer_slice(cache, lo, hi)`: the payload then has L = hi - lo."""
    check_compression(compression)
    dtype = str(cache.k[0].dtype)
    if compression == "none":
        return EncodedKV("none", num_tokens, dtype, *read_pages_to_host(cache, pages))
    n, ids = len(pages), padded_ids(pages)
    kq, vq, ks, vs, err = jax.device_get(gather_quantize(cache, ids))
    raw = guarded_pages(err[:n], threshold)
    enc = EncodedKV("int8", num_tokens, dtype, kq[:, :n], vq[:, :n], ks[:, :n], vs[:, :n], raw_index=raw)
    if len(raw):
        rk, rv = read_pages_to_host(cache, np.asarray(pages, np.int32)[raw])
        enc = enc.replace(raw_k=rk, raw_v=rv)
    return enc


def take_pages(enc: EncodedKV, index: list[int]) -> EncodedKV:
    """The payload of pages `index` (positions in 0..n-1) of `enc`, as full pages. Raw pages
    the accuracy guard kept stay raw."""
    idx = np.asarray(index, np.int32)
    out = dataclasses.replace(enc, num_tokens=len(idx) * enc.shape[2], k=enc.k[:, idx], v=enc.v[:, idx])
    if enc.compression == "int8":
        out = dataclasses.replace(out, k_scale=enc.k_scale[:, idx], v_scale=enc.v_scale[:, idx],
                                  raw_index=None, raw_k=None, raw_v=None)
        if enc.num_raw_pages:
            raw = {int(p): i for i, p in enumerate(enc.raw_index)}  # page position -> row of raw_k
            keep = [(j, raw[int(p)]) for j, p in enumerate(idx) if int(p) in raw]
            if keep:
                rows = np.asarray([r for _, r in keep], np.int32)
                out = dataclasses.replace(out, raw_index=np.asarray([j for j, _ in keep], np.int32),
                                          raw_k=enc.raw_k[:, rows], raw_v=enc.raw_v[:, rows])
    return out


def decode_into(cache: KVCache, pages: list[int], enc: EncodedKV, first_layer: int = 0) -> KVCache:
    """Write `enc` into `pages` of `cache` (donated; use the returned cache). Shapes must have
    been checked by the caller (`check_fits`). A payload of one layer group (L' layers) goes
    into layers [first_layer, first_layer + L'); the other layers' pools are untouched."""
    L = enc.shape[0]
    if first_layer or L != len(cache.k):
        lo, hi = first_layer, first_layer + L
        sub = decode_into(layer_slice(cache, lo, hi), pages, enc)
        return KVCache(k=cache.k[:lo] + sub.k + cache.k[hi:], v=cache.v[:lo] + sub.v + cache.v[hi:])
    if enc.compression == "none":
        return write_pages_from_host(cache, pages, enc.k, enc.v)
    ids = padded_ids(pages)
    B = int(ids.shape[0])
    cache = dequantize_scatter(cache, ids, pad_pages(enc.k, B), pad_pages(enc.v, B),
                               pad_pages(enc.k_scale, B), pad_pages(enc.v_scale, B))
    if enc.num_raw_pages:
        raw = np.asarray(pages, np.int32)[np.asarray(enc.raw_index)]
        cache = write_pages_from_host(cache, raw, enc.raw_k, enc.raw_v)
    return cache


def check_fits(enc: EncodedKV, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
               pages_for) -> None:
    """Raise ValueError unless `enc` has the receiver's [L, n, G, K, H] and a consistent n."""
    check_compression(enc.compression)
    L, n, G, K, H = enc.shape
    want = (num_layers, pages_for(enc.num_tokens), page_size, num_kv_heads, head_dim)
    if (L, n, G, K, H) != want or enc.v.shape != enc.k.shape:
        raise ValueError(f"K/V payload of shape [L, n, G, K, H] = {list(enc.shape)} does not fit "
                         f"the receiver's model and pages {list(want)}")
    if enc.compression == "int8":
        if enc.k.dtype != np.int8 or enc.k_scale is None or enc.k_scale.shape != (L, n, G, K):
            raise ValueError("int8 payload without int8 values and [L, n, G, K] scales")
        m = enc.num_raw_pages
        if m and (enc.raw_k is None or enc.raw_k.shape != (L, m, G, K, H)):
            raise ValueError(f"int8 payload names {m} raw pages but carries no [L, m, G, K, H] values")
