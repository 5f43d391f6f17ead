"""What `raypd.openai_app(target)` serves: the target as a backend of backends.py."""

from __future__ import annotations

from pathlib import Path

from raypd.api import LocalBackend
from raypd.server.backends import LocalEngineBackend, RayBackend
from raypd.server.openai_chat import model_dir


def make_backend(target, model_name: str | None = None) -> tuple[object, Path | None, bool]:
    """-> (backend, the model's directory for its chat template or None, whether the app owns the
    backend: starts and stops it). `target`: a LocalBackend, a Ray deployment handle or a backend."""
    if isinstance(target, LocalBackend):
        name = model_name or target.model.name
        return LocalEngineBackend(target, name), model_dir(target.model.name or None), True
    if hasattr(target, "poll") and hasattr(target, "info"):  # raypd.runtime.deployment.Deployment
        info = target.info()
        name = model_name or info["name"]
        backend = RayBackend(target, name, info["model"], info["max_seq_len"], max_slots=info["max_slots"],
                             num_pages_total=info["num_pages_total"])
        return backend, model_dir(model_name) if model_name else None, False
    if hasattr(target, "submit") and hasattr(target, "card"):
        return target, model_dir(target.card.name), False
    raise ValueError(f"target must be a Ray deployment, a LocalBackend or a raypd server backend, "
                     f"got {type(target).__name__}")
