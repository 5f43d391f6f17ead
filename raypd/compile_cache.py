"""JAX's persistent compilation cache, so a restart on the same machine skips the compiler.

Entry points call `enable(cache_dir)` once: it sets JAX's configuration in this process and the
environment variables JAX reads at import (JAX_COMPILATION_CACHE_DIR, ...), which `worker_env`
hands to the Ray worker processes a deployment starts. Compiled executables are keyed by JAX
on the computation, the devices and the JAX/XLA versions, so a changed model or a new JAX
version compiles afresh; deleting the directory is always safe.

Default directory: $RAYPD_COMPILE_CACHE, else $XDG_CACHE_HOME/raypd/jax (~/.cache/raypd/jax);
"off" disables it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "RAYPD_COMPILE_CACHE"
OFF = "off"
# Every compiled shape is cached, however quick: on CPU most take well under JAX's default 1 s
# threshold, and start-up compiles dozens of them.
JAX_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def default_dir() -> str:
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "raypd" / "jax")


def enable(cache_dir: str | None = None) -> str | None:
    """Turn the cache on at `cache_dir` (None: default_dir(); "off": leave it off).
    -> the directory in use, or None."""
    cache_dir = cache_dir or default_dir()
    if cache_dir == OFF:
        return None
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    values = (str(path), "0", "-1")
    os.environ.update(zip(JAX_ENV, values))
    if "jax" in sys.modules:  # imported already: its flags were read from the environment then
        import jax

        jax.config.update("jax_compilation_cache_dir", values[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(path)


def worker_env() -> dict[str, str]:
    """The cache settings of this process, for the environment of processes it starts."""
    return {k: os.environ[k] for k in JAX_ENV if k in os.environ}
