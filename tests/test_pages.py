"""Page allocator (pure Python) and the null-page rule for padding."""

from __future__ import annotations

import numpy as np
import pytest

import models
from raypd.engine.pages import NULL_PAGE, OutOfPages, PageAllocator
from raypd.engine.runner import EngineConfig, ModelRunner


def test_allocate_free_refcount():
    a = PageAllocator(num_pages=5, page_size=4)
    assert a.num_free == 4 and a.pages_for(9) == 3
    p = a.allocate(3)
    assert NULL_PAGE not in p and a.num_free == 1
    a.incref(p[:2])  # a second request sharing a prefix
    a.free(p)
    assert a.num_free == 2 and a.refcount(p[0]) == 1
    a.free(p[:2])
    assert a.num_free == 4
    a.check()


def test_errors():
    a = PageAllocator(num_pages=3, page_size=4)
    with pytest.raises(OutOfPages):
        a.allocate(3)
    with pytest.raises(ValueError, match="not allocated"):
        a.free([1])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([NULL_PAGE])
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(num_pages=1, page_size=4)


def test_padding_writes_only_the_null_page():
    """A decode batch padded to its bucket, and a prefill chunk padded to its bucket, leave
    every page they don't own untouched (padding goes to page 0)."""
    runner = ModelRunner(models.load("tiny-random"), EngineConfig(num_pages=16, max_slots=4, max_seq_len=64,
                                                                   prefill_buckets=(32,)))
    live = runner.allocator.allocate(2)
    marker = np.full((2, 16, runner.cfg.num_kv_heads, runner.cfg.head_dim), 7.0, np.float32)
    k = np.broadcast_to(marker, (runner.cfg.num_layers,) + marker.shape)
    runner.write_pages(live, k, k)
    mine = runner.allocator.allocate(1)
    # One real token in a batch padded to 4 rows x 1 token, and 3 real tokens in a 32-token chunk.
    for B, T, n in ((4, 1, 1), (1, 32, 3)):
        b, s = runner.empty_batch(B, T, 1, 1)
        b["tokens"][0, :n] = 5
        b["positions"][0, :n] = np.arange(n)
        b["segments"][0, :n] = 0
        b["write_pages"][0, :n] = mine[0]
        b["write_offsets"][0, :n] = np.arange(n)
        runner.run(b, s)
    after_k, after_v = runner.read_pages(live)
    np.testing.assert_array_equal(after_k, k)
    np.testing.assert_array_equal(after_v, k)
    written, _ = runner.read_pages(mine)
    assert np.abs(written[:, 0, :3]).sum() > 0 and np.abs(written[:, 0, 3:]).sum() == 0
    runner.allocator.free(live + mine)
    runner.allocator.check()
