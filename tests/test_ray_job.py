"""A batch job submitted to a real Ray head (`ray start --head`, dashboard on loopback) through
`JobSubmissionClient`: it starts a deployment, completes a JSONL file, and reaches SUCCEEDED."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head in its own temp dir (so other tests' `ray.init()` never finds it), with token
    authentication on: the dashboard's job API refuses clients without the token."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash = free_port(), free_port()
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                             f"--metrics-export-port={free_port()}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")  # what a job submitter needs (see the README)
    patch.setenv("RAY_AUTH_TOKEN", token)
    url = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(url)
            client.list_jobs()
            break
        except Exception as e:  # noqa: BLE001 - still starting
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"the Ray head did not come up within 120 s: {e}")
            time.sleep(1)
    yield client, url, token
    patch.undo()
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(head.pid, signal.SIGKILL)  # whatever of the head's process group is left
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_api_refuses_a_missing_or_wrong_token(ray_head):
    """A fresh process each time: Ray reads the token once per process."""
    _, url, _ = ray_head
    probe = f"from ray.job_submission import JobSubmissionClient; JobSubmissionClient({url!r}).list_jobs()"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}):
        run = subprocess.run([sys.executable, "-c", probe], env={**base, **extra}, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and "auth" in run.stderr.lower(), run.stderr[-500:]


def test_batch_job_reaches_succeeded_with_its_output(ray_head, tmp_path):
    client = ray_head[0]
    prompts = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "def fibonacci(n):"}, {"id": "b", "prompt": [5, 6, 7], "max_tokens": 3},
        {"id": "c", "prompt": "import os\n"}]) + "\n")
    submit_by = time.monotonic() + 120
    while True:  # right after start-up the head may have no job agent yet ("try again later")
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} scripts/batch_generate.py --input {prompts} --output {out} "
                           f"--model tiny-random --max-tokens 5 --no-progress",
                runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "out", "__pycache__"]})
            break
        except RuntimeError as e:
            if "try again" not in str(e) or time.monotonic() > submit_by:
                raise
            time.sleep(2)
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED):
        assert time.monotonic() < deadline, "job did not finish within 300 s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [len(r["token_ids"]) for r in rows][1] == 3 and all(1 <= len(r["token_ids"]) <= 5 for r in rows)
    assert '"started_deployment": true' in logs
