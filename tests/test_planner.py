"""The planner (raypd/planner.py) on synthetic profiles, and profile files.

Guards against a planner that always says the same thing: with a costly prefill, a cheap K/V
link and a tight TPOT SLO, colocated decode stalls behind prefill chunks and a P:D split must
win; with a cheap prefill and a slow link, the transfer eats the TTFT budget and colocated
must win."""

from __future__ import annotations

import dataclasses

import pytest

from raypd.bench.metrics import SLO
from raypd.planner import Profile, Workload, candidates, plan, simulate
from scheduler import CostModel
from scheduler.simulator import WorkerProfile


def profile(prefill_s_per_token: float, link_bytes_per_s: float) -> Profile:
    cost = CostModel((0.005, prefill_s_per_token, 0.0), (0.01, 0.0002, 0.0), 0.001, link_bytes_per_s, 1000)
    return Profile(WorkerProfile(cost, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096,
                                 prefill_chunk_len=512, device="synthetic"), "synthetic")


def test_disaggregation_wins_when_prefill_stalls_decode():
    r = plan(profile(2e-4, 1e10), 4, Workload(dataset="long-prompt", num_requests=80), SLO(ttft_s=3.0, tpot_s=0.03),
             rates=[2, 4, 8])
    assert r["recommendation"].startswith("P") and r["margin"] > 1.2, r


def test_colocated_wins_when_the_link_is_slow():
    r = plan(profile(2e-6, 2e6), 4, Workload(dataset="fixed", num_requests=80), SLO(ttft_s=0.2, tpot_s=0.05),
             rates=[2, 8, 16])
    assert r["recommendation"] == "colocated", r


def test_candidates_with_a_tp_degree_per_pool_use_every_device():
    cs = candidates(4, (1, 2))
    assert {c.name for c in cs} == {"colocated", "colocatedxTP2", "P1:D3", "P2:D2", "P3:D1", "P1xTP2:D2",
                                    "P1xTP2:D1xTP2", "P2:D1xTP2"}
    assert all(c.num_devices == 4 for c in cs)
    with pytest.raises(ValueError, match="tensor-parallel"):
        candidates(4, (0,))


def tp_profiles(speedup: float) -> list[Profile]:
    """TP 1 and TP 2 profiles: TP 2 runs prefill and decode `speedup` times faster."""
    one = profile(4e-4, 1e10)
    c = one.worker.cost
    two = CostModel(tuple(x / speedup for x in c.prefill_coefs), tuple(x / speedup for x in c.decode_coefs),
                    c.transfer_latency_s, c.transfer_bytes_per_s, c.kv_bytes_per_token)
    return [one, Profile(dataclasses.replace(one.worker, cost=two, tp=2), one.model)]


def test_a_tp2_prefill_pool_when_one_device_cannot_prefill_within_the_ttft_slo():
    # 1000-token prompts: 0.4 s of prefill on one device, 0.2 s at TP 2; the TTFT SLO is 0.3 s
    work, slo = Workload(dataset="fixed", input_len="1000", output_len="16", num_requests=40), SLO(ttft_s=0.3)
    only_tp1 = plan(tp_profiles(2.0)[0], 4, work, slo, rates=[0.5, 1, 2])
    assert all(r["goodput_rps"] == 0 for r in only_tp1["candidates"]), only_tp1
    r = plan(tp_profiles(2.0), 4, work, slo, rates=[0.5, 1, 2])
    best = next(row for row in r["candidates"] if row["candidate"] == r["recommendation"])
    assert best["goodput_rps"] > 0 and (best["tp_prefill"] == 2 or best["candidate"] == "colocatedxTP2"), r


def test_tp1_pools_when_tp2_is_no_faster():
    work, slo = Workload(dataset="fixed", input_len="200", output_len="16", num_requests=40), SLO(ttft_s=1.0)
    r = plan(tp_profiles(1.0), 4, work, slo, rates=[2, 8, 16])
    best = next(row for row in r["candidates"] if row["candidate"] == r["recommendation"])
    assert best["tp_prefill"] == best["tp_decode"] == 1, r
    with pytest.raises(ValueError, match="two profiles with tp=1"):
        plan([tp_profiles(1.0)[0]] * 2, 4, work, slo, rates=[1])


def test_candidates_and_bad_input():
    assert [c.name for c in candidates(3)] == ["colocated", "P1:D2", "P2:D1"]
    with pytest.raises(ValueError, match="num_devices"):
        candidates(0)
    with pytest.raises(ValueError, match="mode"):
        simulate(profile(1e-4, 1e9), "both")
    with pytest.raises(ValueError, match="num_prefill"):
        simulate(profile(1e-4, 1e9), "disaggregated", num_prefill=0)
    with pytest.raises(ValueError, match="SLO"):
        plan(profile(1e-4, 1e9), 2, Workload(num_requests=4), SLO(), rates=[1])


def test_profile_round_trip(tmp_path):
    p = profile(1e-4, 1e9)
    p.samples = dict(prefill=[[64, 0, 0.01]])
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert q.worker == p.worker and q.samples == p.samples
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="version"):
        Profile.load(tmp_path / "bad.json")


def test_simulate_reports_the_headline_numbers():
    r = simulate(profile(1e-4, 1e9), "colocated", num_decode=2, workload=Workload(num_requests=30, rate=5.0),
                 slo=SLO(ttft_s=1.0))
    assert r["num_completed"] == 30 and r["num_devices"] == 2
    assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] and 0 < r["tpot_p50_s"] <= r["tpot_p90_s"]
    assert r["slo_attainment"] == 1.0 and r["goodput_rps"] > 0 and r["throughput_tok_s"] > 0


def test_cli_simulate_and_plan(tmp_path, capsys):
    import json

    import raypd
    from raypd.cli import main

    assert raypd.simulate is simulate
    path = tmp_path / "syn.json"
    profile(2e-4, 1e10).save(path)
    common = ["--profile", str(path), "--dataset", "long-prompt", "--num-requests", "40", "--slo-ttft-ms", "3000",
              "--slo-tpot-ms", "30", "--json"]
    assert main(["simulate", "--mode", "colocated", "--workers", "2", "--rate", "2", *common]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "colocated" and r["num_devices"] == 2 and r["num_completed"] == 40
    for key in ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "throughput_tok_s", "goodput_rps",
                "slo_attainment"):
        assert r[key] is not None
    assert main(["plan", "--devices", "2", "--rates", "1,2", "--plot", str(tmp_path / "plan.png"), *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendation"] in {"colocated", "P1:D1"} and (tmp_path / "plan.png").stat().st_size > 0
    one, two = tp_profiles(2.0)  # a profile per TP degree adds the TP candidates
    one.save(tmp_path / "tp1.json")
    two.save(tmp_path / "tp2.json")
    assert main(["plan", "--devices", "2", "--rates", "1,2", *common[2:], "--profile", str(tmp_path / "tp1.json"),
                 "--profile", str(tmp_path / "tp2.json")]) == 0
    names = {row["candidate"] for row in json.loads(capsys.readouterr().out)["candidates"]}
    assert names == {"colocated", "colocatedxTP2", "P1:D1"}
    with pytest.raises(SystemExit, match="profile"):
        main(["simulate", "--profile", str(tmp_path / "missing.json")])
