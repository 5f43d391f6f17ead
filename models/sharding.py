"""Tensor-parallel sharding: logical axes of the parameters mapped onto a 1-D "tp" mesh.

KV heads and the MLP hidden dimension are split over "tp"; everything else is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.llama import Params, is_axes_leaf, logical_axes

TP_AXIS = "tp"
LOGICAL_RULES = (("kv_heads", TP_AXIS), ("mlp", TP_AXIS))


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh over the first `num_devices` local devices (all when None)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {n}")
    return Mesh(np.array(devices[:n]), (TP_AXIS,))


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if cfg.num_kv_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tensor parallel degree {tp} must divide num_kv_heads "
                         f"({cfg.num_kv_heads}) and intermediate_size ({cfg.intermediate_size})")


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """NamedSharding for every parameter (same tree as Params)."""
    check_tp(cfg, mesh.shape[TP_AXIS])
    specs = jax.tree.map(lambda axes: PartitionSpec(*axes), logical_axes(cfg), is_leaf=is_axes_leaf)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    return jax.device_put(params, param_shardings(cfg, mesh))


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of one layer's KV page pool [K, P, G, H]: kv heads over "tp"."""
    return NamedSharding(mesh, PartitionSpec(TP_AXIS, None, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
