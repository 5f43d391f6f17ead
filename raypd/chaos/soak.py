"""soak: minutes of steady load with random aborts and one worker killed each minute.

Load: Poisson arrivals at `load` x the measured capacity (`common.capacity_rps`); a seeded
`abort_fraction` of requests is aborted after a random 0-0.5 s. At every minute boundary one
worker dies (`ray.kill`), decode and prefill in turn; `max_replacements` is high enough that
each comes back. On mock engines the prefix cache and its host tier are bounded small
(CACHE_PAGES, HOST_CACHE_BYTES) so that both are full, at steady state, within the first
minute: growth after that is a leak, not a cache filling (`small_caches=False`: the deployment's
default sizes, under which the pools fill with cached pages that placement evicts on demand,
and only memory growth is checked). Every `sample_every_s` the report samples the workers'
resident memory (psutil, by each worker's process id), pages in use on all workers, host
objects and requests tracked.

Pass: every request that was not aborted completes with the right tokens (mock arithmetic,
resumes allowed: `common.mock_chain`; a real model: all tokens), nothing failed, nothing is
held after the run (`common.leaks`), and between the first minute's samples and the last
minute's neither memory (mean worker RSS: <= 1.25 x + 64 MiB) nor pages or host objects in
use (<= 1.5 x + 32) grew.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

from raypd.chaos import common


CACHE_PAGES = 256  # mock engines: pages the KV index may keep (16 bytes a token: MockEngineFactory.kv_bytes_per_page)
HOST_CACHE_BYTES = 128 << 10  # mock engines: host copies, about 500 pages


@dataclasses.dataclass
class Sample:
    t_s: float
    rss_mib: dict  # worker id -> resident MiB
    used_pages: int
    host_objects: int
    tracked: int
    completed: int

    @property
    def mean_rss(self) -> float:
        return statistics.fmean(self.rss_mib.values()) if self.rss_mib else 0.0


@dataclasses.dataclass
class Report:
    minutes: float
    load: float
    capacity_rps: float = 0.0
    num_submitted: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    num_completed: int = 0
    num_wrong: int = 0
    num_resumed: int = 0
    kills: list = dataclasses.field(default_factory=list)
    num_replacements: int = 0
    num_retries: int = 0
    samples: list = dataclasses.field(default_factory=list)
    leaks: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    checks_growth: bool = True  # of pages and host objects (off with default caches: they may still be filling)

    def _window(self, first: bool) -> list[Sample]:
        end = self.samples[-1].t_s if self.samples else 0.0
        picked = [s for s in self.samples if (s.t_s < 60.0 if first else s.t_s >= end - 60.0)]
        return picked or self.samples[:1]

    def growth(self) -> dict:
        """field -> (first minute's mean, last minute's mean)."""
        out = {}
        for name, get in (("mean_rss_mib", lambda s: s.mean_rss), ("used_pages", lambda s: s.used_pages),
                          ("host_objects", lambda s: s.host_objects)):
            a, b = (statistics.fmean(get(s) for s in self._window(w)) for w in (True, False))
            out[name] = (a, b)
        return out

    @property
    def ok(self) -> bool:
        if not self.samples:
            return False
        g = self.growth()
        rss_a, rss_b = g["mean_rss_mib"]
        return (not self.errors and not self.num_wrong and not self.leaks and self.num_completed > 0
                and rss_b <= 1.25 * rss_a + 64 and (not self.checks_growth or all(
                    g[k][1] <= 1.5 * g[k][0] + 32 for k in ("used_pages", "host_objects"))))

    def lines(self) -> list[str]:
        out = [f"soak: {self.minutes:g} min at {100 * self.load:.0f}% of {self.capacity_rps:.1f} req/s; "
               f"submitted {self.num_submitted}, completed {self.num_completed}, aborted {self.num_aborted}, "
               f"rejected {self.num_rejected}, wrong {self.num_wrong}, failed {len(self.errors)}, "
               f"visibly resumed {self.num_resumed}",
               f"  kills: {', '.join(self.kills) or 'none'}; replacements={self.num_replacements} "
               f"retries={self.num_retries}",
               "  samples (t s: mean worker RSS MiB | pages in use | host objects | tracked | completed):"]
        for s in self.samples:
            out.append(f"    {s.t_s:6.0f}: {s.mean_rss:7.1f} | {s.used_pages:5d} | {s.host_objects:4d} | "
                       f"{s.tracked:4d} | {s.completed}")
        for k, (a, b) in (self.growth().items() if self.samples else ()):
            out.append(f"  {k}: first minute {a:.1f} -> last minute {b:.1f}")
        out.append(f"  leaks after: {self.leaks or 'none'}")
        return out + [f"  error: {e}" for e in self.errors[:5]]


def _sample(d, t_s: float, completed: int) -> Sample:
    s = d.status()
    pages = sum(sum(w["used_pages"]) for w in s["prefill"] + s["decode"])
    return Sample(t_s, common.rss_mib(common.worker_pids(d)), pages, s["index"]["num_host_objects"],
                  s["num_tracked"], completed)


def run(minutes: float = 10.0, load: float = 0.7, abort_fraction: float = 0.1, sample_every_s: float = 15.0,
        max_tokens: int = 16, seed: int = 0, model: str | None = None, name: str = "chaos-soak",
        small_caches: bool = True) -> Report:
    import ray

    from raypd.engine.api import SamplingParams
    from raypd.runtime import errors

    caches = {}  # the prefix cache and host tier bounded small, so both are full within the first minute
    if model:
        factory = common.model_factory(model)
    else:
        factory = common.mock_factory(max_slots=16, prefill_delay_s=0.01, step_delay_s=0.01)
        if small_caches:  # else the deployment's defaults: pools fill with cached pages, evicted on demand
            caches = dict(cache_bytes=CACHE_PAGES * factory.kv_bytes_per_page, host_cache_bytes=HOST_CACHE_BYTES)
    d = common.serve(name, factory, num_prefill=2, num_decode=2, max_replacements=int(minutes) + 4, max_retries=4,
                     **caches)
    report = Report(minutes, load, checks_growth=small_caches)
    rng = random.Random(seed)
    tracker = common.Tracker(d)
    try:
        report.capacity_rps = common.capacity_rps(d, max_tokens)
        rate = load * report.capacity_rps
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        aborts: list = []  # (when, outcome)
        t0 = time.monotonic()
        end, next_arrival, next_sample, next_kill = t0 + 60 * minutes, t0, t0 + sample_every_s, t0 + 60.0
        roles = ["decode", "prefill"]
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_arrival:
                (p,) = common.prompts(1, length=rng.randint(4, 40), seed=rng.randrange(1 << 30))
                try:
                    o = tracker.submit(p, params)
                except errors.RuntimeErrorBase as e:
                    report.errors.append(f"submit: {type(e).__name__}: {e}")
                    o = None
                if o is not None and o.request_id is not None and rng.random() < abort_fraction:
                    aborts.append((now + rng.uniform(0.0, 0.5), o))
                next_arrival += rng.expovariate(rate)
            for when, o in [a for a in aborts if a[0] <= now]:
                tracker.abort(o)
            aborts = [a for a in aborts if a[0] > now]
            if now >= next_kill:
                role = roles[len(report.kills) % 2]
                live = sorted(w for w in common.worker_handles(d) if w.startswith(role))
                if live:
                    victim = rng.choice(live)
                    ray.kill(common.worker_handles(d)[victim])
                    report.kills.append(f"{victim}@{now - t0:.0f}s")
                next_kill += 60.0
            if now >= next_sample:
                report.samples.append(_sample(d, now - t0, sum(o.finished and not o.error for o in tracker.outcomes)))
                next_sample += sample_every_s
            time.sleep(min(0.05, max(0.0, min(next_arrival, next_sample, next_kill) - time.monotonic())))
        for _, o in aborts:
            tracker.abort(o)
        tracker.wait(300)
        report.samples.append(_sample(d, time.monotonic() - t0, sum(o.finished and not o.error
                                                                    for o in tracker.outcomes)))
        for o in tracker.outcomes:
            if o.rejected:
                report.num_rejected += 1
                continue
            report.num_submitted += 1
            if o.aborted:
                report.num_aborted += 1
            elif o.error:
                report.errors.append(f"{o.request_id}: {o.error}")
            else:
                report.num_completed += 1
                resumes = common.mock_chain(o.prompt, o.tokens) if not model else 0
                report.num_wrong += resumes is None or len(o.tokens) != max_tokens
                report.num_resumed += bool(resumes)
        common.wait_for(lambda: not d.status()["joining_workers"], 600, "replacements to join", every_s=0.2)
        s = d.status()
        report.num_replacements, report.num_retries = s["num_replacements"], s["num_retries"]
        report.leaks = common.leaks(d)
    finally:
        tracker.close()
        d.shutdown()
    return report
