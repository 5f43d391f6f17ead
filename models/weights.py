"""Hugging Face safetensors <-> raypd Params, checking every tensor's name and shape as it maps.

HF stores projections as [out, in] matrices with heads flattened; raypd groups query heads by
their kv head (see models/llama.py). `read_hf_tensors` reads one or many `*.safetensors` files
(following `model.safetensors.index.json` when present) and fails on the first tensor whose
name is unknown or whose shape does not match the config, naming the tensor and both shapes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.llama import LayerParams, Params

log = logging.getLogger(__name__)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its HF shape."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (N * H,), p + "self_attn.k_proj.bias": (K * H,),
                           p + "self_attn.v_proj.bias": (K * H,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (H,), p + "self_attn.k_norm.weight": (H,)})
    return shapes


def _index_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: listed in model.safetensors.index.json but missing")
    return files


def read_hf_tensors(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read every tensor of an HF checkpoint directory as float32 numpy arrays.

    All headers are checked (names, shapes, dtypes, nothing missing) before any tensor data is
    read, so a mismatched checkpoint fails in milliseconds whatever its size."""
    path = Path(path)
    expected = hf_tensor_shapes(cfg)
    headers = [(f, *_header(f)) for f in _index_files(path)]
    seen: set[str] = set()
    for f, header, _ in headers:
        for name, info in header.items():
            if name == "__metadata__" or name.endswith(_IGNORED_SUFFIXES):
                continue
            if name not in expected:
                raise ValueError(f"{f.name}: unexpected tensor {name!r} for a {cfg.architecture} config")
            shape = tuple(info["shape"])
            if shape != expected[name]:
                raise ValueError(f"{f.name}: tensor {name!r} has shape {shape}, "
                                 f"config expects {expected[name]}")
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{f.name}: tensor {name!r} has unsupported dtype {info['dtype']} "
                                 f"(supported: {sorted(_ST_DTYPES)})")
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}")

    from tqdm import tqdm

    tensors: dict[str, np.ndarray] = {}
    total = sum(f.stat().st_size for f, _, _ in headers)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}",
              disable=total < (256 << 20)) as bar:
        for f, header, data_start in headers:
            for name in seen.intersection(header):
                tensors[name] = _read_float32(f, name, header, data_start)
                begin, end = header[name]["data_offsets"]
                bar.update(end - begin)
    return tensors


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _header(f: Path) -> tuple[dict, int]:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n


def _read_float32(f: Path, name: str, header: dict, data_start: int) -> np.ndarray:
    """One tensor as float32, read straight from the file (numpy has no bfloat16, so BF16 is
    widened from its raw bits: a bfloat16 is the top half of a float32)."""
    info = header[name]
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{f.name}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    raw = np.memmap(f, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    arr = raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Map checked HF tensors onto raypd's layout, in cfg.dtype."""
    D, K, Q, H = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    layers: dict[str, list] = {f: [] for f in LayerParams.__dataclass_fields__}
    for i in range(cfg.num_layers):
        t = lambda n: tensors[f"model.layers.{i}.{n}"]  # noqa: E731
        q = t("self_attn.q_proj.weight").T.reshape(D, K, Q, H)
        k = t("self_attn.k_proj.weight").T.reshape(D, K, 1, H)
        v = t("self_attn.v_proj.weight").T.reshape(D, K, 1, H)
        layers["wqkv"].append(np.concatenate([q, k, v], axis=2))
        if cfg.qkv_bias:
            layers["bqkv"].append(np.concatenate([
                t("self_attn.q_proj.bias").reshape(K, Q, H),
                t("self_attn.k_proj.bias").reshape(K, 1, H),
                t("self_attn.v_proj.bias").reshape(K, 1, H)], axis=1))
        if cfg.qk_norm:
            layers["q_norm"].append(t("self_attn.q_norm.weight"))
            layers["k_norm"].append(t("self_attn.k_norm.weight"))
        layers["wo"].append(t("self_attn.o_proj.weight").T.reshape(K, Q, H, D))
        if cfg.o_bias:
            layers["bo"].append(t("self_attn.o_proj.bias"))
        layers["attn_norm"].append(t("input_layernorm.weight"))
        layers["mlp_norm"].append(t("post_attention_layernorm.weight"))
        layers["w_gate_up"].append(np.stack([t("mlp.gate_proj.weight").T, t("mlp.up_proj.weight").T], axis=1))
        layers["w_down"].append(t("mlp.down_proj.weight").T)
    stacked = {f: (jnp.asarray(np.stack(v), dtype) if v else None) for f, v in layers.items()}
    return Params(
        embed=jnp.asarray(tensors["model.embed_tokens.weight"], dtype),
        layers=LayerParams(**stacked),
        final_norm=jnp.asarray(tensors["model.norm.weight"], dtype),
        lm_head=None if cfg.tie_word_embeddings else jnp.asarray(tensors["lm_head.weight"].T, dtype),
    )


def params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """raypd Params -> HF tensors (float32 numpy), the inverse of params_from_hf."""
    D, K, Q, H = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # noqa: E731
    lp = params.layers
    out = {"model.embed_tokens.weight": f32(params.embed), "model.norm.weight": f32(params.final_norm)}
    if params.lm_head is not None:
        out["lm_head.weight"] = f32(params.lm_head).T
    wqkv, wo, gu, down = f32(lp.wqkv), f32(lp.wo), f32(lp.w_gate_up), f32(lp.w_down)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = wqkv[i, :, :, :Q].reshape(D, K * Q * H).T
        out[p + "self_attn.k_proj.weight"] = wqkv[i, :, :, Q].reshape(D, K * H).T
        out[p + "self_attn.v_proj.weight"] = wqkv[i, :, :, Q + 1].reshape(D, K * H).T
        out[p + "self_attn.o_proj.weight"] = wo[i].reshape(K * Q * H, D).T
        if lp.bqkv is not None:
            b = f32(lp.bqkv[i])
            out[p + "self_attn.q_proj.bias"] = b[:, :Q].reshape(-1)
            out[p + "self_attn.k_proj.bias"] = b[:, Q].reshape(-1)
            out[p + "self_attn.v_proj.bias"] = b[:, Q + 1].reshape(-1)
        if lp.bo is not None:
            out[p + "self_attn.o_proj.bias"] = f32(lp.bo[i])
        if lp.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = f32(lp.q_norm[i])
            out[p + "self_attn.k_norm.weight"] = f32(lp.k_norm[i])
        out[p + "input_layernorm.weight"] = f32(lp.attn_norm[i])
        out[p + "post_attention_layernorm.weight"] = f32(lp.mlp_norm[i])
        out[p + "mlp.gate_proj.weight"] = gu[i, :, 0].T
        out[p + "mlp.up_proj.weight"] = gu[i, :, 1].T
        out[p + "mlp.down_proj.weight"] = down[i].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf(path: str | os.PathLike, params: Params, cfg: ModelConfig, *, dtype: str | None = None) -> None:
    """Write config.json + model.safetensors (float32, or `dtype` when given as 'float16')."""
    from models.config import to_hf_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(params, cfg)
    if dtype == "float16":
        tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
