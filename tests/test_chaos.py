"""The fault suite (scripts/chaos.py, raypd/chaos/) at CI size, on arithmetic mock engines.

Guards against: a decode worker's death losing or corrupting a stream, or its replacement
never joining; K/V lost on the way failing a request instead of prefilling it again (or
changing its output); aborts in any phase leaking pages, slots, pending transfers, index
entries or host objects, or shrinking capacity; refusals under overload that are slow, and
accepted requests that then miss their TTFT SLO (decode-bound). The full-size runs and their figures are in
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


def test_overload_burst_refuses_at_submit_and_keeps_the_slo(ray_session):  # noqa: F811
    """Decode-bound (the prefill-bound case still admits too much: docs/BENCHMARKS.md), slowed
    down 4x with a 2 s SLO so that a loaded CI machine's stalls stay small against it. The
    refusal latency is checked at its median and attainment at 80%, as floors that catch
    admitting everything (21% when prefill-bound) without flaking on a shared machine: the 50 ms
    budget at p99 and 90% attainment are the script's (`chaos.py overload`), which admission
    meets at 2x only just (90-93% measured), since it admits up to the SLO's edge."""
    r = overload.run(duration_s=4.0, ttft_slo_s=2.0, bottleneck="decode", delay_s=0.08)
    text = "\n".join(r.lines())
    assert r.num_rejected > 0 and r.num_accepted > 0, text  # at 2x, some must be refused at submit
    assert r.rejected_by.keys() <= {"deadline", "queue_full"}, text
    assert r.reject_latency["p50"] <= 0.05, text
    assert r.attainment >= 0.8 and not r.leaks, text
