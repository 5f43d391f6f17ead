"""The central scheduler: a thin async actor around the pure policy and KV index (`scheduler/`).

Ray is applied in raypd/runtime/deployment.py (a named async actor); this class is plain.
Lifecycle of a request:
  1. `submit` (client): validate and tokenize every prompt (raypd.api.encode_prompt) before
     anything is queued; `policy.admit` (bounded queue) and a first `policy.place`; a
     Rejection (queue full, no capacity, predicted TTFT past the request's deadline) is
     returned to the client at once as a typed error (errors.RequestRejected).
  2. Dispatch (`_dispatch`, after every event): for each queued request, match its prompt in
     the KV index, snapshot the workers (in-flight work counted) and `policy.place`:
     Wait keeps it queued (FIFO), Rejection ends it, Placement pins its cached prefix in the
     index and sends it, batched per worker, to a prefill worker (`PrefillWorker.prefill`) or,
     for short uncached prompts, to the decode worker itself (`DecodeWorker.submit_local`).
     A worker short of pages first gets cached pages evicted (`KVIndex.evict_worker`).
  3. Prefill done: publish the new full prompt pages to the index (`KVIndex.publish`; pages the
     index gives back are freed on their worker), unpin the prefix, and hand (request, first
     token, transfer handle) to the decode worker (`DecodeWorker.submit`).
  4. One collect loop per decode worker long-polls `DecodeWorker.collect`: tokens of all its
     requests in one chunk; received transfers are released on the prefill side.
     A finished request's full pages (prompt and generated tokens) are published on its
     decode worker (`_publish_finished`), so the next turn of a conversation reuses them.
  5. `poll` (client) returns each request's new tokens in chunks, and its end.
Host tier (`host_copies`): after publishing a prefill worker's new pages, the scheduler asks
that worker to export the pages with no host copy yet (`export_pages`, two return values: the
payload stays in the worker node's object store, owned by the scheduler); once it exists the
index records it (`Location.on_host`). Placement may then fetch those pages on any worker
(`PrefillJob.host_prefix`); evicting the last page of an object drops its reference.
Failover: a worker whose call fails with RayActorError is dropped (`_worker_died`: out of
placement, its pages out of the index) and its requests go back to the head of the queue
(`_retry`); a K/V transfer the decode worker could not receive is retried the same way after a
liveness probe of its sender. A request with tokens already resumes from prompt + those tokens.
Time for the policies is `time.monotonic()`, passed in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import types
from collections import defaultdict, deque

from ray.exceptions import RayActorError

from raypd.api import encode_prompt
from raypd.engine.api import Request, SamplingParams, check_kv_compression
from raypd.runtime import errors
from raypd.runtime.host_copies import HostCopies
from raypd.runtime.workers import PrefillJob, PrefillResult
from scheduler.kv_index import KIND_HOST
from scheduler import (CostModel, DecodeWorkerState, KVIndex, Location, Placement, PolicyConfig,
                       PrefillWorkerState, Rejection, RequestSpec, TransferState, admit, fit, place)

log = logging.getLogger(__name__)


def default_cost_model(kv_bytes_per_token: int) -> CostModel:
    """Used when the deployment is not calibrated (tests): 1 ms + 20 us per token prefill."""
    return CostModel((1e-3, 2e-5, 0.0), (1e-3, 1e-4, 1e-7), 1e-3, 1e9, kv_bytes_per_token)


def _rejected(r: Rejection) -> tuple:
    return errors.to_wire(errors.RequestRejected(f"request rejected ({r.reason.value}): {r.message}",
                                                 r.reason.value, r.ttft_s, r.retry_after_s))


def _status(worker, own_group: bool):
    """A worker's `status` call; `own_group` for prefill workers, whose status runs in a
    concurrency group of its own (deployment.STATUS_GROUP), never queued behind a prefill."""
    if own_group:
        return worker.status.options(concurrency_group="status").remote()
    return worker.status.remote()


@dataclasses.dataclass
class _Tracked:
    request: Request
    spec: RequestSpec
    tokens: list = dataclasses.field(default_factory=list)  # (id, logprob, finish, text) not yet polled
    is_finished: bool = False
    error: tuple | None = None  # errors.to_wire
    placement: Placement | None = None
    first_token_s: float | None = None
    num_computed_tokens: int | None = None
    timings: dict = dataclasses.field(default_factory=dict)  # queue_s, prefill_s, transfer_s
    generated: list[int] = dataclasses.field(default_factory=list)  # every token id so far
    num_prompt_tokens: int = 0  # of the original prompt (a resumed request's prompt is longer)
    max_tokens: int = 0  # asked for originally
    retries: int = 0


class Scheduler:
    def __init__(self, name: str, prefill_workers: dict, decode_workers: dict,
                 policy: PolicyConfig = PolicyConfig(), cache_bytes: int | None = None,
                 calibrate: bool = False, local_prefill_stall_s: float | None = None,
                 collect_timeout_s: float = 0.02, max_retries: int = 2, host_copies: str | None = None,
                 host_cache_bytes: int = 256 << 20, stream_layers: bool = False):
        self.name = name
        self.prefill_workers, self.decode_workers = dict(prefill_workers), dict(decode_workers)
        self.policy, self.cache_bytes, self.calibrate = policy, cache_bytes, calibrate
        self.local_prefill_stall_s, self.collect_timeout_s = local_prefill_stall_s, collect_timeout_s
        self._tracked: dict[str, _Tracked] = {}
        self._prefilling: dict[str, tuple[list[int], list[int]]] = {}  # rid -> (prompt ids, pinned hashes)
        self._queue: deque[str] = deque()
        self._ids = itertools.count()
        self._running = False
        self._tasks: set[asyncio.Task] = set()
        self._calibration: dict = {}
        self._overhead_s, self._num_requests = 0.0, 0
        self._num_computed_tokens = 0
        self._rejections: dict[str, int] = defaultdict(int)  # reason -> count
        self.max_retries = max_retries
        self.host_copies, self.host_cache_bytes = host_copies, host_cache_bytes  # None: no host tier
        self.stream_layers = stream_layers  # prefill workers stream K/V to the decode worker by layer group
        self._host = HostCopies()  # the host tier's objects
        self._dead: dict[str, str] = {}  # worker -> why it was dropped
        self._num_retries = 0

    # ------------------------------------------------------------------ start-up
    async def start(self) -> dict:
        infos = await asyncio.gather(*[w.info.remote() for w in self._all_workers().values()])
        self._infos = dict(zip(self._all_workers(), infos))
        first = infos[0]
        self.page_size, self.kv_bytes_per_page = first["page_size"], first["kv_bytes_per_page"]
        self.model = types.SimpleNamespace(config=first["model"].config, tokenizer=first["model"].tokenizer)
        self.max_seq_len = min(i["max_seq_len"] for i in infos)
        pool_bytes = sum(i["max_pages"] for i in infos) * self.kv_bytes_per_page
        cache_bytes = self.cache_bytes if self.cache_bytes is not None else pool_bytes // 2
        self.index = KVIndex(self.page_size, cache_bytes + (self.host_cache_bytes if self.host_copies else 0))
        self.cost = default_cost_model(self.kv_bytes_per_page // self.page_size)
        if self.calibrate:
            await self._calibrate()
        self._free = {w: i["max_pages"] for w, i in self._infos.items()}  # pool pages, last reported
        self._pending: dict[str, dict[str, int]] = defaultdict(dict)  # worker -> rid -> pages reserved
        self._decode_stats = {d: dict(num_free_slots=self._infos[d]["max_slots"], num_running=0, context_len=0)
                              for d in self.decode_workers}
        self._queued_s: dict[str, float] = defaultdict(float)
        self._backlog: dict[str, int] = defaultdict(int)
        self._sent_by: dict[str, str] = {}  # transfer_id -> prefill worker
        self._handles: dict[str, str] = {}  # transfer_id -> request id
        self._in_flight: dict[str, object] = {}  # request id -> its TransferHandle, until received
        self._transfer_stats = defaultdict(lambda: dict(count=0, bytes=0, seconds=0.0))  # (backend, compression)
        self._changed = asyncio.Condition()
        self._running = True
        for d in self.decode_workers:
            self._spawn(self._collect_loop(d))
        return await self.status()

    async def _calibrate(self) -> None:
        """Time the engines on a few sizes and fit the cost model (scheduler.cost_model.fit)."""
        G, top = self.page_size, self.max_seq_len
        lengths = sorted({min(n, top - 16) for n in (G, 4 * G, 16 * G, 64 * G) if n < top})
        pre = await asyncio.gather(*[w.calibrate.remote(lengths) for w in self.prefill_workers.values()])
        # The timed steps stay within one page (no new shape to compile), and the calibration
        # request (context + 16 new tokens) must fit the engines' context.
        mid_page = max(1, min(4 * G + G // 2, top - 17))
        dec = await asyncio.gather(*[w.calibrate.remote([1, 2, 4], mid_page) for w in self.decode_workers.values()])
        prefill = [s for r in pre for s in r["prefill"]] or [s for r in dec for s in r["prefill"]]
        transfer = [s for r in pre for s in r["transfer"]] or [(1, 1e-3)]
        self.cost = fit(prefill, [s for r in dec for s in r["decode"]], transfer,
                        self.kv_bytes_per_page // self.page_size)
        if self.local_prefill_stall_s is not None:
            self.policy = dataclasses.replace(
                self.policy, local_prefill_max_len=self.cost.max_local_prefill_len(self.local_prefill_stall_s, top))
        self._calibration = dict(prefill=prefill, transfer=transfer, cost=dataclasses.asdict(self.cost),
                                 local_prefill_max_len=self.policy.local_prefill_max_len)

    def _reject(self, r: Rejection) -> tuple:
        self._rejections[r.reason.value] += 1
        return _rejected(r)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _all_workers(self) -> dict:
        return {**self.prefill_workers, **self.decode_workers}

    # ------------------------------------------------------------------ client calls
    async def submit(self, prompts: list, params: SamplingParams, ttft_slo_s: float | None = None,
                     kv_compression: str | None = None) -> dict:
        """Validate all, then admit and queue all. -> {"ids": [...]} or {"error": errors.to_wire}."""
        t0 = time.perf_counter()
        if not self._running:
            return {"error": ("not_running", f"deployment {self.name!r} is shut down")}
        try:
            check_kv_compression(kv_compression)
            if params.stop and self.model.tokenizer is None:
                raise ValueError("stop: stop strings need a model with a tokenizer; use stop_token_ids")
            ids = [encode_prompt(p, self.model, self.max_seq_len, params.max_tokens, f"prompts[{i}]")
                   for i, p in enumerate(prompts)]
        except ValueError as e:
            return {"error": errors.to_wire(e)}
        now = time.monotonic()
        new = []
        for prompt_ids in ids:
            rid = f"{self.name}-{next(self._ids)}"
            spec = RequestSpec(rid, len(prompt_ids), params.max_tokens, self.page_size, now, ttft_slo_s)
            reject = admit(spec, len(self._queue) + len(new), self.policy, self._prefill_states(spec, None))
            if reject is not None:
                return {"error": self._reject(reject)}
            new.append(_Tracked(Request(rid, prompt_ids, params, kv_compression), spec,
                                num_prompt_tokens=len(prompt_ids), max_tokens=params.max_tokens))
        rids = [t.request.request_id for t in new]
        self._tracked.update(zip(rids, new))
        self._queue.extend(rids)
        self._num_requests += len(new)
        self._dispatch()
        # Early rejection: each new request was placed, rejected by placement, or waits behind
        # others; one that waits is placed once now to learn whether it could make its deadline.
        error = next((t.error for t in new if t.error is not None), None)
        for t in new:
            if error is None and t.placement is None and t.error is None:
                decision = self._place(t.spec, t.request.prompt_ids, now)[0]
                error = self._reject(decision) if isinstance(decision, Rejection) else None
        if error is not None:
            await self.abort(rids)
        self._overhead_s += time.perf_counter() - t0
        return {"error": error} if error is not None else {"ids": rids}

    async def poll(self, request_ids: list[str], timeout_s: float = 1.0) -> dict:
        """New tokens of each request since the last poll (waits up to `timeout_s` for any).
        -> {rid: {"tokens": [(id, logprob, finish, text)], "finished": bool, "error", "metrics"}}"""
        def ready():
            return any(rid not in self._tracked or self._tracked[rid].tokens or self._tracked[rid].is_finished
                       for rid in request_ids)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                pass
        out = {}
        for rid in request_ids:
            t = self._tracked.get(rid)
            if t is None:
                out[rid] = dict(tokens=[], finished=True, error=("failed", f"unknown request {rid}"), metrics={})
                continue
            tokens, t.tokens = t.tokens, []
            metrics = dict(ttft_s=(t.first_token_s - t.spec.arrival_s) if t.first_token_s else None, **t.timings,
                           num_computed_tokens=t.num_computed_tokens,
                           is_local_prefill=t.placement.is_local_prefill if t.placement else None,
                           prefill_worker=t.placement.prefill_worker_id if t.placement else None,
                           decode_worker=t.placement.decode_worker_id if t.placement else None)
            out[rid] = dict(tokens=tokens, finished=t.is_finished, error=t.error, metrics=metrics)
            if t.is_finished:
                del self._tracked[rid]
        return out

    async def abort(self, request_ids: list[str]) -> None:
        by_worker = defaultdict(list)
        for rid in request_ids:
            t = self._tracked.pop(rid, None)
            if t is None:
                continue
            if rid in self._queue:
                self._queue.remove(rid)
            elif t.placement is not None:
                by_worker[t.placement.decode_worker_id].append(rid)
        for d, rids in by_worker.items():
            if d in self.decode_workers:
                self.decode_workers[d].abort.remote(rids)

    async def status(self) -> dict:
        pre, dec = await self._worker_status(self.prefill_workers), await self._worker_status(self.decode_workers)
        stats = self.index.stats()
        return dict(name=self.name, is_running=self._running, num_queued=len(self._queue),
                    num_tracked=len(self._tracked), prefill=pre, decode=dec,
                    index=dict(num_entries=stats.num_entries, used_bytes=stats.used_bytes,
                               max_bytes=stats.max_bytes, hit_rate=stats.hit_rate,
                               num_hit_pages=stats.num_hit_pages, num_miss_pages=stats.num_miss_pages,
                               num_evicted=stats.num_evicted, num_host_objects=len(self._host),
                               host_copies=self.host_copies),
                    transfer=[dict(backend=b, compression=c, **v) for (b, c), v in self._transfer_stats.items()],
                    rejections=dict(self._rejections), num_retries=self._num_retries,
                    dead_workers=dict(self._dead),
                    local_prefill_max_len=self.policy.local_prefill_max_len, calibration=self._calibration,
                    overhead_ms_per_request=1e3 * self._overhead_s / max(1, self._num_requests),
                    num_requests=self._num_requests)

    async def info(self) -> dict:
        """The deployment's shapes: model (.config, .tokenizer), context, pool and batch sizes."""
        decode = [self._infos[d] for d in self.decode_workers]
        return dict(name=self.name, model=self.model, max_seq_len=self.max_seq_len, page_size=self.page_size,
                    num_pages_total=sum(i["max_pages"] for i in decode),
                    max_slots=sum(i["max_slots"] for i in decode),
                    num_prefill=len(self.prefill_workers), num_decode=len(self.decode_workers))

    async def _worker_status(self, workers: dict) -> list[dict]:
        """Status of each live worker; one found dead is dropped (its requests fail over where
        their in-flight calls notice)."""
        own_group = workers is self.prefill_workers
        replies = await asyncio.gather(*[_status(w, own_group) for w in workers.values()], return_exceptions=True)
        out = []
        for w, reply in zip(list(workers), replies):
            if isinstance(reply, RayActorError):
                self._worker_died(w, reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out.append(reply)
        return out

    async def clear_cache(self, pools_only: bool = False) -> int:
        """Evict every unpinned page of the index and free it on its worker; with `pools_only`,
        only the workers' pool copies go (host copies stay). -> copies dropped."""
        now = time.monotonic()
        if pools_only:
            evicted = [ev for w in self._all_workers() for ev in self.index.evict_worker(w, 1 << 62, now)]
        else:
            evicted = self.index.evict(now, need_bytes=self.index.max_bytes + self.index.used_bytes + 1)
        locations = [loc for ev in evicted for loc in ev.locations]
        await asyncio.gather(*self._free_locations(locations))
        return len(locations)

    async def shutdown(self) -> None:
        self._running = False
        for rid in list(self._queue):
            self._fail(rid, ("not_running", f"deployment {self.name!r} was shut down"))
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ placement
    def _prefill_states(self, spec: RequestSpec, match) -> list[PrefillWorkerState]:
        return [PrefillWorkerState(w, queued_s=self._queued_s[w] if self._running else 0.0,
                                   num_cached_pages=match.num_worker_pages(w) if match else 0)
                for w in self.prefill_workers]

    def _decode_states(self, match) -> list[DecodeWorkerState]:
        out = []
        for d in self.decode_workers:
            s, held = self._decode_stats[d], self._pending[d]
            # Pages the index caches there count as free: placement evicts them when needed.
            free = self._free[d] + self.index.num_worker_pages(d) - sum(held.values())
            out.append(DecodeWorkerState(d, s["num_free_slots"] - len(held), free,
                                         self._infos[d]["max_pages"], s["num_running"], s["context_len"],
                                         match.num_worker_pages(d) if match else 0))
        return out

    def _place(self, spec: RequestSpec, prompt_ids: list[int], now: float):
        match = self.index.match_prefix(prompt_ids, spec.max_cached_pages)
        if self.host_copies:
            spec = dataclasses.replace(spec, num_host_pages=sum(1 for _ in itertools.takewhile(
                lambda locs: any(loc.kind == KIND_HOST for loc in locs), match.locations)))
        transfer = TransferState(dict(self._backlog))
        return place(spec, self._prefill_states(spec, match), self._decode_states(match), self.cost, now,
                     self.policy, transfer), match

    def _dispatch(self) -> None:
        """Place queued requests in order (module doc, step 2) and send them, batched per worker."""
        now = time.monotonic()
        remote, local = defaultdict(list), defaultdict(list)
        while self._queue and self._running:
            rid = self._queue[0]
            t = self._tracked[rid]
            decision, match = self._place(t.spec, t.request.prompt_ids, now)
            if isinstance(decision, Rejection):
                self._queue.popleft()
                self._fail(rid, self._reject(decision))
                continue
            if not isinstance(decision, Placement):
                break  # Wait: FIFO, try again on the next event
            self._queue.popleft()
            t.timings["queue_s"] = now - t.spec.arrival_s
            w = decision.prefill_worker_id
            f = decision.num_fetched_pages
            k = min(decision.num_cached_pages - f, match.num_worker_pages(w))
            t.placement = decision
            self._prefilling[rid] = (t.request.prompt_ids, match.hashes[:k + f])
            self.index.acquire(match.hashes[:k + f], now)
            prompt_pages = -(-t.spec.prompt_len // self.page_size)
            need_here = (t.spec.num_pages_needed if decision.is_local_prefill else prompt_pages) - k
            self._make_room(w, need_here + sum(self._pending[w].values()), now)
            self._pending[w][rid] = need_here
            if not decision.is_local_prefill:
                d = decision.decode_worker_id
                self._make_room(d, t.spec.num_pages_needed + sum(self._pending[d].values()), now)
                self._pending[d][rid] = t.spec.num_pages_needed
                est = next(e for e in decision.estimates if e.worker_id == w)
                self._queued_s[w] += est.prefill_s
                kv = self.cost.kv_bytes(t.spec.prompt_len)
                self._backlog[w] += kv
                self._backlog[decision.decode_worker_id] += kv
            job = PrefillJob(t.request, list(match.worker_pages.get(w, []))[:k],
                             host_prefix=self._host.prefix(match.locations[k:k + f]))
            if self.stream_layers and not decision.is_local_prefill:
                job.stream_to = self.decode_workers[decision.decode_worker_id]
            (local if decision.is_local_prefill else remote)[w].append(job)
        for w, jobs in remote.items():
            self._spawn(self._run_prefill(w, jobs))
        for d, jobs in local.items():
            self.decode_workers[d].submit_local.remote(jobs)

    def _make_room(self, worker: str, need: int, now: float) -> None:
        """Evict cached pages of `worker` until `need` pages are free (as last reported)."""
        short = need - self._free[worker]
        if short > 0:
            evicted = self.index.evict_worker(worker, short, now)
            self._free_locations([loc for ev in evicted for loc in ev.locations])

    def _free_locations(self, locations) -> list:
        by_worker = defaultdict(list)
        for loc in locations:
            if loc.kind == KIND_HOST:
                self._host.drop_page(loc.object_ref_key)
            elif loc.worker_id in self._all_workers():  # a dead worker's pages went with it
                by_worker[loc.worker_id].append(loc.page)
        refs = []
        for w, pages in by_worker.items():
            self._free[w] += len(pages)
            refs.append(self._all_workers()[w].free_pages.remote(pages))
        return refs

    # ------------------------------------------------------------------ results
    async def _run_prefill(self, worker: str, jobs: list[PrefillJob]) -> None:
        placed = {job.request.request_id: self._tracked[job.request.request_id].placement for job in jobs}
        sent_s = time.monotonic()
        try:
            results, num_free = await self.prefill_workers[worker].prefill.remote(jobs)
        except RayActorError as e:  # the worker died: place its requests again elsewhere
            self._worker_died(worker, e)
            for job in jobs:
                t = self._tracked.get(job.request.request_id)
                if t is not None and t.placement is placed[job.request.request_id]:
                    self._retry(job.request.request_id, f"prefill worker {worker} died")
            self._dispatch()
            return
        except Exception as e:  # noqa: BLE001 - the call failed: fail its requests
            results, num_free = [e] * len(jobs), self._free.get(worker, 0)
        t0 = time.perf_counter()
        if worker in self._free:
            self._free[worker] = num_free
        by_decode = defaultdict(list)
        for job, res in zip(jobs, results):
            rid = job.request.request_id
            t = self._tracked.get(rid)
            self._queued_s[worker] = max(0.0, self._queued_s[worker] - next(
                e.prefill_s for e in placed[rid].estimates if e.worker_id == worker))
            if t is not None and t.placement is not placed[rid]:  # retried meanwhile: a stale result
                if not isinstance(res, Exception):
                    self._free_locations([Location.in_worker(worker, p, 0) for p in res.cached_pages])
                    self.prefill_workers[worker].release_transfers.remote([res.handle])
                continue
            self._pending[worker].pop(rid, None)
            if isinstance(res, Exception):
                self._unpin(rid)
                self._fail(rid, ("failed", f"prefill on {worker} failed: {res}"))
                continue
            self._sent_by[res.handle.transfer_id] = worker
            self._publish(worker, res, job.prefix_pages)
            if t is None or t.error is not None:  # aborted meanwhile
                self.prefill_workers[worker].release_transfers.remote([res.handle])
                continue
            t.num_computed_tokens = res.num_computed_tokens
            t.timings["prefill_s"] = res.prefill_s
            # the rest of the call: its wait in the worker's queue, the batch's other jobs, RPCs
            t.timings["prefill_wait_s"] = max(0.0, time.monotonic() - sent_s - res.prefill_s)
            self._handles[res.handle.transfer_id] = rid
            self._in_flight[rid] = res.handle
            by_decode[t.placement.decode_worker_id].append((job.request, res.output, res.handle))
        for d, items in by_decode.items():
            if d in self.decode_workers:
                self.decode_workers[d].submit.remote(items)
            else:  # the decode worker died meanwhile
                for request, _, _ in items:
                    self._retry(request.request_id, f"decode worker {d} died")
        self._overhead_s += time.perf_counter() - t0
        self._dispatch()

    def _publish(self, worker: str, res: PrefillResult, own_pages: list[int] = ()) -> None:
        """New full prompt pages into the index; unpin the prefix; free what the index returns.
        With the host tier on, a prefill worker also exports the pages that have no host copy
        yet (the call is queued on the worker before any free of those pages can be)."""
        rid = res.output.request_id
        prompt_ids, _ = self._prefilling[rid]
        now = time.monotonic()
        pages = list(own_pages) + list(res.cached_pages)
        if self.host_copies and res.cached_pages and worker in self.prefill_workers:
            run = self.index.host_run(prompt_ids, len(pages))
            if run < len(pages):
                refs = self.prefill_workers[worker].export_pages.options(num_returns=2).remote(
                    pages[run:], self.host_copies)
                self._spawn(self._finish_export(prompt_ids, run, len(pages) - run, refs))
        locations = [None] * res.num_prefix_pages + [
            Location.in_worker(worker, p, self.kv_bytes_per_page) for p in res.cached_pages]
        self._num_computed_tokens += res.num_computed_tokens
        try:
            published = self.index.publish(prompt_ids, locations, now)
        except ValueError:  # the prefix was not what the index pinned: keep nothing
            log.exception("publish of %s failed", rid)
            self._free_locations([loc for loc in locations if loc is not None])
        else:
            gone = published.redundant + [loc for ev in published.evicted for loc in ev.locations]
            self._free_locations(gone)
        self._unpin(rid)

    def _publish_finished(self, d: str, tokens: list[int], pages: list[int]) -> None:
        """A finished request's full pages (prompt and generated tokens) on decode worker `d`
        into the index, so a follow-up turn reuses them. The worker holds one reference on each;
        pages the index already holds there keep theirs, so the extra reference is dropped."""
        held = [self.index.holds(d, p) for p in pages]
        locations = [None if h else Location.in_worker(d, p, self.kv_bytes_per_page) for p, h in zip(pages, held)]
        extra = [Location.in_worker(d, p, 0) for p, h in zip(pages, held) if h]
        try:
            published = self.index.publish(tokens, locations, time.monotonic())
        except ValueError:  # an earlier page left the index meanwhile: cache nothing
            self._free_locations([Location.in_worker(d, p, 0) for p in pages])
            return
        self._free_locations(extra + published.redundant + [loc for ev in published.evicted for loc in ev.locations])

    async def _finish_export(self, prompt_ids: list[int], first: int, n: int, refs) -> None:
        """Record a host copy of pages [first, first + n) of `prompt_ids` once it exists."""
        info_ref, payload_ref = refs
        try:
            info = await info_ref
        except Exception as e:  # noqa: BLE001 - no host copy this time; the pool copy stands
            log.warning("host copy export failed: %s", e)
            return
        key = self._host.add(payload_ref, n)
        per_page = info["num_bytes"] // n
        locations = [None] * first + [Location.on_host(info["node_id"], key, i, per_page, self.host_copies)
                                      for i in range(n)]
        try:
            published = self.index.publish(prompt_ids, locations, time.monotonic())
        except ValueError:  # the prefix left the index meanwhile: the copy has nothing to extend
            self._host.discard(key)
            return
        self._free_locations(published.redundant + [loc for ev in published.evicted for loc in ev.locations])

    def _unpin(self, rid: str) -> None:
        _, pinned = self._prefilling.pop(rid, (None, []))
        if pinned:
            self.index.release(pinned)

    async def _collect_loop(self, d: str) -> None:
        worker = self.decode_workers[d]
        while self._running:
            try:
                report = await worker.collect.remote(self.collect_timeout_s)
            except Exception as e:  # noqa: BLE001 - the decode worker died: resume its requests elsewhere
                log.error("decode worker %s: %s", d, e)
                self._worker_died(d, e)
                for rid, t in list(self._tracked.items()):
                    if t.placement is not None and t.placement.decode_worker_id == d:
                        self._retry(rid, f"decode worker {d} died")
                self._dispatch()
                async with self._changed:
                    self._changed.notify_all()
                return
            t0 = time.perf_counter()
            self._apply_report(d, report)
            self._overhead_s += time.perf_counter() - t0
            async with self._changed:
                self._changed.notify_all()
            if self._queue:  # slots, pages or queue room may have come free
                self._dispatch()

    def _apply_report(self, d: str, report) -> None:
        now = time.monotonic()
        self._free[d] = report.num_free_pages
        self._decode_stats[d] = dict(num_free_slots=report.num_free_slots, num_running=report.num_running,
                                     context_len=report.context_len)
        for _, tokens, pages in report.finished:
            self._publish_finished(d, tokens, pages)
        for res in report.prefilled:
            self._publish(d, res)
            t = self._tracked.get(res.output.request_id)
            if t is not None:
                t.num_computed_tokens = res.num_computed_tokens
                t.timings["prefill_s"] = res.prefill_s
        for rid in report.errors:  # a local prefill that failed holds pins still
            self._unpin(rid)
        for rid in report.started:
            self._pending[d].pop(rid, None)
        release = defaultdict(list)
        for h, recv_s in report.received:
            stats = self._transfer_stats[(h.backend, h.compression)]
            stats["count"] += 1
            stats["bytes"] += h.num_bytes
            stats["seconds"] += recv_s
            rid = self._handles.pop(h.transfer_id, None)
            self._in_flight.pop(rid, None)
            t = self._tracked.get(rid)
            if t is not None:
                t.timings["transfer_s"] = recv_s
            w = self._sent_by.pop(h.transfer_id, None)
            if w is not None:
                release[w].append(h)
                kv = self.cost.kv_bytes(h.num_tokens)
                self._backlog[w] = max(0, self._backlog[w] - kv)
                self._backlog[d] = max(0, self._backlog[d] - kv)
        for w, handles in release.items():
            self.prefill_workers[w].release_transfers.remote(handles)
        for rid, tokens in report.tokens.items():
            t = self._tracked.get(rid)
            if t is None:
                continue
            if t.first_token_s is None:
                t.first_token_s = now
            t.tokens.extend(tokens)
            t.generated.extend(tok[0] for tok in tokens if tok[0] >= 0)
            if tokens[-1][2] is not None:
                t.is_finished = True
        for rid, message in report.errors.items():
            if rid in report.retryable:  # K/V lost on the way, or no room there after all: place again
                t = self._tracked.get(rid)
                sender = t.placement.prefill_worker_id if t is not None and t.placement else None
                self._spawn(self._retry_after_probe(rid, sender, f"decode worker {d}: {message}"))
            else:
                self._fail(rid, ("failed", f"decode worker {d}: {message}"))

    # ------------------------------------------------------------------ failover
    def _worker_died(self, w: str, error: Exception) -> None:
        """Drop a dead worker: no placement sees it again, the index forgets its pages, and
        transfers it sent are no longer released on it."""
        if self.prefill_workers.pop(w, None) is None and self.decode_workers.pop(w, None) is None:
            return
        log.error("worker %s died: %s", w, error)
        self._dead[w] = f"{type(error).__name__}: {error}"
        self.index.remove_worker(w)
        for table in (self._pending, self._queued_s, self._backlog, self._free):
            table.pop(w, None)
        self._sent_by = {tid: src for tid, src in self._sent_by.items() if src != w}

    async def _retry_after_probe(self, rid: str, sender: str | None, why: str) -> None:
        """A transfer failed: find out whether its sender is still alive, then prefill again."""
        if sender in self.prefill_workers:
            try:
                await asyncio.wait_for(_status(self.prefill_workers[sender], True), 10.0)
            except (RayActorError, asyncio.TimeoutError) as e:
                self._worker_died(sender, e)
        self._retry(rid, why)
        self._dispatch()
        async with self._changed:
            self._changed.notify_all()

    def _retry(self, rid: str, why: str) -> None:
        """Queue a request again at the head of the queue, after a worker or a transfer failed.
        One that has produced tokens resumes: its prompt becomes prompt + tokens so far and it
        asks for the rest (greedy output is unchanged; the engine recomputes the K/V)."""
        t = self._tracked.get(rid)
        if t is None or t.is_finished:
            return
        self._unpin(rid)
        for pending in self._pending.values():
            pending.pop(rid, None)
        handle = self._in_flight.pop(rid, None)
        if handle is not None:
            self._handles.pop(handle.transfer_id, None)
            sender = self._sent_by.pop(handle.transfer_id, None)
            if sender in self.prefill_workers:
                self.prefill_workers[sender].release_transfers.remote([handle])
        if t.retries >= self.max_retries:
            self._fail(rid, ("failed", f"{why}; gave up after {t.retries} retries"))
            return
        t.retries += 1
        self._num_retries += 1
        log.warning("retrying %s (%s), attempt %d", rid, why, t.retries)
        r, params = t.request, t.request.params
        if t.generated:
            left = t.max_tokens - len(t.generated)
            prompt = r.prompt_ids[:t.num_prompt_tokens] + t.generated
            t.request = Request(rid, prompt, dataclasses.replace(params, max_tokens=left), r.kv_compression)
        t.spec = dataclasses.replace(t.spec, prompt_len=len(t.request.prompt_ids),
                                     max_tokens=t.request.params.max_tokens, ttft_slo_s=None)
        t.placement = None
        self._queue.appendleft(rid)

    def _fail(self, rid: str, error: tuple) -> None:
        t = self._tracked.get(rid)
        if t is not None and not t.is_finished:
            t.error, t.is_finished = error, True
            for pending in self._pending.values():
                pending.pop(rid, None)
