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

To add a scenario: write `add_<name>(subparsers)` that registers its subcommand with
`set_defaults(run=...)`, the run function returning 0 on success, and list it in SCENARIOS.
"""

from __future__ import annotations

import argparse
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


SCENARIOS = (add_bad_input,)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="scenario", required=True)
    for add in SCENARIOS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
