"""What the scheduler and the workers send each other (typed and small: page ids, handles and
token tuples, never K/V). No JAX and no Ray: the scheduler's process unpickles these.

  PrefillJob     scheduler -> prefill worker (or a decode worker's local prefill)
  PrefillResult  prefill worker -> scheduler
  DecodeReport   decode worker -> scheduler, one per `collect`
Tokens travel as `Token`s (scheduler/state.py, read by name); `token_of` and `token_output`
convert between them and the engines' `TokenOutput`.
"""

from __future__ import annotations

import dataclasses

from raypd.engine.api import PrefillOutput, Request, TokenOutput
from scheduler.state import Token


def token_of(o: TokenOutput) -> Token:
    """What crosses the wire of an engine's token (its request id is the key it travels under)."""
    return Token(token_id=o.token_id, logprob=o.logprob, finish_reason=o.finish_reason, text=o.text,
                 prompt_logprobs=o.prompt_logprobs, top_logprobs=o.top_logprobs)


def token_output(request_id: str, t: Token) -> TokenOutput:
    """A polled `Token` of `request_id` as the engines' TokenOutput (what local backends yield)."""
    return TokenOutput(request_id=request_id, token_id=t.token_id, logprob=t.logprob,
                       finish_reason=t.finish_reason, text=t.text, prompt_logprobs=t.prompt_logprobs,
                       top_logprobs=t.top_logprobs)


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

    tokens: dict[str, list[Token]] = dataclasses.field(default_factory=dict)  # rid -> its tokens, in order
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
