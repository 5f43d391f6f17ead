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


# The job API is driven from child processes: Ray reads its auth token once per process, and a
# token cached in the test process would break the Ray clusters that later tests start.
DRIVER = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
url, action = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
while True:
    try:
        client = JobSubmissionClient(url)
        if action == "ping":
            client.list_jobs()
            print(json.dumps({"ok": True}))
            sys.exit(0)
        job = client.submit_job(entrypoint=sys.argv[3], runtime_env=json.loads(sys.argv[4]))
        break
    except Exception as e:  # still starting, or no job agent yet ("try again later")
        if action == "ping" and "auth" in str(e).lower() and "token" in str(e).lower() and "401" not in str(e):
            raise
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
end = time.monotonic() + 300
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    if time.monotonic() > end:
        client.stop_job(job)
        break
    time.sleep(1)
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)}))
"""


def driver(url: str, env: dict, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, url, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head in its own temp dir (so other tests' `ray.init()` never finds it), with token
    authentication on. -> (dashboard url, the env a job submitter needs)."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                             f"--metrics-export-port={free_port()}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"

    def stop() -> None:
        """Stop the head and everything it started; its session directory goes with it."""
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the head's process group is left
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        ping = driver(url, env, "ping", timeout=180)
        assert ping.returncode == 0, f"the Ray head did not come up: {ping.stderr[-2000:]}"
        HEAD["stop"] = stop
        yield url, env, base
    finally:
        stop()


HEAD: dict = {}  # "stop": stops the module's head early; "outputs": files jobs wrote, checked after that


def test_job_api_refuses_a_missing_or_wrong_token(ray_head):
    url, _, base = ray_head
    probe = f"from ray.job_submission import JobSubmissionClient; JobSubmissionClient({url!r}).list_jobs()"
    for extra in ({"RAY_AUTH_TOKEN_PATH": "/nonexistent"},
                  {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}):
        run = subprocess.run([sys.executable, "-c", probe], env={**base, **extra}, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and "auth" in run.stderr.lower(), run.stderr[-500:]


def test_batch_job_reaches_succeeded_with_its_output(ray_head, tmp_path):
    url, env, _ = ray_head
    prompts = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "def fibonacci(n):"}, {"id": "b", "prompt": [5, 6, 7], "max_tokens": 3},
        {"id": "c", "prompt": "import os\n"}]) + "\n")
    entrypoint = (f"{sys.executable} scripts/batch_generate.py --input {prompts} --output {out} "
                  f"--model tiny-random --max-tokens 5 --no-progress")
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "out", "__pycache__"]}
    run = driver(url, env, "submit", entrypoint, json.dumps(runtime_env))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"].endswith("SUCCEEDED"), result["logs"][-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert len(rows[1]["token_ids"]) == 3 and all(1 <= len(r["token_ids"]) <= 5 for r in rows)
    assert '"started_deployment": true' in result["logs"]
    # the log ends with where the results are: a line naming the file, then the JSON summary
    last_lines = result["logs"].strip().splitlines()[-2:]
    assert f"wrote 3 completions to {out}" in last_lines[0] and json.loads(last_lines[1])["output"] == str(out)
    HEAD.setdefault("outputs", []).append((out, out.read_text()))


def test_batch_job_refuses_a_relative_output(ray_head, tmp_path):
    """A relative --output would land in the job's temporary copy of its working directory,
    deleted with the session: the job fails at once and says so."""
    url, env, _ = ray_head
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": [5, 6, 7]}) + "\n")
    entrypoint = (f"{sys.executable} scripts/batch_generate.py --input {prompts} --output completions.jsonl "
                  f"--model tiny-random --max-tokens 2 --no-progress")
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "out", "__pycache__"]}
    run = driver(url, env, "submit", entrypoint, json.dumps(runtime_env))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"].endswith("FAILED"), result["logs"][-3000:]
    assert "relative, and this runs as a Ray job" in result["logs"]


def test_job_output_outlives_the_cluster(ray_head):
    """Runs last in this module: stop the head (its session and the jobs' working directories
    go), then the batch job's output is still there, whole."""
    assert HEAD.get("outputs"), "the batch job test did not run"
    HEAD["stop"]()
    for path, text in HEAD["outputs"]:
        assert path.exists() and path.read_text() == text and len(text.splitlines()) == 3
