"""Prefill engine: prompts -> K/V in pages + the first sampled token.

`add` queues a request (optionally continuing from cached prefix pages, optionally with more
samples of the same prompt: n > 1); each `step` runs one
chunk: up to the largest prefill bucket of tokens, packing several fresh prompts into one row
(segment ids keep them apart) behind at most one prompt that continues from earlier K/V
(a cached prefix or its own previous chunk). A chunk has `max_prefill_segments` sample rows: one
per prompt, and one per sample on the last chunk of a prompt with samples. A prompt longer than the largest bucket is
prefilled chunk by chunk. `prefill` runs steps until the given requests are done.

Pages stay held after prefill until `release`, so the K/V can be read out (`read_kv`) for a
transfer, or adopted by a decode engine sharing the pool.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from raypd.engine.api import KVPayload, PrefillOutput, Request
from raypd.engine.pages import OutOfPages
from raypd.engine.runner import ModelRunner, bucket
from raypd.engine.sampling import empty_table, fill_table_row


@dataclasses.dataclass
class _Pending:
    request: Request
    pages: list[int]
    done: int  # prompt tokens whose K/V is in the pages
    num_cached: int
    samples: tuple[Request, ...] = ()  # more requests of the same prompt, each sampled from its last position

    @property
    def num_rows(self) -> int:
        """Sample rows its last chunk takes: one per request."""
        return 1 + len(self.samples)


class PrefillEngine:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._queue: deque[_Pending] = deque()
        self._held: dict[str, list[int]] = {}
        self.num_computed_tokens = 0  # prompt tokens run through the model, over the engine's life

    @property
    def allocator(self):
        return self.runner.allocator

    @property
    def num_pending(self) -> int:
        return len(self._queue)

    @property
    def num_pending_tokens(self) -> int:
        return sum(len(p.request.prompt_ids) - p.done for p in self._queue)

    def max_cached_pages(self, prompt_len: int) -> int:
        """A cached prefix may cover at most this many whole pages (one token must be computed)."""
        return (prompt_len - 1) // self.runner.page_size

    def add(self, request: Request, prefix_pages: list[int] = (), reserve_tokens: int = 0,
            samples: tuple[Request, ...] = ()) -> None:
        """Queue a request. `prefix_pages` hold K/V of its first len(prefix_pages) * G tokens
        (a reference is taken on them); `reserve_tokens` sizes the page list beyond the prompt.
        `samples`: more requests with the same prompt (n > 1): the prompt is prefilled once,
        under `request`'s id and pages, and each sample gets its own first token (its own
        params and seed) from the same last position: one PrefillOutput per request, all
        naming `request`'s pages (released with `release(request.request_id)`)."""
        n = len(request.prompt_ids)
        if n > self.runner.max_seq_len:
            raise ValueError(f"prompt has {n} tokens; max_seq_len is {self.runner.max_seq_len}")
        if 1 + len(samples) > self.runner.config.max_prefill_segments:
            raise ValueError(f"samples: at most {self.runner.config.max_prefill_segments - 1} more samples of one "
                             f"prefill (EngineConfig.max_prefill_segments), got {len(samples)}")
        if any(list(r.prompt_ids) != list(request.prompt_ids) for r in samples):
            raise ValueError("samples: every sample must have the prompt of the request it shares")
        prefix = list(prefix_pages)[: self.max_cached_pages(n)]
        need = self.allocator.pages_for(max(n, reserve_tokens)) - len(prefix)
        if not self.allocator.can_allocate(need):
            raise OutOfPages(f"request {request.request_id}: needs {need} pages, "
                             f"{self.allocator.num_free} free")
        self.allocator.incref(prefix)
        pages = prefix + self.allocator.allocate(need)
        cached = len(prefix) * self.runner.page_size
        self._held[request.request_id] = pages
        self._queue.append(_Pending(request, pages, cached, cached, tuple(samples)))

    def prefill(self, requests: list[Request], prefixes: dict[str, list[int]] | None = None,
                samples: dict[str, tuple[Request, ...]] | None = None) -> list[PrefillOutput]:
        """Queue the requests (each with its cached prefix and its more samples, `add`) and run
        steps until all are done. -> one output per request and per sample."""
        for r in requests:
            self.add(r, (prefixes or {}).get(r.request_id, ()), samples=(samples or {}).get(r.request_id, ()))
        outs: list[PrefillOutput] = []
        while self._queue:
            outs.extend(self.step())
        return outs

    def step(self, on_layers=None) -> list[PrefillOutput]:
        """Run one packed chunk; return the requests whose prompt finished in it.

        With `on_layers`, the chunk runs as one program per layer group and
        `on_layers(lo, hi, pieces)` is called as soon as layers [lo, hi) are written (while the
        later groups compute); `pieces` lists (request_id, pages, start, end) of the chunk, so
        the caller can stream those layers' K/V out (`runner.read_layer_pages`).
        """
        if not self._queue:
            return []
        pieces = self._take_pieces()
        return self._run(pieces, on_layers)

    def _take_pieces(self) -> list[tuple[_Pending, int, int]]:
        """Pick (pending, start, end) pieces for one chunk, in queue order."""
        budget, max_rows = self.runner.prefill_buckets[-1], self.runner.config.max_prefill_segments
        pieces, used, rows = [], 0, 0
        while self._queue and rows < max_rows:
            p = self._queue[0]
            n = len(p.request.prompt_ids)
            if p.done > 0 and pieces:  # a continuing prompt must lead its chunk
                break
            take = min(n - p.done, budget - used)
            if take <= 0 or (take < n - p.done and pieces):  # don't split a prompt behind others
                break
            if p.done + take == n and rows + p.num_rows > max_rows:  # its samples don't fit: next chunk
                break
            pieces.append((p, p.done, p.done + take))
            used += take
            rows += p.num_rows if p.done + take == n else 1
            if p.done + take == n:
                self._queue.popleft()
            else:  # a long prompt: its next chunk runs in a later step
                break
        for p, _, end in pieces:
            p.done = end
        return pieces

    def _run(self, pieces, on_layers=None) -> list[PrefillOutput]:
        r = self.runner
        G, R = r.page_size, r.config.max_prefill_segments
        total = sum(end - start for _, start, end in pieces)
        T = bucket(total, r.prefill_buckets)
        first_start = pieces[0][1]
        Pc = 0 if first_start == 0 else bucket(r.allocator.pages_for(first_start), r.page_buckets)
        batch, sampling = r.empty_batch(1, T, R, Pc)
        table = None  # host penalty table of the chunk's rows, made when some row needs it
        if Pc:
            ctx = pieces[0][0].pages[:Pc]
            batch["ctx_pages"][0, : len(ctx)] = ctx
            batch["ctx_lens"][0] = first_start
        at, row, rows = 0, 0, []  # rows[i]: the first sample row of piece i
        for seg, (p, start, end) in enumerate(pieces):
            n = end - start
            pos = np.arange(start, end)
            sl = slice(at, at + n)
            batch["tokens"][0, sl] = p.request.prompt_ids[start:end]
            batch["positions"][0, sl] = pos
            batch["segments"][0, sl] = seg
            batch["write_pages"][0, sl] = np.asarray(p.pages)[pos // G]
            batch["write_offsets"][0, sl] = pos % G
            rows.append(row)
            for req in (p.request, *p.samples) if end == len(p.request.prompt_ids) else (p.request,):
                batch["sample_index"][0, row] = at + n - 1
                sp = req.params
                sampling["temperature"][row] = sp.temperature
                sampling["top_k"][row] = sp.top_k
                sampling["top_p"][row] = sp.top_p
                sampling["min_p"][row] = sp.min_p
                sampling["seed"][row] = request_seed(req)
                sampling["position"][row] = end
                sampling["num_top_logprobs"][row] = sp.top_logprobs
                if sp.is_penalized and end == len(p.request.prompt_ids):  # samples the first token now
                    if table is None:
                        table = empty_table(R, r.cfg.vocab_size)
                    set_penalties(sampling, row, req)
                    fill_table_row(table, row, sp, req.prompt_ids, penalty_prompt_len(req), r.cfg.eos_token_ids)
                row += 1
            at += n
        self.num_computed_tokens += at
        if on_layers is None:
            out = r.run(batch, sampling, table)
        else:
            chunk = [(p.request.request_id, list(p.pages), start, end) for p, start, end in pieces]
            out = r.run_streamed(batch, sampling, lambda lo, hi: on_layers(lo, hi, chunk), table)
        outs = []
        for row, (p, start, end) in zip(rows, pieces):
            if end == len(p.request.prompt_ids):
                requests = (p.request, *p.samples)
                prompt_lps = r.prompt_logprobs(p.request.prompt_ids) \
                    if any(q.params.prompt_logprobs for q in requests) else None
                for i, req in enumerate(requests):
                    k = req.params.top_logprobs
                    top = top_pairs(out.top_ids[row + i], out.top_logprobs[row + i], k) if k else None
                    outs.append(PrefillOutput(req.request_id, end, int(out.tokens[row + i]),
                                              float(out.logprobs[row + i]), list(p.pages), p.num_cached,
                                              prompt_logprobs=prompt_lps if req.params.prompt_logprobs else None,
                                              first_top_logprobs=top))
        return outs

    def read_kv(self, out: PrefillOutput) -> KVPayload:
        n = self.allocator.pages_for(out.prompt_len)
        k, v = self.runner.read_pages(out.pages[:n])
        return KVPayload(k=k, v=v, num_tokens=out.prompt_len)

    def release(self, request_id: str) -> None:
        """Free the request's pages (and drop it from the queue if it was still pending)."""
        pages = self._held.pop(request_id, None)
        if pages is None:
            return
        self._queue = deque(p for p in self._queue if p.request.request_id != request_id)
        self.allocator.free(pages)


def penalty_prompt_len(request: Request) -> int:
    """Prompt tokens the repetition penalty sees as prompt (a resumed request's tail was generated)."""
    return len(request.prompt_ids) - request.resumed_len


def set_penalties(sampling: dict, i: int, request: Request) -> None:
    """Row i of a host sampling dict: the request's penalty fields (table row i)."""
    sp = request.params
    sampling["frequency_penalty"][i] = sp.frequency_penalty
    sampling["presence_penalty"][i] = sp.presence_penalty
    sampling["repetition_penalty"][i] = sp.repetition_penalty
    sampling["min_position"][i] = len(request.prompt_ids) + sp.min_tokens
    sampling["is_penalized"][i] = True


def top_pairs(ids, logprobs, k: int) -> tuple[tuple[int, float], ...]:
    """The first k (token id, logprob) pairs of one row of top alternatives."""
    return tuple((int(t), float(lp)) for t, lp in zip(ids[:k], logprobs[:k]))


def request_seed(request: Request) -> int:
    """The request's sampling seed; without one, a stable hash of its id."""
    if request.params.seed is not None:
        return int(request.params.seed)
    import zlib

    return zlib.crc32(request.request_id.encode())
