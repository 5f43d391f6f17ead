"""The scheduler as a state machine: every method is an event (with `now_s`) and returns the
actions to carry out. No Ray, threads or asyncio: the Ray actor (raypd/runtime/scheduler_actor.py)
turns actions into calls and call results into events; a simulator can drive the same object
on a virtual clock.

Lifecycle of a request (`phase`):
  queued     `submit`: admitted (bounded queue) and queued FIFO. Every event ends by placing
             queued requests (`_dispatch`, policy.place): Wait keeps the head queued, a
             Rejection ends it, a Placement pins its cached prefix, reserves pages and a slot
             and sends it to a prefill worker (`RunPrefill`) or, for a short uncached prompt,
             to its decode worker (`RunLocalPrefill`).
  prefilling the prefill runs. Its call (`_Call`) holds the pins, the prefill worker's page
             reservation and its share of that worker's queue; the call ends when its result
             comes back (`prefill_done`, or a decode report for a local prefill), whatever
             became of the request meanwhile: the new pages are published to the KV store
             and the pins released.
  handoff    a remote prefill is done: the first token is known and the K/V is on its way
             (`Insert` to the decode worker); the request counts in the transfer backlog
             until the decode worker reports it received.
  decoding   the decode worker reported it started (`decode_report`): its reservation is
             now real pages there. Tokens accumulate until a client `poll` takes them.
  ended      finished, failed, rejected or aborted: `_end` releases what the request holds
             (reservations, backlog, a transfer in flight), once. A finished request's full
             pages are published on its decode worker for the next turn.
The core is split by responsibility: `scheduler/placement_view.py` (worker snapshots for the
policy, placement candidates, predicted waits; reads only), `scheduler/membership.py`
(deaths, replacements, role moves) and `scheduler/groups.py` (the n samples of one prompt:
one prefill, one transfer) are mixins of `SchedulerCore`.
Failover: a worker that died (`worker_died`, or `prefill_done` with `lost=True`) leaves
placement and the store, and its requests go back to the head of the queue (`_retry`); a
request with tokens resumes from prompt + tokens so far. A K/V transfer the decode worker
could not receive asks for a liveness probe of its sender (`ProbeWorker`), then retries.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict, deque
from typing import Sequence

from scheduler.cost_model import CostModel
from scheduler.groups import Groups
from scheduler.kv_store import FreePages, KVStore
from scheduler.membership import Membership
from scheduler.placement_view import MAX_CANDIDATES, PlacementView  # noqa: F401 - MAX_CANDIDATES re-exported
from scheduler.policy import (Placement, PolicyConfig, Rejection, RequestSpec, admit, admit_deadline,
                             predict_ttft_s)
from scheduler.actions import (AbortOnWorker, Action, Insert, PrefillTask, ProbeWorker,  # noqa: F401 - re-exported
                               ReleaseTransfers, ReplaceWorker, RetireWorker, RunLocalPrefill, RunPrefill)
from scheduler.state import (DECODE, DECODING, ENDED, HANDOFF, PREFILL, PREFILLING, QUEUED,  # noqa: F401
                             RequestState, WorkerState)


@dataclasses.dataclass
class _Call:
    """A prefill under way on `worker` (remote, or local on a decode worker)."""

    call_id: int
    request_id: str
    worker: str
    placement: Placement
    prompt_ids: list[int]
    pins: list[int]
    own_pages: list[int]
    estimate_s: float  # the worker's time on it, at its pace when sent (what `queued_s` counts)
    sent_s: float
    predicted_s: float = 0.0  # the same by the cost model alone (what the pace is measured against)
    group: list[str] | None = None  # the request's group (n samples, scheduler/groups.py), if any


def _rejected(r: Rejection) -> tuple:
    return ("rejected", f"request rejected ({r.reason.value}): {r.message}", r.reason.value, r.ttft_s,
            r.retry_after_s)


SLOWDOWN_RANGE = (0.25, 20.0)  # bounds of a worker's observed / predicted prefill-call time


class SchedulerCore(PlacementView, Membership, Groups):
    def __init__(self, name: str, workers: dict[str, WorkerState], store: KVStore, cost: CostModel,
                 policy: PolicyConfig = PolicyConfig(), max_retries: int = 2, stream_layers: bool = False,
                 max_replacements: int = 0):
        self.name = name
        self.workers = dict(workers)  # live workers only
        self._by_role: dict[str, list[str]] | None = None  # `_of`'s cache
        self.store, self.cost, self.policy = store, cost, policy
        self.page_size = store.page_size
        self.max_retries, self.stream_layers = max_retries, stream_layers
        self.requests: dict[str, RequestState] = {}
        self.news: set[str] = set()  # requests with tokens or an end not yet polled
        self.queue: deque[str] = deque()
        self.calls: dict[int, _Call] = {}
        self.local_calls: dict[tuple[str, str], int] = {}  # (decode worker, rid) -> call id
        self.transfers: dict[str, tuple] = {}  # transfer id -> (rid, sender, handle, receiver)
        self.dead: dict[str, str] = {}  # worker -> why it left
        self.joining: dict[str, str] = {}  # replacement worker -> role, until it joins or fails
        self.draining: dict[str, str] = {}  # worker -> the role it moves to once nothing is left on it
        self.retired: dict[str, str] = {}  # drained worker -> the worker that took its place
        self.max_replacements, self.num_replacements = max_replacements, 0
        self._num_ever = {role: sum(1 for s in workers.values() if s.role == role) for role in (PREFILL, DECODE)}
        self.is_running = True
        self.rejections: dict[str, int] = defaultdict(int)  # reason -> count
        self.transfer_stats = defaultdict(lambda: dict(count=0, bytes=0, seconds=0.0))  # (backend, compression)
        self.num_retries = self.num_requests = self.num_computed_tokens = 0
        self._ids = itertools.count()
        self._call_ids = itertools.count()

    def _of(self, role: str) -> list[str]:
        """Live workers of a role (cached; the worker table changes only on deaths and joins)."""
        if self._by_role is None:  # draining workers take no new work
            self._by_role = {r: [w for w, s in self.workers.items() if s.role == r and w not in self.draining]
                             for r in (PREFILL, DECODE)}
        return self._by_role[role]

    # ------------------------------------------------------------------ client events
    def submit(self, requests: Sequence[object], ttft_slo_s: float | None, now_s: float,
               make_request=None, samples: bool = False) -> tuple[list[str] | tuple, list]:
        """Admit and queue validated requests, all or none. `requests` are
        (prompt ids, params, kv_compression) and `make_request(rid, prompt_ids, params,
        kv_compression)` builds the engine's Request. `samples`: the requests are the samples of
        one prompt (the same prompt ids and max_tokens; each its own params and seed), prefilled
        once (scheduler/groups.py). -> (ids, actions) or (error, actions)."""
        if not self.is_running:
            return ("not_running", f"deployment {self.name!r} is shut down"), []
        new = []
        for i, (prompt_ids, params, kv_compression) in enumerate(requests):
            rid = f"{self.name}-{next(self._ids)}"
            spec = RequestSpec(rid, len(prompt_ids), params.max_tokens, self.page_size, now_s, ttft_slo_s,
                               num_samples=len(requests) if samples and i == 0 else 1)
            reject = admit(spec, len(self.queue) + (0 if samples else len(new)), self.policy,
                           self._prefill_states(None))
            if reject is not None:
                self.rejections[reject.reason.value] += 1
                return _rejected(reject), []
            new.append(RequestState(make_request(rid, list(prompt_ids), params, kv_compression), spec,
                                    len(prompt_ids), params.max_tokens))
        ids = [r.spec.request_id for r in new]
        self.requests.update(zip(ids, new))
        if samples and len(new) > 1:
            group = list(ids)
            for r in new:
                r.group = group
            new = new[:1]  # only the leader is queued, admitted and placed
        self.queue.extend(r.spec.request_id for r in new)
        self.num_requests += len(ids)
        # With a TTFT SLO, admission first: each new request's TTFT predicted as placement will
        # predict it once its turn comes (`_admission_error`); then placement, which may place
        # some at once, reject some outright (no worker could hold one) or leave them queued.
        error = self._admission_error(new, now_s) if ttft_slo_s is not None else None
        actions = self._dispatch(now_s) if error is None else []
        error = error or next((r.error for r in new if r.error is not None), None)
        for r in new:
            if error is None and r.phase == QUEUED:
                decision, _ = self._place(r, now_s)
                if isinstance(decision, Rejection):
                    self.rejections[decision.reason.value] += 1
                    error = _rejected(decision)
        if error is not None:
            actions += self.abort(ids, now_s)
            return error, actions
        return ids, actions

    def _admission_error(self, new: list[RequestState], now_s: float) -> tuple | None:
        """The first of `new` (queued at the tail) that admission refuses, as an error: one
        placement would reject now, or one whose predicted TTFT (policy.predict_ttft_s, the same
        prediction placement makes, its turn given by the queue model) leaves less than the
        policy's admission headroom of its SLO."""
        turns = self._queue_waits()
        for r in new:
            decision, _ = self._place(r, now_s)
            if not isinstance(decision, Rejection) and r.spec.ttft_slo_s is not None:
                est = self._chosen_estimate(r, decision)
                turn_s = max(turns[r.spec.request_id], est.queue_s)  # no sooner than it could be placed now
                decision = admit_deadline(r.spec, predict_ttft_s(r.spec, now_s, est, turn_s), self.policy)
            if isinstance(decision, Rejection):
                self.rejections[decision.reason.value] += 1
                return _rejected(decision)
        return None

    def poll(self, request_ids: Sequence[str]) -> dict:
        """New tokens of each request since the last poll; an ended request is forgotten once
        polled. -> {rid: {"tokens", "finished", "error", "metrics"}}"""
        out = {}
        for rid in request_ids:
            r = self.requests.get(rid)
            if r is None:
                out[rid] = dict(tokens=[], finished=True, error=("failed", f"unknown request {rid}"), metrics={})
                continue
            tokens, r.tokens = r.tokens, []
            self.news.discard(rid)
            p = r.placement
            metrics = dict(ttft_s=(r.first_token_s - r.spec.arrival_s) if r.first_token_s else None, **r.timings,
                           num_computed_tokens=r.num_computed_tokens, prompt_tokens=r.num_prompt_tokens,
                           is_local_prefill=p.is_local_prefill if p else None,
                           prefill_worker=p.prefill_worker_id if p else None,
                           decode_worker=p.decode_worker_id if p else None)
            out[rid] = dict(tokens=tokens, finished=r.is_finished, error=r.error, metrics=metrics)
            if r.is_finished:
                del self.requests[rid]
        return out

    def has_news(self, request_ids: Sequence[str]) -> bool:
        """Whether `poll(request_ids)` would return anything."""
        return any(rid not in self.requests or self.requests[rid].tokens or self.requests[rid].is_finished
                   for rid in request_ids)

    def abort(self, request_ids: Sequence[str], now_s: float) -> list:
        """The client gave up: the requests end and are forgotten; a decode worker holding one
        stops it. A prefill under way finishes (its call releases what it holds)."""
        by_worker = defaultdict(list)
        actions: list = []
        for rid in request_ids:
            r = self.requests.pop(rid, None)
            self.news.discard(rid)
            if r is None:
                continue
            if r.phase != QUEUED and r.placement is not None and r.placement.decode_worker_id in self.workers:
                by_worker[r.placement.decode_worker_id].append(rid)
            actions += self._end(r, None)
        actions += [AbortOnWorker(d, tuple(rids)) for d, rids in by_worker.items()]
        return actions + self._dispatch(now_s)

    def shutdown(self) -> None:
        for rid in list(self.queue):
            self._end_group(self.requests[rid], ("not_running", f"deployment {self.name!r} was shut down"))
        self.is_running = False

    def clear_cache(self, now_s: float, pools_only: bool = False) -> list:
        return self._freed(self.store.clear(list(self.workers), now_s, pools_only))

    # ------------------------------------------------------------------ worker events
    def prefill_done(self, worker: str, tasks: Sequence[PrefillTask], results: Sequence, now_s: float,
                     num_free_pages: int | None = None, lost: str | None = None) -> list:
        """A `RunPrefill` call returned: per task a PrefillResult or an error message (str).
        `lost`: the worker died during the call (no results); its requests are retried."""
        actions: list = []
        if lost is not None:
            actions += self.worker_died(worker, lost, now_s)
            for task in tasks:
                call = self._end_call(task.call_id)
                actions += self._unpin(call)
                for r in self._current(call.group, call.request_id, call.placement) if call else []:
                    actions += self._retry(r, f"prefill worker {worker} died", now_s)
            return actions + self._dispatch(now_s)
        ws = self.workers.get(worker)
        if ws is not None and num_free_pages is not None:
            ws.num_free_pages = num_free_pages
        if ws is not None:
            self._observe_call_time(ws, [self.calls[t.call_id] for t in tasks if t.call_id in self.calls], now_s)
        by_decode = defaultdict(list)
        for task, res in zip(tasks, results):
            call = self._end_call(task.call_id)
            if call is None:
                continue
            current = self._current(call.group, call.request_id, call.placement)  # the samples still waiting
            if isinstance(res, str):
                actions += self._unpin(call)
                for r in current:
                    actions += self._end(r, ("failed", f"prefill on {worker} failed: {res}"))
                continue
            actions += self._publish_prefill(worker, call, res, now_s, can_export=ws is not None)
            if not current:  # aborted or retried meanwhile: nobody takes this K/V
                actions.append(ReleaseTransfers(worker, (res.handle,)))
                continue
            outs = {o.request_id: o for o in (res.output, *res.sample_outputs)}
            for r in current:
                r.phase = HANDOFF
                r.num_computed_tokens = res.num_computed_tokens
                r.timings["prefill_s"] = res.prefill_s
                # the rest of the call: its wait in the worker's queue, the batch's other jobs, RPCs
                r.timings["prefill_wait_s"] = max(0.0, now_s - call.sent_s - res.prefill_s)
            r = current[0]  # owns the transfer: the decode worker starts it first, the others fork
            r.transfer_id = res.handle.transfer_id
            d = r.placement.decode_worker_id
            self.transfers[r.transfer_id] = (r.spec.request_id, worker, res.handle, d)
            if d in self.workers:
                forks = tuple((x.request, outs[x.spec.request_id]) for x in current[1:])
                by_decode[d].append((r.request, outs[r.spec.request_id], res.handle) + ((forks,) if forks else ()))
            else:
                for x in current:
                    actions += self._retry(x, f"decode worker {d} died", now_s)
        actions += [Insert(d, tuple(items)) for d, items in by_decode.items()]
        return actions + self._dispatch(now_s)

    def decode_report(self, d: str, report, now_s: float) -> list:
        """What a decode worker did since its last report (raypd.runtime.decode_worker.DecodeReport)."""
        ws = self.workers.get(d)
        if ws is None:
            return []
        actions: list = []
        ws.num_free_pages, ws.num_free_slots = report.num_free_pages, report.num_free_slots
        ws.num_running, ws.context_len = report.num_running, report.context_len
        for _, tokens, pages in report.finished:
            actions += self._freed(self.store.publish_finished(d, tokens, pages, now_s))
        for res in report.prefilled:  # local prefills done
            rid = res.output.request_id
            call = self._end_call(self.local_calls.pop((d, rid), None))
            if call is not None:
                actions += self._publish_prefill(d, call, res, now_s, can_export=False)
            group = self._current(call.group, rid, call.placement) if call is not None else \
                [r for r in [self.requests.get(rid)] if r is not None and not r.is_finished]
            for r in group:  # every sample of the prompt
                r.num_computed_tokens = res.num_computed_tokens
                r.timings["prefill_s"] = res.prefill_s
        for rid in report.errors:  # a local prefill that failed still held its pins
            call = self._end_call(self.local_calls.pop((d, rid), None))
            actions += self._unpin(call)
        for rid in report.started:
            ws.unreserve(rid)
            r = self.requests.get(rid)
            if r is not None and r.phase in (PREFILLING, HANDOFF):
                r.phase = DECODING
        for h, recv_s in report.received:
            stats = self.transfer_stats[(h.backend, h.compression)]
            stats["count"] += 1
            stats["bytes"] += h.num_bytes
            stats["seconds"] += recv_s
            rid, sender, handle, _ = self.transfers.pop(h.transfer_id, (None,) * 4)
            r = self.requests.get(rid) if rid else None
            if r is not None and r.transfer_id == h.transfer_id:
                r.timings["transfer_s"] = recv_s
                r.transfer_id = None
                self._release_backlog(r)
            if sender in self.workers:
                actions.append(ReleaseTransfers(sender, (handle,)))
        # Tokens of a request the core no longer tracks, still running there: its abort overtook
        # its K/V on the way to that worker (separate calls); abort it again rather than let it
        # hold a slot and its pages to the end of its tokens.
        stray = tuple(rid for rid, tokens in report.tokens.items() if rid not in self.requests
                      and tokens[-1].finish_reason is None)
        if stray:
            actions.append(AbortOnWorker(d, stray))
        for rid, tokens in report.tokens.items():
            r = self.requests.get(rid)
            if r is None or r.is_finished:
                continue
            if r.first_token_s is None:
                r.first_token_s = now_s
            r.tokens.extend(tokens)
            self.news.add(rid)
            r.generated.extend(t.token_id for t in tokens if t.token_id >= 0)
            if tokens[-1].finish_reason is not None:
                actions += self._end(r, None)
        for rid, message in report.errors.items():
            r = self.requests.get(rid)
            if r is None or r.is_finished or r.phase == QUEUED:  # QUEUED: placed again already
                continue
            if rid in report.retryable:  # K/V lost on the way, or no room there after all
                sender = r.placement.prefill_worker_id if r.placement else None
                why = f"decode worker {d}: {message}"
                if sender in self.workers and sender != d:
                    actions.append(ProbeWorker(sender, rid, why))
                else:
                    actions += self._retry(r, why, now_s)
            else:
                actions += self._end(r, ("failed", f"decode worker {d}: {message}"))
        return actions + self._dispatch(now_s)

    def probe_done(self, request_id: str, worker: str, is_alive: bool, why: str, now_s: float) -> list:
        """The answer to a `ProbeWorker`: a dead sender leaves; the request is placed again."""
        actions = [] if is_alive else self.worker_died(worker, f"no answer to a probe ({why})", now_s)
        r = self.requests.get(request_id)
        if r is not None:
            actions += self._retry(r, why, now_s)
        return actions + self._dispatch(now_s)

    def is_ready(self) -> bool:
        """Whether a request submitted now can be served: running, with a live decode worker."""
        return self.is_running and bool(self._of(DECODE))

    def add_host_copy(self, token_ids: Sequence[int], first: int, num_pages: int, node_id: str, num_bytes: int,
                      payload, now_s: float) -> list:
        return self._freed(self.store.add_host_copy(token_ids, first, num_pages, node_id, num_bytes, payload, now_s))

    # ------------------------------------------------------------------ ending and retrying
    def _end(self, r: RequestState, error: tuple | None) -> list:
        """Every end goes here, once: the request releases what it holds."""
        if r.is_finished:
            return []
        self._leave_group(r)
        r.phase, r.error = ENDED, error
        if r.spec.request_id in self.requests:
            self.news.add(r.spec.request_id)
        if error is not None and error[0] == "rejected":
            self.rejections[error[2]] += 1
        return self._release(r)

    def _release(self, r: RequestState) -> list:
        """Reservations on every worker, the transfer backlog, and K/V still on its way (the
        sender keeps it until someone releases it)."""
        rid = r.spec.request_id
        if rid in self.queue:
            self.queue.remove(rid)
        for ws in self.workers.values():
            ws.unreserve(rid)
        self._release_backlog(r)
        actions: list = []
        if r.transfer_id is not None and r.phase != ENDED:  # starting over: the decode worker never got it
            _, sender, handle, _ = self.transfers.pop(r.transfer_id, (None,) * 4)
            if sender in self.workers:
                actions.append(ReleaseTransfers(sender, (handle,)))
            r.transfer_id = None
        return actions

    def _release_backlog(self, r: RequestState) -> None:
        if r.backlog is not None:
            w, d, kv = r.backlog
            for x in (w, d):
                if x in self.workers:
                    self.workers[x].backlog_bytes = max(0, self.workers[x].backlog_bytes - kv)
            r.backlog = None

    def _retry(self, r: RequestState, why: str, now_s: float) -> list:
        """Queue a request again at the head of the queue after a worker or a transfer failed.
        One that has produced tokens resumes: its prompt becomes prompt + tokens so far and it
        asks for the rest (greedy output is unchanged; the engine recomputes the K/V)."""
        if r.is_finished:
            return []
        self._leave_group(r)
        actions = self._release(r)
        if r.retries >= self.max_retries:
            return actions + self._end(r, ("failed", f"{why}; gave up after {r.retries} retries"))
        r.retries += 1
        self.num_retries += 1
        req, params = r.request, r.request.params
        if r.generated:
            left = r.max_tokens - len(r.generated)
            prompt = list(req.prompt_ids[:r.num_prompt_tokens]) + r.generated
            # penalties count the tokens so far as generated; min_tokens counts the rest
            r.request = dataclasses.replace(req, prompt_ids=prompt, resumed_len=len(r.generated),
                                            params=dataclasses.replace(
                                                params, max_tokens=left,
                                                min_tokens=max(0, params.min_tokens - len(r.generated))))
        r.spec = dataclasses.replace(r.spec, prompt_len=len(r.request.prompt_ids),
                                     max_tokens=r.request.params.max_tokens, ttft_slo_s=None)
        r.placement, r.phase = None, QUEUED
        self.queue.appendleft(r.spec.request_id)
        return actions

    # ------------------------------------------------------------------ calls
    def _observe_call_time(self, ws: WorkerState, calls: list[_Call], now_s: float) -> None:
        """Keep `ws.slowdown`, how much longer a prefill call takes than the cost model says (an
        EWMA of observed / predicted), so that admission and placement see the worker as it
        runs now: the calibration may be old, or the machine busier. A call starts when it was
        sent or when the worker's previous call ended, whichever is later (one call at a time)."""
        predicted = sum(c.predicted_s for c in calls)
        if calls and predicted > 0:
            start = max(min(c.sent_s for c in calls), ws.last_done_s)
            ratio = (now_s - start) / predicted
            ws.slowdown = min(SLOWDOWN_RANGE[1], max(SLOWDOWN_RANGE[0], 0.7 * ws.slowdown + 0.3 * ratio))
        ws.last_done_s = now_s

    def _end_call(self, call_id: int | None) -> _Call | None:
        call = self.calls.pop(call_id, None) if call_id is not None else None
        if call is not None and call.worker in self.workers:
            ws = self.workers[call.worker]
            ws.unreserve_call(call.call_id)
            ws.queued_s = max(0.0, ws.queued_s - call.estimate_s)
        return call

    def _unpin(self, call: _Call | None) -> list:
        if call is not None and call.pins:
            self.store.unpin(call.pins)
            call.pins = []
        return []

    def _publish_prefill(self, worker: str, call: _Call, res, now_s: float, can_export: bool) -> list:
        """A prefill's new full prompt pages into the store; the call's pins go."""
        self.num_computed_tokens += res.num_computed_tokens
        if worker in self.workers:
            actions = self._freed(self.store.publish_prefill(
                worker, call.prompt_ids, call.own_pages, res.num_prefix_pages, res.cached_pages, now_s,
                can_export and self.workers[worker].role == PREFILL))
        else:  # the worker is gone, and its pages with it
            actions = []
        self._unpin(call)
        return actions

    def _freed(self, actions: list) -> list:
        """Count pages freed on live workers as free (until their next report); drop the rest."""
        out = []
        for a in actions:
            if isinstance(a, FreePages):
                if a.worker not in self.workers:
                    continue
                self.workers[a.worker].num_free_pages += len(a.pages)
            out.append(a)
        return out

    def _make_room(self, worker: str, need: int, now_s: float) -> list:
        """Evict cached pages of `worker` until `need` pages are free (as last reported)."""
        return self._freed(self.store.make_room(worker, need - self.workers[worker].num_free_pages, now_s))

    def _dispatch(self, now_s: float) -> list:
        """Place queued requests in order (module doc) and send them: local prefills batched per
        decode worker, remote ones one call each."""
        actions: list = []
        remote, local = defaultdict(list), defaultdict(list)
        while self.queue and self.is_running:
            r = self.requests[self.queue[0]]
            decision, match = self._place(r, now_s)
            if isinstance(decision, Rejection):
                actions += self._end_group(r, _rejected(decision))
                continue
            if not isinstance(decision, Placement):
                break  # Wait: FIFO, try again on the next event
            self.queue.popleft()
            rid = r.spec.request_id
            r.timings["queue_s"] = now_s - r.spec.arrival_s
            r.timings["predicted_ttft_s"] = decision.ttft_s  # since arrival, as placement predicts it
            r.placement, r.phase = decision, PREFILLING
            followers = self._followers(r)
            for x in followers:  # the group's other samples: placed with their leader
                x.placement, x.phase = decision, PREFILLING
                x.timings.update(r.timings)
            w, d = decision.prefill_worker_id, decision.decode_worker_id
            f = decision.num_fetched_pages
            k = min(decision.num_cached_pages - f, match.num_worker_pages(w))
            pins = match.hashes[:k + f]
            self.store.pin(pins, now_s)
            prompt_pages = -(-r.spec.prompt_len // self.page_size)
            need_here = (r.spec.num_pages_needed if decision.is_local_prefill else prompt_pages) - k
            actions += self._make_room(w, need_here + self.workers[w].num_reserved_pages, now_s)
            est = next(e for e in decision.estimates if e.worker_id == w)
            call = _Call(next(self._call_ids), rid, w, decision, list(r.request.prompt_ids), list(pins),
                         list(match.worker_pages.get(w, []))[:k], 0.0, now_s, group=r.group)
            self.calls[call.call_id] = call
            # the worker's time on it: the prefill, and for a remote one the send of its K/V, which
            # the prefill worker does before it takes the next call
            # (est.prefill_s is at the worker's pace already; a local prefill's estimate has no pace)
            pace = 1.0 if decision.is_local_prefill else self.workers[w].slowdown
            send_s = 0.0 if decision.is_local_prefill else self.cost.predict_transfer_s(
                self.cost.kv_bytes(r.spec.prompt_len))
            call.predicted_s = est.prefill_s / pace + send_s
            call.estimate_s = pace * call.predicted_s
            self.workers[w].queued_s += call.estimate_s
            for x in followers:  # a slot each; the leader's reservation holds the group's pages
                self.workers[d].reserve(x.spec.request_id, 0)
            if decision.is_local_prefill:
                self.workers[d].reserve(rid, need_here)
                self.local_calls[(d, rid)] = call.call_id
            else:
                self.workers[w].reserve_call(call.call_id, need_here)
                actions += self._make_room(d, r.spec.num_pages_needed + self.workers[d].num_reserved_pages, now_s)
                self.workers[d].reserve(rid, r.spec.num_pages_needed)
                kv = self.cost.kv_bytes(r.spec.prompt_len)
                self.workers[w].backlog_bytes += kv
                self.workers[d].backlog_bytes += kv
                r.backlog = (w, d, kv)
            task = PrefillTask(call.call_id, r.request, tuple(call.own_pages),
                               tuple(self.store.host_prefix(match.locations[k:k + f])),
                               d if self.stream_layers and not decision.is_local_prefill and not followers else None,
                               tuple(x.request for x in followers))
            (local[d] if decision.is_local_prefill else remote[w]).append(task)
        # one call per remote prefill: a call's results come back together, so in a call of several
        # the first would wait for the last (its TTFT past the prediction); the worker runs them one
        # at a time either way
        actions += [RunPrefill(w, (task,)) for w, tasks in remote.items() for task in tasks]
        actions += [RunLocalPrefill(d, tuple(tasks)) for d, tasks in local.items()]
        if self.draining:
            actions += self._retire_drained()
        return actions

    # ------------------------------------------------------------------ status and invariants
    def stats(self) -> dict:
        return dict(name=self.name, is_running=self.is_running, num_queued=len(self.queue),
                    num_tracked=len(self.requests), index=self.store.stats(),
                    transfer=[dict(backend=b, compression=c, **v) for (b, c), v in self.transfer_stats.items()],
                    rejections=dict(self.rejections), num_retries=self.num_retries, dead_workers=dict(self.dead),
                    joining_workers=dict(self.joining), num_replacements=self.num_replacements,
                    draining_workers=dict(self.draining), retired_workers=dict(self.retired),
                    is_ready=self.is_ready(),
                    local_prefill_max_len=self.policy.local_prefill_max_len, num_requests=self.num_requests)

    def is_idle(self) -> bool:
        """Nothing queued, running, reserved, pinned or in flight."""
        return not (self.queue or self.requests or self.calls or self.transfers or any(
            s.reserved or s.call_pages or s.backlog_bytes or s.queued_s > 1e-9 for s in self.workers.values()))

    def check(self) -> None:
        """Invariants between the tables (tests call it after every event)."""
        live = {rid for rid, r in self.requests.items() if not r.is_finished}
        for rid in self.queue:
            assert rid in self.requests and self.requests[rid].phase == QUEUED, f"{rid}: queued but not QUEUED"
        for w, s in self.workers.items():
            for rid in s.reserved:
                assert rid in live and self.requests[rid].placement is not None \
                    and self.requests[rid].placement.decode_worker_id == w, f"{w}: reservation of {rid} leaked"
            assert s.num_reserved_pages == sum(s.reserved.values()) + sum(s.call_pages.values()), f"{w}: page sum"
            for call_id in s.call_pages:
                assert call_id in self.calls and self.calls[call_id].worker == w, f"{w}: call {call_id} leaked"
            owed = sum(r.backlog[2] for r in self.requests.values() if r.backlog and w in r.backlog[:2])
            assert s.backlog_bytes == owed, f"{w}: backlog {s.backlog_bytes} != {owed} owed by requests"
        for r in self.requests.values():
            if r.is_finished:
                assert r.backlog is None and r.spec.request_id not in self.queue, f"{r.spec.request_id}: ended, holds"
        for (d, rid), call_id in self.local_calls.items():
            assert call_id in self.calls and self.calls[call_id].worker == d, "local call table"
        self.store.check()
