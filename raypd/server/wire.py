"""Decoding a GenerateRequest so that a malformed one is a client error that names its field.

gRPC's default deserializer raises on bytes it cannot parse, and the client then sees
`INTERNAL: Exception deserializing request!`, which blames the server and names nothing. The
commonest cause is a proto3 `string` field (the prompt text, a stop string, the request id)
carrying bytes that are not valid UTF-8. `decode_request` parses strictly first; on failure
it parses again with a twin of the message whose string fields are `bytes` (the same wire
format) to find the first field that is not UTF-8, and returns a `Malformed` naming it. The
service answers a `Malformed` with INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from raypd.proto import raypd_pb2


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A request that could not be parsed; `reason` names the field."""

    reason: str


@functools.cache
def lenient_request_class():
    """GenerateRequest with every string field (at any depth) declared `bytes` instead."""
    proto = descriptor_pb2.FileDescriptorProto()
    raypd_pb2.DESCRIPTOR.CopyToProto(proto)
    for msg in proto.message_type:
        for field in msg.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: same names, no clash
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(raypd_pb2.GenerateRequest.DESCRIPTOR.full_name))


def _first_bad_utf8(msg, prefix: str = "") -> str | None:
    """The path of the first bytes field of `msg` (a lenient message) that is not UTF-8."""
    for field, value in msg.ListFields():
        name = f"{prefix}{field.name}"
        values = list(value) if field.is_repeated else [value]
        for i, v in enumerate(values):
            path = f"{name}[{i}]" if field.is_repeated else name
            if isinstance(v, bytes):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError as e:
                    what = "prompt: text" if path == "text" else path  # `text` is the prompt oneof's
                    return f"{what} is not valid UTF-8 (byte {e.start})"
            elif isinstance(v, message.Message):
                found = _first_bad_utf8(v, f"{path}.")
                if found is not None:
                    return found
    return None


def decode_request(data: bytes):
    """-> a raypd_pb2.GenerateRequest, or a Malformed naming what is wrong with `data`."""
    try:
        return raypd_pb2.GenerateRequest.FromString(data)
    except message.DecodeError:
        pass
    try:
        lenient = lenient_request_class().FromString(data)
    except message.DecodeError as e:
        return Malformed(f"request: not a valid GenerateRequest message ({e})")
    bad = _first_bad_utf8(lenient)
    # Strings in proto3 are UTF-8; a parse that only the lenient twin accepts has a bad one.
    return Malformed(bad or "request: not a valid GenerateRequest message")


def encode_lenient(**fields) -> bytes:
    """A GenerateRequest's bytes with raw `bytes` in string fields (for tests and scripts/chaos.py)."""
    return lenient_request_class()(**fields).SerializeToString()
