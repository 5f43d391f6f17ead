"""Time (wall and CPU) of the first request on a fresh engine, which compiles its programs, and
of a second one: a change that makes the sampler bigger shows up here as compile time.

Run it once per tree, e.g. a base revision exported with `git archive REV | tar -x -C DIR`:

    (cd DIR && PYTHONPATH=$PWD python /path/to/scripts/bench_first_request.py --label before)
    PYTHONPATH=$PWD python scripts/bench_first_request.py --label after
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="this tree")
    p.add_argument("--model", default="tiny-random")
    args = p.parse_args()

    import models
    import raypd
    from raypd.api import LocalBackend
    from raypd.engine.runner import EngineConfig

    config = EngineConfig(page_size=16, num_pages=64, max_slots=2, max_seq_len=256, prefill_buckets=(32,))
    backend = LocalBackend(models.load(args.model), config)
    times = []
    for _ in range(2):
        wall, cpu = time.perf_counter(), time.process_time()
        raypd.generate(["hello raypd"], model=backend, max_tokens=10, ignore_eos=True, backend="local")
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    print(json.dumps({"label": args.label, "first_wall_s": times[0][0], "first_cpu_s": times[0][1],
                      "second_wall_s": times[1][0], "second_cpu_s": times[1][1]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
