"""Colocated vs disaggregated serving at equal resources on a 2-core machine (issue #8).

    python scripts/bench_study.py            # the full study (~40 min), results in docs/results/
    python scripts/bench_study.py --quick    # a few minutes, results in out/study-quick/

Modes (both Ray deployments of raypd.serve, both alive for the whole sweep, one idle while the
other is measured):
  colocated      one decode worker pinned to cores 0 and 1 that prefills every prompt itself,
                 in chunks of the largest prefill bucket between decode steps (chunk size picked
                 by a measured sweep: `tune`);
  disaggregated  one prefill worker pinned to core 0 and one decode worker pinned to core 1;
                 every prompt is prefilled remotely and its K/V moved through the transport.
Prefix reuse is off (KV index capacity 0, no host copies, distinct random prompts, cache cleared
before every point). Run it from a clean checkout of one commit (`git worktree add`): the Ray
workers import the runtime from the tree this script is in, at the moment each one starts. Parts, in order:
  baseline  unloaded TTFT / TPOT of each mode (one request at a time); the SLOs are multiples of
            the better mode's unloaded p50 (--ttft-slo-scale, --tpot-slo-scale);
  tune      colocated chunk size: goodput under those SLOs on the long-prompt workload at one rate;
  sweep     each workload over its request rates; at every rate both modes run the same
            requests back to back (the order alternates from rate to rate, so drift hits both);
  pd        a simulated multi-node cluster (ray.cluster_utils, one CPU per node, nodes share the
            machine's 2 cores): 1P:1D, 2P:1D, 1P:2D on the long-prompt workload at one rate.
Writes study_<part>.json and study_*.png into --out and prints the summary with ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from raypd.bench import metrics, report, runner, study, workload  # noqa: E402
from raypd.bench.targets import RayTarget  # noqa: E402

MODES = ("colocated", "disaggregated")
WORKLOADS = {  # name -> (input lengths, output lengths)
    "long_prompt": workload.DATASETS["long-prompt"],
    "chat": workload.DATASETS["chat"],
}
# A Llama-shaped model small enough that a full study fits in well under an hour on 2 cores:
# a 1536-token prefill takes ~0.3 s on one core and a decode step at batch 8 ~17 ms
# (bench-random takes ~4x and ~2x longer: every point would need minutes).
STUDY_MODEL = dict(architecture="llama", vocab_size=8192, hidden_size=256, intermediate_size=640, num_layers=4,
                   num_heads=4, num_kv_heads=1, head_dim=64, rope_theta=500000.0, max_position_embeddings=4096,
                   eos_token_ids=(2,), bos_token_id=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    chunks: tuple[int, ...]  # colocated chunk sizes tried by `tune` (largest prefill bucket)
    tune_rate: float
    rates: dict  # workload -> request rates
    min_requests: int  # per point: at least this many requests ...
    min_duration_s: float  # ... and at least this many seconds of arrivals
    num_baseline: int  # unloaded requests per mode and workload
    num_warmup: int  # requests per workload sent to each deployment before measuring
    pd_configs: tuple[tuple[int, int], ...]
    pd_rate: float
    pd_requests: int


FULL = Plan(chunks=(512, 256, 128), tune_rate=0.7,
            rates=dict(long_prompt=(0.4, 0.7, 1.0, 1.4, 2.0), chat=(0.5, 1.0, 2.0, 3.0, 4.0, 6.0)),
            min_requests=24, min_duration_s=24.0, num_baseline=6, num_warmup=24,
            pd_configs=((1, 1), (2, 1), (1, 2)), pd_rate=1.4, pd_requests=34)
QUICK = Plan(chunks=(512, 128), tune_rate=1.0, rates=dict(long_prompt=(0.5, 1.5), chat=(1.0, 4.0)),
             min_requests=10, min_duration_s=5.0, num_baseline=3, num_warmup=10,
             pd_configs=((1, 1), (2, 1)), pd_rate=1.0, pd_requests=10)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer rates, requests and chunk sizes")
    p.add_argument("--parts", default="baseline,tune,sweep,pd",
                   help="comma-separated subset of baseline,tune,sweep,pd (tune and sweep need baseline)")
    p.add_argument("--out", type=Path, default=None, help="default docs/results (full) or out/study-quick")
    p.add_argument("--model", default=None, help="model source (default: the study model, saved to out/)")
    p.add_argument("--mock", action="store_true",
                   help="arithmetic mock engines and tiny lengths: checks the pipeline, measures nothing")
    p.add_argument("--chunk", type=int, default=None, help="colocated chunk size when tune is skipped")
    p.add_argument("--ttft-slo-scale", type=float, default=5.0, help="TTFT SLO / unloaded p50 TTFT")
    p.add_argument("--tpot-slo-scale", type=float, default=5.0, help="TPOT SLO / unloaded p50 TPOT")
    p.add_argument("--attainment", type=float, default=0.9, help="target SLO attainment for goodput")
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables", action="store_true", help="print markdown tables of the JSON in --out and redraw its plots; run nothing")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- deployments


def ensure_model(path: Path) -> str:
    """The study model as a raypd checkpoint (random weights, fixed seed), written once."""
    from models import checkpoint
    from models.config import ModelConfig
    from models.llama import init_params

    if not checkpoint.is_checkpoint(path):
        cfg = ModelConfig(**STUDY_MODEL)
        checkpoint.save(path, init_params(cfg, seed=0), cfg)
    return str(path)


def engine_config(args, chunk: int):
    from raypd.engine.runner import EngineConfig

    if args.mock:
        return None
    buckets = tuple(b for b in (32, 128, 256, 512, 1024) if b < chunk) + (chunk,)
    return EngineConfig(page_size=16, num_pages=6144, max_slots=args.max_slots, max_seq_len=2176,
                        prefill_buckets=buckets)


def mode_kwargs(mode: str, args) -> dict:
    """raypd.serve arguments of a serving mode at equal resources (module doc)."""
    from raypd.runtime.deployment import Resources
    from scheduler import PolicyConfig

    # no prefix reuse; every engine shape compiled before the worker reports ready (a shape first
    # met mid-run stalls its worker for seconds: that would be measured as queueing)
    common = dict(cache_bytes=0, host_copies=None, local_prefill_stall_s=None, warmup=not args.mock)
    if args.mock:
        from raypd.runtime.engines import MockEngineFactory

        common.update(factory=MockEngineFactory(vocab_size=512, page_size=4, num_pages=1024, max_slots=8,
                                                max_seq_len=256), calibrate=False)
    if mode == "colocated":
        return dict(num_prefill=0, num_decode=1, policy=PolicyConfig(local_prefill_max_len=1 << 30),
                    decode_resources=Resources(num_cpus=1, cpus=(0, 1)), **common)
    return dict(num_prefill=1, num_decode=1, policy=PolicyConfig(local_prefill_max_len=0),
                prefill_resources=Resources(num_cpus=1, cpus=(0,)),
                decode_resources=Resources(num_cpus=1, cpus=(1,)), **common)


def start(mode: str, args, model: str, chunk: int, name: str | None = None, **kw) -> RayTarget:
    t0 = time.perf_counter()
    opts = {**mode_kwargs(mode, args), **kw}
    target = RayTarget(None if args.mock else model, num_prefill=opts.pop("num_prefill"),
                       num_decode=opts.pop("num_decode"), engine_config=engine_config(args, chunk),
                       name=name or f"study-{mode}", request_timeout_s=300, **opts)
    if args.mock:
        target.vocab_size, target.max_seq_len, target.exclude_ids = 512, 256, ()
    target.chunk = chunk
    print(f"[study] {name or mode} (chunk {chunk}) up in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


# ----------------------------------------------------------------------------- workloads and points


def lengths(args, wl: str):
    if args.mock:  # the mock's context is 256 tokens
        return (workload.uniform(64, 128), workload.uniform(8, 16)) if wl == "long_prompt" else \
            (workload.uniform(8, 48), workload.uniform(8, 32))
    return WORKLOADS[wl]


def requests(args, target, wl: str, num: int, rate: float, seed: int) -> list[workload.BenchRequest]:
    """`num` requests of workload `wl` at `rate` (Poisson); prompts depend on `seed` only."""
    ins, outs = lengths(args, wl)
    times = workload.arrival_times(num, rate, np.random.default_rng([seed, 1]))
    return workload.synthetic(num, ins, outs, target.vocab_size, times, np.random.default_rng(seed),
                              target.exclude_ids)


def compact(r: metrics.RequestRecord) -> dict:
    """What the study keeps of a request (the harness's results.json keeps every chunk)."""
    return dict(index=r.index, prompt_len=r.prompt_len, output_len=r.output_len, status=r.status,
                sent_s=r.sent_s, ttft_s=metrics.ttft_s(r), tpot_s=metrics.tpot_s(r), e2e_s=metrics.e2e_s(r),
                server_timings=r.server_timings, error=r.error)


def measure(target, reqs, slo: metrics.SLO, concurrency: int | None = None, desc: str = "") -> dict:
    target.handle.clear_cache()
    load_before = os.getloadavg()[0]
    result = runner.run(target, reqs, concurrency, progress=False, desc=desc)
    s = metrics.summarize(result.records, result.duration_s, slo)
    parts = [b for r in result.records if (b := metrics.breakdown_one_s(r)) is not None]
    return dict(summary=s, breakdown_s=metrics.breakdown_s(result.records),
                load_avg_1min=(load_before, os.getloadavg()[0]),  # other work on the machine
                breakdown_p99_s={k: metrics.percentile([b[k] for b in parts], 99) for k in parts[0]} if parts else {},
                records=[compact(r) for r in result.records])


def line(label: str, p: dict) -> str:
    s = p["summary"]
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    att = "-" if s["slo_attainment"] is None else f"{s['slo_attainment'] * 100:.0f}%"
    return (f"{label:<28} TTFT p50/p99 {f(s['ttft_ms']['p50']):>5}/{f(s['ttft_ms']['p99']):>5} ms  "
            f"TPOT p50/p99 {s['tpot_ms']['p50'] or 0:6.1f}/{s['tpot_ms']['p99'] or 0:6.1f} ms  "
            f"goodput {s['goodput'] if s['goodput'] is not None else 0:5.2f} req/s  attain {att:>4}  "
            f"done {s['num_completed']}/{s['num_requests']}")


def num_requests(plan: Plan, rate: float) -> int:
    return max(plan.min_requests, math.ceil(rate * plan.min_duration_s))


def warm(target, args, plan: Plan, wls) -> None:
    """Compile what the workloads will need: a burst of each (batch sizes, context lengths)."""
    t0 = time.perf_counter()
    for wl in wls:
        reqs = requests(args, target, wl, plan.num_warmup, 8.0, seed=args.seed + 1000)
        runner.run(target, reqs, progress=False)
    print(f"[study] warmed {target.description['deployment']} in {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------- parts


def baseline(targets: dict, args, plan: Plan) -> dict:
    """Unloaded latencies (one request at a time) and the SLOs derived from them."""
    out = {}
    for wl in WORKLOADS:
        reqs = requests(args, targets["colocated"], wl, plan.num_baseline, math.inf, seed=args.seed + 2000)
        pts = {m: measure(targets[m], reqs, metrics.SLO(), concurrency=1) for m in MODES}
        ttft = min(pts[m]["summary"]["ttft_ms"]["p50"] for m in MODES) / 1e3
        tpot = min(pts[m]["summary"]["tpot_ms"]["p50"] for m in MODES) / 1e3
        slo = dict(ttft_s=args.ttft_slo_scale * ttft, tpot_s=args.tpot_slo_scale * tpot)
        out[wl] = dict(points=pts, unloaded_ttft_p50_s=ttft, unloaded_tpot_p50_s=tpot, slo=slo)
        for m in MODES:
            print("[baseline]", line(f"{wl} {m}", pts[m]), flush=True)
        print(f"[baseline] {wl} SLO: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.1f} ms",
              flush=True)
    return out


def tune(targets: dict, args, plan: Plan, model: str, slo: metrics.SLO) -> dict:
    """Colocated chunk sizes on the long-prompt workload at plan.tune_rate; the best goodput
    (ties: lower p99 TPOT) wins and is left running as targets["colocated"]."""
    n = num_requests(plan, plan.tune_rate)
    reqs = requests(args, targets["colocated"], "long_prompt", n, plan.tune_rate, seed=args.seed + 3000)
    tried = {}
    for chunk in plan.chunks:
        if targets["colocated"].chunk != chunk:
            targets["colocated"].close()
            targets["colocated"] = start("colocated", args, model, chunk)
            warm(targets["colocated"], args, plan, ["long_prompt"])
        tried[chunk] = measure(targets["colocated"], reqs, slo)
        print("[tune]", line(f"chunk {chunk} @ {plan.tune_rate:g} req/s", tried[chunk]), flush=True)
    best = max(plan.chunks, key=lambda c: (tried[c]["summary"]["num_good"],
                                           -(tried[c]["summary"]["tpot_ms"]["p99"] or math.inf)))
    if targets["colocated"].chunk != best:
        targets["colocated"].close()
        targets["colocated"] = start("colocated", args, model, best)
        warm(targets["colocated"], args, plan, list(WORKLOADS))
    print(f"[tune] colocated chunk: {best}", flush=True)
    return dict(rate=plan.tune_rate, num_requests=n, best_chunk=best,
                points={str(c): {k: v for k, v in p.items() if k != "records"} for c, p in tried.items()})


def sweep(targets: dict, args, plan: Plan, wl: str, slo: metrics.SLO) -> dict:
    """Both modes at each rate, back to back, alternating which goes first."""
    points = []
    for i, rate in enumerate(plan.rates[wl]):
        n = num_requests(plan, rate)
        reqs = requests(args, targets["colocated"], wl, n, rate, seed=args.seed + 10 * i)
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            p = measure(targets[mode], reqs, slo)
            points.append(dict(mode=mode, rate=rate, **p))
            print(f"[{wl}]", line(f"{rate:g} req/s {mode}", p), flush=True)
    status = {m: {k: v for k, v in targets[m].status().items() if k in ("transfer", "index", "rejections",
                                                                        "local_prefill_max_len")}
              for m in MODES}
    return dict(workload=wl, slo=dataclasses.asdict(slo), points=points, status=status,
                analysis=analyse(points, slo, args.attainment))


def analyse(points: list[dict], slo: metrics.SLO, target: float) -> dict:
    by_mode = {m: sorted((p for p in points if p["mode"] == m), key=lambda p: p["rate"]) for m in MODES}
    rates = {m: [p["rate"] for p in by_mode[m]] for m in MODES}
    p99 = {m: [None if p["summary"]["tpot_ms"]["p99"] is None else p["summary"]["tpot_ms"]["p99"] / 1e3
               for p in by_mode[m]] for m in MODES}
    att = {m: [p["summary"]["slo_attainment"] for p in by_mode[m]] for m in MODES}
    brk = study.slo_break_rate(rates["colocated"], p99["colocated"], slo.tpot_s)
    dis_at_brk = next((v for r, v in zip(rates["disaggregated"], p99["disaggregated"]) if r == brk), None)
    good = {m: study.rate_at_attainment(rates[m], att[m], target) for m in MODES}
    return dict(colocated_tpot_break_rate=brk, disaggregated_p99_tpot_s_at_break=dis_at_brk,
                disaggregated_within_tpot_slo_at_break=None if dis_at_brk is None else dis_at_brk <= slo.tpot_s,
                disaggregated_tpot_break_rate=study.slo_break_rate(rates["disaggregated"], p99["disaggregated"],
                                                                   slo.tpot_s),
                goodput_at_attainment={m: dataclasses.asdict(g) for m, g in good.items()},
                goodput_ratio=study.ratio(good["disaggregated"].rate, good["colocated"].rate), target=target)


def pd_sweep(args, plan: Plan, model: str, slo: metrics.SLO, chunk: int) -> dict:
    """P:D ratios on a simulated cluster: a head node with no CPUs (the scheduler actor) and
    one node of 1 CPU per worker, each with its own object store; the nodes share 2 cores."""
    import ray
    from ray.cluster_utils import Cluster

    from raypd.runtime.deployment import Resources

    ray.shutdown()
    max_workers = max(p + d for p, d in plan.pd_configs)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=200 << 20))
    for _ in range(max_workers):
        cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    out = []
    try:
        for p, d in plan.pd_configs:
            kw = dict(mode_kwargs("disaggregated", args), prefill_resources=Resources(num_cpus=1),
                      decode_resources=Resources(num_cpus=1))
            target = _start_pd(args, model, chunk, p, d, kw)
            try:
                nodes = {a: ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                         for a in target.handle._actors[1:]}
                warm(target, args, plan, ["long_prompt"])
                reqs = requests(args, target, "long_prompt", plan.pd_requests, plan.pd_rate, seed=args.seed + 4000)
                pt = measure(target, reqs, slo)
                st = target.status()
                out.append(dict(num_prefill=p, num_decode=d, rate=plan.pd_rate, num_nodes=len(set(nodes.values())),
                                transfer=st["transfer"], **pt))
                print("[pd]", line(f"{p}P:{d}D @ {plan.pd_rate:g} req/s", pt), flush=True)
            finally:
                target.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return dict(rate=plan.pd_rate, slo=dataclasses.asdict(slo), points=out)


