"""The rebalancer (scheduler/rebalancer.py): replays recent traffic through the simulator for
each split. Guards against one that never moves, moves on too little evidence, flaps, or
recommends the split that the traffic punishes."""

from __future__ import annotations

import pytest

from scheduler import CostModel, PolicyConfig
from scheduler.rebalancer import RebalanceConfig, Rebalancer
from scheduler.simulator import SimRequest, Simulator, WorkerProfile

COST = CostModel((0.005, 2e-4, 0.0), (0.01, 0.0004, 0.0), 0.001, 1e10, 1000)
WORKER = WorkerProfile(COST, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096, prefill_chunk_len=512)
POLICY = PolicyConfig(local_prefill_max_len=0)


def rebalancer(**kw) -> Rebalancer:
    return Rebalancer(RebalanceConfig(ttft_slo_s=2.0, tpot_slo_s=0.03, window_s=10, min_interval_s=5, **kw),
                      WORKER, POLICY)


def feed(rb: Rebalancer, rate: float, prompt_len: int, max_tokens: int, seconds: float, start_s: float = 0.0) -> float:
    t = start_s
    while t < start_s + seconds:
        rb.observe(t, prompt_len, max_tokens)
        t += 1 / rate
    return t


def test_long_prompts_want_prefill_workers_and_chat_wants_decode_workers():
    rb = rebalancer()
    now = feed(rb, 7.0, 2000, 40, 10)
    assert rb.recommend(now, 2, 2) == (3, 1), rb.last
    assert rb.recommend(now + 1, 3, 1) is None  # too soon after a move, and it is the best anyway
    rb = rebalancer()
    now = feed(rb, 16.0, 150, 250, 10)
    assert rb.recommend(now, 3, 1) in {(1, 3), (2, 2)}
    assert rb.last["3:1"] < rb.last["1:3"]


def test_no_opinion_without_evidence_or_gain():
    rb = rebalancer()
    assert rb.recommend(1.0, 2, 2) is None  # no traffic
    assert rb.recommend(feed(rb, 0.5, 200, 20, 10), 2, 2) is None and not rb.last  # too few requests
    now = feed(rb, 1.0, 200, 20, 10, start_s=10)  # a trickle: every split meets the SLOs
    assert rb.recommend(now, 2, 2) is None and set(rb.last.values()) == {1.0}


def test_bad_config():
    with pytest.raises(ValueError, match="SLO"):
        RebalanceConfig()
    with pytest.raises(ValueError, match="min_gain"):
        RebalanceConfig(ttft_slo_s=1.0, min_gain=2.0)


def test_the_simulator_moves_workers_when_the_workload_shifts():
    reqs, t = [], 0.0
    while t < 40:
        is_long = t < 20
        t += 1 / (5.0 if is_long else 12.0)
        reqs.append(SimRequest(t, tuple(range(7, 7 + (2000 if is_long else 150))), 40 if is_long else 200))
    rb = Rebalancer(RebalanceConfig(ttft_slo_s=2.0, tpot_slo_s=0.03, window_s=8, interval_s=2, min_interval_s=6),
                    WORKER, POLICY)
    sim = Simulator(WORKER, 1, 3, POLICY, prefix_cache=False, rebalancer=rb, worker_startup_s=1.0)
    out = sim.run(reqs)  # starts with too few prefill workers for the long prompts
    assert all(r.status == "ok" and len(r.token_s) == r.max_tokens for r in out)  # nothing dropped
    assert sim.moves and sim.moves[0][1][0] > 1, sim.moves  # more prefill workers, early
    assert sim.moves[0][0] < 20
    assert sim.core.is_idle() or not sim.core.requests
