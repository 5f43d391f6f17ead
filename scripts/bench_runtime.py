"""Runtime benchmark (small; the full study is [bench]): prefix reuse TTFT and scheduler overhead.

  1. TTFT of a 2048-token prompt, cold (nothing cached) vs warm (its first 90% was served
     before, so the prefill worker reuses those pages from the KV index and computes the rest),
     and warm from the host tier: the pool copies were dropped (`clear_cache(pools_only=True)`),
     so the shared pages are fetched from their host copies in the object store.
     Each pair uses fresh random prompts; one pair runs first to compile every shape.
     TTFT is measured by the scheduler: from `submit` to the first token reaching it (prefill,
     K/V transfer to the decode worker, insert).
  2. The scheduler's own overhead per request: time spent in the scheduler's code (validation,
     admission, placement, index, bookkeeping; not the awaits) over many short requests.

    python scripts/bench_runtime.py --model bench-random [--append docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench-random")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--shared", type=float, default=0.9, help="fraction of the warm prompt shared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-buckets", default="32,64,128,256,512",
                    help="chunk lengths compiled for prefill; the warm prompt's uncached tail is padded "
                         "to one of them, so coarse buckets cap the speedup")
    ap.add_argument("--num-overhead-requests", type=int, default=64)
    ap.add_argument("--host-copies", default="none", choices=["none", "int8"], help="host tier compression")
    ap.add_argument("--append", type=Path, default=None, help="append a Runtime section to this markdown file")
    args = ap.parse_args()

    import numpy as np
    import ray

    import raypd
    from raypd.engine.runner import EngineConfig

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    engine = EngineConfig(page_size=16, max_seq_len=args.prompt_len + 64, kv_memory_bytes=512 << 20,
                          max_slots=8, prefill_buckets=tuple(int(b) for b in args.prefill_buckets.split(",")))
    start = time.perf_counter()
    d = raypd.serve(args.model, name="bench-runtime", engine_config=engine, calibrate=True,
                    host_copies=args.host_copies)
    startup_s = time.perf_counter() - start
    log(f"deployment up in {startup_s:.0f} s: {json.dumps(d.status()['calibration'].get('cost'))}")
    rng = np.random.default_rng(0)
    n, shared = args.prompt_len, int(args.prompt_len * args.shared)

    def wait_for_host_copy():
        deadline = time.monotonic() + 60
        while d.status()["index"]["num_host_objects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    def pair(from_host: bool):
        base = rng.integers(3, 259, size=n).tolist()
        warm = base[:shared] + rng.integers(3, 259, size=n - shared).tolist()
        (cold_c,) = d.generate([base], max_tokens=2, ignore_eos=True)
        if from_host:
            wait_for_host_copy()
            d.clear_cache(pools_only=True)
        (warm_c,) = d.generate([warm], max_tokens=2, ignore_eos=True)
        log(f"cold TTFT {cold_c.metrics['ttft_s'] * 1e3:.0f} ms, warm{' (host copy)' if from_host else ''} "
            f"{warm_c.metrics['ttft_s'] * 1e3:.0f} ms ({warm_c.metrics['num_computed_tokens']} tokens computed)")
        return cold_c.metrics, warm_c.metrics

    for from_host in (False, True):  # compile every shape each path uses
        pair(from_host)
        d.clear_cache()
    colds, warms, hosts = [], [], []
    for _ in range(args.repeats):
        for from_host, out in ((False, warms), (True, hosts)):
            c, w = pair(from_host)
            colds.append(c)
            out.append(w)
            d.clear_cache()
    cold_s = statistics.median(m["ttft_s"] for m in colds)
    warm_s = statistics.median(m["ttft_s"] for m in warms)
    host_s = statistics.median(m["ttft_s"] for m in hosts)

    before = d.status()
    prompts = [rng.integers(3, 259, size=32).tolist() for _ in range(args.num_overhead_requests)]
    start = time.perf_counter()
    d.generate(prompts, max_tokens=4, ignore_eos=True)
    batch_s = time.perf_counter() - start
    after = d.status()
    total_ms = (after["overhead_ms_per_request"] * after["num_requests"]
                - before["overhead_ms_per_request"] * before["num_requests"])
    num = after["num_requests"] - before["num_requests"]
    overhead_ms = total_ms / num
    overhead_cpu_ms = (after["overhead_cpu_ms_per_request"] * after["num_requests"]
                       - before["overhead_cpu_ms_per_request"] * before["num_requests"]) / num
    by_event = {k: 1e3 * (v - before["overhead_s_by_event"].get(k, 0.0)) / num
                for k, v in after["overhead_s_by_event"].items()}
    log(f"scheduler overhead {overhead_ms:.2f} ms per request ({overhead_cpu_ms:.2f} ms of its thread's CPU): "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(by_event.items(), key=lambda kv: -kv[1])))
    d.clear_cache()
    d.shutdown()
    ray.shutdown()

    result = dict(model=args.model, prompt_len=n, shared_len=shared, cold_ttft_s=cold_s, warm_ttft_s=warm_s,
                  speedup=cold_s / warm_s, cold_computed=colds[0]["num_computed_tokens"],
                  warm_computed=warms[0]["num_computed_tokens"], host_ttft_s=host_s, host_speedup=cold_s / host_s,
                  host_computed=hosts[0]["num_computed_tokens"], host_copies=args.host_copies,
                  overhead_ms_per_request=overhead_ms, overhead_cpu_ms_per_request=overhead_cpu_ms,
                  overhead_ms_by_event=by_event,
                  num_overhead_requests=args.num_overhead_requests, overhead_batch_s=batch_s, repeats=args.repeats,
                  startup_s=startup_s, local_prefill_max_len=after["local_prefill_max_len"],
                  cost=after["calibration"].get("cost"))
    print(json.dumps(result, indent=1))
    if args.append:
        write_section(args.append, result, " ".join(["python", *sys.argv]))
    return 0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_section(path: Path, r: dict, command: str) -> None:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    text = f"""
