"""Automatic P:D rebalancing on a shifting workload, live: real Ray deployments of a real (small,
random-weight) JAX model on this machine. The simulated twin is scripts/bench_rebalance.py.

    python scripts/bench_rebalance_live.py            # ~10-15 min here: 3 workers, 2 x 40 s phases per run
    python scripts/bench_rebalance_live.py --quick    # a pipeline check (2 x 15 s phases)

One workload, the same requests in every run: long prompts (--long-input, --long-output) at
--long-rate for --phase-s seconds, then chat (--chat-input, --chat-output) at --chat-rate for
--phase-s seconds. Three runs of it, one after another in one process:
  static P1:D2, static P2:D1   one deployment without the rebalancer, moved between the two
                               splits by hand (Deployment.set_roles) and warmed before each run;
  rebalancer (from --start)    a second deployment with the rebalancer on (scheduler/rebalancer.py:
                               it replays the recent traffic through the simulator with the
                               deployment's own calibrated cost model and moves workers itself).
Both deployments calibrate at start-up; neither shares prefixes (KV index off, distinct random
prompts). The SLOs are fixed before any run from an unloaded baseline on the static deployment
(--ttft-slo-scale x the long prompts' p50 TTFT, --tpot-slo-scale x the chat p50 TPOT) unless
given (--slo-ttft-s, --slo-tpot-s); the rebalancer is given the same SLOs.

Prints, per run: SLO attainment per phase and overall, goodput (requests within both SLOs per
second of the run), failed and rejected requests, and the pages still in use on every worker
after the run (after clearing the prefix cache: anything left is a leak); for the rebalancer,
its moves as seen by polling the deployment's status. Writes rebalance_live.json into --out,
with the machine's load average before and after each run (other jobs share the 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from raypd.bench import metrics, runner, workload  # noqa: E402
from raypd.bench.targets import RayTarget  # noqa: E402
from scheduler.rebalancer import RebalanceConfig  # noqa: E402

SPLITS = ((1, 2), (2, 1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="15 s phases: checks the pipeline")
    p.add_argument("--model", default=None, help="default: the disaggregation study's model (scripts/bench_study.py: "
                   "4 layers, random weights, written to out/study-model)")
    p.add_argument("--phase-s", type=float, default=40.0, help="seconds of arrivals per phase")
    p.add_argument("--long-input", default="600:900")
    p.add_argument("--long-output", default="4:8")
    p.add_argument("--long-rate", type=float, default=0.8)
    p.add_argument("--chat-input", default="16:64")
    p.add_argument("--chat-output", default="96:160")
    p.add_argument("--chat-rate", type=float, default=2.5)
    p.add_argument("--max-slots", type=int, default=8, help="decode batch per decode worker")
    p.add_argument("--start", default="1:2", help="the rebalancer's starting split P:D")
    p.add_argument("--slo-ttft-s", type=float, default=None)
    p.add_argument("--slo-tpot-s", type=float, default=None)
    p.add_argument("--ttft-slo-scale", type=float, default=3.0)
    p.add_argument("--tpot-slo-scale", type=float, default=5.0)
    p.add_argument("--window-s", type=float, default=15.0)
    p.add_argument("--interval-s", type=float, default=3.0)
    p.add_argument("--min-interval-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "rebalance-live")
    args = p.parse_args(argv)
    if args.quick:
        args.phase_s = 15.0
    if args.phase_s <= 0 or min(args.long_rate, args.chat_rate) <= 0:
        raise ValueError(f"--phase-s, --long-rate and --chat-rate must be > 0, got {args.phase_s}, "
                         f"{args.long_rate}, {args.chat_rate}")
    try:
        args.start = tuple(int(x) for x in args.start.split(":"))
    except ValueError:
        raise ValueError(f"--start must be P:D, e.g. 1:2, got {args.start!r}") from None
    if args.start not in SPLITS:
        raise ValueError(f"--start must be one of {[f'{p}:{d}' for p, d in SPLITS]}, got {args.start}")
    return args


def engine_config(args):
    from raypd.engine.runner import EngineConfig

    return EngineConfig(page_size=16, num_pages=1024, max_slots=args.max_slots, max_seq_len=1024,
                        prefill_buckets=(32, 128, 512))


def start(args, name: str, split: tuple[int, int], rebalance: RebalanceConfig | None = None) -> RayTarget:
    from raypd.runtime.deployment import Resources
    from scheduler import PolicyConfig

    t0 = time.perf_counter()
    target = RayTarget(args.model, num_prefill=split[0], num_decode=split[1], engine_config=engine_config(args),
                       name=name, request_timeout_s=300, cache_bytes=0, host_copies=None, calibrate=True,
                       local_prefill_stall_s=None, policy=PolicyConfig(local_prefill_max_len=0),
                       prefill_resources=Resources(num_cpus=1), decode_resources=Resources(num_cpus=1),
                       rebalance=rebalance, warmup=True)
    print(f"[live] {name} P{split[0]}:D{split[1]} up in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


# ----------------------------------------------------------------------------- workload


def phase(target, num: int, rate: float, ins: str, outs: str, t0: float, seed: int) -> list[workload.BenchRequest]:
    times = t0 + workload.arrival_times(num, rate, np.random.default_rng([seed, 1]))
    return workload.synthetic(num, workload.parse_length(ins), workload.parse_length(outs), target.vocab_size,
                              times, np.random.default_rng(seed), target.exclude_ids)


def shifting(args, target) -> list[workload.BenchRequest]:
    """Long prompts for phase_s seconds, then chat for phase_s seconds (arrival times from 0)."""
    a = phase(target, max(1, round(args.long_rate * args.phase_s)), args.long_rate, args.long_input,
              args.long_output, 0.0, args.seed)
    a = [r for r in a if r.arrival_s < args.phase_s]
    b = phase(target, max(1, round(args.chat_rate * args.phase_s)), args.chat_rate, args.chat_input,
              args.chat_output, args.phase_s, args.seed + 1)
    return [dataclasses.replace(r, index=i) for i, r in enumerate(a + b)]


def warm(target, args) -> None:
    """Compile what the runs need on every worker now serving: a burst of both phases."""
    burst = argparse.Namespace(**{**vars(args), "phase_s": 3.0})
    runner.run(target, [dataclasses.replace(r, arrival_s=r.arrival_s % 3.0) for r in shifting(burst, target)],
               progress=False)


def baseline_slo(args, target) -> metrics.SLO:
    if args.slo_ttft_s is not None and args.slo_tpot_s is not None:
        return metrics.SLO(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_s)
    long = phase(target, 4, math.inf, args.long_input, args.long_output, 0.0, args.seed + 100)
    chat = phase(target, 4, math.inf, args.chat_input, args.chat_output, 0.0, args.seed + 101)
    s_long = metrics.summarize(runner.run(target, long, 1, progress=False).records, 1.0)
    s_chat = metrics.summarize(runner.run(target, chat, 1, progress=False).records, 1.0)
    ttft = args.slo_ttft_s or args.ttft_slo_scale * s_long["ttft_ms"]["p50"] / 1e3
    tpot = args.slo_tpot_s or args.tpot_slo_scale * s_chat["tpot_ms"]["p50"] / 1e3
    print(f"[live] unloaded: long-prompt TTFT p50 {s_long['ttft_ms']['p50']:.0f} ms, chat TPOT p50 "
          f"{s_chat['tpot_ms']['p50']:.1f} ms -> SLOs TTFT {ttft * 1e3:.0f} ms, TPOT {tpot * 1e3:.1f} ms", flush=True)
    return metrics.SLO(ttft_s=ttft, tpot_s=tpot)


# ----------------------------------------------------------------------------- runs


class RoleWatch:
    """Polls the deployment's status in a thread and keeps every change of its roles."""

    def __init__(self, target, every_s: float = 1.0):
        self.target, self.every_s, self.changes = target, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        last = None
        while not self._stop.wait(self.every_s):
            try:
                s = self.target.status()
            except Exception as e:  # noqa: BLE001 - a missed poll is not a result
                print(f"[live] status poll failed: {e}", flush=True)
                continue
            now = (len(s["prefill"]), len(s["decode"]), tuple(sorted(s["draining_workers"].items())),
                   tuple(sorted(s["joining_workers"].items())))
            if now != last:
                self.changes.append(dict(t_s=round(time.perf_counter() - self.t0, 1), num_prefill=now[0],
                                         num_decode=now[1], draining=dict(now[2]), joining=dict(now[3])))
                last = now


