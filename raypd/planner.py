"""Will disaggregation help my workload? Profiles, the simulator and the planner.

  profile   `measure_profile(model)` times the engines on this machine (prefill vs length,
            decode step vs batch and context, K/V send + receive vs bytes), fits the cost model
            (scheduler.cost_model.fit) and keeps the raw points and the device name; JSON on disk.
  simulate  `simulate(profile, mode, ...)` runs a workload (the serving benchmark's datasets,
            arrival processes or a Mooncake trace) through scheduler.simulator.Simulator (the
            scheduler core on a virtual clock) and summarizes it with the benchmark's own
            analysis (raypd.bench.metrics), so simulated and measured runs compare directly.
  plan      `plan(profile, num_devices, ...)` simulates colocated and every P:D split of the
            devices over a sweep of rates, and picks the one with the highest goodput per device
            at the SLOs (goodput at the highest rate whose SLO attainment stays >= the target).
TTFT is what the client sees: arrival to the first token in its hands (queue, prefill, transfer,
insert, delivery); TPOT = (E2E - TTFT) / (tokens - 1), as the benchmark defines it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
from pathlib import Path
from typing import Sequence

import numpy as np

from raypd.bench import metrics as bm
from raypd.bench import workload as wl
from scheduler import CostModel, PolicyConfig, fit
from scheduler.simulator import SimRequest, SimResult, Simulator, WorkerProfile

MODES = ("colocated", "disaggregated")
PROFILE_VERSION = 1


# ----------------------------------------------------------------------------- profiles


@dataclasses.dataclass
class Profile:
    worker: WorkerProfile
    model: str = "unknown"
    samples: dict = dataclasses.field(default_factory=dict)  # raw points the cost model was fit on

    def to_json(self) -> dict:
        w = dataclasses.asdict(self.worker)
        cost = w.pop("cost")
        return dict(version=PROFILE_VERSION, model=self.model, device=self.worker.device, cost=cost,
                    worker={k: v for k, v in w.items() if k != "device"}, samples=self.samples)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version must be {PROFILE_VERSION}, got {d.get('version')!r}")
        c = d["cost"]
        cost = CostModel(tuple(c["prefill_coefs"]), tuple(c["decode_coefs"]), c["transfer_latency_s"],
                         c["transfer_bytes_per_s"], c["kv_bytes_per_token"])
        return cls(WorkerProfile(cost, device=d.get("device", "unknown"), **d["worker"]), d.get("model", "unknown"),
                   d.get("samples", {}))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path) -> "Profile":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"profile {path}: cannot read it ({type(e).__name__}: {e})") from None


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{d.platform}:{kind}" if d.platform != "cpu" else f"cpu:{platform.processor() or platform.machine()}"


def measure_profile(model: str | None = None, max_seq_len: int = 2048, max_slots: int = 32,
                    lengths=(64, 256, 1024, 2048), batch_sizes=(1, 8, 32), context_len: int = 256,
                    tp: int = 1) -> Profile:
    """Time the real engines in this process (no Ray): see the module doc. `tp`: each worker
    tensor-parallel over that many of this process's devices."""
    import jax

    from raypd.engine.runner import EngineConfig
    from raypd.runtime.decode_worker import DecodeWorker
    from raypd.runtime.engines import JaxEngineFactory
    from raypd.runtime.workers import PrefillWorker
    from raypd.transfer import make_transport

    if not 1 <= tp <= jax.device_count():
        raise ValueError(f"tp must be in [1, {jax.device_count()}] (this process's devices; on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N for more), got {tp}")
    config = EngineConfig(max_seq_len=max_seq_len, max_slots=max_slots)
    factory = JaxEngineFactory(model, config)
    transport = make_transport("inproc")
    prefill = PrefillWorker("profile-p", factory, lambda: transport, tp=tp)
    top = prefill.engines.max_seq_len  # the model's own limit may be shorter than asked
    lengths = sorted({min(n, top - 16) for n in lengths})
    pre = prefill.calibrate(lengths)
    decode = DecodeWorker("profile-d", factory, lambda: transport, tp=tp, start=False)
    contexts = sorted({min(n, top - 17) for n in (context_len, 4 * context_len)})
    dec = decode.calibrate([b for b in batch_sizes if b <= max_slots], contexts)
    info = decode.info()
    kv_per_token = info["kv_bytes_per_page"] // info["page_size"]
    cost = fit(pre["prefill"], dec["decode"], pre["transfer"], kv_per_token)
    worker = WorkerProfile(cost, num_pages=info["max_pages"], page_size=info["page_size"],
                           max_slots=info["max_slots"], max_seq_len=info["max_seq_len"], device=device_name(), tp=tp)
    samples = dict(prefill=pre["prefill"], decode=dec["decode"], transfer={"inproc/none": pre["transfer"]})
    return Profile(worker, model or "default", samples)


