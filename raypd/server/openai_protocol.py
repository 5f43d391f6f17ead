"""OpenAI's HTTP API as plain data: request bodies checked into `Generation`s, response bodies built.

No I/O here: `parse_completion` / `parse_chat` turn a decoded JSON body into a `Generation` (what
to submit to a backend, how to shape the answer) or raise `ApiError` naming the field and its
allowed values; `completion_body`, `chat_body`, `*_chunk` and `usage` build what goes back. The
app (openai_app.py) moves data between these functions, the backend and the wire.

Fields raypd does not implement are refused with a 400 that names them, never silently ignored.
The penalties, `logit_bias`, `min_tokens` and top logprobs are applied by the on-device sampler
(raypd/engine/sampling.py) on every backend.
"""

from __future__ import annotations

import dataclasses
import re

from raypd.engine.api import KV_COMPRESSIONS, MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16  # samples per prompt (n)
MAX_PROMPTS = 64  # prompts per completions request
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
# Accepted only at their neutral value: (field, neutral values, what to tell the client).
NEUTRAL_ONLY = (
    ("best_of", (1,), "1 (use n for several samples)"),
)
COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "user",
    "top_k", "min_p", "ignore_eos", "stop_token_ids", "skip_special_tokens", "kv_compression", "logit_bias",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_tokens",
    *(name for name, _, _ in NEUTRAL_ONLY),
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             499: "client_closed_request",
             500: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param,
                    "invalid_value")


_FIELD = re.compile(r"^([A-Za-z_][A-Za-z_0-9.\[\]]*)(?::| must| encodes| is)")


def from_value_error(e: ValueError, default_param: str | None = None) -> ApiError:
    """A backend's ValueError (whose message starts with the field it names) as a 400."""
    message = str(e)
    m = _FIELD.match(message)
    return ApiError(400, message, m.group(1) if m else default_param, "invalid_value")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One checked request: each prompt is sampled `n` times with `params`. Sample i's seed
    stream: `seed + i` (mod 2**32) when a seed is given, so sample i of a request equals a
    request with n = 1 and seed `seed + i`; without a seed, each sample's own request id."""

    prompts: tuple  # each a str (text) or a tuple of token ids
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # return the sampled tokens' logprobs
    echo: bool = False  # completions: the prompt's text before the completion
    kv_compression: str | None = None
    max_tokens_given: bool = True  # False: chat, fill the context left after the prompt
    prompt_field: str = "prompt"

    def params_for(self, sample: int, max_tokens: int | None = None) -> SamplingParams:
        """The params of the `sample`-th of n samples: its own seed stream when a seed is given."""
        changes = {}
        if self.params.seed is not None and sample:
            changes["seed"] = (self.params.seed + sample) % 2**32
        if max_tokens is not None:
            changes["max_tokens"] = max_tokens
        return dataclasses.replace(self.params, **changes) if changes else self.params


# ---------------------------------------------------------------------------- field checks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(name, f"{name} must be an integer {rng}, got {v!r}")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {v!r}")
    return v


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: raypd does "
                       "not implement them (README.md, 'OpenAI API', lists the supported fields)",
                       unknown[0], "unsupported_field")
    for name, neutral, say in NEUTRAL_ONLY:
        v = body.get(name)
        if v is not None and (not _is_number(v) or v not in neutral):
            raise ApiError(400, f"{name}: only {say} is supported, got {v!r}", name, "unsupported_value")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad("stop", f"stop must be a non-empty string or a list of non-empty strings, got {v!r}")
    return tuple(v)


def _stop_token_ids(body: dict) -> tuple[int, ...]:
    v = body.get("stop_token_ids")
    if v is None:
        return ()
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise bad("stop_token_ids", f"stop_token_ids must be a list of token ids (integers >= 0), got {v!r}")
    return tuple(v)


def _logit_bias(body: dict) -> dict:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("logit_bias", f"logit_bias must be a map of token ids to biases in [-100, 100], got {_short(v)}")
    return v  # keys (strings in JSON) and values are checked by SamplingParams


