"""Engine factories: what a worker builds inside its own process.

A worker is handed a factory (small and picklable: a model name and configs, never weights)
and calls `factory.build(role, tp)` once, in the process and on the devices that will run it.
The result, `WorkerEngines`, is everything the worker touches:
  prefill    a PrefillEngine-like object (`prefill(requests, prefixes)`, `release`,
             `max_cached_pages`, `.allocator`). On a decode worker it prefills short prompts
             locally (conditional disaggregation); for the JAX engines it runs over the decode
             engine's own runner, so its pages are the decode pool's and nothing is copied.
  decode     a DecodeEngine-like object (decode workers only).
  send / recv_into
             how K/V leaves a prefill engine into a `KVTransport` and lands in a decode engine.
Two factories: `JaxEngineFactory` (the real engines) and `MockEngineFactory` (the arithmetic
mock of raypd/engine/mock.py, so orchestration tests need no model and show which worker ran
each phase).
"""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Callable

import numpy as np

from raypd.engine.api import DEFAULT_KV_COMPRESSION, KVPayload, PrefillOutput, Request, TokenOutput
from raypd.engine.kv_codec import EncodedKV
from raypd.engine.mock import MockDecodeEngine, MockPrefillEngine
from raypd.engine.pages import OutOfPages
from raypd.engine.runner import EngineConfig

ROLES = ("prefill", "decode")


@dataclasses.dataclass
class WorkerEngines:
    prefill: object  # PrefillEngine-like; its allocator holds every page the KV index may cache
    decode: object | None  # DecodeEngine-like (decode workers only)
    send: Callable  # (Request, PrefillOutput, KVTransport) -> TransferHandle; before prefill.release
    recv_into: Callable  # (Request, PrefillOutput, TransferHandle, KVTransport) -> TokenOutput
    model: object  # .config (ModelConfig-like: vocab_size) and .tokenizer, for validation
    max_seq_len: int
    kv_bytes_per_page: int
    max_slots: int = 0  # decode batch capacity (decode workers)
    export_pages: Callable | None = None  # (pages, compression) -> EncodedKV: a host copy of full pages
    import_pages: Callable | None = None  # ([EncodedKV]) -> new pool pages holding them (one reference)
    compression: str = DEFAULT_KV_COMPRESSION  # the deployment's K/V compression (a request may name its own)

    @property
    def page_size(self) -> int:
        return self.prefill.allocator.page_size

    def allocators(self) -> list:
        """Distinct page pools of this worker (one for the JAX engines, two for the mock)."""
        out = [self.prefill.allocator]
        if self.decode is not None and self.decode.allocator is not self.prefill.allocator:
            out.append(self.decode.allocator)
        return out


# ---------------------------------------------------------------- JAX engines


@dataclasses.dataclass(frozen=True)
class JaxEngineFactory:
    model: str | None = None  # anything models.load accepts by name or path
    engine: EngineConfig = EngineConfig()
    compression: str = DEFAULT_KV_COMPRESSION  # K/V on the wire: "none" | "int8"
    dtype: str | None = None
    warmup: bool = False  # compile every engine shape in `build`, before the worker reports ready

    def build(self, role: str, tp: int = 1) -> WorkerEngines:
        import models
        from raypd.engine import paged
        from raypd.engine.decode import DecodeEngine
        from raypd.engine.prefill import PrefillEngine
        from raypd.engine.runner import ModelRunner
        from raypd.transfer import recv_into, send_prefill
        from raypd.transfer.engines import export_pages, import_pages

        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        model = models.load(self.model, self.dtype)
        runner = ModelRunner(model, dataclasses.replace(self.engine, tp=tp))
        if self.warmup:
            start = time.perf_counter()
            num_shapes = runner.warmup()
            # a worker's stdout reaches the driver's log (Ray's log_to_driver); its logging is not set up
            print(f"raypd {role} worker: compiled {num_shapes} engine shapes in {time.perf_counter() - start:.1f} s",
                  flush=True)
        prefill = PrefillEngine(runner)
        decode = DecodeEngine(runner, model.tokenizer) if role == "decode" else None
        compression = self.compression
        return WorkerEngines(
            prefill=prefill, decode=decode,
            send=lambda req, out, t: send_prefill(prefill, out, t, _compression(req, compression)),
            recv_into=lambda req, out, h, t: recv_into(decode, req, out, h, t),
            model=types.SimpleNamespace(config=model.config, tokenizer=model.tokenizer),
            max_seq_len=runner.max_seq_len,
            kv_bytes_per_page=paged.kv_bytes_per_page(model.config, runner.page_size),
            max_slots=runner.config.max_slots,
            export_pages=lambda pages, c: export_pages(runner, pages, c),
            import_pages=lambda encs: import_pages(runner, encs), compression=compression)


def _compression(request: Request, default: str) -> str:
    """The request's own K/V compression when it names one, else the deployment's."""
    return getattr(request, "kv_compression", None) or default


# ---------------------------------------------------------------- arithmetic mock


class _MockPrefill(MockPrefillEngine):
    """The mock prefill engine with the JAX engine's signature and page use: a cached prefix's
    pages are reused (one more reference each) and only the rest of the prompt gets new pages,
    which is what the scheduler reserves (the arithmetic output depends on the prompt only)."""

    def prefill(self, requests: list[Request], prefixes: dict | None = None) -> list[PrefillOutput]:
        outs = []
        for r in requests:
            prefix = list((prefixes or {}).get(r.request_id, ()))
            self.allocator.incref(prefix)
            try:
                pages = prefix + self.allocator.allocate(self.allocator.pages_for(len(r.prompt_ids)) - len(prefix))
            except OutOfPages:
                self.allocator.free(prefix)
                raise
            self._held[r.request_id] = (pages, list(r.prompt_ids))
            first = (sum(r.prompt_ids) * self.weight) % self.vocab_size
            outs.append(PrefillOutput(r.request_id, len(r.prompt_ids), first, -1.0, pages,
                                      num_cached_tokens=len(prefix) * self.allocator.page_size))
        return outs

    def max_cached_pages(self, prompt_len: int) -> int:
        return (prompt_len - 1) // self.allocator.page_size


