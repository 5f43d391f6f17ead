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
    assert type(sim.core) is core.SchedulerCore  # the production state machine, not a subclass or a model of it
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


def test_host_costs_delay_delivery_and_every_iteration_by_hand():
    """delivery_s: every token reaches the client that much later (TTFT and E2E move, TPOT not);
    iteration_overhead_s: each decode iteration takes that much longer."""
    import dataclasses

    D, O = 0.005, 0.003
    slow = dataclasses.replace(profile(transfer_s=T), delivery_s=D, iteration_overhead_s=O)
    sim = Simulator(slow, num_prefill=1, num_decode=1, policy=PolicyConfig(local_prefill_max_len=0))
    (a,) = sim.run([SimRequest(0.0, tuple(range(8)), 3)])
    first = P + T + O  # the receiving iteration costs its overhead too
    assert a.token_s == pytest.approx([first + D, first + S + O + D, first + 2 * (S + O) + D])
    assert a.end_s == pytest.approx(a.token_s[-1])


def test_a_prefill_pool_of_its_own_profile_by_hand():
    """Pools of different TP degrees: prefill costs come from the prefill pool's profile, decode
    steps from the decode pool's, in the workers and in the scheduler's one cost model."""
    import dataclasses

    fast = dataclasses.replace(profile(transfer_s=T), cost=CostModel((P / 2, 0.0, 0.0), (9.0, 0.0, 0.0), T, 1e30, 1),
                               tp=2)
    sim = Simulator(profile(transfer_s=T), num_prefill=1, num_decode=1, policy=PolicyConfig(local_prefill_max_len=0),
                    prefill_profile=fast)
    (a,) = sim.run([SimRequest(0.0, tuple(range(8)), 3)])
    assert a.token_s == pytest.approx([P / 2 + T, P / 2 + T + S, P / 2 + T + 2 * S])
    assert sim.core.cost.prefill_coefs == (P / 2, 0.0, 0.0) and sim.core.cost.decode_coefs == (S, 0.0, 0.0)
    with pytest.raises(ValueError, match="page size"):
        Simulator(profile(), 1, 1, prefill_profile=dataclasses.replace(fast, page_size=8))


def test_rejections_are_results_too():
    sim = Simulator(profile(), num_prefill=0, num_decode=1, policy=PolicyConfig(local_prefill_max_len=512))
    out = sim.run([SimRequest(0.0, tuple(range(8)), 3)] * 3, ttft_slo_s=0.15)
    assert [r.status for r in out].count("rejected") >= 1


def test_multi_step_windows_change_no_time():
    """Idle stretches of decode steps run as one event (cut short when new work arrives): every
    token's time equals the step-by-step simulation's, under load, with both kinds of prefill."""
    import numpy as np

    rng = np.random.default_rng(0)
    cost = CostModel((0.002, 1e-5, 1e-9), (0.004, 2e-4, 1e-7), 0.001, 1e8, 64)
    prof = WorkerProfile(cost, num_pages=2048, page_size=4, max_slots=8, max_seq_len=512, prefill_chunk_len=32,
                         iteration_overhead_s=0.0005)
    reqs = [SimRequest(float(t), tuple(rng.integers(0, 100, int(n))), int(m))
            for t, n, m in zip(np.cumsum(rng.exponential(0.02, 60)), rng.integers(4, 200, 60),
                               rng.integers(1, 40, 60))]
    for prefill, local in ((0, 512), (1, 64)):
        runs = [Simulator(prof, prefill, 2, PolicyConfig(local_prefill_max_len=local), multi_step=m).run(reqs)
                for m in (False, True)]
        key = lambda r: (r.arrival_s, r.prompt_len)  # noqa: E731
        a, b = (sorted(run, key=key) for run in runs)
        for x, y in zip(a, b):
            assert len(x.token_s) == len(y.token_s) == x.max_tokens
            assert x.token_s == pytest.approx(y.token_s, abs=1e-9)
