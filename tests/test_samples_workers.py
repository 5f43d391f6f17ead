"""n samples of one prompt across the prefill/decode boundary, on the plain worker classes (no
Ray): the prefill worker prefills the prompt once and sends its K/V once; the decode worker
receives it once and forks the other samples from the first (or prefills the group locally).

Guards against: a sample group whose disaggregated tokens differ from the colocated engine's
(`ColocatedEngine.add_group`, seeded sampling: each sample's first token is sampled on the
prefill side with its own seed); a prompt prefilled or transferred once per sample; a forked
sample writing into the partial prompt page another reads; pages left held after the samples
finish or are aborted mid-prefill.
"""

from __future__ import annotations

import numpy as np
import pytest

import models
from raypd.engine.api import Request, SamplingParams
from raypd.engine.colocated import ColocatedEngine
from raypd.engine.runner import EngineConfig, ModelRunner
from raypd.runtime.decode_worker import DecodeWorker
from raypd.runtime.engines import JaxEngineFactory
from raypd.runtime.workers import PrefillJob, PrefillWorker
from raypd.transfer import make_transport

ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=8, max_seq_len=256, prefill_buckets=(16, 32, 64))
LENGTHS = (7, 16, 33)  # under a page, exactly one, two + a partial one
N = 3


def prompt(n: int) -> list[int]:
    return np.random.default_rng(n).integers(3, 500, size=n).tolist()


def group(prompt_len: int, tag: str = "") -> list[Request]:
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=40 + i, ignore_eos=True, logprobs=True)
              for i in range(N)]
    return [Request(f"{tag}{prompt_len}-{i}", prompt(prompt_len), p) for i, p in enumerate(params)]


@pytest.fixture(scope="module")
def colocated() -> dict[str, list]:
    engine = ColocatedEngine(ModelRunner(models.load("tiny-random"), ENGINE))
    for n in LENGTHS:
        engine.add_group(group(n))
    out: dict[str, list] = {}
    while engine.num_unfinished:
        for o in engine.step():
            out.setdefault(o.request_id, []).append((o.token_id, round(o.logprob, 4)))
    return out


@pytest.fixture(scope="module")
def workers():
    transport = make_transport("inproc")
    factory = JaxEngineFactory("tiny-random", ENGINE)
    return PrefillWorker("p", factory, lambda: transport), DecodeWorker("d", factory, lambda: transport, start=False)


def drain(dw: DecodeWorker, errors: dict | None = None) -> tuple[dict[str, list], list]:
    """Run the decode loop until idle. -> (tokens by request, finished pages); errors must be none
    unless `errors` is given (a dict that collects them)."""
    out: dict[str, list] = {}
    finished = []
    while dw.run_once():
        report = dw.collect(0)
        if errors is None:
            assert not report.errors, report.errors
        else:
            errors.update(report.errors)
        finished += report.finished
        for rid, toks in report.tokens.items():
            out.setdefault(rid, []).extend((t.token_id, round(t.logprob, 4)) for t in toks)
    return out, finished


def assert_baseline(pw: PrefillWorker, dw: DecodeWorker, cached: list[int], finished: list) -> None:
    pw.free_pages(cached)
    dw.free_pages([p for _, _, pages in finished for p in pages])
    dw.run_once()
    assert pw.engines.prefill.allocator.num_used == 0
    assert dw.engines.decode.allocator.num_used == 0 and dw.engines.decode.num_running == 0


@pytest.mark.parametrize("prompt_len", LENGTHS)
def test_remote_group_prefills_and_sends_once_and_equals_colocated(workers, colocated, prompt_len):
    pw, dw = workers
    reqs = group(prompt_len)
    before = pw.num_computed_tokens
    (res,), _ = pw.prefill([PrefillJob(reqs[0], retain=False, samples=tuple(reqs[1:]))])
    assert pw.num_computed_tokens - before == prompt_len  # one prefill for the three samples
    assert [o.request_id for o in res.sample_outputs] == [r.request_id for r in reqs[1:]]
    forks = tuple(zip(reqs[1:], res.sample_outputs))
    dw.submit([(reqs[0], res.output, res.handle, forks)])  # one K/V payload for all
    got, finished = drain(dw)
    pw.release_transfers([res.handle])
    assert {r.request_id: got[r.request_id] for r in reqs} == {r.request_id: colocated[r.request_id] for r in reqs}
    assert len({tuple(got[r.request_id]) for r in reqs}) == N  # different seeds, different samples
    assert_baseline(pw, dw, [], finished)


def test_local_group_equals_colocated_and_survives_its_leader_aborted(workers, colocated):
    pw, dw = workers
    reqs = group(33)
    dw.submit_local([PrefillJob(reqs[0], retain=False, samples=tuple(reqs[1:]))])
    got, finished = drain(dw)
    assert {r.request_id: got[r.request_id] for r in reqs} == {r.request_id: colocated[r.request_id] for r in reqs}
    assert_baseline(pw, dw, [], finished)
    # the leader aborted while the prompt is still queued for prefill: the others still run
    reqs = group(33, tag="again-")
    dw.submit_local([PrefillJob(reqs[0], retain=False, samples=tuple(reqs[1:]))])
    dw.abort([reqs[0].request_id])
    got, finished = drain(dw)
    assert got.keys() == {r.request_id for r in reqs[1:]}
    assert [got[r.request_id] for r in reqs[1:]] == [colocated[r.request_id.replace("again-", "")] for r in reqs[1:]]
    assert_baseline(pw, dw, [], finished)
    # every sample aborted: the prefill stops and nothing is held
    reqs = group(33, tag="gone-")
    dw.submit_local([PrefillJob(reqs[0], retain=False, samples=tuple(reqs[1:]))])
    dw.abort([r.request_id for r in reqs])
    errors: dict = {}
    got, finished = drain(dw, errors)
    assert not got and not finished
    assert errors == {reqs[0].request_id: "aborted"}  # under the prefill's id: the scheduler ends its call
    assert_baseline(pw, dw, [], finished)
