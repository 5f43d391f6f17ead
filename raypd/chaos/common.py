"""What the Ray fault scenarios share: a deployment on mock or real engines, the workers'
actor handles (replacements included), the mock's arithmetic, a leak check, open-loop load.

Mock engines (raypd/runtime/engines.py `MockEngineFactory`: the real engines over the
arithmetic runner, weights 2 / 5 / 3): with s the sum of the tokens so far, a prompt prefilled
on a prefill worker gives 2s % V (5s when prefilled locally on a decode worker) and each
decode step 3s % V, so a reader can check every output by hand; a request resumed after a
failure is prefilled from its prompt plus the tokens it already had (`mock_chain`). With `model` set the
scenarios serve that model (JaxEngineFactory) and compare against a run without the fault.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import statistics
import threading
import time

V = 1000  # the mock's vocabulary
PREFILL_WEIGHT, LOCAL_WEIGHT, DECODE_WEIGHT = 2, 5, 3


def small_resources():
    from raypd.runtime.deployment import Resources

    return Resources(num_cpus=0.25)


def mock_factory(**kw):
    from raypd.runtime.engines import MockEngineFactory

    kw.setdefault("num_pages", 1024)
    kw.setdefault("max_slots", 16)
    # One step per dispatch: the scheduler's TTFT prediction does not count the wait for a
    # multi-step dispatch under way, which the mock's slowed-down steps (tens of ms) make large.
    kw.setdefault("max_decode_steps", 1)
    return MockEngineFactory(prefill_weight=PREFILL_WEIGHT, decode_weight=DECODE_WEIGHT,
                             local_prefill_weight=LOCAL_WEIGHT, vocab_size=V, **kw)


def model_factory(model: str):
    from raypd.engine.runner import EngineConfig
    from raypd.runtime.engines import JaxEngineFactory

    return JaxEngineFactory(model, EngineConfig())


def serve(name: str, factory, num_prefill: int = 1, num_decode: int = 1, **config):
    """A deployment with small CPU shares per worker (so several fit on a laptop) and every
    prompt prefilled remotely unless `policy` says otherwise."""
    import raypd
    from scheduler import PolicyConfig

    config.setdefault("calibrate", False)
    config.setdefault("policy", PolicyConfig(local_prefill_max_len=0))
    config.setdefault("max_replacements", 0)
    return raypd.serve(name=name, factory=factory, num_prefill=num_prefill, num_decode=num_decode,
                       prefill_resources=small_resources(), decode_resources=small_resources(), **config)


def prompts(n: int, length: int = 5, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=length).tolist() for _ in range(n)]


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    """The mock's tokens for a prompt prefilled remotely and never interrupted."""
    from raypd.engine.arithmetic import expected_tokens

    return expected_tokens(prompt, max_tokens, PREFILL_WEIGHT, DECODE_WEIGHT, V)


def mock_chain(prompt: list[int], tokens: list[int]) -> int | None:
    """Check a mock output token by token: with s the sum of the prompt and the tokens before
    it, the first token is a prefill (2s or 5s), each next one either a decode step (3s) or a
    prefill of prompt + tokens so far (the request resumed after a failure, prefilled remotely
    or locally). -> the number of resumes, or None when some token fits neither."""
    resumes = 0
    for i, t in enumerate(tokens):
        s = sum(prompt) + sum(tokens[:i])
        if i > 0 and t == (DECODE_WEIGHT * s) % V:
            continue
        if t not in {(PREFILL_WEIGHT * s) % V, (LOCAL_WEIGHT * s) % V}:
            return None
        resumes += i > 0
    return resumes


def worker_handles(d) -> dict:
    """worker id -> actor handle of every live worker, replacements included (from the scheduler)."""
    import ray

    return ray.get(d._scheduler.__ray_call__.remote(
        lambda self: {w: h for w, h in self.handles.items() if w in self.core.workers}), timeout=30)


def worker_pids(d) -> dict:
    """worker id -> process id (workers busy past 5 s are left out)."""
    import ray

    out = {}
    for w, h in worker_handles(d).items():
        try:
            out[w] = ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=5)
        except Exception:  # noqa: BLE001 - dead or busy: not sampled this time
            pass
    return out


def rss_mib(pids: dict) -> dict:
    import psutil

    out = {}
    for w, pid in pids.items():
        try:
            out[w] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            pass
    return out


