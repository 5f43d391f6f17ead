"""K/V quality through the transfer path on the trained default model: INT8 on vs off.

    python scripts/kv_quality.py [--json [PATH|-]] [--windows 0] [--prompts 50] [--new-tokens 128]
                                 [--dtype float32]

Text: the held-out modules of models/stdlib_corpus.py (never trained on), tokenized as in
training, cut into back-to-back windows of 256 tokens (the model's context).

1. Next-token NLL with the context's K/V passed through the transfer path. Per window: prefill
   tokens [0, 128) in a prefill engine; move their K/V with `send_prefill` -> inproc transport
   -> `recv` -> `write_payload` into a second engine's pool, with kv_compression "none"
   (bit-exact: the reference) or "int8"; then one teacher-forced forward over tokens
   [128, 255) at positions 128..254 whose context is the received pages only, scoring tokens
   129..255 (127 per window). Reported: mean NLL (nats/token) of each mode,
   int8 / none - 1 (target <= 1%), and the same tokens scored by a plain full forward (no
   pages, no transfer), which "none" must match.
2. Greedy agreement: `--prompts` prompts (the first 128 tokens of windows spread evenly over
   the held-out stream), `--new-tokens` tokens each (ignore_eos), disaggregated: prefill engine
   -> transfer (`send_prefill` / `recv_into`) -> decode engine, once with "none" and once with
   "int8". Per prompt: the fraction of positions where the two agree, whether all agree, and
   where they first differ. "none" is also checked against the colocated engine.
"""

from __future__ import annotations

import argparse
import functools
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

import models  # noqa: E402
from models import llama, stdlib_corpus as corpus  # noqa: E402
from raypd.engine import paged  # noqa: E402
from raypd.engine.api import Request, SamplingParams  # noqa: E402
from raypd.engine.colocated import ColocatedEngine  # noqa: E402
from raypd.engine.decode import DecodeEngine  # noqa: E402
from raypd.engine.prefill import PrefillEngine  # noqa: E402
from raypd.engine.runner import EngineConfig, ModelRunner, bucket  # noqa: E402
from raypd.transfer import make_transport, recv_into, send_prefill  # noqa: E402
from raypd.transfer.engines import write_payload  # noqa: E402

WINDOW = 256
CONTEXT = 128
MODES = ("none", "int8")


def heldout_windows(model) -> np.ndarray:
    """[W, 256] back-to-back windows of the held-out token stream."""
    _, files = corpus.split_files()
    stream = corpus.token_stream(corpus.read_texts(files), model.tokenizer.encode, model.config.eos_token_ids[0])
    w = len(stream) // WINDOW
    return stream[: w * WINDOW].reshape(w, WINDOW)


@functools.partial(jax.jit, static_argnums=3)
def chunk_logits(params, cache, b, cfg):
    """Teacher-forced logits of one chunk over the context pages. -> [1, T, V] float32.
    The chunk's own K/V go to the null page (write_pages 0) of a copy of the pool."""
    x, _, _ = paged.run_layers(params.layers, cache.k, cache.v, llama.embed(params, b.tokens), b, cfg)
    return llama.unembed(params, x, cfg)


