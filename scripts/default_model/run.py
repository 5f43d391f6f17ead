"""The run folder and the training loop of scripts/train_default_model.py.

Data folder (shared by runs, made once): corpus.json (provenance, sizes, zlib on the held-out
text), tokenizer.json (byte-level BPE trained on the training split), train_stream.npy and
heldout_stream.npy (int32 ids, EOS before every file).
Run folder: spec.json (RunSpec and the data folder; written once, read on every resume),
metrics.jsonl (one JSON object per log line or evaluation), step-NNNNNNNN/ (checkpoints of
models/trainer.py, the latest two kept).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import quality_gates, stdlib_corpus as corpus, trainer
from models.llama import init_params

VOCAB_SIZE = 4096
EVAL_TOKENS = 8192  # held-out tokens of each evaluation during training


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with vocab_size ids; id 0 is `<|endoftext|>` (the pystdlib-tiny recipe)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer_ = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[corpus.EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer_)
    return tok


def prepare_data(data_dir: Path, vocab_size: int) -> dict:
    """Tokenizer and token streams of the corpus, made once into data_dir and shared by every
    run that names it. Returns corpus.json's contents."""
    info_path = data_dir / "corpus.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["vocab_size"] != vocab_size:
            raise ValueError(f"{data_dir} holds a vocab of {info['vocab_size']}, the run wants {vocab_size}")
        return info
    t0 = time.time()
    data_dir.mkdir(parents=True, exist_ok=True)
    train_files, heldout_files = corpus.split_files()
    train_texts, heldout_texts = corpus.read_texts(train_files), corpus.read_texts(heldout_files)
    tok = train_tokenizer(train_texts, vocab_size)
    eos_id = tok.token_to_id(corpus.EOS_TOKEN)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    train_stream = corpus.token_stream(train_texts, encode, eos_id)
    heldout_stream = corpus.token_stream(heldout_texts, encode, eos_id)
    heldout_bytes = "".join(heldout_texts).encode("utf-8")
    tok.save(str(data_dir / "tokenizer.json"))
    np.save(data_dir / "train_stream.npy", train_stream)
    np.save(data_dir / "heldout_stream.npy", heldout_stream)
    info = {
        "vocab_size": vocab_size, "eos_token_id": eos_id, "python_version": sys.version.split()[0],
        "stdlib_dir": str(corpus.stdlib_dir()), "heldout_modules": list(corpus.HELDOUT_MODULES),
        "excluded_dirs": sorted(corpus.EXCLUDED_DIRS),
        "train_files": len(train_files), "train_bytes": len("".join(train_texts).encode("utf-8")),
        "train_tokens": int(len(train_stream)), "heldout_files": len(heldout_files),
        "heldout_bytes": len(heldout_bytes), "heldout_tokens": int(len(heldout_stream)),
        "heldout_zlib_bpb": quality_gates.zlib_bits_per_byte(heldout_bytes),
        "tokenizer": f"ByteLevel BPE vocab {vocab_size} min_frequency 2, trained on the training split only",
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"prepared {data_dir} in {time.time() - t0:.0f}s: {info['train_tokens']:,} train tokens, "
          f"{info['heldout_tokens']:,} held-out", flush=True)
    return info


def prepare(run_dir: Path, data_dir: Path, explicit: dict) -> tuple[trainer.RunSpec, dict]:
    """The run's spec (spec.json, written on first use; later starts check `explicit` flags
    against it) and its data's corpus.json."""
    spec_path = run_dir / "spec.json"
    if spec_path.exists():
        saved = json.loads(spec_path.read_text())
        names = {"steps": "num_steps"}
        for flag, value in explicit.items():
            key = names.get(flag, flag)
            value = list(value) if isinstance(value, tuple) else value
            if saved["spec"][key] != value:
                raise ValueError(f"--{flag.replace('_', '-')} {value} differs from this run's {key} "
                                 f"{saved['spec'][key]} in {spec_path}; use another --run-dir")
        spec, data_dir = trainer.RunSpec.from_dict(saved["spec"]), Path(saved["data_dir"])
    else:
        spec = trainer.RunSpec(vocab_size=VOCAB_SIZE, **{("num_steps" if k == "steps" else k): v
                                                         for k, v in explicit.items()})
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({"spec": spec.to_dict(), "data_dir": str(data_dir.absolute())},
                                        indent=1) + "\n")
    return spec, prepare_data(data_dir, spec.vocab_size)


