"""The import rings of STYLE.md: inner-ring modules (device math) import no process machinery.

`models/` and `raypd/engine/` are pure JAX over pytrees; Ray, gRPC, threads and asyncio belong
to the outer ring, which calls into them. Imports are read with `ast`, nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

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
