"""The gRPC endpoint (raypd/proto/raypd.proto), with health, reflection, auth and TLS.

Secure by default: it binds 127.0.0.1 unless told otherwise, and refuses a non-loopback bind
that has neither TLS nor a bearer token unless `allow_insecure_remote` is set (then it logs a
loud warning). With a token, every method but the standard health service requires
`authorization: Bearer <token>` metadata.

The service is a thin shell over a backend (backends.py): the local engine loop or a Ray
deployment; both answer with the same status codes. INVALID_ARGUMENT (bad input; the message
names the field), RESOURCE_EXHAUSTED (at capacity; trailing metadata `rejection-reason` and,
when retrying can help, `retry-after-ms`), DEADLINE_EXCEEDED (the client's deadline passed
mid-generation), CANCELLED (the client went away), UNAVAILABLE (the deployment is not
running), INTERNAL (a worker failed the request), UNAUTHENTICATED (auth), ALREADY_EXISTS (the
client's request_id is already in flight on this server). A request that cannot be parsed (a
string field that is not UTF-8, say) is INVALID_ARGUMENT naming the field (wire.py). A cancelled or
expired request is aborted in the engine or the deployment, which frees its slot and pages
before its next step. The client's deadline travels to a Ray deployment as the request's TTFT
bound: one whose first token is predicted to come too late (queue, prefill and transfer
backlog counted) is refused at once with RESOURCE_EXHAUSTED, `rejection-reason: deadline`.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import raypd
from raypd import logs
from raypd.api import LocalBackend
from raypd.engine.api import MAX_LOGIT_BIAS, SamplingParams, check_request_id
from raypd.proto import raypd_pb2, raypd_pb2_grpc
from raypd.runtime.errors import DeploymentNotRunning, DuplicateRequestId, RequestFailed
from raypd.server.backends import Job, LocalEngineBackend
from raypd.server.engine_loop import Rejected, StreamTimeout
from raypd.server.metrics import Metrics
from raypd.server.wire import Malformed, decode_request

log = logging.getLogger(__name__)
SERVICE_NAME = raypd_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
POLL_S = 0.05  # how often a waiting handler checks for cancellation


def parse_job(req: raypd_pb2.GenerateRequest, model_name: str) -> Job:
    """The request as a Job; ValueError naming the field when it is malformed."""
    if isinstance(req, Malformed):
        raise ValueError(req.reason)
    check_request_id(req.request_id)
    if req.model and req.model != model_name:
        raise ValueError(f"model: unknown model {req.model!r}; this server serves {model_name!r}")
    p = req.params
    kv = p.kv_compression
    if kv not in ("", "int8", "none"):
        raise ValueError(f"kv_compression must be 'int8', 'none' or empty, got {kv!r}")
    params = SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else 64,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        seed=p.seed if p.HasField("seed") else None,
        stop=p.stop, stop_token_ids=p.stop_token_ids,  # sizes checked before they are copied
        ignore_eos=p.ignore_eos, logprobs=p.logprobs,
        min_p=p.min_p if p.HasField("min_p") else 0.0,
        frequency_penalty=p.frequency_penalty if p.HasField("frequency_penalty") else 0.0,
        presence_penalty=p.presence_penalty if p.HasField("presence_penalty") else 0.0,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        logit_bias=_logit_bias(p.logit_bias), min_tokens=p.min_tokens, top_logprobs=p.top_logprobs)
    which = req.WhichOneof("prompt")
    if which is None:
        raise ValueError("prompt: set either text or token_ids")
    # token ids stay a protobuf sequence: encode_prompt refuses an oversized one by its length,
    # before anything walks (or copies) its ids
    prompt = req.text if which == "text" else req.token_ids.ids
    return Job(prompt, which, params, kv or None, req.request_id)


def _logit_bias(bias) -> dict:
    """A protobuf map, its size checked before it is copied (SamplingParams checks the rest)."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries (MAX_LOGIT_BIAS), got {len(bias)}")
    return dict(bias)


