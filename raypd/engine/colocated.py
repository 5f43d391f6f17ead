"""Colocated engine: prefill chunks and decode steps interleaved on the same devices.

This is the baseline every disaggregation claim is measured against, so it does what vLLM and
SGLang do by default: chunked prefill with a per-iteration token budget. Each `step`:
  1. admits waiting requests (FIFO) while a decode slot and pages for prompt + max_tokens
     are free (pages are reserved up front, so admitted work never stalls on memory),
  2. runs at most one prefill chunk (<= the largest prefill bucket of tokens), so a long prompt
     delays running streams by one chunk per step rather than by its whole prefill,
  3. inserts the prompts that finished prefill straight into decode slots (same pool: no copy),
  4. dispatches the next decode steps for every running request and returns the tokens of the
     previous dispatch (raypd/engine/decode.py): several steps in one dispatch only while no
     request waits for admission or prefill, so a multi-step dispatch never delays new work.
"""

from __future__ import annotations

from collections import deque

from raypd.engine.api import Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import ModelRunner


class ColocatedEngine:
    def __init__(self, runner: ModelRunner, tokenizer=None):
        self.runner = runner
        self.prefill_engine = PrefillEngine(runner)
        self.decode_engine = DecodeEngine(runner, tokenizer)
        self._waiting: deque[Request] = deque()
        self._prefilling: dict[str, Request] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._prefilling) + self.decode_engine.num_running

    def add_request(self, request: Request) -> None:
        n = len(request.prompt_ids) + request.params.max_tokens
        if n > self.runner.max_seq_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                             f"({request.params.max_tokens}) must be <= {self.runner.max_seq_len}")
        need = self.decode_engine.pages_needed(len(request.prompt_ids), request.params.max_tokens)
        if need > self.runner.allocator.num_pages - 1:
            raise ValueError(f"request needs {need} KV pages; the pool has {self.runner.allocator.num_pages - 1}")
        self._waiting.append(request)

    def _admit(self) -> None:
        slots = self.decode_engine.num_free_slots - len(self._prefilling)
        while self._waiting and slots > 0:
            req = self._waiting[0]
            n, m = len(req.prompt_ids), req.params.max_tokens
            if not self.runner.allocator.can_allocate(self.decode_engine.pages_needed(n, m)):
                break
            self._waiting.popleft()
            self.prefill_engine.add(req, reserve_tokens=n + m)
            self._prefilling[req.request_id] = req
            slots -= 1

    def step(self) -> list[TokenOutput]:
        self._admit()
        outs: list[TokenOutput] = []
        for p in self.prefill_engine.step():
            req = self._prefilling.pop(p.request_id)
            outs.append(self.decode_engine.insert(req, p))
            self.prefill_engine.release(p.request_id)  # the decode engine holds its own reference
        is_waiting = bool(self._waiting or self._prefilling)
        outs.extend(self.decode_engine.decode_step(max_steps=1 if is_waiting else None))
        return outs

    def abort(self, request_id: str) -> None:
        self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
        if self._prefilling.pop(request_id, None) is not None:
            self.prefill_engine.release(request_id)
        self.decode_engine.release(request_id)
