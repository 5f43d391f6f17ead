"""A discrete-event simulation of a deployment: the scheduler core (scheduler/core.py) runs
unchanged on a virtual clock; workers are models driven by a profile's cost model.

What runs, per event (seconds on the virtual clock):
  arrival       the client submits; the core admits, places or rejects it (the same code as
                the Ray actor runs).
  prefill done  a prefill worker runs one call at a time, its tasks back to back, each taking
                `cost.predict_prefill_s(uncached, cached)`; the results go to the core, whose
                Insert puts the requests in their decode worker's inbox.
  decode iteration  a decode worker loops while it has work, as raypd's decode worker does:
                receive every inserted request's K/V (`cost.predict_transfer_s` of its bytes,
                in the loop, as `recv_into` is), run one chunk of the local prefills (at most
                `prefill_chunk_len` tokens), then one decode step for every running slot
                (`cost.predict_decode_step_s(batch, context)`), plus `iteration_overhead_s`.
                Its report reaches the core at the iteration's end.
Clients see tokens `delivery_s` after the report that carries them arrives. Pages are counted
like the engines do (prompt + max_tokens reserved per slot, full pages retained for the KV store) so placement, eviction
and prefix reuse behave as deployed. Pure Python: no Ray, threads or asyncio.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import types
from collections import deque
from typing import Sequence

from scheduler import core
from scheduler.cost_model import CostModel
from scheduler.kv_store import ExportPages, FreePages, KVStore
from scheduler.policy import PolicyConfig
from scheduler.state import Token


@dataclasses.dataclass(frozen=True)
class WorkerProfile:
    """What one worker costs and holds (`tp` devices: a tensor-parallel worker spans several)."""

    cost: CostModel
    num_pages: int  # its page pool
    page_size: int
    max_slots: int  # decode batch capacity
    max_seq_len: int
    prefill_chunk_len: int = 256  # a decode worker's local prefill chunk per iteration
    iteration_overhead_s: float = 0.0  # host work per decode iteration (scheduling, the report RPC)
    delivery_s: float = 0.0  # a token's way from the worker's report to the client (RPCs, the client's poll)
    device: str = "unknown"
    tp: int = 1  # devices per worker

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")


@dataclasses.dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass
class SimResult:
    """One request as its client saw it (seconds on the virtual clock)."""

    arrival_s: float
    prompt_len: int
    max_tokens: int
    status: str = "ok"  # ok | rejected | failed
    token_s: list[float] = dataclasses.field(default_factory=list)  # arrival time of each token
    end_s: float | None = None
    error: str | None = None
    placement: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Params:  # what the core and the fake engines read of sampling parameters
    max_tokens: int
    min_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: _Params
    kv_compression: str | None = None
    resumed_len: int = 0


def _make_request(rid, prompt_ids, params, kv_compression):
    return _Request(rid, list(prompt_ids), _Params(params.max_tokens), kv_compression)


class _Pool:
    def __init__(self, num_pages: int):
        self.num_pages, self.used = num_pages, set()
        self._next = itertools.count(1)

    def allocate(self, n: int) -> list[int]:
        pages = [next(self._next) for _ in range(max(0, n))]
        self.used.update(pages)
        return pages

    def free(self, pages) -> None:
        self.used.difference_update(pages)

    @property
    def num_free(self) -> int:
        return self.num_pages - len(self.used)


class _PrefillWorker:
    def __init__(self, profile: WorkerProfile):
        self.profile, self.pool = profile, _Pool(profile.num_pages)
        self.calls: deque = deque()
        self.busy = False
        self.transfers: dict[str, list[int]] = {}


class _DecodeWorker:
    def __init__(self, profile: WorkerProfile):
        self.profile, self.pool = profile, _Pool(profile.num_pages)
        self.inbox: list = []
        self.window = None  # (report, stepping, step end times) of a multi-step iteration under way
        self.generation = 0  # bumped for each scheduled report; a stale one is dropped
        self.local: deque = deque()  # [task, tokens done]
        self.running: dict[str, list] = {}  # rid -> [request, tokens so far, pages]
        self.busy = False


class Simulator:
    """`Simulator(profile, num_prefill, num_decode, policy).run(requests, ttft_slo_s)`.

    `profile` is the decode workers' (and the prefill workers' unless `prefill_profile` is
    given: pools of different tensor-parallel degrees). As in a deployment, the scheduler's one
    cost model takes its prefill and transfer costs from the prefill pool and its decode cost
    from the decode pool."""

    def __init__(self, profile: WorkerProfile, num_prefill: int, num_decode: int,
                 policy: PolicyConfig = PolicyConfig(), cache_bytes: int | None = None, prefix_cache: bool = True,
                 multi_step: bool = True, rebalancer=None, worker_startup_s: float = 5.0,
                 prefill_profile: WorkerProfile | None = None):
        if num_decode < 1 or num_prefill < 0:
            raise ValueError(f"need num_decode >= 1 and num_prefill >= 0, got {num_decode}, {num_prefill}")
        pp = prefill_profile or profile
        if pp.page_size != profile.page_size:
            raise ValueError(f"prefill and decode pools need one page size, got {pp.page_size} and {profile.page_size}")
        self.profile, self.prefill_profile = profile, pp
        self.prefix_cache = prefix_cache  # workers retain full pages for the KV store (off: faster, no reuse)
        self.multi_step = multi_step  # idle stretches of decode steps in one event (same times, fewer events)
        self.rebalancer = rebalancer  # scheduler.rebalancer.Rebalancer: moves workers between roles while running
        self.worker_startup_s = worker_startup_s  # a replacement worker's start-up (engines built, compiled)
        self.moves: list[tuple[float, tuple[int, int]]] = []  # (time, (num_prefill, num_decode)) of each move
        self._num_arrived = self._num_requests = 0
        p = profile
        kv_bytes_per_page = p.cost.kv_bytes_per_token * p.page_size
        self.workers: dict[str, object] = {**{f"prefill-{i}": _PrefillWorker(pp) for i in range(num_prefill)},
                                           **{f"decode-{i}": _DecodeWorker(p) for i in range(num_decode)}}
        states = {w: self._state(core.PREFILL if isinstance(x, _PrefillWorker) else core.DECODE)
                  for w, x in self.workers.items()}
        pool_bytes = sum(x.profile.num_pages for x in self.workers.values()) * kv_bytes_per_page
        store = KVStore(p.page_size, kv_bytes_per_page, cache_bytes if cache_bytes is not None else pool_bytes // 2)
        cost = dataclasses.replace(p.cost, prefill_coefs=pp.cost.prefill_coefs,
                                   transfer_latency_s=pp.cost.transfer_latency_s,
                                   transfer_bytes_per_s=pp.cost.transfer_bytes_per_s)
        self.core = core.SchedulerCore("sim", states, store, cost, policy)
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.results: dict[str, SimResult] = {}

    # -- the event loop ------------------------------------------------------------------------
    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, requests: Sequence[SimRequest], ttft_slo_s: float | None = None) -> list[SimResult]:
        for r in requests:
            self._at(r.arrival_s, self._arrive, r, ttft_slo_s)
        self._num_requests += len(requests)
        if self.rebalancer is not None:
            self._at(self.rebalancer.config.interval_s, self._rebalance)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
            if self.core.news:
                self._poll(list(self.core.news))
        out = list(self.results.values())
        left = [rid for rid, res in self.results.items() if res.end_s is None]
        if left:
            raise RuntimeError(f"simulation ended with {len(left)} requests unfinished: {self.core.stats()}")
        return out

    def _apply(self, actions: list) -> None:
        for a in actions:
            w = self.workers.get(getattr(a, "worker", None))
            if w is None and not isinstance(a, (core.ReplaceWorker, core.ProbeWorker)):
                continue  # a retired worker: nothing of it is left to act on
            if isinstance(a, core.RunPrefill):
                w.calls.append(a)
                self._kick_prefill(a.worker)
            elif isinstance(a, (core.RunLocalPrefill, core.Insert, core.AbortOnWorker)):
                w.inbox.append(a)
                self._kick_decode(a.worker)
            elif isinstance(a, FreePages):
                w.pool.free(a.pages)
            elif isinstance(a, core.ReleaseTransfers):
                for h in a.handles:
                    w.pool.free(w.transfers.pop(h.transfer_id, ()))
            elif isinstance(a, core.RetireWorker):
                del self.workers[a.worker]
            elif isinstance(a, core.ReplaceWorker):  # a new worker serves after its start-up time
                self._at(self.now + self.worker_startup_s, self._join, a.new_worker, a.role)
            elif isinstance(a, (ExportPages, core.ProbeWorker)):
                pass  # no host tier and no failures in the model
            else:
                raise TypeError(a)

    def _poll(self, rids) -> None:
        for rid, entry in self.core.poll(list(rids)).items():
            res = self.results.get(rid)
            if res is None:
                continue
            if entry["finished"]:
                res.end_s = self.now + (self.profile.delivery_s if res.token_s else 0.0)
                m = entry["metrics"]
                res.placement = dict(prefill_worker=m.get("prefill_worker"), decode_worker=m.get("decode_worker"),
                                     is_local_prefill=m.get("is_local_prefill"))
                if entry["error"] is not None:
                    res.status, res.error = "failed", entry["error"][1]

    def _state(self, role: str) -> core.WorkerState:
        p = self.prefill_profile if role == core.PREFILL else self.profile
        return core.WorkerState(role, p.num_pages, p.max_slots, p.num_pages, p.max_slots)

    def _join(self, name: str, role: str) -> None:
        self.workers[name] = _PrefillWorker(self.prefill_profile) if role == core.PREFILL else _DecodeWorker(self.profile)
        self._apply(self.core.worker_joined(name, self._state(role), self.now))

    def _rebalance(self) -> None:
        """Every `rebalancer.config.interval_s` while requests remain: ask, and move workers."""
        roles = [s.role for s in self.core.workers.values()]
        if not self.core.draining and not self.core.joining:
            backlog = [(r.spec.prompt_len, r.spec.max_tokens - len(r.generated))
                       for r in self.core.requests.values() if not r.is_finished]
            split = self.rebalancer.recommend(self.now, roles.count(core.PREFILL), roles.count(core.DECODE), backlog)
            if split is not None:
                self.moves.append((self.now, split))
                self._apply(self.core.set_roles(*split, self.now))
        if self._num_arrived < self._num_requests or self.core.requests:
            self._at(self.now + self.rebalancer.config.interval_s, self._rebalance)

    # -- clients -------------------------------------------------------------------------------
    def _arrive(self, r: SimRequest, ttft_slo_s: float | None) -> None:
        params = _Params(r.max_tokens)
        self._num_arrived += 1
        result, actions = self.core.submit([(list(r.prompt_ids), params, None)], ttft_slo_s, self.now,
                                           make_request=_make_request)
        if isinstance(result, list):
            self.results[result[0]] = SimResult(r.arrival_s, len(r.prompt_ids), r.max_tokens)
            if self.rebalancer is not None:
                self.rebalancer.observe(self.now, len(r.prompt_ids), r.max_tokens)
        else:
            key = f"rejected-{next(self._seq)}"
            self.results[key] = SimResult(r.arrival_s, len(r.prompt_ids), r.max_tokens, "rejected",
                                          end_s=self.now, error=result[1])
        self._apply(actions)

    # -- prefill workers -----------------------------------------------------------------------
    def _kick_prefill(self, name: str) -> None:
        w = self.workers.get(name)
        if w is None or w.busy or not w.calls:
            return
        call = w.calls.popleft()
        w.busy = True
        cost, G = w.profile.cost, w.profile.page_size
        duration = sum(cost.predict_prefill_s(len(t.request.prompt_ids) - len(t.prefix_pages) * G,
                                              len(t.prefix_pages) * G) for t in call.tasks)
        self._at(self.now + duration, self._prefill_done, name, call, duration)

    def _prefill_done(self, name: str, call: core.RunPrefill, duration: float) -> None:
        w = self.workers[name]
        w.busy = False
        G = self.profile.page_size
        results = []
        for t in call.tasks:
            n, num_prefix = len(t.request.prompt_ids), len(t.prefix_pages)
            cached = w.pool.allocate(n // G - num_prefix) if self.prefix_cache else []
            tid = f"tr-{t.call_id}"
            w.transfers[tid] = w.pool.allocate(-(-n // G))
            handle = types.SimpleNamespace(transfer_id=tid, backend="sim", compression="none", num_tokens=n,
                                           num_bytes=w.profile.cost.kv_bytes(n))
            results.append(types.SimpleNamespace(
                output=types.SimpleNamespace(request_id=t.request.request_id, prompt_len=n), handle=handle,
                cached_pages=cached, num_prefix_pages=num_prefix, num_computed_tokens=n - num_prefix * G,
                prefill_s=duration / len(call.tasks), sample_outputs=[]))  # the simulator has no n > 1
        self._apply(self.core.prefill_done(name, call.tasks, results, self.now, num_free_pages=w.pool.num_free))
        self._kick_prefill(name)

    # -- decode workers ------------------------------------------------------------------------
    def _kick_decode(self, name: str) -> None:
        w = self.workers.get(name)
        if w is None:  # retired meanwhile
            return
        if not w.busy and (w.inbox or w.local or w.running):
            w.busy = True
            self._iterate(name)
        elif w.busy and w.inbox and w.window is not None:  # new work: end the window at the next step
            report, stepping, times = w.window
            j = bisect.bisect_left(times, self.now)
            if j + 1 < len(times):
                w.generation += 1
                w.window = None
                self._at(times[j], self._report, name, report, stepping, times[:j + 1], w.generation)

    def _iterate(self, name: str) -> None:
        """One decode-worker iteration (module doc); its report lands at its end."""
        w, p = self.workers[name], self.profile
        cost, G = p.cost, p.page_size
        report = types.SimpleNamespace(tokens={}, errors={}, retryable=[], started=[], received=[], prefilled=[],
                                       finished=[])
        duration = p.iteration_overhead_s
        inbox, w.inbox = w.inbox, []
        for a in inbox:
            if isinstance(a, core.Insert):
                for req, out, handle in a.items:
                    recv_s = cost.predict_transfer_s(handle.num_bytes)
                    duration += recv_s
                    report.received.append((handle, recv_s))
                    self._start(w, req, report, first_done=True)
            elif isinstance(a, core.RunLocalPrefill):
                w.local.extend([t, len(t.prefix_pages) * G] for t in a.tasks)
            else:  # AbortOnWorker
                for rid in a.request_ids:
                    if rid in w.running:
                        w.pool.free(w.running.pop(rid)[2])
                        report.tokens.setdefault(rid, []).append(Token(-1, 0.0, "abort", ""))
                    for job in list(w.local):
                        if job[0].request.request_id == rid:
                            w.local.remove(job)
                            report.errors[rid] = "aborted"
                            report.started.append(rid)
        is_plain_step = not inbox and not w.local  # nothing but decode steps this iteration
        if w.local:  # one chunk of the head local prefill
            job = w.local[0]
            task, done = job
            n = len(task.request.prompt_ids)
            chunk = min(p.prefill_chunk_len, n - done)
            duration += cost.predict_prefill_s(chunk, done)
            job[1] += chunk
            if job[1] >= n:
                w.local.popleft()
                num_prefix = len(task.prefix_pages)
                cached = w.pool.allocate(n // G - num_prefix) if self.prefix_cache else []
                report.prefilled.append(types.SimpleNamespace(
                    output=types.SimpleNamespace(request_id=task.request.request_id), cached_pages=cached,
                    num_prefix_pages=num_prefix, num_computed_tokens=n - num_prefix * G, prefill_s=0.0))
                self._start(w, task.request, report, first_done=True)
        stepping = [rid for rid in w.running if rid not in report.tokens]
        times = [self.now + duration]
        if stepping:
            # Nothing else to do: run until the first request ends in one event (a window that
            # new work cuts short at the next step, `_kick_decode`). Each step as in the loop.
            k = 1 if not (is_plain_step and self.multi_step) else min(
                w.running[r][0].params.max_tokens - len(w.running[r][1]) for r in stepping)
            B = len(stepping)
            context = sum(len(w.running[r][0].prompt_ids) + len(w.running[r][1]) for r in stepping)
            t = self.now + duration - p.iteration_overhead_s
            times = []
            for i in range(k):
                t += cost.predict_decode_step_s(B, context + i * B) + p.iteration_overhead_s
                times.append(t)
        w.generation += 1
        w.window = (report, stepping, times) if len(times) > 1 else None
        self._at(times[-1], self._report, name, report, stepping, times, w.generation)

    def _start(self, w: _DecodeWorker, req, report, first_done: bool) -> None:
        rid = req.request_id
        pages = w.pool.allocate(-(-(len(req.prompt_ids) + req.params.max_tokens) // self.profile.page_size))
        report.started.append(rid)
        if req.params.max_tokens == 1:
            w.pool.free(pages)
            report.tokens.setdefault(rid, []).append(Token(0, 0.0, "length", ""))
        else:
            w.running[rid] = [req, [0], pages]
            report.tokens.setdefault(rid, []).append(Token(0, 0.0, None, ""))

    def _report(self, name: str, report, stepping: list[str], times: list[float], generation: int) -> None:
        if name not in self.workers:
            return
        w, G = self.workers[name], self.profile.page_size
        if generation != w.generation:
            return  # a window cut short: its report went out earlier
        w.window = None
        for rid in report.tokens:  # first tokens (and aborts) of this iteration, at its end
            if rid in self.results:
                self.results[rid].token_s.extend(times[0] + self.profile.delivery_s
                                                 for t in report.tokens[rid] if t.token_id >= 0)
        for rid in stepping:
            if rid not in w.running:
                continue
            req, toks, pages = w.running[rid]
            toks.extend([0] * len(times))
            done = len(toks) >= req.params.max_tokens
            report.tokens.setdefault(rid, []).extend(Token(0, 0.0, None, "") for _ in times[1:])
            report.tokens[rid].append(Token(0, 0.0, "length" if done else None, ""))
            if rid in self.results:
                self.results[rid].token_s.extend(t + self.profile.delivery_s for t in times)
            if done:
                del w.running[rid]
                seq = list(req.prompt_ids) + toks
                keep = (len(seq) - 1) // G if self.prefix_cache else 0
                w.pool.free(pages[keep:])
                if keep:
                    report.finished.append((rid, seq[:keep * G], pages[:keep]))
        report.num_free_pages, report.num_free_slots = w.pool.num_free, self.profile.max_slots - len(w.running)
        report.num_running = len(w.running)
        report.context_len = sum(len(r[0].prompt_ids) + len(r[1]) for r in w.running.values())
        self._apply(self.core.decode_report(name, report, self.now))
        w.busy = False
        self._kick_decode(name)
