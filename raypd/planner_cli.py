"""`raypd profile`, `raypd simulate` and `raypd plan` (raypd/planner.py behind them).

Only argparse at import time; the planner (numpy) and the engines (jax) load in the runners.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DEFAULT_RATES = "0.5,1,2,4,8"


def _cache_dir() -> Path:
    return Path(os.environ.get("RAYPD_CACHE_DIR", Path.home() / ".cache" / "raypd")) / "profiles"


def _workload_arguments(p: argparse.ArgumentParser, many_profiles: bool = False) -> None:
    from raypd.bench.workload import DATASETS

    g = p.add_argument_group("workload (as raypd bench)")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="fixed", help="input/output length distributions")
    g.add_argument("--input-len", default=None, metavar="N|A:B", help="override the dataset's input lengths")
    g.add_argument("--output-len", default=None, metavar="N|A:B", help="override the dataset's output lengths")
    g.add_argument("--trace", default=None, help="Mooncake-format JSONL trace to replay instead")
    g.add_argument("--num-requests", type=int, default=200, help="requests to simulate")
    g.add_argument("--seed", type=int, default=0, help="workload seed")
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="arrival process")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (gamma arrivals only)")
    s = p.add_argument_group("SLOs (goodput counts requests meeting all that are given)")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token SLO")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token SLO")
    if many_profiles:
        p.add_argument("--profile", required=True, action="append",
                       help="a profile JSON (raypd profile), or a model name to profile now (cached); "
                            "repeat with profiles of other --tp degrees to plan a TP degree per pool")
    else:
        p.add_argument("--profile", required=True,
                       help="a profile JSON (raypd profile), or a model name to profile now (cached)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _workload(args):
    from raypd.planner import Workload

    if args.num_requests < 1:
        raise SystemExit(f"--num-requests must be >= 1, got {args.num_requests}")
    return Workload(args.dataset, args.input_len, args.output_len, args.trace, args.num_requests,
                    getattr(args, "rate", math.inf), args.arrival, args.burstiness, args.seed)


def _slo(args):
    from raypd.bench.metrics import SLO

    ms = lambda v: v / 1e3 if v is not None else None  # noqa: E731
    return SLO(ttft_s=ms(args.slo_ttft_ms), tpot_s=ms(args.slo_tpot_ms))


def load_or_measure(spec: str):
    """A profile file, or a model name: measured once on this machine, then read from the cache."""
    from raypd.planner import Profile, device_name, measure_profile

    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        return Profile.load(path)
    cached = _cache_dir() / f"{spec.replace('/', '_')}-{device_name().replace(':', '_')}.json"
    if cached.is_file():
        return Profile.load(cached)
    print(f"profiling {spec} on {device_name()} (once; cached in {cached}) ...", flush=True)
    profile = measure_profile(spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    profile.save(cached)
    return profile


# ----------------------------------------------------------------------------- profile


def add_profile(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure this machine's engine costs for the simulator",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model name or checkpoint (default: the embedded model)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree of each worker (needs that many devices: on CPU "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length of the profiled engines")
    p.add_argument("--out", default="profile.json", help="where to write the profile")
    p.set_defaults(run=profile)


def profile(args) -> int:
    from raypd.planner import measure_profile

    try:
        p = measure_profile(args.model, max_seq_len=args.max_seq_len, tp=args.tp)
    except ValueError as e:
        raise SystemExit(f"raypd profile: {e}") from None
    p.save(args.out)
    c = p.worker.cost
    print(f"{args.out}: {p.worker.device} x {p.worker.tp}; prefill {c.predict_prefill_s(1024) * 1e3:.1f} ms / 1024 tokens, "
          f"decode step {c.predict_decode_step_s(8, 8 * 256) * 1e3:.2f} ms at batch 8, "
          f"K/V {c.transfer_bytes_per_s / 1e9:.2f} GB/s")
    return 0


# ----------------------------------------------------------------------------- simulate


def add_simulate(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate a deployment on a profile (virtual clock)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("colocated", "disaggregated"), default="disaggregated", help="serving mode")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill workers (disaggregated)")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers (disaggregated)")
    p.add_argument("--workers", type=int, default=None, help="colocated: workers (default --num-decode)")
    p.add_argument("--rate", type=float, default=math.inf, help="mean request rate, req/s (inf: all at once)")
    _workload_arguments(p)
    p.set_defaults(run=simulate)


def simulate(args) -> int:
    from raypd.planner import simulate as run

    num_decode = args.workers if args.mode == "colocated" and args.workers else args.num_decode
    try:
        r = run(load_or_measure(args.profile), args.mode, args.num_prefill, num_decode, _workload(args), _slo(args))
    except ValueError as e:
        raise SystemExit(f"raypd simulate: {e}") from None
    r.pop("summary")
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0


# ----------------------------------------------------------------------------- plan


def add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="colocated or which P:D split: the best goodput per device at the SLOs",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, required=True, help="devices (one worker each) to plan for")
    p.add_argument("--rates", default=DEFAULT_RATES, help="offered rates to sweep, req/s")
    p.add_argument("--attainment", type=float, default=0.9, help="SLO attainment a rate must keep to count")
    p.add_argument("--plot", default=None, help="write goodput vs rate of every candidate to this PNG")
    _workload_arguments(p, many_profiles=True)
    p.set_defaults(run=plan)


def plan(args) -> int:
    from raypd.planner import plan as run, plot_plan

    try:
        rates = [float(r) for r in args.rates.split(",")]
        result = run([load_or_measure(spec) for spec in args.profile], args.devices, _workload(args), _slo(args), rates, args.attainment)
    except ValueError as e:
        raise SystemExit(f"raypd plan: {e}") from None
    if args.plot:
        plot_plan(result, args.plot)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'candidate':>14}  {'goodput/device':>15}  goodput by rate")
    for row in result["candidates"]:
        curve = " ".join(f"{p['rate']:g}:{p['goodput_rps'] or 0:.2f}" for p in row["curve"])
        print(f"{row['candidate']:>14}  {row['goodput_per_device']:>15.3f}  {curve}")
    margin = f" by {result['margin']:.2f}x" if result["margin"] else ""
    if result["margin"] is not None and result["margin"] < 1.05:
        margin += ": within 5%, so either will do; the model's error is larger than that"
    print(f"recommended: {result['recommendation']} (runner-up {result['runner_up']}{margin}) on "
          f"{result['num_devices']} x {result['device']}")
    return 0


# ----------------------------------------------------------------------------- rebalance


def add_rebalance(subparsers) -> None:
    p = subparsers.add_parser("rebalance", help="move workers of a running deployment between prefill and decode",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="raypd", help="the deployment's name")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the local one)")
    p.add_argument("--num-prefill", type=int, required=True, help="prefill workers wanted")
    p.add_argument("--num-decode", type=int, required=True, help="decode workers wanted")
    p.add_argument("--wait-s", type=float, default=300.0, help="wait this long for the new roles to serve")
    p.set_defaults(run=rebalance)


def rebalance(args) -> int:
    import raypd

    try:
        d = raypd.connect(args.name, address=args.address)
        s = d.set_roles(args.num_prefill, args.num_decode, wait_s=args.wait_s)
    except (ValueError, TimeoutError, LookupError, RuntimeError) as e:
        raise SystemExit(f"raypd rebalance: {e}") from None
    print(f"{args.name}: prefill {[w['worker_id'] for w in s['prefill']]}, decode "
          f"{[w['worker_id'] for w in s['decode']]}; retired {s['retired_workers']}")
    return 0
