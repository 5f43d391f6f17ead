"""Light pieces every ring shares: where shipped models live, the default model's name, and the
token-id check (no JAX)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_MODEL = "pystdlib-v2"  # trained by scripts/train_default_model.py, shipped in models/data


def check_token_ids(token_ids, vocab_size: int, field: str = "token_ids") -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError(f"{field} must not be empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids
