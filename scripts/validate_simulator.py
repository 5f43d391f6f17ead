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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

import bench_study as bs  # noqa: E402
from raypd.bench import metrics  # noqa: E402
from raypd.planner import simulate_requests  # noqa: E402
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
    return p.parse_args(argv)


def profile_of(target, chunk: int) -> WorkerProfile:
    """The simulator's worker from the deployment's own calibration and shapes."""
    s, info = target.handle.status(), target.handle.info()
    c = s["calibration"].get("cost")
    if c is None:
        raise RuntimeError("the deployment was not calibrated")
    cost = CostModel(tuple(c["prefill_coefs"]), tuple(c["decode_coefs"]), c["transfer_latency_s"],
                     c["transfer_bytes_per_s"], c["kv_bytes_per_token"])
    num_decode = max(1, info["num_decode"])
    return WorkerProfile(cost, num_pages=info["num_pages_total"] // num_decode, page_size=info["page_size"],
                         max_slots=info["max_slots"] // num_decode, max_seq_len=info["max_seq_len"],
                         prefill_chunk_len=chunk, device="cpu (this machine)")


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
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,  # pinning decides cores
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    t0 = time.perf_counter()
    targets = {m: bs.start(m, study_args, model, args.chunk, name=f"validate-{m}", calibrate=True) for m in bs.MODES}
    try:
        for t in targets.values():
            bs.warm(t, study_args, plan, bs.WORKLOADS)
        profiles = {m: profile_of(targets[m], args.chunk) for m in bs.MODES}
        points = []
        for wl in bs.WORKLOADS:
            base = bs.requests(study_args, targets["colocated"], wl, plan.num_baseline, math.inf, args.seed + 2000)
            unloaded = {m: bs.measure(targets[m], base, metrics.SLO(), concurrency=1)["summary"] for m in bs.MODES}
            slo = metrics.SLO(ttft_s=args.ttft_slo_scale * min(unloaded[m]["ttft_ms"]["p50"] for m in bs.MODES) / 1e3,
                              tpot_s=args.tpot_slo_scale * min(unloaded[m]["tpot_ms"]["p50"] for m in bs.MODES) / 1e3)
            for i, rate in enumerate(plan.rates[wl]):
                reqs = bs.requests(study_args, targets["colocated"], wl, bs.num_requests(plan, rate), rate,
                                   seed=args.seed + 10 * i)
                for mode in bs.MODES:
                    meas = flat(bs.measure(targets[mode], reqs, slo)["summary"])
                    sim = sim_point(profiles[mode], mode, reqs, slo)
                    point = dict(workload=wl, rate=rate, mode=mode, measured=meas,
                                 simulated={k: sim[k] for k in meas},
                                 error={k: rel_err(sim[k], meas[k]) for k in meas})
                    points.append(point)
                    print(f"[{wl} {rate:g} req/s {mode}] " + "  ".join(
                        f"{k} {meas[k] or 0:.3g}/{sim[k] or 0:.3g}" for k in meas), flush=True)
    finally:
        for t in targets.values():
            t.close()
        ray.shutdown()
    result = analyse(points)
    result.update(points=points, profiles={m: dataclasses.asdict(p) for m, p in profiles.items()},
                  minutes=(time.perf_counter() - t0) / 60, quick=args.quick)
    (out / "validate_sim.json").write_text(json.dumps(result, indent=1, default=str))
    print(tables(result))
    return result


def analyse(points: list[dict]) -> dict:
    keys = [k for k, _, _ in METRICS] + ["goodput_rps"]
    median = {k: float(np.median(v)) if (v := [p["error"][k] for p in points if p["error"][k] is not None])
              else None for k in keys}
    decisions = []
    for wl in sorted({p["workload"] for p in points}):
        for rate in sorted({p["rate"] for p in points if p["workload"] == wl}):
            at = {p["mode"]: p for p in points if p["workload"] == wl and p["rate"] == rate}
            meas = winner({m: at[m]["measured"]["goodput_rps"] for m in at})
            sim = winner({m: at[m]["simulated"]["goodput_rps"] for m in at})
            decisions.append(dict(workload=wl, rate=rate, measured=meas, simulated=sim,
                                  agree=meas == sim or "tie" in (meas, sim)))
    return dict(median_error=median, decisions=decisions,
                decision_accuracy=sum(d["agree"] for d in decisions) / max(1, len(decisions)))


def tables(r: dict) -> str:
    lines = ["| metric | median error |", "|---|---:|"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.0%}'} |" for k, v in r["median_error"].items()]
    lines += ["", "| workload | rate | measured winner | simulated winner | agree |", "|---|---:|---|---|---|"]
    lines += [f"| {d['workload']} | {d['rate']:g} | {d['measured']} | {d['simulated']} | {d['agree']} |"
              for d in r["decisions"]]
    lines += ["", f"decision accuracy {r['decision_accuracy']:.0%}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
