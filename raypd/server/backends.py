"""What the gRPC service serves: one small interface, two implementations.

  LocalEngineBackend  the colocated engine of this process, driven by an EngineLoop thread.
  RayBackend          a running Ray deployment (raypd.serve / raypd.connect), through its scheduler.

Both take a `Job` (a request the service has parsed, not yet checked against the model) and
return a stream with the same five members:
  request_id, submitted_s, prompt_tokens
  get(timeout_s) -> TokenOutput       raises StreamTimeout when none arrives within timeout_s
                                      (0: only what has already arrived)
  watch(notify)                       notify() is called from the producing thread after each
                                      output (it must not block): one reader can serve many
                                      streams without a thread each (openai_streams.py)
  abort()                             frees the request's slot and pages; idempotent
`submit_samples(job, params)` submits n samples of one prompt (a stream each; both backends
prefill the prompt once for them and fork the samples from its K/V); `submit_blocks` says whether submitting waits on another
process (then a caller on an event loop submits from a worker thread). `submit` raises ValueError (bad input; the message names the field), DuplicateRequestId (a
ValueError: the client's request id is already in flight here) or Rejected (at capacity, with a
retry hint). A stream's `get` may raise RequestFailed / DeploymentNotRunning (Ray only).

Request ids: a stream's `request_id` is the client's own (Job.request_id) or, when the client
sent none, one the server assigns, which starts with SERVER_ID_PREFIX (clients may not use it,
so the two never collide). The Ray backend maps each to the deployment's own id.
`start(warmup)` compiles every shape the backend will serve before it returns (the endpoint
reports ready only then); `stats()` is the gauges of the periodic stats line.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Sequence

import numpy as np

from raypd import logs
from raypd.api import LocalBackend, check_sampling, encode_prompt
from raypd.engine.api import SERVER_ID_PREFIX, Request, SamplingParams, TokenOutput
from raypd.runtime import errors
from raypd.runtime.messages import token_output
from raypd.runtime.poller import TokenPoller
from raypd.server.engine_loop import EngineLoop, Rejected, StreamTimeout
from raypd.server.metrics import FunctionCollector, StatusCollector, deployment_families, engine_families

_ids = itertools.count()
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    prompt: str | Sequence[int]  # text, or token ids (a list, or a protobuf repeated field)
    prompt_field: str  # "text" or "token_ids": named in error messages
    params: SamplingParams
    kv_compression: str | None = None
    request_id: str = ""  # the client's (engine.api.check_request_id); empty: the backend assigns one
    ttft_slo_s: float | None = None  # the first token must come within this (a client's deadline); None: no bound


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str = ""
    num_params: int = 0
    max_seq_len: int = 0
    has_tokenizer: bool = False

    @classmethod
    def of(cls, name: str, model, max_seq_len: int) -> "ModelCard":
        """From anything with `.config` and `.tokenizer` (a models.Model, a mock's namespace)."""
        cfg = model.config
        return cls(name, getattr(cfg, "architecture", ""), cfg.num_params() if hasattr(cfg, "num_params") else 0,
                   max_seq_len, model.tokenizer is not None)


def _encode(job: Job, model, max_seq_len: int) -> list[int]:
    check_sampling(job.params, model)
    return encode_prompt(job.prompt, model, max_seq_len, job.params.max_tokens, field=job.prompt_field)


# ---------------------------------------------------------------------------- local engine


class LocalStream:
    def __init__(self, loop: EngineLoop, stream, prompt_tokens: int):
        self._loop, self._stream, self.prompt_tokens = loop, stream, prompt_tokens
        self.request_id, self.submitted_s = stream.request_id, stream.submitted_s

    def get(self, timeout_s: float) -> TokenOutput:
        return self._stream.get(timeout_s)

    def watch(self, notify) -> None:
        """`notify()` from the engine loop's thread after each output (RequestStream.watch)."""
        self._stream.watch(notify)

    def abort(self) -> None:
        self._loop.abort(self.request_id, self._stream)  # this stream's request, not a later one with its id


class LocalEngineBackend:
    """The colocated engine of a LocalBackend; its loop thread runs between start() and stop()."""

    name = "local"
    submit_blocks = False  # submit only queues the request for the engine loop

    def __init__(self, local: LocalBackend, model_name: str, max_queued: int = 256):
        self.local = local
        self.model, self.max_seq_len = local.model, local.max_seq_len
        self.loop = EngineLoop(local.engine, max_queued=max_queued)
        self.card = ModelCard.of(model_name, local.model, local.max_seq_len)
        self._is_started = False

    def start(self, warmup: bool = True) -> None:
        """Compile every engine shape first (so no request waits on the compiler), then run."""
        if warmup:
            self.local.warmup()
        self.loop.start()
        self._is_started = True
        if warmup:  # one real request through the loop: its first pass through the Python path
            self._run_one(Request(f"warmup-{next(_ids)}", [3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True)))

    def _run_one(self, request: Request, timeout_s: float = 600.0) -> None:
        stream = self.loop.submit(request)
        deadline = time.monotonic() + timeout_s
        while not stream.get(max(0.0, deadline - time.monotonic())).is_finished:
            pass

    def is_ready(self) -> bool:
        """The engine loop is running (a health check asks this every few seconds)."""
        return self._is_started and self.loop.is_alive

    def stop(self) -> None:
        if self._is_started:
            self.loop.stop()
            self._is_started = False

    def submit(self, job: Job) -> LocalStream:
        ids = _encode(job, self.local.model, self.local.max_seq_len)
        request = Request(job.request_id or f"{SERVER_ID_PREFIX}{next(_ids)}", ids, job.params, kv_compression=job.kv_compression)
        return LocalStream(self.loop, self.loop.submit(request), len(ids))

    def submit_samples(self, job: Job, params: list[SamplingParams]) -> list[LocalStream]:
        """n samples of one prompt (`params[i]`: sample i's, with its own seed): prefilled once per
        up to `max_prefill_segments` samples, sharing the prompt's pages in decode. Either all
        are submitted or none (a later group refused: the earlier ones are aborted)."""
        checked = [_encode(dataclasses.replace(job, params=p), self.local.model, self.local.max_seq_len)
                   for p in params]
        ids = checked[0]
        per_prefill = self.local.engine.runner.config.max_prefill_segments
        streams: list[LocalStream] = []
        try:
            for lo in range(0, len(params), per_prefill):
                group = [Request(f"{SERVER_ID_PREFIX}{next(_ids)}", ids, p, kv_compression=job.kv_compression)
                         for p in params[lo:lo + per_prefill]]
                streams += [LocalStream(self.loop, s, len(ids)) for s in self.loop.submit_group(group)]
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams

    def server_info(self) -> dict:
        runner = self.local.engine.runner
        return dict(num_running=self.loop.num_active, num_pages_used=runner.allocator.num_used,
                    num_pages_total=runner.allocator.num_pages - 1, max_slots=runner.config.max_slots)

    def collector(self):
        return FunctionCollector(lambda: engine_families(self.local.engine))

    def stats(self) -> dict:
        engine = self.local.engine
        running = engine.decode_engine.num_running
        allocator = engine.runner.allocator
        return dict(num_running=running, num_queued=engine.num_unfinished - running,
                    num_pages_used=allocator.num_used, num_pages_total=allocator.num_pages - 1)


# ---------------------------------------------------------------------------- Ray deployment


class _Entries:
    """The poll entries of one request: the token poller's thread puts, the stream's reader gets;
    `notify` (when set) is called after each put, on the poller's thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.notify = None

    def put(self, item) -> None:
        self._queue.put(item)
        notify = self.notify
        if notify is not None:
            notify()

    def get(self, timeout_s: float):
        """-> the next entry; queue.Empty after `timeout_s` (0: at once) without one."""
        return self._queue.get(timeout_s > 0, timeout_s if timeout_s > 0 else None)


class RayStream:
    """Tokens of one request of a deployment, fetched from its scheduler as `get` asks for them.
    `request_id` is the one the client sees; `deployment_id` the one the scheduler knows."""

    def __init__(self, deployment, request_id: str, deployment_id: str, submitted_s: float, prompt_tokens: int,
                 on_end, poller: TokenPoller):
        self._deployment, self.request_id, self.submitted_s = deployment, request_id, submitted_s
        self._poller, self._entries = poller, poller.add(deployment_id, _Entries())
        self.deployment_id, self.prompt_tokens = deployment_id, prompt_tokens
        self._buffer: collections.deque[TokenOutput] = collections.deque()
        self._ended = False  # finished, failed or aborted: nothing more to fetch
        self._on_end = on_end
        self._lock = threading.Lock()
        self.metrics: dict = {}  # the scheduler's metrics of the request, once it finished

    def get(self, timeout_s: float) -> TokenOutput:
        """The next token output; waits at most `timeout_s` (0: takes only what has arrived)."""
        if not self._buffer and not self._ended:
            self._fetch(timeout_s)
        if not self._buffer:
            raise StreamTimeout(f"request {self.request_id}: no token within {timeout_s:.3f} s")
        return self._buffer.popleft()

    def watch(self, notify) -> None:
        """`notify()` from the token poller's thread after each poll entry for this request,
        and once now; the reader then takes the tokens with `get(0)`."""
        self._entries.notify = notify
        notify()

    def _fetch(self, timeout_s: float) -> None:
        try:
            _, entry = self._entries.get(timeout_s)
        except queue.Empty:
            return
        if self._ended:  # aborted while we waited
            return
        if entry["error"] is not None:
            self._end()
            raise errors.from_wire(entry["error"])
        self._buffer.extend(token_output(self.request_id, t) for t in entry["tokens"])
        if entry["finished"]:
            self.metrics = entry["metrics"]
            self._end()

    def _end(self) -> bool:
        with self._lock:
            was_ended, self._ended = self._ended, True
        if not was_ended:
            self._on_end()
        return not was_ended

    def abort(self) -> None:
        if self._end():
            self._poller.drop(self.deployment_id)
            _abort(self._deployment, self.deployment_id)


def _abort(deployment, request_id: str) -> None:
    try:
        deployment.abort([request_id])
    except errors.DeploymentNotRunning:
        pass


class RayBackend:
    """A running deployment. `model` (.config, .tokenizer) and `max_seq_len` let the endpoint
    check and tokenize prompts itself (the scheduler checks again); without them the
    scheduler's checks are all there is. `max_slots` and `num_pages_total` are reported by
    ServerInfo (0: unknown). At most `max_in_flight` requests at once, so that the gRPC threads
    are never all held by waiting streams."""

    name = "ray"
    submit_blocks = True  # submit waits for the scheduler actor's answer

    def __init__(self, deployment, model_name: str, model=None, max_seq_len: int = 0, *,
                 max_in_flight: int = 256, max_slots: int = 0, num_pages_total: int = 0,
                 status_timeout_s: float = 2.0):
        self.deployment, self.model, self.max_seq_len = deployment, model, max_seq_len
        self.card = ModelCard.of(model_name, model, max_seq_len) if model is not None else ModelCard(model_name)
        self.max_in_flight, self.max_slots, self.num_pages_total = max_in_flight, max_slots, num_pages_total
        self.status_timeout_s = status_timeout_s
        self._lock = threading.Lock()
        self._in_flight: set = set()  # client request ids in flight, and a placeholder for each unnamed one
        self._poller = TokenPoller(deployment.poll, name="raypd-grpc-poller")  # one poll for every stream
        self._max_samples: int | None = None  # samples per prefill (the deployment's info), fetched on first need

    def start(self, warmup: bool = True) -> None:
        """Warm the deployment's request path: the workers compiled their engines' shapes when
        they started (JaxEngineFactory.warmup); here one request per prefill length bucket, all
        at once, compiles what sits between them (K/V send and receive, local prefills on the
        decode workers, the decode batch sizes they reach)."""
        if not warmup:
            return
        info = self.deployment.info()
        lengths = warmup_lengths(info.get("prefill_buckets") or _buckets(info["max_seq_len"]), info["max_seq_len"])
        vocab = info["model"].config.vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, max(4, min(vocab, 259)), size=n).tolist() for n in lengths]
        from raypd.engine.api import SamplingParams

        with logs.progress("warming up the deployment", num_requests=len(prompts), prompt_lens=lengths):
            for _ in range(2):  # the second pass reaches the shapes of prefix hits on the first's pages
                ids = self.deployment.submit(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
                pending = set(ids)
                deadline = time.monotonic() + 1800.0
                while pending:
                    if time.monotonic() > deadline:
                        raise TimeoutError("deployment warm-up did not finish within 1800 s")
                    for rid, entry in self.deployment.poll(sorted(pending), 5.0).items():
                        if entry["error"] is not None:
                            raise errors.from_wire(entry["error"])
                        if entry["finished"]:
                            pending.discard(rid)
        self.deployment.clear_cache()  # the warm-up's random prompts are nobody's prefix

    def is_ready(self) -> bool:
        """The deployment can generate now (a health check asks this every few seconds)."""
        is_ready = getattr(self.deployment, "is_ready", None)
        return bool(is_ready(self.status_timeout_s)) if is_ready is not None else True

    def stop(self) -> None:
        """The deployment outlives the endpoint: whoever started it shuts it down."""
        self._poller.stop()

    def submit(self, job: Job) -> RayStream:
        if self.model is not None:
            prompt = _encode(job, self.model, self.max_seq_len)
        else:  # the scheduler checks it; it travels to the scheduler as a plain list or string
            prompt = job.prompt if isinstance(job.prompt, str) else list(job.prompt)
        with self._lock:
            if job.request_id in self._in_flight:
                raise errors.DuplicateRequestId(f"request_id {job.request_id!r} is already in flight")
            if len(self._in_flight) >= self.max_in_flight:
                raise Rejected(f"endpoint at capacity ({self.max_in_flight} requests in flight)", 1.0)
            key = job.request_id or object()  # the client's id, reserved now; else a placeholder
            self._in_flight.add(key)
        submitted_s = time.perf_counter()
        try:
            (rid,) = self.deployment.submit([prompt], job.params, job.ttft_slo_s, job.kv_compression)
        except errors.RequestRejected as e:
            self._release(key)
            raise Rejected(str(e), e.retry_after_s, reason=e.reason) from None
        except ValueError as e:  # the scheduler names the prompt "prompts[0]"; the client sent job.prompt_field
            self._release(key)
            raise ValueError(str(e).replace("prompts[0]", job.prompt_field)) from None
        except BaseException:
            self._release(key)
            raise
        n = len(prompt) if isinstance(prompt, list) else 0  # 0: tokenized by the deployment, count unknown
        return RayStream(self.deployment, job.request_id or f"{SERVER_ID_PREFIX}{rid}", rid, submitted_s, n,
                         on_end=lambda: self._release(key), poller=self._poller)

    def submit_samples(self, job: Job, params: list[SamplingParams]) -> list[RayStream]:
        """n samples of one prompt (`params[i]`: sample i's, with its own seed): prefilled once
        per up to the deployment's `max_samples` samples, the others forking from the first's
        K/V on one decode worker. Either all are submitted or none."""
        if self.model is not None:
            prompt = _encode(dataclasses.replace(job, params=params[0]), self.model, self.max_seq_len)
            for p in params[1:]:
                check_sampling(p, self.model)
        else:
            prompt = job.prompt if isinstance(job.prompt, str) else list(job.prompt)
        if self._max_samples is None:
            self._max_samples = int(self.deployment.info().get("max_samples", 1))
        keys = [object() for _ in params]
        with self._lock:
            if len(self._in_flight) + len(keys) > self.max_in_flight:
                raise Rejected(f"endpoint at capacity ({self.max_in_flight} requests in flight)", 1.0)
            self._in_flight.update(keys)
        n = len(prompt) if isinstance(prompt, list) else 0
        streams: list[RayStream] = []
        try:
            for lo in range(0, len(params), self._max_samples):
                submitted_s = time.perf_counter()
                ids = self.deployment.submit_samples(prompt, params[lo:lo + self._max_samples], job.ttft_slo_s,
                                                     job.kv_compression)
                for rid, key in zip(ids, keys[lo:]):
                    streams.append(RayStream(self.deployment, f"{SERVER_ID_PREFIX}{rid}", rid, submitted_s, n,
                                             on_end=lambda k=key: self._release(k), poller=self._poller))
        except errors.RequestRejected as e:
            self._undo(streams, keys)
            raise Rejected(str(e), e.retry_after_s, reason=e.reason) from None
        except ValueError as e:
            self._undo(streams, keys)
            raise ValueError(str(e).replace("prompts[0]", job.prompt_field)) from None
        except BaseException:
            self._undo(streams, keys)
            raise
        return streams

    def _undo(self, streams: list[RayStream], keys: list) -> None:
        """A refused submission: abort what it started, release every key it reserved."""
        for s in streams:
            s.abort()
        for k in keys:
            self._release(k)

    def _release(self, key) -> None:
        with self._lock:
            self._in_flight.discard(key)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def server_info(self) -> dict:
        s = self.deployment.status(timeout_s=self.status_timeout_s)
        if not self.num_pages_total:
            info = self.deployment.info()
            self.num_pages_total, self.max_slots = info["num_pages_total"], info["max_slots"]
        return dict(num_running=sum(w["num_running"] for w in s["decode"]),
                    num_pages_used=sum(sum(w["used_pages"]) for w in s["prefill"] + s["decode"]),
                    num_pages_total=self.num_pages_total, max_slots=self.max_slots)

    def collector(self):
        return StatusCollector(self.deployment.status, deployment_families, self.status_timeout_s)

    def stats(self) -> dict:
        s = self.deployment.status(timeout_s=self.status_timeout_s)
        return dict(num_running=sum(w["num_running"] for w in s["decode"]), num_queued=s["num_queued"],
                    num_pages_used=sum(sum(w["used_pages"]) for w in s["prefill"] + s["decode"]),
                    num_pages_total=self.num_pages_total or None, kv_hit_rate=round(s["index"]["hit_rate"], 3),
                    num_transfers=sum(t["count"] for t in s["transfer"]),
                    transfer_mb=round(sum(t["bytes"] for t in s["transfer"]) / 1e6, 1))


def _buckets(max_seq_len: int) -> list[int]:
    from raypd.engine.runner import EngineConfig

    return list(EngineConfig(max_seq_len=max_seq_len).prefill_buckets)


def warmup_lengths(prefill_buckets, max_seq_len: int) -> list[int]:
    """One prompt length per prefill bucket (its size, leaving room for 2 new tokens)."""
    return sorted({max(1, min(int(b), max_seq_len - 2)) for b in prefill_buckets})
