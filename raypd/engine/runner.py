"""ModelRunner: the weights, one page pool and the compiled step, for one device mesh.

The runner turns host-built numpy batches into one jitted call (cache donated) and brings
back the sampled tokens and their logprobs in a single device-to-host transfer (prefill). Decode
runs from a batch state kept on the device (`decode`, raypd/engine/decode_state.py): nothing
is sent per step, and the tokens come back by an asynchronous copy the caller reads later. Shapes are
bucketed so a serving engine compiles a fixed set of programs once, at warm-up:
  - chunk lengths T from `prefill_buckets` (prefill) or 1 (decode),
  - batch rows B: 1 for prefill, powers of two up to `max_slots` for decode,
  - context pages Pc: 0 (no context) or 1, 2, 3, 4, 6, 8, 12, ... up to the pages of `max_seq_len`
    (attention cost grows with Pc, so its buckets are finer than powers of two).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from models import Model, llama
from models.sharding import kv_sharding, make_mesh, replicated, shard_params
from raypd.engine import attention, decode_state, kv_codec, paged
from raypd.engine.pages import PageAllocator
from raypd.engine.api import MAX_LOGIT_BIAS
from raypd.engine.sampling import MAX_SUPPRESS_IDS, PenaltyTable, SamplingArrays, empty_table

log = logging.getLogger(__name__)


# SamplingArrays fields whose empty_batch values are neutral (a row that uses none of them)
NEUTRAL_SAMPLING_FIELDS = ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_position",
                           "is_penalized", "table_row", "num_top_logprobs")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16  # G
    kv_memory_bytes: int = 256 << 20  # page pool budget (K and V together)
    num_pages: int | None = None  # overrides kv_memory_bytes when set
    max_slots: int = 32  # decode batch capacity
    max_seq_len: int = 2048  # prompt + generated tokens
    prefill_buckets: tuple[int, ...] = (32, 128, 512)  # chunk lengths compiled for prefill
    max_prefill_segments: int = 8  # prompts packed into one prefill chunk
    tp: int = 1  # tensor-parallel degree (devices of the mesh)
    layer_groups: int = 1  # prefill in this many programs, to stream K/V out layer group by group
    max_decode_steps: int = 8  # decode steps one dispatch may run (on-device stop checks)

    def __post_init__(self):
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if not self.prefill_buckets or list(self.prefill_buckets) != sorted(set(self.prefill_buckets)):
            raise ValueError(f"prefill_buckets must be increasing, got {self.prefill_buckets}")
        if isinstance(self.max_decode_steps, bool) or not isinstance(self.max_decode_steps, int) \
                or not 1 <= self.max_decode_steps <= 64:
            raise ValueError(f"max_decode_steps must be an integer in [1, 64], got {self.max_decode_steps!r}")


def _pow2_upto(n: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return tuple(out + [n])


def _fine_upto(n: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to n: at most ~33% padding instead of pow2's 100%."""
    out = sorted({b for k in range(n.bit_length() + 1) for b in (1 << k, 3 << k >> 1) if 1 <= b < n})
    return tuple(out + [n])


@functools.partial(jax.jit, static_argnums=2)
def _prompt_logprobs(params, tokens: jax.Array, cfg) -> jax.Array:
    """tokens [1, T] -> [1, T - 1]: log p(tokens[t + 1] | tokens[:t + 1])."""
    logp = jax.nn.log_softmax(llama.forward(params, tokens, cfg).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]


def bucket(value: int, buckets) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def empty_batch(B: int, T: int, R: int, Pc: int) -> tuple[dict, dict]:
    """A padding-only step input (numpy): the paged.Batch and SamplingArrays fields."""
    batch = dict(
        tokens=np.zeros((B, T), np.int32),
        positions=np.full((B, T), -1, np.int32),
        segments=np.full((B, T), -1, np.int32),
        write_pages=np.zeros((B, T), np.int32),
        write_offsets=np.zeros((B, T), np.int32),
        ctx_pages=np.zeros((B, Pc), np.int32),
        ctx_lens=np.zeros((B,), np.int32),
        sample_index=np.zeros((B, R), np.int32),
    )
    N = B * R
    sampling = dict(temperature=np.zeros(N, np.float32), top_k=np.zeros(N, np.int32),
                    top_p=np.ones(N, np.float32), seed=np.zeros(N, np.uint32),
                    position=np.zeros(N, np.int32), min_p=np.zeros(N, np.float32),
                    frequency_penalty=np.zeros(N, np.float32), presence_penalty=np.zeros(N, np.float32),
                    repetition_penalty=np.ones(N, np.float32), min_position=np.zeros(N, np.int32),
                    is_penalized=np.zeros(N, bool), table_row=np.arange(N, dtype=np.int32),
                    num_top_logprobs=np.zeros(N, np.int32))
    return batch, sampling


