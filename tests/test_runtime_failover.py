"""Failover (raypd/runtime/scheduler_actor.py, "failover"): a worker killed while a request is
in its hands. Mock engines held at a gate (`Gate`: the worker announces it has arrived and
waits for the test to open it) let a test kill a worker in a known phase, with no timing
guess; their arithmetic tokens show which worker ran each phase and what prompt a resumed
request had.

Guards against: a request lost or failed when the prefill worker dies mid-prefill, or after it
sent the K/V but before the decode worker received it (the payload's owner is gone, so the K/V
is lost on the way); a decode worker's death ending its running requests instead of resuming
them elsewhere; a dead worker still chosen by placement; pages or index entries leaking after.
"""

from __future__ import annotations

import threading
import time

import pytest

import raypd
from raypd.chaos.common import kill  # ray.kill, then wait until the actor is dead
from raypd.engine.arithmetic import expected_tokens
from raypd.runtime import errors
from raypd.runtime.engines import MockEngineFactory
from scheduler import PolicyConfig
from tests.test_runtime import _small, assert_baseline, ray_session  # noqa: F401 - fixture

V = 1000  # mock vocabulary


def _worker(d, worker_id: str):
    """The actor handle of one worker of deployment `d`."""
    import ray

    for actor in d._actors[1:]:
        if ray.get(actor.__ray_call__.remote(lambda self: self.worker_id)) == worker_id:
            return actor
    raise LookupError(worker_id)


class Gate:
    """A directory for `MockEngineFactory.send_gate` / `recv_gate`: workers reaching the gate
    write `arrived-<pid>` and wait until `open()` (raypd.runtime.engines.wait_at_gate)."""

    def __init__(self, tmp_path, name: str):
        self.dir = tmp_path / name
        self.dir.mkdir()

    def __str__(self) -> str:
        return str(self.dir)

    def wait_arrivals(self, n: int, timeout_s: float = 60.0) -> None:
        _wait_for(lambda: len(list(self.dir.glob("arrived-*"))) >= n, timeout_s, f"{n} workers at gate {self.dir.name}")

    def open(self) -> None:
        (self.dir / "open").touch()


def _is_lost(ref) -> bool:
    """Whether the object store payload `ref` is gone (its owner died and it was freed)."""
    import ray

    try:
        ray.get(ref, timeout=1)
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


def _wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _in_background(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised by the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _serve(name: str, num_decode: int = 1, num_prefill: int = 2, max_replacements: int = 0, **factory_kw):
    factory = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, num_pages=64,
                                **factory_kw)
    return raypd.serve(name=name, factory=factory, calibrate=False, num_prefill=num_prefill, num_decode=num_decode,
                       policy=PolicyConfig(local_prefill_max_len=0), max_replacements=max_replacements,
                       prefill_resources=_small(), decode_resources=_small())


PROMPT = [10, 20, 30, 40, 50]
EXPECTED = [300, 350, 400, 600]  # s = sum so far: prefilled on a prefill worker (2s), decoded (3s), mod 1000


def test_handoff_that_dies_mid_transfer_is_retried_on_another_prefill_worker(ray_session, tmp_path):  # noqa: F811
    """prefill-0 sends the K/V, then dies before the decode worker (held at a gate) receives it:
    the payload's owner is gone, the transfer fails, and the scheduler prefills again on prefill-1."""
    ray = ray_session
    gate = Gate(tmp_path, "recv")
    d = _serve("failover-transfer", recv_gate=str(gate))
    try:
        thread, result = _in_background(lambda: d.generate([PROMPT], max_tokens=4)[0])
        gate.wait_arrivals(1)  # the decode worker holds prefill-0's handle: the K/V was sent
        victim = _worker(d, "prefill-0")
        (handle,) = ray.get(victim.__ray_call__.remote(lambda self: list(self._sent.values())), timeout=30)
        kill(victim)
        _wait_for(lambda: _is_lost(handle.location), 60, "prefill-0's payload to be lost with it")
        gate.open()
        thread.join(60)
        assert "error" not in result, result.get("error")
        c = result["value"]
        assert c.token_ids == EXPECTED and c.metrics["prefill_worker"] == "prefill-1"
        s = d.status()
        assert s["num_retries"] == 1 and list(s["dead_workers"]) == ["prefill-0"]
        assert [w["worker_id"] for w in s["prefill"]] == ["prefill-1"]
        # the dead worker is never placed again
        again = d.generate([PROMPT, [7, 8, 9, 10, 11]], max_tokens=2)
        assert {c.metrics["prefill_worker"] for c in again} == {"prefill-1"}
        assert_baseline(d)
    finally:
        d.shutdown()


