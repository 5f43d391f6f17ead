"""Kernel benchmark: projection layouts and paged attention, old path against new, in one process.

Sections (all on the `bench-random` shape, float32, this machine's XLA backend):
  proj   every projection of a layer (and the vocabulary head) at M = 1/8/32/64 decode rows and
         256/2048 prefill tokens: weight stored [in, out] (raypd's layout, `x @ W`) against
         [out, in] (HF's layout, `einsum("mk,nk")`), and fused QKV / gate-up against split.
  attn   one layer's paged attention: `reference` (gather the whole context, one softmax; the
         engines' old path) against `blockwise` (online softmax over page blocks read in place)
         at several block sizes; decode rows at batch 1/8/32/64, prefill chunks of 256/512/2048.
  step   the whole paged forward + sampling (`paged.step`) with either attention, decode at
         batch 1/8/32/64 and prefill chunks of 256 and 2048 tokens.
  chunks a 2048-token prompt prefilled in chunks of 256/512/1024/2048 (new path), and in
         chunks of 512 on the old path.

Timings are medians of interleaved repeats (old and new alternate, the order rotating each
round), so the load on a shared machine hits both alike; ratios are new over old throughput.

    python scripts/bench_kernels.py [--sections proj,attn,step,chunks] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models import PRESETS  # noqa: E402

CFG = PRESETS["bench-random"]


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument function, the functions alternating each round."""
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        # Rotate who goes first: a call right after a memory-heavy one was seen to run slower.
        for k in names[r % len(names):] + names[:r % len(names)]:
            f = fns[k]
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_proj(repeats: int) -> list[dict]:
    D, F, V = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size
    N, K, H = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    qkv = (N + 2 * K) * H
    mats = {"qkv": (D, qkv), "o": (N * H, D), "gate_up": (D, 2 * F), "down": (F, D), "lm_head": (D, V)}
    rng = np.random.default_rng(0)
    rows = []
    in_out = jax.jit(lambda x, w: x @ w)
    out_in = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))
    split2 = jax.jit(lambda x, a, b: (x @ a, x @ b))
    split3 = jax.jit(lambda x, a, b, c: (x @ a, x @ b, x @ c))
    for M in (1, 8, 32, 64, 256, 2048):
        for name, (i, o) in mats.items():
            if name == "lm_head" and M > 64:
                continue  # the engines only unembed the sampled rows
            x = jnp.asarray(rng.standard_normal((M, i), np.float32))
            w = jnp.asarray(rng.standard_normal((i, o), np.float32) * 0.02)
            wt = jnp.asarray(np.asarray(w).T.copy())
            fns = {"in_out": lambda: in_out(x, w), "out_in": lambda: out_in(x, wt)}
            if name == "qkv":
                parts = [jnp.asarray(np.asarray(w)[:, a:b]) for a, b in
                         ((0, N * H), (N * H, (N + K) * H), ((N + K) * H, qkv))]
                fns["split"] = lambda: split3(x, *parts)
            if name == "gate_up":
                parts = [jnp.asarray(np.asarray(w)[:, :F]), jnp.asarray(np.asarray(w)[:, F:])]
                fns["split"] = lambda: split2(x, *parts)
            t = interleaved(fns, repeats)
            flops = 2 * M * i * o
            row = {"M": M, "matrix": name, **{f"{k}_gflops": flops / s / 1e9 for k, s in t.items()}}
            rows.append(row)
            print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    return rows


