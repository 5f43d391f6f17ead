"""The central scheduler actor: a thin async shell around the state machine in scheduler/core.py.

Ray is applied in raypd/runtime/deployment.py (a named async actor); this class is plain. It
decides nothing itself:
  - client calls (`submit`, `submit_samples`, `poll`, `abort`) validate and tokenize (`submit`), then feed the
    core an event;
  - every event's actions become worker calls (`_act`): prefills, local prefills, inserts,
    aborts, page frees, transfer releases, host-copy exports and liveness probes;
  - every call is awaited (`_call`) and its failure classified in one place: a dead actor
    (RayActorError) is that worker's death (`SchedulerCore.worker_died`), anything else is
    logged (and fails the requests of a prefill call);
  - one collect loop per decode worker long-polls `DecodeWorker.collect` and feeds each report
    to the core; pollers wake after every event.
Time for the core is `time.monotonic()`, passed in.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from ray.exceptions import RayActorError

from raypd.protocol import check_sampling, encode_prompt
from raypd.engine.api import Request, SamplingParams, check_kv_compression
from raypd.runtime import errors
from raypd.runtime.messages import PrefillJob
from scheduler import CostModel, PolicyConfig, fit
from scheduler import core
from scheduler.kv_store import ExportPages, FreePages, KVStore
from scheduler.rebalancer import Rebalancer
from scheduler.simulator import WorkerProfile

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0


def default_cost_model(kv_bytes_per_token: int) -> CostModel:
    """Used when the deployment is not calibrated (tests): 1 ms + 20 us per token prefill."""
    return CostModel((1e-3, 2e-5, 0.0), (1e-3, 1e-4, 1e-7), 1e-3, 1e9, kv_bytes_per_token)


def _status(worker, own_group: bool):
    """A worker's `status` call; `own_group` for prefill workers, whose status runs in a
    concurrency group of its own (deployment.STATUS_GROUP), never queued behind a prefill."""
    if own_group:
        return worker.status.options(concurrency_group="status").remote()
    return worker.status.remote()


class Scheduler:
    # Every setting comes from DeploymentConfig (raypd/runtime/deployment.py), the one place with
    # defaults; `host_copies` already resolved ("auto" -> the engines' compression).
    def __init__(self, name: str, prefill_workers: dict, decode_workers: dict, *, policy: PolicyConfig,
                 cache_bytes: int | None, calibrate: bool, local_prefill_stall_s: float | None,
                 collect_timeout_s: float, max_retries: int, host_copies: str | None, host_cache_bytes: int,
                 stream_layers: bool, spawn, max_replacements: int, rebalance, join_timeout_s: float = 600.0):
        self.name = name
        self.handles = {**prefill_workers, **decode_workers}
        self._roles = {**{w: core.PREFILL for w in prefill_workers}, **{w: core.DECODE for w in decode_workers}}
        self.policy, self.cache_bytes, self.calibrate = policy, cache_bytes, calibrate
        self.local_prefill_stall_s, self.collect_timeout_s = local_prefill_stall_s, collect_timeout_s
        self.max_retries, self.stream_layers = max_retries, stream_layers
        self.host_copies, self.host_cache_bytes = host_copies, host_cache_bytes  # None: no host tier
        self.spawn, self.max_replacements, self.join_timeout_s = spawn, max_replacements, join_timeout_s
        self.rebalance = rebalance  # scheduler.rebalancer.RebalanceConfig: move workers between roles by itself
        self.rebalancer: Rebalancer | None = None
        self.core: core.SchedulerCore | None = None
        self._tasks: set[asyncio.Task] = set()
        self._exports: set[asyncio.Task] = set()  # host-copy exports under way
        self._calibration: dict = {}
        self._overhead_s = 0.0
        self._overhead_by: dict[str, float] = collections.defaultdict(float)  # event -> seconds
        # the same in CPU time of the event loop's thread: the code's own cost, without the
        # time the thread waited for a core the workers were using
        self._overhead_cpu_s = 0.0

    # ------------------------------------------------------------------ start-up
    async def start(self) -> dict:
        infos = dict(zip(self.handles, await asyncio.gather(*[w.info.remote() for w in self.handles.values()])))
        first = next(iter(infos.values()))
        self.page_size, self.kv_bytes_per_page = first["page_size"], first["kv_bytes_per_page"]
        self.model = first["model"]  # .config and .tokenizer, for validation
        self.max_seq_len = min(i["max_seq_len"] for i in infos.values())
        # samples of one prompt per prefill: what every worker's prefill engine can take (the
        # prefill workers', and the decode workers' for local prefills)
        self.max_samples = min(i.get("max_prefill_segments", 1) for i in infos.values())
        self._infos = infos
        pool_bytes = sum(i["max_pages"] for i in infos.values()) * self.kv_bytes_per_page
        cache_bytes = self.cache_bytes if self.cache_bytes is not None else pool_bytes // 2
        store = KVStore(self.page_size, self.kv_bytes_per_page,
                        cache_bytes + (self.host_cache_bytes if self.host_copies else 0), self.host_copies)
        cost = default_cost_model(self.kv_bytes_per_page // self.page_size)
        if self.calibrate:
            cost = await self._calibrate()
        workers = {w: core.WorkerState(self._roles[w], i["max_pages"], i.get("max_slots", 0), i["max_pages"],
                                       i.get("max_slots", 0)) for w, i in infos.items()}
        self.core = core.SchedulerCore(self.name, workers, store, cost, self.policy, self.max_retries,
                                       self.stream_layers, self.max_replacements if self.spawn else 0)
        self._changed = asyncio.Condition()
        for d, role in self._roles.items():
            if role == core.DECODE:
                self._spawn(self._collect_loop(d))
        if self.rebalance is not None and self.spawn is not None:
            d = next(i for w, i in infos.items() if self._roles[w] == core.DECODE)
            worker = WorkerProfile(cost, num_pages=d["max_pages"], page_size=self.page_size, max_slots=d["max_slots"],
                                   max_seq_len=self.max_seq_len,
                                   prefill_chunk_len=d.get("prefill_chunk_len", 256))
            self.rebalancer = Rebalancer(self.rebalance, worker, self.policy)
            self._spawn(self._rebalance_loop())
        return await self.status()

    async def _rebalance_loop(self) -> None:
        """Ask the rebalancer every interval (off the event loop: it simulates) and move workers."""
        while self.core.is_running:
            await asyncio.sleep(self.rebalance.interval_s)
            c = self.core
            if c.draining or c.joining:
                continue
            roles = [s.role for s in c.workers.values()]
            backlog = [(r.spec.prompt_len, r.spec.max_tokens - len(r.generated))
                       for r in c.requests.values() if not r.is_finished]
            split = await asyncio.to_thread(self.rebalancer.recommend, time.monotonic(), roles.count(core.PREFILL),
                                            roles.count(core.DECODE), backlog, list(self.rebalancer.arrivals))
            if split is not None and not c.draining and not c.joining:
                log.warning("rebalancing to %d prefill : %d decode workers (%s)", *split, self.rebalancer.last)
                await self._act(c.set_roles(*split, time.monotonic()))

    async def _calibrate(self) -> CostModel:
        """Time the engines on a few sizes and fit the cost model (scheduler.cost_model.fit)."""
        G, top = self.page_size, self.max_seq_len
        live = self.handles if self.core is None else {w: self.handles[w] for w in self.core.workers}
        pre_w = [h for w, h in live.items() if self._roles[w] == core.PREFILL]
        dec_w = [h for w, h in live.items() if self._roles[w] == core.DECODE]
        lengths = sorted({min(n, top - 16) for n in (G, 4 * G, 16 * G, 64 * G) if n < top})
        pre = await asyncio.gather(*[w.calibrate.remote(lengths) for w in pre_w])
        # Two context lengths (mid-page, so the timed steps stay within one page: no new shape)
        # separate the per-slot from the per-context-token cost; a calibration request (context
        # + 16 new tokens) must fit the engines' context. Without prefill workers the decode
        # workers' local prefills are timed at the prefill workers' lengths instead.
        contexts = sorted({max(1, min(n * G + G // 2, top - 17)) for n in (4, 16)})
        local = [] if pre_w else lengths
        dec = await asyncio.gather(*[w.calibrate.remote([1, 2, 4], contexts, 0, local) for w in dec_w])
        prefill = [s for r in pre for s in r["prefill"]] or [s for r in dec for s in r["prefill"]]
        transfer = [s for r in pre for s in r["transfer"]] or [(1, 1e-3)]
        cost = fit(prefill, [s for r in dec for s in r["decode"]], transfer, self.kv_bytes_per_page // self.page_size)
        if self.local_prefill_stall_s is not None:
            self.policy = dataclasses.replace(
                self.policy, local_prefill_max_len=cost.max_local_prefill_len(self.local_prefill_stall_s, top))
        self._calibration = dict(prefill=prefill, transfer=transfer, cost=dataclasses.asdict(cost),
                                 local_prefill_max_len=self.policy.local_prefill_max_len)
        return cost

    async def recalibrate(self) -> dict:
        """Time the live workers' engines again and refit the cost model now, for a machine whose
        speed changed since start-up; placement and the rebalancer use the new model from the
        next event on. For an idle deployment (the timed calls queue behind serving work).
        -> the calibration, as status()["calibration"]."""
        cost = await self._calibrate()
        self.core.cost, self.core.policy = cost, self.policy
        if self.rebalancer is not None:
            self.rebalancer.worker = dataclasses.replace(self.rebalancer.worker, cost=cost)
        return self._calibration

    # ------------------------------------------------------------------ client calls
    async def submit(self, prompts: list, params: SamplingParams, ttft_slo_s: float | None = None,
                     kv_compression: str | None = None) -> dict:
        """Validate all, then admit and queue all. -> {"ids": [...]} or {"error": errors.to_wire}."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            check_kv_compression(kv_compression)
            check_sampling(params, self.model)
            ids = [encode_prompt(p, self.model, self.max_seq_len, params.max_tokens, f"prompts[{i}]")
                   for i, p in enumerate(prompts)]
        except ValueError as e:
            return {"error": errors.to_wire(e)}
        return await self._submit([(p, params, kv_compression) for p in ids], ttft_slo_s, t0, c0)

    async def submit_samples(self, prompt, params: list[SamplingParams], ttft_slo_s: float | None = None,
                             kv_compression: str | None = None) -> dict:
        """The n samples of one prompt (`params[i]`: sample i's, with its own seed; one
        max_tokens for all), prefilled once on one prefill worker and decoded on one decode
        worker, the others forking from the first's K/V (scheduler/groups.py).
        -> {"ids": [...]} (one per sample) or {"error": errors.to_wire}."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if not 1 <= len(params) <= self.max_samples:
                raise ValueError(f"params: 1 to {self.max_samples} samples share one prefill "
                                 f"(EngineConfig.max_prefill_segments), got {len(params)}")
            if len({p.max_tokens for p in params}) > 1:
                raise ValueError("params: the samples of one prompt must share max_tokens")
            check_kv_compression(kv_compression)
            for p in params:
                check_sampling(p, self.model)
            ids = encode_prompt(prompt, self.model, self.max_seq_len, params[0].max_tokens, "prompts[0]")
        except ValueError as e:
            return {"error": errors.to_wire(e)}
        return await self._submit([(ids, p, kv_compression) for p in params], ttft_slo_s, t0, c0, samples=True)

    async def _submit(self, items: list[tuple], ttft_slo_s: float | None, t0: float, c0: float,
                      samples: bool = False) -> dict:
        """Validated (prompt ids, params, kv_compression) items into the core; -> the reply."""
        now = time.monotonic()
        result, actions = self.core.submit(items, ttft_slo_s, now, make_request=Request, samples=samples)
        if self.rebalancer is not None and isinstance(result, list):
            for prompt_ids, params, _ in items:
                self.rebalancer.observe(now, len(prompt_ids), params.max_tokens)
        await self._act(actions)
        spent = time.perf_counter() - t0
        self._overhead_s += spent
        self._overhead_cpu_s += time.thread_time() - c0
        self._overhead_by["submit"] += spent
        return {"ids": result} if isinstance(result, list) else {"error": result}

    async def poll(self, request_ids: list[str], timeout_s: float = 1.0) -> dict:
        """New tokens of each request since the last poll (waits up to `timeout_s` for any).
        -> {rid: {"tokens": [Token], "finished": bool, "error", "metrics"}} (Token: scheduler/state.py)"""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.core.has_news(request_ids)), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.core.poll(request_ids)

    async def abort(self, request_ids: list[str]) -> None:
        await self._act(self.core.abort(request_ids, time.monotonic()))

    async def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait up to `timeout_s` until the core holds nothing (no request, reservation, call or
        transfer: `SchedulerCore.is_idle`); woken by every event, no polling. -> whether it is."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(self.core.is_idle), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.core.is_idle()

    async def status(self) -> dict:
        pre = await self._worker_status(core.PREFILL)
        dec = await self._worker_status(core.DECODE)
        return dict(self.core.stats(), prefill=pre, decode=dec, calibration=self._calibration,
                    overhead_ms_per_request=1e3 * self._overhead_s / max(1, self.core.num_requests),
                    overhead_cpu_ms_per_request=1e3 * self._overhead_cpu_s / max(1, self.core.num_requests),
                    overhead_s_by_event=dict(self._overhead_by))

    async def is_ready(self) -> bool:
        """Whether a request submitted now can be served (a live decode worker), without asking
        the workers anything: cheap enough for health checks."""
        return self.core.is_ready()

    async def info(self) -> dict:
        """The deployment's shapes: model (.config, .tokenizer), context, pool and batch sizes."""
        decode = [self._infos[d] for d in self._live(core.DECODE)]
        return dict(name=self.name, model=self.model, max_seq_len=self.max_seq_len, page_size=self.page_size,
                    num_pages_total=sum(i["max_pages"] for i in decode), max_slots=sum(i["max_slots"] for i in decode),
                    num_prefill=len(self._live(core.PREFILL)), num_decode=len(decode),
                    max_samples=self.max_samples)

    async def set_roles(self, num_prefill: int, num_decode: int) -> dict:
        """Move workers between roles (SchedulerCore.set_roles). -> {"draining": {worker: new role}}
        or {"error": ...}. Needs the deployment's spawner (replacements)."""
        if self.spawn is None:
            return {"error": errors.to_wire(ValueError("this deployment cannot start workers (no spawner)"))}
        try:
            actions = self.core.set_roles(num_prefill, num_decode, time.monotonic())
        except ValueError as e:
            return {"error": errors.to_wire(e)}
        await self._act(actions)
        return {"draining": dict(self.core.draining)}

    async def clear_cache(self, pools_only: bool = False) -> int:
        """Evict every unpinned page of the store and free it on its worker; with `pools_only`,
        only the workers' pool copies go (host copies stay). Exports under way finish first, so
        nothing they add survives the clear. -> pool copies freed."""
        if self._exports:
            await asyncio.wait(list(self._exports), timeout=30.0)
        actions = self.core.clear_cache(time.monotonic(), pools_only)
        await asyncio.gather(*[self._call(a.worker, "free_pages", list(a.pages)) for a in actions])
        return sum(len(a.pages) for a in actions)

    async def shutdown(self) -> None:
        self.core.shutdown()
        for task in list(self._tasks):
            task.cancel()
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ actions -> calls
    def _live(self, role: str) -> list[str]:
        return [w for w, s in self.core.workers.items() if s.role == role]

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._exports.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scheduler task failed", exc_info=task.exception())

    async def _act(self, actions: list) -> None:
        """Carry out a core event's actions (each a call, awaited in the background), then wake
        pollers."""
        for a in actions:
            if isinstance(a, core.RunPrefill):
                self._spawn(self._run_prefill(a))
            elif isinstance(a, core.RunLocalPrefill):
                self._spawn(self._call(a.worker, "submit_local", [self._job(t) for t in a.tasks]))
            elif isinstance(a, core.Insert):
                self._spawn(self._call(a.worker, "submit", list(a.items)))
            elif isinstance(a, core.AbortOnWorker):
                self._spawn(self._call(a.worker, "abort", list(a.request_ids)))
            elif isinstance(a, core.ReleaseTransfers):
                self._spawn(self._call(a.worker, "release_transfers", list(a.handles)))
            elif isinstance(a, FreePages):
                self._spawn(self._call(a.worker, "free_pages", list(a.pages)))
            elif isinstance(a, ExportPages):
                self._exports.add(self._spawn(self._export(a)))
            elif isinstance(a, core.ProbeWorker):
                self._spawn(self._probe(a))
            elif isinstance(a, core.ReplaceWorker):
                self._spawn(self._replace(a))
            elif isinstance(a, core.RetireWorker):
                self._spawn(self._retire(a))
            else:
                raise TypeError(f"unknown action {a!r}")
        async with self._changed:
            self._changed.notify_all()

    async def _event(self, method: str, *args, **kwargs) -> None:
        """Feed the core one event (with the time) and act on what it returns."""
        t0, c0 = time.perf_counter(), time.thread_time()
        actions = getattr(self.core, method)(*args, now_s=time.monotonic(), **kwargs)
        spent = time.perf_counter() - t0
        self._overhead_s += spent
        self._overhead_cpu_s += time.thread_time() - c0
        self._overhead_by[method] += spent
        await self._act(actions)

    async def _call(self, worker: str, method: str, *args, ref=None):
        """Await one worker call; the one place failures are classified. -> its result, or the
        exception (a dead worker has been reported to the core)."""
        try:
            return await (ref if ref is not None else getattr(self.handles[worker], method).remote(*args))
        except RayActorError as e:
            log.error("worker %s died during %s: %s", worker, method, e)
            await self._event("worker_died", worker, f"{type(e).__name__}: {e}")
            return e
        except Exception as e:  # noqa: BLE001 - that call's error, not the worker's death
            log.error("%s on worker %s failed: %s", method, worker, e)
            return e

    def _job(self, task: core.PrefillTask) -> PrefillJob:
        stream_to = self.handles[task.stream_to] if task.stream_to is not None else None
        return PrefillJob(task.request, list(task.prefix_pages), host_prefix=list(task.host_prefix),
                          stream_to=stream_to, samples=tuple(task.samples))

    async def _run_prefill(self, a: core.RunPrefill) -> None:
        ref = self.handles[a.worker].prefill.remote([self._job(t) for t in a.tasks])
        try:
            results, num_free = await ref
        except RayActorError as e:  # the worker died: its requests are placed again elsewhere
            await self._event("prefill_done", a.worker, a.tasks, [], lost=f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - the call failed: its requests fail
            log.error("prefill on %s failed: %s", a.worker, e)
            results, num_free = [f"{type(e).__name__}: {e}"] * len(a.tasks), None
        results = [f"{type(r).__name__}: {r}" if isinstance(r, Exception) else r for r in results]
        await self._event("prefill_done", a.worker, a.tasks, results, num_free_pages=num_free)

    async def _export(self, a: ExportPages) -> None:
        """A host copy: the payload stays in the worker node's object store, owned here."""
        info_ref, payload_ref = self.handles[a.worker].export_pages.options(num_returns=2).remote(
            list(a.pages), a.compression)
        info = await self._call(a.worker, "export_pages", ref=info_ref)
        if isinstance(info, Exception):  # no host copy this time; the pool copy stands
            return
        await self._event("add_host_copy", list(a.token_ids), a.first, len(a.pages), info["node_id"],
                          info["num_bytes"], payload_ref)

    async def _probe(self, a: core.ProbeWorker) -> None:
        try:
            await asyncio.wait_for(_status(self.handles[a.worker], self._roles[a.worker] == core.PREFILL),
                                   PROBE_TIMEOUT_S)
            alive = True
        except (RayActorError, asyncio.TimeoutError):
            alive = False
        await self._event("probe_done", a.request_id, a.worker, alive, a.why)

    async def _retire(self, a: core.RetireWorker) -> None:
        """A drained worker leaves: stop its actor (its collect loop sees it gone and ends)."""
        import ray

        log.warning("retiring drained worker %s", a.worker)
        ray.kill(self.handles[a.worker])

    async def _replace(self, a: core.ReplaceWorker) -> None:
        """Start a worker in a dead one's role; it joins placement once its engines answer."""
        log.warning("replacing dead worker %s with %s", a.dead_worker, a.new_worker)
        try:
            handle = self.spawn(a.role, a.new_worker)
            info = await asyncio.wait_for(handle.info.remote(), self.join_timeout_s)
        except Exception as e:  # noqa: BLE001 - it never came up: requests stop waiting for it
            log.error("replacement %s failed: %s", a.new_worker, e)
            await self._event("worker_join_failed", a.new_worker, f"{type(e).__name__}: {e}")
            return
        self.handles[a.new_worker], self._roles[a.new_worker], self._infos[a.new_worker] = handle, a.role, info
        state = core.WorkerState(a.role, info["max_pages"], info.get("max_slots", 0), info["max_pages"],
                                 info.get("max_slots", 0))
        await self._event("worker_joined", a.new_worker, state)
        if a.role == core.DECODE:
            self._spawn(self._collect_loop(a.new_worker))
        log.warning("worker %s joined", a.new_worker)

    async def _collect_loop(self, d: str) -> None:
        while self.core.is_running and d in self.core.workers:
            report = await self._call(d, "collect", self.collect_timeout_s)
            if isinstance(report, RayActorError):
                return  # reported to the core as the worker's death
            if isinstance(report, Exception):
                await asyncio.sleep(0.1)  # a failed call, not a death: ask again
                continue
            await self._event("decode_report", d, report)

    async def _worker_status(self, role: str) -> list[dict]:
        """Status of each live worker; one found dead is reported to the core."""
        workers = self._live(role)
        replies = await asyncio.gather(*[_status(self.handles[w], role == core.PREFILL) for w in workers],
                                       return_exceptions=True)
        out = []
        for w, reply in zip(workers, replies):
            if isinstance(reply, RayActorError):
                await self._event("worker_died", w, f"{type(reply).__name__}: {reply}")
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out.append(reply)
        return out
