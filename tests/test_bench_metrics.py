"""raypd.bench metric math and workloads against hand-computed examples (no engine, microseconds).

Definitions are those of `vllm bench serve`: TPOT = (E2E - TTFT) / (output tokens - 1), ITL per
chunk, goodput = requests per second meeting every SLO given, rejected and failed requests
counting as misses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_layering import FORBIDDEN, imported_modules

from raypd.bench import metrics, study, workload
from raypd.bench.metrics import SLO, RequestRecord

ROOT = Path(__file__).resolve().parent.parent


def rec(sent, chunks, tokens=None, status="ok", index=0, prompt_len=10, end=None, **kw) -> RequestRecord:
    tokens = tokens if tokens is not None else [1] * len(chunks)
    return RequestRecord(index, prompt_len, sum(tokens), sent, sent, list(chunks), list(tokens),
                         end if end is not None else (chunks[-1] if chunks else sent), status, **kw)


def test_ttft_tpot_itl_e2e_by_hand():
    # sent at 1.0; chunks at 1.5 (1 token), 1.6 (1), 1.8 (2): 4 tokens.
    r = rec(1.0, [1.5, 1.6, 1.8], [1, 1, 2])
    assert metrics.ttft_s(r) == pytest.approx(0.5)
    assert metrics.e2e_s(r) == pytest.approx(0.8)
    assert metrics.tpot_s(r) == pytest.approx((0.8 - 0.5) / 3)  # 0.1
    assert metrics.itl_s(r) == pytest.approx([0.1, 0.2])  # per chunk, not per token


def test_one_token_output_has_no_tpot_but_passes_a_tpot_slo():
    r = rec(0.0, [0.3])
    assert metrics.tpot_s(r) is None and metrics.itl_s(r) == []
    assert metrics.meets_slo(r, SLO(ttft_s=0.5, tpot_s=0.001))
    assert not metrics.meets_slo(r, SLO(ttft_s=0.2))


def test_goodput_counts_rejected_and_failed_as_misses():
    records = [
        rec(0.0, [0.1, 0.2, 0.3], index=0),         # TTFT 0.1, TPOT 0.1: good
        rec(0.5, [0.7, 0.75], index=1),             # TTFT 0.2, TPOT 0.05: good
        rec(1.0, [1.6, 1.7], index=2),              # TTFT 0.6: misses the TTFT SLO
        rec(1.0, [], status="rejected", index=3),   # rejected at admission
        rec(1.2, [], status="failed", index=4, error="boom"),
    ]
    s = metrics.summarize(records, duration_s=2.0, slo=SLO(ttft_s=0.5, tpot_s=0.1))
    assert (s["num_requests"], s["num_completed"], s["num_rejected"], s["num_failed"]) == (5, 3, 1, 1)
    assert s["num_good"] == 2
    assert s["goodput"] == pytest.approx(1.0)  # 2 good / 2 s
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["request_throughput"] == pytest.approx(1.5)  # completed only
    assert s["total_output_tokens"] == 7 and s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx((30 + 7) / 2)
    # TTFT statistics over the completed requests only, in ms.
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0)
    # A tighter TPOT SLO turns the first request into a miss as well.
    assert metrics.summarize(records, 2.0, SLO(ttft_s=0.5, tpot_s=0.09))["num_good"] == 1
    # An E2E SLO alone.
    assert metrics.summarize(records, 2.0, SLO(e2e_s=0.25))["num_good"] == 1


def test_no_slo_no_goodput():
    s = metrics.summarize([rec(0.0, [0.1, 0.2])], duration_s=1.0)
    assert s["goodput"] is None and s["slo_attainment"] is None and s["num_good"] is None


def test_percentiles_interpolate_linearly():
    v = [1.0, 2.0, 3.0, 4.0]
    assert metrics.percentile(v, 50) == pytest.approx(2.5)
    assert metrics.percentile(v, 90) == pytest.approx(3.7)  # 3 + 0.7 * (4 - 3)
    assert metrics.percentile(v, 99) == pytest.approx(3.97)
    assert metrics.percentile([], 50) is None
    st = metrics.stats_ms([0.001, 0.002, 0.003, 0.004])
    assert st["p50"] == pytest.approx(2.5) and st["p90"] == pytest.approx(3.7) and st["mean"] == pytest.approx(2.5)
    assert metrics.stats_ms([])["p99"] is None


def test_summarize_rejects_a_zero_duration():
    with pytest.raises(ValueError, match="duration_s"):
        metrics.summarize([], 0.0)


def test_merge_bursts_joins_back_to_back_tokens():
    times, tokens = metrics.merge_bursts([1.0, 1.00001, 1.00002, 1.5, 1.50001, 2.0], [1] * 6, gap_s=2e-4)
    assert times == [1.0, 1.5, 2.0] and tokens == [3, 2, 1]


def test_breakdown_without_stage_timings_splits_ttft_and_decode():
    plain = [rec(0.0, [0.2, 0.3, 0.4]), rec(0.0, [0.4, 0.6]), rec(0.0, [], status="rejected")]
    assert metrics.breakdown_s(plain) == pytest.approx(dict(ttft=0.3, decode=0.2))
    assert metrics.breakdown_s([rec(0.0, [], status="failed")]) == {}


def test_breakdown_with_stage_timings_adds_up_to_e2e():
    # Remote prefill: sent at 1.0, first token at 1.5 (TTFT 0.5), last at 2.1 (decode 0.6);
    # queue 0.1 + prefill 0.25 + transfer 0.05 leaves 0.1 of TTFT to "other".
    remote = rec(1.0, [1.5, 1.8, 2.1], server_timings=dict(queue_s=0.1, prefill_s=0.25, transfer_s=0.05))
    # Local prefill (no transfer_s): TTFT 0.3 = queue 0.0 + prefill 0.2 + other 0.1; decode 0.3.
    local = rec(0.0, [0.3, 0.6], server_timings=dict(queue_s=0.0, prefill_s=0.2, is_local_prefill=True))
    assert metrics.breakdown_one_s(remote) == pytest.approx(
        dict(queue=0.1, prefill=0.25, transfer=0.05, other=0.1, decode=0.6))
    assert metrics.breakdown_one_s(local) == pytest.approx(
        dict(queue=0.0, prefill=0.2, transfer=0.0, other=0.1, decode=0.3))
    both = metrics.breakdown_s([remote, local, rec(0.0, [], status="rejected")])
    assert both == pytest.approx(dict(queue=0.05, prefill=0.225, transfer=0.025, other=0.1, decode=0.45))
    assert sum(both.values()) == pytest.approx((1.1 + 0.6) / 2)  # mean E2E
    # The remote prefill's wait in its worker's call queue (0.06 of "other") counts as queueing.
    waited = rec(1.0, [1.5, 1.8, 2.1], server_timings=dict(queue_s=0.1, prefill_wait_s=0.06, prefill_s=0.25,
                                                           transfer_s=0.05))
    assert metrics.breakdown_one_s(waited) == pytest.approx(
        dict(queue=0.16, prefill=0.25, transfer=0.05, other=0.04, decode=0.6))
    # One completed request without the target's timings: the client-side split for all.
    assert set(metrics.breakdown_s([remote, rec(0.0, [0.2, 0.3])])) == {"ttft", "decode"}


def test_slo_break_rate_is_the_lowest_rate_past_the_slo():
    # Unsorted input; p99 TPOT 0.02, 0.05, 0.03 s at 1, 3, 2 req/s; SLO 0.025 s.
    assert study.slo_break_rate([1, 3, 2], [0.02, 0.05, 0.03], 0.025) == 2
    assert study.slo_break_rate([1, 2], [0.02, 0.025], 0.025) is None  # at the SLO is within it
    assert study.slo_break_rate([1, 2], [0.02, None], 0.025) == 2  # nothing completed: broken


def test_rate_at_attainment_interpolates_between_the_bracketing_rates():
    # 100% at 1, 95% at 2, 75% at 4 req/s: 90% is a quarter of the way from 2 to 4 -> 2.5.
    got = study.rate_at_attainment([4, 1, 2], [0.75, 1.0, 0.95], 0.9)
    assert got.rate == pytest.approx(2.5) and not got.is_lower_bound
    assert study.rate_at_attainment([1, 2], [0.95, 0.9]) == study.RateAtAttainment(2, True)
    assert study.rate_at_attainment([1, 2], [0.5, 0.2]) == study.RateAtAttainment(None, False)
    assert study.ratio(3.0, 2.0) == 1.5 and study.ratio(None, 2.0) is None and study.ratio(1.0, 0.0) is None
    with pytest.raises(ValueError):
        study.rate_at_attainment([1, 2], [0.9])


# ----------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_are_seeded_and_have_the_mean_rate(burstiness):
    t = workload.arrival_times(20000, 5.0, np.random.default_rng(7), burstiness)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    np.testing.assert_array_equal(t, workload.arrival_times(20000, 5.0, np.random.default_rng(7), burstiness))
    assert (len(t) - 1) / t[-1] == pytest.approx(5.0, rel=0.05)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)  # CV of a gamma


def test_arrivals_at_another_rate_scale_the_same_gaps():
    a = workload.arrival_times(50, 2.0, np.random.default_rng(3))
    b = workload.arrival_times(50, 4.0, np.random.default_rng(3))
    np.testing.assert_allclose(a, 2 * b)
    assert not workload.arrival_times(5, math.inf, np.random.default_rng(0)).any()
    with pytest.raises(ValueError, match="rate"):
        workload.arrival_times(5, 0.0, np.random.default_rng(0))


def test_synthetic_lengths_are_exact_and_prompts_avoid_special_ids():
    rng = np.random.default_rng(0)
    reqs = workload.synthetic(200, workload.uniform(4, 9), workload.fixed(3), vocab_size=8,
                              arrivals_s=np.zeros(200), rng=rng, exclude_ids=(0, 2))
    assert {r.max_tokens for r in reqs} == {3}
    assert {len(r.prompt_ids) for r in reqs} == set(range(4, 10))
    assert not {t for r in reqs for t in r.prompt_ids} & {0, 2}
    again = workload.synthetic(200, workload.uniform(4, 9), workload.fixed(3), 8, np.zeros(200),
                               np.random.default_rng(0), (0, 2))
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in again]
    chat_in, _ = workload.DATASETS["chat"]
    lens = chat_in.sample(2000, rng)
    assert lens.min() >= 16 and lens.max() <= 1024 and 150 < np.median(lens) < 250


def test_parse_length():
    assert workload.parse_length("16") == workload.fixed(16)
    assert workload.parse_length("8:32") == workload.uniform(8, 32)
    for bad in ("x", "1:2:3", "9:3", "0"):
        with pytest.raises(ValueError):
            workload.parse_length(bad)


def test_trace_replay_shares_prefixes_for_shared_hash_ids(tmp_path):
    rows = [dict(timestamp=1000, input_length=10, output_length=3, hash_ids=[7, 8, 9]),
            dict(timestamp=1500, input_length=9, output_length=2, hash_ids=[7, 8, 5]),
            dict(timestamp=3000, input_length=6, output_length=1, hash_ids=[4]),  # 4 tokens of its own
            dict(timestamp=3000, input_length=4, output_length=1, hash_ids=[7, 8])]  # cut mid-block
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = workload.trace_requests(workload.read_trace(path), vocab_size=50, seed=1, block_len=4, time_scale=0.5)
    a, b, c, d = (r.prompt_ids for r in reqs)
    assert [len(p) for p in (a, b, c, d)] == [10, 9, 6, 4]
    assert a[:8] == b[:8]  # hash ids 7, 8 shared
    block = lambda h: workload.block_tokens(h, 4, 50, seed=1)  # noqa: E731
    assert a[8:] == block(9)[:2] and b[8:] == block(5)[:1] and block(9) != block(5)
    assert d == a[:4]
    assert c[:4] != a[:4]
    assert [r.max_tokens for r in reqs] == [3, 2, 1, 1]
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.25, 1.0, 1.0])  # ms -> s, scaled
    assert reqs[0].prompt_ids == workload.trace_requests(workload.read_trace(path), 50, 1, 4)[0].prompt_ids


def test_read_trace_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        workload.read_trace(path)


def test_metric_and_workload_modules_stay_pure():
    for name in ("metrics", "workload", "study"):
        path = ROOT / "raypd" / "bench" / f"{name}.py"
        assert not imported_modules(path.read_text(), str(path)) & FORBIDDEN, name
