"""transfer-faults: a fraction of K/V transfers is lost on the way (fault injection).

The decode workers run `FaultyEngineFactory` (raypd/runtime/engines.py): each received
transfer is lost with probability `fail_fraction` (drawn from a seeded generator per worker),
raising `SenderLost` as a dead sender would. The scheduler must prefill each such request
again, so every request succeeds with the output it would have had: on mock engines the
uninterrupted arithmetic (no token was produced before the loss), on a real model the greedy
output of the same prompts on a deployment without faults.
"""

from __future__ import annotations

import dataclasses
import time

from raypd.chaos import common


@dataclasses.dataclass
class Report:
    num_requests: int
    fail_fraction: float
    num_completed: int = 0
    num_wrong: int = 0
    num_faults: int = 0  # transfers lost by injection (counted by the decode workers)
    num_retries: int = 0
    wall_s: float = 0.0
    leaks: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.num_completed == self.num_requests and not self.num_wrong and not self.errors
                and not self.leaks and self.num_retries >= self.num_faults)

    def lines(self) -> list[str]:
        return [f"transfer-faults: {self.num_completed}/{self.num_requests} succeeded, {self.num_wrong} wrong "
                f"output(s); {self.num_faults} transfers lost by injection "
                f"({100 * self.num_faults / max(1, self.num_requests + self.num_retries):.1f}% of "
                f"{self.num_requests + self.num_retries} received; fail_fraction={self.fail_fraction})",
                f"  retries={self.num_retries} wall={self.wall_s:.1f} s leaks after: {self.leaks or 'none'}",
                *[f"  error: {e}" for e in self.errors[:5]]]


def _num_faults(d) -> int:
    import ray

    total = 0
    for w, h in common.worker_handles(d).items():
        if w.startswith("decode"):
            total += ray.get(h.__ray_call__.remote(
                lambda self: getattr(self.engines, "fault_counter", {}).get("faults", 0)), timeout=30)
    return total


def run(num_requests: int = 200, fail_fraction: float = 0.05, seed: int = 0, max_tokens: int = 8,
        model: str | None = None, name: str = "chaos-transfer-faults") -> Report:
    from raypd.engine.api import SamplingParams
    from raypd.runtime.engines import FaultyEngineFactory

    ps = common.prompts(num_requests, length=12, seed=seed)
    reference = [common.expected(p, max_tokens) for p in ps]
    if model:  # greedy output without faults, from a plain deployment
        d = common.serve(name + "-reference", common.model_factory(model))
        try:
            reference = [c.token_ids for c in d.generate(ps, max_tokens=max_tokens, ignore_eos=True)]
        finally:
            d.shutdown()
    inner = common.model_factory(model) if model else common.mock_factory()
    d = common.serve(name, FaultyEngineFactory(inner, fail_fraction, seed), num_prefill=2, num_decode=2,
                     max_retries=8)  # a request may lose its K/V a few times in a row
    report = Report(num_requests, fail_fraction)
    tracker = common.Tracker(d)
    try:
        start = time.monotonic()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        outs = [tracker.submit(p, params) for p in ps]
        tracker.wait(300)
        report.wall_s = time.monotonic() - start
        for o, want in zip(outs, reference):
            if o.error:
                report.errors.append(f"{o.request_id}: {o.error}")
                continue
            report.num_completed += len(o.tokens) == max_tokens
            report.num_wrong += o.tokens != want
        report.num_faults, report.num_retries = _num_faults(d), d.status()["num_retries"]
        report.leaks = common.leaks(d)
    finally:
        tracker.close()
        d.shutdown()
    return report
