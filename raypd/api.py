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
from raypd.protocol import (Completion, StreamChunk, check_sampling, encode_prompt,  # noqa: F401 - re-exported
                            request_metrics)

BACKENDS = ("local", "ray", "auto")
_ids = itertools.count()


class LocalBackend:
    """A colocated engine on this process's devices, for one model."""

    def __init__(self, model: models.Model, config: EngineConfig | None = None):
        self.model = model
        config = config or EngineConfig(max_seq_len=min(2048, model.config.max_position_embeddings))
        self.engine = ColocatedEngine(ModelRunner(model, config), model.tokenizer)
        self._is_warm = False

    @property
    def max_seq_len(self) -> int:
        return self.engine.runner.max_seq_len

    def warmup(self, max_len: int | None = None, num_seqs: int | None = None) -> int:
        """Compile the shapes the engine runs, with progress lines in the log: all of them (a
        server's warm-up), or only those `num_seqs` requests of at most `max_len` tokens
        (prompt + generated) can reach (a one-off `raypd generate`). Once per process for all
        shapes; JAX's persistent cache, when on, makes a restart cheap. -> shapes compiled."""
        from raypd import logs

        if self._is_warm:
            return 0
        runner = self.engine.runner
        with logs.progress("compiling the engine's shapes", model=self.model.name,
                           for_requests=None if max_len is None else f"{num_seqs} x {max_len} tokens"):
            if max_len is None:
                n = runner.warmup()
                self._is_warm = True
            else:
                n = _warmup_some(runner, max_len, num_seqs or 1)
        return n
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


def _warmup_some(runner: ModelRunner, max_len: int, num_seqs: int) -> int:
    """Run (compile) every shape that `num_seqs` sequences of at most `max_len` tokens can use:
    prefill chunks up to the bucket of their total, over every context size up to max_len, and decode
    batches up to the bucket of num_seqs. -> shapes run."""
    from raypd.engine.runner import bucket

    max_len = min(max_len, runner.max_seq_len)
    # one prefill chunk may pack several prompts
    top_t = bucket(min(max_len * num_seqs, runner.prefill_buckets[-1]), runner.prefill_buckets)
    top_p = bucket(runner.allocator.pages_for(max_len), runner.page_buckets)
    top_b = bucket(min(num_seqs, runner.config.max_slots), runner.batch_buckets)
    pages = [p for p in runner.page_buckets if p <= top_p]
    count, R = 0, runner.config.max_prefill_segments
    for T in (t for t in runner.prefill_buckets if t <= top_t):
        for Pc in (0, *pages):
            runner.run(*runner.empty_batch(1, T, R, Pc))
            count += 1
    for B in (b for b in runner.batch_buckets if b <= top_b):
        for Pc in pages:
            runner.run(*runner.empty_batch(B, 1, 1, Pc))
            count += 1
    return count


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
             backend: str = "auto", min_p: float = 0.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, repetition_penalty: float = 1.0, logit_bias=None,
             min_tokens: int = 0, top_logprobs: int = 0) -> list[Completion]:
    """Complete each prompt (a string or a list of token ids). Returns one Completion per prompt.

    kv_compression: "int8" | "none" | None (the deployment default): how the prompt's K/V moves
    from the prefill to the decode engine. It takes effect on disaggregated backends; on
    backend="local" (colocated, one shared page pool) K/V never moves, so it is only validated.
    min_p, frequency_penalty, presence_penalty, repetition_penalty, logit_bias, min_tokens and
    top_logprobs: as in SamplingParams (raypd/engine/api.py), on device for every backend."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop or (), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=ignore_eos, logprobs=logprobs, min_p=min_p,
                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                            repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_tokens=min_tokens,
                            top_logprobs=top_logprobs)
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
    last: dict[str, float] = {}
    tokens: dict[str, list[TokenOutput]] = {r.request_id: [] for r in reqs}
    for o in b.run(reqs):
        first.setdefault(o.request_id, time.perf_counter())
        tokens[o.request_id].append(o)
        if o.is_finished:
            last[o.request_id] = time.perf_counter()
    seqs = []
    for r in reqs:
        outs = tokens[r.request_id]
        seqs.append(Completion(
            text="".join(o.text for o in outs),
            token_ids=[o.token_id for o in outs],
            finish_reason=outs[-1].finish_reason,
            logprobs=[o.logprob for o in outs] if logprobs else None,
            metrics=request_metrics(start, first[r.request_id], last[r.request_id], len(r.prompt_ids), len(outs)),
            top_logprobs=[o.top_logprobs for o in outs] if top_logprobs else None))
    return seqs


def stream(prompt, *, model=None, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, seed: int | None = None, stop=None, stop_token_ids=(), ignore_eos: bool = False,
           logprobs: bool = False, kv_compression: str | None = None,
           backend: str = "auto", min_p: float = 0.0, frequency_penalty: float = 0.0,
           presence_penalty: float = 0.0, repetition_penalty: float = 1.0, logit_bias=None,
           min_tokens: int = 0, top_logprobs: int = 0) -> Iterator[StreamChunk]:
    """Yield a StreamChunk per generated token of one prompt, as it is produced; the last one
    carries the request's metrics (as Completion.metrics).
    kv_compression: as in `generate` (validated; takes effect on disaggregated backends)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop or (), stop_token_ids=tuple(stop_token_ids),
                            ignore_eos=ignore_eos, logprobs=logprobs, min_p=min_p,
                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                            repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_tokens=min_tokens,
                            top_logprobs=top_logprobs)
    deployment, b = _route(model, backend, params, kv_compression)
    if deployment is not None:
        return deployment.stream(prompt, kv_compression=kv_compression, **dataclasses.asdict(params))
    reqs = _requests([prompt], b, params, kv_compression)

    def chunks():
        start, first, n = time.perf_counter(), None, 0
        for o in b.run(reqs):
            now = time.perf_counter()
            first, n = first or now, n + 1
            metrics = request_metrics(start, first, now, len(reqs[0].prompt_ids), n) if o.is_finished else None
            yield StreamChunk(o.token_id, o.text, o.logprob, o.finish_reason, metrics, o.top_logprobs)

    return chunks()
