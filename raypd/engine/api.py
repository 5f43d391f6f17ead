"""The engine interface: the prefill / decode engines over a ModelRunner (or the arithmetic stand-in).

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

import collections.abc
import dataclasses
import math
from typing import Protocol

import numpy as np

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
KV_COMPRESSIONS = ("int8", "none")  # how a request's K/V travels from prefill to decode
DEFAULT_KV_COMPRESSION = "none"  # the one default, for every layer (a request or deployment may name another)

# Bounds on one request. Past them a request is refused at submit (ValueError naming the field
# and the limit; INVALID_ARGUMENT over gRPC): every decode step checks each running request's
# stop strings and stop token ids, so unbounded lists would let one request slow every other.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256  # characters of one stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (a fixed shape on the device)
MAX_LOGIT_BIAS_VALUE = 100.0  # |bias| added to a token's logit
MAX_TOP_LOGPROBS = 20  # alternatives per generated token (a fixed shape on the device)
MAX_PENALTY = 2.0  # |frequency_penalty|, |presence_penalty|; repetition_penalty in (0, MAX_PENALTY]
MAX_PROMPT_BYTES = 1 << 20  # UTF-8 bytes of a text prompt (token-id prompts: the context length)
MAX_REQUEST_ID_LEN = 256  # characters of a client-chosen request id: printable ASCII, no spaces
SERVER_ID_PREFIX = "srv-"  # request ids the servers assign start with it; clients may not use it


def check_kv_compression(value, allow_default: bool = True):
    """The one check of a K/V compression name: one of KV_COMPRESSIONS, or None (the
    deployment's default) where `allow_default`; else ValueError."""
    if value is None and not allow_default:
        raise ValueError(f"kv_compression must be one of {KV_COMPRESSIONS}, got None")
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
    min_p: float = 0.0  # keep tokens with prob >= min_p * the top token's prob (sampling rows only)
    prompt_logprobs: bool = False  # the prefill also returns each prompt token's logprob (OpenAI's echo)
    # Penalties (OpenAI): logit -= frequency_penalty * count + presence_penalty * (count > 0), count
    # = times the token was generated so far; [-2, 2], 0 = off.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM / Hugging Face: a token in the prompt or generated so far has its logit divided by it
    # when positive, multiplied when negative; (0, 2], 1 = off.
    repetition_penalty: float = 1.0
    # token id -> bias added to its logit, in [-100, 100]; at most MAX_LOGIT_BIAS entries. A dict
    # or (id, bias) pairs; kept as pairs sorted by id.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the request before this many tokens
    top_logprobs: int = 0  # alternatives (most likely first) reported with each token, <= MAX_TOP_LOGPROBS

    @property
    def is_penalized(self) -> bool:
        """Whether the sampler must apply penalties, logit_bias or min_tokens to this request."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) \
                or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float, np.floating)) \
                or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float, np.floating)) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0 = off), got {self.min_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32) or None, got {self.seed!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, 2] (1 = off), got {self.repetition_penalty!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        object.__setattr__(self, "stop", _check_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _check_stop_token_ids(self.stop_token_ids))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _check_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if isinstance(bias, collections.abc.Mapping):
        items = list(bias.items())
    elif isinstance(bias, (collections.abc.Sequence, np.ndarray)) and not isinstance(bias, str):
        items = list(bias)
    else:
        raise ValueError(f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    if len(items) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries (MAX_LOGIT_BIAS), got {len(items)}")
    out = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to biases, got the entry {item!r:.80}")
        t, b = item
        if isinstance(t, str) and t.strip().isdigit():  # JSON object keys are strings
            t = int(t)
        if not _is_int(t) or t < 0:
            raise ValueError(f"logit_bias: key {t!r:.80} is not a token id (an integer >= 0)")
        if not _is_number(b) or not -MAX_LOGIT_BIAS_VALUE <= b <= MAX_LOGIT_BIAS_VALUE:
            raise ValueError(f"logit_bias[{t}] must be a number in [-100, 100], got {b!r:.80}")
        if int(t) in out:
            raise ValueError(f"logit_bias: token id {t} appears twice")
        out[int(t)] = float(b)
    return tuple(sorted(out.items()))


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, collections.abc.Sequence):  # lists, tuples, protobuf repeated fields
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings (MAX_STOP_STRINGS), got {len(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r:.80}")
        if len(s) > MAX_STOP_STRING_LEN:
            raise ValueError(f"stop[{i}]: at most {MAX_STOP_STRING_LEN} characters (MAX_STOP_STRING_LEN), "
                             f"got {len(s)}")
    return tuple(stop)


def _check_stop_token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, str) or not isinstance(ids, (collections.abc.Sequence, np.ndarray)):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {type(ids).__name__}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids (MAX_STOP_TOKEN_IDS), got {len(ids)}")
    for i, t in enumerate(ids):
        if not _is_int(t) or t < 0:
            raise ValueError(f"stop_token_ids[{i}] must be a token id (an integer >= 0), got {t!r}")
    return tuple(int(t) for t in ids)


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Stop token ids and logit_bias keys must be in [0, vocab_size): the checks of `params` that
    need the model."""
    for i, t in enumerate(params.stop_token_ids):
        if t >= vocab_size:
            raise ValueError(f"stop_token_ids[{i}]: token id {t} is outside the vocabulary [0, {vocab_size})")
    for t, _ in params.logit_bias:
        if t >= vocab_size:
            raise ValueError(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})")


