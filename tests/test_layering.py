"""The import rings of STYLE.md: inner-ring modules (device math) import no process machinery.

`models/` and `raypd/engine/` are pure JAX over pytrees; Ray, gRPC, threads and asyncio belong
to the outer ring, which calls into them. Imports are read with `ast`, nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INNER_RING = ("models", "raypd/engine", "scheduler")
FORBIDDEN = {"ray", "grpc", "threading", "asyncio"}


def imported_modules(source: str, filename: str) -> set[str]:
    """Top-level names of every module an `import` or `from ... import` statement names."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def inner_ring_files() -> list[Path]:
    return sorted(f for d in INNER_RING if (ROOT / d).is_dir() for f in (ROOT / d).rglob("*.py"))


def test_inner_ring_imports_no_process_machinery():
    files = inner_ring_files()
    assert any(f.parent.name == "models" for f in files), "found no models/*.py to check"
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f.read_text(), str(f)) & FORBIDDEN)
                 for f in files}
    assert not {f: bad for f, bad in offenders.items() if bad}


def test_checker_sees_every_import_form():
    source = "import ray.util\nfrom grpc import aio\ndef f():\n    import threading\nimport asyncio as aio2\n"
    assert imported_modules(source, "x.py") >= FORBIDDEN
    assert not imported_modules("from . import ray\nimport rayon\n", "x.py") & FORBIDDEN


# Rings, innermost first: a module may import its own ring and the rings listed for it, never
# an outer one (function-local imports count too).
RING_OF = [("scheduler", "scheduler"), ("models", "models"), ("raypd.engine", "engine"),
           ("raypd.transfer", "transfer"), ("raypd", "outer")]
MAY_IMPORT = {"scheduler": {"scheduler"}, "models": {"models"}, "engine": {"models", "engine"},
              "transfer": {"models", "engine", "transfer"},
              "outer": {"scheduler", "models", "engine", "transfer", "outer"}}


def ring(module: str) -> str | None:
    return next((r for prefix, r in RING_OF if module == prefix or module.startswith(prefix + ".")), None)


def project_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from raypd import api`
    return {m for m in out if ring(m) is not None}


def violations(module: str, path: Path) -> list[str]:
    bad = []
    for imported in project_imports(path):
        target = ring(imported)
        if imported.rsplit(".", 1)[0] in ("raypd.engine", "raypd.transfer"):
            target = ring(imported.rsplit(".", 1)[0])  # `from raypd.engine import x`: x may be a name
        if target not in MAY_IMPORT[ring(module)]:
            bad.append(f"{module} ({ring(module)}) imports {imported} ({target})")
    return bad


def test_imports_point_inward():
    bad = []
    for pkg in ("scheduler", "models", "raypd"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if "_pb2" not in f.name:
                bad += violations(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), f)
    assert not bad, "\n".join(bad)


def test_direction_checker_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from raypd.runtime import deployment\nimport scheduler.core\n")
    assert sorted(violations("raypd.engine.x", f)) == [
        "raypd.engine.x (engine) imports raypd.runtime (outer)",
        "raypd.engine.x (engine) imports raypd.runtime.deployment (outer)",
        "raypd.engine.x (engine) imports scheduler.core (scheduler)"]
    assert violations("raypd.server.x", f) == []


@pytest.mark.integration  # a subprocess
def test_light_modules_import_no_jax():
    """The scheduler's process (its actor module, the messages it unpickles, the request
    checks) and the client-side types load without JAX."""
    import subprocess
    import sys

    code = ("import sys; import raypd, raypd.protocol, raypd.engine.api, raypd.runtime.messages, "
            "raypd.runtime.scheduler_actor, raypd.runtime.spawner, raypd.transfer.base, models, scheduler.core; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
