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
import signal
import sys
from pathlib import Path

from raypd.cli_sampling import add_sampling as _add_sampling
from raypd.cli_sampling import sampling_kwargs as _sampling
from raypd.server import http_server

log = logging.getLogger(__name__)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after every option that has a default worth showing (not None,
    not an off switch) and whose help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes (logging). SUPPRESS: `raypd -v serve` and `raypd serve -v` both work."""
    from raypd import compile_cache, logs

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log at DEBUG level (same as --log-level debug)")
    g.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS, help="log level (default: info)")
    g.add_argument("--log-format", choices=logs.FORMATS, default=argparse.SUPPRESS,
                   help="text, or json: one JSON object per line for log shippers (default: text)")
    g.add_argument("--compile-cache", default=argparse.SUPPRESS, metavar="DIR",
                   help="JAX persistent compilation cache directory, 'off' to disable (default: "
                        f"${compile_cache.ENV}, else ~/.cache/raypd/jax)")
    return p


def _add_parser(subparsers, name: str, **kw) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, parents=[_common()], formatter_class=HelpFormatter, **kw)


def _add_connect_timeout(p) -> None:
    p.add_argument("--connect-timeout-s", type=float, default=15.0,
                   help="give up connecting to a Ray cluster or gRPC server after this many seconds")


# ----------------------------------------------------------------------------- convert


def add_convert(subparsers) -> None:
    p = _add_parser(
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


# ----------------------------------------------------------------------------- generate


def add_generate(subparsers) -> None:
    p = _add_parser(
        subparsers, "generate", help="complete prompts once, in-process, and print them",
        description="Complete each PROMPT with raypd.generate (backend 'local': the colocated engine "
                    "on this machine's devices) and print the completions with TTFT/TPOT. The engine "
                    "compiles every shape it serves before the first prompt, so TTFT never includes "
                    "compilation (--no-warmup skips that, for one-off runs).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (one completion each)")
    p.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    _add_sampling(p)
    p.add_argument("--logprobs", action="store_true", help="report each generated token's logprob")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="with --json: also the K (<= 20) most likely tokens and their logprobs at each position")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (with --stream: one per token, then the summary)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every shape first")
    p.set_defaults(run=generate)


def generate(args: argparse.Namespace) -> int:
    import raypd
    from raypd.api import get_backend

    from raypd.engine.api import SamplingParams

    try:  # bad flags: say so before compiling
        SamplingParams(**{**_sampling(args), "stop": tuple(args.stop or ())})
        if not args.no_warmup:  # the shapes these prompts use, so TTFT is not compile time
            backend = get_backend(args.model)
            lens = [len(backend.model.tokenizer.encode(p)) if backend.model.tokenizer else 1 for p in args.prompts]
            backend.warmup(max_len=max(lens) + args.max_tokens, num_seqs=len(args.prompts))
        if args.stream:
            for prompt in args.prompts:
                _stream_one(raypd, prompt, args)
            return 0
        completions = raypd.generate(args.prompts, model=args.model, logprobs=args.logprobs, backend="local",
                                     **_sampling(args))
    except ValueError as e:
        raise SystemExit(f"raypd generate: {e}") from None
    for prompt, c in zip(args.prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "logprobs": c.logprobs, "metrics": c.metrics,
                              **({"top_logprobs": c.top_logprobs} if c.top_logprobs else {})}))
        else:
            print(f"{prompt}{c.text}\n{_metrics_line(c.metrics, c.finish_reason, c.logprobs)}")
    return 0


def _metrics_line(m: dict, finish_reason: str, logprobs) -> str:
    extra = f", mean logprob {sum(logprobs) / len(logprobs):.3f}" if logprobs else ""
    return (f"[TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
            f"{m['completion_tokens']} tokens, finish={finish_reason}{extra}]")


def _stream_one(raypd, prompt: str, args: argparse.Namespace) -> None:
    chunks = raypd.stream(prompt, model=args.model, logprobs=args.logprobs, backend="local", **_sampling(args))
    if not args.json:
        print(prompt, end="", flush=True)
    last = None
    for chunk in chunks:
        last = chunk
        if args.json:
            print(json.dumps({"prompt": prompt, "token_id": chunk.token_id, "text": chunk.text,
                              "logprob": chunk.logprob if args.logprobs else None,
                              "finish_reason": chunk.finish_reason,
                              **({"top_logprobs": chunk.top_logprobs} if chunk.top_logprobs else {})}), flush=True)
        else:
            print(chunk.text, end="", flush=True)
    m = (last.metrics or {}) if last is not None else {}
    if args.json:
        print(json.dumps({"prompt": prompt, "finish_reason": last.finish_reason if last else None, "metrics": m}))
    elif m:
        print(f"\n{_metrics_line(m, last.finish_reason, None)}")


# ----------------------------------------------------------------------------- serve


def add_serve(subparsers) -> None:
    p = _add_parser(
        subparsers, "serve", help="serve a model over gRPC in the foreground (Ctrl-C stops it cleanly)",
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
    p.add_argument("--grpc-host", default="127.0.0.1", help="address the gRPC server binds")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: any free port, printed)")
    p.add_argument("--auth-token", default=None,
                   help="require 'authorization: Bearer TOKEN' (all but health). A command line is visible "
                        "to every local user (ps, /proc): prefer $RAYPD_AUTH_TOKEN")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20, help="largest gRPC message in or out")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length, prompt + generated (default: min(2048, the model's))")
    p.add_argument("--max-slots", type=int, default=None,
                   help="decode batch capacity of each engine (default: EngineConfig's, 32)")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests in flight (local) or queued in the scheduler (ray) before RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="allow a non-loopback bind without TLS or auth (prints a warning)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every shape before reporting ready (first requests then compile)")
    p.add_argument("--request-log-level", choices=("debug", "info", "warning", "off"), default="info",
                   help="level of the one log line per finished request")
    p.add_argument("--stats-interval-s", type=float, default=10.0,
                   help="log a stats line this often while there is traffic (0: never)")
    _add_connect_timeout(p)
    http_server.add_arguments(p)
    ray = p.add_argument_group("--backend ray")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to deploy on ('auto', HOST:PORT as `ray start` prints; default: start a "
                          "local one)")
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
    import threading

    from raypd import logs
    from raypd.server.grpc_server import check_bind

    stop = threading.Event()  # set by Ctrl-C / SIGTERM once serving: a graceful stop
    is_serving = [False]

    def on_signal(signum, frame):
        stop.set()
        if not is_serving[0]:  # still starting (loading, compiling): unwind now; what started stops
            raise Interrupted() if signum == signal.SIGTERM else KeyboardInterrupt()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    _watch_signals_during_start_up(is_serving)
    token = args.auth_token or os.environ.get("RAYPD_AUTH_TOKEN") or None
    read = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
    server_kw = dict(metrics_port=args.metrics_port, host=args.grpc_host, port=args.grpc_port, token=token,
                     tls_cert=read(args.tls_cert), tls_key=read(args.tls_key),
                     max_message_bytes=args.max_message_bytes, allow_insecure_remote=args.allow_insecure_remote,
                     request_log_level=logs.request_level(args.request_log_level),
                     stats_interval_s=args.stats_interval_s or None)
    try:  # before anything starts
        check_bind(args.grpc_host, token, server_kw["tls_cert"], server_kw["tls_key"], args.allow_insecure_remote)
    except ValueError as e:
        raise SystemExit(f"raypd serve: {e}") from None
    http_server.check_arguments(args)
    start = _serve_ray if args.backend == "ray" else _serve_local
    with start(args, server_kw) as (endpoint, info), http_server.serving(args, endpoint, args.model) as http:
        ready = {**info, "grpc": f"{args.grpc_host}:{endpoint.port}", "auth": token is not None,
                 "tls": args.tls_cert is not None, "metrics_port": endpoint.metrics.port,
                 "http": http.url if http else None, "warmed_up": not args.no_warmup}
        logs.log_event(log, logging.INFO, "ready", **ready)
        print(json.dumps(ready), flush=True)
        is_serving[0] = True
        stop.wait()
        logs.log_event(log, logging.INFO, "shutting down", served=endpoint.service.num_finished)
    log.info("stopped")
    return 0


@contextlib.contextmanager
def _serve_local(args: argparse.Namespace, server_kw: dict):
    import models
    from raypd.api import LocalBackend
    from raypd.server.grpc_server import Endpoint

    name = args.model or models.DEFAULT_MODEL
    try:
        model = models.load(name)
        endpoint = Endpoint(LocalBackend(model, _engine_config(args, model)), name, max_queued=args.max_queued,
                            **server_kw)
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
    try:
        endpoint.start(warmup=not args.no_warmup)
        yield endpoint, {"serving": name, "backend": "local"}
    finally:
        endpoint.stop()


@contextlib.contextmanager
def _serve_ray(args: argparse.Namespace, server_kw: dict):
    """A deployment on Ray and the endpoint over it; on exit both stop (in that order), and so
    does a local cluster started here (ray.shutdown stops the one ray.init started, and only
    disconnects from one at --address)."""
    import ray

    from raypd import reach
    from raypd.runtime.deployment import ROOT, start_local_cluster

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Without --address, always a fresh local cluster on loopback (never one some other process started).
    try:
        if args.address is None:
            start_local_cluster(include_dashboard=args.dashboard)
        else:
            reach.ray_init(args.address, timeout_s=args.connect_timeout_s, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    except (ConnectionError, ValueError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
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
    from raypd import logs
    from raypd.runtime import deployment as dep
    from raypd.runtime.engines import JaxEngineFactory
    from raypd.server.backends import RayBackend
    from raypd.server.grpc_server import Endpoint
    from scheduler import PolicyConfig

    name = args.model or models.DEFAULT_MODEL
    try:
        model = models.load(name)
        engine = _engine_config(args, model)
        factory = JaxEngineFactory(name, engine, args.kv_compression, warmup=not args.no_warmup)
        with logs.progress("starting the deployment (workers load and compile their engines)",
                           deployment=args.deployment, model=name, num_prefill=args.num_prefill,
                           num_decode=args.num_decode):
            handle = dep.serve(name, num_prefill=args.num_prefill, num_decode=args.num_decode,
                               prefill_tp=args.prefill_tp, decode_tp=args.decode_tp, name=args.deployment,
                               factory=factory, calibrate=not args.no_calibrate,
                               policy=PolicyConfig(max_queued=args.max_queued))
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
    try:
        backend = RayBackend(handle, name, model, engine.max_seq_len,
                             max_slots=engine.max_slots * args.num_decode)
        try:
            endpoint = Endpoint(backend, **server_kw).start(warmup=not args.no_warmup)
        except (ValueError, OSError) as e:
            raise SystemExit(f"raypd serve: {e}") from None
        try:
            yield endpoint, {"serving": name, "backend": "ray", "deployment": args.deployment,
                             "ray": ray_address(), "started_ray": args.address is None}
        finally:
            endpoint.stop()
    finally:
        handle.shutdown()


def _engine_config(args: argparse.Namespace, model):
    from raypd.engine.runner import EngineConfig

    kw = dict(max_seq_len=args.max_seq_len or min(2048, model.config.max_position_embeddings))
    if args.max_slots is not None:
        kw["max_slots"] = args.max_slots
    return EngineConfig(**kw)


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


# ----------------------------------------------------------------------------- batch


def add_batch(subparsers) -> None:
    p = _add_parser(
        subparsers, "batch", help="JSONL prompts in, JSONL completions out (attaches to or starts a deployment)",
        description="Complete every line of --input (JSON objects with 'prompt' and optional 'id', "
                    "'max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop') into --output, in order; "
                    "the sampling flags are the defaults of lines that do not set their own. --input and "
                    "--output may be paths or URIs (s3://, gs://, ... through fsspec or pyarrow.fs when "
                    "installed). With --backend ray (default) it attaches to the deployment named "
                    "--deployment on the cluster at --address, or starts one for the batch; runnable as "
                    "`ray job submit -- python scripts/batch_generate.py ...`, where --output must be an "
                    "absolute path on storage that outlives the job, or a URI.")
    p.add_argument("--input", required=True, help="JSONL prompts: a path or a URI")
    p.add_argument("--output", required=True, help="JSONL completions: a path or a URI (written anew)")
    p.add_argument("--model", default=None, help="model for a deployment this command starts (default: the "
                   "default model)")
    p.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray: a Ray deployment; local: the engine in this process")
    p.add_argument("--address", default=None, help="Ray cluster ('auto', HOST:PORT; default: $RAY_ADDRESS, else "
                   "a cluster on this machine, else a new local one)")
    p.add_argument("--deployment", default="raypd", help="deployment name to attach to or start")
    p.add_argument("--batch-size", type=int, default=32, help="prompts sent together")
    _add_sampling(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_connect_timeout(p)
    p.set_defaults(run=batch)


def batch(args: argparse.Namespace) -> int:
    from raypd.batch import run_batch

    try:
        summary = run_batch(args.input, args.output, backend=args.backend, deployment=args.deployment,
                            model=args.model, batch_size=args.batch_size, progress=not args.no_progress,
                            address=args.address, connect_timeout_s=args.connect_timeout_s, **_sampling(args))
    except (ValueError, OSError) as e:  # ConnectionError is an OSError
        raise SystemExit(f"raypd batch: {e}") from None
    log.info("wrote %d completions to %s", summary["completions"], summary["output"])
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- status


def add_status(subparsers) -> None:
    p = _add_parser(
        subparsers, "status", help="workers, queue lengths, pages in use, KV store size and hit rate of a deployment",
        description="Attach to a running deployment on the Ray cluster at --address and print its status as JSON. "
                    "Fails within --connect-timeout-s when nothing answers there.")
    p.add_argument("--deployment", default="raypd", help="deployment name")
    p.add_argument("--address", default=None,
                   help="Ray cluster ('auto', HOST:PORT as `ray start` prints; default: $RAY_ADDRESS, else auto)")
    _add_connect_timeout(p)
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

    p = _add_parser(subparsers, "bench", help="load-test a target: TTFT/TPOT/ITL/E2E, goodput, report + plots",
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


# ----------------------------------------------------------------------------- entry point

def _planner_subcommands():
    from raypd import planner_cli

    return (planner_cli.add_profile, planner_cli.add_simulate, planner_cli.add_plan, planner_cli.add_rebalance)


SUBCOMMANDS = (add_convert, add_generate, add_serve, add_batch, add_status, add_bench, *_planner_subcommands())


class _Version(argparse.Action):
    """--version without importing the package (which imports JAX) until asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        try:
            version = metadata.version("raypd")
        except metadata.PackageNotFoundError:
            import raypd

            version = raypd.__version__
        print(f"raypd {version}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypd", parents=[_common()], formatter_class=HelpFormatter,
                                     description="Prefill/decode-disaggregated LLM serving for JAX on Ray.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


class Interrupted(Exception):
    """SIGTERM arrived (SIGINT raises KeyboardInterrupt)."""


_UNWIND_LIMIT_S = 15.0  # what a stop during start-up may spend unwinding before the process just exits


def _watch_signals_during_start_up(is_serving: list[bool]) -> None:
    """A stop during start-up ends the process within _UNWIND_LIMIT_S even when the main thread
    is stuck in a native call (a compile, a thread join) and cannot run its Python handler: the
    signal's byte reaches a watcher thread through the wakeup fd, which arms a watchdog that
    prints every thread's stack and exits. Once serving, the graceful stop is the handler's."""
    import faulthandler
    import os
    import threading

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def fire(code: int) -> None:
        print(f"raypd: still stopping after {_UNWIND_LIMIT_S:.0f} s; exiting now. Where each thread was:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(code)

    def watch() -> None:
        while True:
            signum = os.read(read_fd, 1)
            if not signum:
                return
            if not is_serving[0]:
                code = 143 if signum[0] == signal.SIGTERM else 130
                timer = threading.Timer(_UNWIND_LIMIT_S, fire, (code,))
                timer.daemon = True  # a normal unwind is not held up by it
                timer.start()
                return

    threading.Thread(target=watch, name="raypd-stop-watchdog", daemon=True).start()


def _on_sigterm(signum, frame):
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    from raypd import compile_cache, logs

    args = build_parser().parse_args(argv)
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", "info")
    logs.configure(level, getattr(args, "log_format", "text"))
    if args.command not in ("convert", "status"):
        cache = compile_cache.enable(getattr(args, "compile_cache", None))
        log.debug("compilation cache: %s", cache or "off")
    # Every command stops promptly on SIGTERM as on Ctrl-C (serve installs its own handlers
    # for a graceful stop); a connect in progress runs in a helper thread, so this is heard.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"raypd {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
