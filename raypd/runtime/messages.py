"""What the scheduler and the workers send each other (typed and small: page ids, handles and
token tuples, never K/V). No JAX and no Ray: the scheduler's process unpickles these.

  PrefillJob     scheduler -> prefill worker (or a decode worker's local prefill)
  PrefillResult  prefill worker -> scheduler
  DecodeReport   decode worker -> scheduler, one per `collect`
Tokens travel as `(token id, logprob, finish reason or None, text delta, top logprobs or None)`
tuples (`Token`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from raypd.engine.api import PrefillOutput, Request


class Token(NamedTuple):
    token_id: int
    logprob: float
    finish_reason: str | None
    text: str
    prompt_logprobs: list[float] | None = None  # on a request's first token, when asked for (TokenOutput's)
    top_logprobs: tuple | None = None  # ((token id, logprob), ...) when the request asked for them


@dataclasses.dataclass
class PrefillJob:
    """Scheduler -> worker: one request and the worker's pages holding its cached prefix."""

    request: Request
    prefix_pages: list[int] = dataclasses.field(default_factory=list)
    retain: bool = True  # keep the new full prompt pages for the KV index
    # Host copies of the pages right after `prefix_pages`, in order: (payload, page positions in
    # it). A payload is an EncodedKV or a reference the worker's `fetch` resolves (a Ray
    # ObjectRef in a deployment). Fetched pages join the prefix; if a fetch fails they are computed.
    host_prefix: list[tuple[object, list[int]]] = dataclasses.field(default_factory=list)
    # Layer streaming: the decode worker (an actor handle) that receives this request's K/V
    # layer group by layer group while the prefill runs (`DecodeWorker.receive_parts`); None:
    # the whole K/V is sent after the prefill.
    stream_to: object = None
    # More samples of the same prompt (n > 1): prefilled once with `request`, each with its own
    # first token (`PrefillResult.sample_outputs`); its K/V is sent once, for all of them.
    samples: tuple[Request, ...] = ()


@dataclasses.dataclass
class PrefillResult:
    """Worker -> scheduler. Small: page ids and a transfer handle, never K/V."""

    output: PrefillOutput  # .pages emptied (they are the sender's business)
    handle: object | None  # TransferHandle (num_parts > 0: layer-streamed); None when prefilled on the decode worker itself
    cached_pages: list[int]  # retained full prompt pages after the worker's own prefix, in order
    num_prefix_pages: int  # leading pages reused from the worker's own pool
    num_computed_tokens: int
    prefill_s: float
    num_fetched_pages: int = 0  # pages after the own prefix loaded from host copies
    sample_outputs: list[PrefillOutput] = dataclasses.field(default_factory=list)  # the job's samples', in order


@dataclasses.dataclass
class DecodeReport:
    """Decode worker -> scheduler, one per `collect`: everything since the last one."""

    tokens: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)  # rid -> [(id, logprob, finish, text)]
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # rid -> message (request ended)
    retryable: list[str] = dataclasses.field(default_factory=list)  # of those, K/V lost in transfer: retry
    started: list[str] = dataclasses.field(default_factory=list)  # rids inserted (or failed) since
    received: list = dataclasses.field(default_factory=list)  # (TransferHandle, recv seconds) now in the pool
    prefilled: list[PrefillResult] = dataclasses.field(default_factory=list)  # local prefills
    finished: list[tuple] = dataclasses.field(default_factory=list)  # (rid, token ids, retained pages)
    freed: list[int] = dataclasses.field(default_factory=list)  # pages `free_pages` released
    num_free_pages: int = 0
    num_free_slots: int = 0
    num_running: int = 0
    context_len: int = 0

    def is_empty(self) -> bool:
        return not (self.tokens or self.errors or self.started or self.received or self.prefilled
                    or self.freed or self.finished)
