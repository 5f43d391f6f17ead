"""The Ray runtime (raypd/runtime): workers, the scheduler actor, the client, on one node.

Guards against: a K/V handoff between workers that changes greedy output (disaggregated must
equal colocated and the local backend, for prompts of 1 token, under a page, exactly a page,
a page + 1 and over the largest prefill bucket); a phase run on the wrong worker (mock engines
with different weights); a prefix "hit" that recomputes or changes output; conditional
disaggregation and early rejection not doing what the policy says; and pages, slots or index
entries leaking (checked after every test).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.api import Request, SamplingParams
from raypd.engine.runner import EngineConfig
from raypd.runtime import errors
from raypd.runtime.engines import JaxEngineFactory, MockEngineFactory
from raypd.runtime.decode_worker import DecodeWorker
from raypd.runtime.workers import PrefillJob, PrefillWorker
from raypd.transfer import make_transport
from scheduler import PolicyConfig

ROOT = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=8, max_seq_len=256, prefill_buckets=(16, 32, 64))
LENGTHS = (1, 7, 16, 17, 33, 80)  # 1 token, < 1 page, 1 page, page + 1, 2 pages + 1, > largest bucket
ALL_LENGTHS = LENGTHS * 5 + (2, 48)  # 32 prompts: more than the decode slots, so some wait
MAX_TOKENS = 8


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of the local (colocated) backend for `prompts()`."""
    backend = LocalBackend(models.load("tiny-random"), ENGINE)
    out = raypd.generate(prompts(ALL_LENGTHS), model=backend, max_tokens=MAX_TOKENS, ignore_eos=True,
                         backend="local")
    return [c.token_ids for c in out]


# ---------------------------------------------------------------- workers, no Ray


INT8_LOGPROB_TOL = 0.01  # nats: INT8 K/V (per-row scales) moves a token's logprob by ~1e-3 on tiny-random


def teacher_forced_logprobs(model, prompt: list[int], token_ids: list[int]) -> np.ndarray:
    """Full-precision logprob of each generated token given everything before it (no cache)."""
    logits = model.logits(prompt + token_ids[:-1]).astype(np.float64)[len(prompt) - 1:]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return logp[np.arange(len(token_ids)), token_ids]


