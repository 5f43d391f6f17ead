"""Sequence-level unlikelihood fine-tuning against greedy loops (Welleck et al., 2019, "Neural
Text Generation with Unlikelihood Training"), for the default model's no-loop gate (issue #17).

A model trained only on next-token likelihood puts too much mass on continuing a pattern it has
just produced, so its greedy continuations settle into a repeated line. One fine-tuning step here:
  1. decode greedy continuations of a batch of training-text prefixes (models/dense_decode.py);
  2. mark every continuation token that belongs to an n-gram already seen earlier in the same
     row (`repeat_mask`: the loop, as the model produced it);
  3. minimise  mean MLE loss on ordinary training windows
               + alpha * mean over marked tokens of -log(1 - p(token | its prefix)).
The MLE term keeps the model a language model (held-out bits per byte); the second term lowers
the probability of exactly the tokens that formed a loop, in the context where the model chose
them. The continuations come from training text only; the gate's prompts are never used.
Shape letters: see models/config.py; S is prefix + continuation, padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.config import ModelConfig
from models.llama import Params, forward


def repeat_mask(seqs: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """seqs [B, S] token rows, the continuation of row b at [starts[b], lengths[b]).
    Returns [B, S] bool: True on every continuation token of an n-gram that already occurred
    earlier in the row (prefix included), i.e. the tokens that repeat what came before."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = np.zeros(seqs.shape, bool)
    for b in range(seqs.shape[0]):
        row, seen = seqs[b, : lengths[b]].tolist(), set()
        for end in range(n, len(row) + 1):  # n-gram row[end-n:end]
            gram = tuple(row[end - n: end])
            if gram in seen and end > starts[b]:
                out[b, max(end - n, int(starts[b])): end] = True
            seen.add(gram)
    return out


def unlikelihood(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of -log(1 - p(target)) over the masked positions (0 when none are).
    logits [B, T, V], targets [B, T], mask [B, T]."""
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                               targets[..., None], axis=-1)[..., 0]
    # log(1 - p) = log(-expm1(log p)), accurate near p = 1; clipped so a certain token costs 11.5.
    ul = -jnp.log(jnp.clip(-jnp.expm1(logp), 1e-5, 1.0))
    m = mask.astype(jnp.float32)
    return jnp.sum(ul * m) / jnp.maximum(jnp.sum(m), 1.0)


def loss_fn(params: Params, mle_batch: jax.Array, ul_seqs: jax.Array, ul_mask: jax.Array,
            alpha: jax.Array, cfg: ModelConfig):
    """(total, (mle, ul)). mle_batch [B, T+1]; ul_seqs [B2, S]; ul_mask [B2, S] marks the tokens
    of ul_seqs to push down (position t is predicted from ul_seqs[:, :t])."""
    logits = forward(params, mle_batch[:, :-1], cfg)
    mle = optax.softmax_cross_entropy_with_integer_labels(logits, mle_batch[:, 1:]).mean()
    ul = unlikelihood(forward(params, ul_seqs[:, :-1], cfg), ul_seqs[:, 1:], ul_mask[:, 1:])
    return mle + alpha * ul, (mle, ul)


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=(0, 1))
def train_step(params, opt_state, mle_batch, ul_seqs, ul_mask, alpha, cfg: ModelConfig, opt):
    """One AdamW step on loss_fn; params and opt_state are donated -> (params, opt_state, mle, ul)."""
    (_, (mle, ul)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, mle_batch, ul_seqs, ul_mask, alpha, cfg)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mle, ul
