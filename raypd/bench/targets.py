"""What the load generator talks to: one small interface, three implementations.

A target `stream(prompt_ids, max_tokens)` yields `(num_tokens, timings)` per chunk of tokens as
the client receives it (`timings`: whatever per-request timings the target reports, in seconds,
usually only on the last chunk) and raises `TargetRejected` when the server refuses the request
at admission. Any other exception is a failed request. Every request is sent with
`ignore_eos=True` and greedy sampling, so its output length is exactly `max_tokens`.

  - LocalTarget: a colocated engine in this process behind `EngineLoop` (thread-safe submit and
    per-request streams: the same loop the gRPC server runs, without the network).
  - RayTarget: a Ray deployment (`raypd.serve`, or `raypd.connect` to a running one by name).
  - GrpcTarget: the gRPC endpoint's GenerateStream (a running `raypd serve`, or one started in
    this process for the run).
  - OpenAITarget: any OpenAI-compatible server's streamed /v1/completions (raypd's
    `serve --http-port`, vLLM, SGLang, ...), prompts sent as token ids.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Iterator

_ids = itertools.count()


class TargetRejected(RuntimeError):
    """The server refused the request at admission (queue full, deadline, no capacity)."""


def model_limits(source: str | None) -> tuple[int, int, tuple[int, ...]]:
    """(vocab_size, max_position_embeddings, special ids to keep out of prompts) from a model's
    config alone, without loading weights (for remote targets)."""
    import models
    from models import checkpoint
    from models.config import from_hf_config

    source = source or models.DEFAULT_MODEL
    if source in models.PRESETS:
        cfg = models.PRESETS[source]
    else:
        path = Path(source)
        if not path.exists() and (models.DATA_DIR / source).is_dir():
            path = models.DATA_DIR / source
        if checkpoint.is_checkpoint(path):
            cfg = checkpoint.read_config(path)
        elif (path / "config.json").exists():
            cfg = from_hf_config(json.loads((path / "config.json").read_text()), None)
        else:
            raise ValueError(f"model {source!r}: not a preset, a shipped model or a model directory")
    special = tuple(cfg.eos_token_ids) + ((cfg.bos_token_id,) if cfg.bos_token_id is not None else ())
    return cfg.vocab_size, cfg.max_position_embeddings, special


class LocalTarget:
    """A colocated engine on this process's devices, driven through an EngineLoop."""

    burst_gap_s = 0.0  # one token per chunk: nothing to merge

    def __init__(self, model: str | None = None, engine_config=None, max_queued: int = 256,
                 warmup: bool = True, request_timeout_s: float = 600.0):
        import models
        from raypd.api import LocalBackend
        from raypd.server.engine_loop import EngineLoop

        self.backend = LocalBackend(models.load(model), engine_config)
        cfg = self.backend.model.config
        self.vocab_size, self.max_seq_len = cfg.vocab_size, self.backend.max_seq_len
        self.exclude_ids = tuple(cfg.eos_token_ids) + ((cfg.bos_token_id,) if cfg.bos_token_id is not None else ())
        if warmup:
            self.backend.engine.runner.warmup()
        self.loop = EngineLoop(self.backend.engine, max_queued=max_queued).start()
        self.request_timeout_s = request_timeout_s
        runner = self.backend.engine.runner
        self.description = dict(kind="local", model=self.backend.model.name, max_slots=runner.config.max_slots,
                                max_seq_len=self.max_seq_len, page_size=runner.config.page_size,
                                prefill_buckets=list(runner.prefill_buckets), max_queued=max_queued)

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Iterator[tuple[int, dict]]:
        from raypd.engine.api import Request, SamplingParams
        from raypd.server.engine_loop import Rejected

        request = Request(f"bench-{next(_ids)}", list(prompt_ids), SamplingParams(max_tokens=max_tokens,
                                                                                 ignore_eos=True))
        try:
            stream = self.loop.submit(request)
        except Rejected as e:
            raise TargetRejected(str(e)) from None
        is_finished = False
        try:
            while not is_finished:
                out = stream.get(self.request_timeout_s)
                is_finished = out.is_finished
                yield 1, {}
        finally:
            if not is_finished:
                self.loop.abort(request.request_id)

    def close(self) -> None:
        self.loop.stop()