def leaks(d, timeout_s: float = 10.0) -> list[str]:
    """What is left held after every request ended and the cache was dropped (empty: nothing):
    queued or tracked requests, index entries, host objects, pages, pending transfers, slots."""
    deadline = time.monotonic() + timeout_s
    while True:
        d.clear_cache()
        s = d.status()
        idx = s["index"]
        found = [f"{k}={v}" for k, v in (("num_queued", s["num_queued"]), ("num_tracked", s["num_tracked"]),
                                          ("index.num_entries", idx["num_entries"]),
                                          ("index.num_host_objects", idx["num_host_objects"]),
                                          ("index.used_bytes", idx["used_bytes"])) if v]
        for w in s["prefill"] + s["decode"]:
            if any(w["used_pages"]):
                found.append(f"{w['worker_id']}.used_pages={w['used_pages']}")
            for k in ("num_pending_transfers", "num_running", "num_inbox", "num_local_prefills"):
                if w.get(k):
                    found.append(f"{w['worker_id']}.{k}={w[k]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition", every_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def kill(actor, timeout_s: float = 60.0) -> None:
    """ray.kill, then wait until the actor is dead (ray.kill returns before it is): a call on it
    fails with RayActorError."""
    import ray

    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_call__.remote(lambda self: None), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
    raise TimeoutError(f"the killed actor was still answering after {timeout_s} s")


class StepGate:
    """A gate for `MockEngineFactory.step_gate` in a fresh temporary directory: decode workers
    hold their next step once they produced `after` tokens, until `open()`."""

    def __init__(self, after: int):
        import tempfile

        self.dir, self.after = tempfile.mkdtemp(prefix="raypd-step-gate-"), after

    def num_arrived(self) -> int:
        return sum(name.startswith("arrived-") for name in os.listdir(self.dir))

    def open(self) -> None:
        open(os.path.join(self.dir, "open"), "a").close()

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def capacity_rps(d, max_tokens: int, seed: int = 1) -> float:
    """Requests a second the deployment completes from a closed batch of 4 x its decode slots
    (prompts of 12 tokens, `max_tokens` each)."""
    batch = prompts(4 * d.info()["max_slots"], length=12, seed=seed)
    start = time.monotonic()
    d.generate(batch, max_tokens=max_tokens, ignore_eos=True)
    rate = len(batch) / (time.monotonic() - start)
    d.clear_cache()
    return rate


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return dict(n=0)
    s = sorted(xs)
    return dict(n=len(s), p50=s[len(s) // 2], p99=s[min(len(s) - 1, int(0.99 * len(s)))], max=s[-1],
                mean=statistics.fmean(s))


def fmt_ms(p: dict) -> str:
    if not p.get("n"):
        return "n=0"
    return f"n={p['n']} p50={1e3 * p['p50']:.1f} ms p99={1e3 * p['p99']:.1f} ms max={1e3 * p['max']:.1f} ms"


# ---------------------------------------------------------------- requests in flight


@dataclasses.dataclass
class Outcome:
    """One request of an open-loop run, as the client saw it."""

    prompt: list[int]
    submitted_s: float  # monotonic time the submit call began
    submit_s: float  # how long the submit call took
    request_id: str | None = None
    rejected: str | None = None  # the RequestRejected reason at submit
    first_token_s: float | None = None  # monotonic
    tokens: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None  # an error after submit (a later rejection, a failure)
    finished: bool = False
    aborted: bool = False
    metrics: dict = dataclasses.field(default_factory=dict)  # the scheduler's, from the last poll

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.submitted_s


class Tracker:
    """Submits requests one call each and follows them through the handle's token poller on one
    collector thread, so hundreds can be in flight without a thread each."""

    def __init__(self, d):
        self.d, self.outcomes, self._by_id = d, [], {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True, name="chaos-tracker")
        self._thread.start()

    def submit(self, prompt: list[int], params, ttft_slo_s: float | None = None) -> Outcome:
        from raypd.runtime import errors

        start = time.monotonic()
        o = Outcome(prompt, start, 0.0)
        try:
            (rid,) = self.d.submit([prompt], params, ttft_slo_s)
        except errors.RequestRejected as e:
            o.submit_s, o.rejected = time.monotonic() - start, e.reason
        else:
            o.submit_s, o.request_id = time.monotonic() - start, rid
            with self._lock:
                self._by_id[rid] = o
            self.d.poller.add(rid, self._queue)
        self.outcomes.append(o)
        return o

    def abort(self, o: Outcome) -> None:
        if o.request_id is not None and not o.finished:
            o.aborted = True
            self.d.poller.drop(o.request_id)
            self.d.abort([o.request_id])

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                rid, entry = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            now = time.monotonic()
            with self._lock:
                o = self._by_id.get(rid)
            if o is None or o.aborted:
                continue
            if entry["tokens"] and o.first_token_s is None:
                o.first_token_s = now
            o.tokens.extend(t.token_id for t in entry["tokens"])
            if entry["error"] is not None:
                o.error = str(entry["error"])
            o.finished = o.finished or bool(entry["finished"]) or entry["error"] is not None
            o.metrics = entry.get("metrics") or o.metrics

    def pending(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.request_id is not None and not o.finished and not o.aborted]

    def wait(self, timeout_s: float = 120.0) -> None:
        wait_for(lambda: not self.pending(), timeout_s, "the tracked requests to end", every_s=0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
