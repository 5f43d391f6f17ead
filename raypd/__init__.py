"""raypd: prefill/decode-disaggregated LLM serving for JAX on Ray."""

__all__ = ["generate", "stream", "serve", "connect", "Completion", "StreamChunk"]
__version__ = "0.1.0"


def __getattr__(name):
    """Imported on first use: the client API (which imports JAX) and `raypd.serve` /
    `raypd.connect` (which import Ray), so that `raypd --help` and `raypd status` start fast."""
    if name in ("generate", "stream", "Completion", "StreamChunk"):
        from raypd import api

        return getattr(api, name)
    if name in ("serve", "connect"):
        from raypd.runtime import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'raypd' has no attribute {name!r}")
