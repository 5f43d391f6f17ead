"""Validate the simulator (scheduler/simulator.py) against measured runs on this machine.

    python scripts/validate_simulator.py --quick     # ~10 min: 2 workloads x 2 rates x 2 modes
    python scripts/validate_simulator.py             # the grid of scripts/bench_study.py

For each serving mode of the disaggregation study (colocated: one decode worker on cores 0-1;
disaggregated: a prefill worker on core 0 and a decode worker on core 1; no prefix reuse) the
script starts the deployment with calibration on, builds the simulator's worker profile from
that deployment's own fitted cost model and shapes (nothing tuned to the measurements), then at
every (workload, rate) of the grid sends the same requests to the deployment and through the
simulator, and compares: per-metric relative error |sim - measured| / measured of p50 / p90 TTFT
and TPOT and of goodput, and the decision (which mode has the higher goodput; within 5% counts
as a tie, and a tie agrees with either). Writes validate_sim.json into --out and prints tables.
Uses scripts/bench_study.py's deployments, workloads and SLO method (a multiple of the better
mode's unloaded p50).

A machine whose speed changes under it (other jobs on the same cores) makes a calibration stale
within minutes, so every mode is calibrated again (`Deployment.calibrate`) immediately before
each point's measurement, and the simulator of that point uses that calibration. Around the
calibration and around the measurement the script records the 1-minute load average and a
ceiling probe (`ceiling`: a float32 matmul's GFLOP/s and a memory copy's GB/s in this process);
a point whose probe moved by more than --max-drift (default 20%) between its calibration and
its measurement is unreliable: it is kept in the JSON and reported in a table of its own, and
the headline errors and decision accuracy are over the reliable points (the same figures over
all points are reported too). Nothing is fitted to the measured results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

import bench_study as bs  # noqa: E402
from raypd.bench import metrics  # noqa: E402
from raypd.planner import simulate_records, simulate_requests  # noqa: E402
from scheduler import CostModel  # noqa: E402
from scheduler.simulator import SimRequest, WorkerProfile  # noqa: E402

METRICS = (("ttft_p50_s", "ttft_ms", "p50"), ("ttft_p90_s", "ttft_ms", "p90"), ("tpot_p50_s", "tpot_ms", "p50"),
           ("tpot_p90_s", "tpot_ms", "p90"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rates per workload, fewer requests")
    p.add_argument("--out", type=Path, default=None, help="default docs/results (full) or out/validate-quick")
    p.add_argument("--chunk", type=int, default=256, help="colocated prefill chunk (the study's tuned value)")
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-scale", type=float, default=5.0)
    p.add_argument("--tpot-slo-scale", type=float, default=5.0)
    p.add_argument("--mock", action="store_true", help="mock engines: checks the pipeline, measures nothing")
    p.add_argument("--max-drift", type=float, default=0.2,
                   help="a point is unreliable when the ceiling probe moved more than this between calibration "
                        "and measurement")
    p.add_argument("--points", type=int, default=None, help="only the first N (workload, rate) points (smoke runs)")
    args = p.parse_args(argv)
    if not 0 < args.max_drift < 10:
        raise ValueError(f"--max-drift must be in (0, 10), got {args.max_drift}")
    if args.points is not None and args.points < 1:
        raise ValueError(f"--points must be >= 1, got {args.points}")
    return args


PROBE = """
import json, time
import numpy as np
a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
src, dst = np.ones(8 << 20, dtype=np.float32), np.empty(8 << 20, dtype=np.float32)
def rate(fn, amount, each_s={each_s}):
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < each_s or n == 0:
        fn()
        n += 1
    return n * amount / elapsed
