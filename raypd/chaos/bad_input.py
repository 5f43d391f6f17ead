"""Bad input, over gRPC and the Python API: every class refused at once, naming the field.

`cases(vocab_size, max_seq_len)` lists the classes: each is a GenerateRequest (as bytes, so a
class may carry bytes no well-behaved client would send) and/or the arguments of a
`raypd.generate` call, with the field its error must name. `run_grpc` sends each to an
endpoint and expects the status code (INVALID_ARGUMENT, or ALREADY_EXISTS for a duplicate
request id) with the field in the details; `run_python` expects a ValueError naming the field.
`interference` times a stream alone and while hostile requests (the largest the limits refuse)
arrive at the same endpoint from another process. `run` does all of it on an in-process endpoint and returns a Report.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Callable

import grpc

from raypd.engine.api import (MAX_PROMPT_BYTES, MAX_REQUEST_ID_LEN, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS,
                              MAX_STOP_TOKEN_IDS, SERVER_ID_PREFIX)
from raypd.proto import raypd_pb2
from raypd.server.wire import encode_lenient

GENERATE = "/raypd.v1.Generation/Generate"
GENERATE_STREAM = "/raypd.v1.Generation/GenerateStream"
DUPLICATE_ID = "chaos-duplicate"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    grpc: Callable[[], bytes] | None  # the serialized request; None: gRPC cannot express it
    grpc_field: str  # what the status details must name
    python: dict | None  # raypd.generate arguments (with `prompts`); None: Python cannot express it
    python_field: str = ""
    code: str = "INVALID_ARGUMENT"
    needs_in_flight: bool = False  # a request with id DUPLICATE_ID must be in flight first


@dataclasses.dataclass
class Outcome:
    case: str
    path: str  # "grpc" | "python"
    ok: bool
    detail: str  # the status/exception the server gave, or why it is wrong
    latency_s: float


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome]
    num_classes: int
    stream_alone_s: float = 0.0  # median time of one warm stream with nothing else running
    stream_under_attack_s: float = 0.0  # the same while hostile requests arrive (interference())
    num_hostile_refused: int = 0
    leaked_pages: int = 0

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def lines(self) -> list[str]:
        out = [f"{'case':38} {'path':6} {'ok':3} {'ms':>7}  detail"]
        for o in self.outcomes:
            out.append(f"{o.case:38} {o.path:6} {'yes' if o.ok else 'NO':3} {o.latency_s * 1e3:7.1f}  {o.detail:.110}")
        lat = sorted(o.latency_s for o in self.outcomes)
        by_path = {p: sum(o.ok for o in self.outcomes if o.path == p) for p in ("grpc", "python")}
        totals = {p: sum(o.path == p for o in self.outcomes) for p in ("grpc", "python")}
        out.append(f"{self.num_classes} bad-input classes; refused as expected: gRPC {by_path['grpc']}/"
                   f"{totals['grpc']}, Python {by_path['python']}/{totals['python']}; refusal latency "
                   f"p50 {statistics.median(lat) * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")
        if self.stream_alone_s:
            out.append(f"a warm 64-token stream (median): {self.stream_alone_s * 1e3:.0f} ms alone, "
                       f"{self.stream_under_attack_s * 1e3:.0f} ms with hostile requests arriving "
                       f"({self.stream_under_attack_s / self.stream_alone_s:.2f}x; {self.num_hostile_refused} "
                       "refused in all)")
        out.append(f"pages in use afterwards: {self.leaked_pages}")
        return out


def _req(text=None, ids=None, request_id: str = "", model: str = "", **params) -> Callable[[], bytes]:
    """A well-formed request's bytes, built when called (some are megabytes)."""
    def build() -> bytes:
        params.setdefault("max_tokens", 4)
        r = raypd_pb2.GenerateRequest(request_id=request_id, model=model,
                                      params=raypd_pb2.SamplingParams(**params))
        if ids is not None:
            r.token_ids.ids.extend(ids)
        elif text is not None:
            r.text = text
        return r.SerializeToString()
    return build


