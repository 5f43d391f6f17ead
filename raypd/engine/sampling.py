"""On-device sampling for a batch of rows, each with its own parameters.

Order of the logit processing (vLLM's): the raw logits get the row's `logit_bias`, then its
stop ids are masked while it is short of `min_tokens`, then the repetition penalty (over the
prompt and the tokens generated so far: a positive logit divided by it, a negative one
multiplied), then the frequency and presence penalties (over the generated tokens only). This
runs only when some row asks for it (`lax.cond`), and only changes the rows that do.

Greedy rows (temperature 0) then take the argmax; the others sample from the temperature-scaled,
top-k-, top-p- and min-p-filtered distribution with a key derived from (seed, position), so a
request samples the same tokens whatever slot or batch it runs in. The full sort that
top-k/top-p need runs only when some row samples (`lax.cond`).

The returned logprob is that of the chosen token under the model's unmodified distribution,
and so are the top alternatives (`lax.top_k`, only when some row asks for them).

Per-request penalty state lives in a `PenaltyTable` whose rows the sampled rows point into
(`SamplingArrays.table_row`): the decode batch keeps one table row per slot on the device and
adds each sampled token to its counts in the step; a prefill chunk brings its own small table.
Shapes: R sampled rows, V vocabulary, S table rows, NB = MAX_LOGIT_BIAS, NS suppressed ids,
K = MAX_TOP_LOGPROBS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from raypd.engine.api import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS

MAX_SUPPRESS_IDS = MAX_STOP_TOKEN_IDS + 8  # NS: stop token ids and EOS ids masked by min_tokens


@struct.dataclass
class PenaltyTable:
    """Penalty state of S requests. Padding ids are V (dropped by the scatters)."""

    counts: jax.Array  # [S, V] int32; times each token was generated so far
    prompt_mask: jax.Array  # [S, V] bool; tokens of the prompt
    bias_ids: jax.Array  # [S, NB] int32; logit_bias token ids (V-padded)
    bias_values: jax.Array  # [S, NB] float32
    suppress_ids: jax.Array  # [S, NS] int32; ids min_tokens masks: EOS and stop ids (V-padded)


def empty_table(num_rows: int, vocab_size: int) -> PenaltyTable:
    """A neutral table (host numpy)."""
    S, V = num_rows, vocab_size
    return PenaltyTable(counts=np.zeros((S, V), np.int32), prompt_mask=np.zeros((S, V), bool),
                        bias_ids=np.full((S, MAX_LOGIT_BIAS), V, np.int32),
                        bias_values=np.zeros((S, MAX_LOGIT_BIAS), np.float32),
                        suppress_ids=np.full((S, MAX_SUPPRESS_IDS), V, np.int32))


def fill_table_row(table: PenaltyTable, i: int, params, token_ids, num_prompt: int, eos_ids) -> None:
    """Write one request's penalty state into row i of a host table: `token_ids` are its prompt
    (the first num_prompt) and the tokens generated so far; `params` its SamplingParams."""
    V = table.counts.shape[1]
    ids = np.asarray(token_ids, np.int64)
    table.counts[i] = np.bincount(ids[num_prompt:], minlength=V)[:V]
    table.prompt_mask[i] = False
    table.prompt_mask[i, ids[:num_prompt]] = True
    table.bias_ids[i], table.bias_values[i] = V, 0.0
    for j, (t, b) in enumerate(params.logit_bias):
        table.bias_ids[i, j], table.bias_values[i, j] = t, b
    suppress = suppress_ids(params, eos_ids)
    table.suppress_ids[i] = V
    table.suppress_ids[i, : len(suppress)] = suppress


def suppress_ids(params, eos_ids) -> list[int]:
    """Ids min_tokens keeps from being sampled: EOS (unless ignore_eos) and the stop token ids."""
    ids = [] if params.ignore_eos else list(eos_ids)
    return (ids + [t for t in params.stop_token_ids if t not in ids])[:MAX_SUPPRESS_IDS]


@struct.dataclass
class SamplingArrays:
    """Per-row sampling parameters, all shaped [R]. The fields from `frequency_penalty` on may
    be None together (a caller without penalties or top logprobs: scripts, kernels benches)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    seed: jax.Array  # uint32
    position: jax.Array  # int32; position of the token being sampled (folds into the key)
    min_p: jax.Array  # float32; keep tokens with prob >= min_p * the top prob (after temperature); 0 = off
    frequency_penalty: jax.Array | None = None  # float32; 0 = off
    presence_penalty: jax.Array | None = None  # float32; 0 = off
    repetition_penalty: jax.Array | None = None  # float32; 1 = off
    min_position: jax.Array | None = None  # int32; suppress ids masked while position < it (min_tokens)
    is_penalized: jax.Array | None = None  # bool; the row uses its table row (penalties, bias, min_tokens)
    table_row: jax.Array | None = None  # int32; the row's row of the PenaltyTable
    num_top_logprobs: jax.Array | None = None  # int32; 0 = no alternatives reported


