"""What penalties and top logprobs cost in the decode loop, side by side in one process.

One runner, the shapes compiled by a first pass of every variant; then rounds alternate between the variants below, each
timing `decode_step` until B requests have generated --decode-steps tokens (best per variant):
  plain      no penalties, no top logprobs (what every request paid before they existed: the
             `lax.cond`s skip the work, the per-slot counts are not touched)
  penalties  every request with frequency, presence and repetition penalties and a logit_bias
  top        every request with top_logprobs=20
  mixed      one request with penalties, the others plain (the cond runs for the whole batch)
The "unused" cost against the code before these existed is measured by
scripts/bench_decode_loop.py (base revision vs this checkout).

    python scripts/bench_penalties.py [--model bench-random] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-random")
    p.add_argument("--batch", type=int, default=32, help="requests decoding together (B)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import numpy as np

    import models
    from raypd.engine.api import Request, SamplingParams
    from raypd.engine.decode import DecodeEngine
    from raypd.engine.prefill import PrefillEngine
    from raypd.engine.runner import EngineConfig, ModelRunner

    model = models.load(args.model, dtype="float32")
    runner = ModelRunner(model, EngineConfig(page_size=16, max_slots=args.batch,
                                             max_seq_len=args.prompt_len + args.decode_steps + 16,
                                             prefill_buckets=(args.prompt_len,), kv_memory_bytes=1 << 30))
    prefill, decode = PrefillEngine(runner), DecodeEngine(runner)
    rng = np.random.RandomState(0)
    V = model.config.vocab_size
    base = dict(max_tokens=args.decode_steps + 1, ignore_eos=True)
    penal = dict(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2, logit_bias={5: 1.0, 9: -2.0})
    variants = {"plain": lambda i: base, "penalties": lambda i: {**base, **penal},
                "top": lambda i: {**base, "top_logprobs": 20}, "mixed": lambda i: {**base, **(penal if i == 0 else {})}}
    ids = iter(range(10**9))

    def run(make) -> float:
        reqs = [Request(f"r{next(ids)}", rng.randint(3, V, args.prompt_len).tolist(), SamplingParams(**make(i)))
                for i in range(args.batch)]
        for o, r in zip(prefill.prefill(reqs), reqs):
            decode.insert(r, o)
            prefill.release(o.request_id)
        t, done = time.perf_counter(), 0
        while decode.num_running:
            done += len(decode.decode_step())
        assert done == args.batch * args.decode_steps, done
        return done / (time.perf_counter() - t)

    for make in variants.values():  # compiles the shapes the runs touch (the same for every variant)
        run(make)
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, make in variants.items():
            results[name].append(run(make))
    summary = {f"{name}_tok_s": max(v) for name, v in results.items()}
    for name in ("penalties", "top", "mixed"):
        summary[f"{name}_vs_plain"] = summary[f"{name}_tok_s"] / summary["plain_tok_s"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(summary=summary, rounds=results, args={**vars(args), "json": str(args.json)},
                                             time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
