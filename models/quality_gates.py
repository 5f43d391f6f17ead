"""Quality gates of the default model (issue #17): computed by scripts/train_default_model.py at
export time, recorded in the model card and training.json, and recomputed on the shipped files
by tests/test_model_gates.py. Plain numpy over two callables (per-token losses of windows, and
greedy continuations; models/dense_decode.py provides both for a Params tree).

The three gates:
  1. held-out bits per byte on code never trained on: at most MAX_HELDOUT_BPB and at least
     MIN_GAIN_OVER_ZLIB below zlib level 9 on the same text;
  2. greedy continuations of the ten PROMPTS (GREEDY_NEW_TOKENS tokens each): no non-blank line
     appears more than MAX_LINE_REPEATS times, and no LOOP_NGRAM consecutive tokens appear more
     than MAX_LINE_REPEATS times (a loop inside one line, e.g. `....` or "of the string of the");
  3. long context is learned: on windows of the full context, the mean loss of every
     POSITION_BUCKET-token bucket past the first is no worse than the first bucket's.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Callable

import numpy as np

MAX_HELDOUT_BPB = 2.3
MIN_GAIN_OVER_ZLIB = 0.20
MAX_LINE_REPEATS = 2
GREEDY_NEW_TOKENS = 64
LOOP_NGRAM = 8
POSITION_BUCKET = 256
PROMPTS = (
    "import os\n",
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "import json\n\n\ndef load_config(path):\n",
    "for i in range(10):\n",
    "    def __repr__(self):\n",
    "try:\n    import numpy as np\nexcept ImportError:\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    '"""Utilities for working with dates."""\n\nimport datetime\n',
)

NllFn = Callable[[np.ndarray], np.ndarray]  # windows [W, T+1] -> nats of each predicted token [W, T]
GreedyFn = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, num_new) -> new ids


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each id stands for [V] under a byte-level BPE (one vocab char per byte);
    special tokens (EOS) stand for none."""
    specials = set(tokenizer.get_added_tokens_decoder()) if hasattr(tokenizer, "get_added_tokens_decoder") else set()
    out = np.zeros(vocab_size, np.int64)
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        out[i] = 0 if piece is None or i in specials else len(piece)
    return out


def bits_per_byte(nll: np.ndarray, windows: np.ndarray, byte_lens: np.ndarray) -> float:
    """Total nats of the predicted tokens windows[:, 1:] over their UTF-8 bytes, in bits."""
    num_bytes = int(byte_lens[np.asarray(windows)[:, 1:]].sum())
    if num_bytes <= 0:
        raise ValueError("the windows predict no bytes")
    return float(np.sum(nll) / num_bytes / np.log(2))


def bucket_losses(nll: np.ndarray, bucket: int = POSITION_BUCKET) -> list[float]:
    """nll [W, T] -> mean loss of positions [0, bucket), [bucket, 2*bucket), ... (T % bucket == 0)."""
    W, T = nll.shape
    if T % bucket:
        raise ValueError(f"window length {T} is not a multiple of the bucket {bucket}")
    return [float(x) for x in nll.reshape(W, T // bucket, bucket).mean(axis=(0, 2))]


def max_line_repeats(text: str) -> int:
    """How often the most frequent non-blank line (trailing spaces ignored) occurs in `text`."""
    lines = [ln.rstrip() for ln in text.split("\n") if ln.strip()]
    return max(Counter(lines).values(), default=0)


def max_ngram_repeats(ids: list[int], n: int = LOOP_NGRAM) -> int:
    """How often the most frequent run of n consecutive ids occurs in `ids` (overlaps count)."""
    return max(Counter(tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)).values(), default=0)


def zlib_bits_per_byte(data: bytes) -> float:
    return 8 * len(zlib.compress(data, 9)) / len(data)


def evaluate(nll_fn: NllFn, greedy_fn: GreedyFn, encode: Callable[[str], list[int]],
             decode: Callable[[list[int]], str], heldout_windows: np.ndarray, byte_lens: np.ndarray,
             zlib_bpb: float) -> dict:
    """All three gates. heldout_windows [W, T+1] with T a multiple of POSITION_BUCKET; zlib_bpb
    is zlib's score on the same held-out text. Returns the numbers and a pass flag per gate."""
    nll = np.asarray(nll_fn(heldout_windows), np.float64)
    bpb = bits_per_byte(nll, heldout_windows, byte_lens)
    buckets = bucket_losses(nll)
    new_ids = greedy_fn([encode(p) for p in PROMPTS], GREEDY_NEW_TOKENS)
    conts = {p: decode(ids) for p, ids in zip(PROMPTS, new_ids)}
    repeats = {p: max_line_repeats(p + c) for p, c in conts.items()}
    ngram_repeats = {p: max_ngram_repeats(ids) for p, ids in zip(PROMPTS, new_ids)}
    bpb_limit = min(MAX_HELDOUT_BPB, (1 - MIN_GAIN_OVER_ZLIB) * zlib_bpb)
    return {
        "heldout_bpb": bpb, "zlib_bpb": zlib_bpb, "bpb_limit": bpb_limit,
        "position_bucket": POSITION_BUCKET, "bucket_losses": buckets,
        "continuations": conts, "max_line_repeats": repeats, "max_ngram_repeats": ngram_repeats,
        "passed": {
            "heldout_bpb": bpb <= bpb_limit,
            "no_loops": max(max(repeats.values()), max(ngram_repeats.values())) <= MAX_LINE_REPEATS,
            "long_context": all(b <= buckets[0] for b in buckets[1:]),
        },
    }
