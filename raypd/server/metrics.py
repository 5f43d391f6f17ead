"""Prometheus metrics of one serving process, on their own registry, scrapeable over HTTP.

The HTTP listener binds 127.0.0.1 only. Gauges that mirror engine state (pages in use,
running requests) are read at scrape time, so they cost nothing between scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, backend, port: int | None = None, host: str = "127.0.0.1"):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("raypd_ttft_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS_S)
        self.tpot = Histogram("raypd_tpot_seconds", "Time per output token after the first", registry=r,
                              buckets=LATENCY_BUCKETS_S)
        self.requests = Counter("raypd_requests", "Finished RPCs by status code", ["code"], registry=r)
        self.rejections = Counter("raypd_rejections", "Requests refused before queuing, by reason", ["reason"],
                                  registry=r)
        engine = backend.engine
        allocator = engine.runner.allocator
        Gauge("raypd_kv_pages_used", "KV pages in use", registry=r).set_function(lambda: allocator.num_used)
        Gauge("raypd_kv_pages_total", "KV pages in the pool", registry=r).set_function(
            lambda: allocator.num_pages - 1)
        Gauge("raypd_running_requests", "Requests in decode slots", registry=r).set_function(
            lambda: engine.decode_engine.num_running)
        Gauge("raypd_queued_requests", "Requests waiting or prefilling", registry=r).set_function(
            lambda: engine.num_unfinished - engine.decode_engine.num_running)
        self._server = None
        self.port = None
        if port is not None:
            self._server, _ = start_http_server(port, addr=host, registry=r)
            self.port = self._server.server_port

    def observe_request(self, ttft_s: float, tpot_s: float | None) -> None:
        self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
