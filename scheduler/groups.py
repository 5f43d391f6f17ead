"""The n samples of one prompt (a mixin of `SchedulerCore`): one prefill, one K/V transfer,
n decode streams.

`submit(..., samples=True)` makes one request per sample and a group of them
(`RequestState.group`, the same list of ids on each). Only the first, the leader, is queued;
its spec counts every sample (`RequestSpec.num_samples`: slots and pages on one decode worker).
Placing the leader places the group: every sample takes the leader's placement, the prefill
task carries the others as `samples` (one prefill, each sample's own first token), and the
decode worker starts them all from one copy of the K/V (the others fork from the first).
Each sample is otherwise a request of its own: its tokens, poll, abort and end.

A sample that ends (an abort) or starts over (a retry) leaves the group, which goes on without
it: a queued leader's place in the queue goes to the next sample, a page reservation on the
decode worker moves to a sample that still needs it. Whatever happens to the prefill call
happens to every sample still placed by it (`_current`): a failure ends them, a lost worker
places each again, alone.
"""

from __future__ import annotations

import dataclasses

from scheduler.state import QUEUED, RequestState


class Groups:
    def _current(self, group: list[str] | None, rid: str, placement) -> list[RequestState]:
        """The requests of a prefill call (`rid`'s group, or `rid` alone) that are still placed by
        it (`placement`): not ended, not placed again since. The first owns the K/V it sends."""
        out = []
        for m in (list(group) if group else [rid]):
            r = self.requests.get(m)
            if r is not None and not r.is_finished and r.placement is placement and placement is not None:
                out.append(r)
        return out

    def _followers(self, leader: RequestState) -> list[RequestState]:
        """The other samples of a leader's group that wait for it (queued, not ended)."""
        if not leader.group:
            return []
        return [self.requests[m] for m in leader.group[1:]
                if m in self.requests and self.requests[m].phase == QUEUED and not self.requests[m].is_finished]

    def _end_group(self, r: RequestState, error: tuple | None) -> list:
        """End a queued leader and the samples that wait for it, with one error."""
        actions: list = []
        for x in [*self._followers(r), r]:  # the leader last: nobody is left to take its place
            actions += self._end(x, error)
        return actions

    def _leave_group(self, r: RequestState) -> None:
        """`r` ends or starts over alone (before `_release`): the group goes on without it."""
        group, rid = r.group, r.spec.request_id
        r.group = None
        if not group or rid not in group:
            return
        was_leader = group[0] == rid
        group.remove(rid)
        rest = [self.requests[m] for m in group if m in self.requests and not self.requests[m].is_finished]
        if not rest:
            return
        group[:] = [m.spec.request_id for m in rest]
        head = rest[0]
        if r.phase == QUEUED:  # the group waits for placement: its head now counts what is left
            head.spec = dataclasses.replace(head.spec, num_samples=len(rest))
            if was_leader and rid in self.queue:
                self.queue[self.queue.index(rid)] = head.spec.request_id
            return
        for ws in self.workers.values():  # placed: a sample still to start takes the pages held for it
            pages = ws.reserved.get(rid, 0)
            if pages and head.placement is r.placement and head.spec.request_id in ws.reserved:
                ws.reserve(head.spec.request_id, ws.reserved[head.spec.request_id] + pages)