def _raw(**fields) -> Callable[[], bytes]:
    """A request whose string fields carry raw bytes (not necessarily UTF-8)."""
    return lambda: encode_lenient(**fields)


def _truncated() -> bytes:
    return _req(text="a perfectly good prompt")()[:-3]


def cases(vocab_size: int, max_seq_len: int) -> list[Case]:
    V, L = vocab_size, max_seq_len
    ok = [5, 6, 7]
    big = MAX_PROMPT_BYTES + 1
    return [
        # the prompt
        Case("prompt-text-empty", _req(text=""), "text", dict(prompts=[""]), "prompts[0]"),
        Case("prompt-token-ids-empty", _req(ids=[]), "token_ids", dict(prompts=[[]]), "prompts[0]"),
        Case("prompt-missing", _req(), "prompt", dict(prompts=[]), "prompts"),
        Case("prompt-token-id-negative", _req(ids=[5, -1]), "token_ids", dict(prompts=[[5, -1]]), "prompts[0]"),
        Case("prompt-token-id-out-of-vocabulary", _req(ids=[5, V]), "token_ids", dict(prompts=[[5, V]]),
             "prompts[0]"),
        Case("prompt-token-id-int32-max", _req(ids=[2**31 - 1]), "token_ids", dict(prompts=[[2**31 - 1]]),
             "prompts[0]"),
        Case("prompt-longer-than-context", _req(ids=[5] * (L + 1)), "token_ids", dict(prompts=[[5] * (L + 1)]),
             "prompts[0]"),
        Case("prompt-hostile-1M-token-ids", _req(ids=[5] * 1_000_000), "token_ids",
             dict(prompts=[[5] * 1_000_000]), "prompts[0]"),
        Case("prompt-plus-max-tokens-over-context", _req(ids=ok, max_tokens=L), "max_tokens",
             dict(prompts=[ok], max_tokens=L), "max_tokens"),
        Case("prompt-text-over-max-bytes", _req(text="a" * big), "text", dict(prompts=["a" * big]), "prompts[0]"),
        Case("prompt-text-not-utf8", _raw(text=b"\xff\xfehello"), "prompt", dict(prompts=["hi \ud800"]),
             "prompts[0]"),
        Case("prompt-wrong-type", None, "", dict(prompts=[3.5]), "prompts[0]"),
        Case("prompt-bytes", None, "", dict(prompts=[b"hello"]), "prompts[0]"),
        Case("prompt-token-id-bool", None, "", dict(prompts=[[True, 5]]), "prompts[0]"),
        Case("prompt-token-id-float", None, "", dict(prompts=[[5.0, 6.0]]), "prompts[0]"),
        Case("prompts-not-a-list", None, "", dict(prompts=3.5), "prompts"),
        # sampling parameters
        Case("max-tokens-zero", _req(ids=ok, max_tokens=0), "max_tokens", dict(prompts=[ok], max_tokens=0),
             "max_tokens"),
        Case("max-tokens-negative", _req(ids=ok, max_tokens=-5), "max_tokens", dict(prompts=[ok], max_tokens=-5),
             "max_tokens"),
        Case("max-tokens-over-context", _req(ids=ok, max_tokens=10**6), "max_tokens",
             dict(prompts=[ok], max_tokens=10**6), "max_tokens"),
        Case("max-tokens-float", None, "", dict(prompts=[ok], max_tokens=3.5), "max_tokens"),
        *[Case(f"temperature-{name}", _req(ids=ok, temperature=v), "temperature",
               dict(prompts=[ok], temperature=v), "temperature")
          for name, v in (("negative", -1.0), ("inf", float("inf")), ("minus-inf", float("-inf")),
                          ("nan", float("nan")))],
        Case("temperature-string", None, "", dict(prompts=[ok], temperature="hot"), "temperature"),
        *[Case(f"top-p-{name}", _req(ids=ok, top_p=v), "top_p", dict(prompts=[ok], top_p=v), "top_p")
          for name, v in (("zero", 0.0), ("over-one", 1.5), ("negative", -0.5), ("nan", float("nan")),
                          ("inf", float("inf")))],
        Case("top-k-negative", _req(ids=ok, top_k=-1), "top_k", dict(prompts=[ok], top_k=-1), "top_k"),
        Case("seed-negative", None, "", dict(prompts=[ok], seed=-3), "seed"),
        Case("seed-over-2**32", None, "", dict(prompts=[ok], seed=2**32), "seed"),
        # stop strings and stop token ids
        Case("stop-too-many", _req(ids=ok, stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop",
             dict(prompts=[ok], stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
        Case("stop-hostile-200k-strings", _req(ids=ok, stop=["ab"] * 200_000), "stop",
             dict(prompts=[ok], stop=["ab"] * 200_000), "stop"),
        Case("stop-string-too-long", _req(ids=ok, stop=["x" * (MAX_STOP_STRING_LEN + 1)]), "stop[0]",
             dict(prompts=[ok], stop=["x" * (MAX_STOP_STRING_LEN + 1)]), "stop[0]"),
        Case("stop-string-hostile-3MB", _req(ids=ok, stop=["x" * (3 << 20)]), "stop[0]",
             dict(prompts=[ok], stop=["x" * (3 << 20)]), "stop[0]"),
        Case("stop-string-empty", _req(ids=ok, stop=["ok", ""]), "stop[1]", dict(prompts=[ok], stop=["ok", ""]),
             "stop[1]"),
        Case("stop-string-not-text", _raw(token_ids=dict(ids=ok),
                                          params=dict(stop=[b"ok", b"\xc3("])), "params.stop[1]",
             dict(prompts=[ok], stop=["ok", 7]), "stop[1]"),
        Case("stop-token-ids-too-many", _req(ids=ok, stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + 1)),
             "stop_token_ids", dict(prompts=[ok], stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
        Case("stop-token-ids-hostile-300k", _req(ids=ok, stop_token_ids=[3] * 300_000), "stop_token_ids",
             dict(prompts=[ok], stop_token_ids=[3] * 300_000), "stop_token_ids"),
        Case("stop-token-id-negative", _req(ids=ok, stop_token_ids=[3, -2]), "stop_token_ids[1]",
             dict(prompts=[ok], stop_token_ids=[3, -2]), "stop_token_ids[1]"),
        Case("stop-token-id-out-of-vocabulary", _req(ids=ok, stop_token_ids=[V]), "stop_token_ids[0]",
             dict(prompts=[ok], stop_token_ids=[V]), "stop_token_ids[0]"),
        Case("stop-token-id-string", None, "", dict(prompts=[ok], stop_token_ids=["5"]), "stop_token_ids[0]"),
        # the rest of the request
        Case("kv-compression-unknown", _req(ids=ok, kv_compression="zip"), "kv_compression",
             dict(prompts=[ok], kv_compression="zip"), "kv_compression"),
        Case("model-unknown", _req(ids=ok, model="gpt-9"), "model", dict(prompts=[ok], model=3.5), "model"),
        Case("backend-unknown", None, "", dict(prompts=[ok], backend="carrier-pigeon"), "backend"),
        Case("request-id-too-long", _req(ids=ok, request_id="r" * (MAX_REQUEST_ID_LEN + 1)), "request_id", None),
        Case("request-id-hostile-1MB", _req(ids=ok, request_id="r" * (1 << 20)), "request_id", None),
        Case("request-id-control-characters", _req(ids=ok, request_id="a\nb\x00"), "request_id", None),
        Case("request-id-space", _req(ids=ok, request_id="my request"), "request_id", None),
        Case("request-id-non-ascii", _req(ids=ok, request_id="requête"), "request_id", None),
        Case("request-id-reserved-prefix", _req(ids=ok, request_id=f"{SERVER_ID_PREFIX}1"), "request_id", None),
        Case("request-id-not-utf8", _raw(token_ids=dict(ids=ok), request_id=b"id\xff"), "request_id",
             None),
        Case("request-id-duplicate-in-flight", _req(ids=ok, request_id=DUPLICATE_ID), "request_id", None,
             code="ALREADY_EXISTS", needs_in_flight=True),
        Case("message-truncated", _truncated, "request", None),
        Case("message-garbage", lambda: b"\xff\xff\xff\xff\x0f", "request", None),
    ]


# ---------------------------------------------------------------------------- gRPC


def _expect_refused(call, case: Case, field: str, expected_code: str) -> Outcome:
    start = time.perf_counter()
    try:
        call()
    except grpc.RpcError as e:
        took = time.perf_counter() - start
        code, details = e.code().name, e.details() or ""
        ok = code == expected_code and field in details
        return Outcome(case.name, "grpc", ok, f"{code}: {details}", took)
    return Outcome(case.name, "grpc", False, "accepted", time.perf_counter() - start)


def run_grpc(channel: grpc.Channel, all_cases: list[Case], max_seq_len: int, timeout_s: float = 10.0,
             metadata=None) -> list[Outcome]:
    """Each case with a gRPC form, on Generate; a duplicate id while one with it streams."""
    generate = channel.unary_unary(GENERATE, request_serializer=None,
                                   response_deserializer=raypd_pb2.GenerateResponse.FromString)
    stream = channel.unary_stream(GENERATE_STREAM, request_serializer=None,
                                  response_deserializer=raypd_pb2.GenerateChunk.FromString)
    outcomes = []
    for case in all_cases:
        if case.grpc is None:
            continue
        data = case.grpc()
        holder = None
        if case.needs_in_flight:
            holder = stream(_req(ids=[5, 6, 7], request_id=DUPLICATE_ID, max_tokens=max_seq_len - 3,
                                 ignore_eos=True)(), timeout=60, metadata=metadata)
            next(holder)  # it runs now
        try:
            outcomes.append(_expect_refused(lambda: generate(data, timeout=timeout_s, metadata=metadata),
                                            case, case.grpc_field, case.code))
        finally:
            if holder is not None:
                holder.cancel()
    return outcomes


# ---------------------------------------------------------------------------- Python API


def run_python(backend, all_cases: list[Case]) -> list[Outcome]:
    """Each case with a Python form, through raypd.generate on `backend` (a LocalBackend)."""
    import raypd

    outcomes = []
    for case in all_cases:
        if case.python is None:
            continue
        kwargs = dict(case.python)
        prompts = kwargs.pop("prompts")
        kwargs.setdefault("model", backend)
        kwargs.setdefault("backend", "local")
        start = time.perf_counter()
        try:
            raypd.generate(prompts, max_tokens=kwargs.pop("max_tokens", 4), **kwargs)
        except ValueError as e:
            took = time.perf_counter() - start
            outcomes.append(Outcome(case.name, "python", case.python_field in str(e), f"ValueError: {e}", took))
        except Exception as e:  # noqa: BLE001 - a wrong exception type is what this reports
            outcomes.append(Outcome(case.name, "python", False, f"{type(e).__name__}: {e}",
                                    time.perf_counter() - start))
        else:
            outcomes.append(Outcome(case.name, "python", False, "accepted", time.perf_counter() - start))
    return outcomes


# ---------------------------------------------------------------------------- interference


def _attack(address: str, hostile: list[bytes], flood: bool, active, stop, refused) -> None:
    """In a process of its own (so that building and sending megabytes costs the server's
    process nothing): while `active` is set, send every hostile request once (or, with `flood`,
    over and over), counting refusals; wait for the next `active`; end on `stop`."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        generate = channel.unary_unary(GENERATE, request_serializer=None,
                                       response_deserializer=raypd_pb2.GenerateResponse.FromString)
        while not stop.is_set():
            if not active.wait(0.05):
                continue
            while True:
                for data in hostile:
                    try:
                        generate(data, timeout=10)
                    except grpc.RpcError:
                        with refused.get_lock():
                            refused.value += 1
                if not flood or not active.is_set():
                    break
            while active.is_set() and not stop.is_set():  # once per stream
                time.sleep(0.01)


def interference(address: str, hostile: list[bytes], max_tokens: int = 64, repeats: int = 9,
                 flood: bool = False) -> tuple[float, float, int]:
    """Median time of a greedy `max_tokens` stream alone, and with the `hostile` requests sent
    (from another process) while it runs: each once per stream (as in issue 12's finding: one
    hostile request made a concurrent stream 8.6x slower when it was accepted), or with `flood`
    back to back until the stream ends. -> (alone_s, with_hostile_s, hostile requests refused)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    active, stop, refused = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    attacker = ctx.Process(target=_attack, args=(address, hostile, flood, active, stop, refused), daemon=True)
    attacker.start()
    good = _req(ids=[5, 6, 7], max_tokens=max_tokens, ignore_eos=True)()
    try:
        with grpc.insecure_channel(address) as channel:
            stream = channel.unary_stream(GENERATE_STREAM, request_serializer=None,
                                          response_deserializer=raypd_pb2.GenerateChunk.FromString)

            def one(with_hostile: bool) -> float:
                start = time.perf_counter()
                chunks = stream(good, timeout=120)
                n = len(next(chunks).token_ids)  # the stream runs; now the hostile requests arrive
                if with_hostile:
                    active.set()
                n += sum(len(c.token_ids) for c in chunks)
                took = time.perf_counter() - start
                active.clear()
                assert n == max_tokens, f"stream gave {n} tokens, wanted {max_tokens}"
                return took

            one(False)  # compile its shapes
            alone, attacked = [], []
            for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both
                alone.append(one(False))
                attacked.append(one(True))
                time.sleep(0.3)  # let the last hostile requests finish
    finally:
        stop.set()
        attacker.join(30)
        if attacker.is_alive():
            attacker.kill()
    return statistics.median(alone), statistics.median(attacked), refused.value


HOSTILE = ("prompt-hostile-1M-token-ids", "stop-hostile-200k-strings", "stop-string-hostile-3MB",
           "stop-token-ids-hostile-300k", "request-id-hostile-1MB")


def run(model: str = "tiny-random", engine_config=None, measure_interference: bool = True,
        flood: bool = False) -> Report:
    """Every case on an in-process endpoint (local engine) and the Python API, then (optionally)
    the interference measurement; the endpoint is stopped before returning."""
    import models
    from raypd.api import LocalBackend
    from raypd.engine.runner import EngineConfig
    from raypd.server.grpc_server import Endpoint

    m = models.load(model)
    config = engine_config or EngineConfig(page_size=16, num_pages=64, max_slots=2, max_seq_len=256,
                                           prefill_buckets=(32,))
    endpoint = Endpoint(LocalBackend(m, config), model, max_message_bytes=8 << 20).start(warmup=False)
    try:
        all_cases = cases(m.config.vocab_size, config.max_seq_len)
        with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}",
                                   options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
            outcomes = run_grpc(channel, all_cases, config.max_seq_len)
            outcomes += run_python(LocalBackend(m, config), all_cases)
            report = Report(outcomes, len(all_cases))
            if measure_interference:
                by_name = {c.name: c for c in all_cases}
                report.stream_alone_s, report.stream_under_attack_s, report.num_hostile_refused = interference(
                    f"127.0.0.1:{endpoint.port}", [by_name[n].grpc() for n in HOSTILE], flood=flood)
        end = time.monotonic() + 5
        allocator = endpoint.backend.local.engine.runner.allocator
        while allocator.num_used and time.monotonic() < end:
            time.sleep(0.01)
        report.leaked_pages = allocator.num_used
    finally:
        endpoint.stop()
    return report