def assert_int8_within_tolerance(prompts_: list[list[int]], token_ids: list[list[int]], logprobs: list[list[float]]):
    """INT8 K/V is lossy, so its greedy tokens may differ from the exact run; what must hold is
    that along its own tokens, every logprob is within INT8_LOGPROB_TOL of the full-precision
    model's (a broken codec or a misplaced page moves them by far more)."""
    model = models.load("tiny-random")
    worst = max(float(np.max(np.abs(np.asarray(lp) - teacher_forced_logprobs(model, p, t))))
                for p, t, lp in zip(prompts_, token_ids, logprobs))
    assert worst <= INT8_LOGPROB_TOL, f"INT8 K/V moved a logprob by {worst:.4f} nats"
    return worst


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_workers_in_process_equal_local_backend(reference, compression, record_property):
    """Plain worker classes (no Ray): prefill worker -> inproc transport -> decode loop.
    Exact with compression off; with INT8 K/V every logprob along its own tokens is within a
    stated tolerance of the full-precision model's (assert_int8_within_tolerance)."""
    transport = make_transport("inproc")
    factory = JaxEngineFactory("tiny-random", ENGINE, compression)
    pw = PrefillWorker("p", factory, lambda: transport)
    dw = DecodeWorker("d", factory, lambda: transport, start=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=True)
    reqs = [Request(f"r{i}", p, params) for i, p in enumerate(prompts(ALL_LENGTHS)[:len(LENGTHS)])]
    results, _ = pw.prefill([PrefillJob(r) for r in reqs[1:]])
    assert max(len(pickle.dumps(r)) for r in results) < 2048  # small wire format: never K/V
    dw.submit([(r, res.output, res.handle) for r, res in zip(reqs[1:], results)])
    dw.submit_local([PrefillJob(reqs[0])])  # the 1-token prompt prefills on the decode worker
    tokens = {r.request_id: [] for r in reqs}
    logprobs = {r.request_id: [] for r in reqs}
    finished = []  # (rid, token ids, pages): finished requests' full pages, retained for the index
    while dw.run_once():
        report = dw.collect(0)
        finished += report.finished
        for rid, toks in report.tokens.items():
            tokens[rid].extend(t.token_id for t in toks)
            logprobs[rid].extend(t.logprob for t in toks)
    got, want = [tokens[r.request_id] for r in reqs], reference[:len(reqs)]
    if compression == "none":
        assert got == want
    else:
        worst = assert_int8_within_tolerance([r.prompt_ids for r in reqs], got, [logprobs[r.request_id] for r in reqs])
        record_property("int8_max_logprob_error", worst)
    pw.release_transfers([res.handle for res in results])
    # retained full prompt pages (for the KV index) are all that is left; free them
    pw.free_pages([p for res in results for p in res.cached_pages])
    G = ENGINE.page_size  # prompt + generated tokens with K/V (all but the last token), full pages
    assert {rid: toks for rid, toks, _ in finished} == {
        r.request_id: (r.prompt_ids + tokens[r.request_id])[:(len(r.prompt_ids) + MAX_TOKENS - 1) // G * G]
        for r in reqs if (len(r.prompt_ids) + MAX_TOKENS - 1) // G}
    dw.free_pages([p for _, _, pages in finished for p in pages])
    dw.run_once()
    assert pw.status()["used_pages"] == [0] and dw.status()["used_pages"] == [0]
    assert pw.status()["num_pending_transfers"] == 0 and transport.num_pending == 0


# ---------------------------------------------------------------- Ray deployments


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="raypd-tests",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    yield ray
    ray.shutdown()


def assert_baseline(d, timeout_s: float = 5.0):
    """Nothing running, queued or in flight; after dropping the cache, every pool empty.
    (Decode workers free pages from their loop thread, so allow it a moment.)"""
    d.clear_cache()
    deadline = time.monotonic() + timeout_s
    while True:
        s = d.status()
        used = [u for w in s["prefill"] + s["decode"] for u in w["used_pages"]]
        if not any(used) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert s["num_queued"] == 0 and s["num_tracked"] == 0 and s["index"]["num_entries"] == 0
    assert s["index"]["num_host_objects"] == 0
    assert s["index"]["used_bytes"] == 0
    for w in s["prefill"]:
        assert set(w["used_pages"]) == {0} and w["num_pending_transfers"] == 0, w
    for w in s["decode"]:
        assert set(w["used_pages"]) == {0} and w["num_running"] == 0, w


@pytest.fixture(scope="module")
def model_deployment(ray_session):
    d = raypd.serve("tiny-random", name="tiny", engine_config=ENGINE, calibrate=False,
                    policy=PolicyConfig(local_prefill_max_len=8), prefill_resources=_small(),
                    decode_resources=_small(), cache_bytes=16 * 8192)  # 16 pages: the index evicts
    yield d
    d.shutdown()


@pytest.fixture(scope="module")
def mock_deployment(ray_session):
    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, num_pages=16)
    d = raypd.serve(name="mock", factory=factory, calibrate=False, policy=PolicyConfig(local_prefill_max_len=4),
                    prefill_resources=_small(), decode_resources=_small(),
                    cache_bytes=10**6)  # never full: pool pressure alone evicts
    yield d
    d.shutdown()


def _small():
    from raypd.runtime.deployment import Resources

    return Resources(num_cpus=0.25)


def test_disaggregated_equals_colocated_and_local(model_deployment, reference):
    out = model_deployment.generate(prompts(ALL_LENGTHS), max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in out] == reference
    local = [c.metrics["is_local_prefill"] for c in out]
    assert local == [n <= 8 for n in ALL_LENGTHS]  # conditional disaggregation: short prompts stay local
    assert all(c.finish_reason == "length" for c in out)
    chunks = list(model_deployment.stream(prompts(ALL_LENGTHS)[5], max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [c.token_id for c in chunks] == reference[5]
    int8 = model_deployment.generate(prompts(ALL_LENGTHS)[2:6], max_tokens=MAX_TOKENS, ignore_eos=True,
                                     kv_compression="int8", logprobs=True)  # per request
    assert_int8_within_tolerance(prompts(ALL_LENGTHS)[2:6], [c.token_ids for c in int8], [c.logprobs for c in int8])
    assert_baseline(model_deployment)


def test_prefix_hit_skips_work_same_output(model_deployment):
    (p,) = prompts((70,), seed=1)
    first, second = (model_deployment.generate([p], max_tokens=MAX_TOKENS, ignore_eos=True)[0] for _ in range(2))
    assert first.metrics["num_computed_tokens"] == 70
    assert second.metrics["num_computed_tokens"] == 70 - 4 * 16  # 4 full pages reused, 6 computed
    assert second.token_ids == first.token_ids
    s = model_deployment.status()
    assert s["index"]["num_entries"] == 4 and s["index"]["hit_rate"] > 0
    assert_baseline(model_deployment)


def test_finished_requests_publish_their_pages_for_the_next_turn(model_deployment):
    """A finished request's full pages, generated tokens included, go to the KV index on its
    decode worker: a second turn (prompt + answer + 1 token) prefills there, on the decode
    worker itself, computing only what follows those pages, with the same greedy output."""
    (p,) = prompts((40,), seed=6)
    turn1 = model_deployment.generate([p], max_tokens=30, ignore_eos=True)[0]
    follow = p + turn1.token_ids + [5]  # 71 tokens; K/V of the first 69 exist, 4 full pages
    turn2 = model_deployment.generate([follow], max_tokens=MAX_TOKENS, ignore_eos=True)[0]
    assert turn2.metrics["is_local_prefill"] and turn2.metrics["num_computed_tokens"] == 71 - 4 * 16
    ref = raypd.generate([follow], model=LocalBackend(models.load("tiny-random"), ENGINE), max_tokens=MAX_TOKENS,
                         ignore_eos=True, backend="local")[0]
    assert turn2.token_ids == ref.token_ids
    assert_baseline(model_deployment)


def test_mock_weights_show_which_worker_ran_each_phase(mock_deployment):
    long, short = [10, 20, 30, 40, 50], [7, 8]
    a, b = mock_deployment.generate([long, short], max_tokens=4)
    # s = the sum of the tokens so far: prefill worker 2s, decode steps 3s (mod 1000)
    assert a.token_ids == [300, 350, 400, 600]
    assert not a.metrics["is_local_prefill"] and a.metrics["prefill_worker"] == "prefill-0"
    assert b.token_ids == [75, 270, 80, 320]  # prefilled on the decode worker itself (5s)
    assert b.metrics["is_local_prefill"] and b.metrics["decode_worker"] == "decode-0"
    assert_baseline(mock_deployment)


def test_cached_pages_evicted_when_a_pool_needs_room(mock_deployment):
    """15 usable pages of 4 tokens; each 20-token prompt leaves 5 cached pages on the prefill
    worker, so from the 4th on the scheduler must evict cached pages to make room."""
    ps = [[10 + i] * 20 for i in range(6)]
    for p in ps:  # one at a time, so each finds the pool as the previous one left it
        (c,) = mock_deployment.generate([p], max_tokens=2)
        assert c.token_ids == [(2 * sum(p)) % 1000, (3 * 3 * sum(p)) % 1000]
    s = mock_deployment.status()
    assert s["prefill"][0]["used_pages"] == [15]  # the pool holds the newest 15 pages ...
    assert s["index"]["num_entries"] == 30 and s["index"]["num_host_objects"] == 6  # ... host copies all 30
    assert_baseline(mock_deployment)


def test_stream_closed_early_aborts_cleanly(mock_deployment):
    it = mock_deployment.stream([10, 20, 30, 40, 50], max_tokens=40)
    assert next(it).token_id == 300
    it.close()  # the client aborts what is left; nothing may leak either way
    assert_baseline(mock_deployment)


def test_early_rejection_and_bad_input(mock_deployment):
    with pytest.raises(errors.RequestRejected) as e:
        mock_deployment.generate([[5] * 20], max_tokens=4, ttft_slo_s=1e-9)
    assert e.value.reason == "deadline" and e.value.retry_after_s > 0
    with pytest.raises(errors.RequestRejected) as e:  # 15 usable pages of 4 tokens: 80 can never fit
        mock_deployment.generate([[5] * 40], max_tokens=40)
    assert e.value.reason == "no_capacity"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mock_deployment.generate([[5, 5000]], max_tokens=2)
    with pytest.raises(ValueError, match="must not be empty"):
        mock_deployment.generate([[]], max_tokens=2)
    with pytest.raises(ValueError, match="max_tokens"):
        mock_deployment.generate([[5]], max_tokens=0)
    with pytest.raises(ValueError, match="kv_compression"):
        mock_deployment.generate([[5]], max_tokens=2, kv_compression="fp4")
    assert_baseline(mock_deployment)


def test_bad_deployment_settings_are_refused_before_anything_starts():
    from raypd.runtime.deployment import DeploymentConfig

    with pytest.raises(ValueError, match="host_copies must be"):
        DeploymentConfig(host_copies="fp4")
    with pytest.raises(ValueError, match="max_retries"):
        DeploymentConfig(max_retries=-1)


def test_connect_and_shutdown_errors(ray_session):
    with pytest.raises(errors.DeploymentNotFound, match="no raypd deployment named 'nope'"):
        raypd.connect("nope")
    d = raypd.serve(name="raypd", factory=MockEngineFactory(), num_prefill=0, calibrate=False,
                    decode_resources=_small(), policy=PolicyConfig(max_queued=2))
    other = raypd.connect()  # by the default name, as another driver would
    assert other.generate([[1, 2]], max_tokens=2)[0].token_ids == [3, 6]  # weights 1: s, then s
    for backend in ("ray", "auto"):  # auto: a deployment runs, so it is used
        (c,) = raypd.generate([[1, 2]], max_tokens=2, backend=backend)
        assert c.token_ids == [3, 6] and c.metrics["decode_worker"] == "decode-0"
    assert [c.token_id for c in raypd.stream([1, 2], max_tokens=2, backend="ray")] == [3, 6]
    driver = (  # another driver process on the same cluster attaches by name
        "import ray, raypd\n"
        f"ray.init(address={ray_session.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
        "print(raypd.connect('raypd').generate([[1, 2]], max_tokens=2)[0].token_ids)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("[3, 6]"), run.stderr[-2000:]
    with pytest.raises(errors.RequestRejected, match="queue is full") as e:  # bounded queue: 3 > 2
        other.generate([[1], [2], [3]], max_tokens=2)
    assert e.value.reason == "queue_full" and e.value.retry_after_s > 0
    with pytest.raises(ValueError, match="already running"):
        raypd.serve(name="raypd", factory=MockEngineFactory(), calibrate=False)
    d.shutdown()
    with pytest.raises(errors.DeploymentNotRunning):
        d.generate([[1, 2]], max_tokens=2)
    with pytest.raises(errors.DeploymentNotRunning):
        other.generate([[1, 2]], max_tokens=2)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_host_copies_give_prefix_reuse_across_workers(ray_session, compression):
    """The KV store's host tier: prefill-0 computes a prompt and exports its full pages to the
    object store; prefill-0 then dies, and the same prefix on prefill-1 is fetched from the host
    copy (only the tail is computed) with the same greedy output (exact with "none")."""
    import ray

    d = raypd.serve("tiny-random", name=f"host-{compression}", engine_config=ENGINE, calibrate=False,
                    num_prefill=2, policy=PolicyConfig(local_prefill_max_len=0), host_copies=compression,
                    prefill_resources=_small(), decode_resources=_small())
    try:
        (p,) = prompts((70,), seed=4)
        ref = raypd.generate([p], model=LocalBackend(models.load("tiny-random"), ENGINE), max_tokens=MAX_TOKENS,
                             ignore_eos=True, backend="local")[0].token_ids
        first = d.generate([p], max_tokens=MAX_TOKENS, ignore_eos=True)[0]
        assert first.metrics["prefill_worker"] == "prefill-0" and first.metrics["num_computed_tokens"] == 70
        deadline = time.monotonic() + 10
        while d.status()["index"]["num_host_objects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(d._actors[1])  # prefill-0: its pool is gone, the host copy is not
        second = d.generate([p], max_tokens=MAX_TOKENS, ignore_eos=True)[0]
        assert second.metrics["prefill_worker"] == "prefill-1"
        assert second.metrics["num_computed_tokens"] == 70 - 4 * 16  # 4 pages fetched, 6 tokens computed
        assert first.token_ids == ref
        if compression == "none":
            assert second.token_ids == ref
        else:
            print(f"INT8 host copy: {np.mean([a == b for a, b in zip(second.token_ids, ref)]):.0%} of tokens agree")
            assert second.token_ids[0] == ref[0]
        assert d.status()["index"]["host_copies"] == compression
        assert_baseline(d)
    finally:
        d.shutdown()


def test_layer_streaming_between_workers_equals_local(ray_session, reference):
    """`stream_layers`: the prefill worker sends each request's K/V to the decode worker one
    layer group at a time during the prefill; outputs equal the local backend's."""
    d = raypd.serve("tiny-random", name="streamed", engine_config=dataclasses.replace(ENGINE, layer_groups=2),
                    calibrate=False, policy=PolicyConfig(local_prefill_max_len=0), stream_layers=True,
                    prefill_resources=_small(), decode_resources=_small())
    try:
        out = d.generate(prompts(ALL_LENGTHS)[:12], max_tokens=MAX_TOKENS, ignore_eos=True)
        assert [c.token_ids for c in out] == reference[:12]
        assert all(not c.metrics["is_local_prefill"] for c in out)
        s = d.status()
        assert s["decode"][0]["num_streamed"] == 12  # every K/V arrived as layer parts
        (stats,) = s["transfer"]
        assert stats["count"] == 12 and stats["bytes"] > 0
        assert_baseline(d)
    finally:
        d.shutdown()
