"""The engine loop before and after, side by side in one run: decode tokens/s and end to end.

The driver exports a base revision of the repository (`--base`, default the merge base with
main) into a temporary folder and runs the same measurements on it and on this checkout, one
after the other in fresh processes, alternating for `--rounds` rounds (best of each kept):
  - decode tokens/s at batch 1 / 8 / 32 / 64: B prompts of --prompt-len tokens prefilled and
    inserted, then `decode_step` until all have generated --decode-steps more tokens, timed
    after a warm-up pass of the same shape (the overlapped loop as every caller runs it; this
    checkout also with one step per dispatch, `max_steps=1`);
  - end to end: `raypd.generate(..., backend="local")` of 32 prompts x 128 tokens, 64 greedy
    tokens each, best of two after a warm-up.

    python scripts/bench_decode_loop.py [--base REV] [--model bench-random] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(args) -> dict:
    """Runs inside a tree (its raypd imported): -> {"decode_tok_s": {B: .}, "e2e_tok_s": .}."""
    import inspect

    import numpy as np

    import models
    import raypd
    from raypd.api import LocalBackend
    from raypd.engine.api import Request, SamplingParams
    from raypd.engine.decode import DecodeEngine
    from raypd.engine.prefill import PrefillEngine
    from raypd.engine.runner import EngineConfig, ModelRunner

    model = models.load(args.model, dtype="float32")
    rng = np.random.RandomState(0)
    prompt = lambda n: [int(t) for t in rng.randint(3, model.config.vocab_size, n)]  # noqa: E731
    has_max_steps = "max_steps" in inspect.signature(DecodeEngine.decode_step).parameters
    out = {"decode_tok_s": {}, "decode_tok_s_one_step": {}}
    runner = ModelRunner(model, EngineConfig(page_size=16, max_slots=max(args.batches),
                                             max_seq_len=args.prompt_len + args.decode_steps + 16,
                                             prefill_buckets=(128, 256), kv_memory_bytes=1 << 30))
    prefill, decode = PrefillEngine(runner), DecodeEngine(runner)
    ids = iter(range(10**9))

    def run_decode(B, **kw):
        reqs = [Request(f"d{next(ids)}", prompt(args.prompt_len),
                        SamplingParams(max_tokens=args.decode_steps + 1, ignore_eos=True)) for _ in range(B)]
        for o, r in zip(prefill.prefill(reqs), reqs):
            decode.insert(r, o)
            prefill.release(o.request_id)
        t = time.perf_counter()
        done = 0
        while decode.num_running:
            done += len(decode.decode_step(**kw))
        assert done == B * args.decode_steps, done
        return done / (time.perf_counter() - t)

    variants = [("decode_tok_s", {})] + ([("decode_tok_s_one_step", {"max_steps": 1})] if has_max_steps else [])
    for B in args.batches:
        for key, kw in variants:
            run_decode(B, **kw)  # compile the shapes this range touches
            out[key][B] = max(run_decode(B, **kw) for _ in range(2))
    assert runner.allocator.num_used == 0
    del runner, prefill, decode

    backend = LocalBackend(model, EngineConfig(max_seq_len=min(2048, model.config.max_position_embeddings)))
    rng = np.random.RandomState(1)  # the same prompts whatever ran above
    prompts = [prompt(args.e2e_prompt_len) for _ in range(args.e2e_prompts)]

    def e2e():
        t = time.perf_counter()
        res = raypd.generate(prompts, model=backend, max_tokens=args.e2e_tokens, ignore_eos=True, backend="local")
        n = sum(len(c.token_ids) for c in res)
        assert n == args.e2e_prompts * args.e2e_tokens
        return n / (time.perf_counter() - t), [c.token_ids for c in res]

    e2e()  # warm-up: compiles the shapes this workload touches
    runs = [e2e() for _ in range(2)]
    out["e2e_tok_s"] = max(r[0] for r in runs)
    out["e2e_tokens_digest"] = zlib.crc32(str(runs[0][1]).encode())  # same tokens before and after
    return out


def export_tree(rev: str, dest: str) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def run_tree(tree: str, args) -> dict:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_decode_loop.py"), "--worker",
           "--model", args.model, "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps),
           "--batches", ",".join(map(str, args.batches)), "--e2e-prompts", str(args.e2e_prompts),
           "--e2e-prompt-len", str(args.e2e_prompt_len), "--e2e-tokens", str(args.e2e_tokens)]
    env = dict(os.environ, PYTHONPATH=tree)
    res = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(res.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    out = json.loads(json.dumps(runs[0]))
    for r in runs[1:]:
        for key in ("decode_tok_s", "decode_tok_s_one_step"):
            for B, v in r.get(key, {}).items():
                out[key][B] = max(out[key][B], v)
        out["e2e_tok_s"] = max(out["e2e_tok_s"], r["e2e_tok_s"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="revision to compare against (default: merge base with main)")
    ap.add_argument("--model", default="bench-random")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--e2e-prompts", type=int, default=32)
    ap.add_argument("--e2e-prompt-len", type=int, default=128)
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batches, args.decode_steps = "tiny-random", "1,4", 8
        args.e2e_prompts, args.e2e_prompt_len, args.e2e_tokens = 4, 16, 8
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(measure(args)))
        return
    base = args.base or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                       capture_output=True, text=True).stdout.strip()
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as old:
        export_tree(base, old)
        for _ in range(args.rounds):
            runs["before"].append(run_tree(old, args))
            runs["after"].append(run_tree(str(ROOT), args))
    before, after = best(runs["before"]), best(runs["after"])
    res = {"base": base, "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
           "before": before, "after": after}
    print(f"{'':24}{'before':>10}{'after':>10}{'ratio':>8}{'after, 1 step':>16}")
    for B in args.batches:
        k = str(B)
        b, a = before["decode_tok_s"][k], after["decode_tok_s"][k]
        one = after.get("decode_tok_s_one_step", {}).get(k, float("nan"))
        print(f"decode tok/s, batch {B:<4}{b:10.1f}{a:10.1f}{a / b:8.2f}{one:16.1f}")
    b, a = before["e2e_tok_s"], after["e2e_tok_s"]
    print(f"{'end to end tok/s':24}{b:10.1f}{a:10.1f}{a / b:8.2f}")
    print("same end-to-end tokens before and after:", before["e2e_tokens_digest"] == after["e2e_tokens_digest"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
