"""models.load: clear errors on bad input (raised before any weight is read), the orbax round
trip, restoring into a sharding, sharded == unsharded logits, tokenizers and presets."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import write_tokenizer_json
from safetensors.numpy import load_file, save_file

import models
from models import checkpoint, weights
from models.config import ModelConfig
from models.llama import forward, is_axes_leaf, param_shapes
from models.sharding import make_mesh, param_shardings, shard_params
from models.tokenizer import ByteTokenizer, HFTokenizer

# Shardable 4 ways: K=4 kv heads and F=128 both divide by the 4 fake CPU devices.
TP4_CONFIG = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16)


def random_params(cfg: ModelConfig, seed: int):
    """Random Params drawn with numpy: no per-shape XLA compiles, unlike init_params."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: jax.numpy.asarray(0.05 * rng.standard_normal(shape), cfg.dtype),
                        param_shapes(cfg), is_leaf=is_axes_leaf)


@pytest.fixture
def hf_dir(tmp_path):
    """tiny-random written as an HF directory (config.json + float32 model.safetensors)."""
    preset = models.load("tiny-random")
    path = tmp_path / "hf"
    weights.save_hf(path, preset.params, preset.config)
    return path


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if any tensor data is read: errors must come from headers and config."""
    def read(*args):
        raise AssertionError("tensor data was read before the error was raised")
    monkeypatch.setattr(weights, "_read_float32", read)


def rewrite_tensors(path, edit) -> None:
    """Apply edit(tensors: dict) to path/model.safetensors in place."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


# ----------------------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="neither a preset.*nor an existing directory"):
        models.load(tmp_path / "nope")


def test_unknown_preset_name_lists_presets():
    with pytest.raises(ValueError, match="tiny-random"):
        models.load("tiny-randm")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        models.load(tmp_path)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        models.load(tmp_path / "f")


def test_unsupported_architecture_lists_supported(tmp_path):
    # No safetensors at all: the config is rejected before weights are looked for.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture") as e:
        models.load(tmp_path)
    for name in models.SUPPORTED_ARCHITECTURES:
        assert name in str(e.value)


def test_unsupported_rope_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        models.load(hf_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir, no_weight_reads):
    name = "model.layers.1.mlp.up_proj.weight"  # (F, D) = (128, 64)
    rewrite_tensors(hf_dir, lambda t: t.update({name: np.zeros((100, 64), np.float32)}))
    with pytest.raises(ValueError) as e:
        models.load(hf_dir)
    msg = str(e.value)
    assert name in msg and "(100, 64)" in msg and "(128, 64)" in msg


def test_missing_tensor(hf_dir, no_weight_reads):
    rewrite_tensors(hf_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="missing 1 tensor.*model.layers.0.self_attn.k_proj.weight"):
        models.load(hf_dir)


def test_unexpected_tensor(hf_dir, no_weight_reads):
    extra = {"model.layers.0.mlp.gate_proj.bias": np.zeros(128, np.float32)}
    rewrite_tensors(hf_dir, lambda t: t.update(extra))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.gate_proj.bias'"):
        models.load(hf_dir)


def test_unsupported_tensor_dtype(hf_dir, no_weight_reads):
    name = "model.norm.weight"
    rewrite_tensors(hf_dir, lambda t: t.update({name: np.ones(64, np.int8)}))
    with pytest.raises(ValueError, match=f"{name}.*unsupported dtype I8"):
        models.load(hf_dir)


