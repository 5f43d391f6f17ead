#!/usr/bin/env python3
"""raypd's fault suite: one subcommand per scenario, each prints a report and exits non-zero
when the scenario fails.

    PYTHONPATH=. python scripts/chaos.py bad-input [--model tiny-random] [--no-interference]

Scenarios:
  bad-input   >= 40 classes of bad requests (raypd/chaos/bad_input.py), each sent over gRPC to an
              in-process endpoint (local engine) and through the Python API: every one must be
              refused (INVALID_ARGUMENT naming the field, ALREADY_EXISTS for a duplicate request
              id; ValueError naming the field), nothing may leak, and a stream running while
              the largest hostile requests arrive is timed against the same stream alone.

  kill-decode      one of two decode workers killed while N greedy requests stream: all complete
                   with the right tokens, the worker is replaced (raypd/chaos/kill_decode.py)
  transfer-faults  a fraction of K/V transfers lost by fault injection: every request succeeds
                   (retried) with identical output (raypd/chaos/transfer_faults.py)
  aborts           aborts in 5 phases (queued, prefilling, handoff, decoding, stream closed):
                   nothing leaks, capacity whole afterwards (raypd/chaos/aborts.py)
  overload         2x the measured capacity with a TTFT SLO: refusals fast, accepted requests
                   meet the SLO (raypd/chaos/overload.py)
  soak             minutes at ~70% load, random aborts, a worker killed each minute: no growth
                   in memory, pages or host objects (raypd/chaos/soak.py)

The Ray scenarios run on arithmetic mock engines unless given `--model NAME` (then greedy
output is compared with a run of the same prompts without the fault).

To add a scenario: write `add_<name>(subparsers)` that registers its subcommand with
`set_defaults(run=...)`, the run function returning 0 on success, and list it in SCENARIOS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def add_bad_input(subparsers) -> None:
    p = subparsers.add_parser("bad-input", help="bad requests over gRPC and the Python API")
    p.add_argument("--model", default="tiny-random", help="model to serve (default: tiny-random)")
    p.add_argument("--no-interference", action="store_true", help="skip timing a stream under hostile load")
    p.add_argument("--flood", action="store_true",
                   help="send the hostile requests back to back while the timed stream runs (default: each once)")
    p.add_argument("--json", type=Path, default=None, help="also write the outcomes to this file")
    p.set_defaults(run=run_bad_input)


def run_bad_input(args: argparse.Namespace) -> int:
    from raypd.chaos import bad_input

    report = bad_input.run(args.model, measure_interference=not args.no_interference,
                           flood=args.flood)
    print("\n".join(report.lines()))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "num_classes": report.num_classes, "failures": len(report.failures),
            "stream_alone_s": report.stream_alone_s, "stream_under_attack_s": report.stream_under_attack_s,
            "num_hostile_refused": report.num_hostile_refused, "leaked_pages": report.leaked_pages,
            "outcomes": [vars(o) for o in report.outcomes]}, indent=1))
    ok = not report.failures and report.num_classes >= 40 and report.leaked_pages == 0
    print("bad-input:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _finish(name: str, report, json_path: Path | None) -> int:
    print("\n".join(report.lines()))
    if json_path is not None:
        json_path.write_text(json.dumps(dict(dataclasses.asdict(report), ok=report.ok), indent=1, default=str))
    print(f"{name}:", "PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


def _common(p) -> None:
    p.add_argument("--model", default=None, help="serve this model (default: arithmetic mock engines)")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")


def add_kill_decode(subparsers) -> None:
    p = subparsers.add_parser("kill-decode", help="kill one of two decode workers mid-stream")
    _common(p)
    p.add_argument("--requests", type=int, default=100, help="concurrent greedy requests (default: 100)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(run=lambda a: _finish("kill-decode", _chaos("kill_decode").run(
        a.requests, a.max_tokens, a.model), a.json))


def add_transfer_faults(subparsers) -> None:
    p = subparsers.add_parser("transfer-faults", help="lose a fraction of K/V transfers by fault injection")
    _common(p)
    p.add_argument("--requests", type=int, default=200, help="requests (default: 200)")
    p.add_argument("--fail-fraction", type=float, default=0.05, help="transfers lost (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws (default: 0)")
    p.set_defaults(run=lambda a: _finish("transfer-faults", _chaos("transfer_faults").run(
        a.requests, a.fail_fraction, a.seed, model=a.model), a.json))


def add_aborts(subparsers) -> None:
    p = subparsers.add_parser("aborts", help="aborts in 5 phases: no leaks, full capacity after")
    _common(p)
    p.add_argument("--per-phase", type=int, default=40, help="requests aborted in each phase (default: 40)")
    p.set_defaults(run=lambda a: _finish("aborts", _chaos("aborts").run(a.per_phase, model=a.model), a.json))


def add_overload(subparsers) -> None:
    p = subparsers.add_parser("overload", help="2x overload with a TTFT SLO: fast refusals, SLO attainment")
    _common(p)
    p.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity (default: 2)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to offer it (default: 10)")
    p.add_argument("--ttft-slo", type=float, default=0.5, help="TTFT SLO in seconds (default: 0.5)")
    p.add_argument("--no-calibrate", action="store_true", help="use the default cost model, not a calibrated one")
    p.add_argument("--bottleneck", choices=("prefill", "decode"), default="prefill",
                   help="mock engines: the phase that limits capacity (default: prefill)")
    p.set_defaults(run=lambda a: _finish("overload", _chaos("overload").run(
        a.factor, a.seconds, a.ttft_slo, calibrate=not a.no_calibrate, model=a.model, bottleneck=a.bottleneck),
        a.json))


def add_soak(subparsers) -> None:
    p = subparsers.add_parser("soak", help="minutes at ~70%% load with aborts and a worker kill a minute")
    _common(p)
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default: 10)")
    p.add_argument("--load", type=float, default=0.7, help="offered load / measured capacity (default: 0.7)")
    p.add_argument("--sample-every", type=float, default=15.0, help="seconds between samples (default: 15)")
    p.add_argument("--default-caches", action="store_true",
                   help="mock engines: the deployment's default prefix cache and host tier sizes, not small bounds")
    p.set_defaults(run=lambda a: _finish("soak", _chaos("soak").run(
        a.minutes, a.load, sample_every_s=a.sample_every, model=a.model, small_caches=not a.default_caches), a.json))


def _chaos(module: str):
    import importlib

    return importlib.import_module(f"raypd.chaos.{module}")


SCENARIOS = (add_bad_input, add_kill_decode, add_transfer_faults, add_aborts, add_overload, add_soak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="scenario", required=True)
    for add in SCENARIOS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
