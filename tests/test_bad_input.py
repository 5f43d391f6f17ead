"""Hostile and malformed input (issue 12, items 4 and 5): bounded requests, refused at once with
the field named, request ids that never collide, a gRPC port that is never shared, and the
bad-input chaos scenario (>= 40 classes over gRPC and the Python API)."""

from __future__ import annotations

import collections
import math

import grpc
import pytest

import models
from raypd.api import LocalBackend
from raypd.chaos import bad_input
from raypd.engine.api import (MAX_REQUEST_ID_LEN, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                              SamplingParams, check_request_id)
from raypd.engine.runner import EngineConfig
from raypd.proto import raypd_pb2, raypd_pb2_grpc
from raypd.runtime import errors
from raypd.runtime.messages import Token
from raypd.server.backends import Job, RayBackend
from raypd.server.grpc_server import Endpoint
from raypd.server.wire import Malformed, decode_request, encode_lenient

SMALL = EngineConfig(page_size=16, num_pages=64, max_slots=2, max_seq_len=256, prefill_buckets=(32,))


# ---------------------------------------------------------------- limits, without a server

AT_LIMIT = [
    dict(stop=["x"] * MAX_STOP_STRINGS),
    dict(stop=["x" * MAX_STOP_STRING_LEN]),
    dict(stop_token_ids=[0] * MAX_STOP_TOKEN_IDS),
    dict(temperature=1e6),
]
PAST_LIMIT = [
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "MAX_STOP_STRINGS"),
    (dict(stop=["ok", "x" * (MAX_STOP_STRING_LEN + 1)]), "stop[1]: at most 256 characters"),
    (dict(stop_token_ids=[0] * (MAX_STOP_TOKEN_IDS + 1)), "MAX_STOP_TOKEN_IDS"),
    (dict(stop_token_ids=[4, -1]), "stop_token_ids[1]"),
    (dict(stop_token_ids=[True]), "stop_token_ids[0]"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=math.nan), "top_p"),
]


@pytest.mark.parametrize("kwargs", AT_LIMIT)
def test_sampling_params_at_the_limits_are_accepted(kwargs):
    params = SamplingParams(**kwargs)  # raises ValueError if a value at its limit were refused
    for name, value in kwargs.items():  # and keeps what it was given (sequences as tuples)
        assert getattr(params, name) == (tuple(value) if isinstance(value, list) else value), name


