"""`raypd bench` / scripts/bench_serving.py: arguments, then build -> run -> report.

Only argparse at import time (`raypd --help` stays fast); everything else loads in `main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """Load-test a raypd target and write results.json (every request, configuration,
versions, git SHA), report.md and PNG plots into --out. Arrivals are open-loop (Poisson or gamma
with --burstiness) at --rate req/s, optionally capped at --concurrency requests in flight
(--rate inf --concurrency N is a closed loop). Prompts are random token ids with exact output
lengths (ignore_eos), from --dataset or a Mooncake-format --trace. Metrics follow `vllm bench serve`:
TTFT, TPOT = (E2E - TTFT)/(out - 1), ITL per chunk, E2E, throughput, goodput under the SLOs given
(rejected and failed requests count as misses) and SLO attainment."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raypd.bench.workload import DATASETS  # light: numpy only

    p.add_argument("--target", choices=("local", "ray", "grpc", "openai"), default="local",
                   help="local: in-process engine loop; ray: a Ray deployment; grpc: a gRPC endpoint; "
                        "openai: any OpenAI-compatible server at --url (raypd, vLLM, SGLang, ...)")
    p.add_argument("--model", default=None, help="model to serve (local, and ray/grpc when started here), "
                   "and whose vocabulary the prompts use (default: the default model)")
    g = p.add_argument_group("load")
    g.add_argument("--rate", type=float, default=None,
                   help="mean request rate, req/s ('inf': all at once; default inf, or the trace's timestamps)")
    g.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="inter-arrival distribution")
    g.add_argument("--burstiness", type=float, default=None,
                   help="gamma shape: < 1 burstier, > 1 more regular than Poisson (gamma only; default 1)")
    g.add_argument("--sweep-rates", default=None, metavar="R1,R2,...",
                   help="run the same workload at each rate, one after another")
    g.add_argument("--num-requests", type=int, default=None, help="default 100, or every row of --trace")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals")
    d = p.add_argument_group("workload")
    d.add_argument("--dataset", choices=sorted(DATASETS), default="fixed",
                   help="input/output length distributions: fixed 128/32, uniform 64:256/16:64, "
                        "long-prompt 1024:2048/64:128, chat (lognormal, ShareGPT-like)")
    d.add_argument("--input-len", default=None, metavar="N|A:B", help="override the dataset's input lengths")
    d.add_argument("--output-len", default=None, metavar="N|A:B", help="override the dataset's output lengths")
    d.add_argument("--trace", type=Path, default=None, help="Mooncake-format JSONL trace to replay")
    d.add_argument("--trace-block-len", type=int, default=512, help="prompt tokens per trace hash id")
    d.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply trace inter-arrival times")
    s = p.add_argument_group("SLOs (goodput counts requests meeting all that are given)")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token SLO (ms)")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token SLO (ms)")
    s.add_argument("--slo-e2e-ms", type=float, default=None, help="end-to-end latency SLO (ms)")
    t = p.add_argument_group("target")
    t.add_argument("--max-slots", type=int, default=None, help="decode batch capacity of an engine started here")
    t.add_argument("--max-seq-len", type=int, default=None, help="context length of an engine started here")
    t.add_argument("--max-queued", type=int, default=256, help="local/grpc: requests in flight before rejecting")
    t.add_argument("--no-warmup", action="store_true", help="skip compiling every engine shape first")
    t.add_argument("--grpc-address", default=None, help="HOST:PORT of a running `raypd serve` (default: start one)")
    t.add_argument("--auth-token", default=None, help="gRPC bearer token (or $RAYPD_AUTH_TOKEN)")
    t.add_argument("--deployment", default=None, help="ray: attach to this running deployment (default: start one)")
    t.add_argument("--address", default=None,
                   help="ray: the Ray cluster of --deployment ('auto', HOST:PORT; default: $RAY_ADDRESS, else auto)")
    t.add_argument("--ray-address", dest="address", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    t.add_argument("--num-prefill", type=int, default=1, help="ray: prefill workers of a deployment started here")
    t.add_argument("--num-decode", type=int, default=1, help="ray: decode workers of a deployment started here")
    t.add_argument("--url", default=None, help="openai: the server, http://HOST:PORT[/v1]")
    t.add_argument("--api-key", default=None, help="openai: bearer key (or $OPENAI_API_KEY)")
    t.add_argument("--served-model", default=None, help="openai: model id to request (default: the first listed)")
    t.add_argument("--request-timeout-s", type=float, default=600.0, help="fail a request after this long")
    t.add_argument("--connect-timeout-s", type=float, default=15.0,
                   help="give up connecting to a Ray cluster or gRPC server after this many seconds")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _rates(args) -> list[float | None]:
    if args.sweep_rates:
        if args.rate is not None:
            raise ValueError("give --rate or --sweep-rates, not both")
        try:
            rates = [float(r) for r in args.sweep_rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--sweep-rates must be numbers separated by commas, got {args.sweep_rates!r}") from None
        return rates
    return [args.rate]


def _check(args) -> None:
    if args.arrival == "poisson" and args.burstiness not in (None, 1.0):
        raise ValueError("--burstiness needs --arrival gamma (Poisson is burstiness 1)")
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    for r in _rates(args):
        if r is not None and not r > 0:
            raise ValueError(f"request rates must be > 0 (or inf), got {r}")
    if args.trace is not None and (args.input_len or args.output_len):
        raise ValueError("--input-len/--output-len apply to --dataset, not --trace")


def make_target(args):
    import os

    from raypd.bench import targets
    from raypd.engine.runner import EngineConfig

    cfg = None
    if args.max_slots is not None or args.max_seq_len is not None:
        cfg = EngineConfig(**{k: v for k, v in (("max_slots", args.max_slots), ("max_seq_len", args.max_seq_len))
                              if v is not None})
    if args.target == "local":
        return targets.LocalTarget(args.model, cfg, max_queued=args.max_queued, warmup=not args.no_warmup,
                                   request_timeout_s=args.request_timeout_s)
    if args.target == "openai":
        if not args.url:
            raise ValueError("--target openai needs --url http://HOST:PORT")
        return targets.OpenAITarget(args.url, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                                    args.served_model, args.request_timeout_s)
    if args.target == "grpc":
        if args.grpc_address is not None:
            from raypd import reach

            reach.check_grpc(args.grpc_address, args.connect_timeout_s)
        return targets.GrpcTarget(args.model, args.grpc_address, args.auth_token or os.environ.get("RAYPD_AUTH_TOKEN"),
                                  cfg, max_queued=args.max_queued, warmup=not args.no_warmup,
                                  request_timeout_s=args.request_timeout_s)
    from raypd import reach

    if args.deployment is not None or args.address is not None:  # attach: the cluster must answer
        reach.ray_init(args.address, timeout_s=args.connect_timeout_s)
    return targets.RayTarget(args.model, args.deployment, args.address, args.num_prefill, args.num_decode, cfg)


def make_requests(args, target, rate: float | None) -> tuple[list, dict]:
    """The workload at `rate` (None: the trace's timestamps, or inf) and a description of it. The
    prompts and lengths depend only on the seed, so every rate of a sweep sends the same requests;
    the arrivals use a seed of their own, so the gaps at two rates differ only in scale."""
    import numpy as np

    from raypd.bench import workload as wl

    burstiness = args.burstiness if args.burstiness is not None else 1.0
    arrivals_rng = np.random.default_rng([args.seed, 1])
    info = dict(arrival=args.arrival, burstiness=burstiness)
    if args.trace is not None:
        rows = wl.read_trace(args.trace)[:args.num_requests]
        reqs = wl.trace_requests(rows, target.vocab_size, args.seed, args.trace_block_len, args.trace_time_scale,
                                 target.exclude_ids)
        fits = [r for r in reqs if len(r.prompt_ids) + r.max_tokens <= target.max_seq_len]
        if not fits:
            raise ValueError(f"no trace request fits the target's context of {target.max_seq_len} tokens")
        info.update(dataset=f"trace {args.trace}", trace_block_len=args.trace_block_len,
                    trace_time_scale=args.trace_time_scale, num_dropped_too_long=len(reqs) - len(fits))
        if len(fits) < len(reqs):
            log.warning("dropped %d trace requests longer than the context (%d tokens)", len(reqs) - len(fits),
                        target.max_seq_len)
        reqs = [wl.BenchRequest(i, r.prompt_ids, r.max_tokens, r.arrival_s) for i, r in enumerate(fits)]
        if rate is None:
            info.update(arrival="trace timestamps", burstiness=None)
        else:  # an arrival process at `rate` replaces the timestamps
            times = wl.arrival_times(len(reqs), rate, arrivals_rng, burstiness)
            reqs = [wl.BenchRequest(r.index, r.prompt_ids, r.max_tokens, float(t)) for r, t in zip(reqs, times)]
        return reqs, info
    n = args.num_requests or 100
    in_dist, out_dist = wl.DATASETS[args.dataset]
    in_dist = wl.parse_length(args.input_len) if args.input_len else in_dist
    out_dist = wl.parse_length(args.output_len) if args.output_len else out_dist
    if in_dist.hi + out_dist.hi > target.max_seq_len:
        raise ValueError(f"input ({in_dist.describe()}) + output ({out_dist.describe()}) lengths can exceed the "
                         f"target's context of {target.max_seq_len} tokens; set --input-len/--output-len")
    times = wl.arrival_times(n, math.inf if rate is None else rate, arrivals_rng, burstiness)
    reqs = wl.synthetic(n, in_dist, out_dist, target.vocab_size, times, np.random.default_rng(args.seed),
                        target.exclude_ids)
    info.update(dataset=args.dataset, input_len=in_dist.describe(), output_len=out_dist.describe())
    return reqs, info


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the paths written and the summaries."""
    from raypd.bench import metrics, report, runner, targets

    _check(args)
    slo = metrics.SLO(*(None if v is None else v / 1e3 for v in (args.slo_ttft_ms, args.slo_tpot_ms,
                                                                args.slo_e2e_ms)))
    env = report.environment()
    from raypd import logs

    with logs.progress("starting the target (loading, compiling)", target=args.target):
        target = make_target(args)
    try:
        log.info("target ready; first request took %.2f s", targets.wait_ready(target))
        points, info = [], {}
        for rate in _rates(args):
            reqs, info = make_requests(args, target, rate)
            label = "trace" if rate is None and args.trace else f"rate {rate if rate is not None else 'inf'}"
            result = runner.run(target, reqs, args.concurrency, progress=not args.no_progress, desc=label)
            shown = rate if rate is not None or args.trace else math.inf  # None: the trace's timestamps
            points.append(report.point(shown, args.concurrency, result, slo))
    finally:
        target.close()
    config = dict(target=target.description, **info, num_requests=len(points[-1]["records"]),
                  rates=[p["rate"] for p in points], max_concurrency=args.concurrency, seed=args.seed,
                  slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_e2e_ms=args.slo_e2e_ms)
    paths = report.write(args.out, config, env, points, slo)
    return dict(paths={k: str(v) for k, v in paths.items()}, table=summary_table(points),
                summaries=[dict(rate=p["rate"], **{k: v for k, v in p["summary"].items()
                                                   if not isinstance(v, dict)},
                                ttft_p99_ms=p["summary"]["ttft_ms"]["p99"], tpot_p99_ms=p["summary"]["tpot_ms"]["p99"])
                           for p in points])


def summary_table(points: list[dict]) -> str:
    """The run's numbers as a fixed-width table (one block per rate), like `vllm bench serve`."""
    width = 50
    lines = []

    def row(label: str, value, fmt: str = "{:.2f}") -> None:
        text = "-" if value is None else (fmt.format(value) if isinstance(value, float) else str(value))
        lines.append(f"{label + ':':<{width - 12}}{text:>12}")

    for p in points:
        s = p["summary"]
        rate = "trace" if p["rate"] is None else ("inf" if p["rate"] == math.inf else f"{p['rate']:g}")
        lines.append(f" Serving Benchmark Result (rate {rate} req/s) ".center(width, "="))
        row("Successful requests", s["num_completed"])
        row("Rejected requests", s["num_rejected"])
        row("Failed requests", s["num_failed"])
        row("Benchmark duration (s)", s["duration_s"])
        row("Total input tokens", s["total_input_tokens"])
        row("Total generated tokens", s["total_output_tokens"])
        row("Request throughput (req/s)", s["request_throughput"])
        row("Output token throughput (tok/s)", s["output_throughput"])
        row("Total token throughput (tok/s)", s["total_token_throughput"])
        if s["goodput"] is not None:
            row("Request goodput (req/s)", s["goodput"])
            row("SLO attainment (%)", 100 * s["slo_attainment"])
        for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                           ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
            short = key[:-3].upper()
            lines.append(f" {title} ".center(width, "-"))
            st = s[key]
            row(f"Mean {short} (ms)", st.get("mean"))
            row(f"Median {short} (ms)", st.get("p50"))
            row(f"P99 {short} (ms)", st.get("p99"))
        lines.append("=" * width)
    return "\n".join(lines)


def print_summary(out: dict) -> None:
    """The table for people, then the JSON (last line) for scripts."""
    out = dict(out)
    print(out.pop("table", ""))
    print(json.dumps(out, default=str))
