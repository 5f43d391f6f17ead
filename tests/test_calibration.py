"""Start-up calibration of a decode worker (raypd/runtime/decode_worker.py `calibrate`).

A colocated deployment has no prefill worker, so its cost model's prefill part comes from the
decode worker's local prefills: it must be timed at several lengths (one length cannot tell the
per-token cost from the fixed one), and decode steps at more than one context length (at a
single length the per-slot and per-context-token costs are the same column)."""

from __future__ import annotations

from raypd.engine.runner import EngineConfig
from raypd.runtime.decode_worker import DecodeWorker
from raypd.runtime.engines import JaxEngineFactory
from raypd.transfer import make_transport
from scheduler.cost_model import decode_features, fit, prefill_features

import numpy as np
import pytest


@pytest.mark.integration  # compiles many engine shapes: among the unit tier's slowest (docs/BENCHMARKS.md)
def test_decode_worker_times_several_prefill_lengths_and_contexts_and_holds_nothing_after():
    factory = JaxEngineFactory("tiny-random", EngineConfig(max_seq_len=128, max_slots=4))
    transport = make_transport("inproc")
    worker = DecodeWorker("cal-d", factory, lambda: transport, start=False)
    out = worker.calibrate([1, 2], [20, 70], prefill_lengths=[16, 48, 96])
    assert [n for n, _, _ in out["prefill"]] == [16, 48, 96]
    assert sorted((B, S) for B, S, _ in out["decode"]) == [(1, 22), (1, 72), (2, 44), (2, 144)]
    assert all(s > 0 for *_, s in out["prefill"] + out["decode"])
    # the samples determine every coefficient: full column rank
    p = np.asarray(out["prefill"])
    d = np.asarray(out["decode"])
    assert np.linalg.matrix_rank(prefill_features(p[:, 0], p[:, 1])) == 3
    assert np.linalg.matrix_rank(decode_features(d[:, 0], d[:, 1])) == 3
    fit(out["prefill"], out["decode"], [(1, 1e-3)], 64)  # a valid CostModel
    assert [a.num_used for a in worker.engines.allocators()] == [0] * len(worker.engines.allocators())
    assert worker.engines.decode.num_running == 0
