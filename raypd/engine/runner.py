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
import logging

import jax
import jax.numpy as jnp
import numpy as np

from models import Model
from models.sharding import kv_sharding, make_mesh, replicated, shard_params
from raypd.engine import attention, decode_state, paged
from raypd.engine.pages import PageAllocator
from raypd.engine.sampling import SamplingArrays

log = logging.getLogger(__name__)


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
                    position=np.zeros(N, np.int32), min_p=np.zeros(N, np.float32))
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

    @property
    def page_size(self) -> int:
        return self.config.page_size

    def run(self, batch: dict[str, np.ndarray], sampling: dict[str, np.ndarray]):
        """One forward + sample. -> (tokens [B*R], logprobs [B*R]) as numpy."""
        put = lambda a: jax.device_put(a, self._replicated)  # noqa: E731
        b = paged.Batch(**{k: put(v) for k, v in batch.items()})
        s = SamplingArrays(**{k: put(v) for k, v in sampling.items()})
        self.cache, tokens, logprobs = paged.step(self.params, self.cache, b, s, self.cfg)
        return jax.device_get((tokens, logprobs))

    def run_streamed(self, batch: dict[str, np.ndarray], sampling: dict[str, np.ndarray], on_group):
        """The same as `run`, as one program per layer group (`EngineConfig.layer_groups`).

        `on_group(lo, hi)` is called once layers [lo, hi) are dispatched *and* the next group
        (or the head) is already queued behind them, so whatever it does with those layers'
        pages (read them out, send them) overlaps the computation of the later layers.
        """
        put = lambda a: jax.device_put(a, self._replicated)  # noqa: E731
        b = paged.Batch(**{k: put(v) for k, v in batch.items()})
        s = SamplingArrays(**{k: put(v) for k, v in sampling.items()})
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
        tokens, logprobs = paged.head_step(self.params, x, b, s, self.cfg)
        on_group(*done)
        return jax.device_get((tokens, logprobs))

    # ---------------------------------------------------------------- device-resident decode

    def new_decode_state(self) -> decode_state.DecodeState:
        """Every decode slot free, on the device."""
        empty = decode_state.empty_state(self.config.max_slots, self.max_pages_per_seq)
        return jax.device_put(empty, self._replicated)

    def update_decode_state(self, state: decode_state.DecodeState, update: decode_state.RowUpdate):
        """Apply a host-built row update (numpy) to the state (donated)."""
        return decode_state.apply_update(state, jax.device_put(update, self._replicated))

    def decode(self, state: decode_state.DecodeState, num_steps: int, B: int, Pc: int):
        """Dispatch `num_steps` decode steps over the first B rows of the state (donated, as is
        the pool) without waiting for them. -> (state, tokens [k, B], logprobs [k, B]) on the
        device, their copy to the host already started."""
        self.cache, state, tokens, logprobs = decode_state.decode_steps(
            self.params, self.cache, state, self._step_counts[num_steps], self.cfg, B, Pc,
            self.config.max_decode_steps)
        tokens.copy_to_host_async()
        logprobs.copy_to_host_async()
        return state, tokens, logprobs

    def read_layer_pages(self, pages: list[int], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """K/V of layers [lo, hi) for `pages` -> k, v [hi - lo, n, G, K, H] (blocks until written)."""
        sub = paged.KVCache(k=self.cache.k[lo:hi], v=self.cache.v[lo:hi])
        k, v = paged.read_pages(sub, jnp.asarray(pages, jnp.int32))
        return jax.device_get((k, v))

    def write_pages(self, pages: list[int], k: np.ndarray, v: np.ndarray) -> None:
        self.cache = paged.write_pages(self.cache, jnp.asarray(pages, jnp.int32), k, v)

    def read_pages(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        k, v = paged.read_pages(self.cache, jnp.asarray(pages, jnp.int32))
        return jax.device_get((k, v))

    # ---------------------------------------------------------------- batch building

    def empty_batch(self, B: int, T: int, R: int, Pc: int) -> tuple[dict, dict]:
        return empty_batch(B, T, R, Pc)

    def warmup(self) -> int:
        """Compile every bucketed shape once. Returns the number of shapes run."""
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
        state = self.new_decode_state()
        S, P = self.config.max_slots, self.max_pages_per_seq
        update = decode_state.RowUpdate(perm=np.arange(S, dtype=np.int32), is_new=np.zeros(S, bool),
                                        num_rows=np.int32(0), rows=decode_state.empty_state(S, P))
        for B in self.batch_buckets:
            for Pc in self.page_buckets:
                state = self.update_decode_state(state, update)
                for _ in range(2):
                    state, tokens, _ = self.decode(state, 1, B, Pc)
                count += 1
        jax.block_until_ready(tokens)
        return count
