"""Presets: model shapes that need no download, with weights drawn from a fixed seed."""

from __future__ import annotations

from models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # For tests: loads in well under a second.
    "tiny-random": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=1024, eos_token_ids=(2,), bos_token_id=1),
    # The shape used for CPU performance work (~100M parameters).
    "bench-random": ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
        num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=4096, eos_token_ids=(2,), bos_token_id=1),
    # The shape used for GPU performance work (~1.1B parameters, Llama-3.2-1B-like).
    "bench-1b-random": ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=(2,), bos_token_id=1,
        dtype="bfloat16"),
}
PRESET_SEED = 0
