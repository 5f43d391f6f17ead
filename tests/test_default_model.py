"""The shipped default model (models/data/pystdlib-tiny): loads offline, still scores the fixed
held-out slice as well as when it was trained, and writes deterministic, non-empty text.

The held-out slice is read from training.json (token ids), not re-cut from the installed
stdlib, so the check does not depend on which Python version runs it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import models
from models import stdlib_corpus as corpus

MODEL_DIR = models.DATA_DIR / models.DEFAULT_MODEL
MAX_SIZE_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def model() -> models.Model:
    return models.load()


def test_default_is_shipped_and_small():
    assert models.DEFAULT_MODEL == "pystdlib-tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size <= MAX_SIZE_BYTES, f"{MODEL_DIR} is {size} bytes"


def test_loads_by_default_and_by_name(model, info):
    named = models.load("pystdlib-tiny")
    assert model.config == named.config
    assert model.config.vocab_size == info["config"]["vocab_size"]
    assert model.config.num_layers == info["config"]["num_layers"]
    assert model.config.eos_token_ids == (info["eos_token_id"],)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.vocab_size


def test_model_beats_zlib_on_the_heldout_slice(model, info):
    """Both sides measured now, on the same text: the model's bits per byte on the held-out
    slice (its predicted tokens) against zlib's (level 9) on the slice's text."""
    import zlib

    windows = np.asarray(info["heldout_slice_ids"], np.int32)
    num_nats = corpus.mean_window_loss(model.logits, windows) * windows[:, 1:].size
    num_bytes = sum(len(model.tokenizer.decode(list(map(int, w[1:]))).encode()) for w in windows)
    model_bpb = num_nats / num_bytes / np.log(2)
    text = "".join(model.tokenizer.decode(list(map(int, w))) for w in windows).encode()
    zlib_bpb = 8 * len(zlib.compress(text, 9)) / len(text)
    assert model_bpb < zlib_bpb, (model_bpb, zlib_bpb)


def test_heldout_slice_loss_is_not_worse_than_recorded(model, info):
    windows = np.asarray(info["heldout_slice_ids"], np.int32)
    assert windows.shape == (corpus.SLICE_NUM_WINDOWS, corpus.SLICE_WINDOW_LEN)
    loss = corpus.mean_window_loss(model.logits, windows)
    assert loss < info["heldout_slice_loss"] * 1.02 + 1e-3, (loss, info["heldout_slice_loss"])


def test_greedy_output_is_deterministic_and_non_trivial(model):
    prompt = model.tokenizer.encode("def fibonacci(n):")
    eos = model.config.eos_token_ids[0]
    num_new = 16
    runs = [corpus.greedy_ids(model.logits, prompt, num_new, len(prompt) + num_new, eos)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == num_new
    assert model.tokenizer.decode(runs[0]).strip()
