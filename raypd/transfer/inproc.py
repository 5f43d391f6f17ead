"""In-process transport: the payload stays in this process (colocated mode and tests).

Sender and receiver share one `InProcTransport` object; `send` files the payload under a new
id, `recv` hands it back (the receiver's `recv_into` puts it on its own sharding).
"""

from __future__ import annotations

from raypd.engine.kv_codec import EncodedKV
from raypd.transfer.base import KVTransport, TransferHandle, TransferNotFound, new_handle


class InProcTransport(KVTransport):
    kind = "inproc"

    def __init__(self):
        self._payloads: dict[str, EncodedKV] = {}

    @property
    def num_pending(self) -> int:
        return len(self._payloads)

    def send(self, request_id: str, enc: EncodedKV) -> TransferHandle:
        """Called by the prefill side (same process as the decode side)."""
        handle = new_handle(self.kind, request_id, enc)
        self._payloads[handle.transfer_id] = enc
        return handle

    def recv(self, handle: TransferHandle, timeout_s: float) -> EncodedKV:
        """Called by the decode side. Never waits: the payload is here or it never will be."""
        self._check_kind(handle)
        enc = self._payloads.get(handle.transfer_id)
        if enc is None:
            raise TransferNotFound(f"transfer {handle.transfer_id} (request {handle.request_id}) "
                                   "is unknown or released")
        return enc

    def release(self, handle: TransferHandle) -> None:
        """Called by either side; drops the payload. Idempotent."""
        self._payloads.pop(handle.transfer_id, None)
