"""The decode batch as device-resident state, and the programs that advance and edit it.

The state of every decode slot (its last token, position, page table, sampling parameters and
stop conditions) lives on the device between steps. A decode dispatch builds the step's
`paged.Batch` from it on the device, runs `paged.step`, and writes the sampled tokens back
into it, so a step sends nothing from the host but which program to run (rows B and context
pages Pc, both static) and a step count that is a pre-placed scalar.

`decode_steps` runs up to `max_steps` steps in one dispatch (a `lax.fori_loop` with a dynamic
trip count: one program per (B, Pc) serves every count). A row stops on the device when it
samples one of its stop token ids or reaches its token budget; a stopped row is padding for
the remaining steps (it writes into the null page and its tokens are ignored), so the tokens a
multi-step dispatch returns equal those of as many single steps.

Rows are kept packed: the host's `RowUpdate` reorders rows on the device (`perm`, which also
drops finished rows) and writes the rows of newly inserted requests, in one program.

Penalties (frequency, presence, repetition), logit_bias and min_tokens read a `PenaltyTable`
(raypd/engine/sampling.py) with one row per slot that stays put while rows move (a row holds
its `table_row`): a step adds each penalized row's sampled token to its counts, and
`write_table_row` fills a row when a penalized request is inserted (its prompt and the tokens
generated so far). Requests without penalties never touch the table.
Shapes: S slots (`max_slots`), M stop ids per slot, P pages per slot (pages of max_seq_len);
B rows of a dispatch (a bucket of the running rows), Pc context pages, k steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.config import ModelConfig
from raypd.engine import paged
from raypd.engine.api import MAX_TOP_LOGPROBS
from raypd.engine.sampling import PenaltyTable, SamplingArrays

NO_STOP = -1  # padding of `stop_ids`
MAX_STOP_IDS = 8  # M: stop ids a row checks on the device; beyond them the host alone checks


@struct.dataclass
class DecodeState:
    """Every decode slot's state, on the device."""

    tokens: jax.Array  # [S] int32; last sampled token, fed by the next step
    positions: jax.Array  # [S] int32; position of that token (its K/V is written next)
    pages: jax.Array  # [S, P] int32; page table (0-padded)
    active: jax.Array  # [S] bool; False: free, or stopped on the device
    remaining: jax.Array  # [S] int32; tokens the request may still generate
    stop_ids: jax.Array  # [S, M] int32; token ids that end the request (NO_STOP-padded)
    temperature: jax.Array  # [S] float32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] float32
    min_p: jax.Array  # [S] float32; 0 = off
    seed: jax.Array  # [S] uint32
    frequency_penalty: jax.Array  # [S] float32; 0 = off
    presence_penalty: jax.Array  # [S] float32; 0 = off
    repetition_penalty: jax.Array  # [S] float32; 1 = off
    min_position: jax.Array  # [S] int32; EOS / stop ids masked while sampling positions below it
    is_penalized: jax.Array  # [S] bool; the row reads (and counts into) its table row
    table_row: jax.Array  # [S] int32; its row of the PenaltyTable
    num_top_logprobs: jax.Array  # [S] int32; 0 = no alternatives


@struct.dataclass
class RowUpdate:
    """Host -> device edit of the rows: new row i = old row perm[i], or the given values where
    is_new[i]; rows >= num_rows become inactive. Value fields are shaped as in DecodeState."""

    perm: jax.Array  # [S] int32
    is_new: jax.Array  # [S] bool
    num_rows: jax.Array  # [] int32
    rows: DecodeState  # values of the new rows (others ignored)


def empty_state(num_slots: int, pages_per_slot: int, num_stop_ids: int = MAX_STOP_IDS) -> DecodeState:
    """All slots free (host numpy; place it with jax.device_put)."""
    S = num_slots
    return DecodeState(tokens=np.zeros(S, np.int32), positions=np.zeros(S, np.int32),
                       pages=np.zeros((S, pages_per_slot), np.int32), active=np.zeros(S, bool),
                       remaining=np.zeros(S, np.int32), stop_ids=np.full((S, num_stop_ids), NO_STOP, np.int32),
                       temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32),
                       top_p=np.ones(S, np.float32), min_p=np.zeros(S, np.float32), seed=np.zeros(S, np.uint32),
                       frequency_penalty=np.zeros(S, np.float32), presence_penalty=np.zeros(S, np.float32),
                       repetition_penalty=np.ones(S, np.float32), min_position=np.zeros(S, np.int32),
                       is_penalized=np.zeros(S, bool), table_row=np.zeros(S, np.int32),
                       num_top_logprobs=np.zeros(S, np.int32))


@functools.partial(jax.jit, donate_argnums=0)
def write_table_row(table: PenaltyTable, row: jax.Array, token_ids: jax.Array, num_prompt: jax.Array,
                    bias_ids: jax.Array, bias_values: jax.Array, suppress_ids: jax.Array) -> PenaltyTable:
    """Fill table row `row` for a newly inserted request. token_ids [Lmax] int32 (V-padded): its
    prompt (the first num_prompt) then the tokens generated so far; bias_ids, bias_values [NB];
    suppress_ids [NS]. The table is donated."""
    V = table.counts.shape[1]
    at = jnp.arange(token_ids.shape[0])
    counts = jnp.zeros(V, jnp.int32).at[token_ids].add((at >= num_prompt).astype(jnp.int32), mode="drop")
    in_prompt = jnp.zeros(V, bool).at[jnp.where(at < num_prompt, token_ids, V)].set(True, mode="drop")
    return PenaltyTable(counts=table.counts.at[row].set(counts), prompt_mask=table.prompt_mask.at[row].set(in_prompt),
                        bias_ids=table.bias_ids.at[row].set(bias_ids),
                        bias_values=table.bias_values.at[row].set(bias_values),
                        suppress_ids=table.suppress_ids.at[row].set(suppress_ids))