def _start_pd(args, model, chunk, p, d, kw) -> RayTarget:
    kw = {k: v for k, v in kw.items() if k not in ("num_prefill", "num_decode")}
    t0 = time.perf_counter()
    target = RayTarget(None if args.mock else model, num_prefill=p, num_decode=d,
                       engine_config=engine_config(args, chunk), name=f"study-pd-{p}-{d}", request_timeout_s=300,
                       **kw)
    if args.mock:
        target.vocab_size, target.max_seq_len, target.exclude_ids = 512, 256, ()
    print(f"[study] {p}P:{d}D up in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


# ----------------------------------------------------------------------------- output


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(report._json_safe(data), indent=1, default=str))
    print(f"[study] wrote {path}", flush=True)


def plots(out: Path, res: dict) -> list[Path]:
    """TTFT / TPOT CDFs (both modes, at the lightest rate and at the colocated TPOT break rate or
    the highest rate), SLO attainment vs rate, and the latency breakdown at every rate."""
    wl, slo, pts = res["workload"], res["slo"], res["points"]
    rates = sorted({p["rate"] for p in pts})
    shown = [rates[0], res["analysis"]["colocated_tpot_break_rate"] or rates[-1]]
    paths = []
    for key, limit, unit in (("ttft", slo["ttft_s"], "ms"), ("tpot", slo["tpot_s"], "ms")):
        series = {f"{p['mode']} @ {p['rate']:g} req/s": [r[f"{key}_s"] * 1e3 for r in p["records"]
                                                          if r[f"{key}_s"] is not None]
                  for rate in dict.fromkeys(shown) for p in pts if p["rate"] == rate}
        paths.append(report.cdf_plot(out / f"study_{wl}_{key}_cdf.png", series, f"{key.upper()} ({unit})",
                                     f"{wl}: {key.upper()} CDF", limit * 1e3))
    curves = {m: ([p["rate"] for p in pts if p["mode"] == m], [p["summary"]["slo_attainment"] for p in pts
                                                               if p["mode"] == m]) for m in MODES}
    paths.append(report.attainment_plot(out / f"study_{wl}_attainment.png", curves,
                                        f"{wl}: SLO attainment vs rate", res["analysis"]["target"]))
    short = dict(colocated="colo", disaggregated="disagg")
    bars = {f"{short[p['mode']]} {p['rate']:g}": p["breakdown_s"]
            for rate in rates for p in sorted(pts, key=lambda p: p["mode"]) if p["rate"] == rate}
    paths.append(report.breakdown_plot(out / f"study_{wl}_breakdown.png", bars,
                                       f"{wl}: mean latency breakdown (mode, req/s)"))
    return paths


