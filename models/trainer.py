"""Training the default model: size presets, the sequence-length schedule, deterministic batches,
one jitted AdamW step, and checkpoints that resume exactly. The CLI is
scripts/train_default_model.py; tests/test_trainer.py checks the resume on a toy model.

Lifecycle of a run:
  1. `RunSpec` fixes everything that decides the numbers: size, vocab, schedule, lr, seed.
     It is written to the run folder once and read back on every resume.
  2. Step s trains on `batch_at(stream, spec, s)`: windows at offsets drawn by
     `numpy.random.default_rng([seed, s])`, so the data position *is* the step number and a
     resumed run sees exactly the batches an uninterrupted one would.
  3. `save_checkpoint` writes params, optimizer state (which holds the lr schedule's count)
     and a meta dict into `step-NNNNNNNN/` via a temporary folder and one rename, so a kill
     mid-write never leaves a half checkpoint; older ones beyond `keep` are removed.
  4. `restore_checkpoint` maps the saved leaves back onto a freshly built state tree,
     checking every shape and dtype.
Shape letters: see models/config.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.config import ModelConfig
from models.llama import Params, forward

# Llama shapes compared for the default model (docs/BENCHMARKS.md, "default model v2").
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2),
    "deep": dict(hidden_size=320, intermediate_size=864, num_layers=10, num_heads=5, num_kv_heads=1),
}
HEAD_DIM = 64
CHECKPOINT_PREFIX = "step-"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's numbers. Phases: `seq_lens[i]` for `phase_fractions[i]`
    of `num_steps`; each step holds `tokens_per_step` tokens (batch = tokens_per_step // seq_len)."""

    size: str = "small"
    vocab_size: int = 4096
    num_steps: int = 6000
    tokens_per_step: int = 8192
    seq_lens: tuple[int, ...] = (256, 512, 1024, 2048)
    phase_fractions: tuple[float, ...] = (0.3, 0.2, 0.2, 0.3)
    peak_lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if len(self.seq_lens) != len(self.phase_fractions) or not self.seq_lens:
            raise ValueError(f"seq_lens {self.seq_lens} and phase_fractions {self.phase_fractions} "
                             "must be non-empty and of equal length")
        if abs(sum(self.phase_fractions) - 1.0) > 1e-6:
            raise ValueError(f"phase_fractions must sum to 1, got {sum(self.phase_fractions)}")
        for n in self.seq_lens:
            if not 1 <= n <= self.tokens_per_step:
                raise ValueError(f"every seq_len must be in [1, tokens_per_step={self.tokens_per_step}], got {n}")

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    def seq_len(self, step: int) -> int:
        """Window length of 1-based step `step`."""
        edge = 0.0
        for n, frac in zip(self.seq_lens, self.phase_fractions):
            edge += frac * self.num_steps
            if step <= round(edge):
                return n
        return self.seq_lens[-1]

    def batch_size(self, step: int) -> int:
        return max(1, self.tokens_per_step // self.seq_len(step))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["seq_lens"], d["phase_fractions"] = tuple(d["seq_lens"]), tuple(d["phase_fractions"])
        return cls(**d)


def model_config(spec: RunSpec, eos_id: int, max_len: int | None = None) -> ModelConfig:
    shape = SIZES[spec.size]
    return ModelConfig(
        architecture="llama", vocab_size=spec.vocab_size, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=max_len or spec.max_seq_len,
        tie_word_embeddings=True, dtype="float32", eos_token_ids=(eos_id,), **shape)


# ----------------------------------------------------------------------------- data and step


def batch_at(stream: np.ndarray, spec: RunSpec, step: int) -> np.ndarray:
    """[B, T+1] windows of the training stream for 1-based step `step`; a pure function of
    (stream, spec.seed, step), which is what makes resume exact."""
    T, B = spec.seq_len(step), spec.batch_size(step)
    if len(stream) < T + 2:
        raise ValueError(f"training stream has {len(stream)} tokens, a window needs {T + 1}")
    rng = np.random.default_rng([spec.seed, step])
    starts = rng.integers(0, len(stream) - T - 1, size=B)
    return np.stack([stream[s: s + T + 1] for s in starts])


def loss_fn(params: Params, batch: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean next-token cross entropy (nats). batch [B, T+1]."""
    logits = forward(params, batch[:, :-1], cfg)  # [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(spec: RunSpec) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.95, decay on matrices only), linear warmup, cosine decay to 10%."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.peak_lr, warmup_steps=spec.warmup_steps,
        decay_steps=spec.num_steps, end_value=spec.peak_lr * 0.1)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=spec.weight_decay,
                                   mask=decay_mask))


@functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=(0, 1))
def train_step(params, opt_state, batch, cfg: ModelConfig, opt):
    """One AdamW step; params and opt_state are donated. batch [B, T+1] -> (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=2)
def token_nll(params: Params, window: jax.Array, cfg: ModelConfig) -> jax.Array:
    """window [B, T+1] -> nats of each predicted token [B, T]."""
    logits = forward(params, window[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:])


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "meta.json").exists())


def save_checkpoint(run_dir: Path, params: Params, opt_state, meta: dict, keep: int = 2) -> Path:
    """Write `run_dir/step-NNNNNNNN/` (state.npz + meta.json, meta must hold "step") atomically."""
    step = int(meta["step"])
    final = run_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    leaves = jax.tree.leaves((params, opt_state))
    np.savez(tmp / "state.npz", **{f"leaf{i:04d}": np.asarray(x) for i, x in enumerate(leaves)})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_paths(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(path: Path, params_like: Params, opt_state_like):
    """(params, opt_state, meta) from a checkpoint folder, mapped onto the `*_like` trees."""
    leaves_like, treedef = jax.tree.flatten((params_like, opt_state_like))
    with np.load(path / "state.npz") as data:
        names = sorted(data.files)
        if len(names) != len(leaves_like):
            raise ValueError(f"{path}: {len(names)} saved arrays, the state has {len(leaves_like)}")
        leaves = []
        for name, like in zip(names, leaves_like):
            arr = data[name]
            if arr.shape != like.shape or arr.dtype != like.dtype:
                raise ValueError(f"{path}: {name} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected {like.dtype}{list(like.shape)}")
            leaves.append(jnp.asarray(arr))
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return params, opt_state, json.loads((path / "meta.json").read_text())
