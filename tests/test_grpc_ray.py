"""The gRPC endpoint over a Ray deployment: real client, loopback, mock engines.

Guards against: the Ray backend answering differently from the local one (status codes, field
names in INVALID_ARGUMENT, the retry hint of RESOURCE_EXHAUSTED); a cancelled or expired RPC
that leaves its request running on a decode worker (slot and pages must be back within a
second); auth that lets a method through; metrics that are not read from the deployment.

The mock engines' tokens can be worked out by hand (raypd/engine/arithmetic.py; s the sum of
the tokens so far): prefill worker 2s, decode steps 3s, mod 1000. Each decode step takes
STEP_S (`step_delay_s`), so requests run long enough to be cancelled mid-way.
"""

from __future__ import annotations

import itertools
import threading
import time
import types
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

import raypd
from raypd.proto import raypd_pb2, raypd_pb2_grpc
from raypd.engine.arithmetic import expected_tokens
from raypd.runtime.engines import MockEngineFactory
from raypd.server.backends import RayBackend
from raypd.server.grpc_server import Endpoint
from raypd.server.metrics import FunctionCollector, StatusCollector, deployment_families
from scheduler import PolicyConfig

ROOT = Path(__file__).resolve().parent.parent
STEP_S = 0.01  # each mock decode step
MAX_SLOTS = 2
MOCK_MODEL = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=1000), tokenizer=None)
_first = itertools.count(100)


def fresh() -> list[int]:
    """A 5-token prompt no earlier request shares a page with (so no prefix hit makes it short
    enough to prefill on the decode worker): prefilled on the prefill worker, K/V transferred."""
    return [next(_first), 20, 30, 40, 50]


def expected(prompt: list[int], n: int) -> list[int]:
    """Prefill worker (2s), then decode steps (3s), s the sum of the tokens so far (mod 1000)."""
    return expected_tokens(prompt, n, 2, 3, 1000)


# ---------------------------------------------------------------- metrics, no Ray

STATUS = dict(
    name="x", is_running=True, num_queued=3, num_tracked=5,
    prefill=[dict(worker_id="prefill-0", used_pages=[7], num_free_pages=8, num_pending_transfers=1,
                  num_computed_tokens=120)],
    decode=[dict(worker_id="decode-0", used_pages=[4, 2], num_running=2, num_inbox=1, num_local_prefills=0,
                 num_computed_tokens=9)],
    index=dict(num_entries=6, used_bytes=96, max_bytes=1000, hit_rate=0.25, num_hit_pages=2, num_miss_pages=6,
               num_evicted=1),
    transfer=[dict(backend="ray_object_store", compression="int8", count=4, bytes=512, seconds=0.5)],
    rejections={"queue_full": 2}, overhead_ms_per_request=1.5, num_requests=11)


def scrape(collector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_deployment_metrics_from_status():
    m = scrape(FunctionCollector(lambda: deployment_families(STATUS)))
    assert m["raypd_deployment_up"] == 1 and m["raypd_queued_requests"] == 3 and m["raypd_running_requests"] == 2
    assert m['raypd_kv_pages_used{worker="decode-0"}'] == 6 and m['raypd_kv_pages_used{worker="prefill-0"}'] == 7
    assert m['raypd_pending_transfers{worker="prefill-0"}'] == 1 and m['raypd_decode_inbox{worker="decode-0"}'] == 1
    assert m["raypd_kv_store_hit_pages_total"] == 2 and m["raypd_kv_store_miss_pages_total"] == 6
    assert m["raypd_kv_store_entries"] == 6 and m["raypd_kv_store_bytes"] == 96 and m["raypd_kv_store_hit_rate"] == 0.25
    labels = '{backend="ray_object_store",compression="int8"}'
    assert m[f"raypd_kv_transfer_bytes_total{labels}"] == 512 and m[f"raypd_kv_transfer_seconds_total{labels}"] == 0.5
    assert m[f"raypd_kv_transfers_total{labels}"] == 4
    assert m['raypd_scheduler_rejections_total{reason="queue_full"}'] == 2
    assert m["raypd_scheduler_overhead_seconds"] == 0.0015


def test_a_hanging_status_never_hangs_a_scrape():
    release = threading.Event()
    calls = []

    def status():
        calls.append(1)
        release.wait(10)
        return STATUS

    collector = StatusCollector(status, deployment_families, timeout_s=0.1)
    for _ in range(2):
        start = time.monotonic()
        assert scrape(collector) == {"raypd_deployment_up": 0.0}
        assert time.monotonic() - start < 1.0
    assert len(calls) == 1  # the second scrape waited on the same call
    release.set()
    assert scrape(collector)["raypd_deployment_up"] == 1
    collector.close()


# ---------------------------------------------------------------- a deployment and its endpoint


@pytest.fixture(scope="module")
def deployment():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="raypd-grpc-tests", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    from raypd.runtime.deployment import Resources

    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, num_pages=100,
                                max_slots=MAX_SLOTS, step_delay_s=STEP_S)
    d = raypd.serve(name="grpc-mock", factory=factory, calibrate=False, cache_bytes=10**6,
                    policy=PolicyConfig(local_prefill_max_len=4, max_queued=1),
                    prefill_resources=Resources(num_cpus=0.25), decode_resources=Resources(num_cpus=0.25))
    yield d
    d.shutdown()
    ray.shutdown()


