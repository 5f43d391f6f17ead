"""Aborts through a Ray deployment (issue: reliability, items 1 and 2).

Guards against: a deployment that wedges after clients abort requests while their prefill
runs on a prefill worker (each abort leaked the decode worker's slot and page reservation,
so after as many aborts as slots nothing was ever placed again while health said SERVING),
and capacity that shrinks after aborts in other phases. After aborts in every phase the
deployment must run a full batch at full width and return to its baseline.
"""

from __future__ import annotations

import time

import raypd
from raypd.engine.api import SamplingParams
from raypd.runtime.engines import MockEngineFactory
from scheduler import PolicyConfig
from tests.test_runtime import _small, assert_baseline, ray_session  # noqa: F401 - fixture
from tests.test_runtime_failover import _in_background, _wait_for

SLOTS = 4


def _serve(name: str, **factory_kw):
    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, num_pages=128,
                                max_slots=SLOTS, **factory_kw)
    return raypd.serve(name=name, factory=factory, calibrate=False, num_prefill=1, num_decode=1,
                       policy=PolicyConfig(local_prefill_max_len=0),
                       prefill_resources=_small(), decode_resources=_small())


def _max_running_during(d, prompts, max_tokens: int) -> tuple[list, int]:
    """Generate `prompts` in the background; the most requests seen running at once."""
    thread, result = _in_background(lambda: d.generate(prompts, max_tokens=max_tokens))
    most = 0
    while thread.is_alive():
        most = max(most, sum(w["num_running"] for w in d.status()["decode"]))
        time.sleep(0.02)
    thread.join(60)
    assert "error" not in result, result.get("error")
    return result["value"], most


def test_aborts_during_remote_prefill_do_not_wedge_the_deployment(ray_session):  # noqa: F811
    d = _serve("aborts-prefill", prefill_delay_s=0.05)
    try:
        params = SamplingParams(max_tokens=8)
        for _ in range(3):  # 3 x 8 aborts, each while its prefill is queued or running remotely
            ids = d.submit([[10 + i, 20, 30, 40, 50] for i in range(2 * SLOTS)], params)
            d.abort(ids)
        _wait_for(lambda: d.status()["num_tracked"] == 0, what="the aborted requests to end")
        thread, result = _in_background(lambda: d.generate([[7, 8, 9, 10, 11]], max_tokens=4))
        thread.join(30)
        assert not thread.is_alive(), f"a fresh request never ran after aborts: {d.status()}"
        assert result["value"][0].token_ids == [90, 405, 620, 480]  # s = 45: 2s, then 3s (s: the sum so far)
        assert_baseline(d)
    finally:
        d.shutdown()


def test_capacity_is_whole_after_aborts_in_every_phase(ray_session):  # noqa: F811
    d = _serve("aborts-phases", prefill_delay_s=0.02, step_delay_s=0.02)
    try:
        prompts = [[10 + i, 20, 30, 40, 50] for i in range(SLOTS)]
        _, before = _max_running_during(d, prompts, 12)
        assert before == SLOTS
        params = SamplingParams(max_tokens=40)
        # queued / prefilling: abort at once
        d.abort(d.submit(prompts * 2, params))
        # decoding: abort once tokens flow
        ids = d.submit(prompts, params)
        _wait_for(lambda: sum(w["num_running"] for w in d.status()["decode"]) > 0, what="decoding")
        d.abort(ids)
        # streams closed after the first token
        for p in prompts:
            it = d.stream(p, max_tokens=40)
            next(it)
            it.close()
        _wait_for(lambda: d.status()["num_tracked"] == 0, what="the aborted requests to end")
        out, after = _max_running_during(d, prompts, 12)
        assert after == SLOTS, f"ran at most {after} of {SLOTS} at once after aborts"
        assert all(len(c.token_ids) == 12 for c in out)
        assert_baseline(d)
    finally:
        d.shutdown()
