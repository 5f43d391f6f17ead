"""The decode worker: a plain Python class (tests build it directly; Ray is applied in
raypd/runtime/deployment.py). It builds its engines in its own process from a factory
(raypd/runtime/engines.py) and a `KVTransport` from a transport factory.

DecodeWorker: a decode loop runs continuously in a background thread. Every call the scheduler
makes (`submit`, `submit_local`, `free_pages`, `abort`) only files an item in the inbox, so
the engines are touched by the loop thread alone. Each loop iteration:
  1. takes the whole inbox: remote prefills are received into the pool (`engines.recv_into`)
     and inserted; local prefills (short prompts under conditional disaggregation, or every
     prompt in colocated mode) are added to the local-prefill loop over the same pool
     (raypd/engine/local_prefill.py, the one the colocated engine runs);
  2. runs that loop: one chunk of the queued local prefills (at most the largest prefill
     bucket of tokens), the prompts it finished inserted without a copy, then one decode
     dispatch for every running request (continuous batching: new requests join between
     steps; the step's tokens come back on the next iteration, while the device runs the
     following step, and several steps run in one dispatch while nothing else waits);
  3. appends every produced token to a report buffer.
  `collect(timeout_s)` hands the buffered report over (tokens of all requests, in chunks) and
  waits up to `timeout_s` when it is empty: one RPC per chunk of many tokens and requests,
  never one per token per request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from raypd.engine.api import PrefillOutput, Request, TokenOutput
from raypd.engine.local_prefill import LocalPrefill, Prefilled
from raypd.engine.pages import OutOfPages
from raypd.runtime.engines import WorkerEngines
from raypd.runtime.messages import DecodeReport, token_of
from raypd.runtime.workers import (PrefillJob, PrefillResult, _calibration_request, _identity, _load_host_prefix,
                                   pin_to_cpus)
from raypd.transfer.base import TransferError

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, worker_id: str, factory, transport_factory: Callable, tp: int = 1,
                 start: bool = True, idle_s: float = 0.002, cpus=None, fetch: Callable = _identity):
        self.worker_id = worker_id
        pin_to_cpus(cpus)
        self.engines: WorkerEngines = factory.build("decode", tp)
        self.transport = transport_factory()
        self.fetch = fetch
        self.engines.decode.retain_finished = True  # finished requests' pages go to the KV index
        self.idle_s = idle_s
        self._cv = threading.Condition()  # guards _inbox and _report
        self._engine_lock = threading.Lock()  # held while the engines run (loop or calibrate)
        self._inbox: list[tuple] = []
        self._report = DecodeReport()
        self._context: dict[str, int] = {}  # running rid -> tokens of context
        # local prefills in progress, each tagged (job, start time, pages fetched from host copies)
        self.local = LocalPrefill(self.engines.prefill, self.engines.decode)
        self._receiver = None  # StreamingReceiver, built on the first layer part
        self._parts_seen: dict[str, float] = {}  # streamed rid -> when its last part arrived
        self._stream_failed: dict[str, str] = {}  # streamed rid -> why its K/V cannot be used
        self._awaiting: dict[str, tuple] = {}  # streamed rid -> (request, out, handle, since)
        self.stream_timeout_s = 30.0
        self.num_streamed = 0  # requests inserted from layer-streamed K/V
        self._stopped = False
        self.num_computed_tokens = 0  # prompt tokens prefilled locally
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- calls from the scheduler (any thread): file an item, return at once -------------------
    def submit(self, items: list[tuple]) -> None:
        """Requests prefilled elsewhere: (request, prefill output, transfer handle[, forks]);
        forks: more samples of the request's prompt, ((request, prefill output), ...), started
        from the same K/V (received once)."""
        self._put([("remote", *item) for item in items])

    def receive_parts(self, parts: list) -> None:
        """Layer parts of streamed K/V (`LayerPart`), straight from a prefill worker."""
        self._put([("part", part) for part in parts])

    def submit_local(self, jobs: list[PrefillJob]) -> None:
        """Requests to prefill here, on the decode worker's own pool."""
        self._put([("local", job) for job in jobs])

    def free_pages(self, pages: list[int]) -> None:
        self._put([("free", list(pages))])

    def abort(self, request_ids: list[str]) -> None:
        self._put([("abort", rid) for rid in request_ids])

    def _put(self, items: list[tuple]) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError(f"decode worker {self.worker_id} is stopped")
            self._inbox.extend(items)
            self._cv.notify_all()

    def collect(self, timeout_s: float = 0.05) -> DecodeReport:
        """Everything produced since the last call; waits up to `timeout_s` while there is none."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._report.is_empty() and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            report, self._report = self._report, DecodeReport()
        d = self.engines.decode
        report.num_free_pages = d.allocator.num_free
        report.num_running = d.num_running
        report.num_free_slots = self.engines.max_slots - d.num_running
        report.context_len = sum(self._context.values())
        return report

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"decode-{self.worker_id}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopped:
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - keep serving; the failing items were reported
                log.exception("decode loop iteration failed")
                busy = False
            if not busy:
                with self._cv:
                    if not self._inbox and not self._stopped:
                        self._cv.wait(self.idle_s if self.engines.decode.num_running else 0.05)

    def run_once(self) -> bool:
        """One loop iteration (module doc). Returns whether there was anything to do."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
        with self._engine_lock:
            for kind, *args in inbox:
                if kind == "remote":
                    self._insert_remote(*args)
                elif kind == "local":
                    self._add_local(*args)
                elif kind == "free":
                    self.engines.prefill.allocator.free(args[0])
                    self._record(freed=args[0])
                elif kind == "abort":
                    self._abort(args[0])
                elif kind == "part":
                    self._on_part(args[0])
            if self._awaiting or self._parts_seen:
                self._check_streams()
            chunked = bool(self.local)
            if chunked:  # one prefill chunk per iteration, between decode steps
                self._prefill_chunk()
            # several steps per dispatch only while nothing else waits for this loop
            outs = self.local.decode_step(is_waiting=bool(self._inbox or self._awaiting))
            for o in outs:
                self._context[o.request_id] = self._context.get(o.request_id, 0) + 1
            finished = self.engines.decode.finished
            if finished:
                self._record(finished=finished)
                finished.clear()
            self._record(outputs=outs)
        return bool(inbox or outs or chunked or self.engines.decode.num_running)

    def _on_part(self, part) -> None:
        from raypd.transfer.streaming import StreamingReceiver

        if self._receiver is None:
            self._receiver = StreamingReceiver(self.engines.decode, self.transport, self.stream_timeout_s)
        rid = part.request_id
        self._parts_seen[rid] = time.monotonic()
        try:
            self._receiver.on_part(part)
        except Exception as e:  # noqa: BLE001 - the stream is dropped; its request is placed again
            self._stream_failed[rid] = f"{type(e).__name__}: {e}"

    def _check_streams(self) -> None:
        """Insert streamed requests whose layers are all in; fail (for a retry) those whose
        stream broke or stalled; drop parts nobody claimed within the timeout."""
        now = time.monotonic()
        for rid, (request, out, handle, since) in list(self._awaiting.items()):
            failed = self._stream_failed.pop(rid, None)
            if failed is None and self._receiver is not None and self._receiver.is_complete(rid):
                del self._awaiting[rid]
                self._parts_seen.pop(rid, None)
                try:
                    first = self._receiver.insert(request, out)
                except Exception as e:  # noqa: BLE001 - the request fails here, the worker goes on
                    self._record(error=(rid, f"{type(e).__name__}: {e}"), retryable=isinstance(e, OutOfPages))
                    self._record(received=(handle, now - since))
                    continue
                self._record(received=(handle, now - since))
                self.num_streamed += 1
                self._started(request, out, first)
            elif failed is not None or now - since > self.stream_timeout_s:
                del self._awaiting[rid]
                self._parts_seen.pop(rid, None)
                if self._receiver is not None:
                    self._receiver.abort(rid)
                why = failed or f"streamed K/V incomplete after {self.stream_timeout_s:.0f} s"
                self._record(error=(rid, why), retryable=True)
                self._record(received=(handle, now - since))
        for rid, seen in list(self._parts_seen.items()):  # orphans: no request came for them
            if rid not in self._awaiting and now - seen > 2 * self.stream_timeout_s:
                del self._parts_seen[rid]
                self._stream_failed.pop(rid, None)
                self._receiver.abort(rid)

    def _insert_remote(self, request: Request, out: PrefillOutput, handle, forks: tuple = ()) -> None:
        rid = request.request_id
        if handle.num_parts:  # its K/V comes (or came) as layer parts
            self._awaiting[rid] = (request, out, handle, time.monotonic())
            return
        start = time.perf_counter()
        try:
            firsts = self.engines.recv_into(request, out, handle, self.transport, forks)
        except Exception as e:  # noqa: BLE001 - the request fails here, the worker goes on
            # K/V lost on the way, or no room here after all (the scheduler's view of free pages
            # lags the pool): the scheduler places the request (and its samples) again
            for r in [request, *(f for f, _ in forks)]:
                self._record(error=(r.request_id, f"{type(e).__name__}: {e}"),
                             retryable=isinstance(e, (TransferError, OutOfPages)))
            return
        finally:
            self.transport.release(handle)
            self._record(received=(handle, time.perf_counter() - start))
        for (r, o), first in zip([(request, out), *forks], firsts):
            self._started(r, o, first)

    def _add_local(self, job: PrefillJob) -> None:
        """Queue a local prefill: it runs in chunks between decode steps (as the colocated
        engine does)."""
        request = job.request
        start = time.perf_counter()
        fetched = _load_host_prefix(self.engines, self.fetch, job)
        try:
            self.local.add([request, *job.samples], list(job.prefix_pages) + fetched,
                           retain_from=len(job.prefix_pages) if job.retain else None, tag=(job, start, len(fetched)))
        except Exception as e:  # noqa: BLE001 - the request fails here (no room: placed again), the worker goes on
            self._record(error=(request.request_id, f"{type(e).__name__}: {e}"), retryable=isinstance(e, OutOfPages))
        finally:
            self.engines.prefill.allocator.free(fetched)  # `add` took its own reference

    def _prefill_chunk(self) -> None:
        try:
            done = self.local.prefill_chunk()
        except Exception as e:  # noqa: BLE001 - fail the chunk's requests, keep serving
            log.exception("local prefill chunk failed")
            for rid in self.local.request_ids():
                self.local.abort(rid)
                self._record(error=(rid, f"{type(e).__name__}: {e}"))
            return
        groups: dict[int, list[Prefilled]] = {}  # one entry per prompt: its requests that were not aborted
        for p in done:
            groups.setdefault(id(p.tag), []).append(p)
        for ps in groups.values():
            self._finish_local(ps)

    def _finish_local(self, ps: list[Prefilled]) -> None:
        """A prompt prefilled here: its prefill is reported once, under the job's request id (which
        ends the scheduler's call), and its requests not aborted meanwhile start (the first took
        the prompt's pages over, the others forked from them). If one could not start, all of
        them fail with its error (as a failed insert of a single request does)."""
        job, start, num_fetched = ps[0].tag
        leader = job.request.request_id
        failed = next((p.error for p in ps if p.error is not None), None)
        if failed is not None:
            for p in ps:
                if p.error is None:
                    self.engines.decode.release(p.request.request_id)
                self.engines.prefill.allocator.free(p.cached_pages)
                self._record(error=(p.request.request_id, f"{type(failed).__name__}: {failed}"))
            if all(p.request.request_id != leader for p in ps):  # its call's pins go with an error under its id
                self._record(error=(leader, "aborted"))
            return
        out = ps[0].output
        computed = out.prompt_len - out.num_cached_tokens
        self.num_computed_tokens += computed
        cached = [page for p in ps for page in p.cached_pages]
        self._record(prefilled=PrefillResult(dataclasses.replace(out, request_id=leader, pages=[]), None, cached,
                                             len(job.prefix_pages), computed, time.perf_counter() - start,
                                             num_fetched))
        for p in ps:
            self._started(p.request, p.output, p.first)

    def _started(self, request: Request, out: PrefillOutput, first: TokenOutput) -> None:
        if not first.is_finished:
            self._context[request.request_id] = out.prompt_len + 1
        self._record(outputs=[first], started=request.request_id)

    def _abort(self, rid: str) -> None:
        awaiting = self._awaiting.pop(rid, None)
        if awaiting is not None:
            self._record(received=(awaiting[2], 0.0))  # the sender may drop its payloads
        if self._parts_seen.pop(rid, None) is not None:
            self._receiver.abort(rid)
        leader = self.local.leader_of(rid)
        if self.local.abort(rid):  # still prefilling here
            if leader not in self.local:  # nobody of its prompt left: the prefill stopped
                self._record(error=(leader, "aborted"))
            return
        o = self.engines.decode.release(rid)
        self._context.pop(rid, None)
        if o is not None:
            self._record(outputs=[o])

    def _record(self, outputs=(), error=None, started=None, received=None, prefilled=None, freed=(),
                retryable: bool = False, finished=()) -> None:
        with self._cv:
            r = self._report
            for o in outputs:
                r.tokens.setdefault(o.request_id, []).append(token_of(o))
                if o.is_finished:
                    self._context.pop(o.request_id, None)
            if error is not None:
                r.errors[error[0]] = error[1]
                if retryable:
                    r.retryable.append(error[0])
                r.started.append(error[0])
            if started is not None:
                r.started.append(started)
            if received is not None:
                r.received.append(received)
            if prefilled is not None:
                r.prefilled.append(prefilled)
            r.freed.extend(freed)
            r.finished.extend(finished)
            self._cv.notify_all()

    # -- status and calibration ----------------------------------------------------------------
    def info(self) -> dict:
        e = self.engines
        return dict(worker_id=self.worker_id, model=e.model, max_seq_len=e.max_seq_len, page_size=e.page_size,
                    kv_bytes_per_page=e.kv_bytes_per_page, max_pages=e.decode.allocator.num_pages - 1,
                    max_slots=e.max_slots, max_prefill_segments=e.prefill.runner.config.max_prefill_segments)

    def status(self) -> dict:
        return dict(worker_id=self.worker_id, used_pages=[a.num_used for a in self.engines.allocators()],
                    num_running=self.engines.decode.num_running, num_inbox=len(self._inbox),
                    num_local_prefills=len(self.local), num_streamed=self.num_streamed,
                    num_computed_tokens=self.num_computed_tokens)

    def calibrate(self, batch_sizes: list[int], context_lens: int | list[int], seed: int = 0,
                  prefill_lengths: list[int] = ()) -> dict:
        """Time one decode step for each batch size at each context length (two or more lengths
        separate the per-slot and per-context-token costs), and a local prefill of each of
        `prefill_lengths` (run twice, the second timed, so compilation is not).
        -> {"decode": [(B, B * S, s)], "prefill": [(n, 0, s)]}."""
        rng = np.random.default_rng(seed)
        e, vocab = self.engines, self.engines.model.config.vocab_size
        contexts = [context_lens] if isinstance(context_lens, int) else list(context_lens)
        decode_samples, prefill_samples = [], []
        with self._engine_lock:
            for n in prefill_lengths:
                r = _calibration_request(n, rng, vocab, f"{self.worker_id}-prefill")
                for _ in range(2):
                    try:
                        start = time.perf_counter()
                        e.prefill.prefill([r], {})
                        prefill_s = time.perf_counter() - start
                    finally:
                        e.prefill.release(r.request_id)
                prefill_samples.append((n, 0, prefill_s))
            for S in contexts:
                for B in batch_sizes:
                    reqs = [_calibration_request(S, rng, vocab, f"{self.worker_id}-{B}-{i}", 16) for i in range(B)]
                    try:
                        for r in reqs:
                            (out,) = e.prefill.prefill([r], {})
                            e.decode.insert(r, out, None)
                            e.prefill.release(r.request_id)
                        # One step per dispatch (the engine may run several per dispatch and
                        # overlaps each with reading the last), so each call costs one step in
                        # steady state; the first may compile; the fastest of the rest counts.
                        times = []
                        for _ in range(4):
                            start = time.perf_counter()
                            e.decode.decode_step(max_steps=1)
                            times.append(time.perf_counter() - start)
                        decode_samples.append((B, B * (S + 2), min(times[1:])))
                    finally:
                        e.decode.flush()
                        for r in reqs:
                            e.prefill.release(r.request_id)
                            e.decode.release(r.request_id)
        return dict(decode=decode_samples, prefill=prefill_samples)