def summary(results: dict) -> str:
    lines = []
    for wl in WORKLOADS:
        res = results.get(wl)
        if not res:
            continue
        a, slo = res["analysis"], res["slo"]
        lines += [f"== {wl}: SLO TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.1f} ms"]
        for rate in sorted({p["rate"] for p in res["points"]}):
            by = {p["mode"]: p for p in res["points"] if p["rate"] == rate}
            for m in MODES:
                lines.append("  " + line(f"{rate:g} req/s {m}", by[m]))
            s = {m: by[m]["summary"] for m in MODES}
            r = lambda k, q: study.ratio(s["colocated"][k][q], s["disaggregated"][k][q])  # noqa: E731
            fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
            lines.append(f"    colocated/disaggregated: TTFT p99 {fmt(r('ttft_ms', 'p99'))}, "
                         f"TPOT p99 {fmt(r('tpot_ms', 'p99'))}")
        g = a["goodput_at_attainment"]
        lines += [f"  colocated breaks p99 TPOT SLO at: {a['colocated_tpot_break_rate']} req/s; disaggregated p99 "
                  f"TPOT there: {'-' if a['disaggregated_p99_tpot_s_at_break'] is None else round(a['disaggregated_p99_tpot_s_at_break'] * 1e3, 1)} ms",
                  f"  rate at {a['target']:.0%} attainment: colocated {g['colocated']}, disaggregated "
                  f"{g['disaggregated']}; ratio {a['goodput_ratio']}"]
    if results.get("pd"):
        lines.append(f"== P:D sweep @ {results['pd']['rate']:g} req/s (long_prompt, simulated nodes, shared cores)")
        lines += ["  " + line(f"{p['num_prefill']}P:{p['num_decode']}D", p) for p in results["pd"]["points"]]
    return "\n".join(lines)


