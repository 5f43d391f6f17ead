"""The Python client: `raypd.generate` and `raypd.stream`.

backend="local" runs in-process on the colocated engine (no Ray); backend="ray" sends the
requests to the running Ray deployment (raypd.serve / raypd.connect); backend="auto" (the
default) uses a running deployment when this process is connected to Ray and no model is named,
else the local engine. Every argument is checked
before any device work, and a bad one raises ValueError naming the parameter and its range.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import time
from typing import Iterator, Sequence

import models
from raypd.engine.api import Request, SamplingParams, TokenOutput, check_kv_compression
from raypd.engine.colocated import ColocatedEngine
from raypd.engine.runner import EngineConfig, ModelRunner
from raypd.protocol import Completion, StreamChunk, check_sampling, encode_prompt  # noqa: F401 - re-exported

BACKENDS = ("local", "ray", "auto")
_ids = itertools.count()


class LocalBackend:
    """A colocated engine on this process's devices, for one model."""

    def __init__(self, model: models.Model, config: EngineConfig | None = None):
        self.model = model
        config = config or EngineConfig(max_seq_len=min(2048, model.config.max_position_embeddings))
        self.engine = ColocatedEngine(ModelRunner(model, config), model.tokenizer)

    @property
    def max_seq_len(self) -> int:
        return self.engine.runner.max_seq_len

    def run(self, requests: list[Request]) -> Iterator[TokenOutput]:
        for r in requests:
            self.engine.add_request(r)
        pending = {r.request_id for r in requests}
        try:
            while pending:
                for o in self.engine.step():
                    if o.request_id in pending:
                        if o.is_finished:
                            pending.discard(o.request_id)
                        yield o
        finally:
            for rid in pending:  # a caller that stops early aborts what is left
                self.engine.abort(rid)


@functools.lru_cache(maxsize=2)
def _backend(model_source: str | None) -> LocalBackend:
    return LocalBackend(models.load(model_source))


def ray_deployment(model=None, backend: str = "auto"):
    """backend="ray": the running deployment named "raypd" (raypd.connect); "auto": that one if
    this process is connected to Ray, one runs and no local model was asked for, else None."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ray":
        from raypd.runtime.deployment import connect

        return connect()
    if backend == "auto" and model is None and "ray" in sys.modules:
        from raypd.runtime.deployment import find_running

        return find_running()
    return None


def get_backend(model=None, backend: str = "local") -> LocalBackend:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, LocalBackend):
        return model
    if isinstance(model, models.Model):
        return LocalBackend(model)
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be a name, a path, a models.Model or None, got {type(model).__name__}")
    return _backend(model)


def _requests(prompts, backend: LocalBackend, params: SamplingParams,
              kv_compression: str | None = None) -> list[Request]:
    return [Request(f"local-{next(_ids)}", encode_prompt(p, backend.model, backend.max_seq_len,
                                                          params.max_tokens, f"prompts[{i}]"), params,
                    kv_compression)
            for i, p in enumerate(prompts)]


def _route(model, backend: str, params: SamplingParams, kv_compression: str | None):
    """-> (a Ray deployment, None) or (None, a local backend), after the checks both share."""
    check_kv_compression(kv_compression)
    deployment = ray_deployment(model, backend)
    if deployment is not None:
        return deployment, None
    b = get_backend(model, "local")
    check_sampling(params, b.model)
    return None, b


def generate(prompts, *, model=None, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop=None, stop_token_ids=(), ignore_eos: bool = False,
             logprobs: bool = False, kv_compression: str | None = None,
             backend: str = "auto") -> list[Completion]:
    """Complete each prompt (a string or a list of token ids). Returns one Completion per prompt.

    kv_compression: "int8" | "none" | None (the deployment default): how the prompt's K/V moves
    from the prefill to the decode engine. It takes effect on disaggregated backends; on
    backend="local" (colocated, one shared page pool) K/V never moves, so it is only validated."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop or (), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=ignore_eos, logprobs=logprobs)
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    deployment, b = _route(model, backend, params, kv_compression)
    if deployment is not None:
        return deployment.generate(prompts, kv_compression=kv_compression, **dataclasses.asdict(params))
    reqs = _requests(prompts, b, params, kv_compression)
    start = time.perf_counter()
    first: dict[str, float] = {}
    tokens: dict[str, list[TokenOutput]] = {r.request_id: [] for r in reqs}
    for o in b.run(reqs):
        first.setdefault(o.request_id, time.perf_counter())
        tokens[o.request_id].append(o)
    end = time.perf_counter()
    seqs = []
    for r in reqs:
        outs = tokens[r.request_id]
        n = len(outs)
        ttft = first[r.request_id] - start
        seqs.append(Completion(
            text="".join(o.text for o in outs),
            token_ids=[o.token_id for o in outs],
            finish_reason=outs[-1].finish_reason,
            logprobs=[o.logprob for o in outs] if logprobs else None,
            metrics=dict(ttft_s=ttft, tpot_s=(end - start - ttft) / (n - 1) if n > 1 else 0.0,
                         e2e_s=end - start, prompt_tokens=len(r.prompt_ids), completion_tokens=n)))
    return seqs


def stream(prompt, *, model=None, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, seed: int | None = None, stop=None, stop_token_ids=(), ignore_eos: bool = False,
           kv_compression: str | None = None, backend: str = "auto") -> Iterator[StreamChunk]:
    """Yield a StreamChunk per generated token of one prompt, as it is produced.
    kv_compression: as in `generate` (validated; takes effect on disaggregated backends)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop or (), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=ignore_eos)
    deployment, b = _route(model, backend, params, kv_compression)
    if deployment is not None:
        return deployment.stream(prompt, kv_compression=kv_compression, **dataclasses.asdict(params))
    reqs = _requests([prompt], b, params, kv_compression)

    def chunks():
        for o in b.run(reqs):
            yield StreamChunk(o.token_id, o.text, o.logprob, o.finish_reason)

    return chunks()
