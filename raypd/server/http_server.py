"""Running the OpenAI app (openai_app.py) with uvicorn on a thread of this process.

`HttpServer` binds its socket itself (port 0: a free one, known before any request), serves
from a daemon thread, and stops within a timeout. `add_arguments` / `serving` are what
`raypd serve --http-port` adds to the command line: the API next to the gRPC endpoint, over
the same backend and the same metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it
        # Nagle holds a response's body behind its headers until the client's delayed ACK (40 ms)
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host.strip("[]"), port))
        except OSError as e:
            self._sock.close()
            raise OSError(f"could not bind {host}:{port}: {e}") from None
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="raypd-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])  # on uvicorn's loop (uvloop when installed)

    def start(self, timeout_s: float = 60.0) -> "HttpServer":
        """Serve from a thread; returns once the app has started (its lifespan ran)."""
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the HTTP server did not start within {timeout_s} s")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise TimeoutError(f"the HTTP server did not stop within {timeout_s} s")


def add_arguments(parser) -> None:
    """`raypd serve`'s HTTP flags."""
    from pathlib import Path

    g = parser.add_argument_group("OpenAI-compatible HTTP API")
    g.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI API (/v1/completions, /v1/chat/completions, ...) on this port")
    g.add_argument("--http-host", default="127.0.0.1",
                   help="HTTP bind address; non-loopback needs --api-key or --allow-insecure-remote")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the HTTP API except /health* (or $RAYPD_API_KEY)")
    g.add_argument("--chat-template", type=Path, default=None,
                   help="Jinja chat template file (default: chat_template of the model's tokenizer_config.json)")
    g.add_argument("--cors-origin", action="append", default=None,
                   help="allow cross-origin requests from this origin (repeatable; default: CORS off)")


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get("RAYPD_API_KEY") or None


def check_arguments(args) -> None:
    """Before anything starts: SystemExit when the HTTP flags cannot work."""
    from raypd.server.grpc_server import is_loopback
    from raypd.server.openai_chat import ChatTemplate

    if args.http_port is None:
        return
    if not is_loopback(args.http_host) and _api_key(args) is None and not args.allow_insecure_remote:
        raise SystemExit(f"raypd serve: refusing to serve HTTP on non-loopback host {args.http_host!r} without "
                         "an API key (pass --api-key or set RAYPD_API_KEY, or --allow-insecure-remote)")
    if args.chat_template is not None:
        try:
            ChatTemplate.find(None, args.chat_template)
        except ValueError as e:
            raise SystemExit(f"raypd serve: {e}") from None


@contextlib.contextmanager
def serving(args, endpoint, model_source):
    """The HTTP API over `endpoint`'s backend and metrics while the block runs (nothing without
    --http-port). Yields the HttpServer or None. CLI glue: a bad flag is a SystemExit."""
    if args.http_port is None:
        yield None
        return
    from raypd.server.openai_app import OpenAIServer, build_app
    from raypd.server.openai_chat import ChatTemplate, model_dir

    try:
        template = ChatTemplate.find(model_dir(model_source), args.chat_template)
        server = OpenAIServer(endpoint.backend, api_key=_api_key(args), chat_template=template,
                              metrics=endpoint.metrics)
        http = HttpServer(build_app(server, tuple(args.cors_origin or ())), args.http_host, args.http_port)
    except (ValueError, OSError) as e:
        raise SystemExit(f"raypd serve: {e}") from None
    http.start()
    log.info("OpenAI API on %s (chat template: %s)", http.url, "yes" if template else "none")
    try:
        yield http
    finally:
        http.stop()
        server.close()