def _top_logprobs(outs, k: int) -> list:
    """One TopLogprobs per token when the request asked for k > 0 alternatives."""
    if not k:
        return []
    tops = [o.top_logprobs or () for o in outs]
    return [raypd_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top]) for top in tops]


class GenerationService(raypd_pb2_grpc.GenerationServicer):
    """The RPCs over a backend (raypd/server/backends.py: the local engine or a Ray deployment)."""

    def __init__(self, backend, metrics: Metrics | None = None, max_request_s: float = 600.0,
                 request_log_level: int | None = logging.INFO, stats: logs.StatsReporter | None = None):
        self.backend, self.metrics, self.max_request_s = backend, metrics, max_request_s
        self.request_log_level, self.stats = request_log_level, stats
        self._finished_lock = threading.Lock()
        self.num_finished = 0  # requests that ended with a response (any finish reason)

    # ------------------------------------------------------------------ request handling

    def _submit(self, req: raypd_pb2.GenerateRequest, context):
        try:
            job = parse_job(req, self.backend.card.name)
            remaining = context.time_remaining()
            if remaining is not None:  # deadlines end to end: what cannot start in time is refused now
                job = dataclasses.replace(job, ttft_slo_s=remaining)
            stream = self.backend.submit(job)
        except DuplicateRequestId as e:
            self._count("already_exists")
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except ValueError as e:
            self._count("invalid_argument")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Rejected as e:
            self._count("resource_exhausted")
            if self.metrics:
                self.metrics.rejections.labels(reason=e.reason).inc()
            hints = [("rejection-reason", e.reason)]
            if e.retry_after_s is not None:
                hints.append(("retry-after-ms", str(max(1, int(e.retry_after_s * 1000)))))
            context.set_trailing_metadata(tuple(hints))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except DeploymentNotRunning as e:
            self._count("unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        context.add_callback(stream.abort)  # RPC over (finished, cancelled, expired): free what is left
        return stream

    def _outputs(self, stream, context):
        """Yield lists of token outputs (all that arrived together) until the request finishes."""
        deadline = time.monotonic() + self.max_request_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, time.monotonic() + remaining)
        while True:
            if not context.is_active():
                stream.abort()
                self._count("cancelled")
                context.abort(grpc.StatusCode.CANCELLED, "client went away")
            left = deadline - time.monotonic()
            if left <= 0:
                stream.abort()
                self._count("deadline_exceeded")
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"request {stream.request_id} did not finish before its deadline")
            try:
                batch = [stream.get(min(POLL_S, left))]
            except StreamTimeout:
                continue
            except ValueError as e:
                self._count("invalid_argument")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except DeploymentNotRunning as e:
                self._count("unavailable")
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except RequestFailed as e:
                self._count("internal")
                context.abort(grpc.StatusCode.INTERNAL, str(e))
            while not batch[-1].is_finished:  # take whatever else is already there: one chunk
                try:
                    batch.append(stream.get(0))
                except StreamTimeout:
                    break
            yield batch
            if batch[-1].is_finished:
                return

    def _timings(self, stream, first_s: float, end_s: float, n: int, finish_reason: str) -> raypd_pb2.Timings:
        """The request's timings (TPOT: time between tokens after the first, raypd.logs.tpot_s);
        observed in the metrics and logged as the request's one line."""
        ttft = first_s - stream.submitted_s
        tpot = logs.tpot_s(first_s, end_s, n)
        scheduler = getattr(stream, "metrics", None) or {}
        if self.metrics:
            self.metrics.observe_request(ttft, tpot if n > 1 else None, scheduler)
        with self._finished_lock:
            self.num_finished += 1
        if self.stats is not None:
            self.stats.count(1, n)
        logs.log_request(log, self.request_log_level, request_id=stream.request_id,
                         prompt_tokens=stream.prompt_tokens or None, completion_tokens=n, ttft_s=ttft, tpot_s=tpot,
                         e2e_s=end_s - stream.submitted_s, finish_reason=finish_reason,
                         prefilled_on=_prefilled_on(scheduler, self.backend.name))
        return raypd_pb2.Timings(ttft_s=ttft, tpot_s=tpot, e2e_s=end_s - stream.submitted_s)

    def _count(self, code: str) -> None:
        if self.metrics:
            self.metrics.requests.labels(code=code).inc()

    # ------------------------------------------------------------------ RPCs

    def Generate(self, req, context):
        stream = self._submit(req, context)
        outs, first_s = [], None
        for batch in self._outputs(stream, context):
            first_s = first_s or time.perf_counter()
            outs += batch
        self._count("ok")
        return raypd_pb2.GenerateResponse(
            request_id=stream.request_id, text="".join(o.text for o in outs),
            token_ids=[o.token_id for o in outs],
            logprobs=[o.logprob for o in outs] if req.params.logprobs else [],
            finish_reason=outs[-1].finish_reason,
            timings=self._timings(stream, first_s, time.perf_counter(), len(outs), outs[-1].finish_reason),
            prompt_tokens=stream.prompt_tokens, top_logprobs=_top_logprobs(outs, req.params.top_logprobs))

    def GenerateStream(self, req, context):
        stream = self._submit(req, context)
        first_s, n = None, 0
        for batch in self._outputs(stream, context):
            first_s = first_s or time.perf_counter()
            n += len(batch)
            last = batch[-1]
            yield raypd_pb2.GenerateChunk(
                request_id=stream.request_id, text_delta="".join(o.text for o in batch),
                token_ids=[o.token_id for o in batch],
                logprobs=[o.logprob for o in batch] if req.params.logprobs else [],
                finish_reason=last.finish_reason or "", top_logprobs=_top_logprobs(batch, req.params.top_logprobs),
                timings=self._timings(stream, first_s, time.perf_counter(), n, last.finish_reason)
                if last.is_finished else None)
        self._count("ok")

    def ListModels(self, req, context):
        c = self.backend.card
        return raypd_pb2.ListModelsResponse(models=[raypd_pb2.ModelInfo(
            name=c.name, architecture=c.architecture, num_params=c.num_params, max_seq_len=c.max_seq_len,
            has_tokenizer=c.has_tokenizer)])

    def ServerInfo(self, req, context):
        try:
            info = self.backend.server_info()
        except DeploymentNotRunning as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return raypd_pb2.ServerInfoResponse(version=raypd.__version__, backend=self.backend.name, **info)


