"""Multi-node: a 2-node `ray.cluster_utils.Cluster` (each node with its own object store), the
prefill worker pinned to one node and the decode worker to the other by custom resources, so
the K/V really crosses nodes through the object store. Guards against a transfer that only
works when sender and receiver share a store (or a process)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.runner import EngineConfig
from raypd.runtime.deployment import Resources
from scheduler import PolicyConfig

ROOT = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=256, prefill_buckets=(16, 32, 64))


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"prefill_node": 1}))
    c.add_node(num_cpus=1, resources={"decode_node": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="raypd-tests", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    yield c
    ray.shutdown()
    c.shutdown()


def test_kv_crosses_nodes_greedy_identity(cluster):
    import ray

    d = raypd.serve("tiny-random", name="two-nodes", engine_config=ENGINE, calibrate=False,
                    policy=PolicyConfig(local_prefill_max_len=0),
                    prefill_resources=Resources(num_cpus=0.5, resources={"prefill_node": 0.5}),
                    decode_resources=Resources(num_cpus=0.5, resources={"decode_node": 0.5}))
    try:
        nodes = {}
        for actor in d._actors[1:]:
            nodes[actor] = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert len(set(nodes.values())) == 2, "prefill and decode workers share a node"
        rng = np.random.default_rng(3)
        prompts = [rng.integers(3, 500, size=n).tolist() for n in (5, 16, 17, 80)]
        got = d.generate(prompts, max_tokens=6, ignore_eos=True)
        assert all(not c.metrics["is_local_prefill"] for c in got)
        ref = raypd.generate(prompts, model=LocalBackend(models.load("tiny-random"), ENGINE), max_tokens=6,
                             ignore_eos=True, backend="local")
        assert [c.token_ids for c in got] == [c.token_ids for c in ref]
        d.clear_cache()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            s = d.status()
            if not any(u for w in s["prefill"] + s["decode"] for u in w["used_pages"]):
                break
            time.sleep(0.05)
        assert all(set(w["used_pages"]) == {0} for w in s["prefill"] + s["decode"]), s
        assert all(w["num_pending_transfers"] == 0 for w in s["prefill"])
    finally:
        d.shutdown()


def test_host_copy_fetched_across_nodes(cluster):
    """The prefill worker (node 1) exports a prompt's pages to its node's object store; a
    follow-up with the same prefix and a short tail prefills on the decode worker (node 2),
    which fetches the host copy across nodes and computes only the tail."""
    d = raypd.serve("tiny-random", name="host-two-nodes", engine_config=ENGINE, calibrate=False,
                    policy=PolicyConfig(local_prefill_max_len=8), host_copies="none",
                    prefill_resources=Resources(num_cpus=0.5, resources={"prefill_node": 0.5}),
                    decode_resources=Resources(num_cpus=0.5, resources={"decode_node": 0.5}))
    try:
        rng = np.random.default_rng(5)
        p = rng.integers(3, 500, size=70).tolist()
        ref = raypd.generate([p], model=LocalBackend(models.load("tiny-random"), ENGINE), max_tokens=6,
                             ignore_eos=True, backend="local")[0].token_ids
        first = d.generate([p[:64] + [7] * 16], max_tokens=6, ignore_eos=True)[0]  # 80 tokens: remote
        assert not first.metrics["is_local_prefill"]
        deadline = time.monotonic() + 10
        while d.status()["index"]["num_host_objects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = d.generate([p], max_tokens=6, ignore_eos=True)[0]  # 64 cached + 6: local, fetched
        assert second.metrics["is_local_prefill"] and second.metrics["num_computed_tokens"] == 6
        assert second.token_ids == ref
        d.clear_cache()
        assert d.status()["index"]["num_host_objects"] == 0
    finally:
        d.shutdown()