@pytest.mark.parametrize("kwargs,match", PAST_LIMIT, ids=[m for _, m in PAST_LIMIT])
def test_sampling_params_past_the_limits_are_refused_naming_field_and_limit(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_request_ids_are_bounded_printable_and_not_in_the_server_namespace():
    assert check_request_id("") == "" and check_request_id("a" * MAX_REQUEST_ID_LEN)
    for bad in ("a" * (MAX_REQUEST_ID_LEN + 1), "a b", "x\n", "é", "srv-12", 7):
        with pytest.raises(ValueError, match="request_id"):
            check_request_id(bad)


def test_a_request_that_does_not_parse_names_its_field():
    assert decode_request(raypd_pb2.GenerateRequest(text="fine").SerializeToString()).text == "fine"
    assert decode_request(encode_lenient(text=b"\xffbad")) == Malformed("prompt: text is not valid UTF-8 (byte 0)")
    assert "request_id" in decode_request(encode_lenient(text=b"ok", request_id=b"\xc3")).reason
    assert "params.stop[0]" in decode_request(encode_lenient(text=b"ok", params=dict(stop=[b"\x80"]))).reason
    assert decode_request(b"\xff\xff\xff").reason.startswith("request: not a valid GenerateRequest")


# ---------------------------------------------------------------- the gRPC endpoint


@pytest.fixture(scope="module")
def endpoint():
    ep = Endpoint(LocalBackend(models.load("tiny-random"), SMALL), "tiny-random").start(warmup=False)
    yield ep
    ep.stop()


@pytest.fixture(scope="module")
def channel(endpoint):
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as ch:
        yield ch


def test_prompt_that_is_not_utf8_is_invalid_argument_not_internal(channel):
    """It was `INTERNAL: Exception deserializing request!` (gRPC's own deserializer failed)."""
    generate = channel.unary_unary("/raypd.v1.Generation/Generate", request_serializer=None,
                                   response_deserializer=raypd_pb2.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        generate(encode_lenient(text=b"caf\xe9", params=dict(max_tokens=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
    ok = generate(encode_lenient(text="café".encode(), params=dict(max_tokens=2)), timeout=30)
    assert len(ok.token_ids) == 2


def test_client_ids_round_trip_and_never_collide_with_server_ids(channel):
    stub = raypd_pb2_grpc.GenerationStub(channel)
    mine = stub.Generate(raypd_pb2.GenerateRequest(request_id="client-1", text="hi",
                                                   params=raypd_pb2.SamplingParams(max_tokens=2)), timeout=30)
    theirs = stub.Generate(raypd_pb2.GenerateRequest(text="hi", params=raypd_pb2.SamplingParams(max_tokens=2)),
                           timeout=30)
    assert mine.request_id == "client-1" and theirs.request_id.startswith("srv-")
    with pytest.raises(grpc.RpcError) as e:  # a client may not pose as a server-assigned id
        stub.Generate(raypd_pb2.GenerateRequest(request_id=theirs.request_id, text="hi"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details()


def test_duplicate_in_flight_id_is_already_exists_and_free_again_after(endpoint, channel):
    stub = raypd_pb2_grpc.GenerationStub(channel)
    req = raypd_pb2.GenerateRequest(request_id="twice", token_ids=raypd_pb2.TokenIds(ids=[5, 6]),
                                    params=raypd_pb2.SamplingParams(max_tokens=200, ignore_eos=True))
    holder = stub.GenerateStream(req, timeout=60)
    assert next(holder).request_id == "twice"
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "twice" in e.value.details()
    holder.cancel()
    req.params.max_tokens = 2
    for _ in range(100):  # the cancelled stream's id is released once its abort is handled
        try:
            assert stub.Generate(req, timeout=30).request_id == "twice"
            break
        except grpc.RpcError as again:
            assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    else:
        pytest.fail("the id stayed taken after its stream was cancelled")


def test_a_second_server_on_a_taken_port_fails_to_start(endpoint):
    """It used to share the port (SO_REUSEPORT) and answer some of the first one's connections."""
    with pytest.raises(OSError, match=f"127.0.0.1:{endpoint.port}.*in use"):
        Endpoint(LocalBackend(models.load("tiny-random"), SMALL), "tiny-random", port=endpoint.port)


# ---------------------------------------------------------------- the Ray backend's id mapping


class FakeDeployment:
    """Deployment.submit / poll / abort, recorded; ids "dep-N" like a scheduler's."""

    def __init__(self):
        self.submitted, self.polled, self.aborted = [], [], []

    def submit(self, prompts, params, ttft_slo_s, kv_compression):
        self.submitted.append(prompts[0])
        return [f"dep-{len(self.submitted)}"]

    def poll(self, ids, timeout_s):
        self.polled += ids
        return {ids[0]: dict(tokens=[Token(7, -1.0, "length", "")], finished=True, error=None, metrics={})}

    def abort(self, ids):
        self.aborted += ids


def test_ray_backend_carries_the_client_id_and_maps_it_to_the_deployment_id():
    dep = FakeDeployment()
    backend = RayBackend(dep, "m", max_in_flight=4)
    job = Job([5, 6], "token_ids", SamplingParams(max_tokens=1), request_id="client-a")
    stream = backend.submit(job)
    assert (stream.request_id, stream.deployment_id) == ("client-a", "dep-1")
    with pytest.raises(errors.DuplicateRequestId, match="client-a"):
        backend.submit(job)
    out = stream.get(1.0)
    assert out.request_id == "client-a" and dep.polled == ["dep-1"] and backend.num_in_flight == 0
    unnamed = backend.submit(Job([5], "token_ids", SamplingParams(max_tokens=1)))
    assert unnamed.request_id == "srv-dep-2"
    unnamed.abort()
    assert dep.aborted == ["dep-2"] and backend.num_in_flight == 0
    assert backend.submit(job).request_id == "client-a"  # free again once it ended


@pytest.mark.integration  # a gRPC server, timed deadlines
def test_a_grpc_deadline_reaches_the_deployment_as_the_ttft_bound_and_a_refusal_is_resource_exhausted():
    """The client's deadline travels to the scheduler as the request's TTFT bound; when the
    scheduler says it cannot be met (RequestRejected "deadline"), the RPC ends at once with
    RESOURCE_EXHAUSTED, rejection-reason deadline and a retry hint, not after the deadline."""
    import time

    class Bounded(FakeDeployment):
        def __init__(self):
            super().__init__()
            self.bounds = []

        def submit(self, prompts, params, ttft_slo_s, kv_compression):
            self.bounds.append(ttft_slo_s)
            if ttft_slo_s is not None and ttft_slo_s < 1.0:
                raise errors.RequestRejected("predicted TTFT 2.0 s exceeds the SLO", "deadline", 2.0, 1.5)
            return super().submit(prompts, params, ttft_slo_s, kv_compression)

        def status(self, timeout_s=None):
            return dict(decode=[], prefill=[], num_queued=0, index=dict(hit_rate=0.0), transfer=[])

    dep = Bounded()
    ep = Endpoint(RayBackend(dep, "m"), readiness_interval_s=None).start(warmup=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            stub = raypd_pb2_grpc.GenerationStub(ch)
            ok = stub.Generate(raypd_pb2.GenerateRequest(token_ids=raypd_pb2.TokenIds(ids=[5, 6])), timeout=20)
            assert list(ok.token_ids) == [7] and 10 < dep.bounds[-1] <= 20
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(raypd_pb2.GenerateRequest(token_ids=raypd_pb2.TokenIds(ids=[5, 6])), timeout=0.5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - start < 0.4
            meta = dict(e.value.trailing_metadata())
            assert meta["rejection-reason"] == "deadline" and meta["retry-after-ms"] == "1500"
    finally:
        ep.stop()


# ---------------------------------------------------------------- the chaos scenario


@pytest.mark.integration  # a gRPC server over a served model
def test_chaos_bad_input_every_class_refused_on_both_paths():
    report = bad_input.run(measure_interference=False)
    assert report.num_classes >= 40
    assert not report.failures, "\n".join(f"{o.path} {o.case}: {o.detail}" for o in report.failures)
    paths = collections.Counter(o.path for o in report.outcomes)
    assert paths["grpc"] >= 40 and paths["python"] >= 40
    assert report.leaked_pages == 0
