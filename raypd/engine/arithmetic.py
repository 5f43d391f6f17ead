"""An arithmetic model runner: `ModelRunner`'s interface with integer arithmetic for a model.

The real engines (`PrefillEngine`, `DecodeEngine`), the K/V codec, transfers and host copies
run over it unchanged, so an orchestration test exercises the production K/V path (cached
prefixes, chunking, page tables, codecs, host copies, layer streaming) at no compile cost,
and every token can be worked out by hand:

    next token = (weight * sum of the tokens at positions 0..p) % vocab_size

for the token sampled at position p (the last prompt token for prefill, the fed token for a
decode step); logprob is -1.0. `prefill_weight` serves `run` (prefill chunks),
`decode_weight` serves `decode`, so tokens tell which kind of call produced them. Sampling
parameters and the penalty table are ignored (every row is greedy). A decode dispatch runs
the real step inputs and row bookkeeping of `decode_state` (`step_batch`, `advance_rows`:
stop ids and token budgets; `update_rows` for inserts) in numpy, so only the model is a
stand-in. Top alternatives: the chosen token first, then the next ids, each 1.0 less likely;
prompt logprobs are all -1.0.

The tokens before the chunk are *read back from the page pool*, never from the request: each
written slot holds the token in K and its position in V, as base-32 digits over the H = 2
channels of one KV head (both < 1024). A wrong page table, a stale or mis-transferred page,
or a prefix cached under the wrong tokens changes the output; a page holding another position
raises. Digits below 32 survive the INT8 codec exactly after rounding (step <= 31/127 < 1/2),
so compressed transfers and host copies are exact too.
Shapes: as raypd/engine/runner.py; L = 1, K = 1, H = 2.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.sharding import make_mesh
from raypd.engine import decode_state, paged
from raypd.engine.api import MAX_TOP_LOGPROBS
from raypd.engine.pages import PageAllocator
from raypd.engine.runner import EngineConfig, _fine_upto, _pow2_upto, empty_batch
from raypd.engine.sampling import Sampled, empty_table

BASE = 32  # one digit per H channel
MAX_VALUE = BASE * BASE  # token ids and positions must stay below this
LOGPROB = -1.0


def arithmetic_config(vocab_size: int, max_seq_len: int, eos_ids: tuple[int, ...] = ()) -> ModelConfig:
    """The ModelConfig the arithmetic runner presents (one layer, one KV head, H = 2)."""
    for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
        if not 1 <= value <= MAX_VALUE:
            raise ValueError(f"{name} must be in [1, {MAX_VALUE}] for the arithmetic runner, got {value}")
    return ModelConfig(architecture="llama", vocab_size=vocab_size, hidden_size=2, intermediate_size=1,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2,
                       max_position_embeddings=max_seq_len, eos_token_ids=tuple(eos_ids))


def _digits(x: np.ndarray) -> np.ndarray:
    """int [...] -> float32 [..., 2] base-32 digits (high, low)."""
    x = np.asarray(x, np.int64)
    return np.stack([x // BASE, x % BASE], axis=-1).astype(np.float32)


def _top(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [...] -> top ids, logprobs [..., K]: the token, then the next ids, 1.0 less likely each."""
    j = np.arange(MAX_TOP_LOGPROBS)
    ids = (np.asarray(tokens)[..., None] + j) % vocab_size
    return ids.astype(np.int32), np.broadcast_to(LOGPROB - j, ids.shape).astype(np.float32)


def _value(d: np.ndarray) -> np.ndarray:
    """float [..., 2] digits -> int64 [...] (rounded: exact after an INT8 round trip)."""
    d = np.rint(d).astype(np.int64)
    return d[..., 0] * BASE + d[..., 1]


