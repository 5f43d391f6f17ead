"""Model configuration: one frozen, hashable dataclass for the whole Llama family.

`ModelConfig` is usable as a `jax.jit` static argument. `from_hf_config` maps a Hugging Face
`config.json` dict onto it and rejects what raypd does not implement, before any weight is read.

Shape legend used across raypd: B batch/slots, T new tokens, S cache length, L layers,
N query heads, K kv heads, Q query heads per kv head (N // K), H head dim, D model dim,
F ffn dim, V vocab, P pages, G tokens per page.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 RoPE scaling as (factor, low_freq_factor, high_freq_factor, original_max_pos), or None.
    rope_llama3: tuple[float, float, float, int] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias): biases on q/k/v
    o_bias: bool = False  # Llama attention_bias also puts a bias on o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over H on q and k before RoPE
    sliding_window: int | None = None  # Mistral: keys older than this many positions are masked
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:  # Q
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_llama3") is not None:
            d["rope_llama3"] = tuple(d["rope_llama3"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def num_params(self) -> int:
        D, F, L, V, H = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size, self.head_dim
        attn = D * (self.num_heads + 2 * self.num_kv_heads) * H + self.num_heads * H * D
        per_layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [H/2] (float32), with llama3 scaling when configured."""
        H = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
        if self.rope_llama3 is None:
            return inv.astype(np.float32)
        factor, low, high, old_len = self.rope_llama3
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(hf: dict, dtype: str | None = None) -> ModelConfig:
    """Map a Hugging Face `config.json` dict to a ModelConfig, or raise ValueError saying why not."""
    archs = hf.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        model_type = hf.get("model_type")
        if model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        else:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    if arch in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(f"config.json: use_sliding_window=true is not supported for {arch}")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_llama3 = None
    if rope_type == "llama3":
        rope_llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]),
                       int(rope.get("original_max_position_embeddings",
                                    hf.get("max_position_embeddings", 8192))))
    elif rope_type not in ("default", None):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; supported: default, llama3")
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")

    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    attention_bias = bool(hf.get("attention_bias", False))
    if dtype is None:
        dtype = {"bfloat16": "bfloat16"}.get(str(hf.get("torch_dtype") or hf.get("dtype")), "float32")
    hf_sliding = hf.get("sliding_window") if arch == "mistral" else None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_llama3=rope_llama3,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(arch == "qwen2") or attention_bias,
        o_bias=attention_bias and arch == "llama",
        qk_norm=(arch == "qwen3"),
        sliding_window=int(hf_sliding) if hf_sliding else None,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    """The inverse of from_hf_config, for writing HF-layout directories (presets, the default model)."""
    arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[cfg.architecture]
    d = {
        "architectures": [arch],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.dtype,
        "hidden_act": "silu",
    }
    if cfg.rope_llama3 is not None:
        f, lo, hi, old = cfg.rope_llama3
        d["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                             "high_freq_factor": hi, "original_max_position_embeddings": old}
    if cfg.architecture == "llama":
        d["attention_bias"] = cfg.o_bias
    if cfg.architecture == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return d
