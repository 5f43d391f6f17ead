"""CPU time the scheduler core (scheduler/core.py) spends per request: every event of a
simulated run (submit, prefill results, decode reports, polls) is timed with the process clock,
so the figure does not depend on what else the machine runs. Compare with the scheduler
actor's `overhead_ms_per_request` in a deployment (scripts/bench_runtime.py), which adds Ray.

    python scripts/bench_scheduler_core.py [--num-requests 2000] [--workers 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.planner import Workload  # noqa: E402
from scheduler import CostModel, PolicyConfig  # noqa: E402
from scheduler.simulator import Simulator, WorkerProfile  # noqa: E402

EVENTS = ("submit", "prefill_done", "decode_report", "poll", "abort", "worker_died", "probe_done")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4, help="prefill + decode workers (half each)")
    p.add_argument("--rate", type=float, default=20.0)
    args = p.parse_args(argv)
    cost = CostModel((0.005, 2e-4, 0.0), (0.01, 0.0002, 0.0), 0.001, 1e10, 1000)
    worker = WorkerProfile(cost, num_pages=4096, page_size=16, max_slots=32, max_seq_len=4096)
    sim = Simulator(worker, args.workers // 2, args.workers - args.workers // 2, PolicyConfig(local_prefill_max_len=64),
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
    sim.run(Workload(dataset="chat", num_requests=args.num_requests).requests(worker.max_seq_len, args.rate))
    total = sum(spent.values())
    per = 1e3 * total / args.num_requests
    print(f"scheduler core: {per:.3f} ms of CPU per request ({args.num_requests} chat requests, "
          f"{args.workers} workers); by event (ms/request): "
          + ", ".join(f"{k} {1e3 * v / args.num_requests:.3f}" for k, v in spent.items() if v))
    return dict(ms_per_request=per, by_event={k: 1e3 * v / args.num_requests for k, v in spent.items()})


if __name__ == "__main__":
    main()
