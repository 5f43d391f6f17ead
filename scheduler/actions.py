"""What the scheduler core asks of the workers: every event returns a list of these.

The Ray actor (raypd/runtime/scheduler_actor.py) turns each into a worker call and reports the
result back as an event; tests and the simulator carry them out with models of the workers.
Page frees and host-copy exports come from the KV store (scheduler/kv_store.py).
"""

from __future__ import annotations

import dataclasses

from scheduler.kv_store import ExportPages, FreePages

@dataclasses.dataclass(frozen=True)
class PrefillTask:
    """One request for a prefill: `prefix_pages` of the worker's own pool hold its cached
    prefix, `host_prefix` the host copies after them; `stream_to` names the decode worker that
    receives its K/V layer by layer (None: sent whole after the prefill)."""

    call_id: int
    request: object  # raypd.engine.api.Request
    prefix_pages: tuple[int, ...] = ()
    host_prefix: tuple = ()
    stream_to: str | None = None
    samples: tuple = ()  # more samples of the request's prompt (Requests), prefilled with it


@dataclasses.dataclass(frozen=True)
class RunPrefill:
    worker: str
    tasks: tuple[PrefillTask, ...]


@dataclasses.dataclass(frozen=True)
class RunLocalPrefill:
    worker: str  # a decode worker
    tasks: tuple[PrefillTask, ...]


@dataclasses.dataclass(frozen=True)
class Insert:
    """Hand prefilled requests to a decode worker: (request, prefill output, transfer handle)."""

    worker: str
    items: tuple[tuple, ...]


@dataclasses.dataclass(frozen=True)
class AbortOnWorker:
    worker: str
    request_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ReleaseTransfers:
    """The receiver has the K/V (or nobody will): the sender drops its payloads."""

    worker: str
    handles: tuple


@dataclasses.dataclass(frozen=True)
class ProbeWorker:
    """Is `worker` alive? Answer with `probe_done(request_id, worker, is_alive, why, now_s)`."""

    worker: str
    request_id: str
    why: str




@dataclasses.dataclass(frozen=True)
class ReplaceWorker:
    """Start `new_worker` in the role of `dead_worker`; answer with `worker_joined` once it is
    healthy, or `worker_join_failed`."""

    dead_worker: str
    new_worker: str
    role: str




@dataclasses.dataclass(frozen=True)
class RetireWorker:
    """Stop `worker`: it has drained (nothing placed, running or in flight there) and leaves."""

    worker: str


Action = (RunPrefill | RunLocalPrefill | Insert | AbortOnWorker | ReleaseTransfers | ProbeWorker | ReplaceWorker
          | RetireWorker | FreePages | ExportPages)
