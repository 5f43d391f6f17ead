"""A real multi-node run on one machine: three Ray nodes started with `ray start` (each its own
raylet and object store), raypd shipped to them as a Ray job's working directory, prefill on
the head node, decode on a second node, and that second node killed mid-stream.

    python scripts/multinode.py [--model pystdlib-tiny] [--max-tokens 120] [--keep]

  1. `ray start --head` (resource prefill_node) with the job server on 127.0.0.1, then two
     worker nodes (`ray start --address ...`, resource decode_node each, their own ports).
     A cluster of several nodes listens on the machine's own address (Ray keeps only a
     one-node cluster on loopback), with Ray's token authentication on.
  2. `ray job submit --runtime-env-json '{"working_dir": <this checkout>, ...}' -- python
     scripts/multinode_job.py`: the job imports raypd from the uploaded copy, not this path.
  3. The job serves one prefill worker (prefill_node) and one decode worker (decode_node,
     max_replacements=1), runs a greedy request once for reference, then streams it again and,
     after 20 tokens, kills every process of the node that holds the decode worker (its raylet
     first). The scheduler sees the worker die, starts a replacement on the third node and the
     stream resumes there. The job checks the output equals the reference and prints a report.
  4. Every process this script started is stopped (by its session directory and ports; other
     Ray clusters on the machine are left alone) unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TEMP = "/tmp/raypd-multinode"
HEAD_PORT, DASHBOARD_PORT = 6390, 8275
NODES = {  # name -> ports and resources of each `ray start`
    "head": dict(resources={"prefill_node": 1}, ports={}),
    "node-2": dict(resources={"decode_node": 1}, ports=dict(node_manager=6401, object_manager=6402, agent_listen=6403,
                                                          agent_grpc=6404, metrics=6405, runtime_env=6406,
                                                          min_worker=11100, max_worker=11199)),
    "node-3": dict(resources={"decode_node": 1}, ports=dict(node_manager=6411, object_manager=6412, agent_listen=6413,
                                                          agent_grpc=6414, metrics=6415, runtime_env=6416,
                                                          min_worker=11200, max_worker=11299)),
}


def env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}  # token in ~/.ray/auth_token


def head_ip() -> str:
    """The address Ray gives a node on this machine (what `ray start --head` prints)."""
    import ray

    return ray.util.get_node_ip_address()


def start_node(name: str) -> None:
    spec = NODES[name]
    cmd = [RAY, "start", "--num-cpus", "1",
           "--resources", json.dumps(spec["resources"]), "--disable-usage-stats"]
    if name == "head":
        cmd += ["--head", "--port", str(HEAD_PORT), "--temp-dir", TEMP, "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT)]
    else:
        p = spec["ports"]
        cmd += ["--address", f"{head_ip()}:{HEAD_PORT}", "--node-manager-port", str(p["node_manager"]),
                "--object-manager-port", str(p["object_manager"]),
                "--dashboard-agent-listen-port", str(p["agent_listen"]),
                "--dashboard-agent-grpc-port", str(p["agent_grpc"]), "--metrics-export-port", str(p["metrics"]),
                "--runtime-env-agent-port", str(p["runtime_env"]), "--min-worker-port", str(p["min_worker"]),
                "--max-worker-port", str(p["max_worker"])]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"ray start ({name}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    print(f"[multinode] {name} up", flush=True)


def stop_all() -> int:
    """Kill the processes of this script's cluster: those naming its session directory or its
    GCS address, and their descendants."""
    import psutil

    marks = (TEMP, f"{head_ip()}:{HEAD_PORT}")
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    procs = set(roots)
    for r in roots:
        try:
            procs.update(r.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def submit_job(args) -> int:
    runtime_env = {"working_dir": str(ROOT),
                   "excludes": [".venv", ".git", "out", "docs/results", "*.png", "__pycache__", ".gl", ".whl"],
                   "env_vars": {"JAX_PLATFORMS": "cpu"}}
    cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
           "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "scripts/multinode_job.py",
           "--model", args.model, "--max-tokens", str(args.max_tokens),
           "--kill-ports", ",".join(str(NODES[n]["ports"]["node_manager"]) for n in ("node-2", "node-3"))]
    for attempt in range(6):  # the head's job agent needs a while after `ray start`
        out = subprocess.run(cmd, env=env(), timeout=args.timeout_s, capture_output=True, text=True)
        if "No available agent" not in out.stdout + out.stderr:
            print(out.stdout[-20000:], out.stderr[-5000:] if out.returncode else "", flush=True)
            return out.returncode
        time.sleep(10)
    # Ray's job agent never came up (seen on this loaded machine): run the same script as a
    # driver of the cluster, shipping the checkout the same way (runtime_env working_dir), so the
    # workers still import raypd from the uploaded copy.
    print("[multinode] the job agent never answered; running the job as a driver with the same "
          "runtime_env", flush=True)
    driver = [sys.executable, str(ROOT / "scripts" / "multinode_job.py"), "--address", f"{head_ip()}:{HEAD_PORT}",
              "--runtime-env-json", json.dumps(runtime_env)] + cmd[cmd.index("--model"):]
    return subprocess.run(driver, env=env(), timeout=args.timeout_s, cwd=ROOT).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pystdlib-tiny")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--timeout-s", type=float, default=1200.0)
    p.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = p.parse_args(argv)
    stop_all()
    t0 = time.perf_counter()
    try:
        for name in NODES:
            start_node(name)
        code = submit_job(args)
    finally:
        if not args.keep:
            print(f"[multinode] stopped {stop_all()} processes", flush=True)
    print(f"[multinode] job exit code {code} after {time.perf_counter() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