def test_prefill_worker_dying_mid_prefill_is_retried(ray_session, tmp_path):  # noqa: F811
    gate = Gate(tmp_path, "send")
    d = _serve("failover-prefill", send_gate=str(gate))
    try:
        victim = _worker(d, "prefill-0")
        thread, result = _in_background(lambda: d.generate([PROMPT], max_tokens=4)[0])
        gate.wait_arrivals(1)  # prefill-0 (ties go to the lower id) is inside its prefill
        kill(victim)
        gate.open()
        thread.join(60)
        assert "error" not in result, result.get("error")
        assert result["value"].token_ids == EXPECTED and result["value"].metrics["prefill_worker"] == "prefill-1"
        assert d.status()["num_retries"] == 1
        assert_baseline(d)
    finally:
        d.shutdown()


def test_decode_worker_dying_mid_generation_resumes_elsewhere(ray_session, tmp_path):  # noqa: F811
    """A stream is on decode-0 when decode-0 dies. The scheduler resumes it on decode-1 with
    prompt + the tokens produced so far (so a greedy model continues exactly): in the mock's
    arithmetic (s: the sum of the prompt and the tokens before) a decode step gives 3s % V and
    the first resumed token, a prefill of prompt + tokens so far, 2s % V."""
    gate = Gate(tmp_path, "step")  # a decode worker holds its next step after 5 tokens
    d = _serve("failover-decode", num_decode=2, step_gate=str(gate), step_gate_after=5)
    try:
        handles = {w: _worker(d, w) for w in ("decode-0", "decode-1")}
        it = d.stream(PROMPT, max_tokens=30)
        got = [next(it).token_id for _ in range(5)]
        gate.wait_arrivals(1)  # the stream's decode worker is held mid-stream
        s = d.status()
        (busy,) = [w["worker_id"] for w in s["decode"] if w["num_running"]]
        kill(handles[busy])
        gate.open()
        got += [c.token_id for c in it]
        assert len(got) == 30 and got[:5] == EXPECTED + [(3 * (1200 + 600)) % V]
        s_ = [sum(PROMPT + got[:i]) for i in range(len(got))]
        j = next(i for i in range(1, len(got)) if got[i] != (3 * s_[i]) % V)  # the resumed token
        assert got[j] == (2 * s_[j]) % V
        assert all(got[i] == (3 * s_[i]) % V for i in range(j + 1, len(got)))
        s = d.status()
        assert s["num_retries"] == 1 and list(s["dead_workers"]) == [busy]
        assert_baseline(d)
    finally:
        d.shutdown()


