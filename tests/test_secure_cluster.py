"""A Ray cluster that raypd starts for itself listens on loopback only (issue 12, item 7).

With plain `ray.init()` 13 of the 16 listeners of a `raypd serve` cluster were on the network
(GCS, raylet, object manager, workers, dashboard agent, runtime-env agent). The test starts the
cluster the way raypd does, runs a task and an actor so that worker processes listen too, and
reads every listening socket of the processes it started.
"""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

from raypd.runtime.deployment import ROOT, start_local_cluster


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual-stack socket
    return (mapped or addr).is_loopback


def listeners(pids) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket and unconnected UDP socket of `pids`."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # 2: SOCK_DGRAM
                    found.append((proc.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return found


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"]))


@pytest.mark.parametrize("include_dashboard", [False, True], ids=["default", "dashboard"])
def test_a_cluster_raypd_starts_listens_on_loopback_only(include_dashboard):
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    context = start_local_cluster(include_dashboard=include_dashboard, num_cpus=1, log_to_driver=False,
                        runtime_env={"env_vars": {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}})
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def pid(self):
                return os.getpid()

        probe = Probe.remote()
        assert ray.get(probe.pid.remote(), timeout=120) > 0
        assert ray.get(ray.remote(lambda: 1).remote(), timeout=120) == 1
        started = [p.pid for p in me.children(recursive=True) if p.pid not in before]
        found = listeners(started)
        names = {name for name, _, _ in found}
        assert any("raylet" in n for n in names) and any("gcs" in n for n in names), names
        assert len(found) >= 6, found
        assert [f for f in found if not is_loopback(f[1])] == []
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        if include_dashboard:
            host, port = context.dashboard_url.rsplit(":", 1)
            assert host == "127.0.0.1" and int(port) in {p for _, _, p in found}
        else:
            assert not context.dashboard_url
    finally:
        ray.shutdown()
