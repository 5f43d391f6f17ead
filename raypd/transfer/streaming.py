"""Layer streaming: K/V leaves the prefill engine one layer group at a time, while the later
groups still compute, and the decode side writes each group as soon as it arrives.

Lifecycle of one request (layer groups [lo, hi) from `EngineConfig.layer_groups`):
  1. Prefill process: `sender.add(request)` queues it; `sender.step()` runs one prefill chunk
     through `PrefillEngine.step(on_layers=...)`. For each request whose prompt *finishes* in
     the chunk, the callback of group [lo, hi) (called while the next group is already queued
     on the device) encodes those layers of all the request's pages (`kv_codec.encode` of a
     `layer_slice`: INT8 + guard, or raw, per the request's `kv_compression`), sends them with
     the transport and hands a `LayerPart` (small metadata around the handle, never the
     payload) to `emit`, which carries it to the decode process: an actor call, a queue, or a
     plain function call when both sides share a process.
  2. Decode process: `receiver.on_part(part)` for each part as it arrives: on a request's first
     part it allocates pages for the prompt, then receives the part and writes its layers into
     them. Parts may arrive in any order; the receiver's own layer groups do not matter.
  3. The prefill side's `PrefillOutput` (from `step`) follows the parts;
     `receiver.insert(request, out)` starts decoding once all L layers are in, and
     `sender.release(request_id)` frees the prefill pages and the sent payloads (the
     acknowledgement). `receiver.abort(request_id)` drops an unfinished stream's pages.

Prompts longer than one chunk stream in their *last* chunk only, and send all their pages
(pages written by earlier chunks and cached-prefix pages included) group by group. Why: one
stream per request with exactly one part per layer group, and prefix pages need no separate
message. The cost: only the last chunk's compute hides the transfer, so a prefill engine that
streams long prompts should have a largest prefill bucket that covers them (the benchmark
prefills 2048 tokens as one chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from raypd.engine import kv_codec
from raypd.engine.api import PrefillOutput, Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.transfer.base import KVTransport, TransferHandle
from raypd.transfer.engines import (DEFAULT_COMPRESSION, DEFAULT_TIMEOUT_S, compression_for,
                                    on_mesh)


@dataclasses.dataclass(frozen=True)
class LayerPart:
    """Layers [lo, hi) of one request's K/V: picklable metadata; the payload is behind `handle`."""

    request_id: str
    lo: int
    hi: int
    num_layers: int  # L of the sender's model: the stream is complete once parts cover [0, L)
    num_tokens: int  # prompt tokens whose K/V the pages hold
    handle: TransferHandle


class StreamingSender:
    """Wraps a `PrefillEngine`; every method is called by the prefill process."""

    def __init__(self, prefill: PrefillEngine, transport: KVTransport, emit: Callable[[LayerPart], None],
                 default_compression: str = DEFAULT_COMPRESSION):
        self.prefill = prefill
        self.transport = transport
        self.emit = emit
        self.default_compression = kv_codec.check_compression(default_compression)
        self._streams: dict[str, tuple[int, str]] = {}  # request id -> (prompt_len, compression)
        self._sent: dict[str, list[TransferHandle]] = {}

    def add(self, request: Request, prefix_pages: list[int] = (), reserve_tokens: int = 0) -> None:
        """Queue a request for prefill (`PrefillEngine.add`); its K/V will stream out."""
        compression = compression_for(request, self.default_compression)
        self.prefill.add(request, prefix_pages, reserve_tokens)
        self._streams[request.request_id] = (len(request.prompt_ids), compression)

    def step(self) -> list[PrefillOutput]:
        """Run one prefill chunk, streaming finished prompts' K/V out group by group. When it
        returns, every part of the returned requests has been sent and emitted."""
        return self.prefill.step(on_layers=self._on_layers)

    def _on_layers(self, lo: int, hi: int, pieces) -> None:
        r = self.prefill.runner
        layers = kv_codec.layer_slice(r.cache, lo, hi)
        for request_id, pages, _, end in pieces:
            stream = self._streams.get(request_id)
            if stream is None or end != stream[0]:
                continue  # not streamed by us, or its prompt goes on in a later chunk
            num_tokens, compression = stream
            enc = kv_codec.encode(layers, pages[: r.allocator.pages_for(num_tokens)], num_tokens, compression)
            handle = self.transport.send(request_id, enc)
            self._sent.setdefault(request_id, []).append(handle)
            self.emit(LayerPart(request_id, lo, hi, r.cfg.num_layers, num_tokens, handle))

    def release(self, request_id: str) -> None:
        """Free the request's prefill pages and every payload sent for it (after the decode side
        acknowledged, or on abort). Idempotent."""
        self._streams.pop(request_id, None)
        for handle in self._sent.pop(request_id, []):
            self.transport.release(handle)
        self.prefill.release(request_id)


