"""`--export DIR` of scripts/train_default_model.py: a checkpoint -> a shipped model folder.

1. Restore the checkpoint (the latest of the run unless one is named).
2. Write config.json and model.safetensors (float16, models/weights.py `save_hf`) and the
   run's tokenizer.json: the folder loads with `models.load(DIR)` like any HF checkpoint.
3. Load those files back and score them: held-out bits per byte over the whole held-out
   stream (windows of the full context), and the quality gates (models/quality_gates.py) on
   GATE_WINDOWS full-context windows, whose ids go into training.json so that
   tests/test_model_gates.py recomputes the gates from the shipped files alone.
4. Write training.json and README.md (the model card: license, data provenance, held-out set,
   recipe, gates).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from models import dense_decode, quality_gates, trainer
from models.llama import init_params
from models.weights import save_hf
from scripts.default_model import card, run

GATE_WINDOWS = 4
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json", "README.md")
ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def full_heldout_bpb(params, cfg, stream: np.ndarray, byte_lens: np.ndarray, window: int) -> float:
    """Every held-out token after the first predicted once, from windows of `window` tokens
    overlapping by one (context restarts every `window` tokens)."""
    nats, num_bytes = 0.0, 0
    for s in range(0, len(stream) - 1, window):
        w = stream[s: s + window + 1]
        nats += float(dense_decode.window_nll(params, cfg, w[None]).sum())
        num_bytes += int(byte_lens[w[1:]].sum())
    return nats / num_bytes / np.log(2)


def last_train_loss(run_dir: Path, step: int) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and r["step"] <= step]
    return rows[-1]["loss"] if rows else None


def export(run_dir: Path, out_dir: Path, checkpoint: Path | None, name: str) -> dict:
    import models
    from tokenizers import Tokenizer

    t0 = time.time()
    spec, info = run.prepare(run_dir, Path(json.loads((run_dir / "spec.json").read_text())["data_dir"]), {})
    data_dir = Path(json.loads((run_dir / "spec.json").read_text())["data_dir"])
    if checkpoint is None:
        ckpts = trainer.checkpoint_paths(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"{run_dir}: no checkpoints to export")
        checkpoint = ckpts[-1]
    cfg = trainer.model_config(spec, info["eos_token_id"])
    params = init_params(cfg, seed=spec.seed)
    params, _, meta = trainer.restore_checkpoint(checkpoint, params, trainer.make_optimizer(spec).init(params))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_FILES:
        (out_dir / f).unlink(missing_ok=True)
    save_hf(out_dir, params, cfg, dtype="float16")
    (out_dir / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())

    shipped = models.load(out_dir)  # what users get: the float16 weights, read back
    byte_lens = quality_gates.token_byte_lengths(Tokenizer.from_file(str(out_dir / "tokenizer.json")),
                                                 cfg.vocab_size)
    heldout = np.load(data_dir / "heldout_stream.npy")
    T = spec.max_seq_len
    windows = run.eval_windows(heldout, T, GATE_WINDOWS * T)
    eos = info["eos_token_id"]
    gates = quality_gates.evaluate(
        nll_fn=lambda w: dense_decode.window_nll(shipped.params, shipped.config, w),
        greedy_fn=lambda prompts, n: dense_decode.greedy(shipped.params, shipped.config, prompts, n, eos),
        encode=shipped.tokenizer.encode, decode=shipped.tokenizer.decode,
        heldout_windows=windows, byte_lens=byte_lens, zlib_bpb=info["heldout_zlib_bpb"])
    print(f"gates: {gates['passed']} (held-out {gates['heldout_bpb']:.3f} bits/byte, limit "
          f"{gates['bpb_limit']:.3f}; buckets {[round(b, 3) for b in gates['bucket_losses']]})", flush=True)
    full_bpb = full_heldout_bpb(shipped.params, shipped.config, heldout, byte_lens, T)
    print(f"full held-out: {full_bpb:.3f} bits/byte (zlib {info['heldout_zlib_bpb']:.3f})", flush=True)
    record = {
        "model": name, "git_commit": git_commit(), "checkpoint": str(checkpoint),
        "config": cfg.to_dict(), "num_params": cfg.num_params(), "eos_token_id": eos,
        "spec": spec.to_dict(), "corpus": info,
        "history": json.loads((run_dir / "spec.json").read_text()).get("history"),
        "finetune": json.loads((run_dir / "spec.json").read_text()).get("finetune"),
        "trained": {"step": meta.get("base_step", meta["step"]),
                    "finetune_steps": meta["step"] if "base_step" in meta else 0,
                    "train_s": round(meta["train_s"], 1),
                    "cpu_s": round(meta.get("cpu_s", 0.0), 1), "tokens_seen": meta["tokens_seen"],
                    "last_train_loss": last_train_loss(run_dir, meta["step"])},
        "heldout_bpb": full_bpb, "heldout_context": T, "baseline_zlib_bpb": info["heldout_zlib_bpb"],
        "gates": gates, "gate_window_ids": windows.tolist(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "README.md").write_text(card.model_card(record))
    record["size_bytes"] = sum((out_dir / f).stat().st_size for f in SHIPPED_FILES)
    print(f"wrote {out_dir} ({record['size_bytes'] / 1e6:.1f} MB) in {time.time() - t0:.0f}s; "
          f"all gates passed: {all(gates['passed'].values())}", flush=True)
    return record
