"""The simulator (scheduler/simulator.py): the scheduler core on a virtual clock over modelled
workers. Guards against a simulator that drifts from the scheduler it claims to run (it must
be the same object), and against timing arithmetic that is off by an iteration: the two
scenarios below are worked out by hand from the module doc's loop."""

from __future__ import annotations

import pytest

from scheduler import CostModel, PolicyConfig
from scheduler import core
from scheduler.simulator import SimRequest, Simulator, WorkerProfile

P, S, T = 0.1, 0.01, 0.02  # prefill of any prompt, decode step of any batch, K/V receive


def profile(transfer_s: float = 0.0) -> WorkerProfile:
    # constant costs: prefill P whatever its length, step S whatever the batch, receive T
    cost = CostModel((P, 0.0, 0.0), (S, 0.0, 0.0), transfer_s, 1e30, 1)
    return WorkerProfile(cost, num_pages=256, page_size=4, max_slots=4, max_seq_len=512)


def test_colocated_two_requests_by_hand():
    sim = Simulator(profile(), num_prefill=0, num_decode=1, policy=PolicyConfig(local_prefill_max_len=512))
    assert isinstance(sim.core, core.SchedulerCore)  # the production state machine, not a model of it
    a, b = sim.run([SimRequest(0.0, tuple(range(8)), 3), SimRequest(0.05, tuple(range(10, 18)), 3)])
    # t=0: A prefills (P); t=0.1: A's first token, B prefills while A steps (P + S);
    # t=0.21: B's first token and A's second; then one step (S) each.
    assert a.token_s == pytest.approx([0.1, 0.21, 0.22])
    assert b.token_s == pytest.approx([0.21, 0.22, 0.23])
    assert a.placement["is_local_prefill"] and b.status == "ok"
    assert sim.core.is_idle() or not sim.core.requests


def test_disaggregated_one_request_by_hand():
    sim = Simulator(profile(transfer_s=T), num_prefill=1, num_decode=1, policy=PolicyConfig(local_prefill_max_len=0))
    (a,) = sim.run([SimRequest(0.0, tuple(range(8)), 3)])
    # prefill P on the prefill worker; the decode worker receives (T) in its loop, then steps
    assert a.token_s == pytest.approx([P + T, P + T + S, P + T + 2 * S])
    assert a.placement == dict(prefill_worker="prefill-0", decode_worker="decode-0", is_local_prefill=False)


def test_rejections_are_results_too():
    sim = Simulator(profile(), num_prefill=0, num_decode=1, policy=PolicyConfig(local_prefill_max_len=512))
    out = sim.run([SimRequest(0.0, tuple(range(8)), 3)] * 3, ttft_slo_s=0.15)
    assert [r.status for r in out].count("rejected") >= 1
