"""Tying transports to the engines: prefill pages -> transport -> new decode pages.

  send_prefill (prefill process): encode the request's pages (`kv_codec.encode`: gather, and
    for "int8" quantize + accuracy guard, in one jitted call) and `transport.send` them. The
    prefill engine may `release` the request's pages as soon as this returns.
  recv_into (decode process): `transport.recv`, check the payload fits this engine's model and
    pages, allocate pages, write the K/V into them (dequantize + scatter for "int8") on this
    engine's mesh, whatever the sender's TP was, and `DecodeEngine.insert` the request. On any
    error before the insert, the decode engine's pages and slots are as they were.
  recv_group (decode process): the same for the n samples of one prompt: the K/V is received
    once, the first sample takes it over and the others fork from it.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from raypd.engine import kv_codec
from raypd.engine.api import DEFAULT_KV_COMPRESSION, PrefillOutput, Request, TokenOutput
from raypd.engine.decode import DecodeEngine
from raypd.engine.pages import OutOfPages
from raypd.engine.prefill import PrefillEngine
from raypd.transfer.base import KVTransport, TransferHandle

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_COMPRESSION = DEFAULT_KV_COMPRESSION  # when neither the request nor the caller names one


def compression_for(request: Request, default: str = DEFAULT_COMPRESSION) -> str:
    """The request's own `kv_compression`, else the deployment's `default`."""
    return kv_codec.check_compression(request.kv_compression or default)


def send_prefill(prefill: PrefillEngine, out: PrefillOutput, transport: KVTransport,
                 compression: str = DEFAULT_KV_COMPRESSION) -> TransferHandle:
    """Called by the prefill process after `prefill`, before `prefill.release`."""
    kv_codec.check_compression(compression)
    n = prefill.allocator.pages_for(out.prompt_len)
    enc = kv_codec.encode(prefill.runner.cache, out.pages[:n], out.prompt_len, compression)
    return transport.send(out.request_id, enc)


def check_payload(decode: DecodeEngine, out: PrefillOutput, enc: kv_codec.EncodedKV) -> None:
    """Raise ValueError unless `enc` is the K/V of `out` in this decode engine's shapes."""
    r = decode.runner
    cfg = r.cfg
    if enc.num_tokens != out.prompt_len:
        raise ValueError(f"request {out.request_id}: payload holds {enc.num_tokens} tokens, "
                         f"the prompt has {out.prompt_len}")
    kv_codec.check_fits(enc, cfg.num_layers, r.page_size, cfg.num_kv_heads, cfg.head_dim,
                        r.allocator.pages_for)


def on_mesh(runner, enc: kv_codec.EncodedKV) -> kv_codec.EncodedKV:
    """The payload's arrays put (replicated) on the receiving runner's mesh, whatever the
    sender's sharding was; the jitted write then re-shards them into the pool's layout."""
    replicated = NamedSharding(runner.mesh, PartitionSpec())
    return enc.replace(**{n: jax.device_put(a, replicated) for n, a in enc.arrays().items()})


def write_payload(decode: DecodeEngine, enc: kv_codec.EncodedKV) -> list[int]:
    """Allocate pages and write `enc` into them on the decode runner's mesh. -> the pages
    (one reference held by the caller)."""
    r = decode.runner
    enc = on_mesh(r, enc)
    pages = r.allocator.allocate(enc.num_pages)
    try:
        r.cache = kv_codec.decode_into(r.cache, pages, enc)
    except BaseException:
        r.allocator.free(pages)
        raise
    return pages


def export_pages(runner, pages: list[int], compression: str) -> kv_codec.EncodedKV:
    """Full pages of a pool as a payload (a host copy for the KV store)."""
    return kv_codec.encode(runner.cache, list(pages), len(pages) * runner.page_size, compression)


def import_pages(runner, encs: list[kv_codec.EncodedKV]) -> list[int]:
    """Write payloads of full pages (host copies) into new pages of `runner`'s pool, in order.
    -> the pages (one reference held by the caller). All or nothing."""
    cfg, pages = runner.cfg, []
    try:
        for enc in encs:
            kv_codec.check_fits(enc, cfg.num_layers, runner.page_size, cfg.num_kv_heads, cfg.head_dim,
                                runner.allocator.pages_for)
            new = runner.allocator.allocate(enc.num_pages)
            pages += new
            runner.cache = kv_codec.decode_into(runner.cache, new, on_mesh(runner, enc))
    except BaseException:
        runner.allocator.free(pages)
        raise
    return pages


def recv_into(decode: DecodeEngine, request: Request, out: PrefillOutput, handle: TransferHandle,
              transport: KVTransport, timeout_s: float = DEFAULT_TIMEOUT_S) -> TokenOutput:
    """Called by the decode process: receive the K/V and start decoding the request.
    -> the first token's output (as `DecodeEngine.insert`). The caller releases the handle."""
    return recv_group(decode, [(request, out)], handle, transport, timeout_s)[0]


def recv_group(decode: DecodeEngine, samples: list[tuple[Request, PrefillOutput]], handle: TransferHandle,
               transport: KVTransport, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TokenOutput]:
    """Called by the decode process: receive one prompt's K/V once and start decoding every
    sample of it (n > 1: each (request, prefill output) with its own first token). The first
    takes the received pages over (`DecodeEngine.insert`); the others fork from them (full
    prompt pages shared, the partial one copied), as the colocated engine's samples do.
    -> the first token's output of each, in order. All or nothing: on an error, no sample
    runs and the engine's pages and slots are as they were. The caller releases the handle."""
    (request, out), n = samples[0], len(samples)
    shared = out.prompt_len // decode.runner.page_size
    need = sum(decode.pages_needed(out.prompt_len, r.params.max_tokens) - (shared if i else 0)
               for i, (r, _) in enumerate(samples))
    if decode.num_free_slots < n or not decode.allocator.can_allocate(need):
        raise OutOfPages(f"request {request.request_id}: no {n} free slot(s) or {need} pages for "
                         f"{out.prompt_len} + {request.params.max_tokens} tokens")
    enc = transport.recv(handle, timeout_s)
    check_payload(decode, out, enc)
    pages = write_payload(decode, enc)
    started: list[TokenOutput] = []
    try:  # each sample takes its own references on the pages; ours is dropped either way
        started.append(decode.insert(request, dataclasses.replace(out, pages=pages), None))
        for r, o in samples[1:]:
            started.append(decode.fork(r, dataclasses.replace(o, pages=pages)))
    except BaseException:
        for o in started:
            decode.release(o.request_id)
        raise
    finally:
        decode.allocator.free(pages)
    return started