def score(runner: ModelRunner, pages: list[int], window: np.ndarray) -> tuple[float, int]:
    """NLL (sum, count) of window[CONTEXT+1:] given the K/V of window[:CONTEXT] in `pages`."""
    T = WINDOW - CONTEXT - 1  # inputs 128..254 predict 129..255
    Pc = bucket(len(pages), runner.page_buckets)
    batch, _ = runner.empty_batch(1, bucket(T, runner.prefill_buckets), 1, Pc)
    batch["tokens"][0, :T] = window[CONTEXT:WINDOW - 1]
    batch["positions"][0, :T] = np.arange(CONTEXT, WINDOW - 1)
    batch["segments"][0, :T] = 0
    batch["ctx_pages"][0, : len(pages)] = pages
    batch["ctx_lens"][0] = CONTEXT
    b = paged.Batch(**{k: jnp.asarray(v) for k, v in batch.items()})
    logits = np.asarray(chunk_logits(runner.params, runner.cache, b, runner.cfg)[0, :T], np.float64)
    m = logits.max(-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    targets = window[CONTEXT + 1:]
    return float((logz - logits[np.arange(T), targets]).sum()), T


def reference_nll(model, windows: np.ndarray) -> float:
    """The same tokens scored by a plain full forward (no pages, no transfer): checks `score`."""
    total, count = 0.0, 0
    for w in windows:
        logits = np.asarray(model.logits(w), np.float64)[CONTEXT:WINDOW - 1]  # predict 129..255
        m = logits.max(-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
        total += float((logz - logits[np.arange(len(logits)), w[CONTEXT + 1:]]).sum())
        count += len(logits)
    return total / count


def engine_config(num_pages: int) -> EngineConfig:
    return EngineConfig(page_size=16, num_pages=num_pages, max_slots=64, max_seq_len=WINDOW,
                        prefill_buckets=(128, 1024), max_prefill_segments=8)


def nll(model, windows: np.ndarray, mode: str) -> dict:
    pre, dec = ModelRunner(model, engine_config(64 * 8 + 1)), ModelRunner(model, engine_config(64))
    prefill, decode = PrefillEngine(pre), DecodeEngine(dec)
    transport = make_transport("inproc")
    total, count, raw_pages, num_bytes = 0.0, 0, 0, 0
    for start in range(0, len(windows), 64):
        group = windows[start:start + 64]
        reqs = [Request(f"w{start + i}", [int(t) for t in w[:CONTEXT]], SamplingParams(max_tokens=1))
                for i, w in enumerate(group)]
        outs = {o.request_id: o for o in prefill.prefill(reqs)}
        for i, w in enumerate(group):
            po = outs[f"w{start + i}"]
            handle = send_prefill(prefill, po, transport, mode)
            prefill.release(po.request_id)
            raw_pages += handle.num_raw_pages
            num_bytes += handle.num_bytes
            pages = write_payload(decode, transport.recv(handle, 10))
            transport.release(handle)
            s, n = score(dec, pages, w)
            dec.allocator.free(pages)
            total, count = total + s, count + n
    return dict(nll=total / count, tokens_scored=count, raw_pages=raw_pages, bytes=num_bytes)


def greedy(model, prompts: list[list[int]], new_tokens: int, mode: str | None) -> list[list[int]]:
    """mode None: the colocated engine (no transfer); else disaggregated with that compression."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    reqs = [Request(f"p{i}", p, params) for i, p in enumerate(prompts)]
    out = {r.request_id: [] for r in reqs}
    if mode is None:
        eng = ColocatedEngine(ModelRunner(model, engine_config(1100)))
        for r in reqs:
            eng.add_request(r)
        while eng.num_unfinished:
            for o in eng.step():
                out[o.request_id].append(o.token_id)
        return [out[r.request_id] for r in reqs]
    prefill = PrefillEngine(ModelRunner(model, engine_config(1100)))
    decode = DecodeEngine(ModelRunner(model, engine_config(1100)))
    transport = make_transport("inproc")
    by_id = {r.request_id: r for r in reqs}
    for po in prefill.prefill(reqs):
        handle = send_prefill(prefill, po, transport, mode)
        prefill.release(po.request_id)
        out[po.request_id].append(recv_into(decode, by_id[po.request_id], po, handle, transport).token_id)
        transport.release(handle)
    while decode.num_running:
        for o in decode.decode_step():
            out[o.request_id].append(o.token_id)
    return [out[r.request_id] for r in reqs]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    match = [np.asarray(x) == np.asarray(y) for x, y in zip(a, b)]
    first = [int(np.argmin(m)) if not m.all() else len(m) for m in match]
    return dict(mean_token_agreement=float(np.mean([m.mean() for m in match])),
                identical_outputs=int(sum(m.all() for m in match)), num_prompts=len(match),
                mean_first_divergence=float(np.mean(first)), min_first_divergence=int(min(first)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="-", help="write results as JSON (to a file, or - for stdout)")
    ap.add_argument("--windows", type=int, default=0, help="NLL windows (0 = all held-out windows)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="model / K/V dtype (default: the checkpoint's)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = models.load(dtype=args.dtype)
    windows = heldout_windows(model)
    res = dict(model=model.name, dtype=model.config.dtype, heldout_windows=len(windows),
               command="python scripts/kv_quality.py " + " ".join(sys.argv[1:]))
    nll_windows = windows if not args.windows else windows[: args.windows]
    for mode in MODES:
        res[f"nll_{mode}"] = nll(model, nll_windows, mode)
    res["nll_rel_increase"] = res["nll_int8"]["nll"] / res["nll_none"]["nll"] - 1
    res["nll_full_forward_reference"] = reference_nll(model, nll_windows)
    picks = np.linspace(0, len(windows) - 1, args.prompts).round().astype(int)
    prompts = [[int(t) for t in windows[i, :CONTEXT]] for i in picks]
    outs = {mode: greedy(model, prompts, args.new_tokens, mode) for mode in (None,) + MODES}
    res["greedy_new_tokens"] = args.new_tokens
    res["greedy_none_equals_colocated"] = outs["none"] == outs[None]
    res["greedy_int8_vs_none"] = agreement(outs["int8"], outs["none"])
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        text = json.dumps(res, indent=1)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    if args.json != "-":
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
