"""Colocated engine: prefill chunks and decode steps interleaved on the same devices.

This is the baseline every disaggregation claim is measured against, so it does what vLLM and
SGLang do by default: chunked prefill with a per-iteration token budget. Each `step`:
  1. admits waiting requests (FIFO) while a decode slot and pages for prompt + max_tokens
     are free (pages are reserved up front, so admitted work never stalls on memory),
  2. runs the local-prefill loop (raypd/engine/local_prefill.py, the one a decode worker runs
     too): at most one prefill chunk (<= the largest prefill bucket of tokens), so a long
     prompt delays running streams by one chunk per step rather than by its whole prefill,
  3. which inserts the prompts that finished prefill straight into decode slots (same pool: no
     copy); the n samples of one prompt (`add_group`) were prefilled once, each with its own
     first token, and fork in decode: they share the prompt's full pages, each copies the
     partial one,
  4. and dispatches the next decode steps for every running request, returning the tokens of
     the previous dispatch (raypd/engine/decode.py): several steps in one dispatch only while
     no request waits for admission or prefill, so a multi-step dispatch never delays new work.
"""

from __future__ import annotations

from collections import deque

from raypd.engine.api import Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.local_prefill import LocalPrefill
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import ModelRunner


class ColocatedEngine:
    def __init__(self, runner: ModelRunner, tokenizer=None):
        self.runner = runner
        self.prefill_engine = PrefillEngine(runner)
        self.decode_engine = DecodeEngine(runner, tokenizer)
        self.local = LocalPrefill(self.prefill_engine, self.decode_engine)
        self._waiting: deque[list[Request]] = deque()  # groups: one prompt's requests each

    @property
    def num_unfinished(self) -> int:
        return sum(len(g) for g in self._waiting) + len(self.local) + self.decode_engine.num_running

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
        self._waiting.append(list(requests))

    def _pages_needed(self, requests: list[Request]) -> int:
        """The leader's pages, and each other sample's own (all but the shared full prompt pages)."""
        n, shared = len(requests[0].prompt_ids), len(requests[0].prompt_ids) // self.runner.page_size
        return sum(self.decode_engine.pages_needed(n, r.params.max_tokens) - (shared if i else 0)
                   for i, r in enumerate(requests))

    def _admit(self) -> None:
        slots = self.decode_engine.num_free_slots - len(self.local)
        while self._waiting and slots >= len(self._waiting[0]):
            group = self._waiting[0]
            if not self.runner.allocator.can_allocate(self._pages_needed(group)):
                break
            self._waiting.popleft()
            n = len(group[0].prompt_ids)
            shared = n // self.runner.page_size
            own = {r.request_id: self.runner.allocator.allocate(self.decode_engine.pages_needed(n, r.params.max_tokens)
                                                                - shared) for r in group[1:]}
            self.local.add(group, own_pages=own)
            slots -= len(group)

    def step(self) -> list[TokenOutput]:
        self._admit()
        outs: list[TokenOutput] = []
        for p in self.local.prefill_chunk():
            if p.error is not None:
                raise p.error
            outs.append(p.first)
        outs.extend(self.local.decode_step(is_waiting=bool(self._waiting)))
        return outs

    def abort(self, request_id: str) -> None:
        for g in self._waiting:
            g[:] = [r for r in g if r.request_id != request_id]
        self._waiting = deque(g for g in self._waiting if g)
        self.local.abort(request_id)
        self.decode_engine.release(request_id)
