"""Aborts through a Ray deployment (issue: reliability, items 1 and 2).

Guards against: a deployment that wedges after clients abort requests while their prefill
runs on a prefill worker (each abort leaked the decode worker's slot and page reservation,
so after as many aborts as slots nothing was ever placed again while health said SERVING),
and capacity that shrinks after aborts in other phases. After aborts in every phase the
scheduler must hold nothing, the workers no page or slot, and a full batch must run.

Every phase is reached by an explicit signal with a timeout, never by a delay: a worker held at
a gate (`Gate`: the mock engines announce their arrival and wait for the test to open it), a
request's first poll entry (the deployment's token poller), the scheduler reporting itself
idle (`Deployment.wait_idle`, woken by its events).
"""

from __future__ import annotations

import queue

import raypd
from raypd.engine.api import SamplingParams
from raypd.runtime.engines import MockEngineFactory
from scheduler import PolicyConfig
from tests.test_runtime import _small, assert_baseline, ray_session  # noqa: F401 - fixture
from tests.test_runtime_failover import Gate, _in_background

SLOTS = 4
TIMEOUT_S = 60.0


def _serve(name: str, **factory_kw):
    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, num_pages=128,
                                max_slots=SLOTS, **factory_kw)
    return raypd.serve(name=name, factory=factory, calibrate=False, num_prefill=1, num_decode=1,
                       policy=PolicyConfig(local_prefill_max_len=0),
                       prefill_resources=_small(), decode_resources=_small())


def _expected(prompt: list[int], max_tokens: int) -> list[int]:
    """Prefilled on the prefill worker (2s), decoded (3s); s: the sum of the tokens so far."""
    return MockEngineFactory(prefill_weight=2, decode_weight=3).expected(prompt, max_tokens)


def _generate(d, prompts, max_tokens: int):
    """`d.generate` in a thread, joined with a timeout (a wedged deployment fails, not hangs)."""
    thread, result = _in_background(lambda: d.generate(prompts, max_tokens=max_tokens))
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"{len(prompts)} requests did not finish within {TIMEOUT_S} s: {d.status()}"
    assert "error" not in result, result.get("error")
    return result["value"]


def test_aborts_during_remote_prefill_do_not_wedge_the_deployment(ray_session, tmp_path):  # noqa: F811
    gate = Gate(tmp_path, "send")
    d = _serve("aborts-prefill", send_gate=str(gate))
    try:
        # 3 x SLOTS requests, all aborted while the prefill worker holds its first K/V at the
        # gate: each is queued or prefilling remotely when its abort arrives
        ids = d.submit([[10 + i, 20, 30, 40, 50] for i in range(3 * SLOTS)], SamplingParams(max_tokens=8))
        gate.wait_arrivals(1)
        d.abort(ids)
        gate.open()
        d.wait_idle(TIMEOUT_S)  # every prefill call returned and released what it held
        (c,) = _generate(d, [[7, 8, 9, 10, 11]], 4)
        assert c.token_ids == [90, 405, 620, 480]  # s = 45: 2s, then 3s (s: the sum so far)
        assert_baseline(d)
    finally:
        d.shutdown()


def test_capacity_is_whole_after_aborts_in_every_phase(ray_session, tmp_path):  # noqa: F811
    gate = Gate(tmp_path, "step")
    d = _serve("aborts-phases", step_gate=str(gate), step_gate_after=0)  # every decode step waits for the gate
    try:
        prompts = [[10 + i, 20, 30, 40, 50] for i in range(SLOTS)]
        params = SamplingParams(max_tokens=40)
        # decoding: a request has its first token and the decode loop is held inside a step
        ids = d.submit(prompts, params)
        first = queue.SimpleQueue()
        for rid in ids:
            d.poller.add(rid, first)
        rid, entry = first.get(timeout=TIMEOUT_S)
        assert entry["tokens"] and not entry["finished"], entry
        gate.wait_arrivals(1)
        for rid in ids:
            d.poller.drop(rid)
        d.abort(ids)
        gate.open()  # from here on decode steps run freely
        # queued / prefilling: abort at once
        d.abort(d.submit(prompts * 2, params))
        # streams closed after the first token
        for p in prompts:
            it = d.stream(p, max_tokens=40)
            next(it)
            it.close()
        d.wait_idle(TIMEOUT_S)  # no reservation, prefill call or transfer left in the scheduler
        assert_baseline(d)  # no page used and nothing running on any worker
        out = _generate(d, prompts, 12)  # a full batch
        assert [c.token_ids for c in out] == [_expected(p, 12) for p in prompts]
        assert_baseline(d)
    finally:
        d.shutdown()
