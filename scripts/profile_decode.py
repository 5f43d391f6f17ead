"""Where a decode step's time goes: step time vs batch size and context length.

One jitted decode step of the engine (`ModelRunner.run`) on a synthetic batch: B rows, each
attending to Pc pages of context. The context-free point (Pc=1) is the projection cost; the
slope over Pc is the paged-attention cost.

    python scripts/profile_decode.py [--model bench-random] [--batches 1,8,32] [--pages 1,4,12,16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-random")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--pages", default="1,4,12,16")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    import models
    from raypd.engine.runner import EngineConfig, ModelRunner

    batches = [int(x) for x in args.batches.split(",")]
    pages = [int(x) for x in args.pages.split(",")]
    runner = ModelRunner(models.load(args.model, dtype="float32"), EngineConfig(
        page_size=16, max_slots=max(batches), max_seq_len=16 * max(pages) + 16, prefill_buckets=(16,),
        num_pages=max(pages) + 2))
    G = runner.page_size
    print(f"{'B':>4} {'context':>8} {'ms/step':>9} {'tok/s':>8}")
    for B in batches:
        for Pc in pages:
            b, s = runner.empty_batch(B, 1, 1, Pc)
            pos = Pc * G - 1
            b["positions"][:] = pos
            b["segments"][:] = 0
            b["ctx_lens"][:] = pos
            b["ctx_pages"][:] = np.arange(1, Pc + 1)[None]
            b["write_pages"][:] = Pc
            b["write_offsets"][:] = G - 1
            runner.run(b, s)
            t = time.perf_counter()
            for _ in range(args.steps):
                runner.run(b, s)
            dt = (time.perf_counter() - t) / args.steps
            print(f"{B:>4} {pos:>8} {dt * 1e3:>9.1f} {B / dt:>8.0f}")


if __name__ == "__main__":
    main()
