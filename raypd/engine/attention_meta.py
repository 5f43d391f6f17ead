"""The attention contract's shared types (no kernels): what attention.py's implementations and
the Pallas kernel in attention_pallas.py both take."""

from __future__ import annotations

import jax
from flax import struct

MASK_VALUE = -1e30


@struct.dataclass
class AttentionMeta:
    """Which keys each query sees (the host-built part of paged.Batch that attention needs)."""

    positions: jax.Array  # [B, T] int32; -1 for padding
    segments: jax.Array  # [B, T] int32; -1 for padding
    ctx_pages: jax.Array  # [B, Pc] int32; page table of the context (0-padded)
    ctx_lens: jax.Array  # [B] int32; context tokens visible to segment 0
