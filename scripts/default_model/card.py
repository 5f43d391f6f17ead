"""The model card (README.md of an exported model folder), written from its training.json record."""

from __future__ import annotations

import json

from models import quality_gates as qg


def _mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def model_card(r: dict) -> str:
    c, s, corp, g, t = r["config"], r["spec"], r["corpus"], r["gates"], r["trained"]
    history = f"\nSchedule of the run: {r['history']}.\n" if r.get("history") else ""
    ft = r.get("finetune")
    if ft:
        f = ft["settings"]
        history += (f"\nThen {t['finetune_steps']} steps of sequence-level unlikelihood fine-tuning against "
                    f"greedy loops (`models/unlikelihood.py`, from `{ft['base_checkpoint']}`): each step "
                    f"{f['mle_windows']} MLE windows of {s['seq_lens'][-1]} tokens plus {f['alpha']} x the "
                    f"unlikelihood of every token of a repeated {f['ngram']}-gram in {f['ul_rows']} greedy "
                    f"continuations ({qg.GREEDY_NEW_TOKENS} tokens) of training-text prefixes (8-{f['prefix']} "
                    f"tokens, half at file openings); AdamW, peak lr {f['lr']}, cosine to 10%. The gate's "
                    f"prompts were not used. Reproduce: `--run-dir RUN_UL --unlikelihood-steps {f['steps']} "
                    f"--ul-lr {f['lr']} --ul-alpha {f['alpha']} --ul-ngram {f['ngram']} "
                    f"--ul-mle-windows {f['mle_windows']}`, then `--run-dir RUN_UL --export DIR`.\n")
    passed = g["passed"]
    phases = ", ".join(f"{n} tokens for {f:.0%}" for n, f in zip(s["seq_lens"], s["phase_fractions"]))
    buckets = ", ".join(f"{b:.3f}" for b in g["bucket_losses"])
    conts = "\n".join(f"Prompt `{json.dumps(p)}` (most repeated line {g['max_line_repeats'][p]}x, "
                      f"{qg.LOOP_NGRAM}-token run {g['max_ngram_repeats'][p]}x):\n\n"
                      f"```python\n{p}{text}\n```\n" for p, text in g["continuations"].items())
    loss = t["last_train_loss"]
    return f"""# Model card: {r['model']}

A {r['num_params']:,}-parameter Llama-architecture model trained from scratch by
`scripts/train_default_model.py` on the Python {corp['python_version']} standard library's own
source. It writes recognizable Python; it is raypd's demo and test model, not an assistant.
Loads like any Hugging Face Llama checkpoint: `models.load("{r['model']}")` or
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`.

## License and data provenance

Weights: Apache-2.0, like raypd. Training data: the `*.py` files of CPython's standard library
as installed at `{corp['stdlib_dir']}` (Python {corp['python_version']}), copyright the Python
Software Foundation and contributors, under the PSF License Agreement (PSF-2.0), a permissive
license; the model can reproduce fragments of that source. No other data; nothing downloaded.
Excluded paths: any through {', '.join(corp['excluded_dirs'])}.

## Shape

{c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_heads']} query heads and
{c['num_kv_heads']} kv heads of dim {c['head_dim']}, SwiGLU ffn {c['intermediate_size']}, vocab
{c['vocab_size']} (byte-level BPE), tied embeddings, RoPE theta {c['rope_theta']}, **context
{c['max_position_embeddings']}**. Stored as float16 safetensors; trained in float32.
EOS is `<|endoftext|>` (id {r['eos_token_id']}), placed before every file.

## Held-out set

Never trained on (tokenizer included): every file whose top-level module is one of
{', '.join(corp['heldout_modules'])} ({corp['heldout_files']} files, {corp['heldout_bytes']:,} bytes,
{corp['heldout_tokens']:,} tokens). Training split: {corp['train_files']} files,
{corp['train_bytes']:,} bytes, {corp['train_tokens']:,} tokens.

## Recipe

Tokenizer: {corp['tokenizer']}. Model size preset `{s['size']}` (models/trainer.py). AdamW
(b1 0.9, b2 0.95, weight decay {s['weight_decay']} on matrices), peak lr {s['peak_lr']},
{s['warmup_steps']} warmup steps then cosine decay to 10% over {s['num_steps']} steps, grad clip
1.0, {s['tokens_per_step']} tokens per step; window length grows by phase: {phases}.
Windows at offsets drawn by `numpy.random.default_rng([{s['seed']}, step])`.
Exported at step {t['step']} of {s['num_steps']}: {t['tokens_seen']:,} tokens seen
({t['tokens_seen'] / corp['train_tokens']:.2f} epochs), {t['train_s'] / 3600:.2f} h of training
wall time, {t['cpu_s'] / 3600:.2f} h of CPU time; last logged training loss
{'n/a' if loss is None else f'{loss:.3f}'} nats/token. Exported by the script at git commit `{r['git_commit']}`.
{history}
## Quality gates (checked on these files by tests/test_model_gates.py)

| gate | result | |
|---|---|---|
| held-out bits/byte on {len(r['gate_window_ids'])} windows of {c['max_position_embeddings']} tokens, at most {g['bpb_limit']:.3f} (min of {qg.MAX_HELDOUT_BPB} and {1 - qg.MIN_GAIN_OVER_ZLIB:.0%} of zlib's {g['zlib_bpb']:.3f} on the held-out text) | {g['heldout_bpb']:.3f} | {_mark(passed['heldout_bpb'])} |
| greedy continuations of {len(g['continuations'])} prompts, {qg.GREEDY_NEW_TOKENS} tokens: no line, and no run of {qg.LOOP_NGRAM} tokens, more than {qg.MAX_LINE_REPEATS}x | worst line {max(g['max_line_repeats'].values())}x, run {max(g['max_ngram_repeats'].values())}x | {_mark(passed['no_loops'])} |
| mean loss of each {g['position_bucket']}-position bucket past the first no worse than the first | {buckets} | {_mark(passed['long_context'])} |

Whole held-out set, context restarting every {r['heldout_context']} tokens:
**{r['heldout_bpb']:.3f} bits/byte** (zlib level 9: {r['baseline_zlib_bpb']:.3f}).

## Greedy continuations ({qg.GREEDY_NEW_TOKENS} tokens, KV cache)

{conts}
## Reproduce

```
nice -n 19 .venv/bin/python scripts/train_default_model.py --threads 2 --size {s['size']} \\
  --steps {s['num_steps']} --tokens-per-step {s['tokens_per_step']} --warmup-steps {s['warmup_steps']} \\
  --peak-lr {s['peak_lr']} --seq-lens {','.join(map(str, s['seq_lens']))} \\
  --phase-fractions {','.join(map(str, s['phase_fractions']))}    # resumes from its checkpoints
.venv/bin/python scripts/train_default_model.py --export models/data/{r['model']}
```
"""