class RayTarget:
    """A Ray deployment: attach to `deployment` by name, or start one (`raypd.serve` with
    `num_prefill`, `num_decode`, `engine_config` and any other `serve_overrides`, e.g. pinned
    `prefill_resources`) and shut it down on close.

    One poller thread asks the scheduler for the new tokens of every request in flight in one
    `poll` call, so the client costs one RPC per chunk of tokens whatever the concurrency (a
    poll per request per token would load the machine being measured). The last chunk's
    timings are the scheduler's per-request metrics (queue_s, prefill_s, transfer_s, ...)."""

    burst_gap_s = 0.0  # a chunk is one poll's tokens already

    def __init__(self, model: str | None = None, deployment: str | None = None, address: str | None = None,
                 num_prefill: int = 1, num_decode: int = 1, engine_config=None, name: str = "raypd-bench",
                 request_timeout_s: float = 600.0, **serve_overrides):
        from raypd.runtime import deployment as dep

        self.vocab_size, max_pos, self.exclude_ids = model_limits(model)
        self.is_owned = deployment is None
        if self.is_owned:
            self.handle = dep.serve(model, num_prefill=num_prefill, num_decode=num_decode, name=name,
                                    engine_config=engine_config, **serve_overrides)
        else:
            self.handle = dep.connect(deployment, address=address)
        self.max_seq_len = min(max_pos, engine_config.max_seq_len if engine_config else 2048)
        self.request_timeout_s = request_timeout_s
        self.poller = self.handle.poller  # the deployment handle's one token poller
        self.description = dict(kind="ray", model=model, deployment=deployment or f"{name} (started)",
                                num_prefill=num_prefill if self.is_owned else None,
                                num_decode=num_decode if self.is_owned else None)

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Iterator[tuple[int, dict]]:
        import queue

        from raypd.engine.api import SamplingParams
        from raypd.runtime import errors

        try:
            (rid,) = self.handle.submit([list(prompt_ids)], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        except errors.RequestRejected as e:
            raise TargetRejected(f"{e.reason}: {e}") from None
        entries = self.poller.add(rid)
        is_finished = False
        try:
            while not is_finished:
                try:
                    _, entry = entries.get(timeout=self.request_timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"no tokens within {self.request_timeout_s} s") from None
                if entry["error"] is not None:
                    is_finished = True
                    e = errors.from_wire(entry["error"])
                    if isinstance(e, errors.RequestRejected):
                        raise TargetRejected(f"{e.reason}: {e}")
                    raise e
                is_finished = entry["finished"]
                if entry["tokens"]:
                    yield len(entry["tokens"]), (stage_timings(entry["metrics"]) if is_finished else {})
        finally:
            if not is_finished:
                self.poller.drop(rid)
                self.handle.abort([rid])

    def status(self) -> dict:
        return self.handle.status()

    def close(self) -> None:
        if self.is_owned:
            self.handle.shutdown()


def stage_timings(m: dict | None) -> dict:
    """The scheduler's per-request metrics (Deployment.stream's last chunk) as server timings:
    stage seconds, the scheduler's own TTFT, where the prompt was prefilled."""
    m = m or {}
    keys = ("queue_s", "prefill_wait_s", "prefill_s", "transfer_s", "is_local_prefill", "prefill_worker",
            "decode_worker", "num_computed_tokens")
    out = {k: m[k] for k in keys if m.get(k) is not None}
    if m.get("ttft_s") is not None:
        out["server_ttft_s"] = m["ttft_s"]
    return out


class GrpcTarget:
    """The gRPC endpoint at `address`, or (address None) one started in this process for the run."""

    burst_gap_s = 0.0  # the server sends whatever tokens are ready as one GenerateChunk

    def __init__(self, model: str | None = None, address: str | None = None, token: str | None = None,
                 engine_config=None, max_queued: int = 256, warmup: bool = True,
                 request_timeout_s: float = 600.0):
        import grpc

        from raypd.proto import raypd_pb2, raypd_pb2_grpc

        self.endpoint = None
        if address is None:
            import models
            from raypd.api import LocalBackend
            from raypd.server.grpc_server import Endpoint

            name = model or models.DEFAULT_MODEL
            self.endpoint = Endpoint(LocalBackend(models.load(name), engine_config), name,
                                     max_queued=max_queued).start(warmup=warmup)
            address = f"127.0.0.1:{self.endpoint.port}"
        self.channel = grpc.insecure_channel(address)
        self.stub = raypd_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.request_timeout_s = request_timeout_s
        self._pb = raypd_pb2
        self.vocab_size, _, self.exclude_ids = model_limits(model)
        info = self.stub.ListModels(raypd_pb2.ListModelsRequest(), metadata=self.metadata, timeout=30).models[0]
        self.max_seq_len = info.max_seq_len
        self.description = dict(kind="grpc", model=info.name, address=address,
                                in_process=self.endpoint is not None, max_seq_len=info.max_seq_len)

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Iterator[tuple[int, dict]]:
        import grpc

        pb = self._pb
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt_ids)),
                                 params=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        try:
            for chunk in self.stub.GenerateStream(req, metadata=self.metadata, timeout=self.request_timeout_s):
                timings = {}
                if chunk.HasField("timings"):
                    t = chunk.timings
                    timings = dict(server_ttft_s=t.ttft_s, server_tpot_s=t.tpot_s, server_e2e_s=t.e2e_s)
                yield len(chunk.token_ids), timings
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise TargetRejected(e.details()) from None
            raise RuntimeError(f"{e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self.channel.close()
        if self.endpoint is not None:
            self.endpoint.stop()


class OpenAITarget:
    """Any OpenAI-compatible server at `url` (http://HOST:PORT, with or without /v1): streamed
    /v1/completions with token-id prompts, `ignore_eos`, greedy, `stream_options.include_usage`.

    Each chunk with text counts as the tokens its `logprobs.tokens` lists when the server sends
    them, else as one token; when the usage chunk at the end reports more tokens than that, the
    rest count as one more chunk at that moment (totals exact; a server that sends several
    tokens per chunk without logprobs shows a shorter last gap).
    `model`: the local model whose vocabulary the prompts use; `served_model`: the id to send
    (default: the first of /v1/models). One keep-alive connection per client thread."""

    burst_gap_s = 0.0

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 served_model: str | None = None, request_timeout_s: float = 600.0):
        import threading
        from urllib.parse import urlsplit

        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be http(s)://HOST:PORT[/v1], got {url!r}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.request_timeout_s = request_timeout_s
        self._local = threading.local()
        self.vocab_size, max_pos, self.exclude_ids = model_limits(model)
        status, body = self._request("GET", "/v1/models", None)
        if status != 200:
            raise ValueError(f"{url}: GET /v1/models answered {status}: {body[:200]!r}")
        cards = json.loads(body)["data"]
        card = next((c for c in cards if c["id"] == served_model), None) if served_model else cards[0]
        if card is None:
            raise ValueError(f"{url} does not serve {served_model!r}; it serves {[c['id'] for c in cards]}")
        self.served_model = card["id"]
        self.max_seq_len = card.get("max_model_len") or max_pos
        self.description = dict(kind="openai", url=url, model=self.served_model, max_seq_len=self.max_seq_len)

    def _connection(self):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.request_timeout_s)
        return conn

    def _request(self, method: str, path: str, body: dict | None):
        conn = self._connection()
        try:
            conn.request(method, self._prefix + path, json.dumps(body) if body is not None else None, self._headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except BaseException:
            conn.close()
            self._local.conn = None
            raise

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Iterator[tuple[int, dict]]:
        body = dict(model=self.served_model, prompt=list(prompt_ids), max_tokens=max_tokens, temperature=0.0,
                    ignore_eos=True, stream=True, stream_options={"include_usage": True})
        conn = self._connection()
        done = False
        try:
            conn.request("POST", self._prefix + "/v1/completions", json.dumps(body), self._headers)
            resp = conn.getresponse()
            if resp.status != 200:
                text = resp.read()[:300].decode(errors="replace")
                if resp.status == 429:
                    raise TargetRejected(f"429: {text}")
                raise RuntimeError(f"HTTP {resp.status}: {text}")
            counted = 0
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error'].get('message')}")
                if chunk.get("usage") and not chunk.get("choices"):
                    extra = chunk["usage"]["completion_tokens"] - counted
                    if extra > 0 and counted:  # tokens the chunks did not say they held
                        yield extra, {}
                    continue
                for choice in chunk.get("choices", []):
                    lp = choice.get("logprobs")
                    n = len(lp["tokens"]) if lp and lp.get("tokens") else int(bool(choice.get("text")))
                    if n:
                        counted += n
                        yield n, {}
            resp.read()  # the end of the chunked body, so the connection can carry the next request
            done = True
        finally:
            if not done:  # a half-read response: drop the connection (the server aborts the request)
                conn.close()
                self._local.conn = None

    def close(self) -> None:
        """Connections belong to the client threads and close with them."""


def wait_ready(target, within_s: float = 600.0) -> float:
    """Send one 2-token request (compiles what warmup did not, checks the target answers).
    Returns its seconds."""
    start = time.perf_counter()
    for _ in target.stream([3, 4, 5, 6], 2):
        if time.perf_counter() - start > within_s:
            raise TimeoutError(f"target did not answer within {within_s} s")
    return time.perf_counter() - start
