"""Engine benchmark: raypd's prefill and decode against HF transformers and this machine's ceilings.

Everything is measured in one run, on the same weights and the same number of threads:
  - machine ceilings: memory bandwidth (a large array copy) and float32 matmul FLOP/s;
  - raypd prefill tokens/s for one prompt of 128 / 512 / 2048 tokens;
  - raypd decode tokens/s at batch 1 / 8 / 32 / 64 (prompts of --prompt-len tokens, then
    --decode-steps steps, timed after a warm-up that compiles every shape);
  - the same points for HF `transformers` (prefill = one forward pass; decode = generate time
    minus its prefill, over the new tokens);
  - the roofline floor of every point from the measured ceilings.

    python scripts/bench_engine.py [--json out.json] [--model bench-random] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_ceilings() -> dict:
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu":  # one memcpy per core, each over its share of 512 MiB
        from concurrent.futures import ThreadPoolExecutor

        n_threads = os.cpu_count() or 1
        src = np.ones(512 << 20 >> 3, np.float64)
        dst = np.empty_like(src)
        parts = np.array_split(np.arange(src.size), n_threads)
        spans = [(int(p[0]), int(p[-1]) + 1) for p in parts]
        with ThreadPoolExecutor(n_threads) as pool:
            copy = lambda: list(pool.map(lambda ab: np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]]), spans))  # noqa: E731
            copy()
            copy_s = timed(copy, 5)
        nbytes = src.nbytes
    else:
        a = jnp.ones(512 << 20 >> 2, jnp.float32)
        copy = jax.jit(lambda a: a + 1.0)
        copy(a).block_until_ready()
        copy_s = timed(lambda: copy(a).block_until_ready(), 5)
        nbytes = a.nbytes
    bandwidth = 2 * nbytes / copy_s  # read + write
    n = 2048
    x = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(x).block_until_ready()
    mm_s = timed(lambda: mm(x).block_until_ready(), 5)
    return {"mem_bandwidth_Bps": bandwidth, "matmul_flops": 2 * n**3 / mm_s}


def model_costs(cfg) -> dict:
    itemsize = np.dtype(cfg.dtype).itemsize if cfg.dtype != "bfloat16" else 2
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    matmul_params = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * V
    return {"matmul_params": matmul_params, "weight_bytes": itemsize * matmul_params,
            "kv_bytes_per_token": 2 * L * K * H * itemsize}


PREFILL_BUCKETS = (128, 256)


def raypd_points(model, prefill_lens, batches, prompt_len, steps) -> dict:
    from raypd.engine.api import Request, SamplingParams
    from raypd.engine.decode import DecodeEngine
    from raypd.engine.prefill import PrefillEngine
    from raypd.engine.runner import EngineConfig, ModelRunner

    rng = np.random.RandomState(0)
    prompt = lambda n: [int(t) for t in rng.randint(3, model.config.vocab_size, n)]  # noqa: E731
    # Chunked prefill with 256-token chunks (measured faster here than one 2048-token chunk:
    # the attention scores of a chunk stay small).
    runner = ModelRunner(model, EngineConfig(
        page_size=16, max_slots=max(batches), max_seq_len=max(max(prefill_lens), prompt_len + steps + 8),
        prefill_buckets=PREFILL_BUCKETS, kv_memory_bytes=1 << 30))
    prefill, decode = PrefillEngine(runner), DecodeEngine(runner)
    out = {"prefill_tok_s": {}, "decode_tok_s": {}}
    ids = iter(range(10**9))
    for n in prefill_lens:
        p = prompt(n)

        def one():
            (o,) = prefill.prefill([Request(f"p{next(ids)}", p, SamplingParams(max_tokens=1))])
            prefill.release(o.request_id)

        one()  # compile
        out["prefill_tok_s"][n] = n / timed(one, 3)
    for B in batches:
        def run_decode(n_steps):
            reqs = [Request(f"d{next(ids)}", prompt(prompt_len), SamplingParams(max_tokens=n_steps + 1, ignore_eos=True))
                    for _ in range(B)]
            for o, r in zip(prefill.prefill(reqs), reqs):
                decode.insert(r, o)
                prefill.release(o.request_id)
            t = time.perf_counter()
            done = 0
            while decode.num_running:
                done += len(decode.decode_step())
            return done / (time.perf_counter() - t)

        run_decode(steps)  # compile every page bucket this range touches
        out["decode_tok_s"][B] = max(run_decode(steps) for _ in range(2))
    assert runner.allocator.num_used == 0
    return out


def hf_points(model, prefill_lens, batches, prompt_len, steps, threads) -> dict:
    import torch
    import transformers

    from models.weights import save_hf

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        save_hf(d, model.params, model.config)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    out = {"prefill_tok_s": {}, "decode_tok_s": {}}
    with torch.inference_mode():
        for n in prefill_lens:
            x = torch.tensor(rng.randint(3, model.config.vocab_size, (1, n)))
            hf(x)
            out["prefill_tok_s"][n] = n / timed(lambda: hf(x), 2)
        for B in batches:
            x = torch.tensor(rng.randint(3, model.config.vocab_size, (B, prompt_len)))
            mask = torch.ones_like(x)
            gen = lambda k: hf.generate(x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,  # noqa: E731
                                        do_sample=False, pad_token_id=0)
            gen(2)
            t_pre = timed(lambda: gen(1), 1)  # prefill + first token
            t_all = timed(lambda: gen(steps + 1), 1)
            out["decode_tok_s"][B] = B * steps / (t_all - t_pre)
    return out


def roofline(costs, ceil, prefill_lens, batches, prompt_len, steps) -> dict:
    bw, peak = ceil["mem_bandwidth_Bps"], ceil["matmul_flops"]
    P, cfg_kv = costs["matmul_params"], costs["kv_bytes_per_token"]
    ctx = prompt_len + steps / 2  # mean context during the timed decode
    dec = {}
    for B in batches:
        step_s = max((costs["weight_bytes"] + B * ctx * cfg_kv) / bw, 2 * P * B / peak)
        dec[B] = B / step_s
    pre = {n: peak / (2 * P) for n in prefill_lens}  # attention FLOPs left out: a lower bound on time
    b1_floor_s = costs["weight_bytes"] / bw
    return {"prefill_tok_s": pre, "decode_tok_s": dec, "batch1_step_floor_s": b1_floor_s}


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-random")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline (e.g. on a GPU machine)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = ap.parse_args(argv)

    import jax

    import models

    prefill_lens = (128, 512, 2048) if not args.quick else (32, 64)
    batches = (1, 8, 32, 64) if not args.quick else (1, 4)
    model = models.load(args.model, dtype="float32" if jax.default_backend() == "cpu" else None)
    ceil = machine_ceilings()
    costs = model_costs(model.config)
    res = {"config": {"model": args.model, "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
                      "threads": args.threads, "device": str(jax.devices()[0]), "platform": platform.platform(),
                      "jax": jax.__version__, "git_sha": git_sha(), "params": model.config.num_params()},
           "ceilings": ceil}
    res["raypd"] = raypd_points(model, prefill_lens, batches, args.prompt_len, args.decode_steps)
    if not args.no_hf:
        res["hf"] = hf_points(model, prefill_lens, batches, args.prompt_len, args.decode_steps, args.threads)
    res["roofline"] = roofline(costs, ceil, prefill_lens, batches, args.prompt_len, args.decode_steps)
    b1 = res["raypd"]["decode_tok_s"][batches[0]]
    res["batch1_step_vs_floor"] = (1 / b1) / res["roofline"]["batch1_step_floor_s"]

    print(f"\nmachine: {ceil['mem_bandwidth_Bps'] / 1e9:.1f} GB/s copy bandwidth, "
          f"{ceil['matmul_flops'] / 1e9:.0f} GFLOP/s float32 matmul ({res['config']['device']})")
    for kind, points in (("prefill", prefill_lens), ("decode", batches)):
        key = f"{kind}_tok_s"
        print(f"\n{kind} tok/s   " + "".join(f"{p:>10}" for p in points))
        for who in ("raypd", "hf", "roofline"):
            if who in res:
                print(f"{who:<14}" + "".join(f"{res[who][key][p]:>10.0f}" for p in points))
        if "hf" in res:
            print(f"{'raypd / hf':<14}" + "".join(f"{res['raypd'][key][p] / res['hf'][key][p]:>10.2f}" for p in points))
        print(f"{'raypd / roof':<14}" + "".join(f"{res['raypd'][key][p] / res['roofline'][key][p]:>10.2f}" for p in points))
    print(f"\nbatch-1 decode step / weight-bytes floor: {res['batch1_step_vs_floor']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
