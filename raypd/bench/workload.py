"""Workloads: when each request arrives and what it asks for. Pure: the rng is an argument.

A workload is a list of `BenchRequest`s, each with its prompt token ids, its exact output length
(sent as `max_tokens` with `ignore_eos`) and its arrival time in seconds from the start of the run.

Arrivals (as `vllm bench serve`): gaps between requests are Gamma(shape=burstiness,
scale=1/(rate*burstiness)), so the mean rate is `rate` for every burstiness; burstiness 1 is a
Poisson process, < 1 burstier, > 1 more regular. rate=inf sends everything at once (use it with
a concurrency limit for a closed loop).

Datasets: prompts are random token ids; lengths come from a `LengthDist` per side (fixed,
uniform, lognormal clipped). Trace replay reads the Mooncake format (JSONL: `timestamp` ms,
`input_length`, `output_length`, `hash_ids`): each hash id stands for one block of
`block_len` prompt tokens (Mooncake: 512), the same tokens wherever the id appears, so requests
that share hash ids share a prompt prefix and exercise prefix reuse.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

ARRIVALS = ("poisson", "gamma")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_ids: list[int]
    max_tokens: int  # the exact output length (ignore_eos)
    arrival_s: float  # seconds from the start of the run


# ----------------------------------------------------------------------------- arrivals


def arrival_times(num_requests: int, rate: float, rng: np.random.Generator, burstiness: float = 1.0) -> np.ndarray:
    """[num_requests] send times in seconds, the first at 0, with mean rate `rate` (req/s)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 (inf: all at once), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num_requests - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num_requests]


# ----------------------------------------------------------------------------- lengths


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """Token lengths: "fixed" (lo), "uniform" (lo..hi inclusive) or "lognormal" (median
    `median`, shape `sigma`, rounded and clipped to lo..hi)."""

    kind: str
    lo: int
    hi: int
    median: float = 0.0
    sigma: float = 0.0

    def __post_init__(self):
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"length distribution must be fixed, uniform or lognormal, got {self.kind!r}")
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"lengths must satisfy 1 <= lo <= hi, got {self.lo}..{self.hi}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.lo)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n)
        return np.clip(np.round(rng.lognormal(math.log(self.median), self.sigma, size=n)), self.lo, self.hi).astype(int)

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.lo)
        if self.kind == "uniform":
            return f"{self.lo}:{self.hi}"
        return f"lognormal(median={self.median:g}, sigma={self.sigma:g}) in {self.lo}:{self.hi}"


def fixed(n: int) -> LengthDist:
    return LengthDist("fixed", n, n)


def uniform(lo: int, hi: int) -> LengthDist:
    return LengthDist("uniform", lo, hi)


def parse_length(spec: str) -> LengthDist:
    """"N" (fixed) or "A:B" (uniform, inclusive)."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        raise ValueError(f"length must be N or A:B (integers), got {spec!r}") from None
    if len(parts) == 1:
        return fixed(parts[0])
    if len(parts) == 2:
        return uniform(*parts)
    raise ValueError(f"length must be N or A:B, got {spec!r}")


# name -> (input lengths, output lengths). The chat-like shape roughly follows ShareGPT's:
# medians of a couple hundred tokens, long right tails.
DATASETS = {
    "fixed": (fixed(128), fixed(32)),
    "uniform": (uniform(64, 256), uniform(16, 64)),
    "long-prompt": (uniform(1024, 2048), uniform(64, 128)),
    "chat": (LengthDist("lognormal", 16, 1024, median=200, sigma=0.8),
             LengthDist("lognormal", 8, 512, median=150, sigma=0.7)),
}


# ----------------------------------------------------------------------------- prompts


def random_tokens(rng: np.random.Generator, n: int, vocab_size: int, exclude_ids=()) -> list[int]:
    """n token ids uniform over the vocabulary, with `exclude_ids` (eos, bos) replaced."""
    ids = rng.integers(0, vocab_size, size=n)
    excluded = np.isin(ids, list(exclude_ids))
    if excluded.any():
        allowed = np.setdiff1d(np.arange(vocab_size), list(exclude_ids))
        ids[excluded] = rng.choice(allowed, size=int(excluded.sum()))
    return ids.tolist()


def synthetic(num_requests: int, input_len: LengthDist, output_len: LengthDist, vocab_size: int,
              arrivals_s, rng: np.random.Generator, exclude_ids=()) -> list[BenchRequest]:
    """Random-token prompts with lengths from the given distributions, at the given arrivals."""
    if len(arrivals_s) != num_requests:
        raise ValueError(f"need {num_requests} arrival times, got {len(arrivals_s)}")
    ins, outs = input_len.sample(num_requests, rng), output_len.sample(num_requests, rng)
    return [BenchRequest(i, random_tokens(rng, int(ins[i]), vocab_size, exclude_ids), int(outs[i]), float(t))
            for i, t in enumerate(arrivals_s)]


# ----------------------------------------------------------------------------- trace replay


@dataclasses.dataclass(frozen=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_trace(path: str | Path) -> list[TraceRow]:
    """Rows of a Mooncake-format JSONL trace, checked, in file order."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                row = TraceRow(float(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                               tuple(int(h) for h in d.get("hash_ids", ())))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: expected JSON with timestamp, input_length, output_length, "
                                 f"hash_ids ({type(e).__name__}: {e})") from None
            if row.input_length < 1 or row.output_length < 1:
                raise ValueError(f"{path}:{n}: input_length and output_length must be >= 1")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty trace")
    return rows


def block_tokens(hash_id: int, block_len: int, vocab_size: int, seed: int, exclude_ids=()) -> list[int]:
    """The token block that `hash_id` stands for: the same for the same (hash_id, seed)."""
    return random_tokens(np.random.default_rng([seed, 0, hash_id]), block_len, vocab_size, exclude_ids)


def trace_requests(rows: list[TraceRow], vocab_size: int, seed: int, block_len: int = 512,
                   time_scale: float = 1.0, exclude_ids=()) -> list[BenchRequest]:
    """Requests replaying `rows`: arrivals at (timestamp - first) * time_scale; each prompt is the
    blocks of its hash ids, cut to input_length, and topped up with tokens of its own when the
    hash ids cover fewer than input_length tokens."""
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    t0 = min(r.timestamp_ms for r in rows)
    blocks: dict[int, list[int]] = {}
    out = []
    for i, row in enumerate(rows):
        prompt: list[int] = []
        for h in row.hash_ids:
            if len(prompt) >= row.input_length:
                break
            if h not in blocks:
                blocks[h] = block_tokens(h, block_len, vocab_size, seed, exclude_ids)
            prompt += blocks[h]
        if len(prompt) < row.input_length:
            prompt += random_tokens(np.random.default_rng([seed, 1, i]), row.input_length - len(prompt),
                                    vocab_size, exclude_ids)
        out.append(BenchRequest(i, prompt[:row.input_length], row.output_length,
                                (row.timestamp_ms - t0) / 1e3 * time_scale))
    return out