@pytest.mark.parametrize("dtype", ["float16", "fp32", "int8"])
def test_unknown_dtype_argument(hf_dir, dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.load(hf_dir, dtype=dtype)


def test_model_config_validation():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        TP4_CONFIG.replace(num_heads=6)
    with pytest.raises(ValueError, match="hidden_size must be > 0"):
        TP4_CONFIG.replace(hidden_size=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TP4_CONFIG.replace(dtype="float64")


def test_bad_token_ids():
    model = models.load("tiny-random")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([1, model.config.vocab_size])
    with pytest.raises(ValueError, match="must not be empty"):
        model.logits([])


# ----------------------------------------------------------------------------- presets, orbax, sharding


def test_tiny_random_preset():
    model = models.load("tiny-random")
    assert model.config == models.PRESETS["tiny-random"]
    assert isinstance(model.tokenizer, ByteTokenizer)
    logits = model.logits(model.tokenizer.encode("hello", add_bos=True))
    assert logits.shape == (6, model.config.vocab_size) and np.isfinite(logits).all()
    # Presets are seeded: loading twice gives the same weights.
    np.testing.assert_array_equal(np.asarray(models.load("tiny-random").params.embed),
                                  np.asarray(model.params.embed))


def test_orbax_round_trip_is_bit_exact(tmp_path):
    params = random_params(TP4_CONFIG, seed=3)
    checkpoint.save(tmp_path / "ckpt", params, TP4_CONFIG)
    model = models.load(tmp_path / "ckpt")
    assert model.config == TP4_CONFIG
    jax.tree.map(np.testing.assert_array_equal, model.params, params)
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path / "ckpt", params, TP4_CONFIG)


def test_orbax_restores_into_a_4_device_sharding(tmp_path):
    params = random_params(TP4_CONFIG, seed=3)
    checkpoint.save(tmp_path / "ckpt", params, TP4_CONFIG)
    mesh = make_mesh(4)
    shardings = param_shardings(TP4_CONFIG, mesh)
    model = models.load(tmp_path / "ckpt", shardings=shardings)
    jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding} != {s}"),
                 model.params, shardings)
    wqkv = model.params.layers.wqkv  # [L, D, K, Q+2, H], K split 4 ways
    assert len(wqkv.sharding.device_set) == 4
    assert {s.data.shape for s in wqkv.addressable_shards} == {(2, 64, 1, 4, 16)}
    assert {s.data.shape for s in model.params.layers.w_down.addressable_shards} == {(2, 32, 64)}
    jax.tree.map(np.testing.assert_array_equal, model.params, params)


def test_sharded_logits_equal_unsharded():
    params = random_params(TP4_CONFIG, seed=4)
    sharded = shard_params(params, TP4_CONFIG, make_mesh(4))
    assert len(sharded.layers.w_gate_up.sharding.device_set) == 4
    run = jax.jit(forward, static_argnums=2)
    ids = np.random.default_rng(0).integers(0, TP4_CONFIG.vocab_size, (2, 24))
    expected = np.asarray(run(params, ids, TP4_CONFIG))
    actual = np.asarray(run(sharded, ids, TP4_CONFIG))
    assert np.abs(actual - expected).max() / np.abs(expected).max() <= 1e-5


def test_sharding_rejects_indivisible_config():
    with pytest.raises(ValueError, match="must divide num_kv_heads"):
        param_shardings(models.PRESETS["tiny-random"], make_mesh(4))


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 ✓ 🙂"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert all(tok.offset <= i < tok.offset + 256 for i in ids[1:])
    assert tok.decode(ids + [tok.eos_id]) == text
    with pytest.raises(ValueError):
        ByteTokenizer(100)


def test_hf_tokenizer_eos_from_config_then_generation_config(hf_dir):
    vocab = write_tokenizer_json(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["eos_token_id"] = [2, 3]
    (hf_dir / "config.json").write_text(json.dumps(cfg))

    tok = models.load(hf_dir).tokenizer
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_ids == (2, 3) and tok.eos_id == 2 and tok.bos_id == 1
    ids = tok.encode("hello raypd world", add_bos=True)
    assert ids == [1, vocab["hello"], vocab["raypd"], vocab["world"]]
    assert tok.decode(ids + [2]) == "hello raypd world"

    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert models.load(hf_dir).tokenizer.eos_ids == (3,)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    assert HFTokenizer(hf_dir / "tokenizer.json", eos_ids=(2,)).eos_ids == (3, 2)
