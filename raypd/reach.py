"""Connecting with a deadline: every command that attaches to a Ray cluster or a gRPC endpoint
goes through here, so a wrong address fails in seconds with a message that names it.

  check_tcp(address)     a TCP connect to HOST:PORT (refused or silent: ConnectionError).
  ray_init(address)      `ray.init` after a TCP check of the cluster's GCS address, run in a
                         helper thread that the caller waits on for at most `timeout_s` (a
                         reachable port that is not Ray's, e.g. the dashboard's, would otherwise
                         block inside Ray's C++ client, deaf to Ctrl-C and SIGTERM). "local"
                         (a new cluster) starts in the calling thread.
  check_grpc(target)     waits for a gRPC channel to HOST:PORT to become ready.
Outer ring: no model or engine imports.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

DEFAULT_TIMEOUT_S = 15.0


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (an optional scheme such as ray:// dropped) -> (host, port); ValueError otherwise."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def check_tcp(address: str, timeout_s: float = 5.0, what: str = "server") -> None:
    """ConnectionError naming `address` unless something accepts TCP connections there."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise ConnectionError(f"cannot reach the {what} at {address}: {reason}") from None


def resolve_ray_address(address: str | None) -> str:
    """The cluster address `ray.init` would use: `address`, else $RAY_ADDRESS, else 'auto'
    (the cluster `ray start` started on this machine). 'local' stays 'local' (a new cluster)."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address != "auto":
        return address
    from ray._private import services

    try:
        found = services.canonicalize_bootstrap_address(address)
    except ConnectionError:
        found = None
    if not found:
        raise ConnectionError("no running Ray cluster found on this machine (address 'auto'); start one with "
                              "`ray start --head` or pass --address HOST:PORT")
    return found


def ray_init(address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> None:
    """`ray.init(address=...)` that gives up after `timeout_s` with a ConnectionError naming the
    address. No-op when this process is already connected."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    resolved = resolve_ray_address(address)
    if resolved == "local":
        # A new cluster: nothing remote to wait on, and its processes must be started from the
        # main thread (Ray sets them to die with the thread that started them).
        import ray

        ray.init(address="local", **kwargs)
        return
    # before importing Ray (seconds on a busy machine): a typo fails at once
    check_tcp(resolved, min(5.0, timeout_s), "Ray client server" if resolved.startswith("ray://")
              else "Ray cluster (GCS)")
    import ray

    box: dict = {}

    def connect() -> None:
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_no_sigterm_warning)  # the caller owns SIGTERM (see raypd.cli)
        try:
            ray.init(address=resolved, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        finally:
            worker_log.removeFilter(_no_sigterm_warning)

    thread = threading.Thread(target=connect, name="raypd-ray-init", daemon=True)
    thread.start()
    thread.join(timeout_s)  # the main thread stays interruptible (Ctrl-C, SIGTERM) while it waits
    if thread.is_alive():
        raise ConnectionError(f"could not connect to the Ray cluster at {resolved} within {timeout_s:.0f} s "
                              "(is it a Ray GCS address, as printed by `ray start`? the dashboard's port is not)")
    if "error" in box:
        e = box["error"]
        raise ConnectionError(f"could not connect to the Ray cluster at {resolved}: {e}") from e


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def check_grpc(target: str, timeout_s: float = DEFAULT_TIMEOUT_S, credentials=None) -> None:
    """ConnectionError naming `target` unless a gRPC channel to it becomes ready within timeout_s."""
    import grpc

    check_tcp(target, min(5.0, timeout_s), "gRPC server")
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ConnectionError(f"the gRPC server at {target} did not become ready within {timeout_s:.0f} s") from None
    finally:
        channel.close()