def attn_case(B, T, ctx_len, num_pages, rng):
    from raypd.engine.attention import AttentionMeta

    K, Q, H, G = CFG.num_kv_heads, CFG.q_per_kv, CFG.head_dim, 16
    Pc = -(-ctx_len // G)
    q = jnp.asarray(rng.standard_normal((B, T, K, Q, H), np.float32))
    k = jnp.asarray(rng.standard_normal((B, T, K, H), np.float32))
    pool = jnp.asarray(rng.standard_normal((K, num_pages, G, H), np.float32))
    pages = rng.integers(1, num_pages, (B, Pc)).astype(np.int32)  # rows may share pages (reads only)
    positions = np.broadcast_to(np.arange(ctx_len, ctx_len + T, dtype=np.int32), (B, T))
    meta = AttentionMeta(jnp.asarray(positions), jnp.zeros((B, T), jnp.int32), jnp.asarray(pages),
                         jnp.full((B,), ctx_len, jnp.int32))
    return q, k, k, pool, pool, meta


def bench_attn(repeats: int, only_prefill: bool = False, only_decode: bool = False) -> list[dict]:
    from raypd.engine import attention

    rng = np.random.default_rng(0)
    rows = []
    points = [(B, 1, S) for B in (1, 8, 32, 64) for S in (512, 2048)]
    points += [(1, 256, 0), (1, 512, 1536), (1, 2048, 0)]
    if only_prefill or only_decode:
        points = [p for p in points if (p[1] > 1) == only_prefill]
    for B, T, S in points:
        args = attn_case(B, T, S, 1024, rng)
        fns = {"reference": jax.jit(lambda *a: attention.reference(*a, None))}
        fns["blockwise_default"] = jax.jit(lambda *a: attention.blockwise(*a, None))
        if T == 1:
            for n in (1, 2, 4, 8):
                fns[f"blockwise_p{n}"] = jax.jit(
                    lambda *a, n=n: attention.blockwise(*a, None, ctx_block_pages=n))
        else:
            fns["blockwise_q256_p2"] = jax.jit(
                lambda *a: attention.blockwise(*a, None, q_block=256, ctx_block_pages=2))
            for qb in (128, 256, 512):
                fns[f"blockwise_q{qb}"] = jax.jit(lambda *a, qb=qb: attention.blockwise(*a, None, q_block=qb))
        t = interleaved({k: (lambda f=f: f(*args)) for k, f in fns.items()}, repeats)
        row = {"B": B, "T": T, "ctx": S, **{f"{k}_ms": 1e3 * s for k, s in t.items()}}
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


def step_inputs(B, T, ctx_len, num_pages, rng, R=1):
    from raypd.engine import paged
    from raypd.engine.sampling import SamplingArrays

    G = 16
    Pc = -(-ctx_len // G)
    tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(ctx_len, ctx_len + T, dtype=np.int32), (B, T)).copy()
    write = (positions // G) % (num_pages - 1) + 1  # any page: the timing does not depend on it
    batch = paged.Batch(
        tokens=tokens, positions=positions, segments=np.zeros((B, T), np.int32),
        write_pages=write.astype(np.int32), write_offsets=(positions % G).astype(np.int32),
        ctx_pages=rng.integers(1, num_pages, (B, Pc)).astype(np.int32),
        ctx_lens=np.full((B,), ctx_len, np.int32),
        sample_index=np.full((B, R), T - 1, np.int32))
    N = B * R
    s = SamplingArrays(temperature=np.zeros(N, np.float32), top_k=np.zeros(N, np.int32),
                       top_p=np.ones(N, np.float32), seed=np.zeros(N, np.uint32),
                       position=np.zeros(N, np.int32), min_p=np.zeros(N, np.float32))
    return jax.tree.map(jnp.asarray, batch), jax.tree.map(jnp.asarray, s)


class Engines:
    """The bench-random weights once, viewed by the paged step with each attention."""

    def __init__(self, impls, num_pages):
        from models import load
        from raypd.engine import paged

        model = load("bench-random")
        self.params = {i: paged.unstack(model.params, i) for i in impls}
        self.cache = paged.init_cache(CFG, num_pages, 16)
        self.num_pages = num_pages

    def runner(self, impl, b, s):
        from raypd.engine import paged

        def run():
            self.cache, out = paged.step(self.params[impl], self.cache, b, s, CFG)
            return out.tokens
        return run


def bench_step(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    eng = Engines(("reference", "blockwise"), num_pages=600)
    rows = []
    points = [(B, 1, 512) for B in (1, 8, 32, 64)] + [(32, 1, 2048), (1, 256, 0), (1, 2048, 0)]
    for B, T, S in points:
        b, s = step_inputs(B, T, S, eng.num_pages, rng)
        t = interleaved({i: eng.runner(i, b, s) for i in ("reference", "blockwise")}, repeats)
        row = {"B": B, "T": T, "ctx": S, **{f"{k}_tok_s": B * T / v for k, v in t.items()}}
        row["speedup"] = t["reference"] / t["blockwise"]
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


def bench_chunks(repeats: int) -> list[dict]:
    """One 2048-token prompt in chunks of c tokens (each chunk reads the earlier ones from the
    pool): blockwise at several c, against the reference at the engines' old 512 bucket."""
    rng = np.random.default_rng(0)
    eng = Engines(("reference", "blockwise"), num_pages=600)
    prompt = 2048
    plans = [("blockwise", c) for c in (256, 512, 1024, 2048)] + [("reference", 512)]
    runs = {}
    for impl, c in plans:
        calls = [eng.runner(impl, *step_inputs(1, c, start, eng.num_pages, rng))
                 for start in range(0, prompt, c)]
        runs[f"{impl}_c{c}"] = lambda calls=calls: [f() for f in calls][-1]
    t = interleaved(runs, repeats)
    rows = [{"run": k, "prompt": prompt, "tok_s": prompt / v} for k, v in t.items()]
    for row in rows:
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="proj,attn,step,chunks")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    for name in args.sections.split(","):
        fn = {"proj": bench_proj, "attn": bench_attn, "step": bench_step, "chunks": bench_chunks}.get(name)
        if fn is None:
            raise SystemExit(f"--sections: unknown section {name!r} (proj, attn, step, chunks)")
        print(f"== {name}", flush=True)
        out[name] = fn(args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
