"""CPU time the scheduler core (scheduler/core.py) spends per request: every event of a
simulated run (submit, prefill results, decode reports, polls) is timed with the process clock,
so the figure does not depend on what else the machine runs. Compare with the scheduler
actor's `overhead_ms_per_request` in a deployment (scripts/bench_runtime.py), which adds Ray.

    python scripts/bench_scheduler_core.py [--num-requests 2000] [--workers 4]
    python scripts/bench_scheduler_core.py --runtime-shape   # the shape of bench_runtime's overhead run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from raypd.planner import Workload  # noqa: E402
from scheduler import CostModel, PolicyConfig  # noqa: E402
from scheduler.simulator import SimRequest, Simulator, WorkerProfile  # noqa: E402

EVENTS = ("submit", "prefill_done", "decode_report", "poll", "abort", "worker_died", "probe_done")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4, help="prefill + decode workers (half each)")
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--runtime-shape", action="store_true",
                   help="scripts/bench_runtime.py's overhead run instead: 64 random 32-token prompts at once, "
                        "4 tokens each, 8 decode slots, 1 prefill + 1 decode worker")
    args = p.parse_args(argv)
    cost = CostModel((0.005, 2e-4, 0.0), (0.01, 0.0002, 0.0), 0.001, 1e10, 1000)
    if args.runtime_shape:
        args.num_requests, args.workers = 64, 2
        worker = WorkerProfile(cost, num_pages=2000, page_size=16, max_slots=8, max_seq_len=2112)
        rng = np.random.default_rng(0)
        requests = [SimRequest(0.0, tuple(rng.integers(3, 259, 32).tolist()), 4) for _ in range(64)]
        local = 0
    else:
        worker = WorkerProfile(cost, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096)
        requests = Workload(dataset="chat", num_requests=args.num_requests).requests(worker.max_seq_len, args.rate)
        local = 64
    sim = Simulator(worker, args.workers // 2, args.workers - args.workers // 2, PolicyConfig(local_prefill_max_len=local),
                    prefix_cache=True)
    spent = dict.fromkeys(EVENTS, 0.0)
    for name in EVENTS:
        method = getattr(sim.core, name)

        def timed(*a, _m=method, _n=name, **kw):
            t0 = time.process_time()
            try:
                return _m(*a, **kw)
            finally:
                spent[_n] += time.process_time() - t0

        setattr(sim.core, name, timed)
    sim.run(requests)
    total = sum(spent.values())
    per = 1e3 * total / args.num_requests
    print(f"scheduler core: {per:.3f} ms of CPU per request ({args.num_requests} requests, "
          f"{args.workers} workers); by event (ms/request): "
          + ", ".join(f"{k} {1e3 * v / args.num_requests:.3f}" for k, v in spent.items() if v))
    return dict(ms_per_request=per, by_event={k: 1e3 * v / args.num_requests for k, v in spent.items()})


if __name__ == "__main__":
    main()
