"""The OpenAI-compatible HTTP API (FastAPI) over a backend: the local engine or a Ray deployment.

  POST /v1/completions, POST /v1/chat/completions   generation, streamed (SSE) or not
  GET  /v1/models, GET /v1/models/{id}              the one model served
  GET  /health                                      the process is up
  GET  /health/ready                                a one-token generation through the backend works
  GET  /metrics                                     the Prometheus metrics (raypd/server/metrics.py)
  POST /tokenize, POST /detokenize                  the model's tokenizer (and chat template)

The routes only move data: openai_protocol.py checks requests and builds responses,
openai_streams.py reads the backend's streams, backends.py is the same interface the gRPC
server serves. With an API key every route but /health and /health/ready needs
`Authorization: Bearer KEY` (401 otherwise). Bodies over `max_body_bytes` get a 413. Every
error is OpenAI's body, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import json
import secrets
import time
from concurrent import futures

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from raypd.api import encode_prompt
from raypd.engine.api import SamplingParams
from raypd.server import openai_protocol as proto
from raypd.server.backends import Job
from raypd.server.engine_loop import Rejected, StreamTimeout
from raypd.server.metrics import Metrics
from raypd.server.openai_chat import NO_TEMPLATE, ChatTemplate
from raypd.server.openai_protocol import ApiError, Generation
from raypd.server.openai_sse import EventStream, sse
from raypd.server.openai_streams import Choices, Reader, as_api_error

EXEMPT_PATHS = ("/health", "/health/ready")  # no API key needed
CODES = {200: "ok", 400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 413: "invalid_argument",
         429: "resource_exhausted", 499: "cancelled", 500: "internal", 503: "unavailable", 504: "deadline_exceeded"}


class OpenAIServer:
    """The state the routes share. `backend`: a LocalEngineBackend or RayBackend (backends.py)
    with `.model` (config, tokenizer) and `.max_seq_len`; its lifecycle is the caller's."""

    def __init__(self, backend, *, api_key: str | None = None, chat_template: ChatTemplate | None = None,
                 metrics: Metrics | None = None, max_body_bytes: int = 1 << 20, request_timeout_s: float = 600.0,
                 ready_timeout_s: float = 10.0):
        if getattr(backend, "model", None) is None:
            raise ValueError("backend: the OpenAI API needs the model's config and tokenizer (backend.model)")
        self.backend, self.model, self.max_seq_len = backend, backend.model, backend.max_seq_len
        self.name = backend.card.name
        self.api_key, self.chat_template = api_key, chat_template
        self.metrics = metrics if metrics is not None else Metrics(backend.collector())
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s, self.ready_timeout_s = request_timeout_s, ready_timeout_s
        self.created = int(time.time())
        # submits and aborts (a Ray call blocks) and readiness checks; no thread waits on a stream
        self.executor = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="raypd-http")
        self._reader: Reader | None = None  # made on the event loop it runs on (openai_streams.py)
        # response ids: random per server, then a count (uuid4 per request reads os.urandom, a
        # system call that gives up the GIL on the event loop's hottest path)
        self._id_prefix, self._ids = secrets.token_hex(6), itertools.count()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ helpers

    def count(self, status: int) -> None:
        self.metrics.requests.labels(code=CODES.get(status, str(status))).inc()

    def check_model(self, body: dict) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model and model != self.name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")

    def token_text(self, token_id: int) -> str:
        tok = self.model.tokenizer
        return tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"

    def encode(self, prompt, field: str, max_tokens: int) -> list[int]:
        return encode_prompt(list(prompt) if isinstance(prompt, tuple) else prompt, self.model, self.max_seq_len,
                             max_tokens, field)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ApiError(400, f"messages: {NO_TEMPLATE}", "messages", "no_chat_template")
        return self.chat_template.render(messages, add_generation_prompt)

    def submit_all(self, gen: Generation) -> tuple[list[list[int]], list]:
        """Encode every prompt, submit n streams for each (in a worker thread when the backend's
        submit blocks). -> (prompt ids per prompt, streams in choice order). On any failure the
        streams submitted are aborted."""
        prompt_ids, streams = [], []
        try:
            for i, p in enumerate(gen.prompts):
                field = gen.prompt_field if len(gen.prompts) == 1 else f"{gen.prompt_field}[{i}]"
                max_tokens = gen.params.max_tokens
                if gen.max_tokens_given:
                    ids = self.encode(p, field, max_tokens)
                else:  # chat without max_tokens: whatever the context leaves
                    ids = self.encode(p, field, 1)
                    max_tokens = self.max_seq_len - len(ids)
                prompt_ids.append(ids)
                job = Job(ids, field, gen.params_for(0, max_tokens), gen.kv_compression)
                if gen.n == 1:
                    streams.append(self.backend.submit(job))
                else:  # one prefill for the n samples where the backend can share it
                    streams += self.backend.submit_samples(job, [gen.params_for(j, max_tokens) for j in range(gen.n)])
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return prompt_ids, streams

    async def start(self, gen: Generation) -> tuple[list[list[int]], Choices]:
        loop = asyncio.get_running_loop()
        try:
            if self.backend.submit_blocks:  # a Ray submit waits for the scheduler: off the event loop
                prompt_ids, streams = await loop.run_in_executor(self.executor, self.submit_all, gen)
            else:  # a queue put: a hop to a thread and back would cost more than the call
                prompt_ids, streams = self.submit_all(gen)
        except Rejected as e:
            status = 503 if e.reason == "no_workers" else 429
            headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else {}
            self.metrics.rejections.labels(reason=e.reason).inc()
            raise ApiError(status, f"request rejected ({e.reason}): {e}", None, e.reason, headers) from None
        except Exception as e:  # noqa: BLE001 - mapped to its HTTP status
            raise as_api_error(e, gen.prompt_field) from None
        if self._reader is None or self._reader.loop is not loop:
            self._reader = Reader(loop)
        return prompt_ids, Choices(streams, self._reader, self.executor, self.request_timeout_s)

    def usage(self, gen: Generation, prompt_ids: list[list[int]], choices: Choices) -> dict:
        """Prompt tokens once per prompt; cached ones (prefix reuse, never transferred K/V) as the
        first sample of each prompt found them."""
        cached = 0
        for i, ids in enumerate(prompt_ids):
            computed = getattr(choices.items[i * gen.n].stream, "metrics", {}).get("num_computed_tokens")
            cached += len(ids) - computed if computed is not None else 0
        return proto.usage(sum(map(len, prompt_ids)), sum(len(c.token_ids) for c in choices.items), cached)

    def observe(self, choices: Choices) -> None:
        for c in choices.items:
            if c.first_s is None or c.end_s is None:
                continue
            n = len(c.token_ids)
            self.metrics.observe_request(c.first_s - c.stream.submitted_s,
                                         (c.end_s - c.first_s) / (n - 1) if n > 1 else None,
                                         getattr(c.stream, "metrics", None))

    def logprobs_of(self, kind: str, token_ids: list[int], logprobs: list[float], offset: int = 0, tops=None):
        """`tops`: per token, its top alternatives ((id, logprob), ...) or None."""
        tokens = [self.token_text(t) for t in token_ids]
        tops = [None if top is None else [(self.token_text(t), lp) for t, lp in top] for top in tops or ()]
        if kind == "chat":
            return proto.chat_logprobs(tokens, logprobs, tops)
        return proto.completion_logprobs(tokens, logprobs, offset, tops)

    # ------------------------------------------------------------------ generation

    async def generate(self, request: Request, gen: Generation, kind: str):
        prompt_ids, choices = await self.start(gen)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{self._id_prefix}{next(self._ids):012x}"
        created = int(time.time())
        if gen.stream:
            return EventStream(sse(self, gen, kind, rid, created, prompt_ids, choices), on_close=choices.cancel)
        watcher = asyncio.ensure_future(_watch_disconnect(request, choices))
        try:
            async for _ in choices.events():
                pass
        finally:
            watcher.cancel()
        self.observe(choices)
        out = []
        for k, c in enumerate(choices.items):
            ids = prompt_ids[k // gen.n]
            echo = self.echo_text(gen, k // gen.n, ids)
            logprobs = None
            if gen.logprobs and gen.echo:  # the prompt's tokens first, then the completion's
                first = self.echo_logprobs(ids, c.prompt_logprobs)
                rest = self.logprobs_of(kind, c.token_ids, c.logprobs, sum(map(len, first["tokens"])),
                                        c.top_logprobs)
                logprobs = {key: first[key] + rest[key] for key in first}
            elif gen.logprobs:
                logprobs = self.logprobs_of(kind, c.token_ids, c.logprobs, len(echo), c.top_logprobs)
            out.append({"text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        build = proto.chat_body if kind == "chat" else proto.completion_body
        return build(rid, created, self.name, out, self.usage(gen, prompt_ids, choices))

    def echo_logprobs(self, ids: list[int], prompt_logprobs: list[float] | None) -> dict:
        """Completions' logprobs of the prompt, for `echo`: the first token has none (null, as
        OpenAI's), each later one its logprob given those before it (computed by the prefill)."""
        if prompt_logprobs is None or len(prompt_logprobs) != len(ids) - 1:
            raise ApiError(500, "the backend returned no prompt logprobs for echo", None, "internal")
        return self.logprobs_of("completion", ids, [None, *prompt_logprobs], 0)

    def echo_text(self, gen: Generation, prompt_index: int, ids: list[int]) -> str:
        """The prompt as text, for `echo`: as the client sent it, or its token ids decoded."""
        if not gen.echo:
            return ""
        prompt = gen.prompts[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return self.model.tokenizer.decode(ids) if self.model.tokenizer is not None else ""

    def ready(self) -> None:
        """Runs in a worker thread: one token through the backend within ready_timeout_s, else ApiError(503)."""
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            stream = self.backend.submit(Job([0], "prompt", SamplingParams(max_tokens=1, ignore_eos=True)))
        except Exception as e:  # noqa: BLE001 - not ready, whatever the reason
            raise ApiError(503, f"not ready: {type(e).__name__}: {e}", None, "not_ready") from None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(503, f"not ready: no token within {self.ready_timeout_s} s", None, "not_ready")
                try:
                    if stream.get(min(0.1, left)).is_finished:
                        return
                except StreamTimeout:
                    continue
                except Exception as e:  # noqa: BLE001 - not ready, whatever the reason
                    raise ApiError(503, f"not ready: {type(e).__name__}: {e}", None, "not_ready") from None
        finally:
            stream.abort()


async def _watch_disconnect(request: Request, choices: Choices) -> None:
    """Cancels the request's streams when its client goes away (the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            choices.cancel()
            return


async def read_json(request: Request, limit: int):
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


class Guard:
    """ASGI middleware: the API key (health exempt) and the declared body size, before any route."""

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        key = self.server.api_key
        if key and scope["path"] not in EXEMPT_PATHS:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, f"Bearer {key}".encode()):
                error = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                                 "invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if error is None and length.isdigit() and int(length) > self.server.max_body_bytes:
            error = ApiError(413, f"request body exceeds {self.server.max_body_bytes} bytes", None,
                             "request_too_large")
        if error is None:
            return await self.app(scope, receive, send)
        self.server.count(error.status)
        await error_response(error)(scope, receive, send)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(server: OpenAIServer, cors_origins: tuple[str, ...] = (), lifespan=None) -> FastAPI:
    """The routes over `server`; CORS only for `cors_origins` (none: off)."""
    app = FastAPI(title="raypd OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        server.count(e.status)
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return await on_api_error(request, ApiError(e.status_code, message, None, code))

    async def generation(request: Request, kind: str):
        body = await read_json(request, server.max_body_bytes)
        server.check_model(body)
        if kind == "chat":
            gen, messages = proto.parse_chat(body)
            try:
                gen = _with_prompts(gen, (server.render_chat(messages),))
            except ValueError as e:
                raise proto.from_value_error(e, "messages") from None
        else:
            gen = proto.parse_completion(body)
        result = await server.generate(request, gen, kind)
        if isinstance(result, dict):
            server.count(200)
            return JSONResponse(result)
        return result

    async def completions(request: Request):
        return await generation(request, "completion")

    async def chat_completions(request: Request):
        return await generation(request, "chat")

    # plain Starlette routes (the endpoint takes the request, returns a Response): FastAPI's
    # dependency solving and response serialization cost more per request than the rest of routing
    app.router.add_route("/v1/completions", completions, methods=["POST"])
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    def card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "raypd",
                "max_model_len": server.max_seq_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.check_model({"model": model_id})
        return card()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        await asyncio.get_running_loop().run_in_executor(server.executor, server.ready)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        text = await asyncio.get_running_loop().run_in_executor(server.executor, generate_latest,
                                                                server.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request, server.max_body_bytes)
        server.check_model(body)
        return _tokenize(server, body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request, server.max_body_bytes)
        server.check_model(body)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(proto._is_int(t) for t in ids):
            raise proto.bad("tokens", f"tokens must be a list of token ids, got {proto._short(ids)}")
        if server.model.tokenizer is None:
            raise ApiError(400, "tokens: this model has no tokenizer", "tokens", "no_tokenizer")
        try:
            ids = [] if not ids else _checked_ids(server, ids)
        except ValueError as e:
            raise proto.from_value_error(e, "tokens") from None
        return {"prompt": server.model.tokenizer.decode(ids)}

    app.add_middleware(Guard, server=server)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _with_prompts(gen: Generation, prompts: tuple) -> Generation:
    return dataclasses.replace(gen, prompts=prompts)


def _checked_ids(server: OpenAIServer, ids: list[int]) -> list[int]:
    import models

    return models.check_token_ids(ids, server.model.config.vocab_size, "tokens")


def _tokenize(server: OpenAIServer, body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    extra = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
    if extra:
        raise ApiError(400, f"unsupported field(s) {', '.join(extra)}", extra[0], "unsupported_field")
    if ("prompt" in body) == ("messages" in body):
        raise proto.bad("prompt", "give exactly one of prompt (a string) or messages")
    if server.model.tokenizer is None:
        raise ApiError(400, "prompt: this model has no tokenizer", "prompt", "no_tokenizer")
    if "messages" in body:
        messages = proto.check_messages(body["messages"])
        try:
            text = server.render_chat(messages, proto._bool(body, "add_generation_prompt", True))
        except ValueError as e:
            raise proto.from_value_error(e, "messages") from None
    else:
        text = body["prompt"]
        if not isinstance(text, str):
            raise proto.bad("prompt", f"prompt must be a string, got {proto._short(text)}")
    ids = server.model.tokenizer.encode(text, add_bos=proto._bool(body, "add_special_tokens", False))
    return {"tokens": ids, "count": len(ids), "max_model_len": server.max_seq_len}


def openai_app(target, *, model_name: str | None = None, api_key: str | None = None,
               chat_template: str | None = None, cors_origins: tuple[str, ...] = (), **server_kw) -> FastAPI:
    """The OpenAI-compatible app (FastAPI, ASGI) over `target`: a running Ray deployment
    (`raypd.serve` / `raypd.connect`), a LocalBackend (started here: its engine loop runs until
    the app shuts down), or a backend of raypd/server/backends.py. Mount it anywhere an ASGI app
    goes (uvicorn, a Ray Serve ingress). `chat_template`: a Jinja file overriding the checkpoint's;
    `model_name`: the id clients send (default: the deployment's or model's name)."""
    from raypd.server.openai_backend import make_backend

    backend, directory, owned = make_backend(target, model_name)
    template = ChatTemplate.find(directory, chat_template)
    server = OpenAIServer(backend, api_key=api_key, chat_template=template, **server_kw)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if owned:
            backend.start(warmup=False)
        try:
            yield
        finally:
            server.close()
            if owned:
                backend.stop()

    return build_app(server, cors_origins, lifespan)
