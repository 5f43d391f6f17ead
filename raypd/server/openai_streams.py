"""Moving token outputs from backend streams to the HTTP event loop: one reader for them all.

Lifecycle of one HTTP request's streams (one per prompt and sample):
  1. The app submits its jobs to the backend (in a worker thread: a Ray submit blocks) and
     `Choices` asks each stream to `watch`: the producer of its outputs (the engine loop's
     thread, or the token poller's thread of a Ray deployment) calls a notification after
     each output, which must not block.
  2. The notification goes to the server's one `Reader`: it records which stream has news and
     wakes the event loop once for however many notifications arrive before it runs (one
     wake-up per engine step or per poll, not one per token or per stream).
  3. On the event loop the reader takes everything each notified stream has (`get(0)`, never
     blocking) as one batch and hands (choice index, [TokenOutput]) to that request's
     `Choices`; `Choices.events()` yields them until every stream finished, or raises
     `ApiError` (504 past the deadline, one timer per request; 503 / 500 / 400 from the backend).
  4. `Choices.cancel()` (a client that went away, an error in another choice, the response
     done) aborts every stream not finished yet, in a worker thread (a Ray abort blocks),
     which frees its slot and pages.
No thread waits on any one stream, so the cost per token is one notification and a share of
one event-loop wake-up, whatever the number of streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import logging
import time

from raypd.runtime.errors import DeploymentNotRunning, RequestFailed
from raypd.server.engine_loop import StreamTimeout
from raypd.server.openai_protocol import ApiError, from_value_error

log = logging.getLogger(__name__)

def as_api_error(e: BaseException, param: str | None = None) -> ApiError:
    """What a backend raised (at submit or while streaming), as the HTTP error to answer."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError):
        return from_value_error(e, param)
    if isinstance(e, DeploymentNotRunning):
        return ApiError(503, f"no worker can serve: {e}", None, "not_running")
    if isinstance(e, RequestFailed):
        return ApiError(500, f"the request failed in a worker: {e}", None, "request_failed")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal")


@dataclasses.dataclass
class Choice:
    """What one stream produced so far."""

    stream: object
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)  # per token: ((id, logprob), ...) or None
    texts: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    first_s: float | None = None
    end_s: float | None = None
    prompt_logprobs: list[float] | None = None  # with echo and logprobs: from the first token's output

    def add(self, batch) -> None:
        for o in batch:
            if o.token_id < 0:  # an abort marker, not a token
                continue
            if o.prompt_logprobs is not None:
                self.prompt_logprobs = list(o.prompt_logprobs)
            self.token_ids.append(o.token_id)
            self.logprobs.append(o.logprob)
            self.top_logprobs.append(o.top_logprobs)
            self.texts.append(o.text)
        self.finish_reason = batch[-1].finish_reason or self.finish_reason
        now = time.perf_counter()
        self.first_s = self.first_s or now
        if self.finish_reason is not None:
            self.end_s = now

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Reader:
    """Runs callbacks on an event loop on behalf of other threads, one wake-up per burst:
    `notify(fn)` (any thread, never blocks or raises) queues `fn`, and the first notification
    since the loop last ran them schedules one run of every callback queued by then (each
    distinct callback once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list = []
        self._is_scheduled = False

    def notify(self, fn) -> None:
        with self._lock:
            self._ready.append(fn)
            if self._is_scheduled:
                return
            self._is_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop has closed: nobody is left to read
            pass

    def _run(self) -> None:
        with self._lock:
            ready, self._ready, self._is_scheduled = self._ready, [], False
        seen = set()
        for fn in ready:
            if id(fn) not in seen:
                seen.add(id(fn))
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one failing reader must not starve the others
                    log.exception("a stream reader failed")


class Choices:
    """The streams of one HTTP request, read on the event loop by the server's `Reader`."""

    def __init__(self, streams: list, reader: Reader, executor, timeout_s: float):
        self.items = [Choice(s) for s in streams]
        self._executor = executor
        self._queue: asyncio.Queue = asyncio.Queue()
        self._is_done = [False] * len(streams)  # its last output was read
        self._is_cancelled = False
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)
        for i, s in enumerate(streams):
            read = lambda i=i: self._read(i)  # noqa: E731 - one callable per stream: the reader dedups by it
            s.watch(lambda read=read: reader.notify(read))

    def _read(self, index: int) -> None:
        """On the event loop: everything stream `index` has now, as one batch."""
        if self._is_cancelled or self._is_done[index]:
            return
        stream, batch = self.items[index].stream, []
        try:
            while not batch or not batch[-1].is_finished:
                batch.append(stream.get(0))
        except StreamTimeout:
            pass
        except BaseException as e:  # noqa: BLE001 - answered by the consumer of events()
            self._is_done[index] = True
            self._queue.put_nowait((index, e))
            return
        if batch:
            self._is_done[index] = batch[-1].is_finished
            self._queue.put_nowait((index, batch))

    def _expire(self) -> None:
        ids = [c.stream.request_id for c, done in zip(self.items, self._is_done) if not done]
        self._queue.put_nowait((-1, ApiError(504, f"request {', '.join(ids)} did not finish before its deadline",
                                             None, "deadline_exceeded")))

    def cancel(self) -> None:
        """Every stream not finished yet is aborted (in a worker thread); events() ends."""
        if self._is_cancelled:
            return
        self._is_cancelled = True
        self._timer.cancel()
        for c, done in zip(self.items, self._is_done):
            if not done:
                _abort_soon(self._executor, c.stream)
        self._queue.put_nowait((-1, ApiError(499, "the client went away", None, "cancelled")))

    async def events(self):
        """(index, batch) as outputs arrive, until all finished; ApiError on the first failure."""
        pending = len(self.items)
        try:
            while pending:
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                self.items[index].add(item)
                if item[-1].is_finished:
                    pending -= 1
                yield index, item
        finally:
            self.cancel()


def _abort_soon(executor, stream) -> None:
    try:
        executor.submit(stream.abort)
    except RuntimeError:  # the executor has shut down (the server is closing): abort here
        stream.abort()
