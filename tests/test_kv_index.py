"""Global KV index: hash chain, prefix match per worker, pins, LRU eviction of leaves, invariants."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.kv_index import KVIndex, page_hash, page_hashes
from scheduler.kv_store import HostPage, PoolPage

G = 4  # tokens per page
PAGE_BYTES = 100


def w(worker_id, page):
    return PoolPage(worker_id, page, PAGE_BYTES)


def host(key, page, node="n0"):
    return HostPage(node, key, page, PAGE_BYTES // 2)


def toks(*pages):
    """Tokens of whole pages, each page filled with one value: toks(1, 2) -> [1]*G + [2]*G."""
    return [t for p in pages for t in [p] * G]


# -- hash chain ------------------------------------------------------------------------------

def test_hashes_are_stable_across_processes():
    """Golden values: blake2b-128 over (parent hash, int32 tokens). A change here silently
    invalidates every published prefix across a deployment, so it must be deliberate."""
    h = page_hashes(list(range(8)), 4)
    assert h == [0xdb95351b5691751ae58cdac47d1bce35, 0xe012611c91ae28d72f69d3273f7bd929]
    assert h[1] == page_hash(h[0], [4, 5, 6, 7])


def test_a_change_in_page_1_changes_pages_from_1_on():
    a = toks(1, 2, 3, 4)
    b = toks(1, 9, 3, 4)
    ha, hb = page_hashes(a, G), page_hashes(b, G)
    assert ha == page_hashes(list(a), G)  # same tokens, same hashes
    assert ha[0] == hb[0]
    assert all(x != y for x, y in zip(ha[1:], hb[1:]))  # the chain carries the change on


@pytest.mark.parametrize("num_tokens, num_pages", [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (9, 2)])
def test_partial_last_page_is_ignored(num_tokens, num_pages):
    t = list(range(100, 100 + num_tokens))
    assert len(page_hashes(t, G)) == num_pages
    assert page_hashes(t, G) == page_hashes(t[:num_pages * G], G)


# -- match, publish, pins --------------------------------------------------------------------

def test_match_prefix_per_worker():
    idx = KVIndex(G, max_bytes=10_000)
    t = toks(1, 2, 3) + [7, 7]  # 3 full pages and a partial one
    idx.publish(t, [w("A", 10), w("A", 11), w("A", 12)], now_s=1.0)
    idx.publish(t, [w("B", 5), w("B", 6)], now_s=2.0)
    idx.publish(t, [None, None, w("C", 1)], now_s=3.0)  # C holds page 2 only: no leading run
    idx.publish(t, [host("obj", 0), host("obj", 1), host("obj", 2)], now_s=4.0)
    m = idx.match_prefix(t)
    assert (m.num_pages, m.num_full_pages) == (3, 3)
    assert m.worker_pages == {"A": [10, 11, 12], "B": [5, 6]}
    assert m.num_worker_pages("C") == 0 and len(m.locations[2]) == 3
    other = idx.match_prefix(toks(1, 2, 9, 9))  # diverges in page 2
    assert other.num_pages == 2 and other.worker_pages == {"A": [10, 11], "B": [5, 6]}
    assert idx.match_prefix(toks(1, 2, 3), max_pages=1).num_pages == 1
    assert idx.match_prefix(toks(5)).num_pages == 0
    idx.check()


def test_publish_redundant_and_conflicting_copies():
    idx = KVIndex(G, max_bytes=10_000)
    t = toks(1, 2)
    r = idx.publish(t, [w("A", 1), w("A", 2)], now_s=0.0)
    assert r.hashes == page_hashes(t, G) and not r.redundant and not r.evicted
    assert not idx.publish(t, [w("A", 1)], now_s=0.0).redundant  # the same copy again: no-op
    r = idx.publish(t, [w("A", 7), w("A", 8)], now_s=0.0)  # A already holds both pages
    assert r.redundant == [w("A", 7), w("A", 8)]  # the caller frees them
    before = idx.stats()
    with pytest.raises(ValueError, match="already caches another page"):
        idx.publish(toks(5, 6), [w("B", 3), w("A", 2)], now_s=0.0)
    with pytest.raises(ValueError, match="not in the index"):
        idx.publish(toks(5, 6), [None, w("B", 4)], now_s=0.0)
    with pytest.raises(ValueError, match="locations for"):
        idx.publish(toks(5), [w("B", 1), w("B", 2)], now_s=0.0)
    assert idx.stats() == before  # failed publishes change nothing
    idx.check()


def test_acquire_release():
    idx = KVIndex(G, max_bytes=10_000)
    hashes = idx.publish(toks(1, 2), [w("A", 1), w("A", 2)], now_s=0.0).hashes
    idx.acquire(hashes, now_s=1.0)
    idx.acquire(hashes[:1], now_s=2.0)
    assert [idx.refcount(h) for h in hashes] == [2, 1]
    idx.release(hashes)
    assert [idx.refcount(h) for h in hashes] == [1, 0]
    with pytest.raises(ValueError, match="not acquired"):
        idx.release(hashes[1:])
    with pytest.raises(ValueError, match="not acquired"):
        idx.release([hashes[0], hashes[0]])
    with pytest.raises(KeyError):
        idx.acquire([123], now_s=3.0)
    with pytest.raises(ValueError, match="backwards"):
        idx.acquire(hashes, now_s=0.5)
    idx.release(hashes[:1])
    idx.check()


# -- eviction --------------------------------------------------------------------------------

def test_lru_order_is_leaf_first_and_eviction_follows_it():
    idx = KVIndex(G, max_bytes=10_000)
    x = idx.publish(toks(1, 2), [w("A", 1), w("A", 2)], now_s=1.0).hashes
    y = idx.publish(toks(3, 4), [w("A", 3), w("A", 4)], now_s=2.0).hashes
    assert idx.lru_order() == [x[1], x[0], y[1], y[0]]  # each parent after its children
    idx.touch(x[1:], now_s=3.0)  # touching a page touches its ancestors
    assert idx.lru_order() == [y[1], y[0], x[1], x[0]]
    idx.max_bytes = 2 * PAGE_BYTES
    ev = idx.evict(now_s=4.0)
    assert [e.hash for e in ev] == [y[1], y[0]]  # least recent chain goes, leaf first
    assert [e.locations for e in ev] == [(w("A", 4),), (w("A", 3),)]
    assert idx.used_bytes == 2 * PAGE_BYTES
    idx.check()


def test_eviction_takes_leaves_before_parents_and_keeps_pinned_entries():
    idx = KVIndex(G, max_bytes=10_000)
    chain = idx.publish(toks(1, 2, 3), [w("A", 1), w("A", 2), w("A", 3)], now_s=1.0).hashes
    other = idx.publish(toks(7), [w("A", 9)], now_s=2.0).hashes
    idx.acquire(other, now_s=3.0)  # most recent now, and pinned
    ev = idx.evict(now_s=4.0, need_bytes=10_000 - 2 * PAGE_BYTES)  # room for 2 more pages
    assert [e.hash for e in ev] == [chain[2], chain[1]]  # the leaf, then its parent
    assert chain[0] in idx and other[0] in idx
    idx.max_bytes = 0
    ev = idx.evict(now_s=5.0)
    assert [e.hash for e in ev] == [chain[0]]
    assert other[0] in idx and idx.used_bytes == PAGE_BYTES > idx.max_bytes  # pinned: kept
    idx.release(other)
    assert idx.evict(now_s=6.0)[0].hash == other[0] and idx.used_bytes == 0
    idx.check()


def test_publish_evicts_to_fit_the_capacity():
    idx = KVIndex(G, max_bytes=3 * PAGE_BYTES)
    a = idx.publish(toks(1, 2), [w("A", 1), w("A", 2)], now_s=1.0)
    b = idx.publish(toks(3, 4), [w("A", 3), w("A", 4)], now_s=2.0)
    assert [e.hash for e in b.evicted] == [a.hashes[1]]  # the oldest leaf makes room
    assert idx.used_bytes == 3 * PAGE_BYTES
    idx.check()


def test_idle_entries_expire():
    idx = KVIndex(G, max_bytes=10_000, max_idle_s=10.0)
    old = idx.publish(toks(1), [w("A", 1)], now_s=0.0).hashes
    new = idx.publish(toks(2), [w("A", 2)], now_s=5.0).hashes
    assert idx.evict(now_s=10.0) == []
    assert [e.hash for e in idx.evict(now_s=12.0)] == old
    assert new[0] in idx
    idx.check()


def test_remove_worker_keeps_other_copies_and_the_chain():
    idx = KVIndex(G, max_bytes=10_000)
    t = toks(1, 2, 3)
    h = idx.publish(t, [w("A", 1), w("A", 2)], now_s=1.0).hashes
    idx.publish(t, [None, host("obj", 1), host("obj", 2)], now_s=2.0)  # host holds pages 1, 2
    ev = idx.remove_worker("A")
    assert sorted(loc.page for e in ev for loc in e.locations) == [1, 2]
    assert idx.match_prefix(t).num_pages == 0  # page 0 has no copy left: nothing reachable
    assert h[0] in idx  # kept (empty) as the parent of pages that still have copies
    idx.check()
    idx.max_bytes = 0
    ev = idx.evict(now_s=3.0)
    assert len(ev) == 2 and len(idx.lru_order()) == 0  # the empty parent went with them
    idx.check()


def test_evict_worker_frees_that_pool_only():
    idx = KVIndex(G, max_bytes=10_000)
    a = idx.publish(toks(1, 2), [w("A", 1), w("A", 2)], now_s=1.0).hashes
    idx.publish(toks(1, 2), [host("obj", 0), host("obj", 1)], now_s=2.0)
    b = idx.publish(toks(3), [w("A", 3)], now_s=3.0).hashes
    c = idx.publish(toks(4), [w("B", 1)], now_s=4.0).hashes
    idx.acquire(b, now_s=5.0)  # pinned: never freed
    ev = idx.evict_worker("A", num_pages=5, now_s=6.0)
    assert [(e.hash, e.locations) for e in ev] == [(a[1], (w("A", 2),)), (a[0], (w("A", 1),))]
    m = idx.match_prefix(toks(1, 2))
    assert m.num_pages == 2 and m.worker_pages == {}  # the host copies remain
    assert b[0] in idx and c[0] in idx and idx.stats().num_evicted == 2
    idx.check()


def test_stats_and_hit_rate():
    idx = KVIndex(G, max_bytes=10_000)
    idx.publish(toks(1, 2), [w("A", 1), host("o", 1)], now_s=0.0)
    idx.match_prefix(toks(1, 2, 3, 4))  # 2 hits, 2 misses
    idx.match_prefix(toks(1, 9))  # 1 hit, 1 miss
    s = idx.stats()
    assert (s.num_entries, s.num_locations, s.used_bytes) == (2, 2, PAGE_BYTES + PAGE_BYTES // 2)
    assert (s.num_hit_pages, s.num_miss_pages, s.hit_rate) == (3, 3, 0.5)
    assert KVIndex(G, 0).stats().hit_rate == 0.0


def test_location_validation_and_holders():
    with pytest.raises(ValueError, match="compression"):
        PoolPage("A", 1, 10, compression="fp4")
    with pytest.raises(ValueError, match="kv_bytes and page"):
        HostPage("n", "k", -1, 10)
    assert HostPage("n", "k", 0, 10).compression == "int8"
    assert (PoolPage("A", 3, 10).holder, PoolPage("A", 3, 10).pool_key) == (("pool", "A"), ("A", 3))
    assert (HostPage("n", "k", 0, 10).holder, HostPage("n", "k", 0, 10).pool_key) == (("host", "n"), None)


def test_the_store_frees_each_tier_its_own_way_and_refuses_others():
    from scheduler.kv_store import FreePages, KVStore

    store = KVStore(G, PAGE_BYTES, 10_000, host_copies="int8")
    key = store.host.add("ref", 2)
    out = store.free([w("A", 3), HostPage("n", key, 0, 8), w("A", 4), w("B", 1), HostPage("n", key, 1, 8)])
    assert out == [FreePages("A", (3, 4)), FreePages("B", (1,))] and len(store.host) == 0
    with pytest.raises(TypeError, match="not a KV store tier"):
        store.free([("A", 3)])


@pytest.mark.parametrize("seed", range(5))
def test_invariants_hold_under_random_operations(seed):
    rng = np.random.default_rng(seed)
    idx = KVIndex(G, max_bytes=12 * PAGE_BYTES, max_idle_s=50.0)
    free = {wid: list(range(1, 40)) for wid in "AB"}  # each worker's free pool pages
    pinned: list[list[int]] = []
    now_s = 0.0

    def give_back(evicted):
        for e in evicted:
            for loc in e.locations:
                if isinstance(loc, PoolPage):
                    free[loc.worker_id].append(loc.page)

    for _ in range(300):
        now_s += float(rng.uniform(0, 3))
        op = rng.integers(7)
        # Pages of one repeated token from {0, 1}: prompts share prefixes often.
        prompt = toks(*rng.integers(0, 2, size=int(rng.integers(1, 6))).tolist()) + [5] * int(rng.integers(G))
        if op <= 1:
            wid = "AB"[int(rng.integers(2))]
            n = len(prompt) // G
            if len(free[wid]) >= n:
                pages = [free[wid].pop() for _ in range(n)]
                r = idx.publish(prompt, [w(wid, p) for p in pages], now_s)
                give_back(r.evicted)
                free[wid].extend(loc.page for loc in r.redundant)
        elif op == 2:
            give_back(idx.publish(prompt, [host(f"o{now_s}", i) for i in range(len(prompt) // G)], now_s).evicted)
        elif op == 3:
            m = idx.match_prefix(prompt)
            if m.num_pages:
                idx.acquire(m.hashes, now_s)
                pinned.append(m.hashes)
        elif op == 4 and pinned:
            idx.release(pinned.pop(int(rng.integers(len(pinned)))))
        elif op == 5:
            give_back(idx.evict(now_s))
        elif op == 6 and rng.random() < 0.2:
            give_back(idx.remove_worker("AB"[int(rng.integers(2))]))
        elif op == 6:
            give_back(idx.evict_worker("AB"[int(rng.integers(2))], int(rng.integers(1, 4)), now_s))
        idx.check()
    s = idx.stats()
    assert s.num_evicted > 0 and s.num_hit_pages > 0 and s.num_entries > 0  # the run exercised them
    for hashes in pinned:
        idx.release(hashes)
    idx.max_bytes = 0
    give_back(idx.evict(now_s))
    idx.check()
    assert idx.used_bytes == 0 and idx.lru_order() == []
    assert all(sorted(pages) == list(range(1, 40)) for pages in free.values())  # every page came back


def test_host_copies_group_pages_and_drop_an_object_with_its_last_page():
    from scheduler.kv_store import HostObjects

    host = HostObjects()
    a, b = host.add("ref-a", 2), host.add("ref-b", 1)
    locs = [(HostPage("n", a, 0, 8),), (w("A", 3), HostPage("n", a, 1, 8)),
            (HostPage("n", b, 0, 8),)]
    assert host.prefix(locs) == [("ref-a", [0, 1]), ("ref-b", [0])]
    host.drop_page(a)
    assert len(host) == 2  # one page of a is still in the index
    host.drop_page(a)
    host.discard(b)
    assert len(host) == 0
