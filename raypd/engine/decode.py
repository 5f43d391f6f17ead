"""Decode engine: continuous batching of up to `max_slots` requests over the page pool.

The batch lives on the device (raypd/engine/decode_state.py): every slot's last token, position,
page table, sampling parameters and stop ids. The host keeps a mirror it can compute without
reading the device (which request is in which row, how far each was dispatched). Lifecycle:
  1. `insert` reserves pages for prompt + max_tokens (a running request never waits for memory
     and is never preempted) and queues its row; the row reaches the device with the next
     dispatch, in one `RowUpdate` together with every other row change since the last one.
  2. `decode_step` dispatches the next steps: one program, no host->device arrays (the step
     count is a pre-placed scalar), up to `max_decode_steps` steps in one dispatch when the
     caller allows it and no running request has stop strings (only the host can match text).
     The sampled tokens start an asynchronous copy to the host.
  3. It then reads the *previous* dispatch's tokens (overlap=True: the device already runs the
     new steps while the host does this) and applies them to the sequences: stop checks, text,
     finished requests freeing their slot and pages. So a call returns the tokens of the
     previous dispatch, possibly several per request, each request's in order.
  4. A request that finishes on the host only (a stop string) was dispatched one step further
     on the device; that token is discarded, and the K/V it wrote lies in the request's own
     pages past its end. Stop ids and the token budget are also checked on the device, which
     stops the row at exactly the token the host stops at.
Everything the device computes is chained through the pool and the state (both donated), so
pages freed here and reused by a later insert or prefill are only written after the in-flight
steps that may still touch them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from raypd.engine import decode_state
from raypd.engine.api import FINISH_ABORT, MAX_LOGIT_BIAS, KVPayload, PrefillOutput, Request, TokenOutput
from raypd.engine.pages import OutOfPages
from raypd.engine.prefill import penalty_prompt_len, request_seed, set_penalties, top_pairs
from raypd.engine.sampling import MAX_SUPPRESS_IDS, suppress_ids
from raypd.engine.runner import ModelRunner, bucket
from raypd.engine.sequence import Sequence

MAX_STOP_IDS = decode_state.MAX_STOP_IDS


@dataclasses.dataclass
class _Dispatched:
    """What the device was asked to do for one request, as far as the host can tell."""

    position: int  # position of the token the next dispatch feeds
    remaining: int  # tokens the device may still produce for it


@dataclasses.dataclass
class _InFlight:
    rows: list[Sequence]  # row i of the dispatch
    num_steps: int
    tokens: jax.Array  # [k, B]
    logprobs: jax.Array  # [k, B]
    top_ids: jax.Array | None  # [k, B, K]; None when no row asked for alternatives
    top_logprobs: jax.Array | None  # [k, B, K]


class DecodeEngine:
    def __init__(self, runner: ModelRunner, tokenizer=None, eos_ids: tuple[int, ...] | None = None,
                 overlap: bool = True):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids if eos_ids is not None else runner.cfg.eos_token_ids)
        self.overlap = overlap  # read a dispatch's tokens on the next call (False: on this one)
        self._running: dict[str, Sequence] = {}
        self._dispatched: dict[str, _Dispatched] = {}
        self._layout: list[Sequence] = []  # rows as the device holds them after the last update
        self._new: list[Sequence] = []  # inserted since the last update
        self._is_dirty = False  # rows changed since the last update
        self._state = runner.new_decode_state()
        self._table = runner.new_penalty_table()  # one row per slot, held by a running request
        self._free_table_rows = list(range(runner.config.max_slots))
        self._table_row: dict[str, int] = {}
        self._inflight: _InFlight | None = None
        # When set, a request that finishes keeps one reference on its full pages (prompt and
        # generated tokens with K/V in the pool), listed in `finished` as (request_id, token
        # ids of those pages, pages) for the caller to cache or free.
        self.retain_finished = False
        self.finished: list[tuple[str, list[int], list[int]]] = []
        self.num_dispatches = 0
        self.num_row_updates = 0

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
        return self._start(request, out, pages)

    def fork(self, request: Request, out: PrefillOutput, own_pages: list[int] | None = None) -> TokenOutput:
        """Start decoding another sample of a prompt whose K/V is in this pool (`out.pages`, held
        by someone else: its prefill or its first sample, inserted in the same step): its full
        prompt pages are shared (a reference is taken), the partial last one is copied into a
        page of its own, since the sample writes its tokens' K/V there. `own_pages`: pages
        already allocated for it (ownership passes here), else they are allocated now.
        Returns its first token's output (`out.first_token`, sampled with its own seed)."""
        if request.request_id in self._running:
            raise ValueError(f"request {request.request_id} is already running")
        if self.num_free_slots <= 0:
            raise OutOfPages("no free decode slot")
        num_shared = out.prompt_len // self.runner.page_size
        need = self.pages_needed(out.prompt_len, request.params.max_tokens) - num_shared
        if own_pages is None:
            if not self.allocator.can_allocate(need):
                raise OutOfPages(f"request {request.request_id}: needs {need} pages")
            own_pages = self.allocator.allocate(need)
        elif len(own_pages) != need:
            raise ValueError(f"request {request.request_id}: own_pages must be {need} pages, got {len(own_pages)}")
        shared = list(out.pages[:num_shared])
        self.allocator.incref(shared)
        if out.prompt_len % self.runner.page_size:
            self.runner.copy_pages([out.pages[num_shared]], own_pages[:1])
        return self._start(request, out, shared + list(own_pages))

    def _start(self, request: Request, out: PrefillOutput, pages: list[int]) -> TokenOutput:
        seq = Sequence(request, pages, out.prompt_len, self.eos_ids, self.tokenizer)
        token_out = seq.append(out.first_token, out.first_logprob, out.first_top_logprobs)
        token_out.prompt_logprobs = out.prompt_logprobs
        if token_out.is_finished:
            self.allocator.free(pages)
        else:
            self._running[request.request_id] = seq
            self._table_row[request.request_id] = row = self._free_table_rows.pop()
            if request.params.is_penalized:
                self._write_table_row(row, seq)
            self._dispatched[request.request_id] = _Dispatched(
                seq.next_position, request.params.max_tokens - len(seq.output_ids))
            self._new.append(seq)
            self._is_dirty = True
        return token_out

    def decode_step(self, max_steps: int | None = None) -> list[TokenOutput]:
        """Dispatch the next decode steps and return the tokens of the previous dispatch (of
        this one when overlap is off). max_steps: steps one dispatch may run (None: the
        engine's `max_decode_steps`; pass 1 while other work waits for this loop)."""
        limit = self.runner.config.max_decode_steps if max_steps is None else max_steps
        if not 1 <= limit <= self.runner.config.max_decode_steps:
            raise ValueError(f"max_steps must be in [1, {self.runner.config.max_decode_steps}] "
                             f"(EngineConfig.max_decode_steps) or None, got {max_steps}")
        previous, self._inflight = self._inflight, self._dispatch(limit)
        outs = self._collect(previous) if previous is not None else []
        if not self.overlap and self._inflight is not None:
            current, self._inflight = self._inflight, None
            outs += self._collect(current)
        return outs

    def flush(self) -> list[TokenOutput]:
        """Read the in-flight dispatch, if any, without dispatching more."""
        current, self._inflight = self._inflight, None
        return self._collect(current) if current is not None else []

    def _dispatch(self, limit: int) -> _InFlight | None:
        self._update_rows()
        rows = self._layout
        todo = [(s, self._dispatched[s.request_id]) for s in rows
                if s.finish_reason is None and self._running.get(s.request_id) is s]
        todo = [(s, d) for s, d in todo if d.remaining > 0]
        if not todo:
            return None
        has_stop_text = self.tokenizer is not None and any(s.request.params.stop for s, _ in todo)
        n = 1 if has_stop_text else min(limit, max(d.remaining for _, d in todo))
        last = max(d.position + min(n, d.remaining) - 1 for _, d in todo)  # context of the last step
        r = self.runner
        Pc = bucket(max(1, r.allocator.pages_for(last)), r.page_buckets)
        B = bucket(len(rows), r.batch_buckets)
        with_top = any(s.request.params.top_logprobs for s, _ in todo)
        self._state, self._table, tokens, logprobs, top_ids, top_lps = r.decode(
            self._state, self._table, n, B, Pc, with_top)
        for _, d in todo:
            k = min(n, d.remaining)
            d.position += k
            d.remaining -= k
        self.num_dispatches += 1
        return _InFlight(list(rows), n, tokens, logprobs, top_ids if with_top else None,
                         top_lps if with_top else None)

    def _collect(self, f: _InFlight) -> list[TokenOutput]:
        tokens, logprobs = np.asarray(f.tokens), np.asarray(f.logprobs)
        top_ids = top_lps = None
        if f.top_ids is not None:
            top_ids, top_lps = np.asarray(f.top_ids), np.asarray(f.top_logprobs)
        outs = []
        for j in range(f.num_steps):
            for i, s in enumerate(f.rows):
                if s.finish_reason is not None or self._running.get(s.request_id) is not s:
                    continue  # finished (or aborted) before this step: its token is discarded
                k = s.request.params.top_logprobs
                top = top_pairs(top_ids[j, i], top_lps[j, i], k) if k else None
                o = s.append(int(tokens[j, i]), float(logprobs[j, i]), top)
                if o.is_finished:
                    self._finish(s.request_id)
                outs.append(o)
        return outs

    def _update_rows(self) -> None:
        """Send the row changes since the last dispatch to the device, in one program."""
        if not self._is_dirty:
            return
        old = {id(s): i for i, s in enumerate(self._layout)}
        kept = [s for s in self._layout if self._running.get(s.request_id) is s]
        new = [s for s in self._new if self._running.get(s.request_id) is s]
        layout = kept + new
        S, P = self.runner.config.max_slots, self.runner.max_pages_per_seq
        perm = np.arange(S, dtype=np.int32)
        perm[: len(kept)] = [old[id(s)] for s in kept]
        is_new = np.zeros(S, bool)
        rows = decode_state.empty_state(S, P, MAX_STOP_IDS)
        for i, s in enumerate(new, start=len(kept)):
            p, d = s.request.params, self._dispatched[s.request_id]
            is_new[i] = True
            rows.tokens[i] = s.last_token
            rows.positions[i] = d.position
            rows.pages[i, : len(s.pages)] = s.pages
            rows.active[i] = d.remaining > 0
            rows.remaining[i] = d.remaining
            stops = [] if p.ignore_eos else [t for t in self.eos_ids]
            stops = (stops + [t for t in p.stop_token_ids if t not in stops])[:MAX_STOP_IDS]
            rows.stop_ids[i, : len(stops)] = stops
            rows.temperature[i] = p.temperature
            rows.top_k[i] = p.top_k
            rows.top_p[i] = p.top_p
            rows.min_p[i] = p.min_p
            rows.seed[i] = request_seed(s.request)
            rows.table_row[i] = self._table_row[s.request_id]
            rows.num_top_logprobs[i] = p.top_logprobs
            if p.is_penalized:
                set_penalties(vars(rows), i, s.request)
        upd = decode_state.RowUpdate(perm=perm, is_new=is_new, num_rows=np.int32(len(layout)), rows=rows)
        self._state = self.runner.update_decode_state(self._state, upd)
        self._layout, self._new, self._is_dirty = layout, [], False
        self.num_row_updates += 1

    def _write_table_row(self, row: int, seq: Sequence) -> None:
        """The penalty state of a newly inserted request: its prompt and first token(s)."""
        V, p = self.runner.cfg.vocab_size, seq.request.params
        bias_ids = np.full(MAX_LOGIT_BIAS, V, np.int32)
        bias_values = np.zeros(MAX_LOGIT_BIAS, np.float32)
        for j, (t, b) in enumerate(p.logit_bias):
            bias_ids[j], bias_values[j] = t, b
        suppress = np.full(MAX_SUPPRESS_IDS, V, np.int32)
        ids = suppress_ids(p, self.eos_ids)
        suppress[: len(ids)] = ids
        self._table = self.runner.write_table_row(
            self._table, row, list(seq.request.prompt_ids) + seq.output_ids, penalty_prompt_len(seq.request),
            bias_ids, bias_values, suppress)

    def _finish(self, request_id: str, retain: bool = True) -> None:
        seq = self._running.pop(request_id)
        self._dispatched.pop(request_id)
        self._free_table_rows.append(self._table_row.pop(request_id))
        self._is_dirty = True
        if retain and self.retain_finished:
            n = seq.next_position // self.runner.page_size  # full pages with K/V written
            if n:
                keep = seq.pages[:n]
                self.allocator.incref(keep)
                tokens = (list(seq.request.prompt_ids) + seq.output_ids)[: n * self.runner.page_size]
                self.finished.append((request_id, tokens, keep))
        self.allocator.free(seq.pages)

    def release(self, request_id: str) -> TokenOutput | None:
        """Abort a running request; its slot and pages are freed now (tokens still in flight
        for it are discarded)."""
        seq = self._running.get(request_id)
        if seq is None:
            return None
        self._finish(request_id, retain=False)
        return TokenOutput(request_id, -1, 0.0, FINISH_ABORT)

    def sequence(self, request_id: str) -> Sequence | None:
        return self._running.get(request_id)
