"""The shipped default model (models/data/pystdlib-v2): loads offline by default and by name,
fits the repository, records a held-out score below zlib's, and writes deterministic,
non-empty text. Its quality gates are recomputed from the shipped files in
tests/test_model_gates.py.
"""

from __future__ import annotations

import json

import pytest

import models
from models import stdlib_corpus as corpus

MODEL_DIR = models.DATA_DIR / models.DEFAULT_MODEL
MAX_SIZE_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def model() -> models.Model:
    return models.load()


def test_default_is_shipped_and_small():
    assert models.DEFAULT_MODEL == "pystdlib-v2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size <= MAX_SIZE_BYTES, f"{MODEL_DIR} is {size} bytes"


def test_loads_by_default_and_by_name(model, info):
    named = models.load(models.DEFAULT_MODEL)
    assert model.config == named.config
    assert model.config.vocab_size == info["config"]["vocab_size"]
    assert model.config.num_layers == info["config"]["num_layers"]
    assert model.config.max_position_embeddings >= 2048
    assert model.config.eos_token_ids == (info["eos_token_id"],)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.vocab_size


def test_greedy_output_is_deterministic_and_non_trivial(model):
    prompt = model.tokenizer.encode("def fibonacci(n):")
    eos = model.config.eos_token_ids[0]
    num_new = 16
    runs = [corpus.greedy_ids(model.logits, prompt, num_new, len(prompt) + num_new, eos)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == num_new
    assert model.tokenizer.decode(runs[0]).strip()
