"""scripts/validate_simulator.py's own logic, without a deployment: how far the machine's speed
moved between a point's calibration and its measurement, and how unreliable points are kept
apart. Guards against a validation that silently drops the points it cannot trust, or that
lets them into the headline errors and decisions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import validate_simulator as vs  # noqa: E402


def probe(matmul: float, copy: float) -> dict:
    return dict(matmul_gflop_s=matmul, copy_gb_s=copy, load_avg_1min=1.0)


def test_drift_is_the_largest_move_of_either_probe_from_the_calibration_mean():
    cal = [probe(90, 10), probe(110, 10)]  # mean 100 GFLOP/s, 10 GB/s
    assert vs.drift(cal, [probe(100, 10), probe(100, 10)]) == pytest.approx(0.0)
    assert vs.drift(cal, [probe(100, 10), probe(70, 10)]) == pytest.approx(0.3)  # slower after
    assert vs.drift(cal, [probe(100, 12.5), probe(100, 10)]) == pytest.approx(0.25)  # copy faster before


def point(rate: float, mode: str, goodput_meas: float, goodput_sim: float, err: float, drift: float) -> dict:
    keys = [k for k, _, _ in vs.METRICS] + ["goodput_rps"]
    return dict(workload="chat", rate=rate, mode=mode, measured=dict(goodput_rps=goodput_meas),
                simulated=dict(goodput_rps=goodput_sim), error={k: err for k in keys}, drift=drift,
                is_reliable=drift <= 0.2)


def test_unreliable_points_are_reported_apart_not_dropped():
    points = [point(1, "colocated", 2.0, 2.0, 0.1, 0.05), point(1, "disaggregated", 1.0, 1.0, 0.1, 0.1),
              point(4, "colocated", 3.0, 1.0, 0.9, 0.5), point(4, "disaggregated", 1.0, 2.0, 0.9, 0.0)]
    r = vs.analyse(points)
    assert (r["num_points"], r["num_reliable"]) == (4, 3)
    assert r["median_error"]["goodput_rps"] == pytest.approx(0.1)  # reliable points only
    assert [(d["rate"], d["agree"]) for d in r["decisions"]] == [(1, True)]  # rate 4 lacks a reliable colocated
    assert r["decision_accuracy"] == 1.0
    assert r["all_points"]["median_error"]["goodput_rps"] == pytest.approx(0.5)
    assert [(d["rate"], d["agree"]) for d in r["all_points"]["decisions"]] == [(1, True), (4, False)]
    assert r["unreliable"] == [dict(workload="chat", rate=4, mode="colocated", drift=0.5)]
    text = vs.tables(r)
    assert "reliable points: 3 of 4" in text and "| chat | 4 | colocated | 50% |" in text
