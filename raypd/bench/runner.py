"""Drive a workload against a target and record what the client sees. Outer ring: threads.

Open loop: the dispatcher sleeps until each request's arrival time and hands it to a thread of
its own, whatever is still in flight, so a slow server does not slow the arrivals (as
`vllm bench serve`). With `max_concurrency` a semaphore caps the requests in flight: a request
whose arrival finds every place taken is sent when one frees (its `sent_s` says when), and
rate=inf with a cap is a closed loop. Latencies run from `sent_s`, as in vLLM.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

from raypd.bench import metrics
from raypd.bench.metrics import RequestRecord
from raypd.bench.targets import TargetRejected
from raypd.bench.workload import BenchRequest

MAX_THREADS = 512


@dataclasses.dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to the last request's end


def run(target, requests: list[BenchRequest], max_concurrency: int | None = None, progress: bool = True,
        desc: str = "bench") -> RunResult:
    """Send every request at its arrival time; returns one record per request, in workload order."""
    from tqdm import tqdm

    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    workers = min(len(requests), max_concurrency or MAX_THREADS) or 1
    t0 = time.perf_counter()

    def one(slot: int, req: BenchRequest) -> None:
        rec = RequestRecord(req.index, len(req.prompt_ids), req.max_tokens, req.arrival_s,
                            time.perf_counter() - t0)
        try:
            for num_tokens, timings in target.stream(req.prompt_ids, req.max_tokens):
                rec.chunk_s.append(time.perf_counter() - t0)
                rec.chunk_tokens.append(num_tokens)
                rec.server_timings.update(timings)
            if not rec.chunk_s:
                rec.status, rec.error = metrics.STATUS_FAILED, "the stream ended without a token"
        except TargetRejected as e:
            rec.status, rec.error = metrics.STATUS_REJECTED, str(e)
        except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
            rec.status, rec.error = metrics.STATUS_FAILED, f"{type(e).__name__}: {e}"
        finally:
            rec.end_s = time.perf_counter() - t0
            if slots:
                slots.release()
            if target.burst_gap_s:
                rec.chunk_s, rec.chunk_tokens = metrics.merge_bursts(rec.chunk_s, rec.chunk_tokens,
                                                                     target.burst_gap_s)
            records[slot] = rec
            bar.update(1)

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bench") as pool:
        futures = []
        for slot, req in sorted(enumerate(requests), key=lambda x: x[1].arrival_s):
            wait = req.arrival_s - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
            if slots:
                slots.acquire()
            futures.append(pool.submit(one, slot, req))
        for f in futures:
            f.result()
    duration = time.perf_counter() - t0
    bar.close()
    return RunResult(records, duration)
