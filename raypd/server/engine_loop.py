"""EngineLoop: one thread owns an engine; any thread submits, reads and aborts requests.

Lifecycle of a request:
  1. `submit(request)` (or `submit_group`: n samples of one prompt, prefilled once) checks the
     bounded queue (a full queue raises `Rejected` at once), then hands the request to the
     loop thread through a command queue.
  2. The loop thread adds it to the engine between steps and keeps calling `engine.step()`
     while anything is unfinished; each `TokenOutput` goes to its request's `RequestStream`,
     whose watcher (if any) is notified once per step, outside the loop's lock.
  3. The caller reads its stream (`RequestStream.get(timeout_s)`: every wait is bounded), or
     watches it and reads with `get(0)` when notified (the HTTP app's one reader).
  4. `abort(request_id)` (a cancelled RPC, an expired deadline) reaches the loop before its
     next step, and the engine frees the request's slot and pages there.
The engine is only ever touched by the loop thread, so it needs no locks.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from raypd.engine.api import Request, TokenOutput
from raypd.runtime.errors import DuplicateRequestId

log = logging.getLogger(__name__)


class Rejected(RuntimeError):
    """The request was refused before queuing (the server is at capacity). retry_after_s: a
    hint, None when retrying won't help; reason: why (a Ray scheduler's reject reason)."""

    def __init__(self, message: str, retry_after_s: float | None, reason: str = "capacity"):
        super().__init__(message)
        self.retry_after_s, self.reason = retry_after_s, reason


class StreamTimeout(TimeoutError):
    pass


@dataclasses.dataclass
class RequestStream:
    request_id: str
    submitted_s: float
    _queue: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    _notify: Callable[[], None] | None = None  # called by the loop thread after each put (see `watch`)

    def put(self, item: TokenOutput | BaseException, wake: bool = True) -> None:
        """The loop thread's side: one output (or the error that ends the stream); `wake`
        False leaves the notification to a later `wake()` (one per step, outside locks)."""
        self._queue.put(item)
        if wake:
            self.wake()

    def wake(self) -> None:
        notify = self._notify
        if notify is not None:
            notify()

    def watch(self, notify: Callable[[], None]) -> None:
        """Call `notify()` (from the loop thread; it must not block or raise) after every output
        from now on, and once now for what may have arrived already; the reader then takes the
        outputs with `get(0)`. One reader can so serve many streams without a thread each."""
        self._notify = notify
        notify()

    def get(self, timeout_s: float) -> TokenOutput:
        """The next token output; raises StreamTimeout after `timeout_s` without one."""
        try:
            item = self._queue.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            raise StreamTimeout(f"request {self.request_id}: no token within {timeout_s:.3f} s") from None
        if isinstance(item, BaseException):
            raise item
        return item


class EngineLoop:
    def __init__(self, engine, max_queued: int = 256, idle_wait_s: float = 0.02):
        self.engine = engine  # a ColocatedEngine (add_group / step / abort / num_unfinished)
        self.max_queued = max_queued
        self._idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._aborting: dict[str, int] = {}  # id -> aborts asked for and not yet done by the loop
        self._lock = threading.Lock()  # guards _streams between submitters and the loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raypd-engine-loop", daemon=True)
        self.num_steps = 0
        self.step_s_total = 0.0

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"engine loop did not stop within {timeout_s} s")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(self, request: Request) -> RequestStream:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[Request]) -> list[RequestStream]:
        """Requests with one prompt, prefilled once (`ColocatedEngine.add_group`): a stream each."""
        with self._lock:
            if len(self._streams) + len(requests) > self.max_queued:
                raise Rejected(f"server at capacity ({self.max_queued} requests in flight)", retry_after_s=1.0)
            ids = [r.request_id for r in requests]
            for rid in ids:
                if rid in self._streams or ids.count(rid) > 1:
                    raise DuplicateRequestId(f"request_id {rid!r} is already in flight")
            now = time.perf_counter()
            streams = [RequestStream(rid, now) for rid in ids]
            self._streams.update(zip(ids, streams))
            self._commands.put(("add", requests))  # under the lock: commands keep the order of the calls
        return streams

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Stop a request (with `stream`: only if that stream is still the one with this id: a
        late abort of an ended request must not hit a new one that reuses the id). The abort
        command is queued before the id is free again, so a new request with the same id
        (queued after it) is never the one aborted."""
        with self._lock:
            if stream is not None and self._streams.get(request_id) is not stream:
                return
            if self._streams.pop(request_id, None) is not None:
                self._aborting[request_id] = self._aborting.get(request_id, 0) + 1
                self._commands.put(("abort", request_id))

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.num_unfinished > 0
            try:
                cmd = self._commands.get(timeout=0 if busy else self._idle_wait_s)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._apply(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.num_unfinished:
                t = time.perf_counter()
                outs = self.engine.step()
                self.step_s_total += time.perf_counter() - t
                self.num_steps += 1
                self._dispatch(outs)
        for rid in list(self._streams):  # shutting down: free everything
            self.engine.abort(rid)

    def _apply(self, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            try:
                self.engine.add_group(arg)
            except ValueError as e:  # validated upstream; a late error still reaches the caller
                with self._lock:
                    streams = [self._streams.pop(r.request_id, None) for r in arg]
                for stream in streams:
                    if stream is not None:
                        stream.put(e)
        else:
            self.engine.abort(arg)
            with self._lock:  # from now on outputs with this id are a new request's
                if self._aborting[arg] <= 1:
                    del self._aborting[arg]
                else:
                    self._aborting[arg] -= 1

    def _dispatch(self, outs: list[TokenOutput]) -> None:
        touched: dict[int, RequestStream] = {}
        with self._lock:
            for o in outs:
                stream = self._streams.get(o.request_id)
                if stream is None or o.request_id in self._aborting:  # aborted while this step ran (a
                    continue  # new request may have taken the id already: these are not its tokens)
                stream.put(o, wake=False)
                touched[id(stream)] = stream
                if o.is_finished:
                    del self._streams[o.request_id]
        for stream in touched.values():  # once per stream and step, outside the lock
            stream.wake()
