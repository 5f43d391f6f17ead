"""Prefill and decode workers: plain Python classes (tests build them directly; Ray is applied
in raypd/runtime/deployment.py). Each builds its engines in its own process from a factory
(raypd/runtime/engines.py) and a `KVTransport` from a transport factory.

PrefillWorker, one call per batch of jobs (`prefill(jobs)`):
  1. prefill the prompts, reusing the cached prefix pages the scheduler named (`PrefillJob`),
  2. send each prompt's K/V into the transport (`engines.send`),
  3. keep one reference on the prompt's newly computed full pages, for the KV index
     (`PrefillResult.cached_pages`; the scheduler publishes them and later frees them with
     `free_pages` when the index evicts them), and release the request's pages,
  4. return small results: the first token, the transfer handle, page ids; never K/V.
  A job with more samples of its prompt (n > 1, `PrefillJob.samples`) is prefilled once: each
  sample gets its own first token, and the K/V is sent once for all of them.
  The sender's transfer buffers are dropped on `release_transfers`, once the decode side has
  the K/V.

The decode worker is in raypd/runtime/decode_worker.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import numpy as np

from raypd.engine.api import PrefillOutput, Request, SamplingParams
from raypd.runtime.engines import WorkerEngines
from raypd.runtime.messages import PrefillJob, PrefillResult  # noqa: F401 - re-exported
from raypd.transfer.base import TransferHandle

log = logging.getLogger(__name__)


def _retain(prefill, out: PrefillOutput, retain: bool, num_own: int) -> list[int]:
    """One reference on the full prompt pages after the worker's own `num_own` prefix pages
    (fetched from host copies or computed now), for the KV index."""
    keep = list(out.pages[num_own: out.prompt_len // prefill.allocator.page_size]) if retain else []
    prefill.allocator.incref(keep)
    return keep


def _sample_outputs(job: PrefillJob, outs: dict[str, PrefillOutput]) -> list[PrefillOutput]:
    """The prefill outputs of the job's more samples, in order, without pages (the sender's)."""
    return [dataclasses.replace(outs[s.request_id], pages=[]) for s in job.samples]


def _identity(x):
    return x


def _load_host_prefix(engines: WorkerEngines, fetch: Callable, job: PrefillJob) -> list[int]:
    """Pages holding the job's host-copy prefix (one reference each), or [] when a copy cannot
    be fetched (lost, evicted): the engine then computes those tokens."""
    if not job.host_prefix or engines.import_pages is None:
        return []
    from raypd.engine.kv_codec import take_pages

    try:
        return engines.import_pages([take_pages(fetch(payload), idx) for payload, idx in job.host_prefix])
    except Exception:  # noqa: BLE001 - a cache miss, not a failure
        log.warning("host copy of %s's prefix could not be loaded; computing it", job.request.request_id,
                    exc_info=True)
        return []


def pin_to_cpus(cpus) -> None:
    """Restrict every thread of this process (and the threads it starts later) to `cpus`.
    Called before the engines are built, so XLA sizes its thread pools to them."""
    if not cpus:
        return
    cpus = set(cpus)
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cpus)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:
        return "local"


def _calibration_request(n: int, rng, vocab_size: int, tag: str, max_tokens: int = 1) -> Request:
    ids = rng.integers(3, max(4, min(vocab_size, 259)), size=n).tolist()
    return Request(f"calibrate-{tag}-{n}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


class PrefillWorker:
    def __init__(self, worker_id: str, factory, transport_factory: Callable, tp: int = 1, cpus=None,
                 fetch: Callable = _identity):
        self.worker_id = worker_id
        pin_to_cpus(cpus)
        self.engines: WorkerEngines = factory.build("prefill", tp)
        self.transport = transport_factory()
        self.fetch = fetch
        self._sender = None  # StreamingSender, built on the first streamed job
        self._sent: dict[str, object] = {}  # transfer_id -> handle, until the decode side has it
        self.num_computed_tokens = 0

    def prefill(self, jobs: list[PrefillJob]) -> tuple[list[PrefillResult | Exception], int]:
        """Prefill, send, retain, release (module doc). -> (one result or exception per job,
        free pages of the pool after).

        The jobs whose K/V is sent whole go through the engine together, packed into shared
        chunks (`_prefill_packed`); layer-streamed jobs run one at a time. A job that fails
        fails alone: when a packed call raises, its jobs run again one at a time."""
        results: list = [None] * len(jobs)
        packed = [i for i, job in enumerate(jobs) if job.stream_to is None]
        if len(packed) > 1 and len({jobs[i].request.request_id for i in packed}) == len(packed):
            try:
                for i, res in zip(packed, self._prefill_packed([jobs[i] for i in packed])):
                    results[i] = res
            except Exception:  # noqa: BLE001 - retried one at a time below, where it fails alone
                log.warning("packed prefill of %d jobs failed; running them one at a time", len(packed),
                            exc_info=True)
        for i, job in enumerate(jobs):
            if results[i] is None:
                results[i] = self._prefill_one(job)
        return results, self.engines.prefill.allocator.num_free

    def _prefill_packed(self, jobs: list[PrefillJob]) -> list[PrefillResult | Exception]:
        """Prefill every job in one engine call (the engine packs prompts into shared chunks),
        then send, retain and release each. Raises, holding nothing, if the engine call fails;
        a failed send fails only its own job. Each job's prefill_s is its share of the engine
        call (by computed tokens) plus its own host-prefix fetch and send."""
        engine = self.engines.prefill
        start = time.perf_counter()
        fetched = {j.request.request_id: _load_host_prefix(self.engines, self.fetch, j) for j in jobs}
        prefixes = {j.request.request_id: list(j.prefix_pages) + fetched[j.request.request_id] for j in jobs}
        fetch_s = (time.perf_counter() - start) / len(jobs)
        start = time.perf_counter()
        try:
            outs = {o.request_id: o for o in engine.prefill([j.request for j in jobs], prefixes,
                                                             {j.request.request_id: j.samples for j in jobs})}
        except BaseException:
            for j in jobs:
                engine.release(j.request.request_id)
                engine.allocator.free(fetched[j.request.request_id])
            raise
        engine_s = time.perf_counter() - start
        total = sum(outs[j.request.request_id].prompt_len - outs[j.request.request_id].num_cached_tokens
                    for j in jobs) or 1
        results = []
        for job in jobs:
            rid, out = job.request.request_id, outs[job.request.request_id]
            start = time.perf_counter()
            try:
                handle = self.engines.send(job.request, out, self.transport)
                self._sent[handle.transfer_id] = handle
                cached = _retain(engine, out, job.retain, len(job.prefix_pages))
            except Exception as e:  # noqa: BLE001 - reported to the scheduler, which fails the request
                log.exception("sending the K/V of %s failed", rid)
                results.append(e)
                continue
            finally:
                engine.release(rid)
                engine.allocator.free(fetched[rid])
            computed = out.prompt_len - out.num_cached_tokens
            self.num_computed_tokens += computed
            prefill_s = fetch_s + engine_s * computed / total + time.perf_counter() - start
            results.append(PrefillResult(dataclasses.replace(out, pages=[]), handle, cached, len(job.prefix_pages),
                                         computed, prefill_s, len(fetched[rid]), _sample_outputs(job, outs)))
        return results

    def _prefill_one(self, job: PrefillJob) -> PrefillResult | Exception:
        rid = job.request.request_id
        start = time.perf_counter()
        fetched = _load_host_prefix(self.engines, self.fetch, job)
        try:
            if job.stream_to is not None and job.samples:
                raise ValueError(f"request {rid}: the samples of a prompt are not layer-streamed (stream_to)")
            if job.stream_to is not None:
                out, handle = self._prefill_streamed(job, list(job.prefix_pages) + fetched)
            else:
                outs = {o.request_id: o for o in self.engines.prefill.prefill(
                    [job.request], {rid: list(job.prefix_pages) + fetched}, {rid: job.samples})}
                out = outs[rid]
                handle = self.engines.send(job.request, out, self.transport)
            self._sent[handle.transfer_id] = handle
            cached = _retain(self.engines.prefill, out, job.retain, len(job.prefix_pages))
        except Exception as e:  # noqa: BLE001 - reported to the scheduler, which fails the request
            log.exception("prefill of %s failed", rid)
            return e
        finally:
            self.engines.prefill.release(rid)
            self.engines.prefill.allocator.free(fetched)
        computed = out.prompt_len - out.num_cached_tokens
        self.num_computed_tokens += computed
        return PrefillResult(dataclasses.replace(out, pages=[]), handle, cached, len(job.prefix_pages),
                             computed, time.perf_counter() - start, len(fetched),
                             _sample_outputs(job, outs) if job.stream_to is None else [])

    def _prefill_streamed(self, job: PrefillJob, prefix: list[int]) -> tuple[PrefillOutput, TransferHandle]:
        """Prefill one request with its K/V streamed to `job.stream_to` layer group by layer
        group (raypd/transfer/streaming.py) while the later groups compute."""
        from raypd.transfer.streaming import StreamingSender

        parts = []

        def emit(part) -> None:
            parts.append(part)
            job.stream_to.receive_parts.remote([part])

        if self._sender is None:
            self._sender = StreamingSender(self.engines.prefill, self.transport, emit, self.engines.compression)
        self._sender.emit = emit
        self._sender.add(job.request, prefix)
        outs: list[PrefillOutput] = []
        try:
            while not outs:
                outs = self._sender.step()
        except BaseException:
            self._sender.release(job.request.request_id)  # payloads sent so far, and its pages
            raise
        (out,) = outs
        h = parts[0].handle
        handle = dataclasses.replace(h, transfer_id=f"stream-{h.transfer_id}", num_tokens=out.prompt_len,
                                     num_bytes=sum(p.handle.num_bytes for p in parts), location=None,
                                     num_parts=len(parts))
        return out, handle

    def release_transfers(self, handles: list) -> None:
        """The decode side has these payloads: drop the sender's buffers."""
        for h in handles:
            if self._sent.pop(h.transfer_id, None) is None:
                continue
            if h.num_parts:
                self._sender.release(h.request_id)  # its parts' payloads (the pages went already)
            else:
                self.transport.release(h)

    def free_pages(self, pages: list[int]) -> None:
        """Drop the references `prefill` retained on these pages (the index let them go)."""
        self.engines.prefill.allocator.free(pages)

    def export_pages(self, pages: list[int], compression: str) -> tuple[dict, object]:
        """A host copy of retained pages. -> (small facts, the payload). Under Ray this runs
        with num_returns=2, so the payload stays in this node's object store and the caller
        holds only its reference."""
        enc = self.engines.export_pages(pages, compression)
        node = os.environ.get("RAYPD_NODE_ID") or _node_id()
        return dict(node_id=node, num_bytes=enc.num_bytes, num_pages=len(pages)), enc

    def info(self) -> dict:
        e = self.engines
        return dict(worker_id=self.worker_id, model=e.model, max_seq_len=e.max_seq_len, page_size=e.page_size,
                    kv_bytes_per_page=e.kv_bytes_per_page, max_pages=e.prefill.allocator.num_pages - 1,
                    max_prefill_segments=e.prefill.runner.config.max_prefill_segments)

    def status(self) -> dict:
        return dict(worker_id=self.worker_id, used_pages=[a.num_used for a in self.engines.allocators()],
                    num_free_pages=self.engines.prefill.allocator.num_free, num_pending_transfers=len(self._sent),
                    num_computed_tokens=self.num_computed_tokens)

    def calibrate(self, lengths: list[int], seed: int = 0) -> dict:
        """Time prefill of each length (run twice; the second is timed, so compilation is not)
        and a send + receive of its K/V. -> {"prefill": [(n, 0, s)], "transfer": [(bytes, s)]}."""
        rng = np.random.default_rng(seed)
        vocab = self.engines.model.config.vocab_size
        prefill_samples, transfer_samples = [], []
        for n in lengths:
            req = _calibration_request(n, rng, vocab, self.worker_id)
            for attempt in range(2):
                start = time.perf_counter()
                (out,) = self.engines.prefill.prefill([req], {})
                prefill_s = time.perf_counter() - start
                try:
                    start = time.perf_counter()
                    handle = self.engines.send(req, out, self.transport)
                    self.transport.recv(handle, 30.0)
                    transfer_s = time.perf_counter() - start
                    self.transport.release(handle)
                finally:
                    self.engines.prefill.release(req.request_id)
            prefill_samples.append((n, 0, prefill_s))
            transfer_samples.append((handle.num_bytes, transfer_s))
        return dict(prefill=prefill_samples, transfer=transfer_samples)