# ----------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    dataset: str = "fixed"
    input_len: str | None = None  # N or A:B, overrides the dataset's
    output_len: str | None = None
    trace: str | None = None  # a Mooncake-format JSONL trace instead of a dataset
    num_requests: int = 200
    rate: float = float("inf")
    arrival: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0

    def requests(self, max_seq_len: int, rate: float | None = None, vocab_size: int = 1000) -> list[SimRequest]:
        rng = np.random.default_rng(self.seed)
        rate = self.rate if rate is None else rate
        if self.trace:
            rows = wl.read_trace(self.trace)[:self.num_requests]
            reqs = wl.trace_requests(rows, vocab_size, self.seed)
        else:
            if self.dataset not in wl.DATASETS:
                raise ValueError(f"dataset must be one of {sorted(wl.DATASETS)}, got {self.dataset!r}")
            ins, outs = wl.DATASETS[self.dataset]
            ins = wl.parse_length(self.input_len) if self.input_len else ins
            outs = wl.parse_length(self.output_len) if self.output_len else outs
            shape = self.burstiness if self.arrival == "gamma" else 1.0
            times = wl.arrival_times(self.num_requests, rate, rng, shape)
            reqs = wl.synthetic(self.num_requests, ins, outs, vocab_size, times, rng)
        out = []
        for r in reqs:
            n = min(len(r.prompt_ids), max_seq_len - r.max_tokens)
            if n < 1:
                raise ValueError(f"request {r.index}: output length {r.max_tokens} leaves no room for a prompt in "
                                 f"the context of {max_seq_len}")
            out.append(SimRequest(r.arrival_s, tuple(r.prompt_ids[:n]), r.max_tokens))
        return out


# ----------------------------------------------------------------------------- simulate


def _records(results: list[SimResult]) -> list[bm.RequestRecord]:
    out = []
    for i, r in enumerate(sorted(results, key=lambda r: r.arrival_s)):
        status = {"ok": bm.STATUS_OK, "rejected": bm.STATUS_REJECTED}.get(r.status, bm.STATUS_FAILED)
        out.append(bm.RequestRecord(i, r.prompt_len, r.max_tokens, r.arrival_s, r.arrival_s,
                                    chunk_s=list(r.token_s) if status == bm.STATUS_OK else [],
                                    chunk_tokens=[1] * len(r.token_s) if status == bm.STATUS_OK else [],
                                    end_s=r.end_s, status=status, error=r.error))
    return out


def _flat(summary: dict) -> dict:
    """The headline numbers in seconds (the benchmark's summaries are in milliseconds)."""
    def ms(key, p):
        v = summary[key].get(f"p{p}") if summary[key] else None
        return v / 1e3 if v is not None else None

    return dict(ttft_p50_s=ms("ttft_ms", 50), ttft_p90_s=ms("ttft_ms", 90), tpot_p50_s=ms("tpot_ms", 50),
                tpot_p90_s=ms("tpot_ms", 90), throughput_tok_s=summary["output_throughput"],
                goodput_rps=summary["goodput"], slo_attainment=summary["slo_attainment"],
                num_completed=summary["num_completed"], num_rejected=summary["num_rejected"])