def _common(body: dict, allowed: set[str], max_tokens, top_logprobs: int = 0) -> dict:
    _check_fields(body, allowed)
    if not isinstance(body.get("model", ""), str):
        raise bad("model", f"model must be a string, got {body['model']!r}")
    if body.get("skip_special_tokens") is False:
        raise ApiError(400, "skip_special_tokens: only true is supported (special tokens are always left out "
                       "of the text; their ids are in logprobs)", "skip_special_tokens", "unsupported_value")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", f"stream_options must be {{\"include_usage\": bool}}, got {options!r}")
        include_usage = _bool(options, "include_usage", False)
    kv = body.get("kv_compression")
    if kv is not None and kv not in KV_COMPRESSIONS:
        raise bad("kv_compression", f"kv_compression must be one of {list(KV_COMPRESSIONS)} or null, got {kv!r}")
    top_k = _int(body, "top_k", 0, -1)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=max(top_k, 0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=_int(body, "seed", None, 0, 2**32 - 1), stop=_stop(body), stop_token_ids=_stop_token_ids(body),
            ignore_eos=_bool(body, "ignore_eos", False), logprobs=True,
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
            min_tokens=_int(body, "min_tokens", 0, 0), logit_bias=_logit_bias(body), top_logprobs=top_logprobs)
    except ValueError as e:  # a limit SamplingParams enforces (the message names the field)
        raise from_value_error(e) from None
    return dict(params=params, n=_int(body, "n", 1, 1, MAX_N), stream=stream, include_usage=include_usage,
                kv_compression=kv)


# ---------------------------------------------------------------------------- requests


def _prompts(v) -> tuple:
    """prompt: a string, a list of strings, a list of token ids or a list of token-id lists."""
    what = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(v, str):
        prompts = (v,)
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        prompts = (tuple(v),)
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        prompts = tuple(v)
    elif isinstance(v, list) and v and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in v):
        prompts = tuple(tuple(p) for p in v)
    else:
        raise bad("prompt", f"{what}, got {_short(v)}")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    if any(len(p) == 0 for p in prompts):
        raise bad("prompt", "prompt must not be empty")
    return prompts


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_completion(body) -> Generation:
    """A /v1/completions body -> Generation, or ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    if "prompt" not in body:
        raise bad("prompt", "prompt is required")
    prompts = _prompts(body["prompt"])
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise bad("logprobs", f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or null, got {logprobs!r}")
    echo = _bool(body, "echo", False)
    common = _common(body, COMPLETION_FIELDS, _int(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 1),
                     logprobs or 0)
    if echo and logprobs is not None:  # the prompt's logprobs too, computed by the prefill
        common["params"] = dataclasses.replace(common["params"], prompt_logprobs=True)
    return Generation(prompts, logprobs=logprobs is not None, echo=echo, **common)


def parse_chat(body) -> tuple[Generation, list[dict]]:
    """A /v1/chat/completions body -> (Generation without its prompt, the messages checked)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    messages = check_messages(body.get("messages"))
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    max_tokens = _int(body, given[0], 1, 1) if given else 1  # 1: a placeholder until the prompt's length is known
    common = _common(body, CHAT_FIELDS, max_tokens, top or 0)
    return Generation((), logprobs=logprobs, max_tokens_given=bool(given), prompt_field="messages",
                      **common), messages


def check_messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("messages", f"messages must be a non-empty list of {{role, content}} objects, got {_short(v)}")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(where, f"{where} must be an object with a role and a content, got {_short(m)}")
        if m["role"] not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {list(ROLES)}, got {m['role']!r}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"{where}: unsupported message field(s) {', '.join(extra)}", f"{where}.{extra[0]}",
                           "unsupported_field")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                               "are supported", f"{where}.content", "unsupported_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts, "
                      f"got {_short(content)}")
        out.append({**m, "content": content})
    return out


# ---------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(tokens: list[str], logprobs: list[float | None], offset: int, tops=None) -> dict:
    """Completions' logprobs: the sampled token and its logprob at each position (with `echo`,
    the prompt's tokens first: the very first one has none, null as in OpenAI's); `top_logprobs`
    maps the top alternatives' texts (`tops`: per token [(text, logprob)] or None) to their
    logprobs, the sampled token included (as OpenAI and vLLM do)."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = tops or [None] * len(tokens)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [None if lp is None else {**dict(top or ()), t: lp}
                             for t, lp, top in zip(tokens, logprobs, tops)],
            "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], tops=None) -> dict:
    """Chat's logprobs; `tops`: per token its top alternatives [(text, logprob)] or None."""
    tops = tops or [None] * len(tokens)
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                                          for a, alp in top or ()]}
                        for t, lp, top in zip(tokens, logprobs, tops)]}


def completion_body(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    """choices: {"text", "logprobs", "finish_reason"} in order."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, **c} for i, c in enumerate(choices)], "usage": usage_,
            "system_fingerprint": None}


def chat_body(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    """choices: {"text", "logprobs", "finish_reason"} in order."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
                        for i, c in enumerate(choices)],
            "usage": usage_, "system_fingerprint": None}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, logprobs, finish_reason,
                     with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, logprobs, finish_reason,
               with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_,
            "system_fingerprint": None}
