"""Colocated engine: prefill chunks and decode steps interleaved on the same devices.

This is the baseline every disaggregation claim is measured against, so it does what vLLM and
SGLang do by default: chunked prefill with a per-iteration token budget. Each `step`:
  1. admits waiting requests (FIFO) while a decode slot and pages for prompt + max_tokens
     are free (pages are reserved up front, so admitted work never stalls on memory),
  2. runs at most one prefill chunk (<= the largest prefill bucket of tokens), so a long prompt
     delays running streams by one chunk per step rather than by its whole prefill,
  3. inserts the prompts that finished prefill straight into decode slots (same pool: no copy);
     the n samples of one prompt (`add_group`) were prefilled once, each with its own first
     token, and fork in decode: they share the prompt's full pages, each copies the partial one,
  4. dispatches the next decode steps for every running request and returns the tokens of the
     previous dispatch (raypd/engine/decode.py): several steps in one dispatch only while no
     request waits for admission or prefill, so a multi-step dispatch never delays new work.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from raypd.engine.api import Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import ModelRunner


@dataclasses.dataclass
class _Group:
    """Requests with one prompt, prefilled once (n > 1 samples; one request: a group of one).
    The first is the leader: the prefill runs under its id and pages, and it takes them over
    in decode; every other sample holds pages of its own from admission on."""

    requests: list[Request]
    own_pages: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # sample id -> its pages
    aborted: set[str] = dataclasses.field(default_factory=set)  # ids aborted while prefilling

    @property
    def leader(self) -> Request:
        return self.requests[0]


class ColocatedEngine:
    def __init__(self, runner: ModelRunner, tokenizer=None):
        self.runner = runner
        self.prefill_engine = PrefillEngine(runner)
        self.decode_engine = DecodeEngine(runner, tokenizer)
        self._waiting: deque[_Group] = deque()
        self._prefilling: dict[str, _Group] = {}  # every member's id -> its group

    @property
    def num_unfinished(self) -> int:
        return sum(len(g.requests) for g in self._waiting) + len(self._prefilling) + self.decode_engine.num_running

    def add_request(self, request: Request) -> None:
        self.add_group([request])

    def add_group(self, requests: list[Request]) -> None:
        """Requests with the same prompt (n samples of it, each with its own params and seed):
        one prefill computes the prompt's K/V and every sample's first token; in decode the
        samples share the prompt's full pages. At most `max_prefill_segments` requests."""
        if not requests:
            raise ValueError("requests must not be empty")
        max_n = self.runner.config.max_prefill_segments
        if len(requests) > max_n:
            raise ValueError(f"requests: at most {max_n} samples share one prefill (EngineConfig."
                             f"max_prefill_segments), got {len(requests)}")
        prompt = list(requests[0].prompt_ids)
        for r in requests:
            n = len(r.prompt_ids) + r.params.max_tokens
            if n > self.runner.max_seq_len:
                raise ValueError(f"prompt ({len(r.prompt_ids)} tokens) + max_tokens "
                                 f"({r.params.max_tokens}) must be <= {self.runner.max_seq_len}")
            if list(r.prompt_ids) != prompt:
                raise ValueError("requests: the samples of one group must share one prompt")
        need = self._pages_needed(requests)
        if need > self.runner.allocator.num_pages - 1:
            raise ValueError(f"request needs {need} KV pages; the pool has {self.runner.allocator.num_pages - 1}")
        self._waiting.append(_Group(list(requests)))

    def _pages_needed(self, requests: list[Request]) -> int:
        """The leader's pages, and each other sample's own (all but the shared full prompt pages)."""
        n, shared = len(requests[0].prompt_ids), len(requests[0].prompt_ids) // self.runner.page_size
        return sum(self.decode_engine.pages_needed(n, r.params.max_tokens) - (shared if i else 0)
                   for i, r in enumerate(requests))

    def _admit(self) -> None:
        slots = self.decode_engine.num_free_slots - len(self._prefilling)
        while self._waiting and slots >= len(self._waiting[0].requests):
            group = self._waiting[0]
            if not self.runner.allocator.can_allocate(self._pages_needed(group.requests)):
                break
            self._waiting.popleft()
            leader, n = group.leader, len(group.leader.prompt_ids)
            shared = n // self.runner.page_size
            for r in group.requests[1:]:
                group.own_pages[r.request_id] = self.runner.allocator.allocate(
                    self.decode_engine.pages_needed(n, r.params.max_tokens) - shared)
            self.prefill_engine.add(leader, reserve_tokens=n + leader.params.max_tokens,
                                    samples=tuple(group.requests[1:]))
            for r in group.requests:
                self._prefilling[r.request_id] = group
            slots -= len(group.requests)

    def step(self) -> list[TokenOutput]:
        self._admit()
        outs: list[TokenOutput] = []
        done = []
        for p in self.prefill_engine.step():
            group = self._prefilling.pop(p.request_id)
            is_leader = p.request_id == group.leader.request_id
            if is_leader:
                done.append(p.request_id)
            if p.request_id in group.aborted:
                continue
            if is_leader:
                outs.append(self.decode_engine.insert(group.leader, p))
            else:
                req = next(r for r in group.requests if r.request_id == p.request_id)
                outs.append(self.decode_engine.fork(req, p, group.own_pages.pop(p.request_id)))
        for rid in done:  # after every sample forked from its pages: the decode engine holds its own references
            self.prefill_engine.release(rid)
        is_waiting = bool(self._waiting or self._prefilling)
        outs.extend(self.decode_engine.decode_step(max_steps=1 if is_waiting else None))
        return outs

    def abort(self, request_id: str) -> None:
        for g in self._waiting:
            g.requests = [r for r in g.requests if r.request_id != request_id]
        self._waiting = deque(g for g in self._waiting if g.requests)
        group = self._prefilling.get(request_id)
        if group is not None and request_id not in group.aborted:
            group.aborted.add(request_id)
            pages = group.own_pages.pop(request_id, None)
            if pages is not None:
                self.runner.allocator.free(pages)
            if group.aborted.issuperset(r.request_id for r in group.requests):  # nobody left: stop the prefill
                for r in group.requests:
                    self._prefilling.pop(r.request_id, None)
                self.prefill_engine.release(group.leader.request_id)
        self.decode_engine.release(request_id)
