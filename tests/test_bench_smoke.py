"""A 10-request run of the load generator against an in-process engine (tiny-random, tiny
lengths) through `raypd bench`'s own code path, producing a valid report; and rejections at a
full queue counted as SLO misses."""

from __future__ import annotations

import json

import pytest

from raypd import cli
from raypd.bench import cli as bench_cli
from raypd.bench import metrics, runner, targets, workload
from raypd.engine.runner import EngineConfig
from raypd.runtime.poller import TokenPoller

SMALL = EngineConfig(page_size=16, num_pages=32, max_slots=2, max_seq_len=32, prefill_buckets=(32,))


@pytest.fixture(scope="module")
def target():
    t = targets.LocalTarget("tiny-random", SMALL, warmup=False, request_timeout_s=120)
    targets.wait_ready(t)
    yield t
    t.close()


def test_ten_request_smoke_run_writes_a_valid_report(target, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "make_target", lambda args: target)
    monkeypatch.setattr(target, "close", lambda: None)  # the fixture closes it
    out = tmp_path / "run"
    assert cli.main(["bench", "--model", "tiny-random", "--num-requests", "10", "--rate", "20",
                     "--input-len", "4:20", "--output-len", "2:6", "--slo-ttft-ms", "60000",
                     "--slo-tpot-ms", "60000", "--out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = json.loads((out / "results.json").read_text())
    (point,) = data["points"]
    records = point["records"]
    assert len(records) == 10 and [r["index"] for r in records] == list(range(10))
    assert all(r["status"] == "ok" for r in records)
    assert all(sum(r["chunk_tokens"]) == r["max_tokens"] for r in records)  # ignore_eos: exact lengths
    assert all(2 <= r["max_tokens"] <= 6 and 4 <= r["prompt_len"] <= 20 for r in records)
    assert point["summary"]["num_completed"] == 10 and point["summary"]["slo_attainment"] == 1.0
    assert data["config"]["target"]["kind"] == "local" and data["config"]["rates"] == [20.0]
    assert data["environment"]["versions"]["jax"] and "git_sha" in data["environment"]
    assert printed["summaries"][0]["num_good"] == 10
    report = (out / "report.md").read_text()
    assert "| 20 req/s | 10 | 0 | 0 |" in report
    for png in ("ttft_cdf.png", "tpot_cdf.png", "latency_breakdown.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in report


def test_rejections_at_a_full_queue_are_misses(target, monkeypatch):
    monkeypatch.setattr(target.loop, "max_queued", 2)
    reqs = [workload.BenchRequest(i, [5, 6, 7, 8], 3, 0.0) for i in range(6)]  # all at once
    result = runner.run(target, reqs, progress=False)
    s = metrics.summarize(result.records, result.duration_s, metrics.SLO(ttft_s=600.0))
    assert s["num_rejected"] >= 1 and s["num_completed"] + s["num_rejected"] == 6
    assert s["num_good"] == s["num_completed"] and s["slo_attainment"] < 1.0
    assert all(r.error for r in result.records if r.status == metrics.STATUS_REJECTED)


def test_concurrency_cap_bounds_requests_in_flight(target):
    reqs = [workload.BenchRequest(i, [5, 6, 7], 2, 0.0) for i in range(4)]
    recs = runner.run(target, reqs, max_concurrency=1, progress=False).records
    spans = sorted((r.sent_s, r.end_s) for r in recs)
    assert all(r.is_ok for r in recs)
    assert all(nxt[0] >= prev[1] for prev, nxt in zip(spans, spans[1:]))  # one at a time


def test_bad_arguments_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "--sweep-rates" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="burstiness"):
        cli.main(["bench", "--burstiness", "0.5"])
    with pytest.raises(SystemExit, match="not both"):
        cli.main(["bench", "--rate", "1", "--sweep-rates", "1,2"])


class FakeDeployment:
    """Deployment's submit / poll / abort from a script: a 3-token request arrives
    as a chunk of 2 then a chunk of 1 with the scheduler's metrics; prompts of 9 tokens are
    rejected at submit, prompts of 8 fail in a worker."""

    def __init__(self):
        self.polls, self.aborted, self.script = [], [], {}

    def submit(self, prompts, params):
        from raypd.runtime import errors
        from raypd.runtime.messages import Token

        (prompt,) = prompts
        if len(prompt) == 9:
            raise errors.RequestRejected("queue full", "queue_full")
        rid = f"r{len(self.script)}"
        tok = Token(5, None, None, "")
        fin = Token(5, None, "length", "")
        m = dict(ttft_s=0.1, queue_s=0.01, prefill_s=0.05, transfer_s=None, is_local_prefill=True)
        self.script[rid] = ([dict(tokens=[], finished=False, error=("failed", "worker died"), metrics={})]
                            if len(prompt) == 8 else
                            [dict(tokens=[tok, tok], finished=False, error=None, metrics=m),
                             dict(tokens=[], finished=False, error=None, metrics=m),
                             dict(tokens=[fin], finished=True, error=None, metrics=m)])
        return [rid]

    def abort(self, ids):
        self.aborted += ids

    def poll(self, ids, timeout_s):
        self.polls.append(list(ids))
        return {rid: self.script[rid].pop(0) for rid in ids if self.script[rid]}


def test_ray_target_polls_once_for_all_requests_and_keeps_the_last_chunks_timings():
    fake = FakeDeployment()
    t = targets.RayTarget.__new__(targets.RayTarget)
    t.handle, t.request_timeout_s, t.poller = fake, 5.0, TokenPoller(fake.poll)
    try:
        assert list(t.stream([1, 2, 3], 3)) == [
            (2, {}), (1, dict(queue_s=0.01, prefill_s=0.05, is_local_prefill=True, server_ttft_s=0.1))]
        with pytest.raises(targets.TargetRejected, match="queue_full"):
            list(t.stream([1] * 9, 3))
        with pytest.raises(RuntimeError, match="worker died"):
            list(t.stream([1] * 8, 3))
        gen = t.stream([1, 2, 3], 3)
        next(gen)
        gen.close()  # the client stops reading: the request is aborted
        assert fake.aborted == ["r2"]
    finally:
        t.poller.stop()
    assert all(len(ids) >= 1 for ids in fake.polls)


def test_study_modes_get_the_same_cores(monkeypatch):
    """scripts/bench_study.py: colocated and disaggregated use the same two cores, prefix reuse off,
    every prompt prefilled where the mode says (colocated: locally; disaggregated: remotely)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_study.py"
    spec = importlib.util.spec_from_file_location("bench_study", path)
    bench_study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_study", bench_study)  # dataclasses look their module up
    spec.loader.exec_module(bench_study)
    args = bench_study.parse_args([])
    colo, dis = (bench_study.mode_kwargs(m, args) for m in bench_study.MODES)
    assert (colo["num_prefill"], colo["num_decode"], dis["num_prefill"], dis["num_decode"]) == (0, 1, 1, 1)
    assert set(colo["decode_resources"].cpus) == set(dis["prefill_resources"].cpus) | set(dis["decode_resources"].cpus)
    assert not set(dis["prefill_resources"].cpus) & set(dis["decode_resources"].cpus)
    assert colo["policy"].local_prefill_max_len >= 4096 and dis["policy"].local_prefill_max_len == 0
    assert colo["cache_bytes"] == dis["cache_bytes"] == 0 and colo["host_copies"] is dis["host_copies"] is None
    assert colo["local_prefill_stall_s"] is dis["local_prefill_stall_s"] is None  # calibration keeps the policy
    assert bench_study.engine_config(args, 256).prefill_buckets[-1] == 256  # the colocated chunk
