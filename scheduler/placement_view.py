"""Placement's view of the scheduler core's tables (a mixin of `SchedulerCore`): worker
snapshots for scheduler.policy, the candidates placement estimates in full, and the predicted
wait of queued requests for admission. Reads the core's tables; changes nothing."""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict

from scheduler.policy import (DecodeWorkerState, Placement, PrefillEstimate, PrefillWorkerState, TransferState, Wait,
                             place, predict_queue_waits)
from scheduler.state import DECODE, ENDED, PREFILL, QUEUED, RequestState

MAX_CANDIDATES = 16  # workers of a role placement estimates in full, beyond those holding the prefix


class PlacementView:
    def _candidates(self, role: str, match, key) -> list[str]:
        """Workers placement looks at: all of them in a small cluster; in a large one, those
        holding the prompt's prefix plus the MAX_CANDIDATES best by a cheap `key` (smallest
        first), so a placement costs one pass over the workers, not a full estimate of each."""
        workers = self._of(role)
        if len(workers) <= MAX_CANDIDATES:
            return workers
        holders = [w for w in (match.worker_pages if match else ()) if w in self.workers
                   and self.workers[w].role == role]
        return list(dict.fromkeys(holders + heapq.nsmallest(MAX_CANDIDATES, workers, key=key)))

    def _prefill_states(self, match) -> list[PrefillWorkerState]:
        workers = self.workers
        key = lambda w: workers[w].queued_s + workers[w].backlog_bytes / self.cost.transfer_bytes_per_s  # noqa: E731
        return [PrefillWorkerState(w, queued_s=workers[w].queued_s,
                                   num_cached_pages=match.num_worker_pages(w) if match else 0,
                                   pace=workers[w].slowdown)
                for w in self._candidates(PREFILL, match, key)]

    def _decode_states(self, match) -> list[DecodeWorkerState]:
        out = []
        workers = self.workers

        def key(d):  # the order place_decode prefers: a free slot, the most free pages, fewer running
            s = workers[d]
            free = s.num_free_pages + self.store.num_worker_pages(d) - s.num_reserved_pages
            return (s.num_free_slots - len(s.reserved) <= 0, -free, s.num_running)

        for d in self._candidates(DECODE, match, key):
            s = self.workers[d]
            # Pages the store caches there count as free: placement evicts them when needed.
            free = s.num_free_pages + self.store.num_worker_pages(d) - s.num_reserved_pages
            out.append(DecodeWorkerState(d, s.num_free_slots - len(s.reserved), free, s.max_pages,
                                         s.num_running, s.context_len, match.num_worker_pages(d) if match else 0,
                                         queued_prefill_s=s.queued_s))
        return out

    def _place(self, r: RequestState, now_s: float):
        match = self.store.match(r.request.prompt_ids, r.spec.max_cached_pages)
        if not self._of(DECODE) and DECODE in self.joining.values():  # wait for the replacement
            return Wait(r.spec.request_id, now_s - r.spec.arrival_s), match
        spec = dataclasses.replace(r.spec, num_host_pages=self.store.num_host_pages(match))
        transfer = TransferState({w: s.backlog_bytes for w, s in self.workers.items()})
        return place(spec, self._prefill_states(match), self._decode_states(match), self.cost, now_s,
                     self.policy, transfer), match

    def _chosen_estimate(self, r: RequestState, decision) -> PrefillEstimate:
        """The prefill estimate a Placement or Wait rests on: its chosen (or best) worker's; with
        no prefill worker to estimate, the prefill alone."""
        if isinstance(decision, Placement):
            return next(e for e in decision.estimates if e.worker_id == decision.prefill_worker_id)
        if decision.estimate is not None:
            return decision.estimate
        n = r.spec.prompt_len
        return PrefillEstimate("", 0, 0, n, 0.0, 0.0, self.cost.predict_prefill_s(n), 0.0)

    def _own_prefill_s(self, r: RequestState) -> float:
        """Predicted time a prefill worker spends on a queued request (its prefill and, when
        disaggregated, the send of its K/V), at the prefill workers' observed pace: the work it
        puts ahead of the requests queued after it."""
        pre = self._of(PREFILL)
        if not pre:
            return self.cost.predict_prefill_s(r.spec.prompt_len)
        pace = sum(self.workers[w].slowdown for w in pre) / len(pre)
        return pace * (self.cost.predict_prefill_s(r.spec.prompt_len)
                       + self.cost.predict_transfer_s(self.cost.kv_bytes(r.spec.prompt_len)))

    def _queue_waits(self) -> dict[str, float]:
        """Predicted wait of each queued request for its turn (policy.predict_queue_waits)."""
        decode = [self.workers[d] for d in self._of(DECODE)]
        step_s = max((self.cost.predict_decode_step_s(s.max_slots, s.context_len) for s in decode), default=0.0)
        # a remote prefill finishes after the calls sent to its worker before it (FIFO) and itself
        queued, prefill_done_s = defaultdict(float), {}
        for c in self.calls.values():  # in the order they were sent
            if c.worker in self.workers and self.workers[c.worker].role == PREFILL:
                queued[c.worker] += c.estimate_s
                prefill_done_s[c.request_id] = queued[c.worker]
        busy = []  # when each occupied slot frees: after its prefill (if still queued) and its tokens left
        for q in self.requests.values():
            if q.phase not in (QUEUED, ENDED):
                busy.append(prefill_done_s.get(q.spec.request_id, 0.0) + max(0, q.max_tokens - len(q.generated)) * step_s)
        slots = busy + [0.0] * max(0, sum(s.max_slots for s in decode) - len(busy))
        queue = [(self._own_prefill_s(q), q.spec.max_tokens) for q in (self.requests[rid] for rid in self.queue)]
        backlog = sum(self.workers[w].queued_s for w in self._of(PREFILL))
        waits = predict_queue_waits(slots, queue, step_s, len(self._of(PREFILL)) or 1, backlog)
        return dict(zip(self.queue, waits))
