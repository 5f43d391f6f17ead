"""Batch generation: JSONL prompts in, JSONL completions out, with a progress bar.

Each input line is a JSON object: `{"prompt": "text" | [token ids], "id": optional, and
optional per-line sampling fields ("max_tokens", "temperature", "top_p", "top_k", "seed",
"stop")}`. Each output line: `{"id", "text", "token_ids", "finish_reason", "metrics"}`, in
input order. Every line is checked before anything is generated; a bad one is reported with
its line number.

With backend "ray" it attaches to a running deployment by name, or starts one (and shuts it
down at the end); runnable as a Ray job:

    ray job submit --working-dir . -- python scripts/batch_generate.py --input in.jsonl --output out.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def read_prompts(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path}:{n}: expected an object with a 'prompt' field")
            unknown = set(row) - {"prompt", "id", *SAMPLING_FIELDS}
            if unknown:
                raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}; allowed: prompt, id, "
                                 f"{', '.join(SAMPLING_FIELDS)}")
            row.setdefault("id", f"line-{n}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _groups(rows: list[dict], defaults: dict, batch_size: int):
    """Consecutive rows with the same sampling settings, at most batch_size at a time."""
    group, key = [], None
    for row in rows:
        params = {**defaults, **{k: row[k] for k in SAMPLING_FIELDS if k in row}}
        k = json.dumps(params, sort_keys=True)
        if group and (k != key or len(group) == batch_size):
            yield group, json.loads(key)
            group = []
        group.append(row)
        key = k
    if group:
        yield group, json.loads(key)


def run_batch(input_path, output_path, *, backend: str = "ray", deployment: str = "raypd", model=None,
              batch_size: int = 32, progress: bool = True, **defaults) -> dict:
    """Generate a completion for every line of `input_path` into `output_path`. -> a summary."""
    from tqdm import tqdm

    import raypd
    from raypd.engine.api import SamplingParams

    rows = read_prompts(input_path)
    for r in rows:  # check every line's settings before any work
        try:
            SamplingParams(**{**defaults, **{k: r[k] for k in SAMPLING_FIELDS if k in r}})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{input_path}:{r['_line']}: {e}") from None
    started, generate = None, None
    if backend == "ray":
        from raypd.runtime import deployment as dep

        try:
            handle = dep.connect(deployment)
        except Exception:  # noqa: BLE001 - none running: start one for this batch
            handle = started = dep.serve(model=model, name=deployment)
        generate = handle.generate
    elif backend == "local":
        generate = lambda prompts, **kw: raypd.generate(prompts, model=model, **kw)  # noqa: E731
    else:
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    done = 0
    try:
        with open(output_path, "w") as out, tqdm(total=len(rows), desc="batch", unit="prompt",
                                                  disable=not progress) as bar:
            for group, params in _groups(rows, defaults, batch_size):
                completions = generate([r["prompt"] for r in group], **params)
                for r, c in zip(group, completions):
                    out.write(json.dumps({"id": r["id"], "text": c.text, "token_ids": c.token_ids,
                                          "finish_reason": c.finish_reason, "metrics": c.metrics}) + "\n")
                out.flush()
                done += len(group)
                bar.update(len(group))
    finally:
        if started is not None:
            started.shutdown()
    return {"input": str(input_path), "output": str(output_path), "completions": done, "backend": backend,
            "started_deployment": started is not None}
