"""What every ring shares about a request at the API boundary, without JAX: the result types
(`Completion`, `StreamChunk`) and the checks every submit path runs (`encode_prompt`,
`check_sampling`). The Python client, the gRPC and HTTP servers and the scheduler's process
import these; none of them needs an engine to do so.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from models.tokens import check_token_ids
from raypd.engine.api import MAX_PROMPT_BYTES, SamplingParams, check_vocab


@dataclasses.dataclass
class Completion:
    text: str  # "" when the model has no tokenizer
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None  # logprob of each generated token, when asked
    # ttft_s, tpot_s, e2e_s, prompt_tokens, completion_tokens from every backend (a Ray
    # deployment adds its scheduler's timings: queue_s, prefill_s, transfer_s, ...). TPOT is the
    # time between tokens after the first: (last token - first token) / (completion_tokens - 1).
    metrics: dict
    # per token: ((token id, logprob), ...) most likely first, when params.top_logprobs > 0
    top_logprobs: list[tuple] | None = None


@dataclasses.dataclass
class StreamChunk:
    token_id: int
    text: str  # text delta
    logprob: float
    finish_reason: str | None
    metrics: dict | None = None  # on the last chunk: as Completion.metrics
    top_logprobs: tuple | None = None  # ((token id, logprob), ...) when params.top_logprobs > 0


def check_sampling(params: SamplingParams, model) -> None:
    """The checks of `params` that need the model (anything with .config.vocab_size and
    .tokenizer): stop strings need a tokenizer, stop token ids must be in the vocabulary.
    Every submit path calls it next to `encode_prompt`; ValueError naming the field."""
    if params.stop and model.tokenizer is None:
        raise ValueError("stop: stop strings need a model with a tokenizer; use stop_token_ids")
    check_vocab(params, model.config.vocab_size)


def encode_prompt(prompt, model, max_seq_len: int, max_tokens: int, field: str = "prompt") -> list[int]:
    """A prompt (text or token ids) as token ids that fit the context with `max_tokens`; else
    ValueError naming `field`. Sizes are checked before any per-token work, so an oversized
    prompt is refused in about the time it takes to measure it."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{field} must not be empty")
        if len(prompt) > MAX_PROMPT_BYTES or len(_utf8(prompt, field)) > MAX_PROMPT_BYTES:
            raise ValueError(f"{field}: at most {MAX_PROMPT_BYTES} bytes of UTF-8 text (MAX_PROMPT_BYTES)")
        if model.tokenizer is None:
            raise ValueError(f"{field}: this model has no tokenizer; pass token ids instead of text")
        ids = model.tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"{field} encodes to no tokens")
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if len(prompt) + max_tokens > max_seq_len:  # before anything walks every id
            _too_long(field, len(prompt), max_tokens, max_seq_len)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"{field} must be a string or a list of token ids (integers)")
        ids = check_token_ids(prompt, model.config.vocab_size, field)
    else:
        raise ValueError(f"{field} must be a string or a list of token ids, got {type(prompt).__name__}")
    if len(ids) + max_tokens > max_seq_len:
        _too_long(field, len(ids), max_tokens, max_seq_len)
    return ids


def _utf8(text: str, field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise ValueError(f"{field} is not valid Unicode text ({e.reason} at character {e.start})") from None


def _too_long(field: str, n: int, max_tokens: int, max_seq_len: int):
    raise ValueError(f"{field}: prompt ({n} tokens) + max_tokens ({max_tokens}) must be "
                     f"<= the context length {max_seq_len}")


def request_metrics(submitted_s: float, first_s: float, last_s: float, prompt_tokens: int | None,
                    completion_tokens: int) -> dict:
    """The metrics every backend reports for a request (perf_counter times in seconds)."""
    from raypd.logs import tpot_s

    return dict(ttft_s=first_s - submitted_s, tpot_s=tpot_s(first_s, last_s, completion_tokens),
                e2e_s=last_s - submitted_s, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
