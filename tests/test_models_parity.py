"""Model-level parity with `transformers` for every supported architecture, on small random
configs converted HF -> raypd through `models.load(hf_dir)`, plus the HF safetensors round trip.

Configs live in conftest.HF_CONFIGS; each exercises what sets its architecture apart (llama3
RoPE scaling, no GQA, a sliding window shorter than the sequence, q/k/v biases with tied
embeddings, q/k norm with an explicit head_dim).
"""

from __future__ import annotations

import json

import numpy as np
import jax.numpy as jnp
import pytest
import torch
from conftest import HF_CONFIGS

import models
from models.llama import forward
from models.weights import save_hf

T = 48  # tokens per test sequence; longer than the Mistral window (8)

# float32: both sides compute the same function in the same precision; what remains is
# summation order. Observed ~1e-6 relative to the largest logit.
FP32_RTOL = 1e-4
# bfloat16: 8 bits of mantissa, so every rounded op carries up to 2**-8 ~ 3.9e-3 relative error.
# Two layers of ~10 rounded ops each (norm, projections, RoPE, softmax*V, residual adds, SwiGLU),
# where HF and raypd round at different points (e.g. raypd keeps fused qkv and f32 scores), add
# roughly independent errors; a few units of 3.9e-3 growing ~sqrt(#ops) gives ~1e-2 to 2e-2
# (observed 1.0e-2 to 1.6e-2). 5e-2 leaves headroom without hiding a real bug: a wrong weight
# layout or mask gives errors of order 1 relative to the largest logit.
BF16_RTOL = 5e-2
# Near-ties between the top two logits may flip under bf16 rounding, so allow a few positions.
BF16_MIN_ARGMAX_AGREEMENT = 0.9


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|a - b| / max|b|: error relative to the largest reference logit."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def tokens(vocab_size: int, n: int = T, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, n)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_float32_matches_transformers(hf_checkpoint, kind):
    path, hf = hf_checkpoint(kind)
    model = models.load(path)
    assert model.config.dtype == "float32"
    ids = tokens(model.config.vocab_size)
    expected = hf_logits(hf, ids)
    assert rel_err(model.logits(ids), expected) <= FP32_RTOL


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_bfloat16_matches_transformers_in_bfloat16(hf_checkpoint, kind):
    # save_pretrained of a bf16 model writes BF16 safetensors and "dtype": "bfloat16".
    path, hf = hf_checkpoint(kind, "bfloat16")
    model = models.load(path, dtype="bfloat16")
    assert model.params.embed.dtype == jnp.bfloat16
    ids = tokens(model.config.vocab_size)
    expected = hf_logits(hf, ids)
    actual = model.logits(ids)
    assert rel_err(actual, expected) <= BF16_RTOL
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= BF16_MIN_ARGMAX_AGREEMENT


def test_llama3_rope_scaling_takes_effect(hf_checkpoint):
    """The llama3 config must reach raypd (not fall back to plain RoPE) and must matter."""
    path, hf = hf_checkpoint("llama3")
    model = models.load(path)
    cfg = model.config
    assert cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
    assert cfg.rope_theta == 500000.0
    np.testing.assert_allclose(cfg.inv_freq(), hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    unscaled = cfg.replace(rope_llama3=None)
    assert not np.allclose(unscaled.inv_freq(), cfg.inv_freq())
    ids = tokens(cfg.vocab_size)
    expected = hf_logits(hf, ids)
    wrong = np.asarray(forward(model.params, ids[None], unscaled)[0])
    assert rel_err(wrong, expected) > 100 * FP32_RTOL


def test_mistral_sliding_window_takes_effect(hf_checkpoint):
    path, hf = hf_checkpoint("mistral")
    model = models.load(path)
    assert model.config.sliding_window == 8 < T
    ids = tokens(model.config.vocab_size)
    expected = hf_logits(hf, ids)
    full = np.asarray(forward(model.params, ids[None], model.config.replace(sliding_window=None))[0])
    assert rel_err(full, expected) > 100 * FP32_RTOL
    # Inside the window both agree: the first 8 positions see the same keys either way.
    assert rel_err(full[:8], expected[:8]) <= FP32_RTOL


def test_config_features_reach_raypd(hf_checkpoint):
    """Each config maps onto the raypd features it is meant to test."""
    cfgs = {}
    for kind in HF_CONFIGS:
        hf_config = json.loads((hf_checkpoint(kind)[0] / "config.json").read_text())
        cfgs[kind] = models.config.from_hf_config(hf_config)
    assert cfgs["llama2"].num_kv_heads == cfgs["llama2"].num_heads
    assert cfgs["llama3"].num_kv_heads < cfgs["llama3"].num_heads
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32 != 64 // 4
    assert cfgs["mistral"].sliding_window == 8


# ----------------------------------------------------------------------------- HF round trip


def test_save_hf_round_trip_is_exact(tmp_path):
    preset = models.load("tiny-random")
    save_hf(tmp_path, preset.params, preset.config)
    loaded = models.load(tmp_path)
    assert loaded.config.replace(eos_token_ids=preset.config.eos_token_ids) == preset.config
    ids = tokens(preset.config.vocab_size)
    np.testing.assert_array_equal(loaded.logits(ids), preset.logits(ids))


def test_float16_safetensors_load(tmp_path):
    preset = models.load("tiny-random")
    save_hf(tmp_path, preset.params, preset.config, dtype="float16")
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    loaded = models.load(tmp_path)
    assert loaded.config.dtype == "float32"
    # Loading widens float16 exactly: the weights are the preset's, rounded to float16.
    expected = np.asarray(preset.params.embed).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.params.embed), expected)
    ids = tokens(preset.config.vocab_size)
    assert rel_err(loaded.logits(ids), preset.logits(ids)) <= 1e-2


def test_bfloat16_safetensors_load_exactly(hf_checkpoint):
    """A BF16 file written by torch loads, bit for bit, and picks bfloat16 from config.json."""
    path, hf = hf_checkpoint("llama2", "bfloat16")
    assert models.load(path).config.dtype == "bfloat16"
    model = models.load(path, dtype="float32")
    expected = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.params.embed), expected)
