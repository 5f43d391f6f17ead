"""A loaded model: `Model` (config, params, tokenizer) and `load(source)`; imports JAX.

`models/__init__.py` re-exports these lazily, so that `import models` (the config, presets,
tokenizers, token-id checks) stays light for processes that never run a model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import checkpoint
from models.config import DTYPES, ModelConfig, from_hf_config
from models.llama import Params, forward, init_params
from models.presets import PRESET_SEED, PRESETS
from models.tokenizer import ByteTokenizer, HFTokenizer
from models.tokens import DATA_DIR, DEFAULT_MODEL, check_token_ids


@functools.partial(jax.jit, static_argnums=2)
def _logits(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return forward(params, tokens, cfg)


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: Params
    tokenizer: HFTokenizer | ByteTokenizer | None
    name: str = ""

    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits [T, V] (float32) for one sequence of token ids, no cache."""
        ids = check_token_ids(token_ids, self.config.vocab_size)
        out = _logits(self.params, jnp.asarray([ids], jnp.int32), self.config)
        return np.asarray(out[0], np.float32)


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def load(source: str | Path | None = None, dtype: str | None = None, *, shardings=None) -> Model:
    """Load a model. See the module docstring for what `source` may be.

    `dtype` ("float32" | "bfloat16") overrides the checkpoint's dtype. `shardings`, a Params tree
    of jax shardings (models.sharding.param_shardings), places the weights as they load.
    """
    _check_dtype(dtype)
    source = DEFAULT_MODEL if source is None else source
    name = str(source)
    if isinstance(source, str) and source in PRESETS:
        cfg = PRESETS[source]
        cfg = cfg.replace(dtype=dtype) if dtype else cfg
        params = init_params(cfg, seed=PRESET_SEED)
        tokenizer = ByteTokenizer(cfg.vocab_size)
    else:
        path = Path(source)
        if isinstance(source, str) and (DATA_DIR / source).is_dir() and not path.exists():
            path = DATA_DIR / source
        if not path.exists():
            shipped = sorted(p.name for p in DATA_DIR.iterdir() if p.is_dir()) if DATA_DIR.exists() else []
            raise ValueError(f"model {name!r} is neither a preset {sorted(PRESETS)}, a shipped model "
                             f"{shipped}, nor an existing directory")
        if not path.is_dir():
            raise ValueError(f"model source {name!r} is not a directory")
        if checkpoint.is_checkpoint(path):
            cfg = checkpoint.read_config(path)
            cfg = cfg.replace(dtype=dtype) if dtype else cfg
            params = checkpoint.restore(path, cfg, shardings)
            shardings = None
        else:
            if not (path / "config.json").exists():
                raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory "
                                 f"or a raypd checkpoint with {checkpoint.CONFIG_FILE})")
            from models.weights import params_from_hf, read_hf_tensors

            cfg = from_hf_config(json.loads((path / "config.json").read_text()), dtype)
            params = params_from_hf(read_hf_tensors(path, cfg), cfg)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            tokenizer = HFTokenizer(path, eos_ids=cfg.eos_token_ids, bos_id=cfg.bos_token_id)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=name)
