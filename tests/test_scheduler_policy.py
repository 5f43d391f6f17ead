"""Placement, admission and the cost model: table-driven, pure, no Ray.

The cost model in every table is one a reader can work by hand: prefill 1 ms per token,
decode step 10 ms + 1 ms per running slot, transfer 1 MB/s at 100 bytes per token (0.1 ms per
token) with no latency. G = 16 tokens per page.
"""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.cost_model import CostModel, fit, fit_nonneg
from scheduler.policy import (DecodeWorkerState, Placement, PolicyConfig, PrefillWorkerState, RejectReason,
                              Rejection, RequestSpec, TransferState, Wait, admit, place, place_decode,
                              place_prefill)

G = 16
COST = CostModel(prefill_coefs=(0.0, 1e-3, 0.0), decode_coefs=(0.01, 1e-3, 0.0), transfer_latency_s=0.0,
                 transfer_bytes_per_s=1e6, kv_bytes_per_token=100)


def req(prompt_len=1024, max_tokens=16, ttft_slo_s=None, tpot_slo_s=None, arrival_s=0.0, num_host_pages=0):
    return RequestSpec("r1", prompt_len, max_tokens, G, arrival_s, ttft_slo_s, tpot_slo_s, num_host_pages)


def pw(worker_id, queued_s=0.0, num_cached_pages=0, is_alive=True):
    return PrefillWorkerState(worker_id, queued_s, num_cached_pages=num_cached_pages, is_alive=is_alive)


def dw(worker_id, num_free_pages=100, num_free_slots=4, max_pages=100, num_running=0, num_cached_pages=0,
       is_alive=True):
    return DecodeWorkerState(worker_id, num_free_slots, num_free_pages, max_pages, num_running,
                             num_cached_pages=num_cached_pages, is_alive=is_alive)


# -- prefill placement -----------------------------------------------------------------------
# prompt 1024 tokens = 64 pages: prefill 1.024 s cold, transfer 0.1024 s.

@pytest.mark.parametrize("prefill_states, backlog, expected", [
    # 48 cached pages save 0.768 s: worth a 0.1 s longer queue
    pytest.param([pw("A", 0.2), pw("B", 0.3, 48)], {}, "B", id="prefix-beats-slightly-shorter-queue"),
    # 16 cached pages save 0.256 s: not worth a 1.9 s longer queue
    pytest.param([pw("A", 0.1), pw("B", 2.0, 16)], {}, "A", id="long-queue-beats-small-prefix"),
    # A's link has 1 MB queued (1 s) in front of the request's K/V
    pytest.param([pw("A", 0.0), pw("B", 0.5)], {"A": 1_000_000}, "B", id="transfer-backlog-tips-it"),
    pytest.param([pw("A", 0.5), pw("B", 0.0)], {"D": 1_000_000}, "B", id="decode-backlog-hits-both"),
    pytest.param([pw("A", 0.0, 63, is_alive=False), pw("B", 0.5)], {}, "B", id="dead-worker-skipped"),
    pytest.param([pw("B", 0.1), pw("A", 0.1)], {}, "A", id="tie-goes-to-worker-id"),
    # a prefix cap: 64 cached pages claimed, at most 63 usable (the last token is computed)
    pytest.param([pw("A", 0.0, 64), pw("B", 0.0, 63)], {}, "A", id="cached-pages-capped"),
])
def test_place_prefill(prefill_states, backlog, expected):
    d = place_prefill(req(), prefill_states, COST, now_s=0.0, transfer=TransferState(backlog),
                      decode_worker_id="D")
    assert d.worker_id == expected
    assert d.ttft_s == pytest.approx(min(e.ttft_s for e in d.estimates))
    assert [e.worker_id for e in d.estimates] == sorted(s.worker_id for s in prefill_states if s.is_alive)


