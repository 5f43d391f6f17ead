"""`raypd serve`: a gRPC endpoint (and the OpenAI HTTP API with --http-port) over the colocated
engine of this process (--backend local) or a Ray deployment it starts (--backend ray).

Start-up, in order: check the bind and HTTP flags (before anything starts), start the backend
(a local cluster and a deployment for ray), warm it (nothing left to compile), start the
servers, print the ready line. A stop while starting unwinds at once; once serving, a stop is
graceful: the servers, the deployment and a cluster this command started stop, in that order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
from pathlib import Path

from raypd.cli.common import add_connect_timeout, add_parser
from raypd.engine.api import DEFAULT_KV_COMPRESSION, KV_COMPRESSIONS
from raypd.server import http_server

log = logging.getLogger(__name__)


def add_serve(subparsers) -> None:
    p = add_parser(
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
    add_connect_timeout(p)
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
    ray.add_argument("--kv-compression", choices=KV_COMPRESSIONS, default=DEFAULT_KV_COMPRESSION,
                     help="K/V on the wire between workers (requests may override it)")
    ray.add_argument("--no-calibrate", action="store_true", help="skip timing the engines at start-up")
    p.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    import os
    import threading

    from raypd import logs
    from raypd.cli import Interrupted, _watch_signals_during_start_up  # the entry point's, loaded by now
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
