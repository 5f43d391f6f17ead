"""n samples of one prompt (OpenAI's `n`): one prefill, n decode streams sharing the prompt's pages.

Guards against: a sample group that prefills its prompt n times (counted: prompt tokens run
through the model); samples that share their first token or their seed stream; a sample that
writes its tokens into the partial last prompt page another sample reads (the copy-on-fork);
outputs that differ from n independent requests with the same per-sample seeds; pages left
held when a sample is aborted while its prompt is still prefilling.
"""

from __future__ import annotations

import numpy as np
import pytest

import models
from models.config import ModelConfig
from models.llama import init_params
from models.tokenizer import ByteTokenizer
from raypd.engine.api import Request, SamplingParams
from raypd.engine.colocated import ColocatedEngine
from raypd.engine.runner import EngineConfig, ModelRunner

CFG = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=512,
                  eos_token_ids=(2,))
ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=128, prefill_buckets=(16, 32, 64))


@pytest.fixture(scope="module")
def model():
    return models.Model(CFG, init_params(CFG, seed=1, std=0.1), ByteTokenizer(CFG.vocab_size), "test")


def sampled(seed: int, n: int = 20) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=seed, ignore_eos=True, logprobs=True)


def drain(engine: ColocatedEngine) -> dict[str, list]:
    out: dict[str, list] = {}
    while engine.num_unfinished:
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
    return out


def prompt(n: int) -> list[int]:
    return [int(t) for t in np.random.RandomState(n).randint(3, CFG.vocab_size, n)]


@pytest.mark.parametrize("prompt_len", [9, 16, 17, 40])  # < a page, exactly one, one + 1, several + partial
def test_group_prefills_once_and_equals_independent_requests(model, prompt_len):
    ids = prompt(prompt_len)
    group = ColocatedEngine(ModelRunner(model, ENGINE))
    group.add_group([Request(f"s{i}", ids, sampled(5 + i)) for i in range(3)])
    got = drain(group)
    assert group.prefill_engine.num_computed_tokens == prompt_len  # one prefill for three samples
    alone = ColocatedEngine(ModelRunner(model, ENGINE))
    ref = {}
    for i in range(3):  # one at a time: nothing shared, nothing packed together
        alone.add_request(Request(f"s{i}", ids, sampled(5 + i)))
        ref.update(drain(alone))
    assert alone.prefill_engine.num_computed_tokens == 3 * prompt_len
    for i in range(3):
        a, b = got[f"s{i}"], ref[f"s{i}"]
        assert [o.token_id for o in a] == [o.token_id for o in b], i
        assert [o.logprob for o in a] == pytest.approx([o.logprob for o in b], abs=1e-4)
    assert len({tuple(o.token_id for o in got[f"s{i}"]) for i in range(3)}) == 3, "one seed stream each"
    for e in (group, alone):
        e.runner.allocator.check()
        assert e.runner.allocator.num_used == 0


def test_samples_fill_the_prefill_rows_and_groups_beyond_them_are_refused(model):
    engine = ColocatedEngine(ModelRunner(model, ENGINE))
    R = ENGINE.max_prefill_segments
    with pytest.raises(ValueError, match="max_prefill_segments"):
        engine.add_group([Request(f"x{i}", prompt(5), sampled(i)) for i in range(R + 1)])
    with pytest.raises(ValueError, match="share one prompt"):
        engine.add_group([Request("a", prompt(5), sampled(0)), Request("b", prompt(6), sampled(1))])
    # a group of 3 and a single prompt: 4 sample rows, prefilled in one chunk
    engine.add_group([Request(f"g{i}", prompt(7), sampled(i, 3)) for i in range(3)])
    engine.add_request(Request("p", prompt(8), sampled(9, 3)))
    out = drain(engine)
    assert sorted(out) == ["g0", "g1", "g2", "p"] and all(len(v) == 3 for v in out.values())
    assert engine.prefill_engine.num_computed_tokens == 7 + 8
    assert engine.runner.allocator.num_used == 0


@pytest.mark.parametrize("victim", ["s0", "s1"])  # the leader (its prefill's pages) or another sample
def test_abort_while_prefilling_frees_every_page(model, victim):
    ids = prompt(40)
    engine = ColocatedEngine(ModelRunner(model, ENGINE))
    engine.add_group([Request(f"s{i}", ids, sampled(5 + i)) for i in range(3)])
    engine._admit()  # admitted: pages held, prefill queued, nothing run yet
    assert engine.runner.allocator.num_used > 0
    engine.abort(victim)
    out = drain(engine)
    assert sorted(out) == sorted({"s0", "s1", "s2"} - {victim})
    ref = ColocatedEngine(ModelRunner(model, ENGINE))
    ref.add_request(Request("s2", ids, sampled(7)))
    assert [o.token_id for o in out["s2"]] == [o.token_id for o in drain(ref)["s2"]]
    engine.runner.allocator.check()
    assert engine.runner.allocator.num_used == 0
    for rid in ("s0", "s1", "s2"):
        engine.abort(rid)  # whatever is left: nothing, and nothing breaks
    engine.add_group([Request(f"t{i}", ids, sampled(i)) for i in range(2)])
    engine._admit()
    engine.abort("t0")
    engine.abort("t1")
    assert engine.num_unfinished == 0 and engine.runner.allocator.num_used == 0
