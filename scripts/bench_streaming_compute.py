"""What layer streaming costs the prefill itself, in one process (no transfer; parts dropped).

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c 0 python scripts/bench_streaming_compute.py [--tokens 2048] [--layer-groups 12]

One bench-random prompt prefilled as one chunk, modes interleaved after a warm-up of each:
  plain  one program (`PrefillEngine.step()`),
  split  one program per layer group, `on_layers` a no-op,
  none / int8  `StreamingSender` encoding and sending each group (inproc transport; the
         receiver side is dropped, so only the sender's work is timed).
Prints the seconds of each run (prefill until every layer's K/V is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from raypd.engine.api import Request, SamplingParams  # noqa: E402
from raypd.engine.prefill import PrefillEngine  # noqa: E402
from raypd.engine.runner import EngineConfig, ModelRunner  # noqa: E402
from raypd.transfer import StreamingSender, make_transport  # noqa: E402

MODES = ("plain", "split", "none", "int8")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layer-groups", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.tokens
    cfg = EngineConfig(page_size=16, num_pages=n // 16 + 2, max_slots=1, max_seq_len=n, prefill_buckets=(n,),
                       max_prefill_segments=1, layer_groups=args.layer_groups)
    runner = ModelRunner(models.load("bench-random"), cfg)
    transport = make_transport("inproc")
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 32000, n)]
    count = iter(range(10**6))

    def run(mode):
        prefill = PrefillEngine(runner)
        sender = StreamingSender(prefill, transport, lambda part: transport.release(part.handle),
                                 mode if mode in ("none", "int8") else "none")
        req = Request(f"r{next(count)}", prompt, SamplingParams(max_tokens=1))
        t0 = time.monotonic()
        if mode == "plain":
            prefill.add(req)
            prefill.step()
        elif mode == "split":
            prefill.add(req)
            prefill.step(on_layers=lambda lo, hi, pieces: None)
        else:
            sender.add(req)
            sender.step()
        jax.block_until_ready((runner.cache.k, runner.cache.v))
        elapsed = time.monotonic() - t0
        sender.release(req.request_id)
        return elapsed

    for mode in MODES:
        run(mode)
    res = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            res[mode].append(round(run(mode), 3))
    print(json.dumps(dict(tokens=n, layer_groups=args.layer_groups, seconds=res)))


if __name__ == "__main__":
    main()
