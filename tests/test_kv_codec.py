"""The K/V codec (raypd/engine/kv_codec.py): INT8 bounds and size, the accuracy guard, and page
counts padded to buckets so that transfers compile nothing after the warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raypd.engine import kv_codec, paged
from tests.test_transfer import CFG, ENGINE, model, pool_bytes, random_cache, runner_for  # noqa: F401 - fixture


def test_int8_roundtrip_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16, 2, 64)).astype(np.float32) * rng.lognormal(0, 3, (3, 5, 16, 2, 1))
    x[0, 0, 0, 0] = 0.0  # a zero row: scale 0, no NaN
    x[0, 0, 1, 0, 7] = 1e4  # an outlier channel
    x[0, 0, 2, 0, :] = 127 * 1.00390625  # absmax / 127 = 1 + 2^-8: halfway between bfloat16s, rounds up
    q, s = kv_codec.quantize(jnp.asarray(x))
    q, s = np.asarray(q), np.asarray(s)
    assert q.dtype == np.int8 and s.dtype == jnp.bfloat16 and s.shape == x.shape[:-1]
    s32 = s.astype(np.float32)
    absmax = np.abs(x).max(-1)
    assert np.all(s32 >= absmax / 127)  # rounded up: |x / scale| <= 127, nothing clips
    assert np.all(s32 <= absmax / 127 * (1 + 2.0 ** -7))  # by at most one bfloat16 step
    assert s32[0, 0, 2, 0] == 1 + 2.0 ** -7  # round-to-nearest would have given 1.0 (and clipped)
    assert np.abs(q).max() == 127 and q.min() >= -127
    back = np.asarray(kv_codec.dequantize(jnp.asarray(q), jnp.asarray(s), jnp.float32))
    assert np.all(back[0, 0, 0, 0] == 0) and np.all(np.isfinite(back))
    bound = s32[..., None] / 2 + np.finfo(np.float32).eps * np.abs(x)  # half a step of the sent scale
    assert np.all(np.abs(back - x) <= bound)


def test_round_up_bf16_is_the_smallest_bfloat16_not_below():
    x = np.array([0.0, 1.0, 1.0 + 2.0 ** -9, 3.0e-5, 1.7e38, np.inf], np.float32)
    up = np.asarray(kv_codec.round_up_bf16(jnp.asarray(x))).astype(np.float32)
    assert np.all(up >= x) and up[0] == 0 and up[1] == 1 and up[2] == 1 + 2.0 ** -7 and up[-1] == np.inf
    below = np.asarray(jnp.asarray(up[:-1], jnp.bfloat16).view(jnp.uint16) - 1, np.uint16)
    prev = below.view(jnp.bfloat16).astype(np.float32)
    assert np.all((prev < x[:-1]) | (up[:-1] == 0))  # one bfloat16 lower would be below x


@pytest.mark.parametrize("H", [64, 128])
def test_int8_bytes_meet_the_target(H):
    n, toks = 8, 8 * 16
    f32 = kv_codec.encode(random_cache(n + 1, jnp.float32, H=H), list(range(1, n + 1)), toks, "none")
    bf16 = kv_codec.encode(random_cache(n + 1, jnp.bfloat16, H=H), list(range(1, n + 1)), toks, "none")
    i8 = kv_codec.encode(random_cache(n + 1, jnp.float32, H=H), list(range(1, n + 1)), toks, "int8")
    assert i8.num_raw_pages == 0 and i8.k_scale.dtype == jnp.bfloat16
    assert bf16.num_bytes / i8.num_bytes == pytest.approx(2 * H / (H + 2))  # >= 1.94
    assert bf16.num_bytes / i8.num_bytes >= 1.9 and f32.num_bytes / i8.num_bytes >= 3.8


def test_guard_sends_outlier_and_nonfinite_pages_raw():
    cache = random_cache(6, jnp.float32, H=64)
    k0 = np.array(cache.k[0])
    k0[1, 2, 5, :] = 0.49 * np.sign(np.arange(64) % 2 - 0.5)  # page 2, one row: just under half
    k0[1, 2, 5, 0] = 127.0  # a step of the outlier channel, so it all rounds to 0: error 3.1%
    k0[1, 4, 3, 5] = np.inf  # page 4: not finite
    cache = cache.replace(k=(jnp.asarray(k0),) + cache.k[1:])
    pages = [1, 2, 3, 4, 5]
    enc = kv_codec.encode(cache, pages, 80, "int8")
    assert list(enc.raw_index) == [1, 3]
    dst = kv_codec.decode_into(random_cache(6, jnp.float32, H=64, seed=1), pages, enc)
    for p in (2, 4):  # guarded pages arrive bit-exact
        assert pool_bytes(dst, [p]) == pool_bytes(cache, [p])
    assert kv_codec.guarded_pages(np.array([0.0, 0.019, 0.021, np.nan])).tolist() == [2, 3]


def test_page_counts_pad_to_buckets_and_warm_transfers_compile_nothing(model):
    """Transfers of any length run a few bucketed programs, all compiled by the warm-up: a prompt
    length never seen before costs no compilation on either side (it used to: one program per
    page count, ~40-200 ms mid-request on a CPU). Padding lands in the null page only."""
    assert [paged.page_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    with pytest.raises(ValueError, match="at least one page"):
        paged.page_bucket(0)
    src, dst = runner_for(model), runner_for(model)
    src.cache = random_cache(ENGINE.num_pages, jnp.float32, L=CFG.num_layers, K=CFG.num_kv_heads,
                             H=CFG.head_dim, seed=3)
    src.warmup_transfers()
    dst.warmup_transfers()
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    sent = []  # uncompressed payloads, checked byte for byte after the compile-free window
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for n in (1, 5, 7, 11, src.max_pages_per_seq):
            pages = list(range(1, n + 1))
            for compression in ("int8", "none"):
                enc = kv_codec.encode(src.cache, pages, n * 16 - 3, compression)
                got = dst.allocator.allocate(n)
                dst.cache = kv_codec.decode_into(dst.cache, got, enc)
                if compression == "none":
                    sent.append((pages, got, enc))
                else:
                    dst.allocator.free(got)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after the transfer warm-up"
    for pages, got, enc in sent:
        assert enc.k.shape[1] == len(pages)  # the payload carries its n pages only
        assert pool_bytes(dst.cache, got) == pool_bytes(src.cache, pages)


def test_unknown_compression_is_an_error():
    with pytest.raises(ValueError, match="kv_compression must be one of"):
        kv_codec.encode(random_cache(2, jnp.float32), [1], 3, "fp4")
