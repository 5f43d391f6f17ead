"""The prefill worker packs the jobs of one call into shared engine chunks.

Guards against: packing that changes a prompt's first token, logprob or K/V (a segment mask
or position mix-up between packed prompts); a worker that still runs its jobs one engine call
each; one bad job failing the jobs packed with it; and pages leaking on either path.
"""

from __future__ import annotations

import numpy as np
import pytest

from raypd.engine.api import Request, SamplingParams
from raypd.engine.runner import EngineConfig
from raypd.runtime.engines import JaxEngineFactory
from raypd.runtime.workers import PrefillJob, PrefillWorker
from raypd.transfer import make_transport

ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=8, max_seq_len=256, prefill_buckets=(16, 32, 64))
LENGTHS = (1, 7, 16, 17, 5, 33, 80, 3)  # under a page, a page, page + 1, over the largest bucket


def make_requests(lengths=LENGTHS, seed=0) -> list[Request]:
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    return [Request(f"r{i}", rng.integers(3, 500, size=n).tolist(), params) for i, n in enumerate(lengths)]


class Counting:
    """Counts the engine programs a runner runs (each `run` is one chunk through the model)."""

    def __init__(self, runner):
        self.num_runs, self._run = 0, runner.run

        def run(*a, **kw):
            self.num_runs += 1
            return self._run(*a, **kw)

        runner.run = run


def worker():
    transport = make_transport("inproc")
    pw = PrefillWorker("p", JaxEngineFactory("tiny-random", ENGINE), lambda: transport)
    return pw, transport, Counting(pw.engines.prefill.runner)


def collect(pw, transport, results) -> list[tuple]:
    """(first token, logprob, prompt_len, K, V) of each result; then every transfer and
    retained page is let go, and the pool must be empty."""
    out = []
    for res in results:
        enc = transport.recv(res.handle, 10.0)
        o = res.output
        out.append((o.first_token, o.first_logprob, o.prompt_len, np.asarray(enc.k), np.asarray(enc.v)))
    pw.release_transfers([r.handle for r in results])
    pw.free_pages([p for r in results for p in r.cached_pages])
    assert pw.status()["used_pages"] == [0] and transport.num_pending == 0
    return out


def assert_same(got, want):
    for (t, lp, n, k, v), (t0, lp0, n0, k0, v0) in zip(got, want, strict=True):
        assert (t, n) == (t0, n0)
        assert lp == pytest.approx(lp0, abs=1e-5)
        np.testing.assert_allclose(k, k0, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v, v0, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def one_at_a_time():
    pw, transport, counter = worker()
    results = [pw.prefill([PrefillJob(r)])[0][0] for r in make_requests()]
    assert counter.num_runs >= len(LENGTHS)
    return collect(pw, transport, results)


def test_packed_equals_one_at_a_time_in_fewer_engine_calls(one_at_a_time):
    pw, transport, counter = worker()
    results, num_free = pw.prefill([PrefillJob(r) for r in make_requests()])
    # 162 tokens in chunks of at most 64: far fewer programs than one (or two) per job
    assert counter.num_runs <= 5, counter.num_runs
    assert all(r.num_computed_tokens == n for r, n in zip(results, LENGTHS))
    assert sum(r.prefill_s for r in results) > 0
    assert_same(collect(pw, transport, results), one_at_a_time)


def test_a_bad_job_fails_alone(one_at_a_time):
    """A prompt over max_seq_len makes the packed call raise; the jobs run again one at a time:
    that job gets its ValueError, the others their usual results, nothing leaks."""
    pw, transport, _ = worker()
    reqs = make_requests()
    bad = Request("bad", [5] * (ENGINE.max_seq_len + 1), reqs[0].params)
    results, _ = pw.prefill([PrefillJob(r) for r in reqs[:3]] + [PrefillJob(bad)] + [PrefillJob(r) for r in reqs[3:]])
    assert isinstance(results[3], ValueError) and "max_seq_len" in str(results[3])
    assert_same(collect(pw, transport, results[:3] + results[4:]), one_at_a_time)


def test_packing_out_of_pages_falls_back_to_one_at_a_time():
    """Packing holds every job's pages at once: when the pool is too small for that, the jobs
    still all finish, one at a time (the old behaviour), with the same results."""
    small = EngineConfig(page_size=16, num_pages=12, max_slots=8, max_seq_len=256, prefill_buckets=(16, 32, 64))
    transport = make_transport("inproc")
    pw = PrefillWorker("p", JaxEngineFactory("tiny-random", small), lambda: transport)
    reqs = make_requests((80, 80, 80))  # 5 pages each: 15 > the 11 usable pages
    results, _ = pw.prefill([PrefillJob(r, retain=False) for r in reqs])
    assert all(not isinstance(r, Exception) for r in results), results
    got = collect(pw, transport, results)
    pw2 = PrefillWorker("p2", JaxEngineFactory("tiny-random", small), lambda: transport)
    want = collect(pw2, transport, [pw2.prefill([PrefillJob(r, retain=False)])[0][0] for r in reqs])
    assert_same(got, want)
