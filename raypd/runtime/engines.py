"""Engine factories: what a worker builds inside its own process.

A worker is handed a factory (small and picklable: a model name and configs, never weights)
and calls `factory.build(role, tp)` once, in the process and on the devices that will run it.
The result, `WorkerEngines`, is everything the worker touches:
  prefill    a PrefillEngine. On a decode worker it prefills short prompts locally
             (conditional disaggregation) over the decode engine's own runner, so its pages
             are the decode pool's and nothing is copied.
  decode     a DecodeEngine (decode workers only).
  send / recv_into
             how K/V leaves a prefill engine into a `KVTransport` and lands in a decode engine
             (once for the n samples of a prompt: the others fork from the first there).
Both factories build the same engines (`engines_over`): `JaxEngineFactory` over a model's
`ModelRunner`, `MockEngineFactory` over the arithmetic runner of raypd/engine/arithmetic.py, so
orchestration tests need no model, run the production K/V path, and show which worker ran each
phase.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from typing import TYPE_CHECKING, Callable

from raypd.engine.api import DEFAULT_KV_COMPRESSION, Request
from raypd.engine.runner import EngineConfig

if TYPE_CHECKING:
    from raypd.engine.decode import DecodeEngine
    from raypd.engine.prefill import PrefillEngine

ROLES = ("prefill", "decode")


@dataclasses.dataclass
class WorkerEngines:
    prefill: PrefillEngine  # its allocator holds every page the KV index may cache
    decode: DecodeEngine | None  # decode workers only; shares the prefill engine's runner
    send: Callable  # (Request, PrefillOutput, KVTransport) -> TransferHandle; before prefill.release
    # (Request, PrefillOutput, TransferHandle, KVTransport, forks=()) -> [TokenOutput]: the request's
    # first token, then one per fork (more samples of its prompt: (Request, PrefillOutput))
    recv_into: Callable
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
        """Page pools of this worker (one: a decode worker's prefill engine shares its pool)."""
        return [self.prefill.allocator]


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
        from raypd.engine.runner import ModelRunner

        _check_role(role)
        model = models.load(self.model, self.dtype)
        runner = ModelRunner(model, dataclasses.replace(self.engine, tp=tp))
        if self.warmup:
            start = time.perf_counter()
            num_shapes = runner.warmup()
            # a worker's stdout reaches the driver's log (Ray's log_to_driver); its logging is not set up
            print(f"raypd {role} worker: compiled {num_shapes} engine shapes in {time.perf_counter() - start:.1f} s",
                  flush=True)
        return engines_over(runner, role, model.tokenizer, self.compression)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def wait_at_gate(gate_dir: str | None, timeout_s: float = 120.0) -> None:
    """A pause point for failure tests, across processes: announce the arrival (an empty file
    `arrived-<pid>` in `gate_dir`), then wait until the file `open` exists there. None: no gate."""
    if gate_dir is None:
        return
    open(os.path.join(gate_dir, f"arrived-{os.getpid()}"), "a").close()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(gate_dir, "open")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate_dir} was not opened within {timeout_s} s")
        time.sleep(0.005)


def engines_over(runner, role: str, tokenizer, compression: str, send_delay_s: float = 0.0,
                 recv_delay_s: float = 0.0, send_gate: str | None = None,
                 recv_gate: str | None = None) -> WorkerEngines:
    """The real engines over one runner (a ModelRunner or the arithmetic stand-in): a prefill
    engine, and on a decode worker a decode engine sharing its pool. The delays and gates
    (failure tests only) pause before a prefill's K/V is sent and before a decode worker
    receives K/V (`wait_at_gate`)."""
    from raypd.engine import paged
    from raypd.engine.decode import DecodeEngine
    from raypd.engine.prefill import PrefillEngine
    from raypd.transfer import recv_group, send_prefill
    from raypd.transfer.engines import export_pages, import_pages

    prefill = PrefillEngine(runner)
    decode = DecodeEngine(runner, tokenizer) if role == "decode" else None

    def send(req, out, transport):
        time.sleep(send_delay_s)
        wait_at_gate(send_gate)
        return send_prefill(prefill, out, transport, _compression(req, compression))

    def receive(req, out, handle, transport, forks=()):
        time.sleep(recv_delay_s)
        wait_at_gate(recv_gate)
        return recv_group(decode, [(req, out), *forks], handle, transport)

    return WorkerEngines(
        prefill=prefill, decode=decode, send=send, recv_into=receive,
        model=types.SimpleNamespace(config=runner.cfg, tokenizer=tokenizer),
        max_seq_len=runner.max_seq_len,
        kv_bytes_per_page=paged.kv_bytes_per_page(runner.cfg, runner.page_size),
        max_slots=runner.config.max_slots,
        export_pages=lambda pages, c: export_pages(runner, pages, c),
        import_pages=lambda encs: import_pages(runner, encs), compression=compression)


