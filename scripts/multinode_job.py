"""The Ray job of scripts/multinode.py (runs inside the cluster that script starts): serve with
prefill and decode on different nodes, kill the decode worker's node mid-stream, check that the
stream finishes on the replacement with the same greedy output. Prints a JSON report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def node_port(node_id: str) -> int:
    import ray

    return next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)


def kill_node(node_manager_port: int) -> int:
    """Kill the raylet with this port and everything it started (the node's workers)."""
    import psutil

    marks = (f"--node_manager_port={node_manager_port}", f"--node-manager-port={node_manager_port}")
    raylets = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
               and any(m in " ".join(p.info["cmdline"] or []) for m in marks)]  # the raylet and its workers
    procs = set(raylets)
    for r in raylets:
        procs.update(r.children(recursive=True))
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="pystdlib-tiny")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--kill-ports", default="", help="node manager ports of the nodes that may be killed")
    p.add_argument("--address", default=None, help="run as a driver of this cluster (default: as its job)")
    p.add_argument("--runtime-env-json", default=None, help="with --address: the runtime_env to ship")
    args = p.parse_args(argv)
    import ray

    if args.address:
        ray.init(address=args.address, runtime_env=json.loads(args.runtime_env_json or "{}"))
    else:
        ray.init()
    import raypd
    from raypd.runtime.deployment import Resources
    from scheduler import PolicyConfig

    d = raypd.serve(args.model, name="multinode", num_prefill=1, num_decode=1, calibrate=False, max_replacements=1,
                    policy=PolicyConfig(local_prefill_max_len=0), scheduler_resources={"prefill_node": 0.01},
                    prefill_resources=Resources(num_cpus=0.5, resources={"prefill_node": 0.5}),
                    decode_resources=Resources(num_cpus=0.5, resources={"decode_node": 1}))
    report = dict(job_raypd=os.path.dirname(raypd.__file__))
    try:
        where = {}
        for actor in d._actors[1:]:
            wid, node, path = ray.get(actor.__ray_call__.remote(
                lambda self: (self.worker_id, ray.get_runtime_context().get_node_id(),
                              os.path.dirname(sys.modules["raypd"].__file__))))
            where[wid] = dict(node_manager_port=node_port(node), raypd=path)
        report["workers"] = where
        prompt = "def fibonacci(n):"
        ref = d.generate([prompt], max_tokens=args.max_tokens, ignore_eos=True)[0].token_ids
        victim = where["decode-0"]["node_manager_port"]
        if str(victim) not in args.kill_ports.split(","):
            raise RuntimeError(f"decode-0 is on node port {victim}, not one this job may kill ({args.kill_ports})")
        got, killed_at, t0 = [], None, time.perf_counter()
        for chunk in d.stream(prompt, max_tokens=args.max_tokens, ignore_eos=True):
            got.append(chunk.token_id)
            if len(got) == 20 and killed_at is None:
                report["processes_killed"] = kill_node(victim)
                killed_at = time.perf_counter() - t0
        s = d.status()
        report.update(identical=got == ref, num_tokens=len(got), killed_after_s=killed_at,
                      stream_s=time.perf_counter() - t0, dead_workers=s["dead_workers"],
                      decode_workers=[w["worker_id"] for w in s["decode"]], num_retries=s["num_retries"],
                      num_replacements=s["num_replacements"])
        from ray.util.state import list_actors

        alive = list_actors(filters=[("class_name", "=", "DecodeWorker"), ("state", "=", "ALIVE")])
        report["decode_worker_node_ports_now"] = [node_port(a.node_id) for a in alive]
    finally:
        d.shutdown()
    print(json.dumps(report, indent=1))
    # (Ray's own view of the killed node's actors lags: the GCS marks a node dead only after its
    # heartbeats stop, so the old decode worker may still be listed here.)
    others = [int(x) for x in args.kill_ports.split(",") if x and int(x) != victim]
    ok = (report.get("identical") and report.get("num_replacements") == 1 and report.get("num_retries", 0) >= 1
          and report.get("decode_workers") == ["decode-1"]
          and any(p in report.get("decode_worker_node_ports_now", []) for p in others))
    print("multinode:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