def test_prefill_estimate_parts():
    d = place_prefill(req(), [pw("A", 0.25, 48)], COST, now_s=2.0, transfer=TransferState({"A": 50_000}),
                      decode_worker_id="D")
    e = d.estimate
    assert (e.num_cached_pages, e.uncached_len) == (48, 1024 - 48 * G)
    assert (e.queue_s, e.prefill_s) == pytest.approx((0.25, 0.256))
    assert e.transfer_s == pytest.approx((50_000 + 102_400) / 1e6)
    assert d.ttft_s == pytest.approx(2.0 + e.ttft_s)  # TTFT counts from arrival
    assert place_prefill(req(), [pw("A", is_alive=False)], COST, now_s=0.0) is None


def test_host_copies_are_fetched_when_faster_than_computing():
    # 32 pages on host: fetching costs 0.1 ms/token, computing 1 ms/token.
    e = place_prefill(req(num_host_pages=32), [pw("A", 0.0, 8)], COST, now_s=0.0).estimate
    assert (e.num_cached_pages, e.num_fetched_pages) == (32, 24)
    assert e.fetch_s == pytest.approx(24 * G * 1e-4) and e.uncached_len == 1024 - 32 * G
    slow = CostModel((0.0, 1e-3, 0.0), (0.01, 1e-3, 0.0), 0.0, 1e4, 100)  # fetch 10 ms/token
    e = place_prefill(req(num_host_pages=32), [pw("A", 0.0, 8)], slow, now_s=0.0).estimate
    assert (e.num_cached_pages, e.num_fetched_pages, e.fetch_s) == (8, 0, 0.0)


# -- decode placement ------------------------------------------------------------------------
# prompt 100 + max_tokens 28 = 128 tokens = 8 pages. Step time 10 ms + 1 ms per slot.

@pytest.mark.parametrize("decode_states, tpot_slo_s, expected", [
    pytest.param([dw("A", 20), dw("B", 30)], None, "B", id="most-free-pages"),
    pytest.param([dw("A", 7), dw("B", 8)], None, "B", id="not-enough-pages"),
    pytest.param([dw("A", 20), dw("B", 30, num_free_slots=0)], None, "A", id="no-free-slot"),
    # A with one more: 10 + 16 ms > 20 ms target; B: 10 + 6 ms
    pytest.param([dw("A", 90, num_running=15), dw("B", 30, num_running=5)], 0.02, "B", id="tpot-target"),
    pytest.param([dw("A", 90, num_running=15), dw("B", 30, num_running=5)], None, "A", id="no-tpot-target"),
    pytest.param([dw("A", 90, is_alive=False), dw("B", 30)], None, "B", id="dead-worker-skipped"),
    pytest.param([dw("A", 30, num_running=2), dw("B", 30, num_running=1)], None, "B", id="tie-fewer-running"),
    pytest.param([dw("A", 7), dw("B", 30, num_free_slots=0)], None, None, id="none-has-room"),
    pytest.param([dw("A", 90, num_running=15)], 0.02, None, id="none-meets-tpot"),
])
def test_place_decode(decode_states, tpot_slo_s, expected):
    d = place_decode(req(100, 28, tpot_slo_s=tpot_slo_s), decode_states, COST)
    assert (d.worker_id if d else None) == expected
    if d:
        assert d.num_pages_needed == 8


def test_config_tpot_target_is_the_default():
    states = [dw("A", 90, num_running=15), dw("B", 30, num_running=5)]
    assert place_decode(req(100, 28), states, COST, PolicyConfig(tpot_slo_s=0.02)).worker_id == "B"
    assert place_decode(req(100, 28, tpot_slo_s=1.0), states, COST, PolicyConfig(tpot_slo_s=0.02)).worker_id == "A"


# -- conditional disaggregation --------------------------------------------------------------

