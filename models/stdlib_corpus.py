"""The corpus of the default model: the Python standard library's own source, split by module.

Shared by scripts/train_default_model.py (which trains and evaluates on it) and
tests/test_default_model.py (which checks the shipped model against numbers the script recorded),
so both cut the same held-out slice and run the same greedy loop.

Files are `*.py` under `sysconfig.get_paths()["stdlib"]` in sorted path order, minus test
suites, IDLE, lib2to3 and site-packages. A file belongs to the held-out split when its
top-level module name (first path component, `.py` stripped) is in HELDOUT_MODULES.
Shape letters: see models/config.py.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np

EOS_TOKEN = "<|endoftext|>"
# Directories anywhere in a path that exclude the file: test suites, IDLE, lib2to3, installed packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
                           "__pycache__"})
# Top-level modules never trained on; held-out bits per byte is measured on their source.
HELDOUT_MODULES = ("argparse", "csv", "difflib", "fractions", "heapq", "json", "shlex",
                   "statistics", "textwrap")
SLICE_NUM_WINDOWS = 4  # the fixed held-out slice the tests check: 4 windows ...
SLICE_WINDOW_LEN = 128  # ... of 128 tokens, from the start of the held-out token stream


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_module(rel: Path) -> str:
    """`json/decoder.py` -> "json", `argparse.py` -> "argparse"."""
    return rel.parts[0].removesuffix(".py")


def source_files(root: Path | None = None) -> list[Path]:
    """Every included `*.py` file under the stdlib, as paths relative to it, sorted."""
    root = stdlib_dir() if root is None else root
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            files.append(rel)
    return sorted(files)


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, heldout) relative paths, each sorted."""
    files = source_files(root)
    heldout = [f for f in files if top_module(f) in HELDOUT_MODULES]
    train = [f for f in files if top_module(f) not in HELDOUT_MODULES]
    return train, heldout


def read_texts(files: list[Path], root: Path | None = None) -> list[str]:
    """File contents as text; undecodable bytes are replaced so every file is usable."""
    root = stdlib_dir() if root is None else root
    return [(root / f).read_bytes().decode("utf-8", errors="replace") for f in files]


def token_stream(texts: list[str], encode: Callable[[str], list[int]], eos_id: int) -> np.ndarray:
    """[EOS, file0..., EOS, file1..., ...] as int32: EOS opens every file, so the model learns
    file starts and every file token has a predecessor to be predicted from."""
    out: list[int] = []
    for text in texts:
        out.append(eos_id)
        out.extend(encode(text))
    return np.asarray(out, np.int32)


def heldout_slice(stream: np.ndarray) -> np.ndarray:
    """The fixed regression slice [SLICE_NUM_WINDOWS, SLICE_WINDOW_LEN]: the first windows of
    the held-out token stream, back to back."""
    n = SLICE_NUM_WINDOWS * SLICE_WINDOW_LEN
    if len(stream) < n:
        raise ValueError(f"held-out stream has {len(stream)} tokens, the slice needs {n}")
    return np.asarray(stream[:n], np.int32).reshape(SLICE_NUM_WINDOWS, SLICE_WINDOW_LEN)


def mean_window_loss(logits_fn: Callable[[np.ndarray], np.ndarray], windows: np.ndarray) -> float:
    """Mean next-token loss in nats/token over windows [W, T]; logits_fn maps ids [T] -> [T, V]."""
    total, count = 0.0, 0
    for ids in np.asarray(windows):
        logits = np.asarray(logits_fn(ids), np.float64)[:-1]  # [T-1, V]
        m = logits.max(axis=-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1)))  # [T-1]
        total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return total / count


def greedy_ids(logits_fn: Callable[[np.ndarray], np.ndarray], prompt_ids: list[int],
               num_new: int, max_len: int, pad_id: int) -> list[int]:
    """Greedy continuation with no cache: each step runs the whole sequence, right-padded to
    max_len (so logits_fn sees one shape), and takes the argmax at the last real position.
    Causal attention makes the padding invisible to that position."""
    ids = list(prompt_ids)
    if len(ids) + num_new > max_len:
        raise ValueError(f"prompt ({len(ids)}) + num_new ({num_new}) exceeds max_len ({max_len})")
    for _ in range(num_new):
        padded = np.full((max_len,), pad_id, np.int32)
        padded[: len(ids)] = ids
        logits = np.asarray(logits_fn(padded))  # [max_len, V]
        ids.append(int(np.argmax(logits[len(ids) - 1])))
    return ids[len(prompt_ids):]
