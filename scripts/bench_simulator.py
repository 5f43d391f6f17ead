"""How fast the simulator runs: a 10,000-request chat workload over 1,000 simulated devices
(250 prefill + 750 decode workers of a synthetic profile) at 500 req/s, timed end to end
(workload generation, simulation, the benchmark's analysis).

    python scripts/bench_simulator.py [--num-requests 10000] [--prefill 250] [--decode 750] [--rate 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.bench.metrics import SLO  # noqa: E402
from raypd.planner import Profile, Workload, simulate  # noqa: E402
from scheduler import CostModel  # noqa: E402
from scheduler.simulator import WorkerProfile  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--prefill", type=int, default=250)
    p.add_argument("--decode", type=int, default=750)
    p.add_argument("--rate", type=float, default=500.0)
    args = p.parse_args(argv)
    cost = CostModel((0.005, 2e-4, 0.0), (0.01, 0.0002, 0.0), 0.001, 1e10, 1000)
    profile = Profile(WorkerProfile(cost, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096,
                                    prefill_chunk_len=512, device="synthetic"))
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    r = simulate(profile, "disaggregated", args.prefill, args.decode, Workload(dataset="chat",
                 num_requests=args.num_requests), SLO(ttft_s=3.0, tpot_s=0.05), rate=args.rate)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{args.num_requests} requests over {args.prefill + args.decode} devices: {wall:.1f} s wall, {cpu:.1f} s "
          f"of CPU (load average {load:.1f} before); completed {r['num_completed']}, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, "
          f"TPOT p50 {r['tpot_p50_s'] * 1e3:.1f} ms, goodput {r['goodput_rps']:.0f} req/s")
    return dict(wall_s=wall, cpu_s=cpu, **{k: v for k, v in r.items() if k != "summary"})


if __name__ == "__main__":
    main()