def simulate(profile: Profile, mode: str = "disaggregated", num_prefill: int = 1, num_decode: int = 1,
             workload: Workload = Workload(), slo: bm.SLO = bm.SLO(), rate: float | None = None,
             local_prefill_max_len: int | None = None, admission: bool = False,
             prefill_profile: Profile | None = None) -> dict:
    """Simulate one configuration; -> the headline numbers (seconds) plus the full `summary`.
    colocated: `num_decode` workers that prefill every prompt themselves, as a colocated
    deployment does; disaggregated: `num_prefill` + `num_decode` workers (prompts of at most
    `local_prefill_max_len` uncached tokens still prefill on the decode worker, default 0).
    `admission`: reject at arrival what cannot meet the TTFT SLO (as raypd does when a request
    carries one). `prefill_profile`: the prefill pool's, when its workers differ from the decode
    workers (another tensor-parallel degree)."""
    w = profile.worker
    # Prefix reuse only matters when prompts share pages: a trace's hash ids; random prompts never do.
    return simulate_requests(w, mode, num_prefill, num_decode, workload.requests(w.max_seq_len, rate), slo,
                             local_prefill_max_len, admission, prefix_cache=workload.trace is not None,
                             prefill_worker=prefill_profile.worker if prefill_profile is not None else None)


def simulate_requests(worker: WorkerProfile, mode: str, num_prefill: int, num_decode: int,
                      requests: list[SimRequest], slo: bm.SLO = bm.SLO(), local_prefill_max_len: int | None = None,
                      admission: bool = False, prefix_cache: bool = False,
                      prefill_worker: WorkerProfile | None = None) -> dict:
    """`simulate` for a given list of requests (e.g. the exact ones a measured run sent)."""
    records, num_prefill = simulate_records(worker, mode, num_prefill, num_decode, requests, slo,
                                            local_prefill_max_len, admission, prefix_cache, prefill_worker)
    duration = max((r.end_s or r.sent_s) for r in records) - min(r.sent_s for r in records)
    summary = bm.summarize(records, max(duration, 1e-9), slo)
    num_devices = num_prefill * (prefill_worker or worker).tp + num_decode * worker.tp
    return dict(_flat(summary), mode=mode, num_prefill=num_prefill, num_decode=num_decode,
                num_devices=num_devices, device=worker.device, summary=summary)


