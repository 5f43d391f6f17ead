"""aborts: requests aborted in each of five phases leave nothing held and capacity whole.

Phases, each with `per_phase` requests (mock engines have a delay in each phase, so each
abort lands where it is meant to):
  queued       submitted while the scheduler's queue is full of earlier work, aborted at once
  prefilling   aborted once the prefill worker has taken them (`prefill_delay_s` holds it there)
  handoff      aborted once their K/V is sent and waits for the decode worker (`recv_delay_s`)
  decoding     aborted once every one of them has tokens
  closed       streams closed by the client after their first token
After each phase every request must have ended and `common.leaks` (after `clear_cache`) must
find nothing: no pages, slots, pending transfers, index entries or host objects. At the end a
batch of as many requests as the decode slots must run all at once.
"""

from __future__ import annotations

import dataclasses
import time

from raypd.chaos import common

PHASES = ("queued", "prefilling", "handoff", "decoding", "closed")


@dataclasses.dataclass
class Report:
    per_phase: int
    max_slots: int
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> {"aborted", "observed", "leaks", "s"}
    max_running_before: int = 0
    max_running_after: int = 0
    num_after_ok: int = 0
    errors: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and all(not p["leaks"] for p in self.phases.values())
                and len(self.phases) == len(PHASES) and self.max_running_after == self.max_slots
                and self.num_after_ok == self.max_slots)

    def lines(self) -> list[str]:
        out = [f"aborts: {self.per_phase} per phase x {len(self.phases)} phases; full batch of {self.max_slots}: "
               f"ran {self.max_running_before} at once before, {self.max_running_after} after "
               f"({self.num_after_ok}/{self.max_slots} correct)"]
        for ph, p in self.phases.items():
            out.append(f"  {ph:<10} aborted={p['aborted']:<4} {p['observed']:<40} leaks: {p['leaks'] or 'none'} "
                       f"({p['s']:.1f} s)")
        return out + [f"  error: {e}" for e in self.errors[:5]]


def _max_running(d, ps, max_tokens: int, exact: bool = True) -> tuple[int, int]:
    """Run `ps` as one batch; (the most seen running at once, how many came out right: the
    mock's arithmetic when `exact`, else all `max_tokens` tokens)."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", d.generate(ps, max_tokens=max_tokens,
                                                                                 ignore_eos=True)), daemon=True)
    thread.start()
    most = 0
    while thread.is_alive():
        most = max(most, sum(w["num_running"] for w in d.status()["decode"]))
        time.sleep(0.02)
    thread.join(60)
    ok = sum((c.token_ids == common.expected(p, max_tokens)) if exact else len(c.token_ids) == max_tokens
             for c, p in zip(result.get("out", []), ps))
    return most, ok


def _phase(d, phase: str, n: int, max_tokens: int, is_mock: bool = True) -> tuple[int, str]:
    """Abort `n` requests in `phase`. -> (how many aborted, what was seen when aborting)."""
    from raypd.engine.api import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ps = common.prompts(n, seed=PHASES.index(phase) + 1)
    if phase == "closed":  # first tokens: the mock's arithmetic, or a real model's greedy token
        want = [common.expected(p, 1)[0] for p in ps] if is_mock else [
            c.token_ids[0] for c in d.generate(ps, max_tokens=1, ignore_eos=True)]
        firsts = 0
        for p, first in zip(ps, want):
            it = d.stream(p, max_tokens=max_tokens, ignore_eos=True)
            firsts += next(it).token_id == first
            it.close()
        return n, f"{firsts}/{n} first tokens right"
    if phase == "queued":
        # earlier work fills the prefill worker; these wait behind it in the queue
        blockers = d.submit(common.prompts(4, seed=7), params)
        ids = d.submit(ps, params)
        s = d.status()
        d.abort(ids)
        d.abort(blockers)
        return n, f"{s['num_queued']} queued at abort"
    ids = d.submit(ps, params)
    if phase == "prefilling":
        common.wait_for(lambda: d.status()["num_queued"] < n, 30, "the prefill worker to take requests")
        seen = f"{n - d.status()['num_queued']} taken by prefill"
    elif phase == "handoff":
        common.wait_for(lambda: sum(w["num_pending_transfers"] for w in d.status()["prefill"]) > 0, 30,
                        "a K/V sent and not yet received")
        seen = f"{sum(w['num_pending_transfers'] for w in d.status()['prefill'])} transfers pending"
    else:  # decoding
        common.wait_for(lambda: sum(w["num_running"] for w in d.status()["decode"]) >= min(n, 4), 60, "decoding")
        seen = f"{sum(w['num_running'] for w in d.status()['decode'])} decoding"
    d.abort(ids)
    return n, seen


def run(per_phase: int = 40, max_slots: int = 8, max_tokens: int = 64, model: str | None = None,
        name: str = "chaos-aborts") -> Report:
    if model:
        factory = common.model_factory(model)
        max_slots = factory.engine.max_slots
    else:
        factory = common.mock_factory(max_slots=max_slots, prefill_delay_s=0.01, recv_delay_s=0.05,
                                      step_delay_s=0.02)
    d = common.serve(name, factory, num_prefill=1, num_decode=1)
    report = Report(per_phase, max_slots)
    try:
        full = common.prompts(max_slots, seed=99)
        # a real model's prefills are slower: longer requests, so the first still run when the last start
        batch_tokens = 96 if model else 24
        report.max_running_before, _ = _max_running(d, full, batch_tokens, exact=not model)
        for phase in PHASES:
            start = time.monotonic()
            try:
                aborted, seen = _phase(d, phase, per_phase, max_tokens, is_mock=not model)
                common.wait_for(lambda: d.status()["num_tracked"] == 0, 60, f"the {phase} aborts to end")
            except Exception as e:  # noqa: BLE001 - reported; the scenario fails
                report.errors.append(f"{phase}: {type(e).__name__}: {e}")
                aborted, seen = 0, "error"
            report.phases[phase] = dict(aborted=aborted, observed=seen, leaks=common.leaks(d),
                                        s=time.monotonic() - start)
        report.max_running_after, report.num_after_ok = _max_running(d, full, batch_tokens, exact=not model)
    finally:
        d.shutdown()
    return report