def eval_windows(stream: np.ndarray, seq_len: int, num_tokens: int) -> np.ndarray:
    """[W, seq_len+1] windows evenly spaced over the stream, W = num_tokens // seq_len (>= 1)."""
    W = max(1, num_tokens // seq_len)
    starts = np.linspace(0, len(stream) - seq_len - 2, W).astype(np.int64)
    return np.stack([stream[s: s + seq_len + 1] for s in starts])


def quick_bpb(params, cfg, windows: np.ndarray, byte_lens: np.ndarray) -> float:
    nll = np.stack([np.asarray(trainer.token_nll(params, jnp.asarray(w[None]), cfg)[0]) for w in windows])
    return quality_gates.bits_per_byte(nll, windows, byte_lens)


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(run_dir: Path, data_dir: Path, explicit: dict, stop: dict, *, checkpoint_every_s: float, eval_every_s: float,
          log_every: int, max_train_s: float | None = None, max_cpu_s: float | None = None) -> None:
    """Train (or resume) the run in run_dir up to its last step, or until stop["requested"],
    max_train_s of training wall time or max_cpu_s of training CPU time (all threads of this
    process), each counted over this start and earlier ones. On a shared machine CPU time is
    the fair measure of the compute a run got."""
    from tokenizers import Tokenizer

    spec, info = prepare(run_dir, data_dir, explicit)
    data_dir = Path(json.loads((run_dir / "spec.json").read_text())["data_dir"])
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    byte_lens = quality_gates.token_byte_lengths(tok, spec.vocab_size)
    train_stream = np.load(data_dir / "train_stream.npy")
    heldout_stream = np.load(data_dir / "heldout_stream.npy")
    cfg = trainer.model_config(spec, info["eos_token_id"])
    opt = trainer.make_optimizer(spec)
    params = init_params(cfg, seed=spec.seed)
    opt_state = opt.init(params)
    meta = {"step": 0, "train_s": 0.0, "cpu_s": 0.0, "tokens_seen": 0}
    ckpts = trainer.checkpoint_paths(run_dir)
    if ckpts:
        params, opt_state, meta = trainer.restore_checkpoint(ckpts[-1], params, opt_state)
        print(f"resumed from {ckpts[-1]} (step {meta['step']}, {meta['train_s'] / 60:.1f} train-min)", flush=True)
    print(f"{spec.size}: {cfg.num_params():,} params on {jax.devices()[0].platform}, "
          f"steps {spec.num_steps}, {spec.tokens_per_step} tokens/step, phases "
          f"{list(zip(spec.seq_lens, spec.phase_fractions))}", flush=True)

    def checkpoint(step: int) -> None:
        meta.update(step=step)
        trainer.save_checkpoint(run_dir, params, opt_state, meta)

    def evaluate(step: int) -> None:
        T = spec.seq_len(max(step, 1))
        bpb = quick_bpb(params, cfg, eval_windows(heldout_stream, T, EVAL_TOKENS), byte_lens)
        log_metrics(run_dir, {"step": step, "train_s": round(meta["train_s"], 1), "cpu_s": round(meta["cpu_s"], 1),
                       "eval_len": T,
                       "heldout_bpb": round(bpb, 4), "time": time.time()})
        print(f"step {step} eval: held-out {bpb:.3f} bits/byte (windows of {T})", flush=True)

    step, losses = meta["step"], []
    last_ckpt = last_eval = time.time()
    while step < spec.num_steps and not stop["requested"]:
        if max_train_s is not None and meta["train_s"] >= max_train_s:
            break
        if max_cpu_s is not None and meta["cpu_s"] >= max_cpu_s:
            break
        t0, c0 = time.time(), time.process_time()
        batch = jnp.asarray(trainer.batch_at(train_stream, spec, step + 1))
        params, opt_state, loss = trainer.train_step(params, opt_state, batch, cfg, opt)
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {loss}; resume from the last checkpoint "
                                     "with a lower --peak-lr in a new --run-dir")
        step += 1
        meta["train_s"] += time.time() - t0
        meta["cpu_s"] += time.process_time() - c0
        meta["tokens_seen"] += int(batch.shape[0] * (batch.shape[1] - 1))
        losses.append(loss)
        if step % log_every == 0 or step == spec.num_steps:
            rec = {"step": step, "train_s": round(meta["train_s"], 1), "cpu_s": round(meta["cpu_s"], 1),
                   "seq_len": int(batch.shape[1] - 1),
                   "loss": round(float(np.mean(losses)), 4), "tokens_seen": meta["tokens_seen"],
                   "time": time.time()}
            log_metrics(run_dir, rec)
            print(f"step {step}/{spec.num_steps} T={rec['seq_len']} loss {rec['loss']:.3f} "
                  f"{meta['train_s'] / 60:.1f} train-min {meta['cpu_s'] / 60:.1f} cpu-min",
                  flush=True)
            losses = []
        now = time.time()
        if now - last_eval >= eval_every_s:
            evaluate(step)
            last_eval = time.time()
        if now - last_ckpt >= checkpoint_every_s:
            checkpoint(step)
            last_ckpt = time.time()
    checkpoint(step)
    evaluate(step)
    print(f"stopped at step {step}/{spec.num_steps}; checkpoint in {run_dir}", flush=True)
