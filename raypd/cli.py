"""The `raypd` command line. Outer ring: parse arguments, call into `models` / `raypd`, report.

Each subcommand is two functions, `add_<name>(subparsers)` declaring its arguments and
`<name>(args) -> int` running it; `SUBCOMMANDS` registers them. Heavy imports (jax) happen
inside the runners so that `raypd --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from raypd.server import http_server

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- convert


def add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint to a raypd (orbax) checkpoint",
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


# ----------------------------------------------------------------------------- generate


def add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="complete prompts once, in-process, and print them",
        description="Complete each PROMPT with raypd.generate (backend 'local': the colocated engine "
                    "on this machine's devices) and print the completions with TTFT/TPOT.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=generate)


def generate(args: argparse.Namespace) -> int:
    import raypd

    try:
        completions = raypd.generate(args.prompts, model=args.model, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     seed=args.seed, stop=args.stop)
    except ValueError as e:
        raise SystemExit(f"raypd generate: {e}") from None
    for prompt, c in zip(args.prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "metrics": c.metrics}))
        else:
            m = c.metrics
            print(f"{prompt}{c.text}\n[TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
                  f"finish={c.finish_reason}]")
    return 0


# ----------------------------------------------------------------------------- serve


def add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over gRPC in the foreground (Ctrl-C stops it cleanly)",
        description="Serve MODEL over gRPC (raypd/proto/raypd.proto, with health and reflection). "
                    "--backend ray (default) starts a Ray deployment (prefill and decode worker actors and "
                    "the scheduler) on the cluster at --address, or on a local cluster it starts and stops "
                    "itself, and serves it; --backend local serves the colocated engine in this process. "
                    "Ctrl-C or SIGTERM stops the server, the deployment and a cluster this command started. "
                    "Binds 127.0.0.1 by default; a non-loopback --grpc-host needs --auth-token and/or TLS, or "
                    "--allow-insecure-remote. The token may also come from $RAYPD_AUTH_TOKEN.")
    p.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    p.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray: a disaggregated Ray deployment (default); local: the engine in this process")
    p.add_argument("--grpc-host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--auth-token", default=None,
                   help="require 'authorization: Bearer TOKEN' (all but health). A command line is visible "
                        "to every local user (ps, /proc): prefer $RAYPD_AUTH_TOKEN")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20)
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests in flight (local) or queued in the scheduler (ray) before RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="allow a non-loopback bind without TLS or auth (prints a warning)")
    p.add_argument("--no-warmup", action="store_true", help="local: skip compiling every shape before serving")
    http_server.add_arguments(p)
    ray = p.add_argument_group("--backend ray")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to deploy on (e.g. 'auto', HOST:PORT; default: start a local one)")
    ray.add_argument("--dashboard", action="store_true",
                     help="start Ray's dashboard on 127.0.0.1 (only for a cluster this command starts; the "
                          "cluster's components listen on loopback only)")
    ray.add_argument("--deployment", default="raypd", help="deployment name (raypd.connect finds it by this)")
    ray.add_argument("--num-prefill", type=int, default=1, help="prefill workers (0: decode workers prefill)")
    ray.add_argument("--num-decode", type=int, default=1, help="decode workers")
    ray.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel degree of each prefill worker")
    ray.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel degree of each decode worker")
    ray.add_argument("--kv-compression", choices=("none", "int8"), default="none",
                     help="K/V on the wire between workers (requests may override it)")
    ray.add_argument("--no-calibrate", action="store_true", help="skip timing the engines at start-up")
    p.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from raypd.server.grpc_server import check_bind

    stop = threading.Event()  # set by Ctrl-C / SIGTERM, also while starting: then stop at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    token = args.auth_token or os.environ.get("RAYPD_AUTH_TOKEN") or None
    read = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
    server_kw = dict(metrics_port=args.metrics_port, host=args.grpc_host, port=args.grpc_port, token=token,
                     tls_cert=read(args.tls_cert), tls_key=read(args.tls_key),
                     max_message_bytes=args.max_message_bytes, allow_insecure_remote=args.allow_insecure_remote)
    try:  # before anything starts
        check_bind(args.grpc_host, token, server_kw["tls_cert"], server_kw["tls_key"], args.allow_insecure_remote)
    except ValueError as e:
        raise SystemExit(f"raypd serve: {e}") from None
    http_server.check_arguments(args)
    start = _serve_ray if args.backend == "ray" else _serve_local
    with start(args, server_kw) as (endpoint, info), http_server.serving(args, endpoint, args.model) as http:
        print(json.dumps({**info, "grpc": f"{args.grpc_host}:{endpoint.port}", "auth": token is not None,
                          "tls": args.tls_cert is not None, "metrics_port": endpoint.metrics.port,
                          "http": http.url if http else None}), flush=True)
        stop.wait()
        log.info("shutting down")
    return 0


@contextlib.contextmanager
def _serve_local(args: argparse.Namespace, server_kw: dict):
    import models
    from raypd.api import LocalBackend
    from raypd.server.grpc_server import Endpoint

    name = args.model or models.DEFAULT_MODEL
    try:
        endpoint = Endpoint(LocalBackend(models.load(name)), name, max_queued=args.max_queued, **server_kw)
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
    log.info("warming up %s", name)
    endpoint.start(warmup=not args.no_warmup)
    try:
        yield endpoint, {"serving": name, "backend": "local"}
    finally:
        endpoint.stop()


@contextlib.contextmanager
def _serve_ray(args: argparse.Namespace, server_kw: dict):
    """A deployment on Ray and the endpoint over it; on exit both stop (in that order), and so
    does a local cluster started here (ray.shutdown stops the one ray.init started, and only
    disconnects from one at --address)."""
    import signal

    import ray

    from raypd.runtime.deployment import ROOT, start_local_cluster

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Without --address, always a fresh local cluster on loopback (never one some other process started).
    if args.address is None:
        start_local_cluster(include_dashboard=args.dashboard)
    else:
        ray.init(address=args.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    for sig, handler in handlers.items():  # ray.init puts its own on SIGTERM (exit at once)
        signal.signal(sig, handler)
    try:
        with _ray_endpoint(args, server_kw) as started:
            yield started
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _ray_endpoint(args: argparse.Namespace, server_kw: dict):
    import jax

    jax.config.update("jax_platforms", "cpu")  # the driver reads the model's card; the workers own the devices
    import models
    from raypd.engine.runner import EngineConfig
    from raypd.runtime import deployment as dep
    from raypd.server.backends import RayBackend
    from raypd.server.grpc_server import Endpoint
    from scheduler import PolicyConfig

    name = args.model or models.DEFAULT_MODEL
    try:
        model = models.load(name)
        engine = EngineConfig(max_seq_len=min(2048, model.config.max_position_embeddings))
        log.info("starting deployment %r of %s: %d prefill, %d decode workers", args.deployment, name,
                 args.num_prefill, args.num_decode)
        handle = dep.serve(name, num_prefill=args.num_prefill, num_decode=args.num_decode,
                           prefill_tp=args.prefill_tp, decode_tp=args.decode_tp, name=args.deployment,
                           engine_config=engine, compression=args.kv_compression,
                           calibrate=not args.no_calibrate, policy=PolicyConfig(max_queued=args.max_queued))
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
    try:
        backend = RayBackend(handle, name, model, engine.max_seq_len,
                             max_slots=engine.max_slots * args.num_decode)
        try:
            endpoint = Endpoint(backend, **server_kw).start()
        except (ValueError, OSError) as e:
            raise SystemExit(f"raypd serve: {e}") from None
        try:
            yield endpoint, {"serving": name, "backend": "ray", "deployment": args.deployment,
                             "ray": ray_address(), "started_ray": args.address is None}
        finally:
            endpoint.stop()
    finally:
        handle.shutdown()


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


# ----------------------------------------------------------------------------- batch


def add_batch(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="JSONL prompts in, JSONL completions out (attaches to or starts a deployment)",
        description="Complete every line of --input (JSON objects with 'prompt' and optional 'id', "
                    "'max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop') into --output, in order. "
                    "With --backend ray (default) it attaches to the deployment named --deployment or starts "
                    "one for the batch; runnable as `ray job submit -- python scripts/batch_generate.py ...`.")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--model", default=None, help="model for a deployment this command starts (default model)")
    p.add_argument("--deployment", default="raypd", help="deployment name to attach to or start")
    p.add_argument("--backend", choices=("ray", "local"), default="ray")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=batch)


def batch(args: argparse.Namespace) -> int:
    from raypd.batch import run_batch

    try:
        summary = run_batch(args.input, args.output, backend=args.backend, deployment=args.deployment,
                            model=args.model, batch_size=args.batch_size, progress=not args.no_progress,
                            max_tokens=args.max_tokens, temperature=args.temperature)
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd batch: {e}") from None
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- status


def add_status(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="workers, queue lengths, pages in use, KV store size and hit rate of a deployment",
        description="Attach to a running deployment on the Ray cluster at --address and print its status as JSON.")
    p.add_argument("--deployment", default="raypd")
    p.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    p.set_defaults(run=status)


def status(args: argparse.Namespace) -> int:
    from raypd.runtime import deployment as dep

    try:
        handle = dep.connect(args.deployment, address=args.address)
        print(json.dumps(handle.status(), indent=2, default=str))
    except Exception as e:  # noqa: BLE001 - no cluster, no deployment: say so
        raise SystemExit(f"raypd status: {e}") from None
    return 0


# ----------------------------------------------------------------------------- bench


def add_bench(subparsers) -> None:
    from raypd.bench import cli as bench_cli

    p = subparsers.add_parser("bench", help="load-test a target: TTFT/TPOT/ITL/E2E, goodput, report + plots",
                              description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(p)
    p.set_defaults(run=bench)


def bench(args: argparse.Namespace) -> int:
    from raypd.bench import cli as bench_cli

    try:
        bench_cli.print_summary(bench_cli.main(args))
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd bench: {e}") from None
    return 0


# ----------------------------------------------------------------------------- entry point

def _planner_subcommands():
    from raypd import planner_cli

    return (planner_cli.add_profile, planner_cli.add_simulate, planner_cli.add_plan, planner_cli.add_rebalance)


SUBCOMMANDS = (add_convert, add_generate, add_serve, add_batch, add_status, add_bench, *_planner_subcommands())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypd", description="Prefill/decode-disaggregated LLM "
                                     "serving for JAX on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
