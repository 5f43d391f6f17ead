"""HTTP overhead of the OpenAI API against the Python client, on one and the same backend.

One in-process engine (the default model, a small EngineConfig whose every shape is compiled
first, so no run pays for the compiler) serves both clients in turn:
  direct  the backend interface the HTTP app and the gRPC server use (`backend.submit` and the
          stream's `get`), from client threads of this process;
  http    streamed /v1/completions through the OpenAI app on uvicorn (this process, loopback),
          from the bench's OpenAI target (`raypd bench --target openai`), also in this process.
Two workloads:
  1. per request: one request at a time, an 8-token prompt, max_tokens=1: median end-to-end
     latency; http - direct is what HTTP adds to a request;
  2. per streamed token: 32 streams at once, 64 tokens each (64 requests): output tokens/s,
     mean time per output token after the first (TPOT).
Rounds alternate (direct, http, direct, http, ...) so drift hits both; each figure is the median
over rounds. Wall-clock figures are only as steady as the machine, so each run also counts the
CPU time of this process (engine, server and clients all live here), per request and per
token: http - direct is the CPU the HTTP path costs, client side included (an upper bound on
the server's share).

    python scripts/bench_openai.py --json docs/results/bench_openai.json

`--engine arithmetic` serves the same workloads from the arithmetic stand-in engine
(raypd/engine/arithmetic.py: no model, no compiler: its steps are cheap host arithmetic), so
the per-request figures are mostly what the HTTP path and the Python client path cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.bench import runner, targets  # noqa: E402
from raypd.bench.workload import BenchRequest  # noqa: E402


class DirectTarget:
    """The Python client's path: the backend interface itself (what the HTTP app calls)."""

    burst_gap_s = 0.0

    def __init__(self, backend):
        self.backend = backend

    def stream(self, prompt_ids, max_tokens):
        from raypd.engine.api import SamplingParams
        from raypd.server.backends import Job

        s = self.backend.submit(Job(list(prompt_ids), "prompt", SamplingParams(max_tokens=max_tokens,
                                                                               ignore_eos=True)))
        is_finished = False
        try:
            while not is_finished:
                out = s.get(60.0)
                is_finished = out.is_finished
                yield 1, {}
        finally:
            if not is_finished:
                s.abort()


def arithmetic_backend(model, config):
    """What LocalEngineBackend needs of a LocalBackend, over the arithmetic runner (the model's
    vocabulary and tokenizer, so prompts and texts are the same as the model's)."""
    import types

    from raypd.engine.arithmetic import MAX_VALUE, ArithmeticRunner, arithmetic_config
    from raypd.engine.colocated import ColocatedEngine

    vocab = min(model.config.vocab_size, MAX_VALUE)  # the stand-in's largest; prompts use its vocabulary
    cfg = arithmetic_config(vocab, config.max_seq_len, tuple(t for t in model.config.eos_token_ids if t < vocab))
    engine = ColocatedEngine(ArithmeticRunner(cfg, config), model.tokenizer)
    card = types.SimpleNamespace(config=cfg, tokenizer=model.tokenizer, name=model.name)
    return types.SimpleNamespace(model=card, engine=engine, max_seq_len=config.max_seq_len, warmup=lambda: 0)


def prompts(n: int, length: int, vocab: int, exclude, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(3, vocab), np.asarray(exclude, dtype=np.int64))
    return [rng.choice(allowed, length).tolist() for _ in range(n)]