def settle(target, args) -> None:
    """After warming a deployment with the rebalancer on: wait until the warm-up's arrivals have
    left its window (no opinion without them), then put back the starting split if it moved."""
    time.sleep(args.window_s + args.interval_s)
    s = target.status()
    if s["draining_workers"] or s["joining_workers"] or (len(s["prefill"]), len(s["decode"])) != args.start:
        print(f"[live] the warm-up moved workers; back to P{args.start[0]}:D{args.start[1]}", flush=True)
        try:
            target.handle.set_roles(*args.start, wait_s=300)
        except ValueError:  # asked while a move is under way: let it finish, then ask again
            time.sleep(30)
            target.handle.set_roles(*args.start, wait_s=300)
        warm(target, args)
        time.sleep(args.window_s + args.interval_s)


def leftovers(target, timeout_s: float = 10.0) -> dict:
    """After a run and clearing the prefix cache: what is still held anywhere (all zero, or a leak)."""
    target.handle.clear_cache()
    deadline = time.monotonic() + timeout_s
    while True:  # decode workers free pages from their loop thread: allow them a moment
        s = target.status()
        pages = sum(u for w in s["prefill"] + s["decode"] for u in w["used_pages"])
        if pages == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return dict(pages_in_use=pages, num_tracked=s["num_tracked"], num_queued=s["num_queued"],
                num_running=sum(w["num_running"] for w in s["decode"]),
                num_pending_transfers=sum(w["num_pending_transfers"] for w in s["prefill"]))