@pytest.mark.parametrize("prompt_len, decode_cached_pages, prefill_alive, is_local", [
    pytest.param(50, 0, True, True, id="short-prompt-local"),
    pytest.param(64, 0, True, True, id="at-threshold-local"),
    pytest.param(65, 0, True, False, id="over-threshold-remote"),
    pytest.param(100, 4, True, True, id="decode-worker-prefix-makes-it-short"),  # 100 - 64 = 36
    pytest.param(1024, 0, False, True, id="no-prefill-worker-falls-back-local"),
])
def test_conditional_disaggregation(prompt_len, decode_cached_pages, prefill_alive, is_local):
    p = place(req(prompt_len), [pw("P", is_alive=prefill_alive)], [dw("D", num_cached_pages=decode_cached_pages)],
              COST, now_s=0.0, config=PolicyConfig(local_prefill_max_len=64))
    assert isinstance(p, Placement) and p.is_local_prefill == is_local and p.decode_worker_id == "D"
    assert p.prefill_worker_id == ("D" if is_local else "P")
    if is_local:  # no transfer; waits one decode step of the worker
        assert p.estimates[0].transfer_s == 0.0 and p.estimates[0].queue_s == pytest.approx(0.0)
        assert p.ttft_s == pytest.approx(p.uncached_len * 1e-3)


def test_remote_placement_carries_estimates_and_prefix():
    p = place(req(1024), [pw("A", 0.2), pw("B", 0.3, 48)], [dw("D1", 80), dw("D2", 100)], COST, now_s=1.0)
    assert (p.prefill_worker_id, p.decode_worker_id, p.is_local_prefill) == ("B", "D2", False)
    assert (p.num_cached_pages, p.uncached_len) == (48, 256)
    assert p.ttft_s == pytest.approx(1.0 + 0.3 + 0.256 + 0.1024)
    assert p.tpot_s == pytest.approx(0.011) and len(p.estimates) == 2


# -- admission and early rejection -----------------------------------------------------------

@pytest.mark.parametrize("request_, prefill_states, decode_states, backlog, now_s, reason, ttft_s", [
    pytest.param(req(), [pw("A")], [dw("D", is_alive=False)], {}, 0.0, RejectReason.NO_WORKERS, None,
                 id="no-live-decode-worker"),
    pytest.param(req(1024, 16), [pw("A")], [dw("D", max_pages=64), dw("E", max_pages=60)], {}, 0.0,
                 RejectReason.NO_CAPACITY, None, id="too-big-for-every-pool"),
    pytest.param(req(ttft_slo_s=0.5), [pw("A")], [dw("D")], {}, 0.0, RejectReason.DEADLINE, 1.1264,
                 id="prefill-misses-slo"),
    pytest.param(req(ttft_slo_s=1.5), [pw("A")], [dw("D")], {"A": 1_000_000}, 0.0, RejectReason.DEADLINE,
                 2.1264, id="transfer-backlog-misses-slo"),
    pytest.param(req(ttft_slo_s=1.5, arrival_s=1.0), [pw("A")], [dw("D")], {}, 1.5, RejectReason.DEADLINE,
                 1.6264, id="time-already-waited-counts"),
    pytest.param(req(ttft_slo_s=1.5), [pw("A", 1.0)], [dw("D", num_free_slots=0)], {}, 0.0,
                 RejectReason.DEADLINE, 2.1264, id="waiting-for-decode-already-too-late"),
])
def test_rejections(request_, prefill_states, decode_states, backlog, now_s, reason, ttft_s):
    r = place(request_, prefill_states, decode_states, COST, now_s, transfer=TransferState(backlog))
    assert isinstance(r, Rejection) and r.reason == reason and r.request_id == "r1" and r.message
    assert r.ttft_s == (pytest.approx(ttft_s) if ttft_s is not None else None)
    if reason == RejectReason.DEADLINE:
        assert r.retry_after_s == pytest.approx(max(0.1, ttft_s - request_.ttft_slo_s))
    if reason == RejectReason.NO_CAPACITY:
        assert r.retry_after_s is None  # retrying cannot help


def test_within_slo_is_placed():
    assert isinstance(place(req(ttft_slo_s=1.2), [pw("A")], [dw("D")], COST, 0.0), Placement)


