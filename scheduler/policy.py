"""Placement and admission: pure functions of a snapshot of the workers (time passed in).

Lifecycle of a request through the scheduler (the Ray actor calls these; they decide, it acts):
  1. Arrival: `admit(request, num_queued, config, prefill_states)` -> a `Rejection`
     (QUEUE_FULL) at once, or None and the request joins the scheduler's bounded queue.
  2. Snapshot: for the request at the head of the queue the actor asks the KV index
     (`scheduler.kv_index.KVIndex.match_prefix`) how many leading pages each worker holds and
     builds `PrefillWorkerState` / `DecodeWorkerState` / `TransferState`.
  3. `place(request, prefill_states, decode_states, cost, now_s, config, transfer)` ->
     - `Rejection` with a typed `RejectReason`, the predicted TTFT and a retry-after hint:
       no live decode worker (NO_WORKERS), none could ever hold the request (NO_CAPACITY), or
       the predicted TTFT misses the request's TTFT SLO (DEADLINE);
     - `Wait`: decode workers could hold it, but none has room (pages, a slot, TPOT headroom)
       now; it stays queued and is placed again on the next snapshot;
     - `Placement`: the decode worker (`place_decode`: among those with room and whose
       predicted TPOT with one more request meets the target, the most free pages), then the
       prefill worker: the decode worker itself when the uncached part of the prompt is at
       most `config.local_prefill_max_len` (conditional disaggregation), else the prefill
       worker with the least estimated TTFT (`place_prefill`), which naturally prefers workers
       holding the prefix.
  4. The actor pins the prefix in the index, runs prefill, moves the K/V, inserts into the
     decode worker; on finish it publishes the request's pages to the index.

TTFT estimate on a prefill worker (seconds from now; `predict_ttft_s`, the one prediction that
admission and placement both use):
    queue_s    predicted prefill work already queued on the worker (at admission: the later
               of a decode slot coming free and the prefill work ahead, `predict_queue_waits`)
  + fetch_s    host copies (object store) of prefix pages the worker's pool lacks, if used
  + prefill_s  prefill of the uncached tokens after the reused prefix (cost model)
  + transfer_s K/V of the whole prompt to the decode worker behind the transfer backlog
The last three are scaled by the worker's observed pace (observed / predicted call time).
A prefix may cover at most (prompt_len - 1) // G pages: the engine computes the last token.
Admission admits a request predicted to take at most (1 - `admission_headroom`) x its TTFT
SLO; placement refuses one (DEADLINE) only past the SLO itself, so what admission let in is
refused later only when the world changed by more than the headroom (a worker died, the
pace dropped), not for the prediction's ordinary error.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from typing import Mapping, Sequence

from scheduler.cost_model import CostModel


class RejectReason(enum.Enum):
    QUEUE_FULL = "queue_full"  # the scheduler's bounded queue is full
    DEADLINE = "deadline"  # the predicted TTFT misses the request's TTFT SLO
    NO_CAPACITY = "no_capacity"  # no live decode worker could ever hold the request
    NO_WORKERS = "no_workers"  # no live decode worker at all


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_len: int
    max_tokens: int
    page_size: int  # G
    arrival_s: float
    ttft_slo_s: float | None = None  # None: no TTFT deadline
    tpot_slo_s: float | None = None  # None: the config's default target
    num_host_pages: int = 0  # leading prompt pages held as host copies (index match)
    num_samples: int = 1  # samples of the prompt sharing one prefill (n > 1), each with max_tokens

    def __post_init__(self):
        if self.prompt_len < 1 or self.max_tokens < 1 or self.page_size < 1 or self.num_samples < 1:
            raise ValueError(f"need prompt_len, max_tokens, page_size and num_samples >= 1: {self}")

    @property
    def num_pages_needed(self) -> int:
        """Pages a decode worker reserves for the request: prompt plus every new token; each
        more sample shares the prompt's full pages and needs the rest (DecodeEngine.fork)."""
        per_sample = -(-(self.prompt_len + self.max_tokens) // self.page_size)
        return per_sample + (self.num_samples - 1) * (per_sample - self.prompt_len // self.page_size)

    @property
    def max_cached_pages(self) -> int:
        return max(0, self.prompt_len - 1) // self.page_size


@dataclasses.dataclass(frozen=True)
class PrefillWorkerState:
    worker_id: str
    queued_s: float = 0.0  # predicted seconds of prefill work already queued on the worker
    num_queued_tokens: int = 0  # uncached tokens queued (for logs; queued_s is what counts)
    num_cached_pages: int = 0  # leading pages of this prompt in the worker's pool (index match)
    is_alive: bool = True
    pace: float = 1.0  # observed / predicted time of its calls: scales this request's own parts


@dataclasses.dataclass(frozen=True)
class DecodeWorkerState:
    worker_id: str
    num_free_slots: int
    num_free_pages: int
    max_pages: int  # pages of the pool a request could ever get (capacity)
    num_running: int = 0
    context_len: int = 0  # tokens of K/V over all running slots
    num_cached_pages: int = 0  # leading pages of this prompt in the worker's pool (local prefill)
    is_alive: bool = True
    queued_prefill_s: float = 0.0  # predicted local prefill work already queued on the worker


@dataclasses.dataclass(frozen=True)
class TransferState:
    """K/V bytes queued or in flight per worker: out of a prefill worker, into a decode worker."""

    backlog_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def backlog_between(self, src: str, dst: str | None) -> int:
        """The busier end bounds the link: max of the two backlogs."""
        return max(self.backlog_bytes.get(src, 0), self.backlog_bytes.get(dst, 0) if dst else 0)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    max_queued: int = 256  # bound of the scheduler's queue
    local_prefill_max_len: int = 64  # uncached tokens up to this prefill on the decode worker
    tpot_slo_s: float | None = None  # default TPOT target (None: no TPOT filter)
    min_retry_after_s: float = 0.1  # floor of every retry-after hint
    # Fraction of a TTFT SLO that admission keeps for the prediction's error (a loaded machine's
    # stalls, report lag): it admits up to (1 - admission_headroom) x SLO, placement refuses past the SLO.
    admission_headroom: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.admission_headroom < 1.0:
            raise ValueError(f"admission_headroom must be in [0, 1), got {self.admission_headroom}")


@dataclasses.dataclass(frozen=True)
class PrefillEstimate:
    worker_id: str
    num_cached_pages: int  # prompt pages reused (from the pool, or fetched from host copies)
    num_fetched_pages: int  # of those, pages fetched from host copies
    uncached_len: int  # prompt tokens to compute
    queue_s: float
    fetch_s: float
    prefill_s: float
    transfer_s: float

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.fetch_s + self.prefill_s + self.transfer_s


@dataclasses.dataclass(frozen=True)
class PrefillDecision:
    worker_id: str
    ttft_s: float  # predicted TTFT since arrival
    estimate: PrefillEstimate  # the chosen worker's
    estimates: tuple[PrefillEstimate, ...]  # every live worker's, by worker id


@dataclasses.dataclass(frozen=True)
class DecodeDecision:
    worker_id: str
    tpot_s: float  # predicted step time with this request added
    num_pages_needed: int


@dataclasses.dataclass(frozen=True)
class Placement:
    request_id: str
    prefill_worker_id: str  # == decode_worker_id when is_local_prefill
    decode_worker_id: str
    is_local_prefill: bool
    num_cached_pages: int
    num_fetched_pages: int
    uncached_len: int
    ttft_s: float  # predicted, since arrival
    tpot_s: float
    estimates: tuple[PrefillEstimate, ...]


@dataclasses.dataclass(frozen=True)
class Rejection:
    request_id: str
    reason: RejectReason
    message: str
    ttft_s: float | None = None  # predicted TTFT since arrival, when known
    retry_after_s: float | None = None  # None: retrying will not help


@dataclasses.dataclass(frozen=True)
class Wait:
    request_id: str
    ttft_s: float  # predicted TTFT since arrival before any wait for decode room
    estimate: PrefillEstimate | None = None  # the best prefill worker's, if any


def estimate_prefill(request: RequestSpec, state: PrefillWorkerState, cost: CostModel,
                     transfer: TransferState, decode_worker_id: str | None) -> PrefillEstimate:
    """TTFT parts of running this request's prefill on `state`'s worker (see module doc)."""
    G = request.page_size
    in_pool = min(state.num_cached_pages, request.max_cached_pages)
    on_host = min(request.num_host_pages, request.max_cached_pages)
    fetched = on_host - in_pool if on_host > in_pool else 0
    fetch_s = cost.predict_transfer_s(cost.kv_bytes(fetched * G))
    if fetched and fetch_s >= cost.predict_prefill_s(fetched * G, in_pool * G):
        fetched, fetch_s = 0, 0.0  # computing those pages is no slower than fetching them
    cached = in_pool + fetched
    uncached = request.prompt_len - cached * G
    transfer_s = 0.0
    if decode_worker_id != state.worker_id:
        backlog = transfer.backlog_between(state.worker_id, decode_worker_id)
        transfer_s = cost.predict_transfer_s(backlog + cost.kv_bytes(request.prompt_len))
    pace = state.pace
    return PrefillEstimate(state.worker_id, cached, fetched, uncached, state.queued_s, pace * fetch_s,
                           pace * cost.predict_prefill_s(uncached, cached * G), pace * transfer_s)


def predict_ttft_s(request: RequestSpec, now_s: float, estimate: PrefillEstimate,
                   turn_s: float | None = None) -> float:
    """The predicted TTFT since arrival, the same for admission and placement: the time waited
    so far, then the wait for its turn, then its own fetch, prefill and K/V send (`estimate`).
    Its turn: once placed (`turn_s` None), the work queued on its prefill worker
    (`estimate.queue_s`); at admission, `predict_queue_waits`'s later of a decode slot coming free
    and the prefill work ahead of it being done, which is what that queue will hold then."""
    wait_s = estimate.queue_s if turn_s is None else turn_s
    return now_s - request.arrival_s + wait_s + estimate.fetch_s + estimate.prefill_s + estimate.transfer_s


def place_prefill(request: RequestSpec, prefill_states: Sequence[PrefillWorkerState], cost: CostModel,
                  now_s: float, transfer: TransferState = TransferState(),
                  decode_worker_id: str | None = None) -> PrefillDecision | None:
    """The live prefill worker with the least estimated TTFT (ties: worker id); None if none."""
    estimates = tuple(estimate_prefill(request, s, cost, transfer, decode_worker_id)
                      for s in sorted(prefill_states, key=lambda s: s.worker_id) if s.is_alive)
    if not estimates:
        return None
    best = min(estimates, key=lambda e: (e.ttft_s, e.worker_id))
    return PrefillDecision(best.worker_id, predict_ttft_s(request, now_s, best), best, estimates)


def can_ever_fit(request: RequestSpec, state: DecodeWorkerState) -> bool:
    return state.is_alive and request.num_pages_needed <= state.max_pages


def predict_tpot_s(request: RequestSpec, state: DecodeWorkerState, cost: CostModel) -> float:
    """Step time of `state`'s worker with this request added (its prompt as new context)."""
    return cost.predict_decode_step_s(state.num_running + request.num_samples,
                                      state.context_len + request.num_samples * request.prompt_len)


def place_decode(request: RequestSpec, decode_states: Sequence[DecodeWorkerState], cost: CostModel,
                 config: PolicyConfig = PolicyConfig()) -> DecodeDecision | None:
    """Among live workers with a free slot, enough free pages and, with one more request, a
    predicted TPOT within the target: the most free pages (ties: fewer running, worker id).
    None when no worker has room now."""
    target = request.tpot_slo_s if request.tpot_slo_s is not None else config.tpot_slo_s
    need = request.num_pages_needed
    fits = [(s, predict_tpot_s(request, s, cost)) for s in decode_states
            if s.is_alive and s.num_free_slots >= request.num_samples and s.num_free_pages >= need]
    fits = [(s, t) for s, t in fits if target is None or t <= target]
    if not fits:
        return None
    s, t = min(fits, key=lambda st: (-st[0].num_free_pages, st[0].num_running, st[0].worker_id))
    return DecodeDecision(s.worker_id, t, need)


def admit(request: RequestSpec, num_queued: int, config: PolicyConfig = PolicyConfig(),
          prefill_states: Sequence[PrefillWorkerState] = ()) -> Rejection | None:
    """At arrival: QUEUE_FULL when the scheduler's queue holds `config.max_queued` requests.
    Retry after the least queued prefill work of a live worker (or the floor)."""
    if num_queued < config.max_queued:
        return None
    queued = [s.queued_s for s in prefill_states if s.is_alive]
    return Rejection(request.request_id, RejectReason.QUEUE_FULL,
                     f"scheduler queue is full ({num_queued} of {config.max_queued} requests)",
                     retry_after_s=max(config.min_retry_after_s, min(queued, default=0.0)))


def place(request: RequestSpec, prefill_states: Sequence[PrefillWorkerState],
          decode_states: Sequence[DecodeWorkerState], cost: CostModel, now_s: float,
          config: PolicyConfig = PolicyConfig(),
          transfer: TransferState = TransferState()) -> Placement | Rejection | Wait:
    """Place a queued request: decode worker first, then where its prefill runs (module doc)."""
    rid = request.request_id
    live = [s for s in decode_states if s.is_alive]
    if not live:
        return Rejection(rid, RejectReason.NO_WORKERS, "no live decode worker",
                         retry_after_s=config.min_retry_after_s)
    if not any(can_ever_fit(request, s) for s in live):
        return Rejection(rid, RejectReason.NO_CAPACITY,
                         f"needs {request.num_pages_needed} pages (prompt {request.prompt_len} + "
                         f"max_tokens {request.max_tokens}); the largest decode pool has "
                         f"{max(s.max_pages for s in live)}")
    decode = place_decode(request, live, cost, config)
    if decode is None:
        best = place_prefill(request, prefill_states, cost, now_s, transfer)
        bound = best.ttft_s if best else now_s - request.arrival_s
        return _late(request, bound, config) or Wait(rid, bound, best.estimate if best else None)
    d = next(s for s in live if s.worker_id == decode.worker_id)
    local = estimate_prefill(request, PrefillWorkerState(d.worker_id, num_cached_pages=d.num_cached_pages),
                             cost, transfer, d.worker_id)
    local = dataclasses.replace(local, queue_s=cost.predict_decode_step_s(d.num_running, d.context_len)
                                + d.queued_prefill_s)
    remote = None
    if local.uncached_len > config.local_prefill_max_len:
        remote = place_prefill(request, prefill_states, cost, now_s, transfer, d.worker_id)
    chosen = remote.estimate if remote else local  # no live prefill worker: prefill locally
    ttft_s = predict_ttft_s(request, now_s, chosen)
    late = _late(request, ttft_s, config)
    if late:
        return late
    return Placement(rid, chosen.worker_id, d.worker_id, remote is None, chosen.num_cached_pages,
                     chosen.num_fetched_pages, chosen.uncached_len, ttft_s, decode.tpot_s,
                     remote.estimates if remote else (local,))


def _late(request: RequestSpec, ttft_s: float, config: PolicyConfig, headroom: float = 0.0) -> Rejection | None:
    """DEADLINE when the predicted TTFT since arrival exceeds (1 - headroom) x the TTFT SLO."""
    if request.ttft_slo_s is None:
        return None
    limit_s = (1.0 - headroom) * request.ttft_slo_s
    if ttft_s <= limit_s:
        return None
    what = "the SLO" if not headroom else f"{100 * (1 - headroom):g}% of the SLO"
    return Rejection(request.request_id, RejectReason.DEADLINE,
                     f"predicted TTFT {ttft_s * 1e3:.1f} ms exceeds {what} {request.ttft_slo_s * 1e3:.1f} ms",
                     ttft_s=ttft_s, retry_after_s=max(config.min_retry_after_s, ttft_s - limit_s))


def predict_queue_waits(slot_free_s: Sequence[float], queue: Sequence[tuple[float, int]], step_s: float,
                        num_prefill_workers: int = 1, prefill_backlog_s: float = 0.0) -> list[float]:
    """Seconds until each queued request could start its own prefill, in FIFO order: the later
    of a decode slot coming free and the prefill work ahead of it being done.

    slot_free_s: for every decode slot of every live worker, seconds until it is free (0 for a
    free one; a running request's remaining tokens x `step_s`); queue: (prefill seconds,
    max_tokens) of each queued request, head first. Each request takes the earliest free slot
    and holds it for its prefill and its tokens. `prefill_backlog_s`: prefill work already sent
    to the prefill workers (all of them together), which every queued prefill waits behind. No
    slot at all: infinity for every one."""
    heap = list(slot_free_s)
    if not heap:
        return [float("inf")] * len(queue)
    heapq.heapify(heap)
    waits, prefill_ahead_s = [], prefill_backlog_s
    for prefill_s, max_tokens in queue:
        waits.append(max(heap[0], prefill_ahead_s / max(1, num_prefill_workers)))
        t = heapq.heappop(heap)
        heapq.heappush(heap, t + prefill_s + max_tokens * step_s)
        prefill_ahead_s += prefill_s
    return waits


def admit_deadline(request: RequestSpec, ttft_s: float, config: PolicyConfig = PolicyConfig()) -> Rejection | None:
    """At arrival, for a request with a TTFT SLO: DEADLINE when its predicted TTFT
    (`predict_ttft_s` with its turn from `predict_queue_waits`) is past (1 -
    `config.admission_headroom`) x the SLO: the headroom is what placement, which refuses only
    past the SLO, has for the prediction's error."""
    return _late(request, ttft_s, config, config.admission_headroom)
