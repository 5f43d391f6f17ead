"""Train raypd's default model on the Python standard library's own source; resume; export.

Lifecycle of a run folder (default /work/train-default-v2, outside the repository):
  1. First start: the corpus (models/stdlib_corpus.py: stdlib `*.py`, HELDOUT_MODULES held out)
     is read, a byte-level BPE tokenizer (4096 ids, `<|endoftext|>` = EOS) is trained on
     the training split only, and spec.json, tokenizer.json and the token streams (*.npy) are
     written. Every later start reads them back, so a resumed run never depends on which Python
     is installed.
  2. Training (models/trainer.py): a Llama of size `--size`, AdamW with warmup and cosine decay
     over `--steps`, windows that grow 256 -> 2048 tokens (`--seq-lens`, `--phase-fractions`)
     at a fixed number of tokens per step. A checkpoint is written every `--checkpoint-every-s`
     and at the end; a start with checkpoints present resumes from the latest one exactly
     (optimizer state, step = data position, accumulated training time). SIGTERM/SIGINT save
     a checkpoint and exit.
  3. Metrics: metrics.jsonl gets the training loss every `--log-every` steps and held-out bits
     per byte (8192 tokens, windows of the current length) every `--eval-every-s`.
  4. `--export DIR` writes a shipped model folder from the latest (or `--checkpoint`) state:
     config.json, model.safetensors (float16), tokenizer.json, training.json and README.md
     (the model card), then evaluates the quality gates (models/quality_gates.py) on the
     files just written and records them.

Threads: `--threads 2` lets XLA use both cores; the platform is JAX's default (a GPU when
present) unless `--platform` says otherwise. Nothing else differs between CPU and GPU.

  nice -n 19 .venv/bin/python scripts/train_default_model.py --threads 2          # train/resume
  .venv/bin/python scripts/train_default_model.py --run-dir /work/train-default-v2/ul \
      --unlikelihood-steps 150                                     # fine-tune against loops
  .venv/bin/python scripts/train_default_model.py --export models/data/pystdlib-v2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN_DIR = Path("/work/train-default-v2/run")
DATA_DIR = Path("/work/train-default-v2/data")
SPEC_FLAGS = ("size", "steps", "tokens_per_step", "seq_lens", "phase_fractions", "peak_lr",
              "warmup_steps", "weight_decay", "seed")


def set_threads(threads: int, platform: str | None) -> None:
    """XLA reads these when JAX initialises, so this runs before anything imports jax."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={multi}"
                               f" intra_op_parallelism_threads={threads}").strip()
    for var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if platform:
        os.environ["JAX_PLATFORMS"] = platform


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=RUN_DIR, help="checkpoints and metrics")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR,
                    help="tokenizer and token streams, shared by runs (made on first use)")
    ap.add_argument("--size", default=None, help="models/trainer.py SIZES (default small)")
    ap.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 6000)")
    ap.add_argument("--tokens-per-step", type=int, default=None, help="default 8192")
    ap.add_argument("--seq-lens", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="window length of each phase, e.g. 256,512,1024,2048")
    ap.add_argument("--phase-fractions", type=lambda s: tuple(float(x) for x in s.split(",")),
                    default=None, help="share of the steps of each phase, e.g. 0.3,0.2,0.2,0.3")
    ap.add_argument("--peak-lr", type=float, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="XLA CPU threads (default 2 = both cores)")
    ap.add_argument("--platform", choices=("cpu", "cuda", "gpu", "tpu"), default=None,
                    help="JAX platform; default: JAX's choice (a GPU when present)")
    ap.add_argument("--checkpoint-every-s", type=float, default=300.0)
    ap.add_argument("--eval-every-s", type=float, default=900.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--max-train-minutes", type=float, default=None,
                    help="stop (with a checkpoint and an eval) after this much training time")
    ap.add_argument("--max-cpu-minutes", type=float, default=None,
                    help="stop (with a checkpoint and an eval) after this much training CPU time")
    ap.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="write a shipped model folder from a checkpoint; train nothing")
    ap.add_argument("--checkpoint", type=Path, default=None, help="with --export: this checkpoint, not the latest")
    ap.add_argument("--name", default="pystdlib-v2", help="with --export: the model's name in its card")
    ap.add_argument("--unlikelihood-steps", type=int, default=None, metavar="N",
                    help="fine-tune --base-run-dir's latest checkpoint against greedy loops for N steps "
                         "into --run-dir (scripts/default_model/finetune.py)")
    ap.add_argument("--base-run-dir", type=Path, default=RUN_DIR, help="with --unlikelihood-steps")
    ap.add_argument("--ul-lr", type=float, default=2e-4, help="with --unlikelihood-steps: peak lr")
    ap.add_argument("--ul-alpha", type=float, default=1.0, help="with --unlikelihood-steps: weight of the "
                                                              "unlikelihood term")
    ap.add_argument("--ul-ngram", type=int, default=4, help="with --unlikelihood-steps: repeated n-gram length")
    ap.add_argument("--ul-mle-windows", type=int, default=2,
                    help="with --unlikelihood-steps: full-context MLE windows per step")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads, args.platform)
    from scripts.default_model import export, run  # noqa: PLC0415 - after XLA_FLAGS are set

    if args.export is not None:
        export.export(args.run_dir, args.export, args.checkpoint, args.name)
        return
    if args.unlikelihood_steps is not None:
        from scripts.default_model import finetune  # noqa: PLC0415

        if args.run_dir.resolve() == args.base_run_dir.resolve():
            raise ValueError("--run-dir must differ from --base-run-dir for --unlikelihood-steps")
        stop = {"requested": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
        signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
        finetune.finetune(args.base_run_dir, args.run_dir, args.unlikelihood_steps, lr=args.ul_lr,
                          alpha=args.ul_alpha, ngram=args.ul_ngram, mle_windows=args.ul_mle_windows,
                          stop=stop, eval_every_s=args.eval_every_s, log_every=args.log_every)
        return
    explicit = {k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k) is not None}
    stop = {"requested": False}

    def on_signal(signum, _frame):
        print(f"signal {signum}: checkpointing and stopping", flush=True)
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run.train(args.run_dir, args.data_dir, explicit, stop, checkpoint_every_s=args.checkpoint_every_s,
              eval_every_s=args.eval_every_s, log_every=args.log_every,
              max_train_s=None if args.max_train_minutes is None else args.max_train_minutes * 60,
              max_cpu_s=None if args.max_cpu_minutes is None else args.max_cpu_minutes * 60)


if __name__ == "__main__":
    main()
