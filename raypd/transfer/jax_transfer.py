"""Direct device transfer with `jax.experimental.transfer` (a TransferServer per process).

Sender (prefill process): `send` puts the payload's arrays on its first local device and
registers them with its server under a random uuid (`await_pull`); the handle carries
(server address, uuid). Receiver (decode process): `recv` connects to that address and pulls
the arrays onto its first local device (the caller re-shards them onto its mesh).

What the installed API gives, and what this backend adds (jax 0.10, CPU, two processes):
  - `pull` returns at once; the arrays become ready when the bytes arrive. A pull whose uuid
    was never registered, has expired, or whose server died does not fail: it stays pending
    (until the connection closes, if ever). So `recv` polls `is_ready()` against its own
    deadline and raises `TransferTimeout`; a TCP probe of the sender's address first turns a
    dead sender into `SenderLost` at once.
  - A zero-size array's pull never completes either; such arrays are rebuilt, not pulled.
  - `await_pull(..., timeout=)` drops the server's reference when nobody pulls in time. The
    sender also keeps its own reference until `release` (the receiver's acknowledgement,
    relayed by whoever holds the handle) or `keep_s`, whichever comes first; expired entries
    are reaped on every `send`/`release`/`num_pending`.
"""

from __future__ import annotations

import datetime
import secrets
import socket
import time

import jax
import numpy as np

from raypd.engine.kv_codec import EncodedKV
from raypd.transfer.base import (KVTransport, SenderLost, TransferHandle, TransferNotFound,
                                 TransferTimeout, new_handle)


class JaxTransferTransport(KVTransport):
    kind = "jax_transfer"

    def __init__(self, host: str = "127.0.0.1", keep_s: float = 60.0, poll_s: float = 0.0005):
        self.host = host  # address other processes reach this one at
        self.keep_s = keep_s  # the sender frees unacknowledged payloads after this long
        self.poll_s = poll_s
        self._server = None
        self._conns: dict[str, object] = {}
        self._pending: dict[str, tuple[list[jax.Array], float]] = {}  # id -> (arrays, deadline)
        self._released: set[str] = set()
        self._abandoned: list = []  # pulls that timed out; kept so their buffers are not freed mid-copy

    def _device(self):
        return jax.local_devices()[0]

    def server(self):
        if self._server is None:
            from jax.experimental import transfer

            addr = f"{self.host}:0"
            self._server = transfer.start_transfer_server(self._device().client, addr, [addr])
        return self._server

    @property
    def address(self) -> str:
        return self.server().address()

    @property
    def num_pending(self) -> int:
        self._reap(time.monotonic())
        return len(self._pending)

    def _reap(self, now_s: float) -> None:
        for tid in [t for t, (_, deadline) in self._pending.items() if deadline <= now_s]:
            del self._pending[tid]

    def send(self, request_id: str, enc: EncodedKV) -> TransferHandle:
        """Called by the prefill process: registers the arrays for one pull."""
        now = time.monotonic()
        self._reap(now)
        dev = self._device()
        # Zero-size arrays (no guarded pages) are not registered: their pull never completes.
        arrays = [jax.device_put(a, dev) for a in enc.arrays().values() if a.size]
        uid = secrets.randbits(63)
        expires = datetime.datetime.now() + datetime.timedelta(seconds=self.keep_s)
        self.server().await_pull(uid, arrays, timeout=expires)
        handle = new_handle(self.kind, request_id, enc, location=(self.address, uid))
        self._pending[handle.transfer_id] = (arrays, now + self.keep_s)
        return handle

    def _connection(self, address: str):
        if address not in self._conns:
            self._conns[address] = self.server().connect(address)
        return self._conns[address]

    def recv(self, handle: TransferHandle, timeout_s: float) -> EncodedKV:
        """Called by the decode process: pulls the arrays onto this process's first device."""
        self._check_kind(handle)
        if handle.transfer_id in self._released:
            raise TransferNotFound(f"transfer {handle.transfer_id} (request {handle.request_id}) "
                                   "was released or already received")
        address, uid = handle.location
        deadline = time.monotonic() + timeout_s
        _probe(address, handle, timeout_s)
        sharding = jax.sharding.SingleDeviceSharding(self._device())
        specs = [jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype), sharding=sharding)
                 for s in handle.arrays if np.prod(s.shape)]
        arrays = self._connection(address).pull(uid, specs)
        while not all(a.is_ready() for a in arrays):
            if time.monotonic() > deadline:
                self._abandoned.append(arrays)
                raise TransferTimeout(f"transfer {handle.transfer_id} (request {handle.request_id}): "
                                      f"nothing from {address} within {timeout_s}s (sender dead, "
                                      "payload expired, or already pulled)")
            time.sleep(self.poll_s)
        self._released.add(handle.transfer_id)  # one pull per registration: a second would hang
        pulled = iter(arrays)
        return EncodedKV(handle.compression, handle.num_tokens, handle.dtype,
                         **{s.name: next(pulled) if np.prod(s.shape) else np.zeros(s.shape, s.dtype)
                            for s in handle.arrays})

    def release(self, handle: TransferHandle) -> None:
        """Called by both processes. The sender drops its buffers (the acknowledgement); the
        receiver forgets the transfer. Idempotent."""
        self._check_kind(handle)
        self._pending.pop(handle.transfer_id, None)
        self._released.add(handle.transfer_id)
        self._reap(time.monotonic())


def _probe(address: str, handle: TransferHandle, timeout_s: float) -> None:
    """Raise SenderLost at once when nothing listens at the sender's address."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 5.0)).close()
    except OSError as e:
        raise SenderLost(f"transfer {handle.transfer_id} (request {handle.request_id}): sender at "
                         f"{address} unreachable ({e})") from e
