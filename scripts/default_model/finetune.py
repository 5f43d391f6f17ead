"""`--unlikelihood-steps N --base-run-dir DIR` of scripts/train_default_model.py: fine-tune a
finished run against greedy loops (models/unlikelihood.py) into a new run folder.

Lifecycle:
  1. First start: the new run folder gets spec.json (the base run's RunSpec, so --export reads
     it unchanged; its data folder; a "finetune" record of this phase's settings and the base
     checkpoint; a "history" line for the model card). Later starts read it back and resume from
     the folder's latest checkpoint.
  2. Step s (1-based): a fresh AdamW (same structure as the base run's, so checkpoints restore
     with the base spec) with `lr` peak, WARMUP steps, cosine decay to 10% over N steps.
     MLE windows and greedy prefixes are drawn by `numpy.random.default_rng([seed, 1_000_000 + s])`
     from the training stream only: half the prefixes start a file (just after an EOS), half
     anywhere; prefix lengths are uniform in [8, PREFIX].
  3. Every --eval-every-s and at the end, metrics.jsonl gets held-out bits per byte and the loop
     rate of greedy continuations of held-out file openings (never the gate's prompts).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from models import dense_decode, quality_gates as qg, trainer, unlikelihood
from models.llama import init_params
from scripts.default_model import run

PREFIX = 32  # longest greedy prefix (tokens)
UL_ROWS = 16  # greedy continuations per step
WARMUP = 10
LOOP_PROBE_ROWS = 32


def file_starts(stream: np.ndarray, eos_id: int, min_len: int) -> np.ndarray:
    """Offsets just after every EOS that leave at least min_len tokens."""
    starts = np.flatnonzero(stream == eos_id) + 1
    return starts[starts + min_len < len(stream)]


def prefixes(stream: np.ndarray, starts_pool: np.ndarray, rng: np.random.Generator, rows: int) -> list[list[int]]:
    """`rows` prefixes: the first half at file openings, the rest anywhere; lengths in [8, PREFIX]."""
    lens = rng.integers(8, PREFIX + 1, size=rows)
    at = np.concatenate([rng.choice(starts_pool, size=rows // 2),
                         rng.integers(0, len(stream) - PREFIX - 1, size=rows - rows // 2)])
    return [stream[a: a + n].tolist() for a, n in zip(at, lens)]


def ul_batch(prompts: list[list[int]], conts: list[list[int]], pad_id: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows prompt + continuation, right-padded to PREFIX + len(continuation); the repeat mask;
    and how many tokens it marks."""
    S = PREFIX + len(conts[0])
    seqs = np.full((len(prompts), S), pad_id, np.int32)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        seqs[i, : len(p) + len(c)] = p + c
    starts = np.asarray([len(p) for p in prompts])
    mask = unlikelihood.repeat_mask(seqs, starts, starts + len(conts[0]), n)
    return seqs, mask, int(mask.sum())


def loop_rate(params, cfg, heldout: np.ndarray, eos_id: int, decode) -> float:
    """Share of LOOP_PROBE_ROWS greedy continuations of held-out file openings that break the
    gate's rule (a line or an LOOP_NGRAM-token run more than MAX_LINE_REPEATS times)."""
    pool = file_starts(heldout, eos_id, PREFIX + 1)
    at = pool[np.linspace(0, len(pool) - 1, LOOP_PROBE_ROWS).astype(int)]
    prompts = [heldout[a: a + 16].tolist() for a in at]
    conts = dense_decode.greedy(params, cfg, prompts, qg.GREEDY_NEW_TOKENS, eos_id)
    bad = [max(qg.max_line_repeats(decode(p + c)), qg.max_ngram_repeats(c)) > qg.MAX_LINE_REPEATS
           for p, c in zip(prompts, conts)]
    return float(np.mean(bad))