mm = [rate(lambda: a @ a, 2 * 256 ** 3 / 1e9) for _ in range({repeats})]
cp = [rate(lambda: np.copyto(dst, src), 2 * src.nbytes / 1e9) for _ in range({repeats})]
print(json.dumps(dict(matmul_gflop_s=float(np.median(mm)), copy_gb_s=float(np.median(cp)))))
"""


def ceiling(repeats: int = 5, each_s: float = 0.04) -> dict:
    """The machine's speed now, as one thread sees it: a 256x256 float32 matmul's GFLOP/s and a
    32 MB copy's GB/s, each the median of `repeats` rates timed over `each_s` seconds of
    back-to-back calls, in a process of its own with single-threaded BLAS (a multi-threaded
    BLAS on busy cores measures its own threads' waits), ~1 s in all; with the 1-minute load
    average."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE.format(repeats=repeats, each_s=each_s)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(out.stdout), load_avg_1min=os.getloadavg()[0])


def drift(calibration: list[dict], measurement: list[dict]) -> float:
    """How far the ceiling moved from calibration to measurement: the largest relative change of
    either probe, between the mean of the calibration probes and any measurement probe."""
    out = 0.0
    for k in ("matmul_gflop_s", "copy_gb_s"):
        base = sum(c[k] for c in calibration) / len(calibration)
        out = max(out, *(abs(m[k] / base - 1) for m in measurement))
    return out


def profile_of(target, chunk: int, calibration: dict) -> WorkerProfile:
    """The simulator's worker from the deployment's own calibration (`Deployment.calibrate`) and shapes."""
    info = target.handle.info()
    c = calibration.get("cost")
    if c is None:
        raise RuntimeError("the deployment was not calibrated")
    cost = CostModel(tuple(c["prefill_coefs"]), tuple(c["decode_coefs"]), c["transfer_latency_s"],
                     c["transfer_bytes_per_s"], c["kv_bytes_per_token"])
    num_decode = max(1, info["num_decode"])
    return WorkerProfile(cost, num_pages=info["num_pages_total"] // num_decode, page_size=info["page_size"],
                         max_slots=info["max_slots"] // num_decode, max_seq_len=info["max_seq_len"],
                         prefill_chunk_len=chunk, device="cpu (this machine)")


def host_overheads(target, profile: WorkerProfile, mode: str, wl: str, args, num: int = 4):
    """Part of the calibration: the host costs the engines' timings leave out. `num` probe
    requests of the workload (their own seed, one at a time, seconds apart) go through the
    deployment and through the simulator with no host costs; the median gap in TTFT is the
    delivery time (scheduler RPCs, the client's poll) and in TPOT the per-iteration overhead.
    -> (the profile with both, the figures). Run before the point's measurement, never on it."""
    study_args = argparse.Namespace(mock=args.mock, max_slots=args.max_slots, seed=args.seed)
    reqs = bs.requests(study_args, target, wl, num, 0.5, seed=args.seed + 5000)
    reqs = [dataclasses.replace(r, arrival_s=5.0 * i) for i, r in enumerate(reqs)]  # one at a time
    measured = sorted(bs.measure(target, reqs, metrics.SLO(), concurrency=1)["records"], key=lambda r: r["index"])
    simulated, _ = simulate_records(profile, mode, 1, 1, [SimRequest(r.arrival_s, tuple(r.prompt_ids), r.max_tokens)
                                                          for r in reqs])
    pairs = [(m, metrics.ttft_s(r), metrics.tpot_s(r)) for m, r in zip(measured, simulated) if r.is_ok]
    ttft_gap = [m["ttft_s"] - t for m, t, _ in pairs if m["ttft_s"] is not None]
    tpot_gap = [m["tpot_s"] - t for m, _, t in pairs if m["tpot_s"] is not None and t is not None]
    host = dict(delivery_s=max(0.0, float(np.median(ttft_gap))) if ttft_gap else 0.0,
                iteration_overhead_s=max(0.0, float(np.median(tpot_gap))) if tpot_gap else 0.0)
    return dataclasses.replace(profile, **host), host


def sim_point(profile: WorkerProfile, mode: str, reqs, slo: metrics.SLO) -> dict:
    sim_reqs = [SimRequest(r.arrival_s, tuple(r.prompt_ids), r.max_tokens) for r in reqs]
    num_prefill, num_decode = (0, 1) if mode == "colocated" else (1, 1)
    return simulate_requests(profile, mode, num_prefill, num_decode, sim_reqs, slo)


def flat(summary: dict) -> dict:
    out = {k: (summary[group][p] / 1e3 if summary[group] and summary[group].get(p) is not None else None)
           for k, group, p in METRICS}
    out["goodput_rps"] = summary["goodput"]
    return out


def rel_err(sim, meas):
    if sim is None or meas is None or meas == 0:
        return None
    return abs(sim - meas) / abs(meas)


def winner(goodput: dict, tie: float = 0.05) -> str:
    a, b = goodput["colocated"] or 0.0, goodput["disaggregated"] or 0.0
    if max(a, b) == 0 or abs(a - b) <= tie * max(a, b):
        return "tie"
    return "colocated" if a > b else "disaggregated"


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = bs.QUICK if args.quick else bs.FULL
    out = args.out or (ROOT / ("out/validate-quick" if args.quick else "docs/results"))
    out.mkdir(parents=True, exist_ok=True)
    study_args = argparse.Namespace(mock=args.mock, max_slots=args.max_slots, seed=args.seed)
    model = None if args.mock else bs.ensure_model(ROOT / "out" / "study-model")
    # the workers inherit these through the local cluster: warm-up compiles each shape once per machine
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "out/study-jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,  # pinning decides cores
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    t0 = time.perf_counter()
    targets = {m: bs.start(m, study_args, model, args.chunk, name=f"validate-{m}", calibrate=True) for m in bs.MODES}
    points, profiles = [], {}
    try:
        for t in targets.values():
            bs.warm(t, study_args, plan, bs.WORKLOADS)
        grid = [(wl, i, rate) for wl in bs.WORKLOADS for i, rate in enumerate(plan.rates[wl])][:args.points]
        for wl in dict.fromkeys(wl for wl, _, _ in grid):
            base = bs.requests(study_args, targets["colocated"], wl, plan.num_baseline, math.inf, args.seed + 2000)
            unloaded = {m: bs.measure(targets[m], base, metrics.SLO(), concurrency=1)["summary"] for m in bs.MODES}
            slo = metrics.SLO(ttft_s=args.ttft_slo_scale * min(unloaded[m]["ttft_ms"]["p50"] for m in bs.MODES) / 1e3,
                              tpot_s=args.tpot_slo_scale * min(unloaded[m]["tpot_ms"]["p50"] for m in bs.MODES) / 1e3)
            for _, i, rate in (g for g in grid if g[0] == wl):
                reqs = bs.requests(study_args, targets["colocated"], wl, bs.num_requests(plan, rate), rate,
                                   seed=args.seed + 10 * i)
                for mode in bs.MODES:
                    points.append(point(targets[mode], mode, wl, rate, reqs, slo, args))
                    profiles[f"{wl} {rate:g} {mode}"] = points[-1].pop("profile")
    finally:
        for t in targets.values():
            t.close()
        ray.shutdown()
    result = analyse(points)
    result.update(points=points, profiles={m: dataclasses.asdict(p) for m, p in profiles.items()},
                  minutes=(time.perf_counter() - t0) / 60, quick=args.quick, max_drift=args.max_drift)
    (out / "validate_sim.json").write_text(json.dumps(result, indent=1, default=str))
    print(tables(result))
    return result


def point(target, mode: str, wl: str, rate: float, reqs, slo: metrics.SLO, args) -> dict:
    """Calibrate `target` now, measure `reqs` on it, simulate them with that calibration; the
    ceiling probe around both says whether the machine's speed held between the two."""
    cal_probes = [ceiling()]
    calibration = target.handle.calibrate()
    profile = profile_of(target, args.chunk, calibration)
    profile, host = host_overheads(target, profile, mode, wl, args)
    cal_probes.append(ceiling())
    meas_probes = [ceiling()]
    measured = bs.measure(target, reqs, slo)
    meas = flat(measured["summary"])
    meas_probes.append(ceiling())
    sim = sim_point(profile, mode, reqs, slo)
    moved = drift(cal_probes, meas_probes)
    print(f"[{wl} {rate:g} req/s {mode}] " + "  ".join(f"{k} {meas[k] or 0:.3g}/{sim[k] or 0:.3g}" for k in meas)
          + f"  (measured/simulated; ceiling moved {moved:.0%}, load {meas_probes[0]['load_avg_1min']:.1f}"
          + f"->{meas_probes[1]['load_avg_1min']:.1f}); mean breakdown (ms) "
          + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in measured["breakdown_s"].items()), flush=True)
    return dict(workload=wl, rate=rate, mode=mode, measured=meas, simulated={k: sim[k] for k in meas},
                error={k: rel_err(sim[k], meas[k]) for k in meas}, calibration_probes=cal_probes,
                measurement_probes=meas_probes, drift=moved, is_reliable=moved <= args.max_drift,
                breakdown_s=measured["breakdown_s"], breakdown_p99_s=measured["breakdown_p99_s"],
                cost=calibration["cost"], host_overheads=host, profile=profile)


