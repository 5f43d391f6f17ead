"""Arithmetic mock engines with the same interface as the JAX engines, for orchestration tests.

Outputs can be worked out by hand:
  - prefill's first token = (sum(prompt) * prefill_weight) % vocab_size
  - each decode step's token = (last token + decode_weight) % vocab_size
  - logprob = -1.0 for every token; "K/V" of token i at position p is prompt[i] + p.
Giving prefill and decode different weights proves which engine ran each phase.
"""

from __future__ import annotations

import time

import numpy as np

from raypd.engine.api import FINISH_ABORT, KVPayload, PrefillOutput, Request, TokenOutput
from raypd.engine.pages import PageAllocator
from raypd.engine.sequence import Sequence


class MockPrefillEngine:
    def __init__(self, prefill_weight: int = 1, vocab_size: int = 1000, page_size: int = 4, num_pages: int = 256):
        self.weight, self.vocab_size = prefill_weight, vocab_size
        self.allocator = PageAllocator(num_pages, page_size)
        self._held: dict[str, tuple[list[int], list[int]]] = {}

    def prefill(self, requests: list[Request]) -> list[PrefillOutput]:
        outs = []
        for r in requests:
            pages = self.allocator.allocate(self.allocator.pages_for(len(r.prompt_ids)))
            self._held[r.request_id] = (pages, list(r.prompt_ids))
            first = (sum(r.prompt_ids) * self.weight) % self.vocab_size
            outs.append(PrefillOutput(r.request_id, len(r.prompt_ids), first, -1.0, pages))
        return outs

    def read_kv(self, out: PrefillOutput) -> KVPayload:
        _, prompt = self._held[out.request_id]
        G = self.allocator.page_size
        kv = np.zeros((1, len(out.pages) * G, 1, 1), np.float32)
        kv[0, : len(prompt), 0, 0] = np.asarray(prompt) + np.arange(len(prompt))
        kv = kv.reshape(1, len(out.pages), G, 1, 1)
        return KVPayload(k=kv, v=kv.copy(), num_tokens=len(prompt))

    def release(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None:
            self.allocator.free(held[0])


class MockDecodeEngine:
    def __init__(self, decode_weight: int = 1, vocab_size: int = 1000, max_slots: int = 4,
                 page_size: int = 4, num_pages: int = 256, eos_ids: tuple[int, ...] = (), step_delay_s: float = 0.0):
        self.weight, self.vocab_size, self.max_slots = decode_weight, vocab_size, max_slots
        self.allocator = PageAllocator(num_pages, page_size)
        self.eos_ids, self.step_delay_s = eos_ids, step_delay_s
        self._running: dict[str, Sequence] = {}
        self.received_kv: dict[str, np.ndarray] = {}  # what each request's "K" looked like on arrival

    @property
    def num_running(self) -> int:
        return len(self._running)

    def can_insert(self, prompt_len: int, max_tokens: int) -> bool:
        need = self.allocator.pages_for(prompt_len + max_tokens)
        return len(self._running) < self.max_slots and self.allocator.can_allocate(need)

    def insert(self, request: Request, out: PrefillOutput, payload: KVPayload | None) -> TokenOutput:
        if payload is not None:
            self.received_kv[request.request_id] = payload.k.reshape(-1)[: payload.num_tokens].copy()
        pages = self.allocator.allocate(self.allocator.pages_for(out.prompt_len + request.params.max_tokens))
        seq = Sequence(request, pages, out.prompt_len, self.eos_ids)
        o = seq.append(out.first_token, out.first_logprob)
        if o.is_finished:
            self.allocator.free(pages)
        else:
            self._running[request.request_id] = seq
        return o

    def decode_step(self, max_steps: int | None = None) -> list[TokenOutput]:
        """One step for every running request (the mock ignores `max_steps`)."""
        time.sleep(self.step_delay_s)  # a slower "device", for failure tests
        outs = []
        for rid, seq in list(self._running.items()):
            o = seq.append((seq.last_token + self.weight) % self.vocab_size, -1.0)
            if o.is_finished:
                self.allocator.free(self._running.pop(rid).pages)
            outs.append(o)
        return outs

    def release(self, request_id: str) -> TokenOutput | None:
        seq = self._running.pop(request_id, None)
        if seq is None:
            return None
        self.allocator.free(seq.pages)
        return TokenOutput(request_id, -1, 0.0, FINISH_ABORT)
