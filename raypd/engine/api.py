"""The engine interface shared by the JAX engines and the arithmetic mock.

Lifecycle of a request through the engines:
  1. `PrefillEngine.prefill([Request])` computes the prompt's K/V into the prefill engine's
     pages and samples the first token -> `PrefillOutput` (the pages stay held).
  2. The K/V moves: `PrefillEngine.read_kv(out)` -> `KVPayload` (skipped when the decode engine
     shares the prefill engine's pool, as in colocated mode), then `PrefillEngine.release`.
  3. `DecodeEngine.insert(request, out, payload)` puts the request into a free slot between
     steps (continuous batching).
  4. `DecodeEngine.decode_step(max_steps)` dispatches the next decode steps for every slot (up
     to max_steps in one dispatch) and returns the `TokenOutput`s of the previous dispatch
     (several per request after a multi-step dispatch, each request's in order): the device
     computes while the host does the bookkeeping. Finished requests free their slot and
     pages as they are read.
  5. `DecodeEngine.release(request_id)` aborts a running request early.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
KV_COMPRESSIONS = ("int8", "none")  # how a request's K/V travels from prefill to decode


def check_kv_compression(value):
    """None (the deployment's default) or one of KV_COMPRESSIONS; else ValueError."""
    if value is not None and value not in KV_COMPRESSIONS:
        raise ValueError(f"kv_compression must be one of {KV_COMPRESSIONS} or None (the deployment "
                         f"default), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) \
                or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32) or None, got {self.seed!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    # "int8" | "none": how this request's K/V moves prefill -> decode (disaggregated serving
    # only; colocated engines share one pool). None: the deployment's default.
    kv_compression: str | None = None

    def __post_init__(self):
        check_kv_compression(self.kv_compression)


@dataclasses.dataclass
class PrefillOutput:
    request_id: str
    prompt_len: int
    first_token: int
    first_logprob: float
    pages: list[int]  # pages of the prefill engine's pool holding the prompt's K/V, in order
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from a cached prefix


@dataclasses.dataclass
class KVPayload:
    """K/V of one request's pages, in page order."""

    k: np.ndarray  # [L, n, G, K, H]
    v: np.ndarray  # [L, n, G, K, H]
    num_tokens: int


@dataclasses.dataclass
class TokenOutput:
    request_id: str
    token_id: int
    logprob: float
    finish_reason: str | None = None  # None while running; FINISH_STOP / FINISH_LENGTH / FINISH_ABORT
    text: str = ""  # text delta this token adds (empty without a tokenizer)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class PrefillEngineAPI(Protocol):
    def prefill(self, requests: list[Request]) -> list[PrefillOutput]: ...
    def read_kv(self, out: PrefillOutput) -> KVPayload: ...
    def release(self, request_id: str) -> None: ...


class DecodeEngineAPI(Protocol):
    def can_insert(self, prompt_len: int, max_tokens: int) -> bool: ...
    def insert(self, request: Request, out: PrefillOutput, payload: KVPayload | None) -> TokenOutput: ...
    def decode_step(self, max_steps: int | None = None) -> list[TokenOutput]: ...
    def release(self, request_id: str) -> None: ...
