"""Workers joining and leaving a running scheduler core (a mixin of `SchedulerCore`): a death,
a replacement joining or failing to, and moving workers between roles (drain, retire, replace).
Events in, actions out, like the rest of the core."""

from __future__ import annotations

from scheduler.actions import ReleaseTransfers, ReplaceWorker, RetireWorker
from scheduler.state import DECODE, ENDED, PREFILL, QUEUED, WorkerState


class Membership:
    def worker_died(self, w: str, why: str, now_s: float) -> list:
        """Drop a dead worker: no placement sees it again, the store forgets its pages, its
        local prefills end, and requests decoding there (or headed there) start over."""
        ws = self.workers.pop(w, None)
        if ws is None:
            return []
        self._by_role = None
        self.dead[w] = why
        self.store.remove_worker(w)
        actions: list = []
        if self.num_replacements < self.max_replacements and self.is_running:
            self.num_replacements += 1
            new = f"{ws.role}-{self._num_ever[ws.role]}"
            self._num_ever[ws.role] += 1
            self.joining[new] = ws.role
            actions.append(ReplaceWorker(w, new, ws.role))
        for (d, rid), call_id in list(self.local_calls.items()):
            if d == w:
                del self.local_calls[(d, rid)]
                actions += self._unpin(self._end_call(call_id))
        for tid, (rid, sender, handle, receiver) in list(self.transfers.items()):
            if sender == w:  # its payloads went with it; the receiver reports the loss
                self.transfers[tid] = (rid, None, None, receiver)
            elif receiver == w:  # nobody will take them now
                del self.transfers[tid]
                if sender in self.workers:
                    actions.append(ReleaseTransfers(sender, (handle,)))
                if rid in self.requests:
                    self.requests[rid].transfer_id = None
        if ws.role == DECODE:
            for r in list(self.requests.values()):
                if r.placement is not None and r.placement.decode_worker_id == w and not r.is_finished \
                        and r.phase != QUEUED:
                    actions += self._retry(r, f"decode worker {w} died", now_s)
        return actions + self._dispatch(now_s)

    def set_roles(self, num_prefill: int, num_decode: int, now_s: float) -> list:
        """Move workers between the prefill and decode roles without dropping a request: each
        one to move drains (placement skips it; what it holds finishes), then is retired and a
        worker of the other role starts in its place (`RetireWorker` + `ReplaceWorker`). Workers
        still starting count in the role they start in, so asking again for the same split while
        a move is under way changes nothing."""
        roles = {**{w: self.draining.get(w, s.role) for w, s in self.workers.items()}, **self.joining}
        have = {PREFILL: sum(r == PREFILL for r in roles.values()), DECODE: sum(r == DECODE for r in roles.values())}
        if num_prefill < 0 or num_decode < 1 or num_prefill + num_decode != len(roles):
            raise ValueError(f"need num_prefill >= 0 and num_decode >= 1 adding up to the {len(roles)} live "
                             f"workers, got {num_prefill} + {num_decode}")
        move_to, n = (PREFILL, num_prefill - have[PREFILL]) if num_prefill > have[PREFILL] else (
            DECODE, num_decode - have[DECODE])
        source = DECODE if move_to == PREFILL else PREFILL
        # the least loaded first: fewest running (decode), least queued work (prefill)
        pool = sorted((w for w, r in roles.items() if r == source and w in self.workers and w not in self.draining),
                      key=lambda w: (self.workers[w].num_running, self.workers[w].queued_s, w))
        for w in pool[:n]:
            self.draining[w] = move_to
        self._by_role = None
        return self._dispatch(now_s)

    def _is_drained(self, w: str) -> bool:
        s = self.workers[w]
        return not (s.reserved or s.call_pages or s.backlog_bytes or s.num_running
                    or any(c.worker == w for c in self.calls.values())
                    or any(w in (t[1], t[3]) for t in self.transfers.values())
                    or any(r.placement is not None and w in (r.placement.decode_worker_id, r.placement.prefill_worker_id)
                           and r.phase not in (QUEUED, ENDED) for r in self.requests.values()))

    def _retire_drained(self) -> list:
        actions: list = []
        for w, role in list(self.draining.items()):
            if self._is_drained(w):
                del self.draining[w]
                self.workers.pop(w)
                self._by_role = None
                self.store.remove_worker(w)  # its pool goes with it
                new = f"{role}-{self._num_ever[role]}"
                self._num_ever[role] += 1
                self.joining[new] = role
                self.retired[w] = new
                actions += [RetireWorker(w), ReplaceWorker(w, new, role)]
        return actions

    def worker_joined(self, w: str, state: WorkerState, now_s: float) -> list:
        """A new worker (a replacement, or one added by hand) is healthy: placement sees it."""
        self.joining.pop(w, None)
        self.workers[w] = state
        self._by_role = None
        return self._dispatch(now_s)

    def worker_join_failed(self, w: str, why: str, now_s: float) -> list:
        """A replacement never became healthy: queued requests stop waiting for it."""
        self.joining.pop(w, None)
        self.dead[w] = why
        return self._dispatch(now_s)
