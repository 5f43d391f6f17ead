"""The README's code, run as written (issue 18): a README that drifts from the code fails CI.

Every ```bash / ```python block of README.md follows a marker line saying what CI does with it:
  <!-- readme-test: run -->           run it; it must exit 0 within RUN_TIMEOUT_S
  <!-- readme-test: serve -->         a server command: started, and ready (its JSON line on
                                      stdout) before the blocks after it run; stopped with
                                      Ctrl-C (SIGINT) before the next server or at the end,
                                      and it must exit 0
  <!-- readme-test: skip: REASON -->  not runnable on this machine (a GPU, several machines,
                                      weights nobody may download, minutes of CI): REASON says
                                      which and what test covers it instead
The blocks run in README order in one temporary directory, with these changes, about this
machine and CI's time rather than the code: `raypd` and `.venv/bin/raypd` are this checkout's CLI
(`python -m raypd.cli`); port 8000 is a free port, and a server also gets `--grpc-port 0`
(CI may run next to another server) and `--no-warmup` (warming the default model's 130 shapes
would be most of this test's cost; tests/test_ops.py and tests/test_serve_ray.py test the
warm-up, this test the commands and requests); the directory holds `chat.jinja`, the file
the README's `--chat-template chat.jinja` names; curl fails on an HTTP error (~/.curlrc: --fail-with-body).
The blocks share one JAX compilation cache in that directory, as the commands of a user's machine
share ~/.cache/raypd/jax (the test suite turns the cache off elsewhere), so each block compiles
only the shapes no block before it did: CI's cost stays a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from raypd import compile_cache

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!-- readme-test: (run|serve|skip)(?:: (.+?))? -->")
RUN_TIMEOUT_S = 900.0  # a hang, not a slow machine: a block takes 5-50 s idle, 10x that at load 50
SERVE_READY_TIMEOUT_S = 900.0
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str  # "bash" | "python"
    code: str
    action: str | None  # "run" | "serve" | "skip"; None: no marker
    reason: str | None  # why a skipped block cannot run here


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash and ```python block, with the marker on the line before it (if any)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)\s*", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in ("bash", "python"):
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1) if marker else None, marker.group(2) if marker else None))
        i = end + 1
    return blocks


def test_every_code_block_says_whether_ci_runs_it():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    for b in blocks:
        assert b.action is not None, f"README.md:{b.line}: a {b.lang} block without a readme-test marker"
        assert (b.action == "skip") == bool(b.reason), f"README.md:{b.line}: a skip needs a reason, only a skip"
        assert b.action != "serve" or b.lang == "bash", f"README.md:{b.line}: a server is a shell command"
    runnable = [b for b in blocks if b.action != "skip"]
    assert {b.lang for b in runnable} == {"bash", "python"}, "CI should run both kinds of block"


def test_marker_parsing():
    text = ("<!-- readme-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```python\nprint(1)\n```\n"
            "<!-- readme-test: run -->\n```python\nprint(2)\n```\n```mermaid\nx\n```\n")
    skip, bare, run = readme_blocks(text)
    assert (skip.action, skip.reason, skip.code) == ("skip", "needs a GPU", "nvidia-smi\n")
    assert bare.action is None and (run.action, run.reason, run.code, run.line) == ("run", None, "print(2)\n", 10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine_fixes(code: str, port: int) -> str:
    code = code.replace(".venv/bin/raypd", "raypd")
    return re.sub(r"\b8000\b", str(port), code)


def _environment(tmp: Path) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "raypd"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m raypd.cli "$@"\n')
    shim.chmod(0o755)
    (tmp / ".curlrc").write_text("--fail-with-body\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray clusters of their own
    cache = tmp / "jax-cache"
    cache.mkdir()
    # the CLI turns the cache on from RAYPD_COMPILE_CACHE; a Python program (and the Ray workers it
    # starts) from JAX's own variables, as compile_cache.enable sets them
    jax_env = dict(zip(compile_cache.JAX_ENV, (str(cache), "0", "-1")))
    return dict(env, **jax_env, RAYPD_COMPILE_CACHE=str(cache), PATH=f"{bin_dir}:{env['PATH']}",
                PYTHONPATH=str(REPO), CURL_HOME=str(tmp))


def _command(block: Block, code: str) -> list[str]:
    if block.lang == "python":
        return [sys.executable, "-c", code]
    return ["bash", "-euo", "pipefail", "-c", code]


def _read_ready_line(proc: subprocess.Popen, timeout_s: float) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if not line and proc.poll() is not None:
            break
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"the server printed no ready line within {timeout_s:.0f} s (exit code {proc.poll()})")


def _stop(proc: subprocess.Popen, block: Block) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"README.md:{block.line}: the server did not stop within 60 s of Ctrl-C") from None
    assert code == 0, f"README.md:{block.line}: the server exited with {code} after Ctrl-C"


def test_readme_code_runs(tmp_path):
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    env, port = _environment(tmp_path), _free_port()
    server: tuple[subprocess.Popen, Block] | None = None
    try:
        for block in readme_blocks(README.read_text()):
            if block.action not in ("run", "serve"):
                continue
            code = _machine_fixes(block.code, port)
            if block.action == "serve":
                if server is not None:
                    _stop(*server)
                code = f"exec {code.strip()} --grpc-port 0 --no-warmup"  # exec: Ctrl-C reaches the server itself
                proc = subprocess.Popen(_command(block, code), cwd=tmp_path, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                server = (proc, block)
                _read_ready_line(proc, SERVE_READY_TIMEOUT_S)
                continue
            start = time.monotonic()
            # a session of its own: on a timeout everything the block started goes (bash's children too)
            proc = subprocess.Popen(_command(block, code), cwd=tmp_path, env=env, text=True, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                pytest.fail(f"README.md:{block.line}: still running after {RUN_TIMEOUT_S:.0f} s")
            print(f"README.md:{block.line} ({block.lang}): {time.monotonic() - start:.1f} s")
            assert proc.returncode == 0, (f"README.md:{block.line} exited with {proc.returncode}\n"
                                          f"{out[-2000:]}\n{err[-4000:]}")
        if server is not None:
            _stop(*server)
            server = None
    finally:
        if server is not None and server[0].poll() is None:
            server[0].kill()
            server[0].wait()
