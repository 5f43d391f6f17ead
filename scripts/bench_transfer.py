"""K/V transfer benchmark: bytes, codec time, and transfer time per backend, with ceilings.

    python scripts/bench_transfer.py [--json out.json] [--max-tokens 2048] [--repeats 3]

For prompts of 128...8192 tokens of bench-random's K/V shape (L=12, K=4, H=64, G=16):
  - bytes moved with float32, bfloat16 and INT8 (+ bfloat16 scales) payloads,
  - codec time: gather (+ quantize + guard) out of a pool, and (dequantize +) scatter into one,
  - transfer time and GB/s of each backend: send in a sender actor + recv in this process,
    on one node and across two `ray.cluster_utils.Cluster` nodes (a sender actor pinned to the
    second node),
  - ceilings: a raw `ray.put` + `ray.get` of the same byte count, and a memcpy.
The pool holds random values (transfer cost depends only on the bytes; bench-random's
4096-token context could not prefill 8192 tokens anyway). Times are medians of --repeats.

Layer streaming (`--streaming-tokens 2048`, on by default; `--only-streaming` skips the rest):
a real bench-random prefill of one prompt as one chunk in a sender actor pinned to CPU 0, the
K/V moving into a decode engine's pool in a receiver actor pinned to CPU 1, each with
single-threaded XLA. Exposed transfer time = time from prefill compute end (the last layer's
K/V written, stamped in the sender) to the K/V fully written in the decode pool (stamped in
the receiver; one clock, CLOCK_MONOTONIC, for both processes). Without streaming the sender
prefills in one program, then encodes and sends all layers; with streaming
(`StreamingSender`, `--layer-groups` groups) each group is encoded and sent from the
`on_layers` callback while the later groups compute, and the receiver writes it on arrival.
Also reported: prefill compute time of each mode (streaming's encode/send work shares the
sender's core) and of the layer-group programs with nothing sent (`grouped_compute_only`), hidden = 1 - exposed(streamed) / exposed(not streamed), and the stricter
hidden_end_to_end = 1 - (total(streamed) - compute(not streamed)) / exposed(not streamed),
which charges streaming for any slowdown of the prefill itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from models.presets import PRESETS  # noqa: E402
from raypd.engine import kv_codec, paged  # noqa: E402
from raypd.transfer import make_transport  # noqa: E402

TOKENS = (128, 512, 2048, 8192)
G = 16
BACKENDS = ("ray_object_store", "jax_transfer")


def median_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_pool(num_pages, dtype, seed=0):
    cfg = PRESETS["bench-random"]
    rng = np.random.default_rng(seed)
    shape = (cfg.num_kv_heads, num_pages + 1, G, cfg.head_dim)
    mk = lambda: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    return paged.KVCache(k=tuple(mk() for _ in range(cfg.num_layers)), v=tuple(mk() for _ in range(cfg.num_layers)))


@ray.remote(num_cpus=0)
class Sender:
    """Holds encoded payloads; sends one on request and reports how long send took."""

    def __init__(self, kind):
        sys.path.insert(0, str(ROOT))
        from raypd.transfer import make_transport

        self.transport = make_transport(kind) if kind != "raw" else None
        self.payloads = {}

    def load(self, name, enc):
        self.payloads[name] = enc
        return enc.num_bytes

    def send(self, name):
        t = time.perf_counter()
        if self.transport is None:  # raw ceiling: one ray.put of the same bytes
            enc = self.payloads[name]
            blob = np.empty(enc.num_bytes, np.uint8)
            t = time.perf_counter()
            return [ray.put(blob)], time.perf_counter() - t
        handle = self.transport.send(name, self.payloads[name])
        return handle, time.perf_counter() - t

    def release(self, handle):
        if self.transport is not None:
            self.transport.release(handle)


def bench_backend(kind, encs, repeats, resources=None):
    """-> {name: seconds} for send (in the actor) + recv (here) of each payload."""
    opts = {"resources": resources} if resources else {}
    sender = Sender.options(**opts).remote(kind)
    for name, enc in encs.items():
        ray.get(sender.load.remote(name, enc))
    receiver = make_transport(kind) if kind != "raw" else None
    out = {}
    for name in encs:
        def once():
            handle, send_s = ray.get(sender.send.remote(name))
            t = time.perf_counter()
            if receiver is None:
                ray.get(handle[0])
            else:
                enc = receiver.recv(handle, timeout_s=60)
                jax.block_until_ready([a for a in enc.arrays().values() if isinstance(a, jax.Array)])
                receiver.release(handle)
                ray.get(sender.release.remote(handle))
            once.total += send_s + time.perf_counter() - t
        times = []
        once.total = 0.0
        once()  # warm-up
        for _ in range(repeats):
            once.total = 0.0
            once()
            times.append(once.total)
        out[name] = float(np.median(times))
    ray.kill(sender)
    return out


def run(args):
    tokens = [t for t in TOKENS if t <= args.max_tokens]
    rows, encs = [], {}
    for n_tok in tokens:
        n = -(-n_tok // G)
        pages = list(range(1, n + 1))
        ids = jnp.asarray(pages, jnp.int32)
        row = {"tokens": n_tok, "pages": n}
        for dt_name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            pool = make_pool(n, dt)
            for comp in ("none", "int8"):
                if dt_name == "bfloat16" and comp == "int8":
                    continue
                enc = kv_codec.encode(pool, pages, n_tok, comp)
                key = f"{dt_name}" if comp == "none" else "int8"
                row[f"bytes_{key}"] = enc.num_bytes
                encs[(n_tok, key)] = enc
            if dt_name == "float32":
                row["gather_ms"] = 1e3 * median_s(lambda: jax.block_until_ready(paged.read_pages(pool, ids)), args.repeats)
                row["gather_quantize_ms"] = 1e3 * median_s(
                    lambda: jax.block_until_ready(kv_codec.gather_quantize(pool, ids)), args.repeats)
                row["encode_int8_ms"] = 1e3 * median_s(lambda: kv_codec.encode(pool, pages, n_tok, "int8"), args.repeats)
                enc8 = encs[(n_tok, "int8")]
                dst = {"c": make_pool(n, dt, seed=1)}

                def scatter():
                    dst["c"] = kv_codec.decode_into(dst["c"], pages, enc8)
                    jax.block_until_ready(dst["c"].k[-1])
                row["decode_int8_ms"] = 1e3 * median_s(scatter, args.repeats)
            del pool
        b = row["bytes_float32"]
        src = np.empty(b, np.uint8)
        src.fill(1)
        dst_buf = np.empty_like(src)
        row["memcpy_GBps"] = b / median_s(lambda: np.copyto(dst_buf, src), args.repeats) / 1e9
        row["ratio_int8_vs_f32"] = row["bytes_float32"] / row["bytes_int8"]
        row["ratio_int8_vs_bf16"] = row["bytes_bfloat16"] / row["bytes_int8"]
        rows.append(row)

    def transfers(label, resources=None):
        for kind in ("raw",) + BACKENDS:
            payloads = {f"{t}/{k}": encs[(t, k)] for t in tokens for k in ("float32", "bfloat16", "int8")}
            if kind == "raw":
                payloads = {f"{t}/{k}": v for f, v in payloads.items() for t, k in [f.split("/")] if k == "float32"}
            times = bench_backend(kind, payloads, args.repeats, resources)
            for row in rows:
                for k in ("float32", "bfloat16", "int8"):
                    name = f"{row['tokens']}/{k}"
                    if name in times:
                        s = times[name]
                        tag = "raw_put_get" if kind == "raw" else f"{kind}_{k}"
                        row[f"{label}_{tag}_ms"] = 1e3 * s
                        row[f"{label}_{tag}_GBps"] = encs[(row["tokens"], k)].num_bytes / s / 1e9

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    transfers("node")
    ray.shutdown()
    if not args.skip_cross_node:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1, resources={"far": 1})
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
        cluster.wait_for_nodes()
        transfers("cross", {"far": 0.01})
        ray.shutdown()
        cluster.shutdown()
    return rows


# ---------------------------------------------------------------- layer streaming

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _pin(core):
    """Pin this process to one CPU and single-threaded XLA (before jax starts its backend)."""
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = ONE_THREAD


def _stream_engine_config(num_tokens, layer_groups):
    from raypd.engine.runner import EngineConfig

    return EngineConfig(page_size=G, num_pages=-(-num_tokens // G) + 2, max_slots=1, max_seq_len=num_tokens,
                        prefill_buckets=(num_tokens,), max_prefill_segments=1, layer_groups=layer_groups)


@ray.remote(num_cpus=0)
class StreamReceiver:
    """A decode engine's pool behind a StreamingReceiver; stamps when a request's K/V is in."""

    def __init__(self, core, kind, num_tokens):
        _pin(core)
        import models
        from raypd.engine.decode import DecodeEngine
        from raypd.engine.runner import ModelRunner
        from raypd.transfer import StreamingReceiver, make_transport

        runner = ModelRunner(models.load("bench-random"), _stream_engine_config(num_tokens, 1))
        self.receiver = StreamingReceiver(DecodeEngine(runner), make_transport(kind), timeout_s=60)

    def on_part(self, part):
        if not self.receiver.on_part(part):
            return None
        r = self.receiver.decode.runner
        jax.block_until_ready((r.cache.k, r.cache.v))
        done = time.monotonic()
        self.receiver.abort(part.request_id)  # the measurement ends here: free the pages
        return done


@ray.remote(num_cpus=0)
class StreamSender:
    """A prefill engine; runs one prompt with or without layer streaming, stamping compute end."""

    def __init__(self, core, kind, num_tokens, layer_groups, receiver):
        _pin(core)
        import models
        from raypd.engine.runner import ModelRunner
        from raypd.transfer import make_transport

        self.runner = ModelRunner(models.load("bench-random"), _stream_engine_config(num_tokens, layer_groups))
        self.transport = make_transport(kind)
        self.receiver = receiver
        self.count = 0

    def run(self, prompt, streamed, compression):
        from raypd.engine.api import Request, SamplingParams
        from raypd.engine.prefill import PrefillEngine
        from raypd.transfer import StreamingSender, send_prefill
        from raypd.transfer.streaming import LayerPart

        self.count += 1
        rid, L, r = f"r{self.count}", self.runner.cfg.num_layers, self.runner
        refs, stamps = [], {}
        prefill = PrefillEngine(r)
        sender = StreamingSender(prefill, self.transport, lambda part: refs.append(self.receiver.on_part.remote(part)),
                                 compression)
        req = Request(rid, prompt, SamplingParams(max_tokens=1))
        t0 = time.monotonic()
        if streamed == "compute_only":  # the same layer-group programs, nothing sent: their own cost
            prefill.add(req)
            prefill.step(on_layers=lambda lo, hi, pieces: None)
            jax.block_until_ready((r.cache.k, r.cache.v))
            elapsed = time.monotonic() - t0
            prefill.release(rid)
            return dict(compute_s=elapsed, exposed_s=0.0, total_s=elapsed, num_parts=0)
        if streamed:
            on_layers = sender._on_layers

            def timed(lo, hi, pieces):
                if hi == L:
                    jax.block_until_ready((r.cache.k[hi - 1], r.cache.v[hi - 1]))
                    stamps["end"] = time.monotonic()
                on_layers(lo, hi, pieces)
            sender._on_layers = timed
            sender.add(req)
            sender.step()
        else:
            prefill.add(req)
            (po,) = prefill.step()
            jax.block_until_ready((r.cache.k, r.cache.v))
            stamps["end"] = time.monotonic()
            handle = send_prefill(prefill, po, self.transport, compression)
            sender._sent[rid] = [handle]
            refs.append(self.receiver.on_part.remote(LayerPart(rid, 0, L, L, po.prompt_len, handle)))
        done = max(t for t in ray.get(refs) if t is not None)
        sender.release(rid)
        return dict(compute_s=stamps["end"] - t0, exposed_s=done - stamps["end"], total_s=done - t0,
                    num_parts=len(refs))


def bench_streaming(args):
    """-> rows of exposed transfer time with and without layer streaming, per backend and compression."""
    n_tok = args.streaming_tokens
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 32000, n_tok)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ONE_THREAD}})
    rows = []
    for kind in args.streaming_backends.split(","):
        receiver = StreamReceiver.remote(1, kind, n_tok)
        sender = StreamSender.remote(0, kind, n_tok, args.layer_groups, receiver)
        modes = ("compute_only", False, True)  # interleaved, so load from elsewhere hits all alike
        for comp in ("none", "int8"):
            row = dict(tokens=n_tok, backend=kind, compression=comp, layer_groups=args.layer_groups)
            for mode in modes:
                ray.get(sender.run.remote(prompt, mode, comp))  # warm-up: compiles
            runs = {m: [] for m in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    runs[mode].append(ray.get(sender.run.remote(prompt, mode, comp)))
            row["grouped_compute_only_ms"] = 1e3 * float(np.median([x["compute_s"] for x in runs["compute_only"]]))
            for mode, tag in ((False, "plain"), (True, "streamed")):
                for key in ("compute_s", "exposed_s", "total_s"):
                    row[f"{tag}_{key[:-2]}_ms"] = 1e3 * float(np.median([x[key] for x in runs[mode]]))
                row[f"{tag}_exposed_runs_ms"] = [round(1e3 * x["exposed_s"], 2) for x in runs[mode]]
            row["hidden_fraction"] = 1 - row["streamed_exposed_ms"] / row["plain_exposed_ms"]
            # Stricter: charge streaming for any prefill slowdown its sender-side work causes.
            row["hidden_fraction_end_to_end"] = 1 - ((row["streamed_total_ms"] - row["plain_compute_ms"])
                                                     / row["plain_exposed_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
        ray.kill(sender)
        ray.kill(receiver)
    ray.shutdown()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="-", help="write results as JSON (to a file, or - for stdout)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cross-node", action="store_true")
    ap.add_argument("--streaming-tokens", type=int, default=2048, help="0 skips the streaming measurement")
    ap.add_argument("--streaming-backends", default="ray_object_store,jax_transfer")
    ap.add_argument("--layer-groups", type=int, default=12)
    ap.add_argument("--only-streaming", action="store_true")
    args = ap.parse_args()
    rows = [] if args.only_streaming else run(args)
    if args.streaming_tokens:
        rows.append({"streaming": bench_streaming(args)})
    if args.json:
        text = json.dumps(rows, indent=1)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    for row in rows:
        if "streaming" in row:
            for r in row["streaming"]:
                print(f"--- streaming {r['tokens']} tokens, {r['backend']}, {r['compression']}")
                for k, v in r.items():
                    print(f"  {k:42s} {v}")
            continue
        print(f"--- {row['tokens']} tokens ({row['pages']} pages)")
        for k, v in row.items():
            if k not in ("tokens", "pages"):
                print(f"  {k:42s} {v:,.3f}" if isinstance(v, float) else f"  {k:42s} {v:,}")


if __name__ == "__main__":
    main()
