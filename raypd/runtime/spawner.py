"""Starting worker actors: `serve` starts a deployment's workers with it, and the scheduler
replaces a dead worker or moves one between roles with it. Light to import: the worker classes
(and with them the engines and JAX) load only when a worker is started."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import ray

from raypd import compile_cache
from raypd.transfer.base import make_transport

ROOT = str(Path(__file__).resolve().parents[2])
# A prefill worker runs one call at a time (its engine is not shared); `status` runs in this
# group of its own, so a liveness probe or a metrics scrape never waits behind a long prefill.
STATUS_GROUP = "status"


def _options(res, tp: int, has_gpus: bool, **extra) -> dict:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           **compile_cache.worker_env()}  # workers share this process's compilation cache, when on
    num_gpus = res.num_gpus if res.num_gpus is not None else (tp if has_gpus else 0)
    if not num_gpus:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(tp, 1)}"
    return dict(num_cpus=res.num_cpus, num_gpus=num_gpus, resources=dict(res.resources),
                runtime_env={"env_vars": env}, **extra)


def _fetch_object(ref):
    """How workers resolve a host copy's reference (PrefillJob.host_prefix)."""
    return ray.get(ref, timeout=30.0)


@dataclasses.dataclass(frozen=True)
class _TransportFactory:
    """Picklable: each worker builds its own transport in its own process."""

    kind: str

    def __call__(self):
        return make_transport(self.kind)


class WorkerSpawner:
    """Starts one worker actor of a deployment (picklable). `spawn(role, worker_id)` -> the
    actor handle; its engines build in the background (`info` answers once they are up). The
    configuration travels as pickled bytes, opened only when a worker is started, so holding a
    spawner (the scheduler's process) imports neither the engines nor JAX."""

    def __init__(self, config, has_gpus: bool):
        self._config, self.has_gpus = pickle.dumps(config), has_gpus

    def __call__(self, role: str, worker_id: str):
        from raypd.runtime.decode_worker import DecodeWorker
        from raypd.runtime.workers import PrefillWorker

        c = pickle.loads(self._config)
        transport = _TransportFactory(c.transport)
        if role == "prefill":
            cls = ray.remote(concurrency_groups={STATUS_GROUP: 1})(PrefillWorker)
            res, tp, concurrency = c.prefill_resources, c.prefill_tp, 1
        elif role == "decode":
            cls, res, tp, concurrency = ray.remote(DecodeWorker), c.decode_resources, c.decode_tp, 8
        else:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        return cls.options(**_options(res, tp, self.has_gpus, max_concurrency=concurrency)).remote(
            worker_id, c.factory, transport, tp, cpus=res.cpus, fetch=_fetch_object)
