"""Prefill worker throughput with its jobs packed into shared chunks against one at a time.

One `PrefillWorker` (the JAX engines, in-process transport, no Ray) is handed the same kind of
batch two ways, alternating each round so load on a shared machine hits both alike:
  packed     all jobs in one `prefill(jobs)` call: the engine packs the prompts into shared
             chunks (up to the largest prefill bucket, at most `max_prefill_segments` prompts)
  one-by-one one `prefill([job])` call per job (the worker's behaviour before packing)
Each round draws fresh prompts. Reported: prefill tokens/s (prompt tokens / wall time of the
calls, K/V send included) as the median over rounds, for each prompt length, and the ratio.

    python scripts/bench_prefill_packing.py [--model bench-random] [--jobs 16] [--lengths 32,128,512]
        [--rounds 5] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-random")
    ap.add_argument("--jobs", type=int, default=16, help="jobs per prefill call")
    ap.add_argument("--lengths", default="32,128,512", help="prompt lengths (one batch of jobs each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny-random model, 8 jobs, 2 rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.jobs, args.rounds = "tiny-random", 8, 2

    from raypd.engine.api import Request, SamplingParams
    from raypd.engine.runner import EngineConfig
    from raypd.runtime.engines import JaxEngineFactory
    from raypd.runtime.workers import PrefillJob, PrefillWorker
    from raypd.transfer import make_transport

    lengths = [int(n) for n in args.lengths.split(",")]
    transport = make_transport("inproc")
    engine = EngineConfig(max_seq_len=max(lengths) + 16, kv_memory_bytes=1 << 30)  # default buckets and packing
    worker = PrefillWorker("bench", JaxEngineFactory(args.model, engine, dtype="float32"), lambda: transport)
    vocab = worker.engines.model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = iter(range(10**9))

    def jobs(n: int) -> list:
        params = SamplingParams(max_tokens=1)
        return [PrefillJob(Request(f"j{next(ids)}", rng.integers(3, vocab, size=n).tolist(), params), retain=False)
                for _ in range(args.jobs)]

    def run(batch: list, packed: bool) -> float:
        start = time.perf_counter()
        results = worker.prefill(batch)[0] if packed else [worker.prefill([j])[0][0] for j in batch]
        elapsed = time.perf_counter() - start
        for r in results:
            if isinstance(r, Exception):
                raise r
        worker.release_transfers([r.handle for r in results])
        return sum(len(j.request.prompt_ids) for j in batch) / elapsed

    out = {"config": {"model": args.model, "jobs": args.jobs, "rounds": args.rounds,
                      "prefill_buckets": list(engine.prefill_buckets),
                      "max_prefill_segments": engine.max_prefill_segments}, "points": []}
    for n in lengths:
        run(jobs(n), True), run(jobs(n), False)  # compile every shape either way touches
        samples = {True: [], False: []}
        for r in range(args.rounds):
            for packed in ((True, False) if r % 2 == 0 else (False, True)):
                samples[packed].append(run(jobs(n), packed))
        point = {"prompt_len": n, "packed_tok_s": float(np.median(samples[True])),
                 "one_by_one_tok_s": float(np.median(samples[False]))}
        point["ratio"] = point["packed_tok_s"] / point["one_by_one_tok_s"]
        out["points"].append(point)
        print(f"prompt {n:>5}: packed {point['packed_tok_s']:8.0f} tok/s, one by one "
              f"{point['one_by_one_tok_s']:8.0f} tok/s, ratio {point['ratio']:.2f}", flush=True)
    assert worker.status()["used_pages"] == [0] and transport.num_pending == 0
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