@dataclasses.dataclass
class _Stream:
    pages: list[int]  # receiver pages holding the prompt's K/V (one reference held here)
    num_tokens: int
    layers: set[int] = dataclasses.field(default_factory=set)  # layers written so far


class StreamingReceiver:
    """Wraps a `DecodeEngine`; every method is called by the decode process."""

    def __init__(self, decode: DecodeEngine, transport: KVTransport, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.decode = decode
        self.transport = transport
        self.timeout_s = timeout_s
        self._streams: dict[str, _Stream] = {}

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def on_part(self, part: LayerPart) -> bool:
        """Receive one part and write its layers into the request's pages (allocated on its
        first part). -> whether all layers are now in. On any error the request's stream is
        dropped (its pages freed); other requests' pages are never touched."""
        r = self.decode.runner
        cfg = r.cfg
        if part.num_layers != cfg.num_layers or not 0 <= part.lo < part.hi <= cfg.num_layers:
            self.abort(part.request_id)
            raise ValueError(f"request {part.request_id}: layers [{part.lo}, {part.hi}) of "
                             f"{part.num_layers} do not fit a {cfg.num_layers}-layer model")
        try:
            enc = self.transport.recv(part.handle, self.timeout_s)
            if enc.num_tokens != part.num_tokens:
                raise ValueError(f"request {part.request_id}: payload holds {enc.num_tokens} tokens, "
                                 f"the stream has {part.num_tokens}")
            kv_codec.check_fits(enc, part.hi - part.lo, r.page_size, cfg.num_kv_heads, cfg.head_dim,
                                r.allocator.pages_for)
            stream = self._streams.get(part.request_id)
            if stream is None:
                stream = _Stream(r.allocator.allocate(enc.num_pages), part.num_tokens)
                self._streams[part.request_id] = stream
            elif stream.num_tokens != part.num_tokens:
                raise ValueError(f"request {part.request_id}: part of {part.num_tokens} tokens in a "
                                 f"stream of {stream.num_tokens}")
            r.cache = kv_codec.decode_into(r.cache, stream.pages, on_mesh(r, enc), first_layer=part.lo)
        except BaseException:
            self.abort(part.request_id)
            raise
        finally:
            self.transport.release(part.handle)  # the receiver's side; the sender releases its own
        stream.layers.update(range(part.lo, part.hi))
        return len(stream.layers) == cfg.num_layers

    def is_complete(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        return stream is not None and len(stream.layers) == self.decode.runner.cfg.num_layers

    def pages(self, request_id: str) -> list[int]:
        return list(self._streams[request_id].pages)

    def insert(self, request: Request, out: PrefillOutput) -> TokenOutput:
        """Start decoding a request whose K/V has fully arrived -> its first token's output (as
        `DecodeEngine.insert`). The stream is consumed either way."""
        if not self.is_complete(request.request_id):
            have = self._streams.get(request.request_id)
            raise ValueError(f"request {request.request_id}: K/V incomplete "
                             f"({0 if have is None else len(have.layers)} of "
                             f"{self.decode.runner.cfg.num_layers} layers arrived)")
        stream = self._streams.pop(request.request_id)
        if out.prompt_len != stream.num_tokens:
            self.decode.allocator.free(stream.pages)
            raise ValueError(f"request {request.request_id}: prompt of {out.prompt_len} tokens, "
                             f"streamed K/V of {stream.num_tokens}")
        try:  # insert takes its own reference on the pages; ours is dropped either way
            return self.decode.insert(request, dataclasses.replace(out, pages=stream.pages), None)
        finally:
            self.decode.allocator.free(stream.pages)

    def abort(self, request_id: str) -> None:
        """Drop an unfinished stream and free its pages. Idempotent."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self.decode.allocator.free(stream.pages)
