"""What a serving process tells its operator: log set-up, one line per request, a periodic stats line.

  configure(level, fmt)   the root logger, once, from an entry point (never at import):
                          fmt "text" (human) or "json" (one object per line, for log shippers).
  log_request(...)        one line per finished request: id, prompt/completion tokens, TTFT,
                          TPOT, where it prefilled, finish reason. The fields also travel as a
                          record attribute (`fields`), so the JSON format emits them as keys.
  StatsReporter           a thread that, every `interval_s` while there was traffic, logs
                          requests/s, tokens/s, running, queued, pages used, KV hit rate and
                          transfers. It reads counters it is told about (`count`) and a
                          `snapshot()` callable of the backend's state.

TPOT everywhere in raypd is the time between tokens after the first:
  (time of the last token - time of the first token) / (completion tokens - 1), 0 for one token.
"""

from __future__ import annotations

import json
import logging
import threading
import time

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
REQUEST_LEVELS = (*LEVELS, "off")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def tpot_s(first_s: float | None, last_s: float | None, num_tokens: int) -> float:
    """Time per output token after the first (seconds); 0 with fewer than two tokens."""
    if num_tokens < 2 or first_s is None or last_s is None:
        return 0.0
    return (last_s - first_s) / (num_tokens - 1)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...the record's `fields`} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Set up the root logger (replacing handlers an earlier call installed)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_raypd", False)]:
        root.removeHandler(h)
    handler._raypd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def _text(fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, **fields) -> None:
    """`event key=value ...` in text; {"msg": event, key: value, ...} in JSON."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", event, _text(fields), extra={"fields": dict(event=event, **fields)})


def log_request(logger: logging.Logger, level: int | None, *, request_id: str, prompt_tokens: int | None,
                completion_tokens: int, ttft_s: float | None, tpot_s: float, e2e_s: float,
                finish_reason: str | None, prefilled_on: str | None = None, status: str = "ok") -> None:
    """The one line per request (level None: off)."""
    if level is None:
        return
    log_event(logger, level, "request", id=request_id, status=status, prompt_tokens=prompt_tokens,
              completion_tokens=completion_tokens, ttft_s=ttft_s, tpot_s=tpot_s, e2e_s=e2e_s,
              prefilled_on=prefilled_on, finish_reason=finish_reason)


def request_level(name: str) -> int | None:
    if name not in REQUEST_LEVELS:
        raise ValueError(f"request log level must be one of {REQUEST_LEVELS}, got {name!r}")
    return None if name == "off" else logging.getLevelName(name.upper())


class StatsReporter:
    """Logs one stats line every `interval_s` while requests finish or run.

    `count(num_requests, num_tokens)` is called by whoever sees requests end; `snapshot()`
    returns the backend's gauges (num_running, num_queued, num_pages_used, num_pages_total,
    and for a Ray deployment kv_hit_rate and num_transfers); it may raise, then the line
    says so. A quiet period (nothing finished, nothing running) logs nothing."""

    def __init__(self, snapshot, interval_s: float = 10.0, logger: logging.Logger | None = None,
                 clock=time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"stats interval must be > 0 s, got {interval_s}")
        self.snapshot, self.interval_s, self.clock = snapshot, interval_s, clock
        self.log = logger or logging.getLogger("raypd.stats")
        self._lock = threading.Lock()
        self._requests = self._tokens = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_s = clock()

    def count(self, num_requests: int, num_tokens: int) -> None:
        with self._lock:
            self._requests += num_requests
            self._tokens += num_tokens

    def tick(self) -> dict | None:
        """One reporting period: the line's fields, or None when there was no traffic."""
        now = self.clock()
        with self._lock:
            requests, tokens, self._requests, self._tokens = self._requests, self._tokens, 0, 0
        elapsed, self._last_s = max(now - self._last_s, 1e-9), now
        try:
            snap = dict(self.snapshot())
        except Exception as e:  # noqa: BLE001 - a stats line must never take the server down
            snap = {"snapshot_error": str(e)[:200]}
        if not requests and not snap.get("num_running") and not snap.get("num_queued"):
            return None
        fields = dict(req_per_s=round(requests / elapsed, 3), tok_per_s=round(tokens / elapsed, 1), **snap)
        log_event(self.log, logging.INFO, "stats", **fields)
        return fields

    def start(self) -> "StatsReporter":
        self._last_s = self.clock()
        self._thread = threading.Thread(target=self._run, name="raypd-stats", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class progress:
    """Context manager: logs `what` at entry, "still <what> (N s)" every `interval_s` while the
    block runs, and "<what>: done in N s" at exit (so a long compile is never silent)."""

    def __init__(self, what: str, interval_s: float = 10.0, logger: logging.Logger | None = None, **fields):
        self.what, self.interval_s, self.fields = what, interval_s, fields
        self.log = logger or logging.getLogger("raypd.startup")
        self._stop = threading.Event()
        self.elapsed_s = 0.0

    def __enter__(self) -> "progress":
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._tick, name="raypd-progress", daemon=True)
        self._thread.start()
        log_event(self.log, logging.INFO, self.what, **self.fields)
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            log_event(self.log, logging.INFO, f"still {self.what}",
                      elapsed_s=round(time.perf_counter() - self._start, 1))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a signal may interrupt __enter__ itself)
            self._thread.join(timeout=5.0)
        self.elapsed_s = time.perf_counter() - self._start
        if exc_type is None:
            log_event(self.log, logging.INFO, f"{self.what}: done", elapsed_s=round(self.elapsed_s, 2))