def _prefilled_on(scheduler_metrics: dict, backend_name: str) -> str:
    """Where a request's prompt was prefilled: the prefill worker's id, "<decode worker> (local)"
    for a local prefill on a decode worker, or "local" for the in-process engine."""
    if scheduler_metrics.get("is_local_prefill"):
        return f"{scheduler_metrics.get('decode_worker')} (local)"
    return scheduler_metrics.get("prefill_worker") or ("local" if backend_name == "local" else None)


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but the health service."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(deny, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


class _Capture:
    """Stands in for a server to catch the handlers the generated code registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_generation_service(service: GenerationService, server: grpc.Server) -> None:
    """As the generated add_GenerationServicer_to_server, except that the GenerateRequest of
    Generate and GenerateStream is parsed by wire.decode_request: a request that does not parse
    reaches the service as a Malformed (INVALID_ARGUMENT naming the field), not as INTERNAL."""
    capture = _Capture()
    raypd_pb2_grpc.add_GenerationServicer_to_server(service, capture)
    handlers = {name: h._replace(request_deserializer=decode_request) if name in ("Generate", "GenerateStream")
                else h for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, tls_cert: bytes | None, tls_key: bytes | None,
               allow_insecure_remote: bool = False) -> None:
    """ValueError unless this bind is allowed: loopback, or TLS and/or a token, or explicitly insecure."""
    if not is_loopback(host) and tls_cert is None and token is None and not allow_insecure_remote:
        raise ValueError(f"refusing to listen on non-loopback host {host!r} without TLS or an auth token "
                         "(pass --auth-token and/or --tls-cert/--tls-key, or --allow-insecure-remote)")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")


def build_server(service: GenerationService, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None, max_message_bytes: int = 4 << 20,
                 max_workers: int = 32, allow_insecure_remote: bool = False,
                 health_servicer: health.HealthServicer | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and the port it bound. Health reports SERVING
    unless a `health_servicer` is given (then its owner says when)."""
    check_bind(host, token, tls_cert, tls_key, allow_insecure_remote)
    if not is_loopback(host) and tls_cert is None and token is None:
        log.warning("!!! raypd gRPC listens on %s WITHOUT TLS OR AUTH: anyone who can reach it can use it !!!", host)
    # so_reuseport off: a second server on a port one already holds fails to bind, instead of
    # sharing it (the kernel would spread new connections over both, token or no token).
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[BearerAuth(token)] if token else [], options=options)
    add_generation_service(service, server)
    if health_servicer is None:
        health_servicer = health.HealthServicer()
        set_health(health_servicer, True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        if tls_cert is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if not bound:
        raise OSError(f"could not bind {address}: the port is in use (raypd never shares a port) or the "
                      "address is not this machine's")
    return server, bound


def set_health(servicer: health.HealthServicer, is_serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        servicer.set(name, status)


class Endpoint:
    """A backend, the gRPC server over it and (optionally) a metrics listener.

    `backend`: a LocalEngineBackend or RayBackend (raypd/server/backends.py), or a LocalBackend,
    which is wrapped in a LocalEngineBackend named `model_name` with `max_queued` requests in flight.
    Ready means warm: `start` compiles every shape the backend serves (with progress lines in
    the log) before the server opens its port and health says SERVING; after that, health says
    SERVING only while the backend can generate (`backend.is_ready()`, every
    `readiness_interval_s`: a deployment with no live decode worker is NOT_SERVING). A stats line is logged
    every `stats_interval_s` while there is traffic (None: never); each finished request logs
    one line at `request_log_level` (None: none)."""

    def __init__(self, backend, model_name: str | None = None, *, max_queued: int = 256,
                 metrics_port: int | None = None, request_log_level: int | None = logging.INFO,
                 stats_interval_s: float | None = None, readiness_interval_s: float | None = 2.0, **server_kw):
        if isinstance(backend, LocalBackend):
            backend = LocalEngineBackend(backend, model_name or backend.model.name, max_queued)
        self.backend = backend
        self.metrics = Metrics(backend.collector(), port=metrics_port)
        self.stats = logs.StatsReporter(backend.stats, stats_interval_s) if stats_interval_s else None
        self.service = GenerationService(backend, self.metrics, request_log_level=request_log_level,
                                         stats=self.stats)
        self.health = health.HealthServicer()
        set_health(self.health, False)
        self._is_stopped = False
        self.readiness_interval_s = readiness_interval_s
        self._stop_event = threading.Event()
        try:
            self.server, self.port = build_server(self.service, health_servicer=self.health, **server_kw)
        except BaseException:
            self.metrics.close()
            raise

    def start(self, warmup: bool = True) -> "Endpoint":
        """Warm the backend up, then serve. On any failure (or Ctrl-C) what started is stopped."""
        try:
            self.backend.start(warmup)
            self.server.start()
        except BaseException:
            self.stop(grace_s=0)
            raise
        set_health(self.health, True)
        if self.stats is not None:
            self.stats.start()
        if self.readiness_interval_s:
            threading.Thread(target=self._watch_readiness, name="raypd-readiness", daemon=True).start()
        return self

    def _watch_readiness(self) -> None:
        """Health says SERVING only while the backend can generate (a deployment whose decode
        workers are all gone, and not yet replaced, is NOT_SERVING), checked every interval."""
        while not self._stop_event.wait(self.readiness_interval_s):
            try:
                is_ready = bool(self.backend.is_ready())
            except Exception:  # noqa: BLE001 - a backend that cannot say is not ready
                is_ready = False
            if not self._is_stopped:
                set_health(self.health, is_ready)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking RPCs, end those in flight (their requests are aborted), then the backend.
        Idempotent."""
        if self._is_stopped:
            return
        self._is_stopped = True
        self._stop_event.set()
        set_health(self.health, False)
        if self.stats is not None:
            self.stats.stop()
        self.server.stop(grace_s).wait(grace_s + 5)
        self.backend.stop()
        self.metrics.close()
