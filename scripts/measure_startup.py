"""Start-up and first-request figures of `raypd serve` (docs/BENCHMARKS.md, "Operability").

Runs `raypd serve --backend local` as a user would, several times, side by side:
  1. warm-up on, empty compilation cache   (a first start on a new machine)
  2. warm-up on, the cache from run 1      (a restart)
  3. warm-up on, cache off                 (a restart without the cache)
  4. warm-up off, cache off                (what happened before warm-up existed)
For each: seconds until the ready line, then the TTFT of the first request after ready and the
median TTFT of warm requests (the same prompt lengths again, other tokens), over gRPC.

    python scripts/measure_startup.py --model tiny-random --max-seq-len 64 --max-slots 2 --lengths 10,30 \
        --out docs/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_server(model: str, cache: str, warmup: bool, engine_args: list[str]) -> tuple[subprocess.Popen, dict, float]:
    cmd = [sys.executable, "-m", "raypd.cli", "serve", "--backend", "local", "--model", model, "--grpc-port", "0",
           "--compile-cache", cache, "--request-log-level", "off", "--stats-interval-s", "0", *engine_args]
    if not warmup:
        cmd.append("--no-warmup")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()  # the ready line; the deadline is the caller's (timeout of this script)
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError(f"no ready line from {' '.join(cmd)} (exit {proc.wait()})")
    return proc, json.loads(line), time.perf_counter() - start


def ttft(stub, pb, ids: list[int]) -> float:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    return stub.Generate(req, timeout=600).timings.ttft_s


def measure(model: str, cache: str, warmup: bool, lengths: list[int], repeats: int, engine_args: list[str]) -> dict:
    import grpc

    from raypd.proto import raypd_pb2 as pb
    from raypd.proto import raypd_pb2_grpc

    proc, info, ready_s = start_server(model, cache, warmup, engine_args)
    try:
        with grpc.insecure_channel(info["grpc"]) as ch:
            stub = raypd_pb2_grpc.GenerationStub(ch)
            first = [ttft(stub, pb, [5 + (i % 50) for i in range(n)]) for n in lengths]
            warm = [ttft(stub, pb, [7 + (i % 40) for i in range(n)]) for n in lengths for _ in range(repeats)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    return dict(cache=cache != "off", warmup=warmup, ready_s=round(ready_s, 2),
                first_ttft_ms=[round(t * 1e3, 1) for t in first],
                warm_ttft_median_ms=round(statistics.median(warm) * 1e3, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="model to serve")
    p.add_argument("--lengths", default="10,100,400", help="prompt lengths of the first requests (one per bucket)")
    p.add_argument("--max-seq-len", type=int, default=None, help="serve --max-seq-len (fewer shapes when small)")
    p.add_argument("--max-slots", type=int, default=None, help="serve --max-slots")
    p.add_argument("--repeats", type=int, default=3, help="warm requests per length")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    engine_args = [f for k, v in (("--max-seq-len", args.max_seq_len), ("--max-slots", args.max_slots))
                   if v is not None for f in (k, str(v))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="raypd-cc-") as cache:
        for label, cc, warmup in (("cold start, empty cache", cache, True), ("restart, with cache", cache, True),
                                  ("restart, cache off", "off", True), ("no warm-up, cache off", "off", False)):
            row = dict(run=label, **measure(args.model, cc, warmup, lengths, args.repeats, engine_args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(model=args.model, lengths=lengths, serve_args=engine_args, runs=rows),
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
