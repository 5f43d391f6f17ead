"""The public client (`raypd.generate` / `raypd.stream`), HF parity, compilation, bad input, mock."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.runner import EngineConfig

SMALL = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=256, prefill_buckets=(16, 64))


@pytest.mark.integration  # torch + transformers generate for five architectures
@pytest.mark.parametrize("kind", ["llama3", "llama2", "mistral", "qwen2", "qwen3"])
def test_greedy_parity_with_hf_generate(hf_checkpoint, kind):
    path, hf = hf_checkpoint(kind)
    backend = LocalBackend(models.load(path), SMALL)
    prompts = [[5, 9, 3, 70, 44], list(np.random.RandomState(0).randint(3, 128, 30))]
    got = raypd.generate([list(map(int, p)) for p in prompts], model=backend, max_tokens=12, ignore_eos=True)
    for p, c in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):]
        assert c.token_ids == ref.tolist(), kind
        assert c.finish_reason == "length" and c.text == ""  # no tokenizer: token ids only
    assert backend.engine.runner.allocator.num_used == 0


def test_generate_text_metrics_and_stream():
    backend = LocalBackend(models.load("tiny-random"), SMALL)
    (c,) = raypd.generate(["hello world"], model=backend, max_tokens=6, ignore_eos=True, logprobs=True)
    assert len(c.token_ids) == 6 and len(c.logprobs) == 6 and all(lp <= 0 for lp in c.logprobs)
    assert c.metrics["ttft_s"] > 0 and c.metrics["tpot_s"] > 0 and c.metrics["completion_tokens"] == 6
    chunks = list(raypd.stream("hello world", model=backend, max_tokens=6, ignore_eos=True))
    assert [ch.token_id for ch in chunks] == c.token_ids
    assert chunks[-1].finish_reason == "length" and all(ch.finish_reason is None for ch in chunks[:-1])
    assert "".join(ch.text for ch in chunks) == c.text
    assert backend.engine.runner.allocator.num_used == 0


@pytest.mark.integration  # compiles every engine shape (the warm-up): the slowest unit test otherwise
def test_no_recompilation_after_warmup():
    # few shapes (2 prefill buckets x 5 context buckets, 2 batch x 4 context buckets): every one
    # is compiled by the warm-up, and the traffic below reaches each kind of shape
    config = EngineConfig(page_size=16, num_pages=64, max_slots=2, max_seq_len=64, prefill_buckets=(16, 32))
    backend = LocalBackend(models.load("tiny-random"), config)
    runner = backend.engine.runner
    runner.warmup()
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.RandomState(0)
        prompts = [list(map(int, rng.randint(3, 500, rng.randint(1, 45)))) for _ in range(50)]
        outs = raypd.generate(prompts, model=backend, max_tokens=int(rng.randint(1, 20)), ignore_eos=True,
                              temperature=0.7, top_k=20, top_p=0.9, seed=1)
        outs += raypd.generate(prompts[:8], model=backend, max_tokens=5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(outs) == 58
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
    assert runner.allocator.num_used == 0


BAD = [
    (dict(prompts=[""]), "prompts[0]"),
    (dict(prompts=[[]]), "prompts[0]"),
    (dict(prompts=[[1, 99999]]), "outside the vocabulary"),
    (dict(prompts=[[1, 2]], max_tokens=10_000), "context length"),
    (dict(prompts=["x"], max_tokens=0), "max_tokens"),
    (dict(prompts=["x"], temperature=-1.0), "temperature"),
    (dict(prompts=["x"], top_p=0.0), "top_p"),
    (dict(prompts=["x"], top_p=1.5), "top_p"),
    (dict(prompts=["x"], top_k=-1), "top_k"),
    (dict(prompts=["x"], stop=[1, 2]), "stop"),
    (dict(prompts=["x"], seed=-3), "seed"),
    (dict(prompts=[3.5]), "prompts[0]"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_rejected_before_device_work_and_serving_goes_on(kwargs, match):
    backend = LocalBackend(models.load("tiny-random"), SMALL)
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=re.escape(match)):
        raypd.generate(prompts, model=backend, **kwargs)
    assert backend.engine.num_unfinished == 0
    (ok,) = raypd.generate(["fine"], model=backend, max_tokens=3, ignore_eos=True)
    assert len(ok.token_ids) == 3


def test_unknown_backend_and_model():
    with pytest.raises(ValueError, match="backend"):
        raypd.generate(["x"], model="tiny-random", backend="carrier-pigeon")
    with pytest.raises(ValueError, match="no-such-model"):
        raypd.generate(["x"], model="no-such-model")
