"""Ray object store transport (the default; works across nodes).

The payload goes into the object store as one dict of numpy arrays (int8 values + float32
scales, or the pool-dtype values; bfloat16 as uint16 bits so it stays zero-copy), never a
jax.Array. The handle carries the ObjectRef.

Ownership. An object is owned by the process that `ray.put` it, and is lost when that
process dies, even though its bytes sit in the node's store. Ray >= 2.56 removed
`ray.put(_owner=...)` (checked on the installed 2.60: it raises ValueError), so handing the
payload to a longer-lived owner would cost a second copy through that owner's `ray.put`. raypd
therefore lets the prefill actor own its payloads: its death loses the K/V of requests not yet
received, exactly as it loses the prefill pool that produced them, and the decode side gets
`SenderLost` at once (not a hang) and can have the request prefilled again. Once `recv`
returns, the receiver holds its own copy in its pool. A lost or freed object, or one that
does not appear within the timeout, likewise ends in a `TransferError`.
"""

from __future__ import annotations

from collections import OrderedDict

import ray
from ray import exceptions as rex

from raypd.engine.kv_codec import EncodedKV
from raypd.transfer.base import (KVTransport, SenderLost, TransferHandle, TransferNotFound,
                                 TransferTimeout, from_wire, new_handle, to_wire)

_MAX_RELEASED = 100_000  # ids remembered so a released handle gives a clear error


class RayObjectStoreTransport(KVTransport):
    kind = "ray_object_store"

    def __init__(self):
        self._sent: dict[str, ray.ObjectRef] = {}
        self._released: OrderedDict[str, None] = OrderedDict()

    @property
    def num_pending(self) -> int:
        return len(self._sent)

    def send(self, request_id: str, enc: EncodedKV) -> TransferHandle:
        """Called by the prefill process: one `ray.put` of the numpy payload."""
        wire = to_wire(enc)
        ref = ray.put(wire)
        handle = new_handle(self.kind, request_id, enc, location=ref)
        self._sent[handle.transfer_id] = ref
        return handle

    def recv(self, handle: TransferHandle, timeout_s: float) -> EncodedKV:
        """Called by the decode process: `ray.get` with a timeout (zero-copy for numpy)."""
        self._check_kind(handle)
        if handle.transfer_id in self._released:
            raise TransferNotFound(f"transfer {handle.transfer_id} (request {handle.request_id}) "
                                   "was released")
        try:
            wire = ray.get(handle.location, timeout=timeout_s)
        except rex.GetTimeoutError as e:
            raise TransferTimeout(f"transfer {handle.transfer_id} (request {handle.request_id}): "
                                  f"payload not available within {timeout_s}s") from e
        except rex.OwnerDiedError as e:
            raise SenderLost(f"transfer {handle.transfer_id} (request {handle.request_id}): the "
                             "payload's owner died before it was received") from e
        except rex.ObjectLostError as e:  # ObjectFreedError, ObjectReconstructionFailed*, ...
            raise SenderLost(f"transfer {handle.transfer_id} (request {handle.request_id}): "
                             f"payload lost ({type(e).__name__})") from e
        return from_wire(handle, wire)

    def release(self, handle: TransferHandle) -> None:
        """Called by both processes. The sender drops its reference; the receiver remembers the
        id (a later recv is a clear error). The object is freed by Ray's reference counting once
        no handle refers to it (this Ray has no explicit free). Idempotent."""
        self._check_kind(handle)
        if self._sent.pop(handle.transfer_id, None) is not None or handle.transfer_id in self._released:
            return
        self._released[handle.transfer_id] = None
        if len(self._released) > _MAX_RELEASED:
            self._released.popitem(last=False)
