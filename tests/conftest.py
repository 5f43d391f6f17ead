"""Shared test setup: a CPU backend with 4 fake devices, and tiny random Hugging Face checkpoints.

The environment is set here, before anything imports jax (pytest imports conftest first), so
that every test sees the same 4-device CPU platform and sharding tests need no GPU.
"""

from __future__ import annotations

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=4"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Commands run by tests do not share a compilation cache (raypd/compile_cache.py): each test
# compiles what it runs, as on a fresh machine (tests that need the cache turn it on).
os.environ.setdefault("RAYPD_COMPILE_CACHE", "off")

import pytest  # noqa: E402

# Small configs, one per architecture the loader supports, each exercising what sets it apart.
# Common: V=128, D=64, L=2, T up to 64 tokens in tests.
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
HF_CONFIGS = {
    # Llama 3.1 style: GQA and llama3 RoPE scaling. original_max_position_embeddings=64 with
    # theta=5e5 and H=16 puts one frequency in each of the kept / smoothed / scaled bands.
    "llama3": ("LlamaConfig", dict(_COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Llama 2 style: no GQA (K == N), default RoPE.
    "llama2": ("LlamaConfig", dict(_COMMON, num_key_value_heads=4)),
    # Mistral: a sliding window well inside the test sequence length, so it masks something.
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=8)),
    # Qwen2: q/k/v biases and tied embeddings.
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True)),
    # Qwen3: q/k RMSNorm and an explicit head_dim (32) unlike hidden_size / num_heads (16).
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=32)),
}
_MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                  "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def make_hf_model(kind: str, seed: int = 0):
    """A random transformers model of HF_CONFIGS[kind] in float32, eval mode, with its 1-D
    parameters (norm weights, biases) perturbed so that they are not all ones / zeros."""
    import torch
    import transformers

    config_cls, kwargs = HF_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASSES[config_cls])(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(kind, dtype="float32") -> (directory, transformers model).

    The directory holds what `save_pretrained` writes (config.json + model.safetensors); the
    returned model is in `dtype`, the same weights as the files."""
    import torch

    def make(kind: str, dtype: str = "float32", seed: int = 0):
        model = make_hf_model(kind, seed).to(getattr(torch, dtype))
        path = tmp_path / f"{kind}-{dtype}"
        model.save_pretrained(path)
        return path, model

    return make


def write_tokenizer_json(path) -> dict[str, int]:
    """A small word-level tokenizer.json in directory `path`; returns its vocabulary."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "hello": 4, "world": 5, "raypd": 6}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<eot>"])
    tok.save(str(path / "tokenizer.json"))
    return vocab


# ---------------------------------------------------------------- test tiers
# `pytest -m unit`: no Ray cluster, no subprocess, no server, nothing that compiles big shapes
# (under 2 minutes on 2 cores); `-m integration`: the rest. CI (`scripts/dev.py test`) runs both.
# A test is integration when its module starts Ray or servers, it uses a Ray or server fixture,
# or it is marked `@pytest.mark.integration` itself (a subprocess, a server, a slow compile).
INTEGRATION_MODULES = {"test_runtime", "test_runtime_aborts", "test_runtime_cluster", "test_runtime_failover",
                       "test_grpc", "test_grpc_ray", "test_ray_job", "test_cli", "test_openai", "test_openai_ray",
                       "test_secure_cluster", "test_openai_api", "test_serve_ray", "test_readme",
                       # real workers and Ray (test_penalties_runtime), training, the shipped model's
                       # gates, parity against torch + transformers, n-sample groups: the slowest
                       # modules of the unit run on a quiet machine (docs/BENCHMARKS.md)
                       "test_penalties_runtime", "test_samples_workers", "test_trainer", "test_model_gates",
                       "test_models_parity", "test_samples"}
RAY_FIXTURES = {"ray_session", "cluster"}
SERVER_FIXTURES = {"endpoint", "channel", "target"}  # a gRPC endpoint, a serving loop with compiled shapes


def is_integration(item) -> bool:
    module = item.module.__name__.rpartition(".")[2]
    fixtures = set(getattr(item, "fixturenames", ()))
    return (module in INTEGRATION_MODULES or bool((RAY_FIXTURES | SERVER_FIXTURES) & fixtures)
            or item.get_closest_marker("integration") is not None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.integration if is_integration(item) else pytest.mark.unit)