def analyse(points: list[dict]) -> dict:
    """Errors and decisions over the reliable points (the headline), and over all points."""
    reliable = [p for p in points if p.get("is_reliable", True)]
    return dict(**summary(reliable), num_points=len(points), num_reliable=len(reliable),
                all_points=summary(points),
                unreliable=[dict(workload=p["workload"], rate=p["rate"], mode=p["mode"], drift=p["drift"])
                            for p in points if not p.get("is_reliable", True)])


def summary(points: list[dict]) -> dict:
    keys = [k for k, _, _ in METRICS] + ["goodput_rps"]
    median = {k: float(np.median(v)) if (v := [p["error"][k] for p in points if p["error"][k] is not None])
              else None for k in keys}
    decisions = []
    for wl in sorted({p["workload"] for p in points}):
        for rate in sorted({p["rate"] for p in points if p["workload"] == wl}):
            at = {p["mode"]: p for p in points if p["workload"] == wl and p["rate"] == rate}
            if len(at) < 2:  # a decision needs both modes (one was unreliable)
                continue
            meas = winner({m: at[m]["measured"]["goodput_rps"] for m in at})
            sim = winner({m: at[m]["simulated"]["goodput_rps"] for m in at})
            decisions.append(dict(workload=wl, rate=rate, measured=meas, simulated=sim,
                                  agree=meas == sim or "tie" in (meas, sim)))
    return dict(median_error=median, decisions=decisions,
                decision_accuracy=sum(d["agree"] for d in decisions) / len(decisions) if decisions else None)


def tables(r: dict) -> str:
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    lines = [f"reliable points: {r['num_reliable']} of {r['num_points']}", "",
             "| metric | median error (reliable points) | median error (all points) |", "|---|---:|---:|"]
    lines += [f"| {k} | {pct(v)} | {pct(r['all_points']['median_error'][k])} |" for k, v in r["median_error"].items()]
    lines += ["", "| workload | rate | measured winner | simulated winner | agree |", "|---|---:|---|---|---|"]
    lines += [f"| {d['workload']} | {d['rate']:g} | {d['measured']} | {d['simulated']} | {d['agree']} |"
              for d in r["decisions"]]
    lines += ["", f"decision accuracy (reliable points) {pct(r['decision_accuracy'])}; "
              f"all points {pct(r['all_points']['decision_accuracy'])}"]
    if r["unreliable"]:
        lines += ["", "unreliable (the machine's speed moved between calibration and measurement):", "",
                  "| workload | rate | mode | ceiling moved |", "|---|---:|---|---:|"]
        lines += [f"| {u['workload']} | {u['rate']:g} | {u['mode']} | {u['drift']:.0%} |" for u in r["unreliable"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
