"""The scheduler core's tables: one `WorkerState` per live worker, one `RequestState` per request;
and `Token`, what the core receives from decode workers and hands to clients, token by token."""

from __future__ import annotations

import dataclasses

from scheduler.policy import Placement, RequestSpec

QUEUED, PREFILLING, HANDOFF, DECODING, ENDED = "queued", "prefilling", "handoff", "decoding", "ended"
PREFILL, DECODE = "prefill", "decode"


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """One generated token as it travels: decode worker -> scheduler (DecodeReport.tokens) ->
    client (`poll`). Fields by name only (not a tuple: a reader cannot index it by position).
    A request aborted on its worker ends with token_id -1."""

    token_id: int
    logprob: float
    finish_reason: str | None  # None while the request runs
    text: str  # text delta ("" without a tokenizer)
    prompt_logprobs: list[float] | None = None  # on a request's first token, when asked for
    top_logprobs: tuple | None = None  # ((token id, logprob), ...) when the request asked for them

    def __reduce__(self):
        """Pickled as its constructor's arguments: 3x faster than a slotted dataclass's default
        (every token crosses two process boundaries on its way to the client)."""
        return (Token, (self.token_id, self.logprob, self.finish_reason, self.text, self.prompt_logprobs,
                        self.top_logprobs))


@dataclasses.dataclass
class WorkerState:
    role: str  # PREFILL | DECODE
    max_pages: int
    max_slots: int = 0
    num_free_pages: int = 0  # as last reported (plus pages freed since)
    num_free_slots: int = 0  # decode: as last reported
    num_running: int = 0
    context_len: int = 0
    reserved: dict = dataclasses.field(default_factory=dict)  # rid -> pages a placed request will take (decode side)
    call_pages: dict = dataclasses.field(default_factory=dict)  # call id -> pages a prefill call will take
    queued_s: float = 0.0  # predicted prefill work sent and not returned
    backlog_bytes: int = 0  # K/V bytes placed to move out of / into this worker, not yet received
    slowdown: float = 1.0  # prefill calls: observed / predicted time (EWMA; core._observe_call_time)
    last_done_s: float = float("-inf")  # when its last prefill call returned

    num_reserved_pages: int = 0  # sum of `reserved` and `call_pages`, kept by the methods below

    def reserve(self, rid: str, num_pages: int) -> None:
        self.unreserve(rid)
        self.reserved[rid] = num_pages
        self.num_reserved_pages += num_pages

    def unreserve(self, rid: str) -> None:
        self.num_reserved_pages -= self.reserved.pop(rid, 0)

    def reserve_call(self, call_id: int, num_pages: int) -> None:
        self.call_pages[call_id] = num_pages
        self.num_reserved_pages += num_pages

    def unreserve_call(self, call_id: int) -> None:
        self.num_reserved_pages -= self.call_pages.pop(call_id, 0)


@dataclasses.dataclass
class RequestState:
    request: object  # raypd.engine.api.Request (request_id, prompt_ids, params.max_tokens, ...)
    spec: RequestSpec
    num_prompt_tokens: int  # of the original prompt (a resumed request's prompt is longer)
    max_tokens: int  # asked for originally
    phase: str = QUEUED
    placement: Placement | None = None
    tokens: list[Token] = dataclasses.field(default_factory=list)  # not yet polled
    generated: list[int] = dataclasses.field(default_factory=list)  # every token id so far
    error: tuple | None = None  # ("rejected" | "failed" | ..., message, ...) as raypd.runtime.errors.to_wire
    first_token_s: float | None = None
    num_computed_tokens: int | None = None
    timings: dict = dataclasses.field(default_factory=dict)  # queue_s, prefill_s, prefill_wait_s, transfer_s,
    # predicted_ttft_s
    retries: int = 0
    backlog: tuple | None = None  # (prefill worker, decode worker, bytes) in the transfer backlog
    transfer_id: str | None = None  # K/V on its way to the decode worker
    # The samples of one prompt (n > 1) sharing one prefill and one K/V transfer: their ids, the
    # one queued and placed first (the leader), the same list on each; None: a request alone.
    # A sample that ends or starts over leaves it (scheduler/groups.py).
    group: list[str] | None = None

    @property
    def is_finished(self) -> bool:
        return self.phase == ENDED
