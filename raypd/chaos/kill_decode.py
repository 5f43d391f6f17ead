"""kill-decode: one of two decode workers dies while N greedy requests stream.

Every request must complete with the right tokens: on mock engines each output is checked
token by token (`common.mock_chain`: decode steps, and a resume from prompt + tokens so far
where the request moved); on a real model (`model`), greedy output must equal a run of the
same prompts on the same deployment before the kill. The dead worker is replaced
(`max_replacements`) and the deployment returns to its baseline.
"""

from __future__ import annotations

import dataclasses
import time

from raypd.chaos import common


@dataclasses.dataclass
class Report:
    num_requests: int
    num_completed: int = 0
    num_wrong: int = 0
    num_resumed: int = 0  # requests whose output shows a resume (mock engines)
    killed: str = ""
    running_at_kill: int = 0
    num_retries: int = 0
    num_replacements: int = 0
    wall_s: float = 0.0
    leaks: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.num_completed == self.num_requests and not self.num_wrong and not self.leaks
                and not self.errors and self.num_retries >= 1)

    def lines(self) -> list[str]:
        return [f"kill-decode: {self.num_completed}/{self.num_requests} completed, {self.num_wrong} wrong output(s), "
                f"{self.num_resumed} visibly resumed; killed {self.killed} with {self.running_at_kill} running",
                f"  retries={self.num_retries} replacements={self.num_replacements} wall={self.wall_s:.1f} s",
                f"  leaks after: {self.leaks or 'none'}", *[f"  error: {e}" for e in self.errors[:5]]]


def run(num_requests: int = 100, max_tokens: int = 32, model: str | None = None, name: str = "chaos-kill-decode",
        step_delay_s: float = 0.02) -> Report:
    from raypd.engine.api import SamplingParams

    # mock engines: decode workers hold at a gate after 2 tokens, so the kill lands mid-stream
    # whatever the machine's pace (a real model is slow enough by itself)
    gate = None if model else common.StepGate(after=2)
    factory = common.model_factory(model) if model else common.mock_factory(
        step_delay_s=step_delay_s, step_gate=gate.dir, step_gate_after=gate.after)
    d = common.serve(name, factory, num_prefill=1, num_decode=2, max_replacements=2)
    report = Report(num_requests)
    ps = common.prompts(num_requests, length=12)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    tracker = common.Tracker(d)
    try:
        reference = None
        if model:  # the same prompts, no kill: what greedy output must be
            reference = [c.token_ids for c in d.generate(ps, max_tokens=max_tokens, ignore_eos=True)]
            d.clear_cache()  # the run under test computes its prefixes again
        start = time.monotonic()
        outs = [tracker.submit(p, params) for p in ps]
        handles = common.worker_handles(d)

        seen = {}

        def decoding() -> bool:  # (placement may put every request on one worker: kill the busiest)
            seen.clear()
            seen.update((w["worker_id"], w["num_running"]) for w in d.status()["decode"])
            return any(seen.values()) and any(len(o.tokens) > 1 for o in outs)

        if gate is not None:
            common.wait_for(lambda: gate.num_arrived() > 0, 120, "a decode worker at the gate")
        common.wait_for(decoding, 120, "a decode worker to be decoding")
        running = dict(seen)
        report.killed = max(sorted(running), key=lambda w: running[w])
        report.running_at_kill = running.get(report.killed, 0)
        common.kill(handles[report.killed])
        if gate is not None:
            gate.open()
        tracker.wait(300)
        report.wall_s = time.monotonic() - start
        for i, o in enumerate(outs):
            if o.error:
                report.errors.append(f"{o.request_id}: {o.error}")
                continue
            report.num_completed += len(o.tokens) == max_tokens
            if reference is not None:
                report.num_wrong += o.tokens != reference[i]
            else:
                resumes = common.mock_chain(o.prompt, o.tokens)
                report.num_wrong += resumes is None
                report.num_resumed += bool(resumes)
        # the replacement joins; then nothing may be left held
        common.wait_for(lambda: d.status()["num_replacements"] >= 1 and not d.status()["joining_workers"], 600,
                        "the dead decode worker's replacement to join", every_s=0.2)
        s = d.status()
        report.num_retries, report.num_replacements = s["num_retries"], s["num_replacements"]
        report.leaks = common.leaks(d)
    finally:
        tracker.close()
        d.shutdown()
        if gate is not None:
            gate.remove()
    return report
