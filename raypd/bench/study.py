"""Reading a colocated-vs-disaggregated rate sweep: pure functions of the measured points.

A sweep is, per serving mode, points sorted by request rate, each with its p99 TPOT and its SLO
attainment (the fraction of all requests that completed within every SLO). Two readings:
  - `slo_break_rate`: the lowest swept rate whose p99 TPOT exceeds the TPOT SLO (where a mode
    "breaks" its TPOT SLO), None when no swept rate does;
  - `rate_at_attainment`: the highest request rate served with at least `target` attainment
    (DistServe's goodput), linearly interpolated between the last swept rate that meets the
    target and the first that misses it; `is_lower_bound` when every swept rate meets it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RateAtAttainment:
    rate: float | None  # req/s; None when even the lowest swept rate misses the target
    is_lower_bound: bool  # every swept rate met the target: the true rate is at least this


def _sorted(rates, values) -> list[tuple[float, float]]:
    if len(rates) != len(values):
        raise ValueError(f"need one value per rate, got {len(rates)} rates and {len(values)} values")
    return sorted(zip(rates, values))


def slo_break_rate(rates, p99_tpot_s, tpot_slo_s: float) -> float | None:
    """Lowest rate whose p99 TPOT (None: no request completed) exceeds the SLO; None if none."""
    for rate, p99 in _sorted(rates, p99_tpot_s):
        if p99 is None or p99 > tpot_slo_s:
            return rate
    return None


def rate_at_attainment(rates, attainments, target: float = 0.9) -> RateAtAttainment:
    """Highest rate with attainment >= target (see the module doc)."""
    pts = _sorted(rates, attainments)
    if not pts:
        raise ValueError("no points")
    for i, (rate, att) in enumerate(pts):
        if att < target:
            if i == 0:
                return RateAtAttainment(None, False)
            r0, a0 = pts[i - 1]
            return RateAtAttainment(r0 + (a0 - target) / (a0 - att) * (rate - r0), False)
    return RateAtAttainment(pts[-1][0], True)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b