def simulate_records(worker: WorkerProfile, mode: str, num_prefill: int, num_decode: int,
                     requests: list[SimRequest], slo: bm.SLO = bm.SLO(), local_prefill_max_len: int | None = None,
                     admission: bool = False, prefix_cache: bool = False,
                     prefill_worker: WorkerProfile | None = None) -> tuple[list, int]:
    """The simulated requests as the benchmark's per-request records (what a client saw), and
    the number of prefill workers the mode used."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "colocated":
        num_prefill, local = 0, worker.max_seq_len
    else:
        if num_prefill < 1:
            raise ValueError(f"disaggregated mode needs num_prefill >= 1, got {num_prefill}")
        local = 0 if local_prefill_max_len is None else local_prefill_max_len
    sim = Simulator(worker, num_prefill, num_decode, PolicyConfig(local_prefill_max_len=local, max_queued=1 << 30),
                    prefix_cache=prefix_cache, prefill_profile=prefill_worker)
    return _records(sim.run(requests, slo.ttft_s if admission else None)), num_prefill


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Candidate:
    mode: str
    num_prefill: int
    num_decode: int
    tp_prefill: int = 1  # devices per prefill worker
    tp_decode: int = 1  # devices per decode worker (per worker in colocated mode)

    @property
    def name(self) -> str:
        tp = lambda t: f"xTP{t}" if t > 1 else ""  # noqa: E731
        if self.mode == "colocated":
            return f"colocated{tp(self.tp_decode)}"
        return f"P{self.num_prefill}{tp(self.tp_prefill)}:D{self.num_decode}{tp(self.tp_decode)}"

    @property
    def num_devices(self) -> int:
        return self.num_prefill * self.tp_prefill + self.num_decode * self.tp_decode


def candidates(num_devices: int, tps: Sequence[int] = (1,)) -> list[Candidate]:
    """Every way to use all `num_devices`: colocated workers of each TP degree in `tps`, and
    every P:D split with a TP degree per pool (pools of whole workers, no device left over)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if not tps or min(tps) < 1:
        raise ValueError(f"tensor-parallel degrees must be >= 1, got {list(tps)}")
    tps = sorted(set(tps))
    out = [Candidate("colocated", 0, num_devices // t, 1, t) for t in tps if num_devices % t == 0]
    for tp_p, tp_d in itertools.product(tps, tps):
        for p in range(1, num_devices):
            rest = num_devices - p * tp_p
            if rest > 0 and rest % tp_d == 0:
                out.append(Candidate("disaggregated", p, rest // tp_d, tp_p, tp_d))
    return out


def plan(profile: "Profile | Sequence[Profile]", num_devices: int, workload: Workload, slo: bm.SLO, rates,
         attainment: float = 0.9) -> dict:
    """For each candidate, goodput per device at the SLOs: the best goodput over `rates` among
    the runs whose SLO attainment is >= `attainment`. -> recommendation, runner-up, margin,
    and every candidate's curve (rate -> goodput). Several profiles of one model at different
    tensor-parallel degrees (`raypd profile --tp N`) add the candidates with a TP degree per pool."""
    if not slo.is_set:
        raise ValueError("plan needs at least one SLO (--slo-ttft-ms / --slo-tpot-ms)")
    by_tp = _by_tp([profile] if isinstance(profile, Profile) else list(profile))
    rows = []
    for c in candidates(num_devices, tuple(by_tp)):
        decode, prefill = by_tp[c.tp_decode], by_tp[c.tp_prefill]
        curve, best = [], 0.0
        for rate in rates:
            r = simulate(decode, c.mode, c.num_prefill, c.num_decode, workload, slo, rate,
                         prefill_profile=prefill if c.mode == "disaggregated" else None)
            curve.append(dict(rate=rate, goodput_rps=r["goodput_rps"], slo_attainment=r["slo_attainment"]))
            if r["slo_attainment"] is not None and r["slo_attainment"] >= attainment:
                best = max(best, r["goodput_rps"] or 0.0)
        rows.append(dict(candidate=c.name, mode=c.mode, num_prefill=c.num_prefill, num_decode=c.num_decode,
                         tp_prefill=c.tp_prefill, tp_decode=c.tp_decode,
                         goodput_rps=best, goodput_per_device=best / num_devices, curve=curve))
    ranked = sorted(rows, key=lambda r: (-r["goodput_per_device"], r["candidate"]))
    first, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    margin = (first["goodput_per_device"] / second["goodput_per_device"]
              if second and second["goodput_per_device"] > 0 else None)
    device = by_tp[min(by_tp)].worker.device
    return dict(recommendation=first["candidate"], runner_up=second["candidate"] if second else None,
                margin=margin, candidates=rows, device=device, num_devices=num_devices)


def _by_tp(profiles: list["Profile"]) -> dict[int, "Profile"]:
    """One profile per TP degree, all of one model and page size (their pools exchange K/V)."""
    if not profiles:
        raise ValueError("plan needs at least one profile")
    by_tp: dict[int, Profile] = {}
    for p in profiles:
        t = p.worker.tp
        if t in by_tp:
            raise ValueError(f"two profiles with tp={t}: give one per tensor-parallel degree")
        by_tp[t] = p
    if len({p.model for p in profiles}) > 1 or len({p.worker.page_size for p in profiles}) > 1:
        raise ValueError("profiles of different TP degrees must be of one model and one page size, got "
                         + ", ".join(f"{p.model} (tp={p.worker.tp}, page_size={p.worker.page_size})" for p in profiles))
    return by_tp


def plot_plan(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["candidates"]:
        ax.plot([p["rate"] for p in row["curve"]], [p["goodput_rps"] or 0.0 for p in row["curve"]], marker="o",
                label=row["candidate"])
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("goodput (req/s)")
    ax.set_title(f"{result['num_devices']} devices ({result['device']}): {result['recommendation']} recommended")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
