"""Local prefill: prompts prefilled on the decode engine's own page pool, in chunks between
decode steps, and inserted into decode slots without a copy.

The one loop that owns a prefill and a decode engine over one pool. Both the colocated engine
(raypd/engine/colocated.py: every prompt) and a decode worker (raypd/runtime/decode_worker.py:
the prompts the scheduler keeps on it) run it; they differ only in how a prompt gets here
(the colocated engine admits from its own queue, the scheduler admits for a decode worker)
and in what they do with the results. Per iteration of their loop:
  1. admit: `add` queues one prompt's requests (n samples of a prompt share one prefill; every
     sample but the first brings pages of its own) on the prefill engine, optionally after
     cached prefix pages, with pages reserved for prompt + max_tokens;
  2. chunk: `prefill_chunk` runs one prefill chunk (at most the largest prefill bucket of
     tokens), so a long prompt delays running streams by one chunk per iteration, not by its
     whole prefill;
  3. insert: in the same call, the prompts that finished go into decode slots (same pool: the
     decode engine takes a reference on the prompt pages); the other samples of a prompt fork
     from them (they share the full pages, each copies the partial one). With `retain_from`,
     one more reference on the full prompt pages after that many is kept for a prefix cache;
  4. step: `decode_step` dispatches the next decode steps for every running request: several
     in one dispatch only while no prompt is prefilling here and the caller says nothing else
     waits, so a multi-step dispatch never delays new work.
No threads: the caller's loop calls these in order.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from raypd.engine.api import PrefillOutput, Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine


@dataclasses.dataclass
class _Group:
    """Requests with one prompt, prefilled once (n > 1 samples; one request: a group of one).
    The first is the leader: the prefill runs under its id and pages, and it takes them over
    in decode; every other sample holds pages of its own from admission on."""

    requests: list[Request]
    own_pages: dict[str, list[int]]  # sample id -> its pages (every request but the leader)
    retain_from: int | None  # keep the leader's full prompt pages after this many (None: keep none)
    tag: object  # the caller's, handed back with each result
    aborted: set[str] = dataclasses.field(default_factory=set)  # ids aborted while prefilling

    @property
    def leader(self) -> Request:
        return self.requests[0]


@dataclasses.dataclass
class Prefilled:
    """A request whose prompt finished prefill here: running in decode (`first`) or, when its
    insert failed, not (`error`; nothing of it is held any more)."""

    request: Request
    output: PrefillOutput  # .pages: the prompt's pages (released by the time the caller sees this)
    tag: object  # as given to `add`
    first: TokenOutput | None = None  # its first token
    error: Exception | None = None
    cached_pages: list[int] = dataclasses.field(default_factory=list)  # retained (one reference each)


class LocalPrefill:
    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine):
        if prefill.allocator is not decode.allocator:
            raise ValueError("prefill and decode engines of a local prefill must share one page pool")
        self.prefill, self.decode = prefill, decode
        self._groups: dict[str, _Group] = {}  # every prefilling request's id -> its group

    def __len__(self) -> int:
        """Requests prefilling here (every sample of a prompt counts)."""
        return len(self._groups)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def leader_of(self, request_id: str) -> str | None:
        """The id its prompt's prefill runs under (its own for a group of one); None if not here."""
        group = self._groups.get(request_id)
        return group.leader.request_id if group is not None else None

    def request_ids(self) -> Iterator[str]:
        return iter(list(self._groups))

    def add(self, requests: list[Request], prefix_pages: list[int] = (),
            own_pages: dict[str, list[int]] | None = None, retain_from: int | None = None, tag=None) -> None:
        """Queue one prompt's requests (step 1). `prefix_pages` hold the K/V of its first
        tokens (a reference is taken); `own_pages`: each sample's but the leader's pages
        (allocated by the caller, owned here from now on). Raises what `PrefillEngine.add` raises
        (OutOfPages: no room) with nothing of the group held here."""
        leader = requests[0]
        n = len(leader.prompt_ids)
        self.prefill.add(leader, prefix_pages, reserve_tokens=n + leader.params.max_tokens,
                         samples=tuple(requests[1:]))
        group = _Group(list(requests), dict(own_pages or {}), retain_from, tag)
        for r in requests:
            self._groups[r.request_id] = group

    def prefill_chunk(self) -> list[Prefilled]:
        """Run one prefill chunk and insert the prompts it finished (steps 2 and 3). A chunk
        that raises leaves every request queued; the caller aborts them or stops."""
        done: list[_Group] = []
        results: list[Prefilled] = []
        for out in self.prefill.step():
            group = self._groups.pop(out.request_id)
            if out.request_id == group.leader.request_id:
                done.append(group)
            if out.request_id not in group.aborted:
                results.append(self._insert(group, out))
        for group in done:  # after every sample forked from its pages: decode holds its own references
            self.prefill.release(group.leader.request_id)
        return results

    def _insert(self, group: _Group, out: PrefillOutput) -> Prefilled:
        request = next(r for r in group.requests if r.request_id == out.request_id)
        is_leader = request is group.leader
        cached, own = [], group.own_pages.pop(request.request_id, None)
        try:
            if is_leader and group.retain_from is not None:
                cached = list(out.pages[group.retain_from: out.prompt_len // self.prefill.allocator.page_size])
                self.prefill.allocator.incref(cached)
            first = self.decode.insert(request, out, None) if is_leader else self.decode.fork(request, out, own)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self.prefill.allocator.free(cached + (own or []))
            return Prefilled(request, out, group.tag, error=e)
        return Prefilled(request, out, group.tag, first, cached_pages=cached)

    def decode_step(self, is_waiting: bool = False) -> list[TokenOutput]:
        """The next decode dispatch (step 4): one step while a prompt prefills here or the
        caller has other work waiting (`is_waiting`), else up to the engine's maximum.
        -> the tokens of the previous dispatch."""
        if not self.decode.num_running:
            return []
        is_waiting = is_waiting or bool(self._groups)
        return self.decode.decode_step(max_steps=1 if is_waiting else None)

    def abort(self, request_id: str) -> bool:
        """Stop a request that is prefilling here (its own pages are freed; the prefill stops
        once every request of its prompt is aborted). -> whether it was prefilling here."""
        group = self._groups.get(request_id)
        if group is None or request_id in group.aborted:
            return False
        group.aborted.add(request_id)
        self.prefill.allocator.free(group.own_pages.pop(request_id, []))
        if group.aborted.issuperset(r.request_id for r in group.requests):  # nobody left: stop the prefill
            for r in group.requests:
                self._groups.pop(r.request_id, None)
            self.prefill.release(group.leader.request_id)
        return True