def measure(target, reqs, slo: metrics.SLO, args, label: str, watch: bool = False) -> dict:
    load = os.getloadavg()[0]
    if watch:
        with RoleWatch(target) as w:
            result = runner.run(target, reqs, progress=False, desc=label)
        changes = w.changes
    else:
        result, changes = runner.run(target, reqs, progress=False, desc=label), []
    recs = result.records
    a = [r for r in recs if r.scheduled_s < args.phase_s]
    b = [r for r in recs if r.scheduled_s >= args.phase_s]
    s = metrics.summarize(recs, result.duration_s, slo)
    point = dict(label=label, summary=s, load_avg_1min=(load, os.getloadavg()[0]),
                 attainment_long=metrics.summarize(a, result.duration_s, slo)["slo_attainment"],
                 attainment_chat=metrics.summarize(b, result.duration_s, slo)["slo_attainment"],
                 role_changes=changes, leftovers=leftovers(target),
                 errors=sorted({r.error for r in recs if r.error})[:5])
    print(f"[live] {row(point)}  load {point['load_avg_1min'][0]:.1f}->{point['load_avg_1min'][1]:.1f}  "
          f"leftovers {point['leftovers']}", flush=True)
    return point


def row(p: dict) -> str:
    s = p["summary"]
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    return (f"| {p['label']} | {pct(p['attainment_long'])} | {pct(p['attainment_chat'])} | "
            f"{pct(s['slo_attainment'])} | {s['goodput']:.2f} | {s['num_failed']} | {s['num_rejected']} | "
            f"{p['leftovers']['pages_in_use']} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_study

        args.model = bench_study.ensure_model(ROOT / "out" / "study-model")
    from raypd.runtime.deployment import start_local_cluster

    # the workers inherit these through the local cluster: warm-up compiles each shape once per machine
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "out/study-jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    start_local_cluster(num_cpus=8, log_to_driver=False)  # CPU counts only place actors; all share the cores
    t0 = time.perf_counter()
    points, slo = [], None
    static = start(args, "live-static", SPLITS[0])
    try:
        warm(static, args)
        slo = baseline_slo(args, static)
        reqs = shifting(args, static)
        print(f"[live] {len(reqs)} requests over {reqs[-1].arrival_s:.0f} s", flush=True)
        for split in SPLITS:
            if (len(static.status()["prefill"]), len(static.status()["decode"])) != split:
                static.handle.set_roles(*split, wait_s=300)
                warm(static, args)
            points.append(measure(static, reqs, slo, args, f"static P{split[0]}:D{split[1]}"))
    finally:
        static.close()
    config = RebalanceConfig(ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s, window_s=args.window_s,
                             interval_s=args.interval_s, min_interval_s=args.min_interval_s)
    rb = start(args, "live-rebalance", args.start, rebalance=config)
    try:
        warm(rb, args)
        settle(rb, args)
        points.append(measure(rb, reqs, slo, args, f"rebalancer (from P{args.start[0]}:D{args.start[1]})",
                              watch=True))
        calibration = rb.status()["calibration"].get("cost")
    finally:
        rb.close()
        import ray

        ray.shutdown()
    result = dict(args={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()},
                  slo=dataclasses.asdict(slo), rebalance=dataclasses.asdict(config), num_requests=len(reqs),
                  calibration=calibration, points=points, minutes=(time.perf_counter() - t0) / 60)
    (args.out / "rebalance_live.json").write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    return result


def table(r: dict) -> str:
    lines = ["| run | long-prompt phase | chat phase | overall SLO attainment | goodput (req/s) | failed | "
             "rejected | pages left |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [row(p) for p in r["points"]]
    for p in r["points"]:
        if p["role_changes"]:
            moves = ", ".join(f"{c['t_s']:.0f} s P{c['num_prefill']}:D{c['num_decode']}"
                              + (f" (draining {', '.join(c['draining'])})" if c["draining"] else "")
                              + (f" (joining {', '.join(c['joining'])})" if c["joining"] else "")
                              for c in p["role_changes"])
            lines += ["", f"{p['label']}: {moves}"]
    lines += ["", f"SLOs: TTFT {r['slo']['ttft_s'] * 1e3:.0f} ms, TPOT {r['slo']['tpot_s'] * 1e3:.1f} ms; "
              f"{r['num_requests']} requests; {r['minutes']:.1f} min"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
