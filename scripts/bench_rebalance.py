"""Automatic P:D rebalancing on a shifting workload, simulated (scheduler/rebalancer.py).

    python scripts/bench_rebalance.py [--seed 0]

Four workers of a synthetic profile (prefill 5 ms + 0.2 ms per prompt token; decode step
10 ms + 0.4 ms per running request) serve long prompts (1500-2500 tokens, 20-60 out) at
5 req/s for 60 s, then chat (50-300 in, 100-300 out) at 11 req/s. SLOs: TTFT 2 s, TPOT 30 ms.
The same requests run through every static split (P1:D3, P2:D2, P3:D1) and through P2:D2 with
the rebalancer on (15 s window, asked every 3 s, at most one move per 10 s, replacements
serve 5 s after they are asked for), side by side in one run of the simulator. Prints SLO
attainment per phase and overall, goodput, and the rebalancer's moves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from scheduler import CostModel, PolicyConfig  # noqa: E402
from scheduler.rebalancer import RebalanceConfig, Rebalancer, attainment  # noqa: E402
from scheduler.simulator import SimRequest, Simulator, WorkerProfile  # noqa: E402

COST = CostModel((0.005, 2e-4, 0.0), (0.01, 0.0004, 0.0), 0.001, 1e10, 1000)
WORKER = WorkerProfile(COST, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096, prefill_chunk_len=512,
                       device="synthetic")
SLO = dict(ttft_slo_s=2.0, tpot_slo_s=0.03)
SHIFT_S = 60.0


def workload(seed: int, num_requests: int = 1200) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for _ in range(num_requests):
        is_long = t < SHIFT_S
        t += rng.exponential(1 / (5.0 if is_long else 11.0))
        n = int(rng.integers(1500, 2500)) if is_long else int(rng.integers(50, 300))
        m = int(rng.integers(20, 60)) if is_long else int(rng.integers(100, 300))
        out.append(SimRequest(t, tuple(rng.integers(0, 1000, n)), m))
    return out


def row(name: str, results, duration_s: float) -> str:
    a = [r for r in results if r.arrival_s < SHIFT_S]
    b = [r for r in results if r.arrival_s >= SHIFT_S]
    good = attainment(results, **SLO) * len(results) / duration_s
    return (f"| {name} | {attainment(a, **SLO):.0%} | {attainment(b, **SLO):.0%} | {attainment(results, **SLO):.0%} "
            f"| {good:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    reqs = workload(args.seed)
    duration = reqs[-1].arrival_s
    policy = PolicyConfig(local_prefill_max_len=0)
    t0 = time.perf_counter()
    print("| split | long-prompt phase | chat phase | overall | goodput (req/s) |\n|---|---:|---:|---:|---:|")
    for num_prefill in (1, 2, 3):
        results = Simulator(WORKER, num_prefill, 4 - num_prefill, policy, prefix_cache=False).run(reqs)
        print(row(f"static P{num_prefill}:D{4 - num_prefill}", results, duration))
    rebalancer = Rebalancer(RebalanceConfig(**SLO, window_s=15, interval_s=3, min_interval_s=10), WORKER, policy)
    sim = Simulator(WORKER, 2, 2, policy, prefix_cache=False, rebalancer=rebalancer)
    print(row("rebalancer (from P2:D2)", sim.run(reqs), duration))
    moves = ", ".join(f"{t:.0f} s -> P{s[0]}:D{s[1]}" for t, s in sim.moves)
    print(f"\nmoves: {moves}\n({len(reqs)} requests, {time.perf_counter() - t0:.0f} s of simulation)")


if __name__ == "__main__":
    main()
