"""The fault suite (scripts/chaos.py, raypd/chaos/) at CI size, on arithmetic mock engines.

Guards against: a decode worker's death losing or corrupting a stream, or its replacement
never joining; K/V lost on the way failing a request instead of prefilling it again (or
changing its output); aborts in any phase leaking pages, slots, pending transfers, index
entries or host objects, or shrinking capacity; refusals under overload that are slow, and
accepted requests that then miss their TTFT SLO (decode- or prefill-bound); mock engines that
take more pages than the scheduler reserves. The full-size runs and their figures are in
docs/BENCHMARKS.md ("Reliability").
"""

from __future__ import annotations

import pytest

from raypd.chaos import aborts, common, kill_decode, overload, transfer_faults
from raypd.runtime.engines import FaultyEngineFactory, MockEngineFactory
from tests.test_runtime import ray_session  # noqa: F401 - fixture


def test_mock_chain_accepts_decode_steps_and_resumes_only():
    p = [10, 20, 30, 40, 50]  # s = 150: prefill 300; decode 3 * 450 = 1350; 3 * 800 = 2400 (mod 1000)
    assert common.expected(p, 3) == [300, 350, 400]
    assert common.mock_chain(p, [300, 350, 400]) == 0
    resumed = (2 * (150 + 300 + 350)) % 1000  # prompt + tokens so far prefilled again
    assert common.mock_chain(p, [300, 350, resumed, (3 * (800 + resumed)) % 1000]) == 1
    assert common.mock_chain(p, [300, 350, 401]) is None
    assert common.mock_chain(p, [301]) is None


def test_faulty_factory_loses_a_seeded_fraction_of_transfers():
    with pytest.raises(ValueError, match="fail_fraction"):
        FaultyEngineFactory(MockEngineFactory(), fail_fraction=1.5)
    from raypd.engine.api import Request
    from raypd.transfer import SenderLost

    def losses(seed):
        engines = FaultyEngineFactory(MockEngineFactory(), 0.25, seed).build("decode")
        lost = []
        for i in range(200):
            try:
                engines.recv_into(Request(f"r{i}", [1, 2]), None, None, None)
            except SenderLost:
                lost.append(i)
            except Exception:  # noqa: BLE001 - not lost: the mock then fails on the fake handle
                pass
        return lost, engines.fault_counter["faults"]

    lost, n = losses(0)
    assert 30 <= len(lost) <= 70 and n == len(lost)
    assert losses(0)[0] == lost and losses(1)[0] != lost  # the seed replays the same faults
    assert not hasattr(FaultyEngineFactory(MockEngineFactory(), 0.5).build("prefill"), "fault_counter")


def test_kill_decode_mid_stream(ray_session):  # noqa: F811
    r = kill_decode.run(num_requests=10, max_tokens=24)
    assert r.ok, "\n".join(r.lines())
    assert r.num_completed == 10 and r.num_replacements == 1 and r.num_resumed >= 1


def test_transfer_faults_are_retried_with_identical_output(ray_session):  # noqa: F811
    r = transfer_faults.run(num_requests=40, fail_fraction=0.1)
    assert r.ok, "\n".join(r.lines())
    assert r.num_faults >= 1 and r.num_completed == 40


def test_aborts_in_every_phase_leak_nothing(ray_session):  # noqa: F811
    r = aborts.run(per_phase=8)
    assert r.ok, "\n".join(r.lines())
    assert list(r.phases) == list(aborts.PHASES)


@pytest.mark.parametrize("bottleneck", overload.BOTTLENECKS)
def test_overload_burst_refuses_at_submit_and_keeps_the_slo(ray_session, bottleneck):  # noqa: F811
    """Decode-bound and prefill-bound (the latter used to admit 5x too much and refuse most of it
    later at placement, 21-33% attainment: docs/BENCHMARKS.md), slowed down 4x with a 2 s SLO so
    that a loaded CI machine's stalls stay small against it. The refusal latency is checked at
    its median and attainment at 80%, as floors that catch admitting everything without flaking
    on a shared machine: the 50 ms budget at p99 and 90% attainment are the script's
    (`chaos.py overload`)."""
    r = overload.run(duration_s=4.0, ttft_slo_s=2.0, bottleneck=bottleneck, delay_s=0.08)
    text = "\n".join(r.lines())
    assert r.num_rejected > 0 and r.num_accepted > 0, text  # at 2x, some must be refused at submit
    assert r.rejected_by.keys() <= {"deadline", "queue_full"}, text
    assert r.reject_latency["p50"] <= 0.05, text
    assert r.attainment >= 0.8 and not r.leaks, text


def test_mock_workers_use_the_pages_the_scheduler_reserves():
    """The mock engines take from a worker's pool what the scheduler reserves, as the JAX
    engines do. Guards against two mock defects that ran pools dry under the chaos scenarios:
    a prefill that ignored its cached prefix and took pages for the whole prompt again (a
    request resumed after a decode worker died, its prompt's pages cached on the prefill
    worker: `OutOfPages: asked for 12 pages, 5 free` in the soak), and a decode worker with two
    pools, where a local prefill's retained pages were invisible to the scheduler's count."""
    from raypd.engine.api import Request, SamplingParams
    from raypd.engine.pages import OutOfPages
    from raypd.runtime.messages import PrefillJob
    from raypd.runtime.workers import PrefillWorker
    from raypd.transfer import make_transport

    factory = MockEngineFactory(num_pages=32)
    engines = factory.build("decode")
    assert engines.decode.allocator is engines.prefill.allocator  # one pool per worker
    transport = make_transport("inproc")
    pw = PrefillWorker("p", factory, lambda: transport)
    G, pool = factory.page_size, pw.engines.prefill.allocator
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    (first,), _ = pw.prefill([PrefillJob(Request("turn-1", list(range(3, 3 + 8 * G)), params))])
    assert len(first.cached_pages) == 8  # retained for the store
    prefix = first.cached_pages[:7]  # what the store would hand out: (prompt_len - 1) // G pages
    resumed = Request("resumed", list(range(3, 3 + 8 * G)) + [5] * (4 * G), params)  # 12 pages, 7 cached
    filler = pool.allocate(pool.num_free - (12 - 7))  # the pool as full as the scheduler allows
    (res,), _ = pw.prefill([PrefillJob(resumed, prefix)])
    assert not isinstance(res, OutOfPages), res
    assert res.num_computed_tokens == 5 * G and len(res.cached_pages) == 12 - 7
    pw.release_transfers([first.handle, res.handle])
    pw.free_pages(first.cached_pages + res.cached_pages)
    pool.free(filler)
    assert pool.num_used == 0 and transport.num_pending == 0
