#!/usr/bin/env python3
"""Bootstrap and run raypd on a machine that has only Python (standard library only).

    python3 scripts/dev.py test [PYTEST_ARGS...]   # run the test suite (what CI runs)
    python3 scripts/dev.py demo [DEMO_ARGS...]     # run python -m raypd.demo

Both create `.venv` in the repository root when missing and `pip install -e '.[test]'` into it.
The install is skipped while the stamp `.venv/.raypd-installed` is newer than pyproject.toml.
Local wheel directories are offered to pip: /opt/wheels when it exists (the CPU torch wheel)
and every entry of $PIP_FIND_LINKS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".raypd-installed"
WHEEL_DIR = Path("/opt/wheels")
PYTEST_NO_TESTS_COLLECTED = 5


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def is_installed() -> bool:
    return STAMP.exists() and STAMP.stat().st_mtime > (ROOT / "pyproject.toml").stat().st_mtime


def find_links() -> list[str]:
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if WHEEL_DIR.is_dir():
        links.append(str(WHEEL_DIR))
    return [arg for link in dict.fromkeys(links) for arg in ("--find-links", link)]


def ensure_env() -> None:
    if not PYTHON.exists():
        code = run([sys.executable, "-m", "venv", str(VENV)])
        if code:
            sys.exit(f"dev.py: creating {VENV} failed (on Debian/Ubuntu: apt-get install python3-venv)")
    if is_installed():
        return
    code = run([str(PYTHON), "-m", "pip", "install", "-e", ".[test]", *find_links()])
    if code:
        sys.exit(f"dev.py: pip install failed with exit code {code}")
    STAMP.touch()


MODULES_PER_PROCESS = 6  # the whole suite runs as several pytest processes of this many test modules


def test(args: list[str]) -> int:
    """The suite, or what `args` select. Without test paths in `args`, the test modules run
    in groups of MODULES_PER_PROCESS, each group in a fresh pytest process (a process that has
    run hundreds of JAX and Ray tests crashed natively in a later test here; fresh processes
    keep one test's process state from reaching the others)."""
    names_paths = any(a.endswith(".py") or "::" in a or (ROOT / a).exists() for a in args if not a.startswith("-"))
    if names_paths:
        groups = [[]]
    else:
        modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        groups = [modules[i:i + MODULES_PER_PROCESS] for i in range(0, len(modules), MODULES_PER_PROCESS)]
    codes = [run([str(PYTHON), "-m", "pytest", *args, *group]) for group in groups]
    failed = [c for c in codes if c not in (0, PYTEST_NO_TESTS_COLLECTED)]
    if failed:
        print(f"dev.py: {len(failed)} of {len(groups)} pytest runs failed (exit codes {failed})", file=sys.stderr)
        return failed[0]
    if all(c == PYTEST_NO_TESTS_COLLECTED for c in codes):
        print("dev.py: pytest collected no tests; treating that as a failure", file=sys.stderr)
        return PYTEST_NO_TESTS_COLLECTED
    return 0


def demo(args: list[str]) -> int:
    return run([str(PYTHON), "-m", "raypd.demo", *args])


COMMANDS = {"test": test, "demo": demo}


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    ensure_env()
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
