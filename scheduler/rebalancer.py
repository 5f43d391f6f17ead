"""Automatic P:D rebalancing: replay the recent traffic through the simulator for every split
of the deployment's workers and move workers when another split would meet the SLOs clearly
more often.

Pure: time is passed in, and the simulator (scheduler/simulator.py) runs the same scheduler
core on a virtual clock with the deployment's own cost model. The deployment's scheduler
feeds it every admitted request (`observe`) and asks it now and then (`recommend`); a
recommendation becomes `SchedulerCore.set_roles`, which drains before it moves anything.
Hysteresis: a move needs `min_gain` more SLO attainment than the current split (simulated on
the same requests) and at least `min_interval_s` since the last move.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from scheduler.policy import PolicyConfig
from scheduler.simulator import SimRequest, SimResult, Simulator, WorkerProfile


@dataclasses.dataclass(frozen=True)
class RebalanceConfig:
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    window_s: float = 60.0  # traffic replayed
    interval_s: float = 15.0  # how often the deployment asks
    min_interval_s: float = 60.0  # between moves
    min_gain: float = 0.05  # SLO attainment a new split must add
    min_requests: int = 8  # fewer in the window: no opinion

    def __post_init__(self):
        if self.ttft_slo_s is None and self.tpot_slo_s is None:
            raise ValueError("rebalancing needs a TTFT or TPOT SLO (ttft_slo_s, tpot_slo_s)")
        if min(self.window_s, self.interval_s) <= 0 or self.min_interval_s < 0 or not 0 <= self.min_gain <= 1:
            raise ValueError(f"need window_s, interval_s > 0, min_interval_s >= 0 and min_gain in [0, 1]: {self}")


def attainment(results: list[SimResult], ttft_slo_s: float | None, tpot_slo_s: float | None) -> float:
    """Fraction of requests that completed within both SLOs (rejected ones miss)."""
    good = 0
    for r in results:
        if r.status != "ok" or not r.token_s:
            continue
        ttft = r.token_s[0] - r.arrival_s
        tpot = (r.token_s[-1] - r.token_s[0]) / (len(r.token_s) - 1) if len(r.token_s) > 1 else 0.0
        good += (ttft_slo_s is None or ttft <= ttft_slo_s) and (tpot_slo_s is None or tpot <= tpot_slo_s)
    return good / len(results) if results else 1.0


class Rebalancer:
    def __init__(self, config: RebalanceConfig, worker: WorkerProfile, policy: PolicyConfig = PolicyConfig()):
        self.config, self.worker, self.policy = config, worker, policy
        self.arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt_len, max_tokens)
        self.last_move_s = -math.inf
        self.last: dict = {}  # the last recommendation's attainment per split, for status

    def observe(self, now_s: float, prompt_len: int, max_tokens: int) -> None:
        self.arrivals.append((now_s, prompt_len, max_tokens))
        self._forget(now_s)

    def _forget(self, now_s: float) -> None:
        while self.arrivals and self.arrivals[0][0] < now_s - self.config.window_s:
            self.arrivals.popleft()

    def score(self, num_prefill: int, num_decode: int, requests: list[SimRequest]) -> float:
        sim = Simulator(self.worker, num_prefill, num_decode, dataclasses.replace(self.policy, max_queued=1 << 30),
                        prefix_cache=False)
        return attainment(sim.run(requests), self.config.ttft_slo_s, self.config.tpot_slo_s)

    def recommend(self, now_s: float, num_prefill: int, num_decode: int, backlog: list[tuple[int, int]] = (),
                  arrivals: list[tuple[float, int, int]] | None = None) -> tuple[int, int] | None:
        """A better (num_prefill, num_decode) with the same number of workers, or None.
        `backlog`: (prompt_len, tokens left) of the requests queued or under way now: the replay
        starts with them (work a split must also get through), then the window's arrivals
        (`arrivals`: a copy of `self.arrivals` taken where `observe` runs, when this runs in
        another thread)."""
        c = self.config
        if arrivals is None:
            self._forget(now_s)
            arrivals = list(self.arrivals)
        arrivals = [a for a in arrivals if a[0] >= now_s - c.window_s]
        if len(arrivals) < c.min_requests or now_s - self.last_move_s < c.min_interval_s:
            return None
        t0 = arrivals[0][0]
        top = self.worker.max_seq_len

        def request(t, n, m):
            m = max(1, min(m, top - 1))
            return SimRequest(t, tuple(range(7, 7 + max(1, min(n, top - m)))), m)

        requests = [request(0.0, n, m) for n, m in backlog]
        requests += [request(t - t0, n, m) for t, n, m in arrivals]
        total = num_prefill + num_decode
        scores = {(p, total - p): self.score(p, total - p, requests) for p in range(1, total)}
        self.last = {f"{p}:{d}": s for (p, d), s in scores.items()}
        current = scores.get((num_prefill, num_decode), 0.0)
        best = max(scores, key=lambda k: (scores[k], k == (num_prefill, num_decode)))
        if best != (num_prefill, num_decode) and scores[best] >= current + c.min_gain:
            self.last_move_s = now_s
            return best
        return None
