"""Prometheus metrics of one serving process, on their own registry, scrapeable over HTTP.

The HTTP listener binds 127.0.0.1 only. The service observes per-request latencies and counts
RPCs as they end; gauges and counters that mirror backend state are read at scrape time by a
collector, so they cost nothing between scrapes:
  local engine     `engine_families(engine)`, read directly.
  Ray deployment   `deployment_families(status)`, a pure function of `Deployment.status()`;
                   `StatusCollector` calls status with a timeout, so a scrape never hangs on a
                   busy or dead scheduler (it then reports `raypd_deployment_up 0`).
README.md ("Metrics") lists every name.
"""

from __future__ import annotations

import threading
from concurrent import futures

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
PHASES = ("queue", "prefill", "transfer")  # timings a Ray deployment reports for each request


class Metrics:
    def __init__(self, collector=None, port: int | None = None, host: str = "127.0.0.1"):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("raypd_ttft_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS_S)
        self.tpot = Histogram("raypd_tpot_seconds", "Time per output token after the first", registry=r,
                              buckets=LATENCY_BUCKETS_S)
        self.phases = Histogram("raypd_request_phase_seconds", "Scheduler-reported time of each request phase "
                                "(Ray backend)", ["phase"], registry=r, buckets=LATENCY_BUCKETS_S)
        self.requests = Counter("raypd_requests", "Finished RPCs by status code", ["code"], registry=r)
        self.rejections = Counter("raypd_rejections", "Requests this endpoint refused before queuing, by reason",
                                  ["reason"], registry=r)
        if collector is not None:
            r.register(collector)
        self._collector = collector
        self._server = None
        self.port = None
        if port is not None:
            self._server, _ = start_http_server(port, addr=host, registry=r)
            self.port = self._server.server_port

    def observe_request(self, ttft_s: float, tpot_s: float | None, phases: dict | None = None) -> None:
        self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        for phase in PHASES:
            seconds = (phases or {}).get(f"{phase}_s")
            if seconds is not None:
                self.phases.labels(phase=phase).observe(seconds)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if hasattr(self._collector, "close"):
            self._collector.close()


# ---------------------------------------------------------------------------- families


def _gauge(name: str, doc: str, value, labels: dict | None = None) -> GaugeMetricFamily:
    return _family(GaugeMetricFamily, name, doc, value, labels)


def _counter(name: str, doc: str, value, labels: dict | None = None) -> CounterMetricFamily:
    return _family(CounterMetricFamily, name, doc, value, labels)


def _family(cls, name: str, doc: str, values, labels: dict | None):
    """values: a number, or {label values tuple: number} with `labels` naming the label keys."""
    if labels is None:
        return cls(name, doc, value=values)
    family = cls(name, doc, labels=list(labels))
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def engine_families(engine) -> list:
    """Gauges of a ColocatedEngine."""
    allocator = engine.runner.allocator
    running = engine.decode_engine.num_running
    return [_gauge("raypd_kv_pages_used", "KV pages in use", allocator.num_used),
            _gauge("raypd_kv_pages_total", "KV pages in the pool", allocator.num_pages - 1),
            _gauge("raypd_running_requests", "Requests in decode slots", running),
            _gauge("raypd_queued_requests", "Requests waiting or prefilling", engine.num_unfinished - running)]


def deployment_families(s: dict) -> list:
    """Metric families of a Ray deployment, from one `Deployment.status()` dict."""
    workers = s["prefill"] + s["decode"]
    index = s["index"]
    by_worker = lambda key: {(w["worker_id"],): w[key] for w in workers if key in w}  # noqa: E731
    transfer_labels = {"backend": None, "compression": None}
    transfers = {k: {(t["backend"], t["compression"]): t[k] for t in s["transfer"]} for k in ("count", "bytes",
                                                                                              "seconds")}
    return [
        _gauge("raypd_deployment_up", "1 when the deployment's status was read at this scrape", 1),
        _gauge("raypd_queued_requests", "Requests in the scheduler's queue (not yet placed)", s["num_queued"]),
        _gauge("raypd_tracked_requests", "Requests accepted and not yet finished", s["num_tracked"]),
        _gauge("raypd_running_requests", "Requests in decode slots, all decode workers",
               sum(w["num_running"] for w in s["decode"])),
        _gauge("raypd_kv_pages_used", "KV pages in use on each worker (cached prefixes included)",
               {(w["worker_id"],): sum(w["used_pages"]) for w in workers}, {"worker": None}),
        _gauge("raypd_kv_pages_free", "Free KV pages of each prefill worker", by_worker("num_free_pages"),
               {"worker": None}),
        _gauge("raypd_pending_transfers", "K/V transfers sent by each prefill worker, not yet received",
               by_worker("num_pending_transfers"), {"worker": None}),
        _gauge("raypd_decode_inbox", "Items waiting in each decode worker's inbox", by_worker("num_inbox"),
               {"worker": None}),
        _gauge("raypd_local_prefills", "Prefills in progress on each decode worker", by_worker("num_local_prefills"),
               {"worker": None}),
        _counter("raypd_computed_prompt_tokens", "Prompt tokens each worker computed (prefix hits excluded)",
                 by_worker("num_computed_tokens"), {"worker": None}),
        _gauge("raypd_kv_store_entries", "Pages in the KV store (the scheduler's prefix index)", index["num_entries"]),
        _gauge("raypd_kv_store_bytes", "Bytes of K/V the KV store holds", index["used_bytes"]),
        _gauge("raypd_kv_store_max_bytes", "Capacity of the KV store in bytes", index["max_bytes"]),
        _gauge("raypd_kv_store_hit_rate", "Hit pages / looked-up pages of the KV store", index["hit_rate"]),
        _counter("raypd_kv_store_hit_pages", "Prompt pages found in the KV store", index["num_hit_pages"]),
        _counter("raypd_kv_store_miss_pages", "Prompt pages not found in the KV store", index["num_miss_pages"]),
        _counter("raypd_kv_store_evicted_pages", "Pages evicted from the KV store", index["num_evicted"]),
        _counter("raypd_kv_transfers", "K/V transfers by backend and compression", transfers["count"],
                 transfer_labels),
        _counter("raypd_kv_transfer_bytes", "Bytes of K/V moved, by backend and compression", transfers["bytes"],
                 transfer_labels),
        _counter("raypd_kv_transfer_seconds", "Seconds spent receiving K/V, by backend and compression",
                 transfers["seconds"], transfer_labels),
        _counter("raypd_scheduler_rejections", "Requests the scheduler rejected (any client), by reason",
                 {(reason,): n for reason, n in s["rejections"].items()}, {"reason": None}),
        _counter("raypd_scheduler_requests", "Requests the scheduler accepted (any client)", s["num_requests"]),
        _gauge("raypd_scheduler_overhead_seconds", "Mean scheduler time spent per request",
               s["overhead_ms_per_request"] / 1e3),
        _gauge("raypd_kv_store_host_objects", "Host copies (object store) the KV store holds",
               index.get("num_host_objects", 0)),
        _counter("raypd_scheduler_retries", "Requests placed again after a worker died or K/V was lost in transfer",
                 s.get("num_retries", 0)),
        _gauge("raypd_dead_workers", "Workers the scheduler dropped after they died", len(s.get("dead_workers", {}))),
    ]


# ---------------------------------------------------------------------------- collectors


class FunctionCollector:
    """Yields `families()` at each scrape."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        yield from self._families()


class StatusCollector:
    """Yields `families(read_status())` at each scrape, waiting at most `timeout_s` for the
    status. A status call that outlives a scrape is not repeated: the next scrape waits on it."""

    def __init__(self, read_status, families, timeout_s: float = 2.0):
        self._read_status, self._families, self.timeout_s = read_status, families, timeout_s
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypd-metrics-status")
        self._lock = threading.Lock()
        self._pending: futures.Future | None = None

    def collect(self):
        with self._lock:
            if self._pending is None:
                self._pending = self._pool.submit(self._read_status)
            pending = self._pending
        try:
            status = pending.result(timeout=self.timeout_s)
        except futures.TimeoutError:
            yield _gauge("raypd_deployment_up", "1 when the deployment's status was read at this scrape", 0)
            return
        except Exception:  # noqa: BLE001 - the deployment is gone: say so, scrape the rest
            status = None
        with self._lock:
            if self._pending is pending:
                self._pending = None
        if status is None:
            yield _gauge("raypd_deployment_up", "1 when the deployment's status was read at this scrape", 0)
            return
        yield from self._families(status)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
