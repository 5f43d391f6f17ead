"""The decode loop with its batch on the device: overlap and multi-step change nothing but speed.

Reference everywhere: the synchronous loop with one step per dispatch (`overlap=False`,
`max_steps=1`), which test_engine.py checks against teacher-forced rollouts. The bugs these
tests guard against: a token read for the wrong row after rows were reordered, a request that
runs one token past a stop (the overlapped loop dispatches a step before it knows), a
multi-step dispatch that misses a stop the host would see, pages freed while a dispatch still
writes them, and host->device traffic or recompilation creeping into the steady state.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from raypd.engine import decode_state
from raypd.engine.api import Request, SamplingParams
from raypd.engine.colocated import ColocatedEngine
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from test_engine import CFG, assert_no_leak, model, prompts_of, rollout, runner_for  # noqa: F401


def run(model, requests, overlap=True, max_steps=None, **engine_kw):  # noqa: F811
    """Serve `requests` on a fresh prefill + decode pair, inserting as slots free up.
    -> ({rid: [TokenOutput]}, decode engine)."""
    runner = runner_for(model, **engine_kw)
    prefill = PrefillEngine(runner)
    decode = DecodeEngine(runner, model.tokenizer, overlap=overlap)
    waiting, out = list(requests), {r.request_id: [] for r in requests}
    while waiting or decode.num_running:
        while waiting and decode.num_free_slots > 0:
            r = waiting.pop(0)
            (p,) = prefill.prefill([r])
            out[r.request_id].append(decode.insert(r, p))
            prefill.release(r.request_id)
        for o in decode.decode_step(max_steps=max_steps):
            out[o.request_id].append(o)
    assert decode.flush() == []  # whatever is still in flight belongs to finished requests
    assert_no_leak(runner)
    return out, decode


def tokens(out):
    return {rid: [o.token_id for o in outs] for rid, outs in out.items()}


def mixed_requests(n=7, seed=0):
    """Greedy and seeded sampling, different lengths and budgets."""
    prompts = prompts_of([1 + 13 * i % 40 for i in range(n)], seed=seed)
    reqs = []
    for i, p in enumerate(prompts):
        sp = dict(max_tokens=3 + 5 * i % 17, ignore_eos=True)
        if i % 2:
            sp.update(temperature=0.9, top_k=40 if i % 3 else 0, top_p=0.95, seed=100 + i)
        reqs.append(Request(f"r{i}", p, SamplingParams(**sp)))
    return reqs


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
@pytest.mark.parametrize("max_steps", [1, None], ids=["one-step", "multi-step"])
def test_overlapped_loop_equals_synchronous(model, max_steps):  # noqa: F811
    reqs = mixed_requests()
    ref, _ = run(model, reqs, overlap=False, max_steps=1)
    got, decode = run(model, reqs, overlap=True, max_steps=max_steps)
    assert tokens(got) == tokens(ref)
    for rid in ref:
        assert [o.finish_reason for o in got[rid]] == [o.finish_reason for o in ref[rid]]
        assert np.allclose([o.logprob for o in got[rid]], [o.logprob for o in ref[rid]], atol=1e-5)
    assert any(len(v) > 3 for v in tokens(ref).values()), "the requests should decode for a while"
    if max_steps is None:  # several steps per dispatch happened
        assert decode.num_dispatches < max(len(v) for v in tokens(ref).values()) + len(reqs)


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_multi_step_stops_exactly_at_stop_tokens_eos_and_max_tokens(model):  # noqa: F811
    prompt = prompts_of([12], seed=3)[0]
    ref = rollout(model, prompt, 20)
    stop_tok = ref[5]
    reqs = [
        Request("len1", prompt, SamplingParams(max_tokens=1, ignore_eos=True)),
        Request("len2", prompt, SamplingParams(max_tokens=2, ignore_eos=True)),
        Request("len9", prompt, SamplingParams(max_tokens=9, ignore_eos=True)),  # inside a dispatch of 8
        Request("len17", prompt, SamplingParams(max_tokens=17, ignore_eos=True)),
        Request("tok", prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stop_tok,))),
        # more stop ids than the device checks (MAX_STOP_IDS): the host alone sees the last one
        Request("many", prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=tuple(
            [t for t in range(3, CFG.vocab_size) if t not in ref][: decode_state.MAX_STOP_IDS]) + (stop_tok,))),
        Request("eos", prompt, SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,))),
    ]
    got, decode = run(model, reqs, overlap=True, max_steps=None)
    toks = tokens(got)
    num_tokens = sum(len(v) - 1 for v in toks.values())  # all but the prefill's first token
    assert decode.num_dispatches * 3 < num_tokens, "dispatches should run several steps each"
    for n in (1, 2, 9, 17):
        assert toks[f"len{n}"] == ref[:n] and got[f"len{n}"][-1].finish_reason == "length"
    first = ref.index(stop_tok)
    assert toks["tok"] == ref[: first + 1] and got["tok"][-1].finish_reason == "stop"
    assert toks["many"] == ref[: first + 1] and got["many"][-1].finish_reason == "stop"
    end = min(first, ref.index(2) if 2 in ref else 99)  # CFG's eos is 2
    assert toks["eos"] == ref[: end + 1] and got["eos"][-1].finish_reason == "stop"
    for outs in got.values():
        assert [o.finish_reason is not None for o in outs].count(True) == 1 and outs[-1].is_finished


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_stop_strings_end_exactly_with_overlap_and_multi_step_neighbours(model):  # noqa: F811
    """A stop string is matched on the host only, one dispatch late: the extra token is dropped."""
    prompt = prompts_of([10], seed=8)[0]
    full, _ = run(model, [Request("full", prompt, SamplingParams(max_tokens=12, ignore_eos=True))], overlap=False)
    text = "".join(o.text for o in full["full"])
    stop = text[4:6]
    assert len(stop) == 2, f"the test model should produce printable bytes, got {text!r}"
    reqs = [Request("s", prompt, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))),
            Request("other", prompts_of([30], seed=9)[0], SamplingParams(max_tokens=16, ignore_eos=True))]
    ref, _ = run(model, reqs, overlap=False, max_steps=1)
    got, _ = run(model, reqs, overlap=True, max_steps=None)
    assert "".join(o.text for o in got["s"]) == text[: text.find(stop)]
    assert got["s"][-1].finish_reason == "stop"
    assert tokens(got) == tokens(ref)


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_colocated_engine_and_abort_in_flight(model):  # noqa: F811
    """The colocated engine on the overlapped loop equals rollouts; an abort while a dispatch is
    in flight drops its tokens and frees its pages, and the other requests are unaffected."""
    runner = runner_for(model, max_slots=4)
    eng = ColocatedEngine(runner, model.tokenizer)
    prompts = prompts_of((5, 18, 40), seed=11)
    for i, p in enumerate(prompts):
        eng.add_request(Request(str(i), p, SamplingParams(max_tokens=14, ignore_eos=True)))
    eng.add_request(Request("gone", prompts_of([9], seed=12)[0], SamplingParams(max_tokens=30, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    steps = 0
    while eng.num_unfinished:
        for o in eng.step():
            out.setdefault(o.request_id, []).append(o.token_id)
        steps += 1
        if steps == 5:
            assert eng.decode_engine._inflight is not None, "a dispatch should be in flight"
            eng.abort("gone")
    for i, p in enumerate(prompts):
        assert out[str(i)] == rollout(model, p, 14)
    assert len(out["gone"]) < 30
    assert_no_leak(runner)


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_steady_state_decode_sends_nothing_to_the_device_and_never_recompiles(model):  # noqa: F811
    """The second of two identical passes compiles nothing, and its decode steps send no array
    to the device (row changes aside: inserts and releases send one update each)."""
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    for is_warm in (False, True):
        runner = runner_for(model, max_decode_steps=4)
        prefill, decode = PrefillEngine(runner), DecodeEngine(runner)
        reqs = [Request(str(i), p, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.5 * (i % 2), seed=i))
                for i, p in enumerate(prompts_of((3, 17, 30), seed=13))]
        if is_warm:
            jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            for r in reqs:
                (p,) = prefill.prefill([r])
                decode.insert(r, p)
                prefill.release(r.request_id)
            decode.decode_step(max_steps=1)  # sends the new rows
            n, updates = 0, decode.num_row_updates
            with jax.transfer_guard_host_to_device("disallow"):
                for max_steps in (1, 1, None, None, 1, None):
                    n += len(decode.decode_step(max_steps=max_steps))
            assert n > 3 * 6 and decode.num_row_updates == updates
            decode.release("1")  # a row change: one update, still no new program
            while decode.num_running:
                decode.decode_step()
        finally:
            if is_warm:
                jax.monitoring.unregister_event_duration_listener(listener)
        assert_no_leak(runner)
    assert compiles == [], f"{len(compiles)} compilations in the second pass"


def test_max_steps_and_max_decode_steps_are_checked(model):  # noqa: F811
    runner = runner_for(model, max_decode_steps=4)
    with pytest.raises(ValueError, match=r"max_steps must be in \[1, 4\]"):
        DecodeEngine(runner).decode_step(max_steps=5)
    with pytest.raises(ValueError, match="max_decode_steps"):
        runner_for(model, max_decode_steps=0)