class ArithmeticRunner:
    """A stand-in for `ModelRunner` (same attributes and methods the engines and the transfer
    code use); `step_delay_s` is the time each decode step takes, for failure tests."""

    def __init__(self, cfg: ModelConfig, config: EngineConfig = EngineConfig(), prefill_weight: int = 1,
                 decode_weight: int = 1, step_delay_s: float = 0.0):
        self.cfg, self.config = cfg, config
        self.prefill_weight, self.decode_weight, self.step_delay_s = prefill_weight, decode_weight, step_delay_s
        self.max_seq_len = min(config.max_seq_len, cfg.max_position_embeddings)
        self.mesh = make_mesh(1)
        G = config.page_size
        num_pages = config.num_pages or max(2, config.kv_memory_bytes // paged.kv_bytes_per_page(cfg, G))
        self.allocator = PageAllocator(num_pages, G)
        shape = (1, num_pages, G, 2)  # [K, P, G, H]
        self.cache = paged.KVCache(k=(jnp.zeros(shape, jnp.float32),), v=(jnp.zeros(shape, jnp.float32),))
        self.max_pages_per_seq = self.allocator.pages_for(self.max_seq_len)
        self.page_buckets = _fine_upto(self.max_pages_per_seq)
        self.batch_buckets = _pow2_upto(config.max_slots)
        self.prefill_buckets = tuple(b for b in config.prefill_buckets if b <= self.max_seq_len) \
            or (self.max_seq_len,)
        if config.layer_groups != 1:
            raise ValueError(f"layer_groups must be 1 for the arithmetic runner (one layer), got {config.layer_groups}")
        self.layer_groups = ((0, 1),)

    @property
    def page_size(self) -> int:
        return self.config.page_size

    # ---------------------------------------------------------------- the pool, as numpy

    def _pool(self) -> tuple[np.ndarray, np.ndarray]:
        """The pool as writable numpy: token, position [P, G] of every slot (0 where never written)."""
        return _value(np.asarray(self.cache.k[0])[0]), _value(np.asarray(self.cache.v[0])[0])

    def _store(self, tokens: np.ndarray, positions: np.ndarray) -> None:
        self.cache = paged.KVCache(k=(jnp.asarray(_digits(tokens)[None]),),
                                   v=(jnp.asarray(_digits(positions)[None]),))

    @staticmethod
    def _context_sum(tok: np.ndarray, pos: np.ndarray, table: np.ndarray, n: int, G: int) -> int:
        """Sum of the tokens at positions 0..n-1 read through page table `table` (only its
        pages are visible, as in paged attention); a slot holding another position raises."""
        n = min(n, len(table) * G)
        if n <= 0:
            return 0
        p = np.arange(n)
        pages, offsets = np.asarray(table)[p // G], p % G
        if not np.array_equal(pos[pages, offsets], p):
            bad = int(np.flatnonzero(pos[pages, offsets] != p)[0])
            raise AssertionError(f"page {int(pages[bad])} offset {int(offsets[bad])} holds position "
                                 f"{int(pos[pages[bad], offsets[bad]])}, expected {bad}")
        return int(tok[pages, offsets].sum())

    # ---------------------------------------------------------------- prefill

    def empty_batch(self, B: int, T: int, R: int, Pc: int) -> tuple[dict, dict]:
        return empty_batch(B, T, R, Pc)

    def run(self, batch: dict[str, np.ndarray], sampling: dict[str, np.ndarray], table=None) -> Sampled:
        """One prefill chunk (raypd.engine.paged.Batch as numpy). -> Sampled, as numpy."""
        return self._forward(batch, self.prefill_weight)

    def _forward(self, batch: dict[str, np.ndarray], weight: int) -> Sampled:
        """Write the batch's tokens into the pool and sample every sample row by the rule."""
        tok, pos = self._pool()
        G, V = self.page_size, self.cfg.vocab_size
        B, R = batch["sample_index"].shape
        out = np.zeros(B * R, np.int32)
        for b in range(B):
            live = batch["positions"][b] >= 0
            tok[batch["write_pages"][b][live], batch["write_offsets"][b][live]] = batch["tokens"][b][live]
            pos[batch["write_pages"][b][live], batch["write_offsets"][b][live]] = batch["positions"][b][live]
            ctx = self._context_sum(tok, pos, batch["ctx_pages"][b], int(batch["ctx_lens"][b]), G)
            seg = batch["segments"][b]
            for r in range(R):
                i = int(batch["sample_index"][b, r])
                if seg[i] < 0:
                    continue
                mine = (seg[: i + 1] == seg[i])
                total = int(batch["tokens"][b, : i + 1][mine].sum()) + (ctx if seg[i] == 0 else 0)
                out[b * R + r] = (weight * total) % V
        self._store(tok, pos)
        return Sampled(out, np.full(B * R, LOGPROB, np.float32), *_top(out, V))

    def run_streamed(self, batch, sampling, on_group, table=None) -> Sampled:
        out = self.run(batch, sampling, table)
        on_group(0, 1)
        return out

    def prompt_logprobs(self, prompt_ids) -> list[float]:
        return [LOGPROB] * (len(prompt_ids) - 1)

    # ---------------------------------------------------------------- decode

    def new_decode_state(self) -> decode_state.DecodeState:
        return decode_state.empty_state(self.config.max_slots, self.max_pages_per_seq)

    def update_decode_state(self, state: decode_state.DecodeState, update: decode_state.RowUpdate):
        """`decode_state.apply_update`, in numpy."""
        return decode_state.update_rows(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, update), np)

    def neutral_table(self, num_rows: int):
        return empty_table(num_rows, self.cfg.vocab_size)

    def new_penalty_table(self):
        return self.neutral_table(self.config.max_slots)

    def write_table_row(self, table, row: int, token_ids, num_prompt: int, bias_ids, bias_values, suppress_ids):
        return table  # penalties do not change the arithmetic

    def decode(self, state: decode_state.DecodeState, table, num_steps: int, B: int, Pc: int,
               with_top: bool = False):
        """`decode_state.decode_steps` on the host: up to `num_steps` steps over the first B
        rows, each the real step inputs (`step_batch`) through the rule, then the real row
        bookkeeping (`advance_rows`: stop ids, budgets). -> (state, table, tokens [k, B],
        logprobs [k, B], top ids, top logprobs [k, B, K])."""
        time.sleep(self.step_delay_s * num_steps)  # a "device" whose every step takes step_delay_s
        k = self.config.max_decode_steps
        st = jax.tree.map(np.array, state)  # a copy: the caller's state is "donated"
        tokens, logprobs = np.zeros((k, B), np.int32), np.zeros((k, B), np.float32)
        for j in range(num_steps):
            batch = decode_state.step_batch(st, B, Pc, self.page_size, np)
            out = self._forward({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                                self.decode_weight)
            tokens[j], logprobs[j] = out.tokens, out.logprobs
            st = decode_state.advance_rows(st, B, out.tokens, np)
        return (st, table, tokens, logprobs) + _top(tokens, self.cfg.vocab_size)

    # ---------------------------------------------------------------- pages in and out

    def read_layer_pages(self, pages: list[int], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_pages(pages)

    def read_pages(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """-> k, v [L, n, G, K, H]."""
        ids = np.asarray(pages, np.int64)
        k, v = (np.asarray(c[0])[:, ids].transpose(1, 2, 0, 3)[None] for c in (self.cache.k, self.cache.v))
        return k, v

    def write_pages(self, pages: list[int], k: np.ndarray, v: np.ndarray) -> None:
        self.cache = paged.write_pages(self.cache, jnp.asarray(pages, jnp.int32), k, v)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        k, v = self.read_pages(src)
        self.write_pages(dst, k, v)

    def warmup(self) -> int:
        return 0  # nothing to compile

    def warmup_transfers(self) -> int:
        return 0  # pages are read in numpy; nothing here is timed, so nothing is compiled ahead


def expected_tokens(prompt: list[int], max_tokens: int, prefill_weight: int, decode_weight: int,
                    vocab_size: int) -> list[int]:
    """The tokens the rule gives a prompt prefilled with `prefill_weight` and decoded with
    `decode_weight` without interruption (no stop ids)."""
    total, out = sum(prompt), []
    for i in range(max_tokens):
        out.append((total * (prefill_weight if i == 0 else decode_weight)) % vocab_size)
        total += out[-1]
    return out
