"""K/V transfer: every backend's contract, and disaggregated == colocated (the codec's own
bounds and page buckets: tests/test_kv_codec.py).

The greedy tests guard against the bugs a K/V handoff most often has: pages written in the
wrong order or under the wrong sharding, a last partial page cut short, a dtype silently
changed, and a failed receive that leaks (or half-writes) the receiver's pages.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.config import ModelConfig
from models.llama import init_params
from models.tokenizer import ByteTokenizer
from raypd.engine import kv_codec, paged
from raypd.engine.api import Request, SamplingParams
from raypd.engine.colocated import ColocatedEngine
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import EngineConfig, ModelRunner
from raypd.transfer import (SenderLost, StreamingReceiver, StreamingSender, TransferNotFound,
                            TransferTimeout, make_transport, recv_into, send_prefill)
from raypd.transfer.base import BACKENDS, TransferHandle

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=512,
                  eos_token_ids=(2,))
ENGINE = EngineConfig(page_size=16, num_pages=48, max_slots=4, max_seq_len=256, prefill_buckets=(16, 32, 64))


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def transport(request, ray_session):
    return make_transport(request.param)


@pytest.fixture(scope="module")
def model():
    return models.Model(CFG, init_params(CFG, seed=1, std=0.1), ByteTokenizer(CFG.vocab_size), "test")


def runner_for(model, **kw) -> ModelRunner:
    return ModelRunner(model, EngineConfig(**{**ENGINE.__dict__, **kw}))


def random_cache(num_pages, dtype, L=2, K=4, G=16, H=8, seed=0) -> paged.KVCache:
    rng = np.random.default_rng(seed)
    mk = lambda: jnp.asarray(rng.standard_normal((K, num_pages, G, H), np.float32), dtype)  # noqa: E731
    return paged.KVCache(k=tuple(mk() for _ in range(L)), v=tuple(mk() for _ in range(L)))


def pool_bytes(cache, pages):
    k, v = jax.device_get(paged.read_pages(cache, jnp.asarray(pages, jnp.int32)))
    return k.tobytes() + v.tobytes()


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def prompts_of(lens, seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, CFG.vocab_size, n)] for n in lens]


def colocated_tokens(model, reqs):
    eng = ColocatedEngine(runner_for(model))
    for r in reqs:
        eng.add_request(r)
    out = {r.request_id: [] for r in reqs}
    while eng.num_unfinished:
        for o in eng.step():
            out[o.request_id].append(o.token_id)
    return out


INT8_LOGPROB_TOL = 0.01  # nats: INT8 K/V (per-row scales) moves a token's logprob by ~1e-3 here


def assert_equal_or_int8_within_tolerance(model, reqs, got: dict, want: dict, logprobs: dict, compression: str):
    """Uncompressed K/V: the greedy tokens equal the reference's exactly. INT8 K/V is lossy, so
    its greedy tokens may leave the exact run at a near-tie (where depends on the seed): what
    must hold is that along its own tokens every logprob is within INT8_LOGPROB_TOL of the
    full-precision model's, teacher-forced (a broken codec or a misplaced page moves them by
    far more). -> the worst difference (0.0 uncompressed)."""
    if compression == "none":
        assert got == want
        return 0.0
    worst = 0.0
    for r in reqs:
        tokens = got[r.request_id]
        logits = model.logits(list(r.prompt_ids) + tokens[:-1]).astype(np.float64)[len(r.prompt_ids) - 1:]
        top = logits.max(-1, keepdims=True)
        exact = (logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True)))[np.arange(len(tokens)), tokens]
        worst = max(worst, float(np.max(np.abs(np.asarray(logprobs[r.request_id]) - exact))))
    assert worst <= INT8_LOGPROB_TOL, f"INT8 K/V moved a logprob by {worst:.4f} nats"
    return worst


def disaggregated_tokens(pre, dec, reqs, transport, compression, logprobs: dict | None = None):
    """-> greedy token ids per request; `logprobs`, when given, receives each token's logprob."""
    prefill, decode = PrefillEngine(pre), DecodeEngine(dec)
    by_id = {r.request_id: r for r in reqs}
    out = {r.request_id: [] for r in reqs}
    lps = logprobs if logprobs is not None else {}
    for po in prefill.prefill(reqs):
        handle = send_prefill(prefill, po, transport, compression)
        prefill.release(po.request_id)
        o = recv_into(decode, by_id[po.request_id], po, handle, transport, 10)
        out[o.request_id].append(o.token_id)
        lps.setdefault(o.request_id, []).append(o.logprob)
        transport.release(handle)  # the sender's side, then the receiver's: idempotent in one process
        transport.release(handle)
    while decode.num_running:
        for o in decode.decode_step():
            out[o.request_id].append(o.token_id)
            lps.setdefault(o.request_id, []).append(o.logprob)
    for r in (pre, dec):
        r.allocator.check()
        assert r.allocator.num_used == 0
    return out