def test_wait_when_decode_is_full_but_could_fit_later():
    r = place(req(), [pw("A", 0.5)], [dw("D", num_free_pages=10)], COST, now_s=0.0)
    assert isinstance(r, Wait) and r.ttft_s == pytest.approx(0.5 + 1.024 + 0.1024)  # before any decode wait


@pytest.mark.parametrize("num_queued, queued_s, expected", [
    (255, [5.0], None),
    (256, [3.0, 2.0], 2.0),  # retry after the least queued live worker's work
    (300, [0.01], 0.1),  # floored
    (256, [], 0.1),
])
def test_admit_bounded_queue(num_queued, queued_s, expected):
    r = admit(req(), num_queued, PolicyConfig(max_queued=256), [pw(f"P{i}", q) for i, q in enumerate(queued_s)])
    if expected is None:
        assert r is None
    else:
        assert r.reason == RejectReason.QUEUE_FULL and r.retry_after_s == pytest.approx(expected)


def test_request_validation():
    with pytest.raises(ValueError, match="prompt_len"):
        req(prompt_len=0)
    assert req(1024, 16).num_pages_needed == 65 and req(1024).max_cached_pages == 63
    assert req(16).max_cached_pages == 0 and req(17).max_cached_pages == 1


def test_placement_is_deterministic_and_pure():
    args = (req(1024, ttft_slo_s=5.0), [pw("A", 0.2), pw("B", 0.3, 48)], [dw("D1", 80), dw("D2", 100)], COST, 1.0)
    assert place(*args) == place(*args)


# -- cost model ------------------------------------------------------------------------------

def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    true_prefill, true_decode = (0.004, 2e-4, 3e-8), (0.008, 5e-4, 2e-7)
    prefill = [(n, c, true_prefill[0] + true_prefill[1] * n + true_prefill[2] * n * (c + n))
               for n in (16, 64, 256, 1024, 2048) for c in (0, 512, 4096)]
    decode = [(b, s, true_decode[0] + true_decode[1] * b + true_decode[2] * s)
              for b in (1, 4, 16, 64) for s in (b * 100, b * 2000)]
    transfer = [(n, 0.002 + n / 5e9) for n in (1e3, 1e6, 1e8, 1e9)]
    m = fit(prefill, decode, transfer, kv_bytes_per_token=64)
    np.testing.assert_allclose(m.prefill_coefs, true_prefill, rtol=1e-6)
    np.testing.assert_allclose(m.decode_coefs, true_decode, rtol=1e-6)
    assert m.transfer_latency_s == pytest.approx(0.002) and m.transfer_bytes_per_s == pytest.approx(5e9)
    # noisy samples still give a close, non-negative fit
    noisy = [(n, c, t * (1 + 0.01 * rng.standard_normal())) for n, c, t in prefill]
    m2 = fit(noisy, decode, transfer, 64)
    assert min(m2.prefill_coefs) >= 0
    assert m2.predict_prefill_s(1000, 100) == pytest.approx(m.predict_prefill_s(1000, 100), rel=0.05)


def test_fit_nonneg_clips_a_negative_coefficient():
    x = np.arange(1.0, 11.0)
    features = np.stack([np.ones_like(x), x], -1)
    coef = fit_nonneg(features, 5.0 - 0.1 * x)  # the best slope is negative
    assert coef[1] == 0.0 and coef[0] == pytest.approx(np.mean(5.0 - 0.1 * x))


def test_predictions():
    assert COST.predict_prefill_s(0) == 0.0 and COST.predict_prefill_s(100) == pytest.approx(0.1)
    assert COST.predict_decode_step_s(0) == 0.0 and COST.predict_decode_step_s(4) == pytest.approx(0.014)
    assert COST.predict_transfer_s(0) == 0.0 and COST.predict_transfer_s(COST.kv_bytes(1000)) == pytest.approx(0.1)
    assert COST.max_local_prefill_len(max_stall_s=0.05) == 50  # the longest prompt prefilled in 50 ms
    with pytest.raises(ValueError, match=">= 0"):
        CostModel((0.0, -1.0, 0.0), (0, 0, 0), 0.0, 1.0, 1)
