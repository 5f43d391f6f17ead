"""Start-up and first-request figures of `raypd serve` (docs/BENCHMARKS.md, "Operability").

Runs `raypd serve` (--backend local or ray) as a user would, several times, side by side:
  1. warm-up on, empty compilation cache   (a first start on a new machine)
  2. warm-up on, the cache from run 1      (a restart)
  3. warm-up on, cache off                 (a restart without the cache)
  4. warm-up off, cache off                (what happened before warm-up existed)
For each: seconds until the ready line, then the TTFT of the first request after ready and the
median TTFT of warm requests (the same prompt lengths again, other tokens), over gRPC.
With --backend ray each run starts its own local Ray cluster and a deployment of one prefill
and one decode worker (no calibration); the workers share the run's compilation cache.

    python scripts/measure_startup.py --model tiny-random --max-seq-len 64 --max-slots 2 --lengths 10,30 \
        --out docs/results/startup.json
    python scripts/measure_startup.py --backend ray --model tiny-random --max-seq-len 64 --max-slots 2 \
        --lengths 10,30 --out docs/results/startup_ray.json
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


RAY_ARGS = ["--num-prefill", "1", "--num-decode", "1", "--no-calibrate"]


def start_server(backend: str, model: str, cache: str, warmup: bool,
                 engine_args: list[str]) -> tuple[subprocess.Popen, dict, float]:
    cmd = [sys.executable, "-m", "raypd.cli", "serve", "--backend", backend, "--model", model, "--grpc-port", "0",
           "--compile-cache", cache, "--request-log-level", "off", "--stats-interval-s", "0", *engine_args,
           *(RAY_ARGS if backend == "ray" else [])]
    if not warmup:
        cmd.append("--no-warmup")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a cluster of its own
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()  # the ready line; the deadline is the caller's (timeout of this script)
        while line and not line.startswith("{"):  # Ray may print lines of its own first
            line = proc.stdout.readline()
    except BaseException:  # stopped while it starts: it stops too (a stop while starting unwinds at once)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        raise
    if not line:
        raise RuntimeError(f"no ready line from {' '.join(cmd)} (exit {proc.wait()})")
    return proc, json.loads(line), time.perf_counter() - start


def ttft(stub, pb, ids: list[int]) -> float:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    return stub.Generate(req, timeout=600).timings.ttft_s


RUNS = {  # name: (label, cache on, warm-up on)
    "empty-cache": ("cold start, empty cache", True, True),
    "cache": ("restart, with cache", True, True),
    "cache-off": ("restart, cache off", False, True),
    "no-warmup": ("no warm-up, cache off", False, False),
}


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through measure's finally: the server (and its Ray cluster) stops


def measure(backend: str, model: str, cache: str, warmup: bool, lengths: list[int], repeats: int,
            engine_args: list[str]) -> dict:
    import grpc

    from raypd.proto import raypd_pb2 as pb
    from raypd.proto import raypd_pb2_grpc

    proc, info, ready_s = start_server(backend, model, cache, warmup, engine_args)
    try:
        with grpc.insecure_channel(info["grpc"]) as ch:
            stub = raypd_pb2_grpc.GenerationStub(ch)
            first = [ttft(stub, pb, [5 + (i % 50) for i in range(n)]) for n in lengths]
            warm = [ttft(stub, pb, [7 + (i % 40) for i in range(n)]) for n in lengths for _ in range(repeats)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"raypd serve exited with {proc.returncode} after SIGINT")
    return dict(cache=cache != "off", warmup=warmup, ready_s=round(ready_s, 2),
                first_ttft_ms=[round(t * 1e3, 1) for t in first],
                warm_ttft_median_ms=round(statistics.median(warm) * 1e3, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="raypd serve --backend")
    p.add_argument("--model", default="tiny-random", help="model to serve")
    p.add_argument("--lengths", default="10,100,400", help="prompt lengths of the first requests (one per bucket)")
    p.add_argument("--max-seq-len", type=int, default=None, help="serve --max-seq-len (fewer shapes when small)")
    p.add_argument("--max-slots", type=int, default=None, help="serve --max-slots")
    p.add_argument("--repeats", type=int, default=3, help="warm requests per length")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"which runs, in this order (of {', '.join(RUNS)}; 'cache' reads what 'empty-cache' wrote)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = p.parse_args()
    runs = args.runs.split(",")
    if not runs or set(runs) - set(RUNS):
        p.error(f"--runs must name some of {', '.join(RUNS)}, got {args.runs!r}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    lengths = [int(n) for n in args.lengths.split(",")]
    engine_args = [f for k, v in (("--max-seq-len", args.max_seq_len), ("--max-slots", args.max_slots))
                   if v is not None for f in (k, str(v))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="raypd-cc-") as cache:
        for name in runs:
            label, is_cached, warmup = RUNS[name]
            row = dict(run=label, **measure(args.backend, args.model, cache if is_cached else "off", warmup, lengths,
                                            args.repeats, engine_args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(backend=args.backend, model=args.model, lengths=lengths,
                                            serve_args=engine_args, load_average=os.getloadavg(), runs=rows),
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