def _compression(request: Request, default: str) -> str:
    """The request's own K/V compression when it names one, else the deployment's."""
    return request.kv_compression or default


# ---------------------------------------------------------------- arithmetic stand-in


@dataclasses.dataclass(frozen=True)
class MockEngineFactory:
    """The real engines over the arithmetic runner (raypd/engine/arithmetic.py): next token =
    (weight * sum of the tokens so far) % vocab_size. Prefill workers prefill with
    `prefill_weight`; decode workers decode with `decode_weight` and prefill short prompts
    locally with `local_prefill_weight`, so every token tells which call produced it."""

    prefill_weight: int = 1
    decode_weight: int = 1
    local_prefill_weight: int = 1
    vocab_size: int = 1000
    page_size: int = 4
    num_pages: int = 256
    max_slots: int = 4
    max_seq_len: int = 512
    eos_ids: tuple[int, ...] = ()
    compression: str = DEFAULT_KV_COMPRESSION  # K/V on the wire: "none" | "int8" (both exact here)
    # Delays, for failure tests (kill a worker while a phase is under way): before a prefill's
    # K/V is sent, before a decode worker receives K/V, and in every decode dispatch.
    prefill_delay_s: float = 0.0
    recv_delay_s: float = 0.0
    step_delay_s: float = 0.0
    # Decode steps one dispatch may run (EngineConfig.max_decode_steps): with a step_delay_s of
    # tens of ms, a request inserted during an 8-step dispatch waits for all of it.
    max_decode_steps: int = 8
    # Gates (directories, `wait_at_gate`): the same two points held until a test opens them,
    # and a decode worker's loop held once it has produced `step_gate_after` tokens.
    send_gate: str | None = None
    recv_gate: str | None = None
    step_gate: str | None = None
    step_gate_after: int = 0

    @property
    def kv_bytes_per_page(self) -> int:
        return 2 * 2 * 4 * self.page_size  # K and V, H = 2 float32 channels per token (one layer, one head)

    def expected(self, prompt: list[int], max_tokens: int, is_local: bool = False) -> list[int]:
        """The tokens of a prompt prefilled on a prefill worker (or locally on a decode worker)
        and decoded without interruption."""
        from raypd.engine.arithmetic import expected_tokens

        weight = self.local_prefill_weight if is_local else self.prefill_weight
        return expected_tokens(prompt, max_tokens, weight, self.decode_weight, self.vocab_size)

    def build(self, role: str, tp: int = 1) -> WorkerEngines:
        from raypd.engine.arithmetic import ArithmeticRunner, arithmetic_config

        _check_role(role)
        cfg = arithmetic_config(self.vocab_size, self.max_seq_len, self.eos_ids)
        engine = EngineConfig(page_size=self.page_size, num_pages=self.num_pages, max_slots=self.max_slots,
                              max_seq_len=self.max_seq_len, max_decode_steps=self.max_decode_steps)
        weight = self.prefill_weight if role == "prefill" else self.local_prefill_weight
        runner = ArithmeticRunner(cfg, engine, prefill_weight=weight, decode_weight=self.decode_weight,
                                  step_delay_s=self.step_delay_s)
        engines = engines_over(runner, role, None, self.compression, self.prefill_delay_s, self.recv_delay_s,
                               self.send_gate, self.recv_gate)
        if engines.decode is not None and self.step_gate is not None:
            _gate_decode_steps(engines.decode, self.step_gate, self.step_gate_after)
        return engines


def _gate_decode_steps(decode, gate_dir: str, after_tokens: int) -> None:
    """Hold every decode step at `gate_dir` once the engine has produced `after_tokens` tokens
    (a failure test then kills the worker with its requests mid-stream, whatever the pace)."""
    step, num_produced = decode.decode_step, [0]

    def gated_step(max_steps: int | None = None):
        if num_produced[0] >= after_tokens:
            wait_at_gate(gate_dir)
        outs = step(max_steps)
        num_produced[0] += len(outs)
        return outs

    decode.decode_step = gated_step


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

        def faulty_recv_into(request, out, handle, transport, forks=()):
            n = arrivals[request.request_id] = arrivals.get(request.request_id, -1) + 1
            if random.Random(f"{self.seed}:{request.request_id}:{n}").random() < self.fail_fraction:
                counter["faults"] += 1
                raise SenderLost(f"fault injected: K/V of {request.request_id} lost on the way "
                                 f"(fault {counter['faults']})")
            return recv_into(request, out, handle, transport, forks)

        engines.recv_into = faulty_recv_into
        engines.fault_counter = counter
        return engines