# ---------------------------------------------------------------- every backend


@pytest.mark.parametrize("transport", sorted(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_pages,num_tokens", [(1, 16), (3, 37), (520, 520 * 16)])  # 520 pages: ~4 MB f32
def test_uncompressed_pages_arrive_byte_identical(transport, dtype, num_pages, num_tokens):
    src, dst = random_cache(num_pages + 2, dtype), random_cache(num_pages + 2, dtype, seed=1)
    pages = list(range(num_pages + 1, 0, -1))[:num_pages]  # reversed order: order must survive
    handle = transport.send("r", kv_codec.encode(src, pages, num_tokens, "none"))
    assert handle.num_bytes == 2 * 2 * num_pages * 16 * 4 * 8 * jnp.dtype(dtype).itemsize
    enc = transport.recv(handle, timeout_s=10)
    dst_pages = list(range(1, num_pages + 1))
    dst = kv_codec.decode_into(dst, dst_pages, enc)
    assert pool_bytes(dst, dst_pages) == pool_bytes(src, pages)
    for _ in range(3):
        transport.release(handle)
    assert transport.num_pending == 0


@pytest.mark.parametrize("transport", sorted(BACKENDS), indirect=True)
def test_released_or_unknown_handle_is_a_clear_error(transport):
    handle = transport.send("r", kv_codec.encode(random_cache(3, jnp.float32), [1, 2], 20, "int8"))
    transport.release(handle)
    transport.release(handle)
    if transport.kind != "jax_transfer":  # a jax sender's release is local: the receiver is told by the id
        with pytest.raises(TransferNotFound):
            transport.recv(handle, timeout_s=2)
    foreign = TransferHandle("nope", "r", "elsewhere", "none", 1, "float32", 1, 0, 0, ())
    with pytest.raises(TransferNotFound, match="sent with 'elsewhere'"):
        transport.recv(foreign, timeout_s=1)


# ---------------------------------------------------------------- through the engines


@pytest.mark.parametrize("transport", sorted(BACKENDS), indirect=True)
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_disaggregated_greedy_equals_colocated(model, transport, compression):
    prompts = prompts_of((1, 16, 37, 100), seed=1)
    reqs = [Request(str(i), p, greedy(8)) for i, p in enumerate(prompts)]
    want = colocated_tokens(model, reqs)
    logprobs = {}
    got = disaggregated_tokens(runner_for(model), runner_for(model), reqs, transport, compression, logprobs)
    assert_equal_or_int8_within_tolerance(model, reqs, got, want, logprobs, compression)


@pytest.mark.integration  # compiles sharded (TP) programs: seconds of CPU each
@pytest.mark.parametrize("pre_tp,dec_tp", [(2, 1), (4, 1), (1, 4)])
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_mismatched_tp_gives_identical_greedy_output(model, pre_tp, dec_tp, compression):
    prompts = prompts_of((5, 30, 70), seed=3)
    reqs = [Request(str(i), p, greedy(8)) for i, p in enumerate(prompts)]
    want = colocated_tokens(model, reqs)
    pre, dec = runner_for(model, tp=pre_tp), runner_for(model, tp=dec_tp)
    logprobs = {}
    got = disaggregated_tokens(pre, dec, reqs, make_transport("inproc"), compression, logprobs)
    assert_equal_or_int8_within_tolerance(model, reqs, got, want, logprobs, compression)
    assert len(dec.cache.k[0].sharding.device_set) == dec_tp  # re-sharded onto the receiver's mesh


@pytest.mark.parametrize("bad", ["page_size", "kv_heads", "num_tokens", "released"])
def test_bad_payload_leaves_receiver_pages_unchanged(model, bad):
    pre = runner_for(model)
    prefill = PrefillEngine(pre)
    req = Request("a", prompts_of([40])[0], greedy(4))
    (po,) = prefill.prefill([req])
    transport = make_transport("inproc")
    handle = send_prefill(prefill, po, transport, "int8")
    prefill.release("a")
    if bad == "kv_heads":
        other = dataclasses.replace(CFG, num_kv_heads=2)
        dec = ModelRunner(models.Model(other, init_params(other, seed=1), None, "other"), ENGINE)
    else:
        dec = runner_for(model, page_size=8 if bad == "page_size" else 16)
    decode = DecodeEngine(dec)
    held = dec.allocator.allocate(3)  # pages some other request holds
    before = pool_bytes(dec.cache, held)
    if bad == "num_tokens":
        po.prompt_len += 1
    if bad == "released":
        transport.release(handle)
    with pytest.raises((ValueError, TransferNotFound)):
        recv_into(decode, req, po, handle, transport)
    assert dec.allocator.num_used == 3 and decode.num_running == 0
    assert pool_bytes(dec.cache, held) == before


# ---------------------------------------------------------------- failures across processes


def kill_and_wait(ray, actor, timeout_s=10.0):
    """ray.kill returns before the process is gone; wait until calls on the actor fail."""
    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=1)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError("actor did not die")


def _sender_actor(ray):
    @ray.remote(num_cpus=0)
    class Sender:
        def __init__(self, kind, **opts):
            from raypd.transfer import make_transport

            self.transport = make_transport(kind, **opts)

        def send(self, num_pages):
            import numpy as np

            from raypd.engine.kv_codec import EncodedKV

            x = np.arange(2 * num_pages * 16 * 4 * 8, dtype=np.float32).reshape(2, num_pages, 16, 4, 8)
            return self.transport.send("r", EncodedKV("none", num_pages * 16, "float32", x, x + 1))

        def release(self, handle):
            self.transport.release(handle)
            return self.transport.num_pending

    return Sender


@pytest.mark.parametrize("kind", ["ray_object_store", "jax_transfer"])
def test_payload_from_another_process_then_sender_dies(ray_session, kind):
    ray = ray_session
    sender = _sender_actor(ray).remote(kind)
    handle = ray.get(sender.send.remote(2))
    enc = make_transport(kind).recv(handle, timeout_s=20)  # a cold pull from a fresh process
    np.testing.assert_array_equal(np.asarray(enc.v), np.asarray(enc.k) + 1)
    assert ray.get(sender.release.remote(handle)) == 0  # the acknowledgement frees the sender's buffers
    handle = ray.get(sender.send.remote(2))
    kill_and_wait(ray, sender)
    # Until the owner's death has spread, the bytes may still be served from the node's store;
    # after that, SenderLost. Every attempt ends quickly either way: never a hang.
    deadline = time.monotonic() + 10
    while True:
        t0 = time.monotonic()
        try:
            make_transport(kind).recv(handle, timeout_s=5)
        except SenderLost:
            break
        finally:
            assert time.monotonic() - t0 < 5
        assert time.monotonic() < deadline, "never noticed the sender's death"
        time.sleep(0.1)


def test_object_store_payload_that_never_appears_times_out(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def never():
        time.sleep(3600)

    t = make_transport("ray_object_store")
    handle = t.send("r", kv_codec.encode(random_cache(2, jnp.float32), [1], 16, "none"))
    stuck = TransferHandle(**{**handle.__dict__, "location": never.remote()})
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        t.recv(stuck, timeout_s=1)
    assert time.monotonic() - t0 < 3
    ray.cancel(stuck.location, force=True)


def test_jax_transfer_expired_payload_times_out():
    sender = make_transport("jax_transfer", keep_s=0.2)
    handle = sender.send("r", kv_codec.encode(random_cache(2, jnp.float32), [1], 16, "none"))
    time.sleep(0.5)
    assert sender.num_pending == 0  # the sender freed it without an acknowledgement
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        make_transport("jax_transfer").recv(handle, timeout_s=1)
    assert time.monotonic() - t0 < 3


def test_pickled_handle_is_small():
    import pickle

    t = make_transport("inproc")
    handle = t.send("r", kv_codec.encode(random_cache(600, jnp.float32), list(range(1, 600)), 9584, "int8"))
    assert handle.num_bytes > 1_000_000 and len(pickle.dumps(handle)) < 2_000
    assert os.environ["JAX_PLATFORMS"] == "cpu"


# ---------------------------------------------------------------- layer streaming


def streamed_tokens(pre, dec, reqs, transport, default_compression, log=None, logprobs: dict | None = None):
    """Prefill with layer streaming into a decode engine in this process: `emit` is a direct
    call of the receiver. -> tokens per request (`logprobs`, when given, receives each one's
    logprob); checks both pools end empty."""
    prefill, decode = PrefillEngine(pre), DecodeEngine(dec)
    receiver = StreamingReceiver(decode, transport, timeout_s=10)

    def emit(part):
        if log is not None:
            log.append(("part", part.request_id, part.lo, part.hi, part.handle.compression))
        receiver.on_part(part)

    sender = StreamingSender(prefill, transport, emit, default_compression)
    if log is not None:  # note each layer-group callback, to check the order of events
        on_layers = sender._on_layers
        sender._on_layers = lambda lo, hi, pieces: (log.append(("layers", lo, hi)), on_layers(lo, hi, pieces))
    by_id = {r.request_id: r for r in reqs}
    out = {r.request_id: [] for r in reqs}
    for r in reqs:
        sender.add(r)
    lps = logprobs if logprobs is not None else {}
    while prefill.num_pending:
        for po in sender.step():
            o = receiver.insert(by_id[po.request_id], po)
            out[o.request_id].append(o.token_id)
            lps.setdefault(o.request_id, []).append(o.logprob)
            sender.release(po.request_id)
    while decode.num_running:
        for o in decode.decode_step():
            out[o.request_id].append(o.token_id)
            lps.setdefault(o.request_id, []).append(o.logprob)
    assert receiver.num_streams == 0 and transport.num_pending == 0
    for r in (pre, dec):
        r.allocator.check()
        assert r.allocator.num_used == 0
    return out


@pytest.mark.parametrize("transport", sorted(BACKENDS), indirect=True)
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_streamed_greedy_equals_colocated(model, transport, compression):
    # 100 tokens span two chunks (largest bucket 64): streamed in the last one, all pages.
    prompts = prompts_of((1, 16, 37, 100), seed=1)
    reqs = [Request(str(i), p, greedy(8)) for i, p in enumerate(prompts)]
    want = colocated_tokens(model, reqs)
    log, logprobs = [], {}
    got = streamed_tokens(runner_for(model, layer_groups=2), runner_for(model), reqs, transport,
                          compression, log, logprobs)
    assert_equal_or_int8_within_tolerance(model, reqs, got, want, logprobs, compression)
    # Group 0 of every request is written on the decode side before the last group's callback
    # (the one that runs after the last layers are dispatched).
    for rid in want:
        first = log.index(("part", rid, 0, 1, compression))
        last_cb = max(i for i, e in enumerate(log[:log.index(("part", rid, 1, 2, compression))])
                      if e[0] == "layers")
        assert log[last_cb] == ("layers", 1, 2) and first < last_cb


@pytest.mark.integration  # compiles sharded (TP) programs: seconds of CPU each
def test_streamed_mixed_per_request_compression_and_tp(model):
    prompts = prompts_of((5, 30, 70), seed=3)
    reqs = [Request("a", prompts[0], greedy(6), kv_compression="none"),
            Request("b", prompts[1], greedy(6)),  # the deployment default
            Request("c", prompts[2], greedy(6), kv_compression="int8")]
    want = colocated_tokens(model, reqs)
    log, logprobs = [], {}
    got = streamed_tokens(runner_for(model, layer_groups=2, tp=2), runner_for(model, tp=4), reqs,
                          make_transport("inproc"), "none", log, logprobs)
    assert {rid: got[rid] for rid in ("a", "b")} == {rid: want[rid] for rid in ("a", "b")}  # uncompressed: exact
    assert_equal_or_int8_within_tolerance(model, reqs[2:], got, want, logprobs, "int8")  # "c": INT8
    sent = {e[1]: e[4] for e in log if e[0] == "part"}
    assert sent == {"a": "none", "b": "none", "c": "int8"}


def test_kv_compression_is_validated():
    with pytest.raises(ValueError, match=r"kv_compression must be one of \('int8', 'none'\)"):
        Request("x", [1, 2], kv_compression="fp8")
    import raypd

    for call in (raypd.generate, raypd.stream):  # checked before any model is loaded
        with pytest.raises(ValueError, match="kv_compression"):
            call("hi", kv_compression="INT8")


def test_streamed_part_that_does_not_fit_frees_only_its_pages(model):
    pre, dec = runner_for(model, layer_groups=2), runner_for(model)
    transport = make_transport("inproc")
    parts = []
    sender = StreamingSender(PrefillEngine(pre), transport, parts.append)
    sender.add(Request("a", prompts_of([40])[0], greedy(4)))
    (po,) = sender.step()
    receiver = StreamingReceiver(DecodeEngine(dec), transport)
    held = dec.allocator.allocate(3)
    before = pool_bytes(dec.cache, held)
    assert receiver.on_part(parts[0]) is False
    bad = dataclasses.replace(parts[1], num_tokens=41)
    with pytest.raises(ValueError, match="41"):
        receiver.on_part(bad)
    assert receiver.num_streams == 0 and dec.allocator.num_used == 3
    assert pool_bytes(dec.cache, held) == before
    with pytest.raises(ValueError, match="incomplete"):
        receiver.insert(Request("a", [1]), po)
    sender.release("a")
    assert transport.num_pending == 0 and pre.allocator.num_used == 0


def _receiver_actor(ray):
    @ray.remote(num_cpus=0)
    class Receiver:
        """A decode engine behind a StreamingReceiver, in its own process."""

        def __init__(self, kind, cfg, engine):
            import models
            from models.llama import init_params
            from raypd.engine.decode import DecodeEngine
            from raypd.engine.runner import ModelRunner
            from raypd.transfer import StreamingReceiver, make_transport

            model = models.Model(cfg, init_params(cfg, seed=1, std=0.1), None, "test")
            self.decode = DecodeEngine(ModelRunner(model, engine))
            self.receiver = StreamingReceiver(self.decode, make_transport(kind), timeout_s=20)

        def on_part(self, part):
            return self.receiver.on_part(part)

        def run(self, requests, outs):
            got = {r.request_id: [self.receiver.insert(r, o).token_id] for r, o in zip(requests, outs)}
            while self.decode.num_running:
                for o in self.decode.decode_step():
                    got[o.request_id].append(o.token_id)
            return got, self.decode.allocator.num_used

    return Receiver


@pytest.mark.parametrize("kind", ["ray_object_store", "jax_transfer"])
def test_streamed_into_another_process_equals_colocated(ray_session, model, kind):
    """Uncompressed: equal to colocated. INT8 is lossy (here it flips a near-tie of this random
    model at the third token), so its reference is the same-process, non-streamed INT8 path:
    layer groups must not change what arrives."""
    ray = ray_session
    p20, p100 = prompts_of((20, 100), seed=5)
    reqs = [Request("a", p20, greedy(8), kv_compression="none"),
            Request("b", p100, greedy(8), kv_compression="none"),
            Request("c", p100, greedy(8), kv_compression="int8")]
    want = colocated_tokens(model, reqs[:2])
    want.update(disaggregated_tokens(runner_for(model), runner_for(model), reqs[2:], make_transport("inproc"),
                                     "int8"))
    receiver = _receiver_actor(ray).remote(kind, CFG, ENGINE)
    transport = make_transport(kind)
    refs = []
    sender = StreamingSender(PrefillEngine(runner_for(model, layer_groups=2)), transport,
                             lambda part: refs.append(receiver.on_part.remote(part)))
    for r in reqs:
        sender.add(r)
    outs = []
    while sender.prefill.num_pending:
        outs.extend(sender.step())
    assert sum(ray.get(refs, timeout=60)) == len(reqs)  # one part per request completes it
    by_id = {r.request_id: r for r in reqs}
    got, used = ray.get(receiver.run.remote([by_id[o.request_id] for o in outs], outs), timeout=60)
    assert got == want and used == 0
    for o in outs:
        sender.release(o.request_id)
    assert transport.num_pending == 0
    ray.kill(receiver)
