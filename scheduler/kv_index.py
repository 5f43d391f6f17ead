"""Global KV store index, Mooncake-style: a hash chain over full pages -> where each page's K/V lives.

Pure host bookkeeping: no Ray, no threads, time passed in as `now_s` (non-decreasing). The Ray
actor around it is thin: it calls these methods and acts on what they return.

Lifecycle of a prefix through the store (G = tokens per page):
  1. Lookup. The scheduler calls `match_prefix(prompt_ids)`: the longest run of leading full
     pages the store holds anywhere, and per worker how many leading pages sit in that worker's
     own pool (with their page ids, ready for `PrefillEngine.add(prefix_pages=...)`). Placement
     (`scheduler.policy`) prefers the worker that holds the most.
  2. Pin. Before using a prefix, `acquire(match.hashes[:k], now_s)`; pinned entries are never
     evicted. `release(...)` the same hashes once the prefill is done (the engine then holds its
     own page references).
  3. Publish. When a request finishes, `publish(token_ids, locations, now_s)` records where its
     full pages now live (`Location`s: a page of a worker's pool, a page of a host copy in
     Ray's object store, ... -- the tier types of scheduler/kv_store.py). A location
     handed to the store belongs to it: the caller keeps the worker page allocated (one
     reference) or the object ref alive until the store gives the location back. Locations the
     store already has a copy of (same worker / same node) come back at once as `redundant`.
  4. Evict. Under a byte capacity `max_bytes` (and an optional idle time `max_idle_s`), the
     least recently used unpinned *leaves* of the chain go first; a parent is never removed
     before its children, so every cached page stays reachable from the root. Every call that
     removes locations returns them (`Evicted`), so the caller frees those worker pages and
     drops object refs whose last page is gone. `evict_worker` frees pages of one worker's pool
     when its engine needs room; `remove_worker` forgets a dead worker's pages.

Hashes. `page_hash(parent, tokens)` = blake2b(16 bytes of the parent's hash, or nothing for
the first page, + the page's token ids as little-endian int32), digest size 16, read as an
unsigned little-endian int. It is stable across processes and Python versions (unlike
`hash()`), so any process computes the same chain. Only full pages are hashed: a partial last
page is never cached.

Recency order. Entries sit in an LRU order; touching a page touches its chain leaf-first, so
every parent is more recent than all of its children. Eviction therefore scans from the least
recent end and meets children before their parents.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

def page_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of one full page: its parent page's hash (None for page 0) chained with its tokens."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent.to_bytes(16, "little"))
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return int.from_bytes(h.digest(), "little")


def page_hashes(token_ids: Sequence[int], page_size: int) -> list[int]:
    """Chained hashes of the full pages of `token_ids` (a partial last page is ignored)."""
    return list(_page_hashes(tuple(token_ids), page_size))


@functools.lru_cache(maxsize=8192)
def _page_hashes(token_ids: tuple[int, ...], page_size: int) -> tuple[int, ...]:
    """A request's prompt is hashed at placement, publish and export: remember recent ones."""
    out: list[int] = []
    parent = None
    for i in range(len(token_ids) // page_size):
        parent = page_hash(parent, token_ids[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return tuple(out)


class Location(Protocol):
    """One copy of one page, as the index sees it. The tiers are types of their own, owned by
    scheduler/kv_store.py (`PoolPage`, `HostPage`); a new tier is a new type, not a new field."""

    @property
    def kv_bytes(self) -> int:
        """Bytes this copy occupies."""

    @property
    def holder(self) -> tuple[str, str]:
        """Who holds it (the index keeps one copy of a page per holder)."""

    @property
    def pool_key(self) -> tuple[str, int] | None:
        """(worker_id, page) for a page of a worker's pool, else None."""


@dataclasses.dataclass(frozen=True)
class Evicted:
    """Locations the store gave back; the caller frees the worker pages / drops the object refs."""

    hash: int
    locations: tuple[Location, ...]


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
    hashes: list[int]  # hashes of the matched leading pages, in order
    locations: list[tuple[Location, ...]]  # per matched page, every copy
    worker_pages: dict[str, list[int]]  # worker_id -> pool pages holding its leading matched pages
    num_full_pages: int  # full pages in the looked-up tokens

    @property
    def num_pages(self) -> int:
        return len(self.hashes)

    def num_worker_pages(self, worker_id: str) -> int:
        return len(self.worker_pages.get(worker_id, ()))


@dataclasses.dataclass(frozen=True)
class PublishResult:
    hashes: list[int]  # chain hashes of the published pages
    redundant: list[Location]  # copies the store already had at that holder: free them now
    evicted: list[Evicted]  # what making room took


@dataclasses.dataclass(frozen=True)
class IndexStats:
    num_entries: int
    num_locations: int
    used_bytes: int
    max_bytes: int
    num_hit_pages: int
    num_miss_pages: int
    num_evicted: int

    @property
    def hit_rate(self) -> float:
        total = self.num_hit_pages + self.num_miss_pages
        return self.num_hit_pages / total if total else 0.0


@dataclasses.dataclass
class _Entry:
    parent: int | None
    locations: list[Location]
    last_used_s: float
    refs: int = 0
    num_children: int = 0

    @property
    def kv_bytes(self) -> int:
        return sum(loc.kv_bytes for loc in self.locations)


class KVIndex:
    def __init__(self, page_size: int, max_bytes: int, max_idle_s: float | None = None):
        if page_size < 1 or max_bytes < 0:
            raise ValueError(f"need page_size >= 1 and max_bytes >= 0, got {page_size}, {max_bytes}")
        self.page_size = page_size
        self.max_bytes = max_bytes
        self.max_idle_s = max_idle_s
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._worker_pages: dict[tuple[str, int], int] = {}  # (worker_id, page) -> hash
        self._num_worker_pages: Counter[str] = Counter()  # worker_id -> pages of its pool held
        self.used_bytes = 0
        self._now_s = float("-inf")
        self._num_hits = self._num_misses = self._num_evicted = 0

    # -- lookup --------------------------------------------------------------------------------
    def __contains__(self, h: int) -> bool:
        return h in self._entries

    def match_prefix(self, token_ids: Sequence[int], max_pages: int | None = None) -> PrefixMatch:
        """Longest run of leading full pages held anywhere, and each worker's own leading run.
        Counts hits and misses (in pages); changes no recency (that is `acquire`/`touch`)."""
        hashes = page_hashes(token_ids, self.page_size)
        num_full = len(hashes) if max_pages is None else min(len(hashes), max_pages)
        matched, locations = [], []
        worker_pages: dict[str, list[int]] = {}
        for i, h in enumerate(hashes[:num_full]):
            e = self._entries.get(h)
            if e is None or not e.locations:
                break
            matched.append(h)
            locations.append(tuple(e.locations))
            for key in filter(None, (loc.pool_key for loc in e.locations)):
                if len(worker_pages.get(key[0], ())) == i:
                    worker_pages.setdefault(key[0], []).append(key[1])
        self._num_hits += len(matched)
        self._num_misses += num_full - len(matched)
        return PrefixMatch(matched, locations, worker_pages, num_full)

    def num_worker_pages(self, worker_id: str) -> int:
        """Pages of `worker_id`'s pool the index holds (pinned ones included)."""
        return self._num_worker_pages[worker_id]

    def holds(self, worker_id: str, page: int) -> bool:
        """Whether the index holds page `page` of `worker_id`'s pool."""
        return (worker_id, page) in self._worker_pages

    def leading_run(self, token_ids: Sequence[int], max_pages: int | None,
                    is_wanted: Callable[[Location], bool]) -> int:
        """How many leading full pages of `token_ids` have a copy for which `is_wanted` holds
        (no stats, no recency)."""
        n = 0
        for h in page_hashes(token_ids, self.page_size)[:max_pages]:
            e = self._entries.get(h)
            if e is None or not any(is_wanted(loc) for loc in e.locations):
                break
            n += 1
        return n

    # -- pin -----------------------------------------------------------------------------------
    def acquire(self, hashes: Sequence[int], now_s: float) -> None:
        """Pin entries (one reference each) and touch them; pinned entries are never evicted."""
        missing = [h for h in hashes if h not in self._entries]
        if missing:
            raise KeyError(f"acquire: {len(missing)} hashes not in the index")
        for h in hashes:
            self._entries[h].refs += 1
        self.touch(hashes, now_s)

    def release(self, hashes: Sequence[int]) -> None:
        """Drop one reference each. Does not evict: `evict` / `publish` do that."""
        for h, n in Counter(hashes).items():
            e = self._entries.get(h)
            if e is None or e.refs < n:
                raise ValueError(f"release: page hash {h:x} is not acquired")
        for h in hashes:
            self._entries[h].refs -= 1
        self._collect(hashes)

    def touch(self, hashes: Iterable[int], now_s: float) -> None:
        """Mark entries and all their ancestors used at `now_s` (each chain leaf-first)."""
        self._advance(now_s)
        for h in hashes:
            while h is not None:
                self._entries[h].last_used_s = now_s
                self._entries.move_to_end(h)
                h = self._entries[h].parent

    # -- publish -------------------------------------------------------------------------------
    def publish(self, token_ids: Sequence[int], locations: Sequence[Location | None],
                now_s: float) -> PublishResult:
        """Record that the first len(locations) full pages of `token_ids` live at `locations`
        (None: no new copy of that page; it must already be in the index). Then evicts to fit."""
        hashes = page_hashes(token_ids, self.page_size)
        if len(locations) > len(hashes):
            raise ValueError(f"{len(locations)} locations for {len(hashes)} full pages")
        self._advance(now_s)
        keys = [l.pool_key for l in locations if l is not None and l.pool_key is not None]
        if len(keys) != len(set(keys)):
            raise ValueError("one worker page given for two pages")
        for h, loc in zip(hashes, locations):  # check everything before changing anything
            if loc is None and h not in self._entries:
                raise ValueError(f"page hash {h:x} is not in the index and has no location")
            if loc is not None and loc.pool_key is not None and self._worker_pages.get(loc.pool_key, h) != h:
                raise ValueError(f"worker {loc.pool_key[0]} page {loc.pool_key[1]} already caches another page")
        redundant: list[Location] = []
        parent = None
        for h, loc in zip(hashes, locations):
            e = self._entries.get(h)
            if e is None:
                e = self._entries[h] = _Entry(parent, [], now_s)
                if parent is not None:
                    self._entries[parent].num_children += 1
            if loc is not None:
                if any(l.holder == loc.holder for l in e.locations):
                    if loc not in e.locations:
                        redundant.append(loc)
                else:
                    e.locations.append(loc)
                    self.used_bytes += loc.kv_bytes
                    if loc.pool_key is not None:
                        self._worker_pages[loc.pool_key] = h
                        self._num_worker_pages[loc.pool_key[0]] += 1
            parent = h
        published = hashes[:len(locations)]
        if published:
            self.touch(published[-1:], now_s)
        return PublishResult(published, redundant, self.evict(now_s))

    # -- evict ---------------------------------------------------------------------------------
    def evict(self, now_s: float, need_bytes: int = 0) -> list[Evicted]:
        """Remove least recently used unpinned leaves until used_bytes + need_bytes <= max_bytes,
        and every unpinned leaf idle for more than `max_idle_s`. Returns what was removed."""
        self._advance(now_s)
        cutoff = now_s - self.max_idle_s if self.max_idle_s is not None else float("-inf")
        excess = self.used_bytes + need_bytes - self.max_bytes
        victims: list[int] = []
        gone_children: dict[int, int] = {}
        for h, e in self._entries.items():  # children come before their parents
            if excess <= 0 and e.last_used_s >= cutoff:
                break
            if e.refs or e.num_children > gone_children.get(h, 0):
                continue
            victims.append(h)
            excess -= e.kv_bytes
            if e.parent is not None:
                gone_children[e.parent] = gone_children.get(e.parent, 0) + 1
        parents = [self._entries[h].parent for h in victims]
        evicted = [self._remove(h) for h in victims]
        self._collect(p for p in parents if p is not None)  # parents left with no copy
        return [e for e in evicted if e.locations]

    def evict_worker(self, worker_id: str, num_pages: int, now_s: float) -> list[Evicted]:
        """Free up to `num_pages` of one worker's pool (its engine needs room): drop that worker's
        copies of the least recently used unpinned pages, children before parents. Other copies
        of those pages stay; entries left with no copy go."""
        self._advance(now_s)
        out: list[Evicted] = []
        for h, e in self._entries.items():
            if len(out) >= num_pages:
                break
            loc = next((l for l in e.locations if l.pool_key is not None and l.pool_key[0] == worker_id), None)
            if loc is not None and not e.refs:
                out.append(Evicted(h, (loc,)))
        for ev in out:
            self._drop(ev.hash, ev.locations[0])
        self._num_evicted += len(out)
        self._collect([ev.hash for ev in out])
        return out

    def remove_worker(self, worker_id: str) -> list[Evicted]:
        """Forget every page of a worker's pool (the worker died or was drained)."""
        keys = [k for k in self._worker_pages if k[0] == worker_id]
        out = []
        for key in keys:
            h = self._worker_pages[key]
            loc = next(l for l in self._entries[h].locations if l.pool_key == key)
            self._drop(h, loc)
            out.append(Evicted(h, (loc,)))
        self._collect([ev.hash for ev in out])
        return out

    def _drop(self, h: int, loc: Location) -> None:
        """Forget one copy of a page (the entry stays; `_collect` removes it if left empty)."""
        self._entries[h].locations.remove(loc)
        self.used_bytes -= loc.kv_bytes
        if loc.pool_key is not None:
            del self._worker_pages[loc.pool_key]
            self._num_worker_pages[loc.pool_key[0]] -= 1

    def _remove(self, h: int) -> Evicted:
        e = self._entries.pop(h)
        assert e.refs == 0 and e.num_children == 0, "only unpinned leaves are removed"
        if e.parent is not None:
            self._entries[e.parent].num_children -= 1
        for key in filter(None, (loc.pool_key for loc in e.locations)):
            del self._worker_pages[key]
            self._num_worker_pages[key[0]] -= 1
        self.used_bytes -= e.kv_bytes
        self._num_evicted += bool(e.locations)
        return Evicted(h, tuple(e.locations))

    def _collect(self, hashes: Iterable[int]) -> None:
        """Drop entries left with no copy, no pin and no children (and then such parents)."""
        for h in hashes:
            while h is not None and h in self._entries:
                e = self._entries[h]
                if e.locations or e.refs or e.num_children:
                    break
                self._remove(h)
                h = e.parent

    def _advance(self, now_s: float) -> None:
        if now_s < self._now_s:
            raise ValueError(f"time went backwards: now_s={now_s} < {self._now_s}")
        self._now_s = now_s

    # -- stats and invariants ------------------------------------------------------------------
    def stats(self) -> IndexStats:
        return IndexStats(len(self._entries), sum(len(e.locations) for e in self._entries.values()),
                          self.used_bytes, self.max_bytes, self._num_hits, self._num_misses, self._num_evicted)

    def refcount(self, h: int) -> int:
        return self._entries[h].refs

    def lru_order(self) -> list[int]:
        """Hashes, least recently used first."""
        return list(self._entries)

    def check(self) -> None:
        """Invariants: byte and child counts add up; every parent is present and more recent
        than its children; recency order matches timestamps; one copy per holder; a worker
        page caches one hash; an entry with no copy is pinned or has children."""
        children: dict[int, int] = {}
        position = {h: i for i, h in enumerate(self._entries)}
        worker_pages = {}
        last = float("-inf")
        for h, e in self._entries.items():
            assert e.refs >= 0, f"{h:x}: negative refcount"
            assert e.last_used_s >= last, "recency order disagrees with timestamps"
            last = e.last_used_s
            if e.parent is not None:
                assert e.parent in self._entries, f"{h:x}: parent missing"
                assert position[e.parent] > position[h], f"{h:x}: parent less recent than child"
                children[e.parent] = children.get(e.parent, 0) + 1
            holders = [loc.holder for loc in e.locations]
            assert len(holders) == len(set(holders)), f"{h:x}: two copies at one holder"
            for key in filter(None, (loc.pool_key for loc in e.locations)):
                assert key not in worker_pages, "worker page cached twice"
                worker_pages[key] = h
            assert e.locations or e.refs or e.num_children, f"{h:x}: empty entry kept"
        for h, e in self._entries.items():
            assert e.num_children == children.get(h, 0), f"{h:x}: child count"
        assert worker_pages == self._worker_pages, "worker page map out of date"
        assert +self._num_worker_pages == Counter(w for w, _ in worker_pages), "worker page counts"
        assert self.used_bytes == sum(e.kv_bytes for e in self._entries.values()), "used_bytes"