def run(target, ids: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    reqs = [BenchRequest(i, p, max_tokens, 0.0) for i, p in enumerate(ids)]
    cpu = time.process_time()
    res = runner.run(target, reqs, concurrency, progress=False)
    cpu = time.process_time() - cpu
    bad = [r for r in res.records if r.status != "ok" or sum(r.chunk_tokens) != max_tokens]
    if bad:
        raise RuntimeError(f"{type(target).__name__}: {len(bad)} requests failed, e.g. {bad[0].error}")
    e2e = [r.end_s - r.sent_s for r in res.records]
    tpot = [(r.chunk_s[-1] - r.chunk_s[0]) / (max_tokens - 1) for r in res.records if max_tokens > 1]
    tokens = sum(sum(r.chunk_tokens) for r in res.records)
    return dict(e2e_median_s=statistics.median(e2e), e2e_mean_s=statistics.mean(e2e),
                tpot_mean_s=statistics.mean(tpot) if tpot else None, tokens_per_s=tokens / res.duration_s,
                duration_s=res.duration_s, cpu_per_request_s=cpu / len(reqs), cpu_per_token_s=cpu / tokens)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating measured rounds per client")
    p.add_argument("--num-single", type=int, default=40, help="requests of the per-request workload")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams of the streaming workload")
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--engine", choices=("model", "arithmetic"), default="model",
                   help="model: the default model's engine; arithmetic: the arithmetic stand-in (no compiler)")
    p.add_argument("--workloads", default="per_request,streaming",
                   help="comma-separated subset of per_request,streaming (e.g. one of them under a profiler)")
    args = p.parse_args()

    from raypd import compile_cache

    compile_cache.enable()  # a rerun on this machine skips the compiler (the warm-up still runs every shape)
    import models
    from raypd.api import LocalBackend
    from raypd.engine.runner import EngineConfig
    from raypd.server.backends import LocalEngineBackend
    from raypd.server.http_server import HttpServer
    from raypd.server.openai_app import OpenAIServer, build_app

    config = EngineConfig(page_size=16, num_pages=16 * args.streams, max_slots=args.streams,
                          max_seq_len=16 + args.stream_tokens + 16, prefill_buckets=(32,))
    model = models.load()
    local = LocalBackend(model, config) if args.engine == "model" else arithmetic_backend(model, config)
    backend = LocalEngineBackend(local, model.name, max_queued=4 * args.streams)
    t0 = time.perf_counter()
    backend.start(warmup=True)  # every shape compiled: no run below compiles anything
    warmup_s = time.perf_counter() - t0
    server = OpenAIServer(backend)
    http_server = HttpServer(build_app(server)).start()
    try:
        http = targets.OpenAITarget(http_server.url)
        direct = DirectTarget(backend)
        cfg = backend.model.config
        exclude = tuple(cfg.eos_token_ids) + ((cfg.bos_token_id,) if cfg.bos_token_id is not None else ())
        single = prompts(args.num_single, 8, cfg.vocab_size, exclude, 0)
        streams = prompts(2 * args.streams, 16, cfg.vocab_size, exclude, 1)
        workloads = {"per_request": (single, 1, 1), "streaming": (streams, args.stream_tokens, args.streams)}
        workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
        for t in (direct, http):  # connections, threads, caches
            for ids, max_tokens, conc in workloads.values():
                run(t, ids, max_tokens, conc)
        results = {name: {"direct": [], "http": []} for name in workloads}
        for _ in range(args.rounds):
            for name, (ids, max_tokens, conc) in workloads.items():
                for label, t in (("direct", direct), ("http", http)):
                    results[name][label].append(run(t, ids, max_tokens, conc))
    finally:
        http_server.stop()
        server.close()
        backend.stop()

    def median(name, label, key):  # over rounds (nan: a workload not run)
        return statistics.median(r[key] for r in results[name][label]) if name in results else float("nan")

    summary = dict(
        per_request_direct_ms=median("per_request", "direct", "e2e_median_s") * 1e3,
        per_request_http_ms=median("per_request", "http", "e2e_median_s") * 1e3,
        stream_tokens_per_s_direct=median("streaming", "direct", "tokens_per_s"),
        stream_tokens_per_s_http=median("streaming", "http", "tokens_per_s"),
        stream_tpot_direct_ms=median("streaming", "direct", "tpot_mean_s") * 1e3,
        stream_tpot_http_ms=median("streaming", "http", "tpot_mean_s") * 1e3,
        cpu_per_request_direct_ms=median("per_request", "direct", "cpu_per_request_s") * 1e3,
        cpu_per_request_http_ms=median("per_request", "http", "cpu_per_request_s") * 1e3,
        cpu_per_token_direct_us=median("streaming", "direct", "cpu_per_token_s") * 1e6,
        cpu_per_token_http_us=median("streaming", "http", "cpu_per_token_s") * 1e6)
    summary["per_request_overhead_ms"] = summary["per_request_http_ms"] - summary["per_request_direct_ms"]
    summary["stream_tokens_per_s_ratio"] = summary["stream_tokens_per_s_http"] / summary["stream_tokens_per_s_direct"]
    summary["per_token_overhead_ms"] = summary["stream_tpot_http_ms"] - summary["stream_tpot_direct_ms"]
    summary["warmup_s"] = warmup_s
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(summary=summary, rounds=results, args={**vars(args), "json": str(args.json)},
                                             config=dict(engine=repr(config), model=model.name,
                                                         engine_kind=args.engine),
                                             time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
