"""Moving token outputs from backend streams (blocking `get`) to the HTTP event loop.

Lifecycle of one HTTP request's streams (one per prompt and sample):
  1. The app submits its jobs to the backend (in a worker thread: a Ray submit blocks) and
     starts one `pump` per stream in the same thread pool.
  2. Each pump blocks on its stream's `get` for at most POLL_S at a time, takes whatever else
     has already arrived (one chunk), and hands it to the event loop (`call_soon_threadsafe`).
  3. `Choices.events()` yields (choice index, [TokenOutput]) on the event loop until every
     stream finished, or raises `ApiError` (504 past the deadline, 503 / 500 / 400 from the
     backend).
  4. `Choices.cancel()` (a client that went away, an error in another choice, the response
     done) makes each pump that is still running abort its stream, which frees its slot and
     pages. Pumps abort in their own thread: a Ray abort blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

from raypd.runtime.errors import DeploymentNotRunning, RequestFailed
from raypd.server.engine_loop import StreamTimeout
from raypd.server.openai_protocol import ApiError, from_value_error

POLL_S = 0.05  # how often a waiting pump checks for cancellation and its deadline


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

    def add(self, batch) -> None:
        for o in batch:
            if o.token_id < 0:  # an abort marker, not a token
                continue
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


def pump(stream, index: int, put, cancel: threading.Event, deadline: float) -> None:
    """Runs in a worker thread: outputs of `stream` -> put((index, batch | exception)) until it
    ends. A stream that did not finish is aborted here, whatever happened (even a `put` that
    fails because the event loop has closed)."""
    is_finished = False
    try:
        while not cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                put((index, ApiError(504, f"request {stream.request_id} did not finish before its deadline",
                                     None, "deadline_exceeded")))
                return
            try:
                batch = [stream.get(min(POLL_S, left))]
            except StreamTimeout:
                continue
            while not batch[-1].is_finished:  # whatever else has arrived: one chunk
                try:
                    batch.append(stream.get(0))
                except StreamTimeout:
                    break
            is_finished = batch[-1].is_finished
            put((index, batch))
            if is_finished:
                return
        put((index, ApiError(499, "the client went away", None, "cancelled")))  # whoever still waits stops
    except BaseException as e:  # noqa: BLE001 - handed to the event loop, which answers with it
        put((index, e))
    finally:
        if not is_finished:
            stream.abort()


class Choices:
    """The streams of one HTTP request, read on the event loop."""

    def __init__(self, streams: list, executor, timeout_s: float):
        self.items = [Choice(s) for s in streams]
        self._cancel = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        put = lambda item: loop.call_soon_threadsafe(self._queue.put_nowait, item)  # noqa: E731
        deadline = time.monotonic() + timeout_s
        for i, s in enumerate(streams):
            executor.submit(pump, s, i, put, self._cancel, deadline)

    def cancel(self) -> None:
        """Every stream not finished yet is aborted by its pump (within POLL_S)."""
        self._cancel.set()

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