def check_request_id(request_id) -> str:
    """A client-chosen request id ("" = none, the server assigns one): at most MAX_REQUEST_ID_LEN
    printable ASCII characters without spaces, not starting with SERVER_ID_PREFIX."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError(f"request_id: at most {MAX_REQUEST_ID_LEN} characters (MAX_REQUEST_ID_LEN), "
                         f"got {len(request_id)}")
    if not all("!" <= c <= "~" for c in request_id):
        raise ValueError(f"request_id must be printable ASCII without spaces, got {request_id!r:.80}")
    if request_id.startswith(SERVER_ID_PREFIX):
        raise ValueError(f"request_id: ids starting with {SERVER_ID_PREFIX!r} are reserved for the ids "
                         f"the server assigns, got {request_id!r:.80}")
    return request_id


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    # "int8" | "none": how this request's K/V moves prefill -> decode (disaggregated serving
    # only; colocated engines share one pool). None: the deployment's default.
    kv_compression: str | None = None
    # The last resumed_len prompt ids were generated by an earlier attempt (a request resumed after
    # a failure): penalties count them as generated, and min_tokens was lowered by as many.
    resumed_len: int = 0

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
    # with params.prompt_logprobs: the logprob of prompt token i given tokens < i, for i >= 1
    prompt_logprobs: list[float] | None = None
    first_top_logprobs: tuple | None = None  # ((token id, logprob), ...) when params.top_logprobs


@dataclasses.dataclass
class KVPayload:
    """K/V of one request's pages, in page order."""

    k: np.ndarray  # [L, n, G, K, H]
    v: np.ndarray  # [L, n, G, K, H]
    num_tokens: int


@dataclasses.dataclass
class EncodedKV:
    """One request's K/V as it travels, in page order. Arrays are numpy on the wire (a
    transport may hand back device arrays of the same shapes)."""

    compression: str  # "none" | "int8"
    num_tokens: int  # prompt tokens whose K/V the pages hold (the last page may be partial)
    dtype: str  # the sender pool's dtype ("float32", "bfloat16", ...)
    k: np.ndarray  # [L, n, G, K, H] int8 (int8) or the pool dtype (none)
    v: np.ndarray  # [L, n, G, K, H]
    k_scale: np.ndarray | None = None  # [L, n, G, K] bfloat16, rounded up (int8 only)
    v_scale: np.ndarray | None = None  # [L, n, G, K] bfloat16
    raw_index: np.ndarray | None = None  # [m] int32, positions in 0..n-1 of pages sent raw
    raw_k: np.ndarray | None = None  # [L, m, G, K, H] pool dtype
    raw_v: np.ndarray | None = None  # [L, m, G, K, H]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape)  # [L, n, G, K, H]

    @property
    def num_pages(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_raw_pages(self) -> int:
        return 0 if self.raw_index is None else int(len(self.raw_index))

    @property
    def num_bytes(self) -> int:
        arrays = (self.k, self.v, self.k_scale, self.v_scale, self.raw_index, self.raw_k, self.raw_v)
        return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("k", "v", "k_scale", "v_scale", "raw_index", "raw_k", "raw_v")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def replace(self, **arrays) -> "EncodedKV":
        return dataclasses.replace(self, **arrays)


@dataclasses.dataclass
class TokenOutput:
    request_id: str
    token_id: int
    logprob: float
    finish_reason: str | None = None  # None while running; FINISH_STOP / FINISH_LENGTH / FINISH_ABORT
    text: str = ""  # text delta this token adds (empty without a tokenizer)
    prompt_logprobs: list[float] | None = None  # on a request's first token only: PrefillOutput.prompt_logprobs
    # ((token id, logprob), ...) most likely first, params.top_logprobs of them; None when not asked
    top_logprobs: tuple | None = None

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
