"""A deployment on a Ray cluster: `serve` starts one, `connect` attaches to one by name.

This is the one place Ray is applied to the runtime's plain classes (PrefillWorker,
DecodeWorker, Scheduler), with resources from `DeploymentConfig`. Lifecycle:
  1. `serve(...)`: `ray.init()` a local cluster unless one is connected; start the prefill and
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
import time
from pathlib import Path
from typing import Iterator

import ray

from raypd import compile_cache
from raypd.api import Completion, StreamChunk, request_metrics
from raypd.engine.api import SamplingParams
from raypd.engine.runner import EngineConfig
from raypd.runtime import errors
from raypd.runtime.engines import JaxEngineFactory
from raypd.runtime.scheduler_actor import Scheduler
from raypd.runtime.decode_worker import DecodeWorker
from raypd.runtime.workers import PrefillWorker
from raypd.transfer import DEFAULT_BACKEND, make_transport
from scheduler import PolicyConfig

NAMESPACE = "raypd"
# A prefill worker runs one call at a time (its engine is not shared); `status` runs in this
# group of its own, so a liveness probe or a metrics scrape never waits behind a long prefill.
STATUS_GROUP = "status"
ROOT = str(Path(__file__).resolve().parents[2])


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

    def __post_init__(self):
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(f"need num_prefill >= 0 and num_decode >= 1, got {self.num_prefill}, {self.num_decode}")
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError(f"tp must be >= 1, got prefill_tp={self.prefill_tp}, decode_tp={self.decode_tp}")
        if self.host_copies not in (None, "auto", "none", "int8"):
            raise ValueError(f"host_copies must be None, 'auto', 'none' or 'int8', got {self.host_copies!r}")
        if self.max_retries < 0 or self.host_cache_bytes < 0:
            raise ValueError(f"max_retries and host_cache_bytes must be >= 0, got {self.max_retries}, "
                             f"{self.host_cache_bytes}")


def _options(res: Resources, tp: int, has_gpus: bool, **extra) -> dict:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           **compile_cache.worker_env()}  # workers share this process's compilation cache, when on
    num_gpus = res.num_gpus if res.num_gpus is not None else (tp if has_gpus else 0)
    if not num_gpus:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(tp, 1)}"
    return dict(num_cpus=res.num_cpus, num_gpus=num_gpus, resources=dict(res.resources),
                runtime_env={"env_vars": env}, **extra)


def serve(model=None, num_prefill: int = 1, num_decode: int = 1, prefill_tp: int = 1, decode_tp: int = 1,
          name: str = "raypd", engine_config: EngineConfig | None = None, compression: str = "none",
          config: DeploymentConfig | None = None, **overrides) -> "Deployment":
    """Start a deployment on the current Ray cluster (or a new local one) and return its handle.
    `config` gives every setting at once; otherwise the arguments (and `overrides`, any other
    DeploymentConfig field) build one."""
    if config is None:
        factory = overrides.pop("factory", None) or JaxEngineFactory(
            model, engine_config or EngineConfig(), compression)
        config = DeploymentConfig(name=name, factory=factory, num_prefill=num_prefill, num_decode=num_decode,
                                  prefill_tp=prefill_tp, decode_tp=decode_tp, **overrides)
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    if _find(config.name) is not None:
        raise ValueError(f"a deployment named {config.name!r} is already running; shut it down or pick another name")
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    transport = _TransportFactory(config.transport)
    prefill = {f"prefill-{i}": ray.remote(concurrency_groups={STATUS_GROUP: 1})(PrefillWorker).options(
        **_options(config.prefill_resources, config.prefill_tp, has_gpus, max_concurrency=1)).remote(
        f"prefill-{i}", config.factory, transport, config.prefill_tp, cpus=config.prefill_resources.cpus,
        fetch=_fetch_object)
        for i in range(config.num_prefill)}
    decode = {f"decode-{i}": ray.remote(DecodeWorker).options(
        **_options(config.decode_resources, config.decode_tp, has_gpus, max_concurrency=8)).remote(
        f"decode-{i}", config.factory, transport, config.decode_tp, cpus=config.decode_resources.cpus,
        fetch=_fetch_object)
        for i in range(config.num_decode)}
    sched = ray.remote(Scheduler).options(
        name=config.name, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000,
        runtime_env={"env_vars": {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}}).remote(
        config.name, prefill, decode, config.policy, config.cache_bytes, config.calibrate,
        config.local_prefill_stall_s, config.collect_timeout_s, config.max_retries,
        _host_copies(config), config.host_cache_bytes, config.stream_layers)
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


def _fetch_object(ref):
    """How workers resolve a host copy's reference (PrefillJob.host_prefix)."""
    return ray.get(ref, timeout=30.0)


@dataclasses.dataclass(frozen=True)
class _TransportFactory:
    """Picklable: each worker builds its own transport in its own process."""

    kind: str

    def __call__(self):
        return make_transport(self.kind)


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
        self._tokenizer = None  # the deployment's, fetched on first need (prompt token counts)

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
        for any. -> {id: {"tokens": [(id, logprob, finish, text)], "finished", "error", "metrics"}}"""
        return self._call("poll", list(request_ids), timeout_s, timeout_s=timeout_s + 30.0)

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests: their pages and slots are freed. Unknown or ended ids are ignored."""
        self._call("abort", list(request_ids), timeout_s=30.0)

    def info(self) -> dict:
        """model (.config, .tokenizer), max_seq_len, page_size, num_pages_total, max_slots, ..."""
        return self._call("info", timeout_s=60.0)

    def submit(self, prompts: list, params: SamplingParams, ttft_slo_s: float | None = None,
               kv_compression: str | None = None) -> list[str]:
        reply = self._call("submit", list(prompts), params, ttft_slo_s, kv_compression)
        if "error" in reply:
            raise errors.from_wire(reply["error"])
        return reply["ids"]

    def _chunks(self, ids: list[str], timeout_s: float = 5.0) -> Iterator[tuple[str, dict]]:
        """(request id, poll entry) as tokens arrive, until every request has ended."""
        pending = list(ids)
        try:
            while pending:
                for rid, entry in self._call("poll", pending, timeout_s).items():
                    if entry["error"] is not None:
                        raise errors.from_wire(entry["error"])
                    yield rid, entry
                    if entry["finished"]:
                        pending.remove(rid)
        finally:
            if pending and not self._is_shut_down:
                try:
                    self._call("abort", pending)
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
                text="".join(t[3] for t in toks), token_ids=[t[0] for t in toks], finish_reason=toks[-1][2],
                logprobs=[t[1] for t in toks] if logprobs else None,
                metrics=dict(m, **request_metrics(start, first[rid], last[rid], self._prompt_tokens(prompt),
                                                  len(toks)))))
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
                for token_id, logprob, finish, text in entry["tokens"]:
                    n += 1
                    metrics = None
                    if finish is not None:
                        metrics = dict(entry["metrics"])
                        metrics["scheduler_ttft_s"] = metrics.pop("ttft_s", None)
                        metrics.update(request_metrics(start, first, now, self._prompt_tokens(prompt), n))
                    yield StreamChunk(token_id, text, logprob, finish, metrics)

        return chunks()

    def status(self, timeout_s: float | None = 60.0) -> dict:
        return self._call("status", timeout_s=timeout_s)

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


def _sampling(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("stop") is None:
        kwargs.pop("stop", None)
    if "stop_token_ids" in kwargs:
        kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
    return kwargs
