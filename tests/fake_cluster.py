"""Fake workers that carry out the scheduler core's actions in-process, step by step.

A test drives time and the workers by hand: `finish_prefills()` returns every prefill call's
results, `step(d)` runs one decode-worker iteration and feeds its report to the core, `kill(w)`
makes a worker die. The fakes keep only what the scheduler's bookkeeping needs (page counts,
slots, held transfers); every token is `(sum(prompt) + n) % 1000` for the n-th generated
token, so a resumed request's continuation can be checked by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import types

from raypd.engine.api import Request, SamplingParams
from scheduler import CostModel, PolicyConfig
from scheduler import core
from scheduler.kv_store import ExportPages, FreePages, KVStore
from scheduler.state import Token

G = 4  # tokens per page
COST = CostModel((1e-3, 2e-5, 0.0), (1e-3, 1e-4, 1e-7), 1e-3, 1e9, 16)


def token(prompt: list[int], n: int) -> int:
    return (sum(prompt) + n) % 1000


@dataclasses.dataclass
class FakeWorker:
    role: str
    num_pages: int
    max_slots: int = 0
    used: set = dataclasses.field(default_factory=set)  # pages allocated
    transfers: dict = dataclasses.field(default_factory=dict)  # transfer id -> pages held for it
    running: dict = dataclasses.field(default_factory=dict)  # rid -> [request, tokens so far, pages]
    inbox: list = dataclasses.field(default_factory=list)
    prefills: list = dataclasses.field(default_factory=list)  # RunPrefill tasks not yet done
    is_alive: bool = True
    _next: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def allocate(self, n: int) -> list[int]:
        pages = [next(self._next) for _ in range(n)]
        self.used.update(pages)
        return pages

    @property
    def num_free(self) -> int:
        return self.num_pages - len(self.used)


class FakeCluster:
    def __init__(self, num_prefill: int = 1, num_decode: int = 1, num_pages: int = 64, max_slots: int = 4,
                 policy: PolicyConfig = PolicyConfig(local_prefill_max_len=0), max_retries: int = 2,
                 cache_bytes: int = 10**9, host_copies: str | None = None, max_replacements: int = 0):
        self.workers = {**{f"prefill-{i}": FakeWorker(core.PREFILL, num_pages) for i in range(num_prefill)},
                        **{f"decode-{i}": FakeWorker(core.DECODE, num_pages, max_slots) for i in range(num_decode)}}
        states = {w: core.WorkerState(f.role, num_pages, f.max_slots, num_pages, f.max_slots)
                  for w, f in self.workers.items()}
        self.num_pages = num_pages
        self.core = core.SchedulerCore("t", states, KVStore(G, 16 * G, cache_bytes, host_copies), COST, policy,
                                       max_retries, max_replacements=max_replacements)
        self.now = 0.0
        self.dt = 0.01  # seconds each event takes on the fake clock
        self.probes: list[core.ProbeWorker] = []
        self.replacements: list[core.ReplaceWorker] = []
        self.exports: list[ExportPages] = []
        self.outputs: dict[str, list] = {}  # rid -> tokens polled
        self.num_inserted_samples = 0  # samples started from another sample's K/V (Insert forks)

    # -- time and events -----------------------------------------------------------------------
    def tick(self, dt: float | None = None) -> float:
        self.now += self.dt if dt is None else dt
        return self.now

    def apply(self, actions: list) -> None:
        for a in actions:
            w = self.workers.get(getattr(a, "worker", None))
            if isinstance(a, core.ProbeWorker):
                self.probes.append(a)
            elif isinstance(a, core.ReplaceWorker):
                self.replacements.append(a)
            elif w is not None and not w.is_alive:
                continue  # a call to a dead worker: the death is reported by whoever notices
            elif isinstance(a, core.RunPrefill):
                w.prefills.extend(a.tasks)
            elif isinstance(a, (core.RunLocalPrefill, core.Insert, core.AbortOnWorker)):
                w.inbox.append(a)
            elif isinstance(a, FreePages):
                assert set(a.pages) <= w.used, f"{a.worker}: freeing pages it does not hold: {a.pages}"
                w.used.difference_update(a.pages)
            elif isinstance(a, core.ReleaseTransfers):
                for h in a.handles:
                    w.used.difference_update(w.transfers.pop(h.transfer_id))
            elif isinstance(a, core.RetireWorker):
                w.is_alive = False
                w.used.clear()
            elif isinstance(a, ExportPages):
                self.exports.append(a)
            else:
                raise TypeError(a)
        self.core.check()

    def submit(self, prompts: list[list[int]], max_tokens: int = 4, ttft_slo_s: float | None = None,
               dt: float | None = None):
        params = SamplingParams(max_tokens=max_tokens)
        result, actions = self.core.submit([(p, params, None) for p in prompts], ttft_slo_s, self.tick(dt),
                                           make_request=Request)
        self.apply(actions)
        return result

    def submit_samples(self, prompt: list[int], n: int, max_tokens: int = 4) -> list[str] | tuple:
        """n samples of one prompt, prefilled once (scheduler/groups.py)."""
        params = [SamplingParams(max_tokens=max_tokens, seed=i) for i in range(n)]
        result, actions = self.core.submit([(prompt, p, None) for p in params], None, self.tick(),
                                           make_request=Request, samples=True)
        self.apply(actions)
        return result

    def abort(self, rids: list[str]) -> None:
        self.apply(self.core.abort(rids, self.tick()))

    def poll(self, rids: list[str]) -> dict:
        out = self.core.poll(rids)
        for rid, entry in out.items():
            self.outputs.setdefault(rid, []).extend(t.token_id for t in entry["tokens"])
        return out

    # -- fake prefill workers ------------------------------------------------------------------
    def finish_prefills(self, worker: str | None = None) -> None:
        for name, w in self.workers.items():
            if (worker is None or name == worker) and w.role == core.PREFILL and w.prefills and w.is_alive:
                tasks, w.prefills = w.prefills, []
                results = [self._prefill(w, t) for t in tasks]
                self.apply(self.core.prefill_done(name, tasks, results, self.tick(), num_free_pages=w.num_free))

    def _prefill(self, w: FakeWorker, task: core.PrefillTask):
        req = task.request
        n = len(req.prompt_ids)
        num_prefix = len(task.prefix_pages)
        cached = w.allocate(n // G - num_prefix)  # retained full pages, one reference for the store
        held = w.allocate(-(-n // G))  # the K/V being sent, held until released
        tid = f"tr-{task.call_id}"
        w.transfers[tid] = held
        handle = types.SimpleNamespace(transfer_id=tid, backend="fake", compression="none", num_bytes=16 * n,
                                       num_tokens=n)
        out = types.SimpleNamespace(request_id=req.request_id, prompt_len=n)
        samples = [types.SimpleNamespace(request_id=s.request_id, prompt_len=n) for s in task.samples]
        return types.SimpleNamespace(output=out, handle=handle, cached_pages=cached, num_prefix_pages=num_prefix,
                                     num_computed_tokens=n - num_prefix * G, prefill_s=0.005, sample_outputs=samples)

    # -- fake decode workers -------------------------------------------------------------------
    def step(self, d: str = "decode-0") -> None:
        """One decode-worker iteration: take the inbox, step every running request, report."""
        w = self.workers[d]
        r = types.SimpleNamespace(tokens={}, errors={}, retryable=[], started=[], received=[], prefilled=[],
                                  finished=[])
        for a in w.inbox:
            if isinstance(a, core.Insert):
                for req, out, handle, *forks in a.items:
                    members = [req, *(f for f, _ in (forks[0] if forks else ()))]
                    self.num_inserted_samples += len(members) - 1
                    sender = next((s for s in self.workers.values() if s.is_alive
                                   and handle.transfer_id in s.transfers), None)
                    r.received.append((handle, 0.001))
                    for m in members:
                        if sender is None:  # the payload's owner is gone (or let go of it too soon)
                            r.errors[m.request_id] = "TransferError: sender lost"
                            r.retryable.append(m.request_id)
                            r.started.append(m.request_id)
                        else:
                            self._start(w, m, r)
            elif isinstance(a, core.RunLocalPrefill):
                for t in a.tasks:
                    req = t.request
                    n = len(req.prompt_ids)
                    cached = w.allocate(n // G - len(t.prefix_pages))
                    r.prefilled.append(types.SimpleNamespace(
                        output=types.SimpleNamespace(request_id=req.request_id), cached_pages=cached,
                        num_prefix_pages=len(t.prefix_pages), num_computed_tokens=n - len(t.prefix_pages) * G,
                        prefill_s=0.001))
                    for m in (req, *t.samples):
                        self._start(w, m, r)
            elif isinstance(a, core.AbortOnWorker):
                for rid in a.request_ids:
                    if rid in w.running:
                        _, _, pages = w.running.pop(rid)
                        w.used.difference_update(pages)
                        r.tokens.setdefault(rid, []).append(Token(-1, 0.0, "abort", ""))
        w.inbox = []
        for rid, (req, toks, pages) in list(w.running.items()):
            if rid in r.tokens:
                continue  # started in this iteration: its first token is out already
            toks.append(token(req.prompt_ids, len(toks)))
            done = len(toks) >= req.params.max_tokens
            r.tokens.setdefault(rid, []).append(Token(toks[-1], 0.0, "length" if done else None, ""))
            if done:  # its full pages (all but the last token has K/V) stay for the next turn
                del w.running[rid]
                seq = list(req.prompt_ids) + toks
                keep = (len(seq) - 1) // G
                w.used.difference_update(pages[keep:])
                if keep:
                    r.finished.append((rid, seq[:keep * G], pages[:keep]))
        r.num_free_pages, r.num_free_slots = w.num_free, w.max_slots - len(w.running)
        r.num_running, r.context_len = len(w.running), 0
        self.apply(self.core.decode_report(d, r, self.tick()))

    def _start(self, w: FakeWorker, req, report) -> None:
        rid = req.request_id
        pages = w.allocate(-(-(len(req.prompt_ids) + req.params.max_tokens) // G))
        first = token(req.prompt_ids, 0)
        done = req.params.max_tokens == 1
        if not done:
            w.running[rid] = [req, [first], pages]
        else:
            w.used.difference_update(pages)
        report.started.append(rid)
        report.tokens.setdefault(rid, []).append(Token(first, 0.0, "length" if done else None, ""))

    # -- failures ------------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """The worker dies: its pages and transfers go with it; a call in flight fails."""
        w = self.workers[name]
        w.is_alive = False
        tasks, w.prefills = w.prefills, []
        if tasks:
            self.apply(self.core.prefill_done(name, tasks, [], self.tick(), lost="RayActorError: killed"))
        if w.role == core.DECODE:
            self.apply(self.core.worker_died(name, "RayActorError: killed", self.tick()))

    def start_replacements(self) -> None:
        """Bring up every replacement the core asked for (a fresh worker of the same shape)."""
        todo, self.replacements = self.replacements, []
        for a in todo:
            old = self.workers[a.dead_worker]
            self.workers[a.new_worker] = FakeWorker(a.role, old.num_pages, old.max_slots)
            state = core.WorkerState(a.role, old.num_pages, old.max_slots, old.num_pages, old.max_slots)
            self.apply(self.core.worker_joined(a.new_worker, state, self.tick()))

    def answer_probes(self) -> None:
        probes, self.probes = self.probes, []
        for p in probes:
            self.apply(self.core.probe_done(p.request_id, p.worker, self.workers[p.worker].is_alive, p.why,
                                            self.tick()))

    def run(self, rids: list[str], max_rounds: int = 200) -> dict:
        """Run every worker until `rids` have all ended; -> their final poll entries."""
        ended = {}
        for _ in range(max_rounds):
            self.finish_prefills()
            for name, w in self.workers.items():
                if w.role == core.DECODE and w.is_alive:
                    self.step(name)
            self.answer_probes()
            for rid, entry in self.poll([r for r in rids if r not in ended]).items():
                if entry["finished"]:
                    ended[rid] = entry
            if len(ended) == len(rids):
                return ended
        raise AssertionError(f"requests never ended: {set(rids) - set(ended)}; {self.core.stats()}")

    def settle(self) -> None:
        """Let every queued call and report through (after aborts)."""
        for _ in range(5):
            self.finish_prefills()
            for name, w in self.workers.items():
                if w.role == core.DECODE and w.is_alive:
                    self.step(name)
            self.answer_probes()

    def assert_baseline(self) -> None:
        """Nothing held anywhere once the store lets go of its cached pages."""
        self.apply(self.core.clear_cache(self.tick()))
        assert self.core.is_idle(), self.core.stats()
        for name, w in self.workers.items():
            if w.is_alive:
                assert not w.used and not w.transfers and not w.running, (name, w)