def finetune(base_run_dir: Path, run_dir: Path, steps: int, *, lr: float, alpha: float, ngram: int,
             mle_windows: int, stop: dict, eval_every_s: float, log_every: int, seed: int = 0) -> None:
    from tokenizers import Tokenizer

    if steps < 1 or lr <= 0 or alpha < 0 or ngram < 1 or mle_windows < 1:
        raise ValueError(f"need steps >= 1 (got {steps}), lr > 0 ({lr}), alpha >= 0 ({alpha}), "
                         f"ngram >= 1 ({ngram}), mle_windows >= 1 ({mle_windows})")
    spec_path = run_dir / "spec.json"
    settings = {"steps": steps, "lr": lr, "alpha": alpha, "ngram": ngram, "mle_windows": mle_windows,
                "ul_rows": UL_ROWS, "prefix": PREFIX, "seed": seed}
    if spec_path.exists():
        saved = json.loads(spec_path.read_text())
        if saved["finetune"]["settings"] != settings:
            raise ValueError(f"{spec_path} holds {saved['finetune']['settings']}, this start asks for "
                             f"{settings}; use another --run-dir")
        base_ckpt = Path(saved["finetune"]["base_checkpoint"])
    else:
        base = json.loads((base_run_dir / "spec.json").read_text())
        ckpts = trainer.checkpoint_paths(base_run_dir)
        if not ckpts:
            raise FileNotFoundError(f"{base_run_dir}: no checkpoint to fine-tune")
        base_ckpt = ckpts[-1]
        history = ((base.get("history") + "; then ") if base.get("history") else "") + (
            f"{steps} steps of sequence-level unlikelihood fine-tuning against greedy loops "
            f"(models/unlikelihood.py: {mle_windows} MLE windows of {max(base['spec']['seq_lens'])} tokens + "
            f"{alpha} x unlikelihood of repeated {ngram}-grams in {UL_ROWS} greedy continuations of "
            f"training-text prefixes per step, lr {lr} cosine)")
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({**base, "history": history, "finetune": {
            "settings": settings, "base_checkpoint": str(base_ckpt)}}, indent=1) + "\n")
    spec, info = run.prepare(run_dir, Path(json.loads(spec_path.read_text())["data_dir"]), {})
    data_dir = Path(json.loads(spec_path.read_text())["data_dir"])
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    byte_lens = qg.token_byte_lengths(tok, spec.vocab_size)
    train_stream, heldout = np.load(data_dir / "train_stream.npy"), np.load(data_dir / "heldout_stream.npy")
    eos = info["eos_token_id"]
    cfg = trainer.model_config(spec, eos)
    # the base run's optimizer structure (its checkpoints restore onto it), this phase's schedule
    opt = trainer.make_optimizer(dataclasses.replace(spec, num_steps=steps, peak_lr=lr,
                                                     warmup_steps=min(WARMUP, steps - 1)))
    params = init_params(cfg, seed=spec.seed)
    ckpts = trainer.checkpoint_paths(run_dir)
    if ckpts:
        params, opt_state, meta = trainer.restore_checkpoint(ckpts[-1], params, opt.init(params))
        print(f"resumed from {ckpts[-1]}", flush=True)
    else:
        params, _, meta = trainer.restore_checkpoint(base_ckpt, params, opt.init(params))
        opt_state = opt.init(params)
        meta = {**meta, "base_step": meta["step"], "step": 0}
        print(f"fine-tuning {base_ckpt} (step {meta['base_step']})", flush=True)
    pool = file_starts(train_stream, eos, PREFIX + 1)
    T = spec.max_seq_len
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def evaluate(step: int) -> None:
        bpb = run.quick_bpb(params, cfg, run.eval_windows(heldout, T, run.EVAL_TOKENS), byte_lens)
        rate = loop_rate(params, cfg, heldout, eos, decode)
        run.log_metrics(run_dir, {"step": step, "heldout_bpb": round(bpb, 4), "loop_rate": rate, "time": time.time()})
        print(f"step {step} eval: held-out {bpb:.3f} bits/byte, loop rate {rate:.2f}", flush=True)

    step, logs = meta["step"], []
    if step == 0:
        evaluate(0)
    last_eval = time.time()
    while step < steps and not stop["requested"]:
        t0, c0 = time.time(), time.process_time()
        rng = np.random.default_rng([seed, 1_000_000 + step + 1])
        at = rng.integers(0, len(train_stream) - T - 1, size=mle_windows)
        mle_batch = np.stack([train_stream[a: a + T + 1] for a in at])
        prompts = prefixes(train_stream, pool, rng, UL_ROWS)
        conts = dense_decode.greedy(params, cfg, prompts, qg.GREEDY_NEW_TOKENS, eos)
        seqs, mask, marked = ul_batch(prompts, conts, eos, ngram)
        params, opt_state, mle, ul = unlikelihood.train_step(
            params, opt_state, jnp.asarray(mle_batch), jnp.asarray(seqs), jnp.asarray(mask),
            jnp.float32(alpha), cfg, opt)
        mle, ul = float(mle), float(ul)  # waits for the step, so the time below is its own
        step += 1
        meta["train_s"] += time.time() - t0
        meta["cpu_s"] = meta.get("cpu_s", 0.0) + time.process_time() - c0
        meta["tokens_seen"] += int(mle_batch.size - len(mle_batch))
        logs.append((mle, ul, marked / mask.size))
        if step % log_every == 0 or step == steps:
            m = np.mean(logs, axis=0)
            run.log_metrics(run_dir, {"step": step, "loss": round(float(m[0]), 4), "ul": round(float(m[1]), 4),
                               "marked": round(float(m[2]), 4), "train_s": round(meta["train_s"], 1),
                               "time": time.time()})
            print(f"step {step}/{steps} mle {m[0]:.3f} ul {m[1]:.3f} marked {m[2]:.1%}", flush=True)
            logs = []
        if time.time() - last_eval >= eval_every_s:
            evaluate(step)
            last_eval = time.time()
    meta.update(step=step, tokens_seen=meta["tokens_seen"])
    trainer.save_checkpoint(run_dir, params, opt_state, meta)
    evaluate(step)
    print(f"stopped at fine-tune step {step}/{steps}; checkpoint in {run_dir}", flush=True)
