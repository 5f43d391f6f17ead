"""raypd: prefill/decode-disaggregated LLM serving for JAX on Ray."""

from raypd.api import Completion, StreamChunk, generate, stream

__all__ = ["generate", "stream", "serve", "connect", "simulate", "plan", "Completion", "StreamChunk"]
__version__ = "0.1.0"


def __getattr__(name):
    """`raypd.serve` / `raypd.connect` import the Ray runtime on first use only."""
    if name in ("serve", "connect"):
        from raypd.runtime import deployment

        return getattr(deployment, name)
    if name in ("simulate", "plan"):
        from raypd import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'raypd' has no attribute {name!r}")