def update_rows(state: DecodeState, u: RowUpdate, xp=jnp) -> DecodeState:
    """Reorder, drop and insert rows. `xp`: jax.numpy (in `apply_update`) or numpy (the
    arithmetic runner's host "device", which so runs the same code)."""
    keep = xp.arange(u.perm.shape[0]) < u.num_rows

    def edit(old, new):
        moved = old[u.perm]
        mask = u.is_new.reshape(u.is_new.shape + (1,) * (old.ndim - 1))
        return xp.where(mask, new, moved)

    out = jax.tree.map(edit, state, u.rows)
    return out.replace(active=out.active & keep)


# Reorder, drop and insert rows in one program. The state is donated.
apply_update = jax.jit(update_rows, donate_argnums=0)


def advance_rows(st: DecodeState, B: int, t, xp=jnp) -> DecodeState:
    """One decode step's effect on the first B rows, given their sampled tokens t [B]: a live
    row takes its token and moves one position on; it stops on a stop id or when its budget
    runs out. Other rows are unchanged. `xp` as in `update_rows`."""
    S = st.tokens.shape[0]
    in_batch = xp.arange(S) < B
    t = xp.concatenate([t, xp.zeros(S - B, t.dtype)])  # [S]
    live = st.active & in_batch
    hit = xp.any(t[:, None] == st.stop_ids, axis=1) | (st.remaining <= 1)
    step = live.astype(st.positions.dtype)
    return st.replace(tokens=xp.where(live, t.astype(st.tokens.dtype), st.tokens), positions=st.positions + step,
                      remaining=st.remaining - step, active=xp.where(in_batch, live & ~hit, st.active))


def step_batch(st: DecodeState, B: int, Pc: int, page_size: int, xp=jnp) -> paged.Batch:
    """The first B rows as one decode step's model inputs (T = 1, R = 1). `xp` as in `update_rows`."""
    live = st.active[:B]
    pos = st.positions[:B]
    table = st.pages[:B]
    write_page = xp.take_along_axis(table, (pos // page_size)[:, None], axis=1)[:, 0]
    col = lambda a: a[:, None]  # noqa: E731  [B] -> [B, 1]
    return paged.Batch(
        tokens=col(st.tokens[:B]),
        positions=col(xp.where(live, pos, -1)),
        segments=col(xp.where(live, 0, -1)),
        write_pages=col(xp.where(live, write_page, 0)),
        write_offsets=col(xp.where(live, pos % page_size, 0)),
        ctx_pages=table[:, :Pc],
        ctx_lens=xp.where(live, pos, 0),
        sample_index=xp.zeros((B, 1), np.int32))


def _batch(st: DecodeState, B: int, Pc: int, page_size: int) -> tuple[paged.Batch, SamplingArrays]:
    """The first B rows as one decode step's inputs (T = 1, R = 1)."""
    live = st.active[:B]
    pos = st.positions[:B]
    batch = step_batch(st, B, Pc, page_size)
    sampling = SamplingArrays(temperature=st.temperature[:B], top_k=st.top_k[:B], top_p=st.top_p[:B],
                              min_p=st.min_p[:B], seed=st.seed[:B], position=pos + 1,
                              frequency_penalty=st.frequency_penalty[:B], presence_penalty=st.presence_penalty[:B],
                              repetition_penalty=st.repetition_penalty[:B], min_position=st.min_position[:B],
                              is_penalized=st.is_penalized[:B] & live, table_row=st.table_row[:B],
                              num_top_logprobs=jnp.where(live, st.num_top_logprobs[:B], 0))
    return batch, sampling


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8), donate_argnums=(1, 2, 3))
def decode_steps(params: paged.EngineParams, cache: paged.KVCache, state: DecodeState, table: PenaltyTable,
                 num_steps: jax.Array, cfg: ModelConfig, B: int, Pc: int, max_steps: int):
    """Run `num_steps` (<= max_steps) decode steps over the first B rows, with on-device stop
    and length checks. Cache, state and penalty table are donated: use the returned ones.

    -> (cache, state, table, tokens [k, B], logprobs [k, B], top_ids [k, B, K], top_logprobs
    [k, B, K]); row i of step j is valid while the row had not stopped before step j (the host
    re-checks stops as it reads them).
    """
    G = cache.k[0].shape[2]

    def body(j, carry):
        cache, st, table, toks, lps, top_ids, top_lps = carry
        batch, sampling = _batch(st, B, Pc, G)
        cache, out = paged.step(params, cache, batch, sampling, cfg, table)
        t, lp = out.tokens, out.logprobs
        live = st.active[:B]
        counted = (live & st.is_penalized[:B]).astype(jnp.int32)
        table = table.replace(counts=table.counts.at[st.table_row[:B], t].add(counted))
        st = advance_rows(st, B, t)
        return (cache, st, table, toks.at[j].set(t), lps.at[j].set(lp), top_ids.at[j].set(out.top_ids),
                top_lps.at[j].set(out.top_logprobs))

    K = MAX_TOP_LOGPROBS
    carry = (cache, state, table, jnp.zeros((max_steps, B), jnp.int32), jnp.zeros((max_steps, B), jnp.float32),
             jnp.zeros((max_steps, B, K), jnp.int32), jnp.zeros((max_steps, B, K), jnp.float32))
    return jax.lax.fori_loop(0, num_steps, body, carry)
