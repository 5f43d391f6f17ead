"""HTTP overhead of the OpenAI API: the same engine through `raypd serve --http-port` (its own
process, streamed /v1/completions, the bench's OpenAI target) and through the Python client
(an in-process EngineLoop, the bench's local target), side by side in one run.

  1. per request: one request at a time, a short prompt, max_tokens=1: median end-to-end
     latency of each; the difference is what HTTP adds to a request;
  2. per streamed token: 32 streams at once, 64 tokens each: output tokens/s of each, and the
     mean time per output token after the first (TPOT).
Wall-clock figures are only as steady as the machine; so each run also counts the CPU time
both processes spent (this one: client, and the engine when direct; the server's), and the
CPU per request and per token is what the noise disturbs least.
Both engines are the default model with the same EngineConfig (the CLI's), both warmed up by
running both workloads `--warmup-passes` times first (how requests group into prefill chunks
and decode batches varies from run to run, and a shape seen for the first time compiles);
rounds alternate (direct, HTTP, direct, HTTP, ...) so drift hits both, and each figure is the
median over rounds.

    python scripts/bench_openai.py --json docs/results/bench_openai.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypd.bench import runner, targets  # noqa: E402
from raypd.bench.workload import BenchRequest  # noqa: E402


def prompts(n: int, length: int, vocab: int, exclude, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(3, vocab), np.asarray(exclude, dtype=np.int64))
    return [rng.choice(allowed, length).tolist() for _ in range(n)]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of this process and of process `pid` (the server) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return time.process_time() + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(target, ids: list[list[int]], max_tokens: int, concurrency: int, server_pid: int) -> dict:
    reqs = [BenchRequest(i, p, max_tokens, 0.0) for i, p in enumerate(ids)]
    cpu = cpu_s(server_pid)
    res = runner.run(target, reqs, concurrency, progress=False)
    cpu = cpu_s(server_pid) - cpu
    bad = [r for r in res.records if r.status != "ok" or sum(r.chunk_tokens) != max_tokens]
    if bad:
        raise RuntimeError(f"{type(target).__name__}: {len(bad)} requests failed, e.g. {bad[0].error}")
    e2e = [r.end_s - r.sent_s for r in res.records]
    tpot = [(r.chunk_s[-1] - r.chunk_s[0]) / (max_tokens - 1) for r in res.records if max_tokens > 1]
    tokens = sum(sum(r.chunk_tokens) for r in res.records)
    return dict(e2e_median_s=statistics.median(e2e), e2e_mean_s=statistics.mean(e2e),
                tpot_mean_s=statistics.mean(tpot) if tpot else None, tokens_per_s=tokens / res.duration_s,
                duration_s=res.duration_s, cpu_per_request_s=cpu / len(reqs), cpu_per_token_s=cpu / tokens)


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "raypd.cli", "serve", "--backend", "local", "--grpc-port", "0",
                             "--http-port", "0", "--no-warmup"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"raypd serve exited with {proc.wait(60)}")
    return proc, json.loads(line)["http"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating measured rounds per target")
    p.add_argument("--warmup-passes", type=int, default=2, help="unmeasured passes of both workloads first")
    p.add_argument("--num-single", type=int, default=40, help="requests of the per-request workload")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams of the streaming workload")
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    proc, url = start_server()
    try:
        http = targets.OpenAITarget(url)
        direct = targets.LocalTarget(None, None, warmup=False)
        vocab, exclude = direct.vocab_size, direct.exclude_ids
        single = prompts(args.num_single, 8, vocab, exclude, 0)
        streams = prompts(2 * args.streams, 16, vocab, exclude, 1)
        workloads = {"per_request": (single, 1, 1), "streaming": (streams, args.stream_tokens, args.streams)}
        for _ in range(args.warmup_passes):  # compile the shapes both workloads use, in both engines
            for t in (direct, http):
                for ids, max_tokens, conc in workloads.values():
                    run(t, ids, max_tokens, conc, proc.pid)
        results = {name: {"direct": [], "http": []} for name in workloads}
        for _ in range(args.rounds):
            for name, (ids, max_tokens, conc) in workloads.items():
                for label, t in (("direct", direct), ("http", http)):
                    results[name][label].append(run(t, ids, max_tokens, conc, proc.pid))
        direct.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)

    def mean(name, label, key):  # the median over rounds
        return statistics.median(r[key] for r in results[name][label])

    summary = dict(
        per_request_overhead_ms=(mean("per_request", "http", "e2e_median_s")
                                 - mean("per_request", "direct", "e2e_median_s")) * 1e3,
        per_request_direct_ms=mean("per_request", "direct", "e2e_median_s") * 1e3,
        per_request_http_ms=mean("per_request", "http", "e2e_median_s") * 1e3,
        stream_tokens_per_s_direct=mean("streaming", "direct", "tokens_per_s"),
        stream_tokens_per_s_http=mean("streaming", "http", "tokens_per_s"),
        stream_tpot_direct_ms=mean("streaming", "direct", "tpot_mean_s") * 1e3,
        stream_tpot_http_ms=mean("streaming", "http", "tpot_mean_s") * 1e3)
    summary["cpu_per_request_direct_ms"] = mean("per_request", "direct", "cpu_per_request_s") * 1e3
    summary["cpu_per_request_http_ms"] = mean("per_request", "http", "cpu_per_request_s") * 1e3
    summary["cpu_per_token_direct_us"] = mean("streaming", "direct", "cpu_per_token_s") * 1e6
    summary["cpu_per_token_http_us"] = mean("streaming", "http", "cpu_per_token_s") * 1e6
    summary["stream_tokens_per_s_ratio"] = summary["stream_tokens_per_s_http"] / summary["stream_tokens_per_s_direct"]
    summary["per_token_overhead_ms"] = summary["stream_tpot_http_ms"] - summary["stream_tpot_direct_ms"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(summary=summary, rounds=results, args=vars(args) | {"json": str(args.json)},
                                             time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
