"""The operations commands: `raypd convert` (a Hugging Face checkpoint to a raypd one),
`raypd status` (a running deployment's state) and `raypd bench` (load-test a target)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from raypd.cli.common import add_connect_timeout, add_parser

log = logging.getLogger(__name__)


def add_convert(subparsers) -> None:
    p = add_parser(
        subparsers, "convert", help="convert a Hugging Face checkpoint to a raypd (orbax) checkpoint",
        description="Load a Hugging Face directory (config.json + safetensors), check every tensor, "
                    "and save it as a raypd checkpoint (raypd_config.json + orbax params/ + "
                    "tokenizer.json when present). `raypd` and models.load read the result directly.")
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="Hugging Face model directory")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output directory (must be new or empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype to store (default: the checkpoint's torch_dtype)")
    p.set_defaults(run=convert)


def convert(args: argparse.Namespace) -> int:
    import models
    from models import checkpoint

    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise SystemExit(f"raypd convert: {args.out_dir} exists and is not empty")
    model = models.load(args.hf_dir, dtype=args.dtype)
    cfg = model.config
    tokenizer_file = args.hf_dir / "tokenizer.json"
    if model.tokenizer is not None and tuple(model.tokenizer.eos_ids) != cfg.eos_token_ids:
        # generation_config.json overrode config.json's eos ids; keep the override in the config.
        cfg = cfg.replace(eos_token_ids=tuple(model.tokenizer.eos_ids))
    checkpoint.save(args.out_dir, model.params, cfg,
                    tokenizer_file=tokenizer_file if tokenizer_file.exists() else None)
    log.info("wrote %s: %s, %.1fM parameters, %s", args.out_dir, cfg.architecture,
             cfg.num_params() / 1e6, cfg.dtype)
    print(json.dumps({"out_dir": str(args.out_dir), "architecture": cfg.architecture,
                      "num_params": cfg.num_params(), "dtype": cfg.dtype}))
    return 0



def add_status(subparsers) -> None:
    p = add_parser(
        subparsers, "status", help="workers, queue lengths, pages in use, KV store size and hit rate of a deployment",
        description="Attach to a running deployment on the Ray cluster at --address and print its status as JSON. "
                    "Fails within --connect-timeout-s when nothing answers there.")
    p.add_argument("--deployment", default="raypd", help="deployment name")
    p.add_argument("--address", default=None,
                   help="Ray cluster ('auto', HOST:PORT as `ray start` prints; default: $RAY_ADDRESS, else auto)")
    add_connect_timeout(p)
    p.set_defaults(run=status)


def status(args: argparse.Namespace) -> int:
    from raypd import reach

    try:
        reach.ray_init(args.address, timeout_s=args.connect_timeout_s, log_to_driver=False)
        from raypd.runtime import deployment as dep

        handle = dep.connect(args.deployment)
        print(json.dumps(handle.status(timeout_s=max(args.connect_timeout_s, 30.0)), indent=2, default=str))
    except Exception as e:  # noqa: BLE001 - no cluster, no deployment: say so
        raise SystemExit(f"raypd status: {e}") from None
    return 0


# ----------------------------------------------------------------------------- bench


def add_bench(subparsers) -> None:
    from raypd.bench import cli as bench_cli

    p = add_parser(subparsers, "bench", help="load-test a target: TTFT/TPOT/ITL/E2E, goodput, report + plots",
                    description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(p)
    p.set_defaults(run=bench)


def bench(args: argparse.Namespace) -> int:
    from raypd.bench import cli as bench_cli

    try:
        bench_cli.print_summary(bench_cli.main(args))
    except (ValueError, OSError) as e:  # ConnectionError is an OSError
        raise SystemExit(f"raypd bench: {e}") from None
    return 0
