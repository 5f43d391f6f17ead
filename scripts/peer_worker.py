"""One engine's measurements for scripts/bench_peers.py, in a process of its own.

Standalone on purpose: it runs with each peer's own interpreter (the virtualenvs of
scripts/peers_install.py), so it imports neither raypd nor JAX; raypd's own engines plug into
`measure` from bench_peers.py. An engine is one function, `generate(prompts, n) -> tokens`:
greedy, exactly `n` new tokens per prompt (end-of-sequence ignored), prompts given as token ids.

The workload (`measure`), the same call sequence for every engine, so every engine sees the
same prompts (drawn fresh for each call from one seeded stream: no prefix cache can help):
  e2e      `e2e_prompts` prompts of `e2e_prompt_len` tokens, `e2e_tokens` new tokens each, in
           one call; a warm-up call, then the best of `repeats`. The tokens of the first timed
           call are kept, to check that the engines agree.
  prefill  one prompt of n tokens, 1 new token: n / best time.
  decode   B prompts of `prompt_len` tokens: (B * steps) / (best time of steps + 1 new tokens
           - best time of 1 new token), the prefill and first token taken out.

    <peer venv>/bin/python scripts/peer_worker.py ENGINE SPEC.json OUT.json
ENGINE: hf | vllm | llamacpp. SPEC.json: the workload (bench_peers.workload_spec) with
`model_dir` (HF folder), `gguf` (llama.cpp) and `threads`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _check(tokens, num_prompts: int, n: int, who: str) -> None:
    if len(tokens) != num_prompts or any(len(t) != n for t in tokens):
        lens = sorted({len(t) for t in tokens})
        raise RuntimeError(f"{who}: asked for {num_prompts} x {n} tokens, got {len(tokens)} prompts of {lens}")


def measure(generate, spec: dict, log=print) -> dict:
    """The workload of the module doc over `generate`. -> {"e2e_tok_s", "e2e_tokens",
    "prefill_tok_s": {n: .}, "decode_tok_s": {B: .}}."""
    rng = np.random.RandomState(spec["seed"])
    vocab, repeats = spec["vocab_size"], spec["repeats"]

    def prompts(count: int, n: int) -> list[list[int]]:
        return rng.randint(3, vocab, (count, n)).tolist()

    def best(count: int, n_prompt: int, n_new: int) -> float:
        times = []
        for _ in range(repeats):
            s, toks = _timed(lambda: generate(prompts(count, n_prompt), n_new))
            _check(toks, count, n_new, "generate")
            times.append(s)
        return min(times)

    out = {"prefill_tok_s": {}, "decode_tok_s": {}}
    E, EL, ET = spec["e2e_prompts"], spec["e2e_prompt_len"], spec["e2e_tokens"]
    generate(prompts(E, EL), ET)  # warm-up
    times = []
    for r in range(repeats):
        s, toks = _timed(lambda: generate(prompts(E, EL), ET))
        _check(toks, E, ET, "e2e")
        if r == 0:
            out["e2e_tokens"] = [list(map(int, t)) for t in toks]
        times.append(s)
    out["e2e_tok_s"] = E * ET / min(times)
    log(f"  e2e {out['e2e_tok_s']:.0f} tok/s")
    for n in spec["prefill_lens"]:
        generate(prompts(1, n), 1)  # warm-up of this shape
        out["prefill_tok_s"][str(n)] = n / best(1, n, 1)
        log(f"  prefill {n}: {out['prefill_tok_s'][str(n)]:.0f} tok/s")
    P, steps = spec["prompt_len"], spec["decode_steps"]
    for B in spec["batches"]:
        generate(prompts(B, P), steps + 1)  # warm-up of every shape this range touches
        generate(prompts(B, P), 1)
        t_first, t_all = best(B, P, 1), best(B, P, steps + 1)
        out["decode_tok_s"][str(B)] = B * steps / max(t_all - t_first, 1e-9)
        log(f"  decode B={B}: {out['decode_tok_s'][str(B)]:.0f} tok/s")
    return out


# ---------------------------------------------------------------- HF transformers


def hf_engine(spec: dict):
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()

    def generate(prompts, n):
        x = torch.tensor(prompts)  # every prompt of a call has the same length: no padding
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        return y[:, x.shape[1]:].tolist()

    return generate, {"transformers": transformers.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------- vLLM (CPU build)


def vllm_engine(spec: dict):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{spec['threads'] - 1}")  # bench_peers sets both
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(max(spec["prefill_lens"]) + 1, spec["e2e_prompt_len"] + spec["e2e_tokens"],
                  spec["prompt_len"] + spec["decode_steps"] + 1)
    llm = LLM(model=spec["model_dir"], skip_tokenizer_init=True, dtype="float32", seed=0,
              max_model_len=max_len + 16, max_num_seqs=max(max(spec["batches"]), spec["e2e_prompts"]),
              enable_prefix_caching=False)

    def generate(prompts, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return generate, {"vllm": vllm.__version__}


# ---------------------------------------------------------------- llama.cpp


class LlamaCppBatched:
    """Greedy generation of many sequences at once through llama.cpp's batch API (one
    `llama_decode` per step for all sequences, as llama.cpp's own batched example); the
    high-level `Llama` class runs one sequence at a time."""

    def __init__(self, gguf: str, n_ctx: int, n_seq_max: int, n_batch: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
        self.model = load(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        p.n_threads = p.n_threads_batch = threads
        if hasattr(p, "kv_unified"):
            p.kv_unified = True  # one cache shared by the sequences (n_ctx is the total)
        init = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        self.ctx = init(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self.n_batch, self.n_seq_max = n_batch, n_seq_max
        self.batch = L.llama_batch_init(n_batch, 0, n_seq_max)

    def _clear(self) -> None:
        L = self.L
        if hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        elif hasattr(L, "llama_kv_self_clear"):
            L.llama_kv_self_clear(self.ctx)
        else:
            L.llama_kv_cache_clear(self.ctx)

    def _decode(self, items) -> list[int]:
        """items: (token, pos, seq, wants_logits), at most n_batch. -> argmax of each wanted row."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (KV cache too small for the batch?)")
        out = []
        for i, (_, _, _, want) in enumerate(items):
            if want:
                row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def generate(self, prompts, n):
        if len(prompts) > self.n_seq_max:
            raise ValueError(f"at most {self.n_seq_max} prompts per call, got {len(prompts)}")
        self._clear()
        items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        last = []
        for k in range(0, len(items), self.n_batch):
            last += self._decode(items[k:k + self.n_batch])
        out = [[t] for t in last]
        for step in range(1, n):
            last = self._decode([(o[-1], len(p) + step - 1, s, True)
                                 for s, (p, o) in enumerate(zip(prompts, out))])
            for o, t in zip(out, last):
                o.append(t)
        return out


def llamacpp_engine(spec: dict):
    import llama_cpp

    S = max(max(spec["batches"]), spec["e2e_prompts"])
    n_ctx = max(max(spec["prefill_lens"]) + 1, S * (max(spec["prompt_len"], spec["e2e_prompt_len"])
                                                   + max(spec["decode_steps"], spec["e2e_tokens"]) + 1))
    eng = LlamaCppBatched(spec["gguf"], n_ctx=n_ctx + 64, n_seq_max=S, n_batch=512, threads=spec["threads"])
    return eng.generate, {"llama_cpp_python": llama_cpp.__version__}


ENGINES = {"hf": hf_engine, "vllm": vllm_engine, "llamacpp": llamacpp_engine}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ENGINES:
        raise SystemExit(f"usage: peer_worker.py {{{'|'.join(ENGINES)}}} SPEC.json OUT.json")
    engine, spec_path, out_path = argv
    spec = json.loads(open(spec_path).read())
    log = lambda msg: print(f"[{engine}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    generate, versions = ENGINES[engine](spec)
    log(f"ready in {time.perf_counter() - start:.0f} s ({versions})")
    res = measure(generate, spec, log)
    res["versions"] = versions
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