class ModelRunner:
    def __init__(self, model: Model, config: EngineConfig = EngineConfig(), devices=None):
        self.model = model
        self.cfg = model.config
        self.config = config
        self.max_seq_len = min(config.max_seq_len, self.cfg.max_position_embeddings)
        self.mesh = make_mesh(config.tp, devices)
        platform = self.mesh.devices.flat[0].platform
        self.params = paged.unstack(shard_params(model.params, self.cfg, self.mesh),
                                    attention.default_impl(platform, config.tp))
        G = config.page_size
        num_pages = config.num_pages or max(
            2, config.kv_memory_bytes // paged.kv_bytes_per_page(self.cfg, G))
        self.allocator = PageAllocator(num_pages, G)
        self.cache = paged.init_cache(self.cfg, num_pages, G, kv_sharding(self.mesh))
        self._replicated = replicated(self.mesh)
        self.max_pages_per_seq = self.allocator.pages_for(self.max_seq_len)
        self.page_buckets = _fine_upto(self.max_pages_per_seq)
        self.batch_buckets = _pow2_upto(config.max_slots)
        self.prefill_buckets = tuple(b for b in config.prefill_buckets if b <= self.max_seq_len) \
            or (self.max_seq_len,)
        L, n = self.cfg.num_layers, config.layer_groups
        if not 1 <= n <= L:
            raise ValueError(f"layer_groups must be in [1, {L}], got {n}")
        edges = [round(i * L / n) for i in range(n + 1)]
        self.layer_groups = tuple(zip(edges[:-1], edges[1:]))  # [(lo, hi)] covering all layers
        # decode step counts as device scalars, placed once: a decode dispatch sends no arrays
        self._step_counts = [jax.device_put(np.int32(n), self._replicated)
                             for n in range(config.max_decode_steps + 1)]
        self._neutral_tables: dict = {}  # rows -> a neutral table on the device (and neutral sampling fields)

    def neutral_table(self, num_rows: int) -> PenaltyTable:
        """A table of `num_rows` neutral rows, placed once: a chunk without penalties sends none."""
        if num_rows not in self._neutral_tables:
            self._neutral_tables[num_rows] = jax.device_put(empty_table(num_rows, self.cfg.vocab_size),
                                                            self._replicated)
        return self._neutral_tables[num_rows]

    def _inputs(self, batch: dict, sampling: dict, table: PenaltyTable | None):
        put = lambda a: jax.device_put(a, self._replicated)  # noqa: E731
        b = paged.Batch(**{k: put(v) for k, v in batch.items()})
        N = len(sampling["temperature"])
        neutral = {}
        if table is None and not sampling["is_penalized"].any() and not sampling["num_top_logprobs"].any():
            neutral = self._neutral_sampling(N)  # no row uses them: nothing of theirs to send
        s = SamplingArrays(**{k: neutral[k] if k in neutral else put(v) for k, v in sampling.items()})
        t = put(table) if table is not None else self.neutral_table(N)
        return b, s, t

    def _neutral_sampling(self, num_rows: int) -> dict:
        """The penalty and top-logprob fields of `num_rows` rows that use neither, placed once."""
        if ("sampling", num_rows) not in self._neutral_tables:
            _, sampling = self.empty_batch(1, 1, num_rows, 0)
            self._neutral_tables[("sampling", num_rows)] = {
                k: jax.device_put(sampling[k], self._replicated) for k in NEUTRAL_SAMPLING_FIELDS}
        return self._neutral_tables[("sampling", num_rows)]

    @property
    def page_size(self) -> int:
        return self.config.page_size

    def run(self, batch: dict[str, np.ndarray], sampling: dict[str, np.ndarray], table: PenaltyTable | None = None):
        """One forward + sample. `table`: the rows' penalty state (host numpy; None: neutral).
        -> Sampled (tokens [B*R], logprobs [B*R], top alternatives [B*R, K]) as numpy."""
        b, s, t = self._inputs(batch, sampling, table)
        self.cache, out = paged.step(self.params, self.cache, b, s, self.cfg, t)
        return jax.device_get(out)

    def run_streamed(self, batch: dict[str, np.ndarray], sampling: dict[str, np.ndarray], on_group,
                     table: PenaltyTable | None = None):
        """The same as `run`, as one program per layer group (`EngineConfig.layer_groups`).

        `on_group(lo, hi)` is called once layers [lo, hi) are dispatched *and* the next group
        (or the head) is already queued behind them, so whatever it does with those layers'
        pages (read them out, send them) overlaps the computation of the later layers.
        """
        b, s, t = self._inputs(batch, sampling, table)
        x = paged.embed_step(self.params, b)
        k, v = list(self.cache.k), list(self.cache.v)
        done = None
        for lo, hi in self.layer_groups:
            x, k[lo:hi], v[lo:hi] = paged.layers_step(self.params.layers[lo:hi], tuple(k[lo:hi]),
                                                      tuple(v[lo:hi]), x, b, self.cfg,
                                                      self.params.attention)
            self.cache = paged.KVCache(k=tuple(k), v=tuple(v))
            if done is not None:
                on_group(*done)
            done = (lo, hi)
        out = paged.head_step(self.params, x, b, s, self.cfg, t)
        on_group(*done)
        return jax.device_get(out)

    # ---------------------------------------------------------------- device-resident decode

    def new_decode_state(self) -> decode_state.DecodeState:
        """Every decode slot free, on the device."""
        empty = decode_state.empty_state(self.config.max_slots, self.max_pages_per_seq)
        return jax.device_put(empty, self._replicated)

    def update_decode_state(self, state: decode_state.DecodeState, update: decode_state.RowUpdate):
        """Apply a host-built row update (numpy) to the state (donated)."""
        return decode_state.apply_update(state, jax.device_put(update, self._replicated))

    def new_penalty_table(self) -> PenaltyTable:
        """The decode slots' penalty table (one neutral row per slot), on the device."""
        return jax.device_put(empty_table(self.config.max_slots, self.cfg.vocab_size), self._replicated)

    def write_table_row(self, table: PenaltyTable, row: int, token_ids, num_prompt: int, bias_ids: np.ndarray,
                        bias_values: np.ndarray, suppress_ids: np.ndarray) -> PenaltyTable:
        """Fill one row of the table (donated) for an inserted penalized request: `token_ids` are
        its prompt (the first num_prompt) and the tokens generated so far; the rest as in
        raypd/engine/sampling.py's PenaltyTable (one row)."""
        ids = np.full(self.max_pages_per_seq * self.page_size, self.cfg.vocab_size, np.int32)  # one shape
        ids[: len(token_ids)] = token_ids
        args = (np.int32(row), ids, np.int32(num_prompt), bias_ids, bias_values, suppress_ids)
        return decode_state.write_table_row(table, *jax.device_put(args, self._replicated))

    def decode(self, state: decode_state.DecodeState, table: PenaltyTable, num_steps: int, B: int, Pc: int,
               with_top: bool = False):
        """Dispatch `num_steps` decode steps over the first B rows of the state (donated, as are
        the penalty table and the pool) without waiting for them. -> (state, table, tokens [k, B],
        logprobs [k, B], top_ids [k, B, K], top_logprobs [k, B, K]) on the device, the copy of
        the tokens and logprobs to the host already started (of the top ones too when with_top)."""
        self.cache, state, table, tokens, logprobs, top_ids, top_lps = decode_state.decode_steps(
            self.params, self.cache, state, table, self._step_counts[num_steps], self.cfg, B, Pc,
            self.config.max_decode_steps)
        for a in (tokens, logprobs) + ((top_ids, top_lps) if with_top else ()):
            a.copy_to_host_async()
        return state, table, tokens, logprobs, top_ids, top_lps

    def read_layer_pages(self, pages: list[int], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """K/V of layers [lo, hi) for `pages` -> k, v [hi - lo, n, G, K, H] (blocks until written)."""
        return paged.read_pages_to_host(paged.KVCache(k=self.cache.k[lo:hi], v=self.cache.v[lo:hi]), pages)

    def write_pages(self, pages: list[int], k: np.ndarray, v: np.ndarray) -> None:
        self.cache = paged.write_pages_from_host(self.cache, pages, k, v)

    def prompt_logprobs(self, prompt_ids) -> list[float]:
        """The logprob of each prompt token after the first given those before it, by one
        teacher-forced pass over the prompt (padded at the end to a prefill bucket, or a multiple
        of the largest, so a few shapes serve every length; causal: padding changes nothing
        before it). What `echo` with `logprobs` returns; costs a second pass over the prompt."""
        n = len(prompt_ids)
        top = self.prefill_buckets[-1]
        T = bucket(n, self.prefill_buckets) if n <= top else -(-n // top) * top
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = prompt_ids
        out = _prompt_logprobs(self.model.params, jnp.asarray(tokens), self.cfg)
        return [float(x) for x in np.asarray(out)[0, : n - 1]]

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """K/V of pages `src` into pages `dst` (same count), on the device (the pool is donated)."""
        k, v = paged.read_pages(self.cache, jnp.asarray(src, jnp.int32))
        self.cache = paged.write_pages(self.cache, jnp.asarray(dst, jnp.int32), k, v)

    def read_pages(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return paged.read_pages_to_host(self.cache, pages)

    # ---------------------------------------------------------------- batch building

    def empty_batch(self, B: int, T: int, R: int, Pc: int) -> tuple[dict, dict]:
        return empty_batch(B, T, R, Pc)

    def warmup(self) -> int:
        """Compile every bucketed shape once, and the page copy of n > 1 samples (the prompt
        logprobs of `echo` compile on first use, one program per bucket). -> shapes run."""
        count = 0
        R = self.config.max_prefill_segments
        for T in self.prefill_buckets:
            for Pc in (0,) + self.page_buckets:
                self.run(*self.empty_batch(1, T, R, Pc))
                count += 1
                if len(self.layer_groups) > 1:
                    self.run_streamed(*self.empty_batch(1, T, R, Pc), lambda lo, hi: None)
        # decode: the row update and every (B, Pc) program, each from a state made by the other
        # program too (as in serving), all rows free so the pool is left as it was
        state, table = self.new_decode_state(), self.new_penalty_table()
        V = self.cfg.vocab_size
        table = self.write_table_row(table, 0, [], 0, np.full(MAX_LOGIT_BIAS, V, np.int32),
                                     np.zeros(MAX_LOGIT_BIAS, np.float32), np.full(MAX_SUPPRESS_IDS, V, np.int32))
        S, P = self.config.max_slots, self.max_pages_per_seq
        update = decode_state.RowUpdate(perm=np.arange(S, dtype=np.int32), is_new=np.zeros(S, bool),
                                        num_rows=np.int32(0), rows=decode_state.empty_state(S, P))
        for B in self.batch_buckets:
            for Pc in self.page_buckets:
                state = self.update_decode_state(state, update)
                for _ in range(2):
                    state, table, tokens, *_ = self.decode(state, table, 1, B, Pc)
                count += 1
        self.copy_pages([0], [0])  # a sample of n > 1 copying its partial page (the null page: a sink)
        jax.block_until_ready(tokens)
        return count + 1 + self.warmup_transfers()

    def warmup_transfers(self) -> int:
        """Compile the K/V codec's gathers and scatters (raypd.engine.kv_codec) for every page-count
        bucket of one sequence, both compressions, the whole stack and each layer group, reading
        and writing only the null page. -> programs run."""
        buckets = sorted({kv_codec.page_bucket(n) for n in range(1, self.max_pages_per_seq + 1)})
        slices = {(0, self.cfg.num_layers)} | (set(self.layer_groups) if len(self.layer_groups) > 1 else set())
        count = 0
        for lo, hi in sorted(slices):
            for n in buckets:
                for compression in kv_codec.COMPRESSIONS:
                    pages = [0] * n
                    enc = kv_codec.encode(kv_codec.layer_slice(self.cache, lo, hi), pages, n * self.page_size,
                                          compression)
                    self.cache = kv_codec.decode_into(self.cache, pages, enc, first_layer=lo)
                    count += 1
        jax.block_until_ready(self.cache.k[0])
        return count
