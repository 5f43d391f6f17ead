"""raypd models: the Llama family in JAX, weight loading and presets.

`models.load(source)` is the one entry point. `source` is a preset name (`models.PRESETS`),
the name of a model shipped in the package (`models.DEFAULT_MODEL`), a Hugging Face directory
(`config.json` + safetensors) or a raypd orbax directory (`raypd_config.json` + `params/`).
"""

from __future__ import annotations

from models.config import DTYPES, SUPPORTED_ARCHITECTURES, ModelConfig, from_hf_config  # noqa: F401 - re-exported
from models.presets import PRESET_SEED, PRESETS  # noqa: F401
from models.tokenizer import ByteTokenizer, HFTokenizer  # noqa: F401
from models.tokens import DATA_DIR, DEFAULT_MODEL, check_token_ids  # noqa: F401

__all__ = ["Model", "ModelConfig", "load", "PRESETS", "DEFAULT_MODEL", "SUPPORTED_ARCHITECTURES"]

# JAX-backed names, imported on first use (models/model.py): `import models` stays light.
_HEAVY = {"Model": "models.model", "load": "models.model", "forward": "models.llama", "init_params": "models.llama",
          "Params": "models.llama", "checkpoint": "models.checkpoint"}


def __getattr__(name):
    if name in _HEAVY:
        import importlib

        module = importlib.import_module(_HEAVY[name])
        return module if name == "checkpoint" else getattr(module, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
