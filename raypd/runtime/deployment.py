"""A deployment on a Ray cluster: `serve` starts one, `connect` attaches to one by name.

This is the one place Ray is applied to the runtime's plain classes (PrefillWorker,
DecodeWorker, Scheduler), with resources from `DeploymentConfig`. Lifecycle:
  1. `serve(...)`: connect to the cluster at $RAY_ADDRESS, or start a private local one
     (`start_local_cluster`: loopback only, no dashboard) unless connected; start the prefill and
     decode worker actors (each builds its engines on its own devices) and the scheduler, a
     named async actor in the "raypd" namespace; `Scheduler.start` reads the workers' shapes,
     calibrates the cost model (optional) and starts one collect loop per decode worker.
  2. `Deployment.generate / stream`: `Scheduler.submit` validates and queues (or raises a
     typed error at once), then `Scheduler.poll` returns tokens in chunks until each ends.
  3. `Deployment.shutdown()`: the scheduler stops (queued requests fail), actors are killed;
     later calls on any handle raise DeploymentNotRunning.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from typing import Iterator

import ray

from raypd.protocol import Completion, StreamChunk, check_sampling, request_metrics
from raypd.engine.api import DEFAULT_KV_COMPRESSION, SamplingParams
from raypd.engine.runner import EngineConfig
from raypd.runtime import errors
from raypd.runtime.engines import JaxEngineFactory
from raypd.runtime.poller import TokenPoller
from raypd.runtime.scheduler_actor import Scheduler
from raypd.runtime.spawner import ROOT, STATUS_GROUP, WorkerSpawner  # noqa: F401 - ROOT, STATUS_GROUP for callers
from raypd.transfer import DEFAULT_BACKEND
from scheduler import PolicyConfig
from scheduler.rebalancer import RebalanceConfig

NAMESPACE = "raypd"
REQUEST_TIMEOUT_S = 300.0  # a request that gets no token for this long fails with TimeoutError
LOOPBACK = "127.0.0.1"


def start_local_cluster(include_dashboard: bool = False, **init_kw):
    """`ray.init` a new single-node cluster for this process alone, with every Ray component
    (GCS, raylet, object manager, workers, dashboard agent, runtime-env agent and, when asked
    for, the dashboard) listening on 127.0.0.1 only. `init_kw`: more ray.init arguments.

    Ray has no public switch for this. Its C++ servers bind loopback only when the node's IP is
    127.0.0.1, but `ray.init(_node_ip_address="127.0.0.1")` replaces a loopback address with
    the machine's routable one; the node IP is loopback only where Ray believes clusters are
    off (its RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER setting, read when ray is imported). So that
    setting's constant is turned off for the duration of ray.init, and the result is checked:
    a Ray version that behaves otherwise fails here instead of listening on the network.
    -> what ray.init returns (`.dashboard_url`, `.address_info`)."""
    from ray._private import ray_constants

    env = dict(init_kw.pop("runtime_env", None) or {})
    env["env_vars"] = {"PYTHONPATH": ROOT, **env.get("env_vars", {})}
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(address="local", include_dashboard=include_dashboard, dashboard_host=LOOPBACK,
                           runtime_env=env, **init_kw)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster came up on {node_ip}, not {LOOPBACK}: this Ray version "
                           f"({ray.__version__}) ignores raypd's loopback setting; start Ray yourself "
                           "(ray start --head --node-ip-address ...) and pass its address")
    return context


@dataclasses.dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: the TP degree when the cluster has GPUs, else 0
    resources: dict = dataclasses.field(default_factory=dict)  # custom resources, e.g. {"prefill_node": 1}
    cpus: tuple[int, ...] | None = None  # pin each such worker's threads to these cores (benchmarks)


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    name: str = "raypd"
    factory: object = JaxEngineFactory()  # builds each worker's engines (engines.py)
    num_prefill: int = 1
    num_decode: int = 1
    prefill_tp: int = 1
    decode_tp: int = 1
    transport: str = DEFAULT_BACKEND
    prefill_resources: Resources = Resources()
    decode_resources: Resources = Resources()
    policy: PolicyConfig = PolicyConfig()
    cache_bytes: int | None = None  # KV index capacity; None: half of all pools
    calibrate: bool = True  # time the engines at start-up and fit the cost model
    local_prefill_stall_s: float | None = 0.02  # sets the local prefill threshold from measurement
    collect_timeout_s: float = 0.02
    max_retries: int = 2  # per request, after a worker dies or its K/V is lost in transfer
    # Host tier of the KV store: prefill workers export newly cached pages to Ray's object store
    # ("int8" | "none" compression; "auto": the engines' own K/V compression; None: off). Ray
    # spills the objects to disk under memory pressure, which gives the disk tier.
    host_copies: str | None = "auto"
    host_cache_bytes: int = 256 << 20  # index capacity for host copies, on top of cache_bytes
    # Prefill workers stream each request's K/V to its decode worker one layer group at a time
    # while the later groups compute (EngineConfig.layer_groups > 1 to overlap anything).
    stream_layers: bool = False
    # Workers that die are replaced (a new actor in the same role, on the same resources) up to
    # this many times in the deployment's life; it joins placement once its engines are up.
    max_replacements: int = 4
    # Move workers between the prefill and decode roles by itself when the recent traffic, replayed
    # through the simulator, would meet these SLOs clearly more often with another split (None: off).
    rebalance: RebalanceConfig | None = None
    # custom resources the scheduler actor needs (e.g. {"head": 0.01} to keep it on the head node;
    # it takes no CPU); empty: anywhere
    scheduler_resources: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(f"need num_prefill >= 0 and num_decode >= 1, got {self.num_prefill}, {self.num_decode}")
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError(f"tp must be >= 1, got prefill_tp={self.prefill_tp}, decode_tp={self.decode_tp}")
        if self.host_copies not in (None, "auto", "none", "int8"):
            raise ValueError(f"host_copies must be None, 'auto', 'none' or 'int8', got {self.host_copies!r}")
        if self.max_retries < 0 or self.host_cache_bytes < 0 or self.max_replacements < 0:
            raise ValueError(f"max_retries, host_cache_bytes and max_replacements must be >= 0, got "
                             f"{self.max_retries}, {self.host_cache_bytes}, {self.max_replacements}")




def serve(model=None, num_prefill: int = 1, num_decode: int = 1, prefill_tp: int = 1, decode_tp: int = 1,
          name: str = "raypd", engine_config: EngineConfig | None = None, compression: str = DEFAULT_KV_COMPRESSION,
          config: DeploymentConfig | None = None, warmup: bool = False, **overrides) -> "Deployment":
    """Start a deployment on the current Ray cluster (or a new local one) and return its handle.
    `config` gives every setting at once; otherwise the arguments (and `overrides`, any other
    DeploymentConfig field) build one. `warmup`: every worker compiles every engine shape before
    it reports ready (JaxEngineFactory.warmup), so no request waits for a compilation; what
    `raypd serve` does, and what every measurement needs (a shape first seen mid-run stalls its
    worker for seconds on a CPU)."""
    if config is None:
        factory = overrides.pop("factory", None) or JaxEngineFactory(
            model, engine_config or EngineConfig(), compression, warmup=warmup)
        config = DeploymentConfig(name=name, factory=factory, num_prefill=num_prefill, num_decode=num_decode,
                                  prefill_tp=prefill_tp, decode_tp=decode_tp, **overrides)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
        else:
            start_local_cluster()
    if _find(config.name) is not None:
        raise ValueError(f"a deployment named {config.name!r} is already running; shut it down or pick another name")
    spawn = WorkerSpawner(config, ray.cluster_resources().get("GPU", 0) > 0)
    prefill = {f"prefill-{i}": spawn("prefill", f"prefill-{i}") for i in range(config.num_prefill)}
    decode = {f"decode-{i}": spawn("decode", f"decode-{i}") for i in range(config.num_decode)}
    sched = ray.remote(Scheduler).options(
        name=config.name, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000,
        resources=dict(config.scheduler_resources),
        runtime_env={"env_vars": {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}}).remote(
        config.name, prefill, decode, policy=config.policy, cache_bytes=config.cache_bytes,
        calibrate=config.calibrate, local_prefill_stall_s=config.local_prefill_stall_s,
        collect_timeout_s=config.collect_timeout_s, max_retries=config.max_retries,
        host_copies=_host_copies(config), host_cache_bytes=config.host_cache_bytes,
        stream_layers=config.stream_layers, spawn=spawn, max_replacements=config.max_replacements,
        rebalance=config.rebalance)
    handle = Deployment(config.name, sched, actors=[sched, *prefill.values(), *decode.values()])
    try:
        ray.get(sched.start.remote())
    except Exception:
        handle.shutdown()
        raise
    return handle


def _host_copies(config: DeploymentConfig) -> str | None:
    if config.host_copies != "auto":
        return config.host_copies
    return getattr(config.factory, "compression", "none")


def _find(name: str):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def connect(name: str = "raypd", address: str | None = None) -> "Deployment":
    """Attach to a running deployment by name, from any driver or job on its cluster."""
    if not ray.is_initialized():
        ray.init(address=address or "auto")
    sched = _find(name)
    if sched is None:
        raise errors.DeploymentNotFound(f"no raypd deployment named {name!r} on this Ray cluster "
                                        f"(namespace {NAMESPACE!r}); start one with `raypd serve --address "
                                        f"ADDRESS --deployment {name}` (or raypd.serve(name={name!r}) in Python)")
    return Deployment(name, sched)


def find_running(name: str = "raypd") -> "Deployment | None":
    """The deployment `name` when this process is connected to Ray and one runs, else None."""
    if not ray.is_initialized():
        return None
    sched = _find(name)
    return Deployment(name, sched) if sched is not None else None


class Deployment:
    """A handle on a running deployment (from `serve` or `connect`)."""

    def __init__(self, name: str, scheduler, actors=()):
        self.name, self._scheduler, self._actors = name, scheduler, list(actors)
        self._is_shut_down = False
        self._model_card = None
        self._tokenizer = None  # the deployment's, fetched on first need (prompt token counts)
        self._poller: TokenPoller | None = None
        self._poller_lock = threading.Lock()

    @property
    def poller(self) -> TokenPoller:
        """The handle's one token poller (raypd/runtime/poller.py), started on first use."""
        with self._poller_lock:
            if self._poller is None:
                self._poller = TokenPoller(self.poll, name=f"raypd-poller-{self.name}")
            return self._poller

    def _call(self, method: str, *args, timeout_s: float | None = None):
        if self._is_shut_down:
            raise errors.DeploymentNotRunning(f"deployment {self.name!r} was shut down")
        try:
            return ray.get(getattr(self._scheduler, method).remote(*args), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise errors.DeploymentNotRunning(f"deployment {self.name!r} did not answer {method} within "
                                              f"{timeout_s} s") from None
        except ray.exceptions.RayActorError as e:
            raise errors.DeploymentNotRunning(f"deployment {self.name!r} is not running: {e}") from None

    def poll(self, request_ids: list[str], timeout_s: float = 1.0) -> dict:
        """New tokens of each submitted request since the last poll; waits up to `timeout_s`
        for any. -> {id: {"tokens": [Token], "finished", "error", "metrics"}} (Token: scheduler/state.py)"""
        return self._call("poll", list(request_ids), timeout_s, timeout_s=timeout_s + 30.0)

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests: their pages and slots are freed. Unknown or ended ids are ignored."""
        self._call("abort", list(request_ids), timeout_s=30.0)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until the scheduler holds nothing (no request, reservation, prefill call or
        transfer under way); TimeoutError after `timeout_s`. Workers finish their part (an
        abort, a page free) on their own loops shortly after."""
        if not self._call("wait_idle", timeout_s, timeout_s=timeout_s + 30.0):
            raise TimeoutError(f"deployment {self.name!r}: the scheduler was not idle within {timeout_s} s")

    def info(self) -> dict:
        """model (.config, .tokenizer), max_seq_len, page_size, num_pages_total, max_slots, ..."""
        return self._call("info", timeout_s=60.0)

    def _model(self):
        """The model's card (.config, .tokenizer), fetched once per handle."""
        if self._model_card is None:
            self._model_card = self.info()["model"]
        return self._model_card

    def submit(self, prompts: list, params: SamplingParams, ttft_slo_s: float | None = None,
               kv_compression: str | None = None) -> list[str]:
        if params.stop_token_ids:  # checked against the model's vocabulary before the call
            check_sampling(params, self._model())
        reply = self._call("submit", list(prompts), params, ttft_slo_s, kv_compression)
        if "error" in reply:
            raise errors.from_wire(reply["error"])
        return reply["ids"]

    def submit_samples(self, prompt, params: list[SamplingParams], ttft_slo_s: float | None = None,
                       kv_compression: str | None = None) -> list[str]:
        """n samples of one prompt (`params[i]`: sample i's, each with its own seed; one
        max_tokens), prefilled once and decoded side by side on one decode worker, sharing the
        prompt's pages there. At most `info()["max_samples"]` at once. -> one id per sample."""
        for p in params:
            if p.stop_token_ids:
                check_sampling(p, self._model())
        reply = self._call("submit_samples", prompt, list(params), ttft_slo_s, kv_compression)
        if "error" in reply:
            raise errors.from_wire(reply["error"])
        return reply["ids"]

    def _chunks(self, ids: list[str], timeout_s: float = REQUEST_TIMEOUT_S) -> Iterator[tuple[str, dict]]:
        """(request id, poll entry) as tokens arrive, until every request has ended. Raises
        TimeoutError when no request of `ids` gets a token for `timeout_s`."""
        merged: queue.SimpleQueue = queue.SimpleQueue()
        for rid in ids:
            self.poller.add(rid, merged)
        pending = set(ids)
        try:
            while pending:
                try:
                    rid, entry = merged.get(timeout=timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"deployment {self.name!r}: no tokens for {len(pending)} requests within "
                                       f"{timeout_s} s") from None
                if entry["error"] is not None:
                    raise errors.from_wire(entry["error"])
                yield rid, entry
                if entry["finished"]:
                    pending.discard(rid)
        finally:
            for rid in pending:
                self.poller.drop(rid)
            if pending and not self._is_shut_down:
                try:
                    self._call("abort", list(pending))
                except errors.DeploymentNotRunning:
                    pass

    def generate(self, prompts, *, ttft_slo_s: float | None = None, logprobs: bool = False,
                 kv_compression: str | None = None, **sampling) -> list[Completion]:
        """As raypd.generate; `sampling` are SamplingParams fields (max_tokens, temperature, ...).
        ttft_slo_s: reject at once (RequestRejected "deadline") when the predicted TTFT exceeds it.
        kv_compression: "int8" | "none" | None (the deployment's default) for this request's K/V."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = SamplingParams(logprobs=logprobs, **_sampling(sampling))
        start = time.perf_counter()
        ids = self.submit(prompts, params, ttft_slo_s, kv_compression)
        tokens = {rid: [] for rid in ids}
        metrics, first, last = {}, {}, {}
        for rid, entry in self._chunks(ids):
            now = time.perf_counter()
            if entry["tokens"]:
                first.setdefault(rid, now)
                last[rid] = now
            tokens[rid].extend(entry["tokens"])
            metrics[rid] = entry["metrics"]
        out = []
        for rid, prompt in zip(ids, prompts):
            toks, m = tokens[rid], dict(metrics[rid])
            m["scheduler_ttft_s"] = m.pop("ttft_s", None)  # from arrival at the scheduler, before polling
            out.append(Completion(
                text="".join(t.text for t in toks), token_ids=[t.token_id for t in toks],
                finish_reason=toks[-1].finish_reason, logprobs=[t.logprob for t in toks] if logprobs else None,
                metrics=dict(m, **request_metrics(start, first[rid], last[rid], self._prompt_tokens(prompt),
                                                  len(toks))),
                top_logprobs=[t.top_logprobs for t in toks] if params.top_logprobs else None))
        return out

    def _prompt_tokens(self, prompt) -> int | None:
        """How many tokens the deployment's scheduler made of `prompt` (its tokenizer, fetched once)."""
        if not isinstance(prompt, str):
            return len(prompt)
        if self._tokenizer is None:
            self._tokenizer = self.info()["model"].tokenizer
        return len(self._tokenizer.encode(prompt)) if self._tokenizer is not None else None

    def stream(self, prompt, *, ttft_slo_s: float | None = None, kv_compression: str | None = None,
               **sampling) -> Iterator[StreamChunk]:
        """Yield a StreamChunk per token of one prompt; tokens arrive from the scheduler in chunks."""
        (rid,) = self.submit([prompt], SamplingParams(**_sampling(sampling)), ttft_slo_s, kv_compression)

        start = time.perf_counter()

        def chunks():
            first, n = None, 0
            for _, entry in self._chunks([rid]):
                now = time.perf_counter()
                first = first or now
                for t in entry["tokens"]:  # Token (scheduler/state.py)
                    n += 1
                    metrics = None
                    if t.finish_reason is not None:
                        metrics = dict(entry["metrics"])
                        metrics["scheduler_ttft_s"] = metrics.pop("ttft_s", None)
                        metrics.update(request_metrics(start, first, now, self._prompt_tokens(prompt), n))
                    yield StreamChunk(token_id=t.token_id, text=t.text, logprob=t.logprob, finish_reason=t.finish_reason,
                                      metrics=metrics, top_logprobs=t.top_logprobs)

        return chunks()

    def is_ready(self, timeout_s: float = 5.0) -> bool:
        """Whether the deployment can generate now (running, with a live decode worker); False
        when its scheduler does not answer within `timeout_s`."""
        try:
            return bool(self._call("is_ready", timeout_s=timeout_s))
        except errors.DeploymentNotRunning:
            return False

    def status(self, timeout_s: float | None = 60.0) -> dict:
        return self._call("status", timeout_s=timeout_s)

    def set_roles(self, num_prefill: int, num_decode: int, wait_s: float | None = 300.0) -> dict:
        """Move workers between the prefill and decode roles without dropping a request: those
        that move drain first, then a worker of the other role starts in each one's place.
        Waits up to `wait_s` (None: returns at once) until the new workers serve. -> status()."""
        reply = self._call("set_roles", num_prefill, num_decode, timeout_s=60.0)
        if "error" in reply:
            raise errors.from_wire(reply["error"])
        deadline = time.monotonic() + (wait_s or 0.0)
        while True:
            s = self.status()
            done = not s["draining_workers"] and not s["joining_workers"] and \
                (len(s["prefill"]), len(s["decode"])) == (num_prefill, num_decode)
            if done or wait_s is None:
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {self.name!r}: roles not {num_prefill}:{num_decode} after "
                                   f"{wait_s} s (draining {s['draining_workers']}, joining {s['joining_workers']})")
            time.sleep(0.2)

    def calibrate(self, timeout_s: float = 600.0) -> dict:
        """Time the engines again and refit the scheduler's cost model (the machine's speed may
        have changed since start-up). Call it while the deployment is idle. -> the calibration:
        {"cost": CostModel fields, "prefill": [...], "transfer": [...], ...}."""
        return self._call("recalibrate", timeout_s=timeout_s)

    def clear_cache(self, pools_only: bool = False) -> int:
        """Drop every cached prefix page (the KV index, the workers' pools and host copies); with
        `pools_only`, only the pool copies (the host tier keeps its copies). -> copies dropped."""
        return self._call("clear_cache", pools_only)

    def shutdown(self) -> None:
        """Stop the deployment: queued requests fail, actors end. Idempotent."""
        if self._is_shut_down:
            return
        try:
            ray.get(self._scheduler.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for actor in self._actors or [self._scheduler]:
            ray.kill(actor)
        self._is_shut_down = True
        if self._poller is not None:
            self._poller.stop()


def _sampling(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("stop") is None:
        kwargs.pop("stop", None)
    if "stop_token_ids" in kwargs:
        kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
    return kwargs
