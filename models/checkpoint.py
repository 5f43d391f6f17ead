"""Save and restore Params with orbax-checkpoint, restoring straight into a target sharding.

Layout of a raypd checkpoint directory: `raypd_config.json` (the ModelConfig), `params/`
(orbax), and, when the model has one, `tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from models.config import ModelConfig
from models.llama import Params, is_axes_leaf, param_shapes

CONFIG_FILE = "raypd_config.json"


def save(path: str | Path, params: Params, cfg: ModelConfig, tokenizer_file: str | Path | None = None) -> None:
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: output directory exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", params)
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, path / "tokenizer.json")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def read_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))


def restore(path: str | Path, cfg: ModelConfig, shardings: Params | None = None) -> Params:
    """Restore Params; with `shardings` (a Params tree of jax shardings) each array lands sharded."""
    path = Path(path).absolute()
    shapes = param_shapes(cfg)
    dtype = jax.numpy.dtype(cfg.dtype)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes, is_leaf=is_axes_leaf)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh),
                          shapes, shardings, is_leaf=is_axes_leaf)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path / "params", target)
