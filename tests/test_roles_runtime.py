"""Moving workers between roles on a running deployment, and what the planner's tools need of it
(raypd/runtime/scheduler_actor.py `set_roles`, `recalibrate`). Mock engines held at a gate
(tests/test_runtime_failover.py `Gate`) put a move in a known phase, with no timing guess.

Guards against: a prefill worker that moves to decode while prefills are under way on it
dropping or corrupting them (the decode-to-prefill move under load is
tests/test_runtime_failover.py `test_roles_move_under_load_without_losing_a_request`); pages
leaking after a move; a deployment whose scheduler is not the state machine the simulator runs
(then simulated answers say nothing about it); a recalibration that the scheduler does not use.
"""

from __future__ import annotations

import dataclasses

import raypd
from raypd.engine.arithmetic import expected_tokens
from raypd.runtime.engines import MockEngineFactory
from scheduler import PolicyConfig, core
from scheduler.simulator import Simulator
from tests.test_runtime import _small, assert_baseline, ray_session  # noqa: F401 - fixture
from tests.test_runtime_failover import V, Gate, _in_background, _serve


def test_a_prefill_worker_moves_to_decode_under_load_without_losing_a_request(ray_session, tmp_path):  # noqa: F811
    """2 prefill + 1 decode -> 1 + 2 while both prefill workers hold a prefill (at the gate before
    sending its K/V): the moving one finishes and hands over what it holds, is retired, and
    decode-1 starts in its place; every request completes with exact arithmetic (prefilled with
    weight 2, decoded with 3) and every pool is empty after."""
    gate = Gate(tmp_path, "send")
    d = _serve("roles-p2d", num_prefill=2, num_decode=1, send_gate=str(gate))
    try:
        prompts = [[10 + i, 20, 30, 40, 50] for i in range(8)]
        thread, result = _in_background(lambda: d.generate(prompts, max_tokens=12))
        gate.wait_arrivals(2)  # both prefill workers are mid-prefill
        s = d.set_roles(1, 2, wait_s=None)
        assert list(s["draining_workers"].values()) == ["decode"], s["draining_workers"]
        gate.open()
        thread.join(60)
        assert not thread.is_alive() and "error" not in result, result.get("error")
        assert [c.token_ids for c in result["value"]] == [expected_tokens(p, 12, 2, 3, V) for p in prompts]
        s = d.set_roles(1, 2, wait_s=120)
        assert len(s["prefill"]) == 1 and sorted(w["worker_id"] for w in s["decode"]) == ["decode-0", "decode-1"]
        assert len(s["retired_workers"]) == 1 and not s["dead_workers"]
        again = d.generate(prompts, max_tokens=3)  # 8 requests, 4 slots per decode worker: both serve
        assert {c.metrics["decode_worker"] for c in again} == {"decode-0", "decode-1"}
        assert [c.token_ids for c in again] == [expected_tokens(p, 3, 2, 3, V) for p in prompts]
        assert_baseline(d)
    finally:
        d.shutdown()


def test_the_deployment_runs_the_simulators_scheduler_core_and_uses_a_recalibration(ray_session):  # noqa: F811
    """The scheduler actor's state machine is exactly `scheduler.core.SchedulerCore`, the class the
    simulator runs (not a subclass or a model of it); `Deployment.calibrate` refits the cost model
    and the core places with the new one."""
    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, num_pages=128)  # calibration: 256 tokens
    d = raypd.serve(name="roles-core", factory=factory, calibrate=False, local_prefill_stall_s=None,
                    policy=PolicyConfig(local_prefill_max_len=0), prefill_resources=_small(),
                    decode_resources=_small())
    try:
        kind = d._call("__ray_call__", lambda self: type(self.core))  # noqa: SLF001 - the actor's own object
        sim = Simulator(_profile(), 1, 1, PolicyConfig(local_prefill_max_len=0))
        assert kind is core.SchedulerCore and type(sim.core) is core.SchedulerCore
        assert d.status()["calibration"] == {}
        cal = d.calibrate()
        assert set(cal["cost"]) >= {"prefill_coefs", "decode_coefs", "transfer_latency_s", "transfer_bytes_per_s"}
        assert len(cal["prefill"]) >= 3 and all(s > 0 for *_, s in cal["prefill"])
        used = d._call("__ray_call__", lambda self: dataclasses.asdict(self.core.cost))  # noqa: SLF001
        assert used == cal["cost"] and d.status()["calibration"]["cost"] == cal["cost"]
        assert [c.token_ids for c in d.generate([[1, 2, 3]], max_tokens=3)] == [expected_tokens([1, 2, 3], 3, 2, 3, V)]
        assert_baseline(d)
    finally:
        d.shutdown()


def _profile():
    from scheduler import CostModel
    from scheduler.simulator import WorkerProfile

    return WorkerProfile(CostModel((0.01, 0.0, 0.0), (0.01, 0.0, 0.0), 0.0, 1e30, 1), num_pages=64, page_size=4,
                         max_slots=4, max_seq_len=512)