def markdown_tables(out: Path) -> str:
    """Markdown tables of the study JSON files in `out` (for docs/BENCHMARKS.md)."""
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = []
    for wl in WORKLOADS:
        path = out / f"study_{wl}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        slo = res["slo"]
        lines += [f"#### {wl} (SLO: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.1f} ms)", "",
                  "| req/s | mode | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | goodput (req/s) | SLO attainment "
                  "| p99 TPOT colo / disagg | load avg |", "|---|---|---|---|---|---|---|---|"]
        for rate in sorted({p["rate"] for p in res["points"]}):
            by = {p["mode"]: p for p in res["points"] if p["rate"] == rate}
            r = study.ratio(by["colocated"]["summary"]["tpot_ms"]["p99"], by["disaggregated"]["summary"]["tpot_ms"]["p99"])
            for m in MODES:
                s = by[m]["summary"]
                lines.append(f"| {rate:g} | {m} | {f(s['ttft_ms']['p50'])} / {f(s['ttft_ms']['p99'])} "
                             f"| {f(s['tpot_ms']['p50'], 1)} / {f(s['tpot_ms']['p99'], 1)} | {f(s['goodput'], 2)} "
                             f"| {f(s['slo_attainment'] * 100)}% | {f(r, 2) + 'x' if m == MODES[0] else ''} "
                             f"| {'-'.join(f(x, 1) for x in by[m].get('load_avg_1min', ()))} |")
        lines += ["", "| mode, req/s | queue | prefill | transfer | other | decode (mean ms) |", "|---|---|---|---|---|---|"]
        for rate in sorted({p["rate"] for p in res["points"]}):
            for p in res["points"]:
                if p["rate"] == rate:
                    b = p["breakdown_s"]
                    lines.append(f"| {p['mode']} {rate:g} | " + " | ".join(f(b.get(k, 0) * 1e3) for k in
                                 ("queue", "prefill", "transfer", "other", "decode")) + " |")
        lines.append("")
    path = out / "study_pd.json"
    if path.exists():
        pd = json.loads(path.read_text())
        lines += [f"#### P:D ratios, long_prompt at {pd['rate']:g} req/s", "",
                  "| P:D | nodes | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | goodput | attainment "
                  "| queue / prefill / transfer / other / decode (mean ms) |", "|---|---|---|---|---|---|---|"]
        for p in pd["points"]:
            s, b = p["summary"], p["breakdown_s"]
            lines.append(f"| {p['num_prefill']}:{p['num_decode']} | {p['num_nodes']} | {f(s['ttft_ms']['p50'])} / "
                         f"{f(s['ttft_ms']['p99'])} | {f(s['tpot_ms']['p50'], 1)} / {f(s['tpot_ms']['p99'], 1)} "
                         f"| {f(s['goodput'], 2)} | {f((s['slo_attainment'] or 0) * 100)}% | "
                         + " / ".join(f(b.get(k, 0) * 1e3) for k in ("queue", "prefill", "transfer", "other", "decode"))
                         + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.tables:  # and redraw the plots from the JSON
        out = args.out or ROOT / "docs/results"
        for wl in WORKLOADS:
            if (out / f"study_{wl}.json").exists():
                plots(out, json.loads((out / f"study_{wl}.json").read_text()))
        print(markdown_tables(out))
        return {}
    parts = set(args.parts.split(","))
    if not parts <= {"baseline", "tune", "sweep", "pd"}:
        raise SystemExit(f"unknown parts in {args.parts!r}")
    out = args.out or (ROOT / ("out/study-quick" if args.quick else "docs/results"))
    out.mkdir(parents=True, exist_ok=True)
    # Compiled programs persist across the deployments' processes (they inherit this process's
    # environment through the local Ray cluster), so restarts do not recompile.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "out/study-jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import ray

    model = args.model or ("mock" if args.mock else ensure_model(ROOT / "out/study-model"))
    env = report.environment()
    chunk = args.chunk or plan.chunks[0]
    t_start = time.perf_counter()
    results: dict = {}
    meta = dict(environment=env, plan=dataclasses.asdict(plan), model=model,
                model_config=None if args.mock else STUDY_MODEL if args.model is None else None,
                engine=None if args.mock else dataclasses.asdict(engine_config(args, chunk)),
                modes={m: repr(mode_kwargs(m, args)) for m in MODES}, args=vars(args) | {"out": str(out)})
    if parts & {"baseline", "tune", "sweep"}:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        targets = {m: start(m, args, model, chunk) for m in MODES}
        try:
            for m in MODES:
                warm(targets[m], args, plan, list(WORKLOADS))
            base = baseline(targets, args, plan)
            slos = {wl: metrics.SLO(**base[wl]["slo"]) for wl in WORKLOADS}
            tuned = tune(targets, args, plan, model, slos["long_prompt"]) if "tune" in parts else None
            chunk = targets["colocated"].chunk
            write_json(out / "study_baseline.json", dict(meta, baseline=base, tune=tuned, colocated_chunk=chunk))
            if "sweep" in parts:
                for wl in WORKLOADS:
                    results[wl] = sweep(targets, args, plan, wl, slos[wl])
                    results[wl]["colocated_chunk"] = chunk
                    write_json(out / f"study_{wl}.json", dict(meta, **results[wl]))
                    plots(out, results[wl])
        finally:
            for t in targets.values():
                t.close()
            ray.shutdown()
    if "pd" in parts:
        slo = metrics.SLO(**results["long_prompt"]["slo"]) if "long_prompt" in results else metrics.SLO()
        results["pd"] = pd_sweep(args, plan, model, slo, chunk)
        pd = results["pd"]
        write_json(out / "study_pd.json", dict(meta, **pd))
        report.breakdown_plot(out / "study_pd_breakdown.png",
                              {f"{p['num_prefill']}P:{p['num_decode']}D": p["breakdown_s"] for p in pd["points"]},
                              f"P:D ratios @ {pd['rate']:g} req/s (long_prompt): mean latency breakdown")
    text = summary(results)
    print(text)
    print(f"[study] total {time.perf_counter() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