def test_gives_up_after_max_retries_with_a_clear_error(ray_session, tmp_path):  # noqa: F811
    """Both prefill workers die in turn: with max_retries=1 the request fails, naming why."""
    gate = Gate(tmp_path, "send")
    factory = MockEngineFactory(send_gate=str(gate), num_pages=64)
    d = raypd.serve(name="failover-give-up", factory=factory, calibrate=False, num_prefill=2, max_retries=1,
                    max_replacements=0,
                    policy=PolicyConfig(local_prefill_max_len=0), prefill_resources=_small(),
                    decode_resources=_small())
    try:
        workers = [_worker(d, "prefill-0"), _worker(d, "prefill-1")]
        thread, result = _in_background(lambda: d.generate([PROMPT], max_tokens=4))
        gate.wait_arrivals(1)  # prefill-0 is inside its prefill
        kill(workers[0])
        gate.wait_arrivals(2)  # the retry: prefill-1 is inside its prefill
        assert d.status()["num_retries"] == 1
        kill(workers[1])
        thread.join(60)
        assert isinstance(result.get("error"), errors.RequestFailed), result
        assert "gave up after 1 retries" in str(result["error"])
        with pytest.raises(errors.RequestRejected) as e:  # no prefill worker left: prefill on decode
            d.generate([PROMPT], max_tokens=2, ttft_slo_s=1e-9)
        assert e.value.reason == "deadline"
        assert d.generate([PROMPT], max_tokens=2)[0].metrics["is_local_prefill"]
    finally:
        d.shutdown()


def test_a_dead_worker_is_replaced_and_its_stream_resumes_there(ray_session, tmp_path):  # noqa: F811
    """The only decode worker dies mid-stream: the scheduler starts decode-1 in its place, the
    stream waits for it (not rejected for lack of workers) and resumes there with the same
    arithmetic; the deployment reports ready again with full capacity."""
    gate = Gate(tmp_path, "step")  # decode-0 holds its next step after 3 tokens
    d = _serve("replace-decode", num_prefill=1, max_replacements=1, step_gate=str(gate), step_gate_after=3)
    try:
        it = d.stream(PROMPT, max_tokens=20)
        got = [next(it).token_id for _ in range(3)]
        gate.wait_arrivals(1)
        kill(_worker(d, "decode-0"))
        gate.open()
        got += [c.token_id for c in it]
        assert len(got) == 20 and got[:3] == EXPECTED[:3]
        s = d.status()
        assert s["is_ready"] and [w["worker_id"] for w in s["decode"]] == ["decode-1"]
        assert list(s["dead_workers"]) == ["decode-0"] and s["num_replacements"] == 1
        again = d.generate([PROMPT] * 4, max_tokens=4)
        assert [c.token_ids for c in again] == [EXPECTED] * 4
        assert {c.metrics["decode_worker"] for c in again} == {"decode-1"}
        assert_baseline(d)
    finally:
        d.shutdown()


def test_roles_move_under_load_without_losing_a_request(ray_session, tmp_path):  # noqa: F811
    """1 prefill + 2 decode -> 2 + 1 while 8 streams run: the moving decode worker drains, is
    retired and prefill-1 starts in its place; every request completes with exact arithmetic."""
    gate = Gate(tmp_path, "step")  # decode workers hold their next step after 1 token
    d = _serve("roles", num_prefill=1, num_decode=2, step_gate=str(gate), step_gate_after=1)
    try:
        prompts = [[10 + i, 20, 30, 40, 50] for i in range(8)]
        thread, result = _in_background(lambda: d.generate(prompts, max_tokens=12))
        gate.wait_arrivals(1)  # streams are mid-decode
        d.set_roles(2, 1, wait_s=None)
        gate.open()
        thread.join(60)
        assert "error" not in result, result.get("error")
        assert [c.token_ids for c in result["value"]] == [expected_tokens(p, 12, 2, 3, V) for p in prompts]
        s = d.set_roles(2, 1, wait_s=120)
        assert sorted(w["worker_id"] for w in s["prefill"]) == ["prefill-0", "prefill-1"]
        assert len(s["decode"]) == 1 and len(s["retired_workers"]) == 1 and not s["dead_workers"]
        again = d.generate(prompts, max_tokens=3)
        assert {c.metrics["prefill_worker"] for c in again} == {"prefill-0", "prefill-1"}
        assert_baseline(d)
    finally:
        d.shutdown()