@struct.dataclass
class Sampled:
    tokens: jax.Array  # [R] int32
    logprobs: jax.Array  # [R] float32; of the chosen token, unmodified distribution
    top_ids: jax.Array | None  # [R, K] int32; most likely first (zeros when no row asked)
    top_logprobs: jax.Array | None  # [R, K] float32


def process_logits(logits: jax.Array, s: SamplingArrays, table: PenaltyTable) -> jax.Array:
    """logit_bias, min_tokens, repetition / frequency / presence penalties of every row (the
    rows without `is_penalized` come back unchanged). logits [R, V] -> [R, V]."""
    R, V = logits.shape
    rows = jnp.arange(R)[:, None]
    t = s.table_row
    counts = table.counts[t]  # [R, V]
    out = logits.at[rows, table.bias_ids[t]].add(table.bias_values[t], mode="drop")
    early = (s.position < s.min_position)[:, None]
    out = out.at[rows, jnp.where(early, table.suppress_ids[t], V)].set(-jnp.inf, mode="drop")
    seen = table.prompt_mask[t] | (counts > 0)
    rp = s.repetition_penalty[:, None]
    out = jnp.where(seen, jnp.where(out > 0, out / rp, out * rp), out)
    out = out - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * (counts > 0)
    return jnp.where(s.is_penalized[:, None], out, logits)


def _filtered_sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    V = logits.shape[-1]
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits / temp
    desc = -jnp.sort(-scaled, axis=-1)  # [R, V]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [R, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p: index of the first cum >= p
    cut = jnp.sum(cum < s.top_p[:, None], axis=-1)
    cut = jnp.minimum(cut, V - 1)
    threshold = jnp.maximum(jnp.take_along_axis(desc, cut[:, None], axis=-1), kth)
    # min_p: log(prob / top prob) >= log(min_p), i.e. scaled >= top scaled + log(min_p) (log 0 = -inf: off)
    threshold = jnp.maximum(threshold, desc[:, :1] + jnp.log(s.min_p)[:, None])
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, s.position)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays, table: PenaltyTable | None = None) -> Sampled:
    """logits [R, V] (float32) -> Sampled. `table` is needed when s has penalty fields."""
    raw = logits
    if s.is_penalized is not None:
        logits = jax.lax.cond(jnp.any(s.is_penalized), lambda: process_logits(raw, s, table), lambda: raw)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: jnp.where(s.temperature > 0, _filtered_sample(logits, s), greedy),
        lambda: greedy)
    all_logprobs = jax.nn.log_softmax(raw, axis=-1)
    logprobs = jnp.take_along_axis(all_logprobs, tokens[:, None], axis=-1)[:, 0]
    top_ids = top_lps = None
    if s.num_top_logprobs is not None:
        R, K = raw.shape[0], MAX_TOP_LOGPROBS

        def top():
            values, ids = jax.lax.top_k(all_logprobs, K)
            return ids.astype(jnp.int32), values

        top_ids, top_lps = jax.lax.cond(jnp.any(s.num_top_logprobs > 0), top,
                                        lambda: (jnp.zeros((R, K), jnp.int32), jnp.zeros((R, K), jnp.float32)))
    return Sampled(tokens, logprobs, top_ids, top_lps)
