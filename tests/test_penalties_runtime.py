"""Penalties, logit_bias, min_tokens and top logprobs across the prefill/decode boundary.

The prefill worker samples the first token (repetition over the prompt), the decode worker
continues from counts it builds from the request's prompt and that first token. Guards
against: a decode worker that starts its counts empty or without the first token, a first
token sampled without the penalties, top logprobs lost on the way (the first token's travels
in the PrefillOutput, the others in the token tuples), and a deployment whose seeded,
penalized output differs from the colocated engine's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.api import Request, SamplingParams
from raypd.engine.runner import EngineConfig
from raypd.runtime.decode_worker import DecodeWorker
from raypd.runtime.engines import JaxEngineFactory
from raypd.runtime.workers import PrefillJob, PrefillWorker
from raypd.transfer import make_transport
from scheduler import PolicyConfig

ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=128, prefill_buckets=(16, 32))
SAMPLING = [dict(frequency_penalty=1.5, top_logprobs=3),
            dict(repetition_penalty=1.8, presence_penalty=0.5, temperature=0.9, seed=7),
            dict(min_tokens=5, logit_bias={2: 30.0}, frequency_penalty=0.5, temperature=0.7, seed=3, top_logprobs=2)]


def prompts():
    rng = np.random.default_rng(3)
    base = rng.integers(3, 500, size=6).tolist()
    return [base * 3, rng.integers(3, 500, size=21).tolist(), base + base[:2]]


def params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=10, **SAMPLING[i])


@pytest.fixture(scope="module")
def colocated():
    """Tokens and top logprobs of the in-process colocated engine."""
    backend = LocalBackend(models.load("tiny-random"), ENGINE)
    out = []
    for i, p in enumerate(prompts()):
        (c,) = raypd.generate([p], model=backend, backend="local", max_tokens=10, **SAMPLING[i])
        out.append((c.token_ids, c.top_logprobs))
    return out


def test_workers_without_ray_equal_colocated(colocated):
    transport = make_transport("inproc")
    factory = JaxEngineFactory("tiny-random", ENGINE, "none")
    pw = PrefillWorker("p", factory, lambda: transport)
    dw = DecodeWorker("d", factory, lambda: transport, start=False)
    reqs = [Request(f"r{i}", p, params(i)) for i, p in enumerate(prompts())]
    results, _ = pw.prefill([PrefillJob(r) for r in reqs])
    dw.submit([(r, res.output, res.handle) for r, res in zip(reqs, results)])
    got = {r.request_id: [] for r in reqs}
    while dw.run_once():
        for rid, toks in dw.collect(0).tokens.items():
            got[rid].extend(toks)
    for i, r in enumerate(reqs):
        tokens, tops = colocated[i]
        assert [t.token_id for t in got[r.request_id]] == tokens, SAMPLING[i]
        if tops is not None:
            assert [t.top_logprobs for t in got[r.request_id]] == tops
    assert colocated[2][0][:5].count(2) == 0  # min_tokens held EOS off against its +30 bias
    pw.release_transfers([res.handle for res in results])
    pw.free_pages([p for res in results for p in res.cached_pages])


def test_ray_disaggregated_equals_colocated(colocated):
    import ray

    from raypd.runtime.deployment import Resources

    root = str(Path(__file__).resolve().parent.parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="raypd-tests",
             runtime_env={"env_vars": {"PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}})
    try:
        d = raypd.serve("tiny-random", name="penalties", engine_config=ENGINE, calibrate=False,
                        policy=PolicyConfig(local_prefill_max_len=0), prefill_resources=Resources(num_cpus=0.25),
                        decode_resources=Resources(num_cpus=0.25))
        try:
            for i, p in enumerate(prompts()):
                (c,) = d.generate([p], max_tokens=10, **SAMPLING[i])
                assert not c.metrics["is_local_prefill"]  # the first token came from the prefill worker
                assert (c.token_ids, c.top_logprobs) == colocated[i], SAMPLING[i]
        finally:
            d.shutdown()
    finally:
        ray.shutdown()
