"""raypd: prefill/decode-disaggregated LLM serving for JAX on Ray.

Every public name loads on first use, so importing a light module of the package (the request
types, the scheduler's process) never pulls in JAX or Ray.
"""

__all__ = ["generate", "stream", "serve", "connect", "simulate", "plan", "openai_app", "Completion", "StreamChunk"]
__version__ = "0.1.0"


def __getattr__(name):
    """Public names on first use: the engines (JAX) with `generate`, Ray with `serve`, FastAPI
    with `openai_app`."""
    if name in ("generate", "stream"):
        from raypd import api

        return getattr(api, name)
    if name in ("Completion", "StreamChunk"):
        from raypd import protocol

        return getattr(protocol, name)
    if name in ("serve", "connect"):
        from raypd.runtime import deployment

        return getattr(deployment, name)
    if name == "openai_app":  # FastAPI is imported on first use only
        from raypd.server.openai_app import openai_app

        return openai_app
    if name in ("simulate", "plan"):
        from raypd import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'raypd' has no attribute {name!r}")
