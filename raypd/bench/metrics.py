"""Serving metrics from per-request client records: pure functions, time passed in.

Definitions follow `vllm bench serve` (benchmarks/serve.py, `calculate_metrics`), so numbers
compare:
  - TTFT: first chunk's arrival - the request's send time.
  - E2E: last chunk's arrival (the end of the stream) - the send time.
  - TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token;
    a one-token request has TPOT 0 for SLO checks and is left out of the TPOT statistics.
  - ITL: the gap between consecutive chunks of one request (a chunk may carry several tokens),
    pooled over every request.
  - request / output-token / total-token throughput: over the run's duration, completed only.
  - goodput: requests per second that completed and met every SLO given (TTFT, TPOT, E2E);
    rejected and failed requests are misses. SLO attainment: the same count / all requests.
Percentiles interpolate linearly between order statistics (numpy's default, as vLLM).
Times in records are seconds from the start of the run; summaries report milliseconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STATUS_OK, STATUS_REJECTED, STATUS_FAILED = "ok", "rejected", "failed"
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds since the run started."""

    index: int  # position in the workload
    prompt_len: int
    max_tokens: int  # output length asked for (exact: ignore_eos)
    scheduled_s: float  # when the arrival process said to send it
    sent_s: float  # when it was sent (later than scheduled_s when the client lags or waits)
    chunk_s: list[float] = dataclasses.field(default_factory=list)  # arrival of each chunk
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens in each chunk
    end_s: float | None = None  # end of the stream (or of the error)
    status: str = STATUS_OK  # ok | rejected | failed
    error: str | None = None
    server_timings: dict = dataclasses.field(default_factory=dict)  # whatever the target reports (s)

    @property
    def output_len(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def is_ok(self) -> bool:
        return self.status == STATUS_OK and bool(self.chunk_s)


@dataclasses.dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None: not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2e_s))


def ttft_s(r: RequestRecord) -> float | None:
    return r.chunk_s[0] - r.sent_s if r.is_ok else None


def e2e_s(r: RequestRecord) -> float | None:
    return (r.end_s if r.end_s is not None else r.chunk_s[-1]) - r.sent_s if r.is_ok else None


def tpot_s(r: RequestRecord) -> float | None:
    """(E2E - TTFT) / (output tokens - 1); None for a failed request or a one-token output."""
    if not r.is_ok or r.output_len < 2:
        return None
    return (e2e_s(r) - ttft_s(r)) / (r.output_len - 1)


def itl_s(r: RequestRecord) -> list[float]:
    """Gaps between consecutive chunks of one request."""
    return [b - a for a, b in zip(r.chunk_s, r.chunk_s[1:])] if r.is_ok else []


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    """Completed and within every SLO given (a one-token request's TPOT counts as 0)."""
    if not r.is_ok:
        return False
    checks = ((slo.ttft_s, ttft_s(r)), (slo.tpot_s, tpot_s(r) or 0.0), (slo.e2e_s, e2e_s(r)))
    return all(limit is None or value <= limit for limit, value in checks)


def percentile(values, p: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), p)) if len(values) else None


def stats_ms(values_s, percentiles=PERCENTILES) -> dict:
    """mean / std / min / max / pNN of values given in seconds, reported in milliseconds."""
    v = np.asarray(values_s, dtype=np.float64) * 1e3
    if not v.size:
        return dict(mean=None, std=None, min=None, max=None, **{f"p{p:g}": None for p in percentiles})
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                **{f"p{p:g}": float(np.percentile(v, p)) for p in percentiles})


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO = SLO(),
              percentiles=PERCENTILES) -> dict:
    """The run's numbers: counts, throughput, goodput, attainment and latency statistics."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.is_ok]
    num_good = sum(meets_slo(r, slo) for r in records) if slo.is_set else None
    num_out = sum(r.output_len for r in ok)
    num_in = sum(r.prompt_len for r in ok)
    return dict(
        num_requests=len(records), num_completed=len(ok),
        num_rejected=sum(r.status == STATUS_REJECTED for r in records),
        num_failed=sum(r.status == STATUS_FAILED for r in records),
        duration_s=duration_s, total_input_tokens=num_in, total_output_tokens=num_out,
        request_throughput=len(ok) / duration_s, output_throughput=num_out / duration_s,
        total_token_throughput=(num_in + num_out) / duration_s,
        num_good=num_good,
        goodput=num_good / duration_s if num_good is not None else None,
        slo_attainment=num_good / len(records) if num_good is not None and records else None,
        ttft_ms=stats_ms([ttft_s(r) for r in ok], percentiles),
        tpot_ms=stats_ms([t for r in ok if (t := tpot_s(r)) is not None], percentiles),
        itl_ms=stats_ms([g for r in ok for g in itl_s(r)], percentiles),
        e2e_ms=stats_ms([e2e_s(r) for r in ok], percentiles),
    )


STAGES = ("queue_s", "prefill_s", "transfer_s")  # the target's own per-request timings


def breakdown_one_s(r: RequestRecord) -> dict[str, float] | None:
    """One completed request's E2E split into parts that add up to it, in seconds, when the
    target timed its stages (`queue_s` and `prefill_s`; `transfer_s` only when K/V moved, else 0):
      queue     admission to placement on a worker (the scheduler's queue), plus, for a remote
                prefill, its wait in the worker's call queue (`prefill_wait_s`),
      prefill   the prefill as its worker timed it (for a remote prefill: compute + send),
      transfer  receiving the K/V into the decode worker's pool,
      other     the rest of the client's TTFT: waits between stages (behind other prefills on
                the same worker, in the decode worker's inbox), RPCs, token polling,
      decode    E2E - TTFT.
    None for a failed request or one without the target's timings."""
    t = r.server_timings
    if not r.is_ok or t.get("queue_s") is None or t.get("prefill_s") is None:
        return None
    # a remote prefill's wait in its worker's call queue counts as queueing
    queue = t["queue_s"] + (t.get("prefill_wait_s") or 0.0)
    prefill, transfer = t["prefill_s"], t.get("transfer_s") or 0.0
    ttft = ttft_s(r)
    return dict(queue=queue, prefill=prefill, transfer=transfer, other=ttft - queue - prefill - transfer,
                decode=e2e_s(r) - ttft)


def breakdown_s(records: list[RequestRecord]) -> dict[str, float]:
    """Mean latency components over completed requests, in seconds: `breakdown_one_s`'s parts
    when the target timed every completed request's stages, else the split the client can make
    alone: TTFT and decode (E2E - TTFT). Either way the parts add up to the mean E2E."""
    ok = [r for r in records if r.is_ok]
    if not ok:
        return {}
    parts = [breakdown_one_s(r) for r in ok]
    if all(p is not None for p in parts):
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    return dict(ttft=float(np.mean([ttft_s(r) for r in ok])),
                decode=float(np.mean([e2e_s(r) - ttft_s(r) for r in ok])))


def merge_bursts(chunk_s: list[float], chunk_tokens: list[int], gap_s: float) -> tuple[list[float], list[int]]:
    """Chunks closer than `gap_s` to the previous one become part of it (its arrival time, the
    sum of the tokens): for targets whose client API yields the tokens of one network message
    one at a time."""
    times: list[float] = []
    tokens: list[int] = []
    for t, n in zip(chunk_s, chunk_tokens):
        if times and t - last < gap_s:
            tokens[-1] += n
        else:
            times.append(t)
            tokens.append(n)
        last = t
    return times, tokens
