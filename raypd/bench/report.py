"""The run's output: `results.json` (configuration, environment, every request's record and
the summaries), `report.md` and its matplotlib PNG plots, all in one directory.

A run is one or more points (one per request rate of a sweep), each a dict:
`{"rate", "max_concurrency", "summary", "breakdown_s", "records"}` (rate: req/s, "inf" in the
JSON for all at once, null for a trace replayed at its own timestamps).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from raypd.bench import metrics

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("raypd", "jax", "jaxlib", "numpy", "ray", "grpcio", "protobuf", "matplotlib", "tqdm")


def environment() -> dict:
    """Library versions, git SHA (and whether the tree had local changes), machine."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(python=sys.version.split()[0], platform=platform.platform(), cpu_count=os.cpu_count(),
                versions=versions, git_sha=git("rev-parse", "HEAD"),
                git_dirty=bool(status) if status is not None else None, argv=sys.argv)


def point(rate: float, max_concurrency: int | None, result, slo: metrics.SLO) -> dict:
    return dict(rate=rate, max_concurrency=max_concurrency,
                summary=metrics.summarize(result.records, result.duration_s, slo),
                breakdown_s=metrics.breakdown_s(result.records),
                records=[dataclasses.asdict(r) for r in result.records])


def _json_safe(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write(out_dir: Path, config: dict, env: dict, points: list[dict], slo: metrics.SLO) -> dict[str, Path]:
    """Write results.json, the plots and report.md into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(_json_safe(dict(config=config, environment=env, points=points)), indent=1))
    paths.update(plot(out_dir, points, slo))
    paths["markdown"].write_text(markdown(config, env, points, slo, {k: p.name for k, p in paths.items()
                                                                     if p.suffix == ".png"}))
    return paths


# ----------------------------------------------------------------------------- plots


def _rate_label(p: dict) -> str:
    rate = "trace" if p["rate"] is None else "inf req/s" if math.isinf(p["rate"]) else f"{p['rate']:g} req/s"
    return rate + (f", conc {p['max_concurrency']}" if p["max_concurrency"] else "")


def _records(p: dict) -> list[metrics.RequestRecord]:
    return [metrics.RequestRecord(**r) for r in p["records"]]


def plot(out_dir: Path, points: list[dict], slo: metrics.SLO) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths[name[:-4]] = out_dir / name

    for key, fn, limit in (("ttft", metrics.ttft_s, slo.ttft_s), ("tpot", metrics.tpot_s, slo.tpot_s)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in points:
            v = np.sort([x for r in _records(p) if (x := fn(r)) is not None]) * 1e3
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=_rate_label(p))
        if limit is not None:
            ax.axvline(limit * 1e3, color="k", ls="--", lw=1, label="SLO")
        ax.set(xlabel=f"{key.upper()} (ms)", ylabel="fraction of requests", title=f"{key.upper()} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{key}_cdf.png")

    rates = [p["rate"] for p in points]
    if len(points) > 1 and all(r is not None and math.isfinite(r) for r in rates):
        fig, ax = plt.subplots(figsize=(6, 4))
        if slo.is_set:
            ax.plot(rates, [p["summary"]["slo_attainment"] * 100 for p in points], "o-", label="SLO attainment")
            ax.axhline(90, color="k", ls=":", lw=1, label="90%")
            ax.set(ylabel="requests meeting every SLO (%)", ylim=(0, 105))
        else:  # no SLO given: the percentiles an SLO would be set against
            for k in ("ttft_ms", "tpot_ms"):
                for q in ("p50", "p99"):
                    ax.plot(rates, [p["summary"][k][q] for p in points], "o-", label=f"{q} {k[:-3].upper()}")
            ax.set(ylabel="ms", yscale="log")
        ax.set(xlabel="request rate (req/s)", title="SLO attainment vs request rate" if slo.is_set
               else "latency vs request rate (no SLO given)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "attainment_vs_rate.png" if slo.is_set else "latency_vs_rate.png")

    parts = list(dict.fromkeys(k for p in points for k in p["breakdown_s"]))
    if parts:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [_rate_label(p) for p in points]
        bottom = np.zeros(len(points))
        for part in parts:
            h = np.array([p["breakdown_s"].get(part, 0.0) * 1e3 for p in points])
            ax.bar(labels, h, bottom=bottom, label=part)
            bottom += h
        ax.set(ylabel="mean per request (ms)", title="latency breakdown")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        save(fig, "latency_breakdown.png")
    return paths


# ----------------------------------------------------------------------------- markdown


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(config: dict, env: dict, points: list[dict], slo: metrics.SLO, images: dict[str, str]) -> str:
    lines = ["# raypd serving benchmark", "",
             f"`{' '.join(env['argv'])}`", "",
             f"git `{env['git_sha']}`{' (with local changes)' if env['git_dirty'] else ''}, "
             f"python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), "",
             "## Configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in config.items()]
    slo_text = ", ".join(f"{k[:-2].upper()} <= {v * 1e3:g} ms" for k, v in dataclasses.asdict(slo).items()
                         if v is not None) or "none given (goodput and attainment not computed)"
    lines += ["", "## Results", "", f"SLO: {slo_text}. Latencies in ms, measured at the client from "
              "each request's send time; TPOT = (E2E - TTFT) / (output tokens - 1); ITL per chunk.", "",
              "| rate | done | rejected | failed | req/s | out tok/s | goodput | attainment "
              "| TTFT mean / p50 / p90 / p99 | TPOT mean / p50 / p90 / p99 | ITL mean / p99 | E2E mean / p99 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        s = p["summary"]
        q = lambda k: " / ".join(_f(s[k][x]) for x in ("mean", "p50", "p90", "p99"))  # noqa: E731
        att = "-" if s["slo_attainment"] is None else f"{s['slo_attainment'] * 100:.0f}%"
        lines.append(f"| {_rate_label(p)} | {s['num_completed']} | {s['num_rejected']} | {s['num_failed']} "
                     f"| {_f(s['request_throughput'], 2)} | {_f(s['output_throughput'])} | {_f(s['goodput'], 2)} "
                     f"| {att} | {q('ttft_ms')} | {q('tpot_ms')} | {_f(s['itl_ms']['mean'])} / "
                     f"{_f(s['itl_ms']['p99'])} | {_f(s['e2e_ms']['mean'])} / {_f(s['e2e_ms']['p99'])} |")
    errors = sorted({r["error"] for p in points for r in p["records"] if r["error"]})
    if errors:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in errors[:5])
                  + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({file})" for name, file in images.items()]
    if "latency_breakdown" in images:
        lines += ["", "The breakdown shows the components the target reports per request; when it reports "
                  "none, the client's split: TTFT (queue + prefill + transfer) and decode (E2E - TTFT)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- side-by-side plots
# One series per serving mode (label -> data), for comparisons measured in one run.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdf_plot(path: Path, series: dict[str, list[float]], xlabel: str, title: str,
             limit: float | None = None) -> Path:
    """Empirical CDFs of values (already in the unit of `xlabel`), one line per series; `limit`
    (same unit) as a dashed SLO line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        v = np.sort(np.asarray(values, dtype=np.float64))
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)
    if limit is not None:
        ax.axvline(limit, color="k", ls="--", lw=1, label="SLO")
    ax.set(xlabel=xlabel, ylabel="fraction of requests", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def attainment_plot(path: Path, curves: dict[str, tuple[list[float], list[float]]], title: str,
                    target: float = 0.9) -> Path:
    """SLO attainment (fractions) against request rate, one curve per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (rates, att) in curves.items():
        ax.plot(rates, [a * 100 for a in att], "o-", label=label)
    ax.axhline(target * 100, color="k", ls=":", lw=1, label=f"{target:.0%}")
    ax.set(xlabel="request rate (req/s)", ylabel="requests meeting every SLO (%)", ylim=(0, 105), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def breakdown_plot(path: Path, bars: dict[str, dict[str, float]], title: str) -> Path:
    """Stacked bars of mean latency parts (seconds, plotted in ms), one bar per label."""
    plt = _pyplot()
    parts = list(dict.fromkeys(k for b in bars.values() for k in b))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) + 2), 4))
    labels = list(bars)
    bottom = np.zeros(len(labels))
    for part in parts:
        h = np.array([bars[k].get(part, 0.0) * 1e3 for k in labels])
        ax.bar(labels, h, bottom=bottom, label=part)
        bottom += h
    ax.set(ylabel="mean per request (ms)", title=title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7, rotation=30)
    return _save(plt, fig, path)