def start_endpoint(d, model=MOCK_MODEL, **kw) -> Endpoint:
    backend = RayBackend(d, "mock", model, 512 if model is not None else 0, max_slots=MAX_SLOTS)
    return Endpoint(backend, **kw).start(warmup=False)  # the mock engines compile nothing


@pytest.fixture(scope="module")
def endpoint(deployment):
    ep = start_endpoint(deployment, metrics_port=0)
    yield ep
    ep.stop()


@pytest.fixture(scope="module")
def stub(endpoint):
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as channel:
        yield raypd_pb2_grpc.GenerationStub(channel)


def req(text=None, ids=None, **params) -> raypd_pb2.GenerateRequest:
    params.setdefault("max_tokens", 4)
    r = raypd_pb2.GenerateRequest(params=raypd_pb2.SamplingParams(**params))
    if ids is not None:
        r.token_ids.ids.extend(ids)
    else:
        r.text = text
    return r


def decode_load(d) -> list[tuple[int, int]]:
    """(pages used, requests running) of each decode worker, with cached pages dropped first
    (finished requests publish their pages to the KV index: only what requests hold counts)."""
    d.clear_cache(pools_only=True)
    return [(sum(w["used_pages"]), w["num_running"]) for w in d.status()["decode"]]


def wait_for_load(d, expected, within_s: float = 1.0) -> None:
    end = time.monotonic() + within_s
    while decode_load(d) != expected and time.monotonic() < end:
        time.sleep(0.02)
    assert decode_load(d) == expected, f"decode workers not back to {expected} {within_s} s after the RPC ended"


def test_generate_stream_models_and_info(deployment, stub):
    prompt = fresh()
    resp = stub.Generate(req(ids=prompt, logprobs=True), timeout=30)
    assert list(resp.token_ids) == expected(prompt, 4)
    assert resp.finish_reason == "length" and list(resp.logprobs) == [-1.0] * 4 and resp.prompt_tokens == 5
    assert resp.request_id.startswith("srv-grpc-mock-") and resp.timings.e2e_s >= resp.timings.ttft_s > 0
    named = req(ids=fresh())
    named.request_id = "client-7"  # the client's own id comes back (the deployment's is internal)
    assert stub.Generate(named, timeout=30).request_id == "client-7"
    prompt = fresh()
    chunks = list(stub.GenerateStream(req(ids=prompt, max_tokens=6), timeout=30))
    assert [t for c in chunks for t in c.token_ids] == expected(prompt, 6)
    assert chunks[-1].finish_reason == "length" and chunks[-1].HasField("timings")
    assert all(c.finish_reason == "" for c in chunks[:-1])
    (m,) = stub.ListModels(raypd_pb2.ListModelsRequest(), timeout=5).models
    assert m.name == "mock" and m.max_seq_len == 512 and not m.has_tokenizer
    info = stub.ServerInfo(raypd_pb2.ServerInfoRequest(), timeout=5)
    assert info.backend == "ray" and info.version == raypd.__version__ and info.max_slots == MAX_SLOTS
    assert info.num_running == 0


