"""Batch generation: JSONL prompts in, JSONL completions out, with a progress bar.

Each input line is a JSON object: `{"prompt": "text" | [token ids], "id": optional, and
optional per-line sampling fields ("max_tokens", "temperature", "top_p", "top_k", "seed",
"stop")}`. Each output line: `{"id", "text", "token_ids", "finish_reason", "metrics"}`, in
input order. Every line is checked before anything is generated; a bad one is reported with
its line number.

With backend "ray" it attaches to a running deployment by name, or starts one (and shuts it
down at the end); runnable as a Ray job:

    ray job submit --working-dir . -- python scripts/batch_generate.py \
        --input /shared/in.jsonl --output /shared/out.jsonl

Where results go: --input and --output are local paths or URIs (s3://, gs://, hdfs://, ...,
through fsspec, else pyarrow.fs, whichever is installed). A Ray job runs in a temporary copy of
its working directory that is deleted with the cluster's session, so inside a job a relative
--output is refused: give an absolute path on storage that outlives the job, or a URI. A local
output is written to OUTPUT.partial and renamed when complete, so a file at OUTPUT is whole.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_p", "frequency_penalty",
                   "presence_penalty", "repetition_penalty", "min_tokens", "logit_bias")


def is_uri(location: str) -> bool:
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme != "file" and scheme.isidentifier()


def in_ray_job() -> bool:
    """True in the entrypoint of a Ray job (`ray job submit`), which its supervisor marks so."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def resolve_output(location: str | Path) -> str:
    """The output as a URI or an absolute path; ValueError naming --output when it cannot
    outlive the job or its directory is missing."""
    location = str(location)
    if is_uri(location):
        return location
    path = Path(location.removeprefix("file://")).expanduser()
    if not path.is_absolute() and in_ray_job():
        raise ValueError(f"--output {location!r} is relative, and this runs as a Ray job: its working directory "
                         f"({Path.cwd()}) is a temporary copy deleted with the cluster's session. Pass an absolute "
                         "path on storage that outlives the job (e.g. a shared mount) or a URI (s3://bucket/out.jsonl)")
    path = path.resolve()
    if not path.parent.is_dir():
        raise ValueError(f"--output {location!r}: directory {path.parent} does not exist")
    if in_ray_job() and "/runtime_resources/" in str(path):
        log.warning("--output %s is inside Ray's runtime resources, which are deleted with the session", path)
    return str(path)


def _filesystem_open(uri: str, mode: str):
    """A text file object for a URI, through fsspec or pyarrow.fs (whichever is installed)."""
    try:
        import fsspec
    except ImportError:
        fsspec = None
    if fsspec is not None:
        return fsspec.open(uri, mode, encoding="utf-8").open()
    try:
        from pyarrow import fs as pafs
    except ImportError:
        raise ValueError(f"{uri}: reading or writing URIs needs fsspec or pyarrow installed") from None
    filesystem, path = pafs.FileSystem.from_uri(uri)
    raw = filesystem.open_input_stream(path) if mode == "r" else filesystem.open_output_stream(path)
    return io.TextIOWrapper(raw, encoding="utf-8")


def open_text(location: str, mode: str):
    return _filesystem_open(location, mode) if is_uri(location) else open(location, mode, encoding="utf-8")


def read_prompts(path: str | Path) -> list[dict]:
    rows = []
    with open_text(str(path), "r") as f:
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


def _connect(address: str | None, timeout_s: float) -> bool:
    """Connect to the Ray cluster at `address` ($RAY_ADDRESS, else one on this machine). -> False
    when none was named and none runs here (then a local one is started for the batch)."""
    from raypd import reach

    if address is None and not os.environ.get("RAY_ADDRESS"):
        try:
            reach.resolve_ray_address("auto")
        except ConnectionError:
            return False
    reach.ray_init(address, timeout_s=timeout_s)
    return True


class _Output:
    """The output file: local paths are written to PATH.partial and renamed once complete."""

    def __init__(self, location: str):
        self.location = location
        self._tmp = None if is_uri(location) else location + ".partial"
        self.file = open_text(self._tmp or location, "w")

    def close(self, is_complete: bool) -> None:
        self.file.close()
        if self._tmp is not None:
            if is_complete:
                os.replace(self._tmp, self.location)
            else:
                log.warning("batch stopped early: partial results left in %s", self._tmp)


def run_batch(input_path, output_path, *, backend: str = "ray", deployment: str = "raypd", model=None,
              batch_size: int = 32, progress: bool = True, address: str | None = None,
              connect_timeout_s: float = 15.0, **defaults) -> dict:
    """Generate a completion for every line of `input_path` into `output_path` (paths or URIs).
    -> a summary with where the results are."""
    from tqdm import tqdm

    import raypd
    from raypd.engine.api import SamplingParams

    output = resolve_output(output_path)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    rows = read_prompts(input_path)
    for r in rows:  # check every line's settings before any work
        try:
            SamplingParams(**{**defaults, **{k: r[k] for k in SAMPLING_FIELDS if k in r}})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{input_path}:{r['_line']}: {e}") from None
    started, generate = None, None
    if backend == "ray":
        from raypd.runtime import deployment as dep
        from raypd.runtime.errors import DeploymentNotFound

        handle = None
        if _connect(address, connect_timeout_s):
            try:
                handle = dep.connect(deployment)
            except DeploymentNotFound:
                log.info("no deployment %r on the cluster: starting one for this batch", deployment)
        if handle is None:
            handle = started = dep.serve(model=model, name=deployment)
        generate = handle.generate
    elif backend == "local":
        generate = lambda prompts, **kw: raypd.generate(prompts, model=model, **kw)  # noqa: E731
    else:
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    done = 0
    out = _Output(output)
    try:
        with tqdm(total=len(rows), desc="batch", unit="prompt", disable=not progress) as bar:
            for group, params in _groups(rows, defaults, batch_size):
                completions = generate([r["prompt"] for r in group], **params)
                for r, c in zip(group, completions):
                    out.file.write(json.dumps({"id": r["id"], "text": c.text, "token_ids": c.token_ids,
                                               "finish_reason": c.finish_reason, "metrics": c.metrics}) + "\n")
                out.file.flush()
                done += len(group)
                bar.update(len(group))
    finally:
        out.close(is_complete=done == len(rows))
        if started is not None:
            started.shutdown()
    return {"input": str(input_path), "output": output, "completions": done, "backend": backend,
            "started_deployment": started is not None}
