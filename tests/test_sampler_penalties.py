"""Penalties, logit_bias, min_tokens and top logprobs in the on-device sampler and the engines.

Guards against: the penalties applied to the wrong rows or tokens (a table row read for another
slot, counts that miss the first token or count the prompt), repetition over the generated
tokens only (vLLM counts the prompt too), min_tokens masking one token too many or too few, a
multi-step dispatch or a disaggregated insert whose counts drift from single steps, top
logprobs taken from the penalized distribution instead of the model's, and recompilation when a
request first uses any of this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raypd.engine.api import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, Request, SamplingParams, check_vocab
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.engine.sampling import MAX_SUPPRESS_IDS, PenaltyTable, SamplingArrays, process_logits, sample
from test_decode_loop import run as serve
from test_decode_loop import tokens
from test_engine import CFG, assert_no_leak, model, prompts_of, runner_for  # noqa: F401


def reference(logits, fp, pp, rp, counts, prompt_mask, bias, suppress, is_early):
    """The numpy statement of the processing, one row: logit_bias, min_tokens, repetition over
    prompt + generated, then frequency / presence over generated."""
    x = logits.astype(np.float64).copy()
    for t, b in bias.items():
        x[t] += b
    if is_early:
        x[list(suppress)] = -np.inf
    seen = prompt_mask | (counts > 0)
    x = np.where(seen, np.where(x > 0, x / rp, x * rp), x)
    return x - fp * counts - pp * (counts > 0)


def test_processing_matches_the_numpy_reference_on_random_logits():
    rng = np.random.default_rng(0)
    R, V, S = 6, 50, 8
    logits = rng.normal(0, 3, (R, V)).astype(np.float32)
    counts = rng.integers(0, 3, (S, V)) * (rng.random((S, V)) < 0.3)
    prompt_mask = rng.random((S, V)) < 0.2
    bias_ids = np.full((S, MAX_LOGIT_BIAS), V, np.int32)
    bias_values = np.zeros((S, MAX_LOGIT_BIAS), np.float32)
    suppress = np.full((S, MAX_SUPPRESS_IDS), V, np.int32)
    biases, sups = [], []
    for i in range(S):
        ids = rng.choice(V, 5, replace=False)
        vals = rng.uniform(-100, 100, 5)
        bias_ids[i, :5], bias_values[i, :5] = ids, vals
        biases.append(dict(zip(ids.tolist(), vals.tolist())))
        sup = rng.choice(V, 3, replace=False)
        suppress[i, :3] = sup
        sups.append(sup)
    table = PenaltyTable(jnp.asarray(counts, jnp.int32), jnp.asarray(prompt_mask), jnp.asarray(bias_ids),
                         jnp.asarray(bias_values), jnp.asarray(suppress))
    table_row = np.array([3, 0, 7, 5, 1, 2], np.int32)  # rows point anywhere in the table
    fp = rng.uniform(-2, 2, R).astype(np.float32)
    pp = rng.uniform(-2, 2, R).astype(np.float32)
    rp = rng.uniform(0.2, 2, R).astype(np.float32)
    position = np.full(R, 10, np.int32)
    min_position = np.array([0, 11, 10, 20, 0, 5], np.int32)  # early: rows 1 and 3
    is_penalized = np.array([1, 1, 1, 1, 0, 1], bool)
    s = SamplingArrays(temperature=jnp.zeros(R), top_k=jnp.zeros(R, jnp.int32), top_p=jnp.ones(R),
                       seed=jnp.zeros(R, jnp.uint32), position=jnp.asarray(position), min_p=jnp.zeros(R),
                       frequency_penalty=jnp.asarray(fp), presence_penalty=jnp.asarray(pp),
                       repetition_penalty=jnp.asarray(rp), min_position=jnp.asarray(min_position),
                       is_penalized=jnp.asarray(is_penalized), table_row=jnp.asarray(table_row),
                       num_top_logprobs=jnp.full(R, 3, jnp.int32))
    got = np.asarray(jax.jit(process_logits)(jnp.asarray(logits), s, table))
    for r in range(R):
        t = table_row[r]
        want = logits[r] if not is_penalized[r] else reference(
            logits[r], fp[r], pp[r], rp[r], counts[t], prompt_mask[t], biases[t], sups[t],
            position[r] < min_position[r])
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-4, err_msg=f"row {r}")
    out = jax.jit(sample)(jnp.asarray(logits), s, table)
    np.testing.assert_array_equal(np.asarray(out.tokens), got.argmax(-1))  # greedy on the processed logits
    raw = jax.nn.log_softmax(jnp.asarray(logits))  # logprobs: the model's distribution
    np.testing.assert_allclose(np.asarray(out.logprobs), np.take_along_axis(np.asarray(raw), got.argmax(-1)[:, None],
                                                                            1)[:, 0], rtol=1e-5)
    order = np.argsort(-np.asarray(raw), axis=1)[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)


def test_sampling_params_ranges_name_the_field():
    ok = SamplingParams(max_tokens=8, frequency_penalty=-2, presence_penalty=2, repetition_penalty=2,
                        logit_bias={"5": -100, 7: 100}, min_tokens=8, top_logprobs=20)
    assert ok.logit_bias == ((5, -100.0), (7, 100.0)) and ok.is_penalized
    assert not SamplingParams().is_penalized
    bad = [(dict(frequency_penalty=2.5), r"frequency_penalty must be a number in \[-2, 2\]"),
           (dict(presence_penalty=-3), r"presence_penalty must be a number in \[-2, 2\]"),
           (dict(repetition_penalty=0), r"repetition_penalty must be a number in \(0, 2\]"),
           (dict(repetition_penalty=2.5), r"repetition_penalty must be a number in \(0, 2\]"),
           (dict(min_tokens=9), r"min_tokens must be an integer in \[0, max_tokens=8\]"),
           (dict(min_tokens=-1), "min_tokens"),
           (dict(top_logprobs=21), r"top_logprobs must be an integer in \[0, 20\]"),
           (dict(logit_bias={1: 101}), r"logit_bias\[1\] must be a number in \[-100, 100\]"),
           (dict(logit_bias={-1: 1}), "logit_bias: key -1 is not a token id"),
           (dict(logit_bias={i: 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias: at most 300"),
           (dict(logit_bias=[1, 2]), "logit_bias must map token ids to biases")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            SamplingParams(max_tokens=8, **kw)
    with pytest.raises(ValueError, match=r"logit_bias: token id 300 is outside the vocabulary \[0, 300\)"):
        check_vocab(SamplingParams(logit_bias={300: 1}), 300)


def penalized_rollout(model, prompt, n, fp=0.0, pp=0.0, rp=1.0, bias=None, min_tokens=0, eos=(2,)):
    """Greedy decoding by teacher-forced full forward passes with the penalties in numpy."""
    ids, out = list(prompt), []
    V = CFG.vocab_size
    for k in range(n):
        counts = np.bincount(out, minlength=V) if out else np.zeros(V, int)
        mask = np.zeros(V, bool)
        mask[prompt] = True
        x = reference(np.asarray(model.logits(ids)[-1]), fp, pp, rp, counts, mask, bias or {}, eos, k < min_tokens)
        out.append(int(np.argmax(x)))
        ids.append(out[-1])
    return out


def test_greedy_penalties_equal_the_teacher_forced_reference(model):  # noqa: F811
    prompt = prompts_of([12], seed=4)[0] * 3  # repeated: the repetition penalty has work to do
    cases = [dict(frequency_penalty=1.5), dict(presence_penalty=-1.0, repetition_penalty=1.8),
             dict(repetition_penalty=0.5, logit_bias={7: 5.0, 9: -3.0}, frequency_penalty=0.3)]
    reqs = [Request(f"p{i}", prompt, SamplingParams(max_tokens=10, ignore_eos=True, **kw)) for i, kw in enumerate(cases)]
    out, _ = serve(model, reqs)
    for r, kw in zip(reqs, cases):
        want = penalized_rollout(model, prompt, 10, kw.get("frequency_penalty", 0), kw.get("presence_penalty", 0),
                                 kw.get("repetition_penalty", 1), kw.get("logit_bias"))
        assert tokens(out)[r.request_id] == want, kw


def test_frequency_penalty_repeats_a_repeated_prompt_less(model):  # noqa: F811
    prompt = [17] * 24
    plain = Request("plain", prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    penal = Request("penal", prompt, SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=2.0))
    out, _ = serve(model, [plain, penal])
    top = lambda ids: np.bincount(ids).max()  # noqa: E731  how often the commonest token comes
    assert top(tokens(out)["penal"]) < top(tokens(out)["plain"])
    assert top(tokens(out)["penal"]) <= 3  # -2 per repeat soon outweighs this model's logit gaps


def test_min_tokens_masks_eos_until_reached(model):  # noqa: F811
    prompt = prompts_of([9], seed=5)[0]
    eos = CFG.eos_token_ids[0]
    reqs = [Request("eager", prompt, SamplingParams(max_tokens=12, logit_bias={eos: 100})),
            Request("min5", prompt, SamplingParams(max_tokens=12, logit_bias={eos: 100}, min_tokens=5)),
            Request("stopid", prompt, SamplingParams(max_tokens=12, logit_bias={40: 100}, stop_token_ids=(40,),
                                                     min_tokens=3))]
    out, _ = serve(model, reqs)
    got = tokens(out)
    assert got["eager"] == [eos]  # the bias alone ends it at once
    assert len(got["min5"]) == 6 and eos not in got["min5"][:5] and got["min5"][5] == eos
    assert out["min5"][-1].finish_reason == "stop"
    assert len(got["stopid"]) == 4 and got["stopid"][3] == 40


def test_top_logprobs_are_sorted_and_match_a_teacher_forced_pass(model):  # noqa: F811
    prompt = prompts_of([20], seed=6)[0]
    k = 5
    reqs = [Request("top", prompt, SamplingParams(max_tokens=6, ignore_eos=True, top_logprobs=k, logprobs=True)),
            Request("sampled", prompt, SamplingParams(max_tokens=6, ignore_eos=True, top_logprobs=MAX_TOP_LOGPROBS,
                                                      temperature=1.0, seed=3)),
            Request("none", prompt, SamplingParams(max_tokens=6, ignore_eos=True))]
    out, _ = serve(model, reqs)
    assert all(o.top_logprobs is None for o in out["none"])
    for rid in ("top", "sampled"):
        ids = list(prompt)
        for o in out[rid]:
            top = o.top_logprobs
            assert len(top) == (k if rid == "top" else MAX_TOP_LOGPROBS)
            lps = [lp for _, lp in top]
            assert lps == sorted(lps, reverse=True)
            ref = np.asarray(jax.nn.log_softmax(jnp.asarray(model.logits(ids)[-1])))
            np.testing.assert_allclose(lps, np.sort(ref)[::-1][: len(top)], atol=2e-4)
            np.testing.assert_allclose(o.logprob, ref[o.token_id], atol=2e-4)
            if rid == "top":  # greedy: the chosen token is the first alternative
                assert top[0][0] == o.token_id and abs(top[0][1] - o.logprob) < 1e-6
            ids.append(o.token_id)


def penalized_requests(n=6):
    prompts = prompts_of([5 + 7 * i % 30 for i in range(n)], seed=8)
    reqs = []
    for i, p in enumerate(prompts):
        sp = dict(max_tokens=4 + 3 * i % 11, frequency_penalty=0.4 * (i % 3), presence_penalty=0.5 * (i % 2),
                  repetition_penalty=1.0 + 0.3 * (i % 4), min_tokens=i % 4, top_logprobs=i % 3,
                  logit_bias={3 + i: 2.0})
        if i % 2:
            sp.update(temperature=0.8, top_k=30, seed=50 + i)
        reqs.append(Request(f"q{i}", p, SamplingParams(**sp)))
    return reqs


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_multi_step_and_overlap_equal_single_steps_with_penalties(model):  # noqa: F811
    reqs = penalized_requests()
    ref, _ = serve(model, reqs, overlap=False, max_steps=1, max_slots=2)  # slots reused: stale table rows
    multi, decode = serve(model, reqs, max_decode_steps=4, max_slots=2)
    assert tokens(multi) == tokens(ref)
    assert [o.top_logprobs for o in multi["q1"]] == [o.top_logprobs for o in ref["q1"]]
    assert decode.num_dispatches < sum(len(v) for v in tokens(ref).values())


def test_disaggregated_insert_equals_colocated_with_penalties(model):  # noqa: F811
    """The prefill runner samples the first token, the decode runner (its own pool, K/V copied
    in) continues: the counts it starts from must match those of the shared-pool path."""
    reqs = penalized_requests()
    ref, _ = serve(model, reqs)
    p_runner, d_runner = runner_for(model), runner_for(model)
    prefill, decode = PrefillEngine(p_runner), DecodeEngine(d_runner, model.tokenizer)
    out = {r.request_id: [] for r in reqs}
    for r in reqs:
        (p,) = prefill.prefill([r])
        out[r.request_id].append(decode.insert(r, p, prefill.read_kv(p)))
        prefill.release(r.request_id)
        while decode.num_running >= d_runner.config.max_slots:
            for o in decode.decode_step():
                out[o.request_id].append(o)
    while decode.num_running:
        for o in decode.decode_step():
            out[o.request_id].append(o)
    decode.flush()
    assert tokens(out) == tokens(ref)
    assert_no_leak(p_runner, d_runner)


def test_a_resumed_request_counts_its_earlier_tokens_as_generated(model):  # noqa: F811
    """A request resumed after a failure (prompt + tokens so far, `resumed_len`) continues as
    if it had not stopped."""
    prompt = prompts_of([10], seed=9)[0]
    params = SamplingParams(max_tokens=9, ignore_eos=True, frequency_penalty=1.2, repetition_penalty=1.5,
                            min_tokens=6)
    (full,) = serve(model, [Request("a", prompt, params)])[0].values()
    done = [o.token_id for o in full[:4]]
    resumed = Request("b", prompt + done, SamplingParams(max_tokens=5, ignore_eos=True, frequency_penalty=1.2,
                                                         repetition_penalty=1.5, min_tokens=2), resumed_len=4)
    (rest,) = serve(model, [resumed])[0].values()
    assert done + [o.token_id for o in rest] == [o.token_id for o in full]


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_penalties_and_top_logprobs_compile_nothing_after_warmup(model):  # noqa: F811
    from raypd.engine.colocated import ColocatedEngine
    from test_engine import run_colocated

    runner = runner_for(model, max_decode_steps=2, max_seq_len=64, prefill_buckets=(64,))  # few shapes
    runner.warmup()
    compiles = []

    def listen(event, *a, **k):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run_colocated(ColocatedEngine(runner, model.tokenizer), penalized_requests())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