## Runtime

`{command}` on {cpu}, CPU only (JAX_PLATFORMS=cpu), one prefill and one decode worker as Ray
actors on one node, K/V through the Ray object store (no compression). TTFT is measured by the
scheduler (submit -> first token at the scheduler: prefill + transfer + insert); medians of
{r['repeats']} cold/warm pairs, fresh random prompts per pair, one pair first to compile.

| {r['model']}, {r['prompt_len']}-token prompt | TTFT | prompt tokens computed |
|---|---|---|
| cold (nothing cached) | {r['cold_ttft_s'] * 1e3:.0f} ms | {r['cold_computed']} |
| warm ({r['shared_len']} tokens shared with an earlier prompt) | {r['warm_ttft_s'] * 1e3:.0f} ms | {r['warm_computed']} |
| speedup (target >= 5x) | {r['speedup']:.1f}x | |
| warm from host copies ({r['host_copies']}; pool copies dropped first) | {r['host_ttft_s'] * 1e3:.0f} ms | {r['host_computed']} |
| speedup from the host tier | {r['host_speedup']:.1f}x | |

Scheduler overhead: {r['overhead_ms_per_request']:.3f} ms per request (target <= 2 ms): time spent
in the scheduler actor's own code (validation and tokenization, admission, placement, KV index
lookups/publishes, bookkeeping of chunks), measured over {r['num_overhead_requests']} 32-token
requests submitted together ({r['overhead_batch_s']:.2f} s end to end for the batch).
Start-up (actors, model load, calibration) took {r['startup_s']:.0f} s; the calibrated local
prefill threshold (conditional disaggregation) came out at {r['local_prefill_max_len']} tokens.
"""
    with open(path, "a") as f:
        f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
