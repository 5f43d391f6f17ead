"""overload: twice the load a deployment can serve, every request with a TTFT SLO.

1. Capacity: a closed batch of `4 * slots` requests; its completion rate is the capacity.
2. Open loop: arrivals evenly spaced at `factor` x capacity for `duration_s`, each submitted
   with `ttft_slo_s`. A refusal must come back at submit, fast (`RequestRejected`; its submit
   latency is measured), and requests that are accepted must meet the SLO: attainment counts
   every accepted request, so one rejected later (deadline) or failed is a miss.
Pass: p99 submit latency of refusals <= `reject_budget_s` (50 ms) and attainment >= 90%.
The deployment is calibrated (`calibrate=True`: the scheduler times the engines at start and
fits its cost model) unless told otherwise; the report prints the fitted model. On mock
engines `bottleneck` picks what limits capacity: the prefill worker (`delay_s`, default 20 ms,
per request while it sends the K/V; every prompt goes there: the calibration would otherwise
find the mock's prefill free and prefill locally on the decode worker, where the delay is not)
or the decode slots (8 slots, `delay_s` a step).
"""

from __future__ import annotations

import dataclasses
import re
import time

from raypd.chaos import common

BOTTLENECKS = ("prefill", "decode")  # mock engines: which phase limits capacity


@dataclasses.dataclass
class Report:
    ttft_slo_s: float
    factor: float
    capacity_rps: float = 0.0
    offered_rps: float = 0.0
    num_offered: int = 0
    num_rejected: int = 0  # at submit
    rejected_by: dict = dataclasses.field(default_factory=dict)
    reject_latency: dict = dataclasses.field(default_factory=dict)  # percentiles of submit latency, s
    accept_latency: dict = dataclasses.field(default_factory=dict)
    num_accepted: int = 0
    num_met: int = 0  # accepted, first token within the SLO, completed
    num_late_rejected: int = 0  # accepted, then ended with an error (deadline, failure)
    late_errors: dict = dataclasses.field(default_factory=dict)  # those errors, numbers masked -> count
    ttft: dict = dataclasses.field(default_factory=dict)  # of accepted requests that got a token
    scheduler_ttft: dict = dataclasses.field(default_factory=dict)  # the same from arrival at the scheduler
    prediction_error: dict = dataclasses.field(default_factory=dict)  # scheduler's TTFT - placement's prediction
    cost_model: dict = dataclasses.field(default_factory=dict)
    reject_budget_s: float = 0.05
    leaks: list = dataclasses.field(default_factory=list)

    @property
    def attainment(self) -> float:
        return self.num_met / self.num_accepted if self.num_accepted else 0.0

    @property
    def ok(self) -> bool:
        fast = not self.num_rejected or self.reject_latency["p99"] <= self.reject_budget_s
        return fast and self.num_accepted > 0 and self.attainment >= 0.9 and not self.leaks

    def lines(self) -> list[str]:
        return [f"overload: capacity {self.capacity_rps:.1f} req/s, offered {self.offered_rps:.1f} req/s "
                f"({self.factor:g}x) for {self.num_offered} requests, TTFT SLO {1e3 * self.ttft_slo_s:.0f} ms",
                f"  rejected at submit: {self.num_rejected} {self.rejected_by}; submit latency "
                f"{common.fmt_ms(self.reject_latency)}",
                f"  accepted: {self.num_accepted} (submit latency {common.fmt_ms(self.accept_latency)}); met SLO "
                f"{self.num_met} = {100 * self.attainment:.1f}% attainment; {self.num_late_rejected} ended with "
                f"an error after acceptance {self.late_errors or ''}",
                f"  TTFT of accepted: {common.fmt_ms(self.ttft)}",
                f"  the same at the scheduler: {common.fmt_ms(self.scheduler_ttft)}; minus placement's prediction: "
                f"{common.fmt_ms(self.prediction_error)}",
                f"  cost model: {self.cost_model or 'default (not calibrated)'}",
                f"  leaks after: {self.leaks or 'none'}"]


def run(factor: float = 2.0, duration_s: float = 10.0, ttft_slo_s: float = 0.5, max_tokens: int = 16,
        calibrate: bool = True, model: str | None = None, name: str = "chaos-overload",
        bottleneck: str = "prefill", delay_s: float = 0.02) -> Report:
    from raypd.engine.api import SamplingParams

    if bottleneck not in BOTTLENECKS:
        raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
    config = {}
    if model:
        factory = common.model_factory(model)
    elif bottleneck == "prefill":  # `delay_s` a request on the one prefill worker (sending its K/V)
        factory = common.mock_factory(max_slots=16, prefill_delay_s=delay_s, step_delay_s=delay_s / 2)
        config = dict(local_prefill_stall_s=None)  # keep common.serve's "every prompt remote"
    else:  # prefill is free; 8 decode slots at `delay_s` a step
        factory = common.mock_factory(max_slots=8, step_delay_s=delay_s)
    d = common.serve(name, factory, num_prefill=1, num_decode=1, calibrate=calibrate, **config)
    report = Report(ttft_slo_s, factor)
    tracker = common.Tracker(d)
    try:
        cal = d.status()["calibration"]
        report.cost_model = cal.get("cost", {}) if cal else {}
        report.capacity_rps = common.capacity_rps(d, max_tokens)
        report.offered_rps = factor * report.capacity_rps
        report.num_offered = max(1, int(duration_s * report.offered_rps))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        ps = common.prompts(report.num_offered, length=12, seed=2)
        t0 = time.monotonic()
        for i, p in enumerate(ps):
            delay = t0 + i / report.offered_rps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tracker.submit(p, params, ttft_slo_s)
        tracker.wait(300)
        outs = tracker.outcomes
        rejected = [o for o in outs if o.rejected]
        accepted = [o for o in outs if o.request_id is not None]
        report.num_rejected, report.num_accepted = len(rejected), len(accepted)
        for o in rejected:
            report.rejected_by[o.rejected] = report.rejected_by.get(o.rejected, 0) + 1
        report.reject_latency = common.percentiles([o.submit_s for o in rejected])
        report.accept_latency = common.percentiles([o.submit_s for o in accepted])
        report.ttft = common.percentiles([o.ttft_s for o in accepted if o.ttft_s is not None])
        timed = [o.metrics for o in accepted if o.metrics.get("ttft_s") is not None]
        report.scheduler_ttft = common.percentiles([m["ttft_s"] for m in timed])
        report.prediction_error = common.percentiles([m["ttft_s"] - m["predicted_ttft_s"] for m in timed
                                                      if m.get("predicted_ttft_s") is not None])
        report.num_late_rejected = sum(o.error is not None for o in accepted)
        for o in accepted:
            if o.error is not None:
                kind = re.sub(r"\d+(\.\d+)?", "N", o.error)[:90]
                report.late_errors[kind] = report.late_errors.get(kind, 0) + 1
        report.num_met = sum(o.error is None and o.ttft_s is not None and o.ttft_s <= ttft_slo_s
                             and len(o.tokens) == max_tokens for o in accepted)
        report.leaks = common.leaks(d)
    finally:
        tracker.close()
        d.shutdown()
    return report