BAD = [
    (req("hello"), "text"),  # the mock has no tokenizer
    (req(ids=[]), "token_ids"),
    (req(ids=[1, 10**6]), "vocabulary"),
    (raypd_pb2.GenerateRequest(), "prompt"),
    (req(ids=[5], top_p=1.5), "top_p"),
    (req(ids=[5], temperature=-1.0), "temperature"),
    (req(ids=[5], max_tokens=0), "max_tokens"),
    (req(ids=[5], max_tokens=100_000), "context length"),
    (req(ids=[5], kv_compression="zip"), "kv_compression"),
    (req(ids=[5], stop=["x"]), "stop"),
    (req(ids=[5], stop_token_ids=[10**6]), "stop_token_ids[0]"),
    (req(ids=[5], stop_token_ids=[3, -1]), "stop_token_ids[1]"),
    (req(ids=[5], temperature=float("inf")), "temperature"),
    (raypd_pb2.GenerateRequest(token_ids=raypd_pb2.TokenIds(ids=[5]), request_id="srv-1"), "request_id"),
    (raypd_pb2.GenerateRequest(token_ids=raypd_pb2.TokenIds(ids=[5]), model="gpt-9"), "model"),
]


@pytest.mark.parametrize("checked_by", ["endpoint", "scheduler"])
def test_bad_requests_get_invalid_argument_and_good_ones_are_unaffected(deployment, checked_by):
    """The endpoint checks prompts itself when it knows the model; without it, the scheduler's
    checks must still name the field the client sent."""
    baseline = decode_load(deployment)
    ep = start_endpoint(deployment, model=MOCK_MODEL if checked_by == "endpoint" else None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            s = raypd_pb2_grpc.GenerationStub(ch)
            for bad, field in BAD:
                with pytest.raises(grpc.RpcError) as e:
                    s.Generate(bad, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details(), field
                with pytest.raises(grpc.RpcError) as e:
                    list(s.GenerateStream(bad, timeout=10))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                good = fresh()
                assert list(s.Generate(req(ids=good), timeout=30).token_ids) == expected(good, 4)
    finally:
        ep.stop()
    wait_for_load(deployment, baseline)


def test_deadline_mid_generation_frees_slot_and_pages(deployment, stub):
    baseline = decode_load(deployment)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:  # 300 steps of 10 ms: 3 s; the deadline is 0.5 s
        stub.Generate(req(ids=fresh(), max_tokens=300), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2
    wait_for_load(deployment, baseline)


def test_cancel_mid_stream_frees_slot_and_pages(deployment, stub):
    baseline = decode_load(deployment)
    prompt = fresh()
    call = stub.GenerateStream(req(ids=prompt, max_tokens=300), timeout=30)
    assert next(call).token_ids[0] == expected(prompt, 1)[0]
    ((pages, running),) = decode_load(deployment)
    assert running == baseline[0][1] + 1 and pages > baseline[0][0]
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_for_load(deployment, baseline)


def test_full_queue_gives_resource_exhausted_with_retry_hint(deployment, stub):
    """Both decode slots busy and one request queued (max_queued=1): the next one is refused."""
    baseline = decode_load(deployment)
    running = []
    for _ in range(MAX_SLOTS):  # one at a time: each is placed before the next arrives
        running.append(stub.GenerateStream(req(ids=fresh(), max_tokens=300), timeout=30))
        next(running[-1])
    queued = stub.GenerateStream(req(ids=fresh(), max_tokens=300), timeout=30)
    end = time.monotonic() + 5
    while deployment.status()["num_queued"] < 1 and time.monotonic() < end:
        time.sleep(0.01)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req(ids=fresh()), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
        hints = dict(e.value.trailing_metadata())
        assert hints["rejection-reason"] == "queue_full" and int(hints["retry-after-ms"]) > 0
    finally:
        for call in running + [queued]:
            call.cancel()
    wait_for_load(deployment, baseline)
    assert deployment.status()["num_queued"] == 0
    with pytest.raises(grpc.RpcError) as e:  # can never fit: refused, with no hint to retry
        stub.Generate(req(ids=fresh(), max_tokens=450), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hints = dict(e.value.trailing_metadata())
    assert hints["rejection-reason"] == "no_capacity" and "retry-after-ms" not in hints
    good = fresh()
    assert list(stub.Generate(req(ids=good), timeout=30).token_ids) == expected(good, 4)


def test_auth_on_every_method_but_health(deployment):
    ep = start_endpoint(deployment, token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            s = raypd_pb2_grpc.GenerationStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            # each call with what its reply must say when the token is right (a reply's fields,
            # never the truthiness of a message, which is always true)
            calls = [lambda md: s.Generate(req(ids=fresh(), max_tokens=2), timeout=10, metadata=md).finish_reason in ("stop", "length"),
                     lambda md: list(s.GenerateStream(req(ids=fresh(), max_tokens=2), timeout=10, metadata=md))[-1].finish_reason
                     in ("stop", "length"),
                     lambda md: len(s.ListModels(raypd_pb2.ListModelsRequest(), timeout=5, metadata=md).models) == 1,
                     lambda md: s.ServerInfo(raypd_pb2.ServerInfoRequest(), timeout=5, metadata=md).max_slots > 0]
            for i, call in enumerate(calls):
                for md in (None, (("authorization", "Bearer wrong"),)):
                    with pytest.raises(grpc.RpcError) as e:
                        call(md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert call((("authorization", "Bearer s3cret"),)) is True, i
    finally:
        ep.stop()


def test_metrics_show_store_transfer_and_rejections(endpoint, stub):
    prompt = [7] * 12  # 3 pages of 4: the second time, its 2 full prefix pages are found in the store
    for _ in range(2):
        stub.Generate(req(ids=prompt, max_tokens=3), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Generate(req(ids=fresh(), max_tokens=450), timeout=10)  # no_capacity
    text = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.metrics.port}/metrics", timeout=5).read().decode()
    m = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            m[name] = float(value)
    assert m["raypd_deployment_up"] == 1
    assert m["raypd_kv_store_hit_pages_total"] > 0 and m["raypd_kv_store_entries"] > 0
    assert m["raypd_kv_store_bytes"] > 0 and m["raypd_scheduler_requests_total"] > 0
    transfer = {k: v for k, v in m.items() if k.startswith("raypd_kv_transfer_bytes_total{")}
    assert transfer and all('compression="none"' in k and v > 0 for k, v in transfer.items()), transfer
    assert any(k.startswith("raypd_kv_transfer_seconds_total{") and v > 0 for k, v in m.items())
    assert m['raypd_scheduler_rejections_total{reason="no_capacity"}'] >= 1
    assert m['raypd_rejections_total{reason="no_capacity"}'] >= 1
    assert m["raypd_ttft_seconds_count"] >= 2 and m["raypd_tpot_seconds_count"] >= 2
    # the first request's K/V moved; the second may prefill on the decode worker, which holds
    # the first one's finished pages
    assert m['raypd_request_phase_seconds_count{phase="transfer"}'] >= 1
    assert m['raypd_request_phase_seconds_count{phase="prefill"}'] >= 2
    assert m['raypd_requests_total{code="ok"}'] >= 2 and "raypd_running_requests" in m
    assert 'raypd_kv_pages_used{worker="decode-0"}' in m and "raypd_queued_requests" in m


def test_health_follows_whether_the_deployment_can_generate(deployment):
    """A deployment whose only decode worker died (and is not replaced) cannot generate: health
    turns NOT_SERVING within a few readiness checks instead of saying SERVING forever."""
    from raypd.runtime.deployment import Resources

    d = raypd.serve(name="grpc-ready", factory=MockEngineFactory(num_pages=32), calibrate=False, num_prefill=1,
                    max_replacements=0, prefill_resources=Resources(num_cpus=0.25),
                    decode_resources=Resources(num_cpus=0.25))
    ep = Endpoint(RayBackend(d, "mock"), readiness_interval_s=0.2).start(warmup=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status():
                return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            import ray

            ray.kill(d._actors[-1])  # the decode worker (actors: scheduler, prefill, decode)
            end = time.monotonic() + 20
            while status() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < end, "health still SERVING with no decode worker"
                time.sleep(0.1)
    finally:
        ep.stop()
        d.shutdown()
