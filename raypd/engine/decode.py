"""Decode engine: continuous batching of up to `max_slots` requests over the page pool.

Each `decode_step`:
  1. lays the running sequences out as rows of a batch (bucketed to a power of two; rows are
     free to move between steps because all per-request K/V lives in pages),
  2. runs one jitted forward + sample with the pool donated,
  3. fetches every row's token and logprob in one device-to-host transfer,
  4. applies stop checks on the host; finished requests leave at once, their pages freed.
New requests are inserted between steps, as soon as their K/V is in the pool.
Pages for prompt + max_tokens are reserved at insert, so a running request never waits for
memory and is never preempted.
"""

from __future__ import annotations

from raypd.engine.api import FINISH_ABORT, KVPayload, PrefillOutput, Request, TokenOutput
from raypd.engine.pages import OutOfPages
from raypd.engine.prefill import request_seed
from raypd.engine.runner import ModelRunner, bucket
from raypd.engine.sequence import Sequence


class DecodeEngine:
    def __init__(self, runner: ModelRunner, tokenizer=None, eos_ids: tuple[int, ...] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids if eos_ids is not None else runner.cfg.eos_token_ids)
        self._running: dict[str, Sequence] = {}
        # When set, a request that finishes keeps one reference on its full pages (prompt and
        # generated tokens with K/V in the pool), listed in `finished` as (request_id, token
        # ids of those pages, pages) for the caller to cache or free.
        self.retain_finished = False
        self.finished: list[tuple[str, list[int], list[int]]] = []

    @property
    def allocator(self):
        return self.runner.allocator

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return self.runner.config.max_slots - len(self._running)

    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        return self.allocator.pages_for(prompt_len + max_tokens)

    def can_insert(self, prompt_len: int, max_tokens: int, held_pages: int = 0) -> bool:
        return (self.num_free_slots > 0 and
                self.allocator.can_allocate(self.pages_needed(prompt_len, max_tokens) - held_pages))

    def insert(self, request: Request, out: PrefillOutput, payload: KVPayload | None = None) -> TokenOutput:
        """Start decoding a prefilled request; returns its first token's output.

        payload None: the K/V is already in this engine's pool (`out.pages`, shared pool), and a
        reference is taken on those pages. Otherwise the payload is written into new pages.
        """
        if request.request_id in self._running:
            raise ValueError(f"request {request.request_id} is already running")
        if self.num_free_slots <= 0:
            raise OutOfPages("no free decode slot")
        need = self.pages_needed(out.prompt_len, request.params.max_tokens)
        if payload is None:
            pages = list(out.pages)
            if not self.allocator.can_allocate(need - len(pages)):
                raise OutOfPages(f"request {request.request_id}: needs {need - len(pages)} more pages")
            self.allocator.incref(pages)
        else:
            if not self.allocator.can_allocate(need):
                raise OutOfPages(f"request {request.request_id}: needs {need} pages")
            pages = self.allocator.allocate(payload.k.shape[1])
            self.runner.write_pages(pages, payload.k, payload.v)
        if need > len(pages):
            pages += self.allocator.allocate(need - len(pages))
        seq = Sequence(request, pages, out.prompt_len, self.eos_ids, self.tokenizer)
        token_out = seq.append(out.first_token, out.first_logprob)
        if token_out.is_finished:
            self.allocator.free(pages)
        else:
            self._running[request.request_id] = seq
        return token_out

    def decode_step(self) -> list[TokenOutput]:
        if not self._running:
            return []
        r = self.runner
        G = r.page_size
        seqs = list(self._running.values())
        B = bucket(len(seqs), r.batch_buckets)
        Pc = bucket(max(r.allocator.pages_for(s.next_position) for s in seqs), r.page_buckets)
        batch, sampling = r.empty_batch(B, 1, 1, Pc)
        for i, s in enumerate(seqs):
            pos = s.next_position  # K/V of positions < pos is in the pages
            batch["tokens"][i, 0] = s.last_token
            batch["positions"][i, 0] = pos
            batch["segments"][i, 0] = 0
            batch["write_pages"][i, 0] = s.pages[pos // G]
            batch["write_offsets"][i, 0] = pos % G
            ctx = s.pages[:Pc]
            batch["ctx_pages"][i, : len(ctx)] = ctx
            batch["ctx_lens"][i] = pos
            sp = s.request.params
            sampling["temperature"][i] = sp.temperature
            sampling["top_k"][i] = sp.top_k
            sampling["top_p"][i] = sp.top_p
            sampling["min_p"][i] = sp.min_p
            sampling["seed"][i] = request_seed(s.request)
            sampling["position"][i] = pos + 1
        tokens, logprobs = r.run(batch, sampling)
        outs = []
        for i, s in enumerate(seqs):
            o = s.append(int(tokens[i]), float(logprobs[i]))
            if o.is_finished:
                self._finish(s.request_id)
            outs.append(o)
        return outs

    def _finish(self, request_id: str, retain: bool = True) -> None:
        seq = self._running.pop(request_id)
        if retain and self.retain_finished:
            n = seq.next_position // self.runner.page_size  # full pages with K/V written
            if n:
                keep = seq.pages[:n]
                self.allocator.incref(keep)
                tokens = (list(seq.request.prompt_ids) + seq.output_ids)[: n * self.runner.page_size]
                self.finished.append((request_id, tokens, keep))
        self.allocator.free(seq.pages)

    def release(self, request_id: str) -> TokenOutput | None:
        """Abort a running request; its slot and pages are freed now."""
        seq = self._running.get(request_id)
        if seq is None:
            return None
        self._finish(request_id, retain=False)
        return TokenOutput(request_id, -1, 0.0, FINISH_ABORT)

    def sequence(self, request_id: str) -> Sequence | None:
        return self._running.get(request_id)

