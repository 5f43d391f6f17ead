"""The gRPC endpoint over loopback: every method, every status code, auth, reflection, metrics."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.runner import EngineConfig
from raypd.proto import gen, raypd_pb2, raypd_pb2_grpc
from raypd.server.backends import LocalEngineBackend
from raypd.server.grpc_server import Endpoint, GenerationService, build_server

SMALL = EngineConfig(page_size=16, num_pages=64, max_slots=2, max_seq_len=256, prefill_buckets=(32,))


def make_endpoint(**kw) -> Endpoint:
    # No full warm-up here (it compiles every shape); tests that time things run their request
    # once first, so the shapes they use are compiled.
    backend = LocalBackend(models.load("tiny-random"), SMALL)
    return Endpoint(backend, "tiny-random", **kw).start(warmup=False)


@pytest.fixture(scope="module")
def endpoint():
    ep = make_endpoint(metrics_port=0)
    yield ep
    ep.stop()


@pytest.fixture(scope="module")
def stub(endpoint):
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as channel:
        yield raypd_pb2_grpc.GenerationStub(channel)


def pages_used(ep: Endpoint) -> int:
    return ep.backend.local.engine.runner.allocator.num_used


def wait_for_pages(ep: Endpoint, expected: int = 0, within_s: float = 1.0) -> None:
    end = time.monotonic() + within_s
    while pages_used(ep) != expected and time.monotonic() < end:
        time.sleep(0.01)
    assert pages_used(ep) == expected, f"{pages_used(ep)} pages still used {within_s} s after the RPC ended"


def req(text=None, ids=None, **params) -> raypd_pb2.GenerateRequest:
    params.setdefault("max_tokens", 8)
    params.setdefault("ignore_eos", True)
    r = raypd_pb2.GenerateRequest(params=raypd_pb2.SamplingParams(**params))
    if ids is not None:
        r.token_ids.ids.extend(ids)
    else:
        r.text = text
    return r


def test_generate_and_stream_match_the_python_client(endpoint, stub):
    resp = stub.Generate(req("hello raypd", max_tokens=10, logprobs=True), timeout=30)
    (ref,) = raypd.generate(["hello raypd"], model=LocalBackend(models.load("tiny-random"), SMALL),
                            max_tokens=10, ignore_eos=True)
    assert list(resp.token_ids) == ref.token_ids and resp.text == ref.text
    assert resp.finish_reason == "length" and len(resp.logprobs) == 10 and resp.prompt_tokens == 11
    assert resp.timings.ttft_s > 0 and resp.timings.e2e_s >= resp.timings.ttft_s
    chunks = list(stub.GenerateStream(req("hello raypd", max_tokens=10), timeout=30))
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text_delta for c in chunks) == ref.text
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1) and chunks[-1].finish_reason == "length"
    assert chunks[-1].HasField("timings")
    by_ids = stub.Generate(req(ids=[5, 6, 7], max_tokens=4), timeout=30)
    assert len(by_ids.token_ids) == 4
    wait_for_pages(endpoint)


def test_penalties_and_top_logprobs_match_the_python_client(endpoint, stub):
    kw = dict(max_tokens=8, frequency_penalty=1.5, repetition_penalty=1.3, min_tokens=4, top_logprobs=3)
    resp = stub.Generate(req("hello hello hello", logit_bias={7: 2.5}, **kw), timeout=30)
    (ref,) = raypd.generate(["hello hello hello"], model=LocalBackend(models.load("tiny-random"), SMALL),
                            ignore_eos=True, logit_bias={7: 2.5}, **kw)
    assert list(resp.token_ids) == ref.token_ids
    assert [tuple(zip(t.token_ids, t.logprobs)) for t in resp.top_logprobs] == [
        tuple((i, pytest.approx(lp, abs=1e-6)) for i, lp in top) for top in ref.top_logprobs]
    chunks = list(stub.GenerateStream(req("hello hello hello", logit_bias={7: 2.5}, **kw), timeout=30))
    assert [len(t.token_ids) for c in chunks for t in c.top_logprobs] == [3] * 8
    wait_for_pages(endpoint)


def test_list_models_and_server_info(stub):
    (m,) = stub.ListModels(raypd_pb2.ListModelsRequest(), timeout=5).models
    assert m.name == "tiny-random" and m.architecture == "llama" and m.has_tokenizer and m.max_seq_len == 256
    info = stub.ServerInfo(raypd_pb2.ServerInfoRequest(), timeout=5)
    assert info.version == raypd.__version__ and info.backend == "local" and info.max_slots == 2


BAD = [
    (req(""), "text"),
    (req(ids=[]), "token_ids"),
    (req(ids=[1, 10**6]), "vocabulary"),
    (raypd_pb2.GenerateRequest(), "prompt"),
    (req("x", top_p=1.5), "top_p"),
    (req("x", temperature=-1.0), "temperature"),
    (req("x", max_tokens=0), "max_tokens"),
    (req("x", max_tokens=100_000), "context length"),
    (req("x", kv_compression="zip"), "kv_compression"),
    (raypd_pb2.GenerateRequest(text="x", model="gpt-9"), "model"),
    (req("x", frequency_penalty=3.0), "frequency_penalty"),
    (req("x", repetition_penalty=0.0), "repetition_penalty"),
    (req("x", logit_bias={10**6: 1.0}), "logit_bias"),
    (req("x", logit_bias={5: 200.0}), "logit_bias"),
    (req("x", min_tokens=9), "min_tokens"),
    (req("x", top_logprobs=21), "top_logprobs"),
]


def test_bad_requests_get_invalid_argument_and_good_ones_are_unaffected(endpoint, stub):
    good = stub.Generate(req("steady", max_tokens=6), timeout=30)
    for bad, field in BAD * 2:  # a burst of bad requests between good ones
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(bad, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    again = stub.Generate(req("steady", max_tokens=6), timeout=30)
    assert list(again.token_ids) == list(good.token_ids)
    wait_for_pages(endpoint)


def test_deadline_mid_generation_frees_pages(endpoint, stub):
    stub.Generate(req("a long one", max_tokens=240), timeout=60)  # compiles its shapes
    full = stub.Generate(req("a long one", max_tokens=240), timeout=60)  # how long it takes warm
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req("a long one", max_tokens=240), timeout=full.timings.e2e_s / 3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_pages(endpoint)


def test_cancel_mid_stream_frees_pages(endpoint, stub):
    stub.Generate(req("cancel me", max_tokens=240), timeout=60)  # compile its shapes first
    call = stub.GenerateStream(req("cancel me", max_tokens=240), timeout=30)
    first = next(call)
    assert first.token_ids and pages_used(endpoint) > 0
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_for_pages(endpoint)


def test_at_capacity_gives_resource_exhausted_with_retry_hint():
    ep = make_endpoint(max_queued=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            s = raypd_pb2_grpc.GenerationStub(ch)
            s.Generate(req("hold", max_tokens=240), timeout=60)  # compile its shapes first
            running = s.GenerateStream(req("hold", max_tokens=240), timeout=30)
            next(running)
            with pytest.raises(grpc.RpcError) as e:
                s.Generate(req("one too many"), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hints = dict(e.value.trailing_metadata())
            assert int(hints["retry-after-ms"]) > 0 and hints["rejection-reason"] == "capacity"
            running.cancel()
            wait_for_pages(ep)
            assert len(s.Generate(req("room again", max_tokens=3), timeout=30).token_ids) == 3
    finally:
        ep.stop()


def test_oversized_message_is_refused():
    ep = make_endpoint(max_message_bytes=1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            s = raypd_pb2_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                s.Generate(req(ids=list(range(3, 500)) * 2), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(s.Generate(req("small"), timeout=30).token_ids) == 8
    finally:
        ep.stop()


def test_auth_on_every_method_but_health():
    ep = make_endpoint(token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            s = raypd_pb2_grpc.GenerationStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            # each call with what its reply must say when the token is right (a reply's fields,
            # never the truthiness of a message, which is always true)
            calls = [lambda md: s.Generate(req("x", max_tokens=2), timeout=10, metadata=md).finish_reason in ("stop", "length"),
                     lambda md: list(s.GenerateStream(req("x", max_tokens=2), timeout=10, metadata=md))[-1].finish_reason
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


def test_reflection_client_without_project_stubs(endpoint):
    """A client that knows only the server's address: it learns the API by reflection and
    builds its messages from the descriptors it receives."""
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "raypd.v1.Generation" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("raypd.v1.Generation").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        msg = request_cls(text="reflect", params={"max_tokens": 5, "ignore_eos": True})
        call = ch.unary_unary("/raypd.v1.Generation/Generate", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=response_cls.FromString)
        resp = call(msg, timeout=30)
        assert len(resp.token_ids) == 5 and resp.finish_reason == "length"


def test_metrics_are_scrapeable_on_loopback(endpoint, stub):
    stub.Generate(req("count me", max_tokens=4), timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.metrics.port}/metrics", timeout=5).read().decode()
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("raypd_ttft_seconds_count"))
    assert count >= 1
    assert "raypd_kv_pages_used" in text and 'raypd_requests_total{code="ok"}' in text


def test_non_loopback_without_tls_or_auth_is_refused():
    backend = LocalBackend(models.load("tiny-random"), SMALL)
    service = GenerationService(LocalEngineBackend(backend, "tiny-random"))
    with pytest.raises(ValueError, match="non-loopback"):
        build_server(service, host="0.0.0.0")


def test_stubs_are_up_to_date(tmp_path):
    gen.generate(tmp_path)
    for name in gen.STUBS:
        assert (tmp_path / name).read_text() == (gen.PROTO_DIR / name).read_text(), \
            f"{name} is stale: run python -m raypd.proto.gen"
