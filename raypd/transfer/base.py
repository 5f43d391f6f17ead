"""The K/V transport contract: who calls what, when.

Lifecycle of one request's K/V (the payload is an `EncodedKV` of numpy arrays):
  1. Prefill process: `handle = transport.send(request_id, enc)`. The payload is now owned by
     the transport; the prefill engine may free its pages at once.
  2. The handle (small, picklable metadata; never the payload) travels to the decode process
     by whatever carries requests (an actor call, a queue).
  3. Decode process: `enc = transport.recv(handle, timeout_s)` -> the payload, or a
     `TransferError` within `timeout_s` (unknown or released handle, sender gone, object lost).
     Never a hang.
  4. Both sides: `transport.release(handle)` once they are done with it (the decode side after
     the K/V is in its pool, the prefill side when it hears so, or on abort). Idempotent, and a
     no-op for handles the transport never saw.

Backends are picked by `make_transport(kind, **opts)`, in the entry point that builds a
worker; workers see only `KVTransport`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import uuid

import ml_dtypes
import numpy as np

from raypd.engine.api import EncodedKV

BACKENDS = {
    "inproc": "raypd.transfer.inproc:InProcTransport",
    "ray_object_store": "raypd.transfer.object_store:RayObjectStoreTransport",
    "jax_transfer": "raypd.transfer.jax_transfer:JaxTransferTransport",
}
DEFAULT_BACKEND = "ray_object_store"


class TransferError(RuntimeError):
    """A transfer cannot be completed; the receiver's pool is untouched."""


class TransferNotFound(TransferError):
    """The handle names a transfer this transport does not have (never sent, or released)."""


class TransferTimeout(TransferError, TimeoutError):
    """The payload did not arrive within the receiver's timeout."""


class SenderLost(TransferError):
    """The sender (or the payload's owner) died, or the payload was lost."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    name: str  # field of EncodedKV: "k", "v", "k_scale", ...
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class TransferHandle:
    """Metadata of one transfer. Picklable and small: it never holds the payload itself."""

    transfer_id: str
    request_id: str
    backend: str
    compression: str  # "none" | "int8"
    num_tokens: int
    dtype: str  # the sender pool's K/V dtype
    num_pages: int  # n
    num_raw_pages: int  # pages the accuracy guard sent uncompressed
    num_bytes: int  # payload bytes on the wire
    arrays: tuple[ArraySpec, ...]  # what the payload holds, in a fixed order
    location: object = None  # backend-specific: an ObjectRef, (address, uuid), or None
    # 0: the payload is whole, at `location`. N > 0: layer streaming (streaming.py) sent it as N
    # layer parts, each under a handle of its own, straight to the receiver; this handle then
    # stands for all of them (`location` None) and is released like any other.
    num_parts: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return next(a.shape for a in self.arrays if a.name == "k")  # [L, n, G, K, H]


def new_handle(backend: str, request_id: str, enc: EncodedKV, location=None) -> TransferHandle:
    specs = tuple(ArraySpec(n, tuple(a.shape), str(a.dtype)) for n, a in enc.arrays().items())
    return TransferHandle(uuid.uuid4().hex, request_id, backend, enc.compression, enc.num_tokens,
                          enc.dtype, enc.num_pages, enc.num_raw_pages, enc.num_bytes, specs, location)


def to_wire(enc: EncodedKV) -> dict[str, np.ndarray]:
    """Arrays as plain numpy dtypes: bfloat16 travels as its uint16 bits (numpy pickles
    extension dtypes in-band, i.e. with a copy; uint16 goes out-of-band, zero-copy)."""
    arrays = {n: np.asarray(a) for n, a in enc.arrays().items()}
    return {n: a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a for n, a in arrays.items()}


def from_wire(handle: TransferHandle, arrays: dict) -> EncodedKV:
    """Inverse of `to_wire`, checking each array against the handle's specs."""
    out = {}
    for spec in handle.arrays:
        if spec.name not in arrays:
            raise TransferError(f"transfer {handle.transfer_id}: payload lacks {spec.name!r}")
        a = arrays[spec.name]
        if isinstance(a, np.ndarray) and str(a.dtype) != spec.dtype:
            a = a.view(np.dtype(spec.dtype))
        if tuple(a.shape) != spec.shape:
            raise TransferError(f"transfer {handle.transfer_id}: {spec.name} has shape "
                                f"{tuple(a.shape)}, handle says {spec.shape}")
        out[spec.name] = a
    return EncodedKV(handle.compression, handle.num_tokens, handle.dtype, **out)


class KVTransport(abc.ABC):
    """Moves `EncodedKV` payloads from a prefill process to a decode process."""

    kind: str = ""

    @abc.abstractmethod
    def send(self, request_id: str, enc: EncodedKV) -> TransferHandle:
        """Called by the prefill process. Takes ownership of the payload; returns its handle."""

    @abc.abstractmethod
    def recv(self, handle: TransferHandle, timeout_s: float) -> EncodedKV:
        """Called by the decode process. Returns the payload (arrays may be numpy or device
        arrays) or raises a `TransferError` within `timeout_s`."""

    @abc.abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Called by both processes when done with the transfer. Idempotent; frees what this
        side holds (the sender's buffers, the receiver's copy)."""

    def _check_kind(self, handle: TransferHandle) -> None:
        if not isinstance(handle, TransferHandle):
            raise TypeError(f"expected a TransferHandle, got {type(handle).__name__}")
        if handle.backend != self.kind:
            raise TransferNotFound(f"transfer {handle.transfer_id} was sent with {handle.backend!r}, "
                                   f"not {self.kind!r}")


def make_transport(kind: str = DEFAULT_BACKEND, **opts) -> KVTransport:
    """The one place a backend is chosen. kind: one of BACKENDS; opts go to its constructor."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown kv transport {kind!r}; expected one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(**opts)