def _mock_send(prefill: _MockPrefill, out: PrefillOutput, transport, delay_s: float = 0.0) -> object:
    time.sleep(delay_s)
    p = prefill.read_kv(out)
    return transport.send(out.request_id, EncodedKV("none", p.num_tokens, "float32", p.k, p.v))


def _mock_recv_into(decode: MockDecodeEngine, request: Request, out: PrefillOutput, handle,
                    transport, delay_s: float = 0.0) -> TokenOutput:
    time.sleep(delay_s)
    enc = transport.recv(handle, 30.0)
    payload = KVPayload(np.asarray(enc.k), np.asarray(enc.v), enc.num_tokens)
    return decode.insert(request, out, payload)


def _mock_export(prefill: _MockPrefill, pages: list[int]) -> EncodedKV:
    G = prefill.allocator.page_size
    kv = np.zeros((1, len(pages), G, 1, 1), np.float32)  # the mock keeps no K/V per page
    return EncodedKV("none", len(pages) * G, "float32", kv, kv.copy())


@dataclasses.dataclass(frozen=True)
class MockEngineFactory:
    """Prefill workers use `prefill_weight`; decode workers decode with `decode_weight` and
    prefill short prompts locally with `local_prefill_weight`, so every token tells its origin."""

    prefill_weight: int = 1
    decode_weight: int = 1
    local_prefill_weight: int = 1
    vocab_size: int = 1000
    page_size: int = 4
    num_pages: int = 256
    max_slots: int = 4
    max_seq_len: int = 512
    eos_ids: tuple[int, ...] = ()
    # Delays, for failure tests (kill a worker while a phase is under way): before a prefill's
    # K/V is sent, before a decode worker receives K/V, and in every decode step.
    prefill_delay_s: float = 0.0
    recv_delay_s: float = 0.0
    step_delay_s: float = 0.0

    def build(self, role: str, tp: int = 1) -> WorkerEngines:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        weight = self.prefill_weight if role == "prefill" else self.local_prefill_weight
        prefill = _MockPrefill(weight, self.vocab_size, self.page_size, self.num_pages)
        decode = None
        if role == "decode":
            decode = MockDecodeEngine(self.decode_weight, self.vocab_size, self.max_slots,
                                      self.page_size, self.num_pages, self.eos_ids, self.step_delay_s)
            # one page pool per worker, as the JAX engines share their runner's: a local prefill's
            # retained pages and a finished request's must count in the free pages the scheduler sees
            decode.allocator = prefill.allocator
        config = types.SimpleNamespace(vocab_size=self.vocab_size, eos_token_ids=self.eos_ids)
        return WorkerEngines(
            prefill=prefill, decode=decode,
            send=lambda req, out, t: _mock_send(prefill, out, t, self.prefill_delay_s),
            recv_into=lambda req, out, h, t: _mock_recv_into(decode, req, out, h, t, self.recv_delay_s),
            model=types.SimpleNamespace(config=config, tokenizer=None),
            max_seq_len=self.max_seq_len, kv_bytes_per_page=4 * self.page_size, max_slots=self.max_slots,
            export_pages=lambda pages, c: _mock_export(prefill, pages),
            import_pages=lambda encs: prefill.allocator.allocate(sum(e.num_pages for e in encs)))


# ---------------------------------------------------------------- fault injection


@dataclasses.dataclass(frozen=True)
class FaultyEngineFactory:
    """Another factory's engines, except that a decode worker loses `fail_fraction` of the K/V
    it receives: the payload is dropped unread and `SenderLost` raised, as when the sender dies
    on the way, so the scheduler prefills the request again (for the fault suite,
    raypd/chaos/transfer_faults.py). Deterministic: whether the n-th arrival of a request's K/V
    at a worker is lost is a draw of `random.Random(f"{seed}:{request_id}:{n}")`, so a seed
    replays the same faults (request ids are the scheduler's counter). The worker's engines
    count them in `fault_counter["faults"]`."""

    inner: object  # JaxEngineFactory or MockEngineFactory
    fail_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fail_fraction <= 1.0:
            raise ValueError(f"fail_fraction must be in [0, 1], got {self.fail_fraction}")

    @property
    def compression(self) -> str:
        return getattr(self.inner, "compression", "none")

    def build(self, role: str, tp: int = 1) -> WorkerEngines:
        import random

        from raypd.transfer import SenderLost

        engines = self.inner.build(role, tp)
        if role != "decode" or self.fail_fraction == 0.0:
            return engines
        recv_into, counter, arrivals = engines.recv_into, {"faults": 0}, {}

        def faulty_recv_into(request, out, handle, transport):
            n = arrivals[request.request_id] = arrivals.get(request.request_id, -1) + 1
            if random.Random(f"{self.seed}:{request.request_id}:{n}").random() < self.fail_fraction:
                counter["faults"] += 1
                raise SenderLost(f"fault injected: K/V of {request.request_id} lost on the way "
                                 f"(fault {counter['faults']})")
            return recv_into(request, out, handle, transport)

        engines.recv_into = faulty_recv_into
        engines.fault_counter = counter
        return engines
