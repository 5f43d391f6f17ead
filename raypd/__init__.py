"""raypd: prefill/decode-disaggregated LLM serving for JAX on Ray."""

from raypd.api import Completion, StreamChunk, generate, stream

__all__ = ["generate", "stream", "serve", "connect", "openai_app", "Completion", "StreamChunk"]
__version__ = "0.1.0"


def __getattr__(name):
    """`raypd.serve` / `raypd.connect` import the Ray runtime on first use only, `raypd.openai_app` FastAPI."""
    if name in ("serve", "connect"):
        from raypd.runtime import deployment

        return getattr(deployment, name)
    if name == "openai_app":  # FastAPI is imported on first use only
        from raypd.server.openai_app import openai_app

        return openai_app
    raise AttributeError(f"module 'raypd' has no attribute {name!r}")
