"""raypd: prefill/decode-disaggregated LLM serving for JAX on Ray."""

from raypd.api import Completion, StreamChunk, generate, stream

__all__ = ["generate", "stream", "Completion", "StreamChunk"]
__version__ = "0.1.0"
