"""Errors the Ray runtime raises at the client. They travel from the scheduler as plain data
(`to_wire` / `from_wire`) so that every driver gets the same typed exception."""

from __future__ import annotations


class RuntimeErrorBase(RuntimeError):
    """Base of raypd's runtime errors."""


class RequestRejected(RuntimeErrorBase):
    """The scheduler rejected the request at once (admission or placement).

    reason: "queue_full" | "deadline" | "no_capacity" | "no_workers" (scheduler.RejectReason);
    ttft_s: the predicted TTFT when known; retry_after_s: a hint, None when retrying won't help.
    """

    def __init__(self, message: str, reason: str, ttft_s: float | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason, self.ttft_s, self.retry_after_s = reason, ttft_s, retry_after_s


class RequestFailed(RuntimeErrorBase):
    """The request was accepted but failed in a worker (the message says where and why)."""


class DuplicateRequestId(ValueError):
    """A client-chosen request id is already in flight on this server (gRPC ALREADY_EXISTS)."""


class DeploymentNotFound(RuntimeErrorBase, LookupError):
    """No deployment of that name on this Ray cluster."""


class DeploymentNotRunning(RuntimeErrorBase):
    """The deployment was shut down or its scheduler died."""


_KINDS = {"rejected": RequestRejected, "failed": RequestFailed, "value": ValueError,
          "not_running": DeploymentNotRunning}


def to_wire(e: Exception) -> tuple:
    if isinstance(e, RequestRejected):
        return ("rejected", str(e), e.reason, e.ttft_s, e.retry_after_s)
    if isinstance(e, ValueError):
        return ("value", str(e))
    if isinstance(e, DeploymentNotRunning):
        return ("not_running", str(e))
    return ("failed", str(e))


def from_wire(wire: tuple) -> Exception:
    kind, message, *rest = wire
    return _KINDS[kind](message, *rest)
