"""The global KV store: the prefix index and the host tier's objects, one owner for both.

Pure host bookkeeping (no Ray, threads or asyncio; time passed in). Two tiers, each a type of
its own (the index, scheduler/kv_index.py, sees any `Location`; a third tier is a third type):
  PoolPage  a page of a worker's page pool; freeing one is a `FreePages` action on that worker.
  HostPage  a page of an export of consecutive pages in Ray's object store, held here as an
            opaque payload reference under a key; the last page of an object the index lets
            go drops the reference (Ray frees the object).
Every method that changes what the store holds returns the actions the caller must carry out
(free pages on a worker, export pages to the host tier); the store never calls anything.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict
from typing import Iterable, Sequence

from scheduler.kv_index import Evicted, KVIndex, Location, PrefixMatch, PublishResult

COMPRESSIONS = ("none", "int8")  # how a copy's K/V is stored


def _check(kv_bytes: int, page: int, compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if kv_bytes < 0 or page < 0:
        raise ValueError(f"kv_bytes and page must be >= 0, got {kv_bytes} and {page}")


@dataclasses.dataclass(frozen=True)
class PoolPage:
    """Page `page` of `worker_id`'s page pool (the store holds one reference on it)."""

    worker_id: str
    page: int
    kv_bytes: int
    compression: str = "none"

    def __post_init__(self):
        _check(self.kv_bytes, self.page, self.compression)

    @property
    def holder(self) -> tuple[str, str]:
        return ("pool", self.worker_id)

    @property
    def pool_key(self) -> tuple[str, int]:
        return (self.worker_id, self.page)


@dataclasses.dataclass(frozen=True)
class HostPage:
    """Page `page` (its index in the object) of the host copy `object_key` on node `node_id`."""

    node_id: str
    object_key: str
    page: int
    kv_bytes: int
    compression: str = "int8"

    def __post_init__(self):
        _check(self.kv_bytes, self.page, self.compression)

    @property
    def holder(self) -> tuple[str, str]:
        return ("host", self.node_id)

    @property
    def pool_key(self) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class FreePages:
    """Free `pages` of `worker`'s pool (the store, or a request, held one reference each)."""

    worker: str
    pages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ExportPages:
    """Copy `pages` of `worker`'s pool (pages [first, first + len(pages)) of `token_ids`) to the
    host tier; the caller reports the result with `KVStore.add_host_copy`."""

    worker: str
    token_ids: tuple[int, ...]
    first: int
    pages: tuple[int, ...]
    compression: str


class HostObjects:
    """key -> [payload reference, pages of it the index still holds]."""

    def __init__(self):
        self._objects: dict[str, list] = {}
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._objects)

    def add(self, ref, num_pages: int) -> str:
        key = f"host-{next(self._keys)}"
        self._objects[key] = [ref, num_pages]
        return key

    def discard(self, key: str) -> None:
        self._objects.pop(key, None)

    def drop_page(self, key: str) -> None:
        held = self._objects.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del self._objects[key]

    def prefix(self, locations) -> list[tuple[object, list[int]]]:
        """(payload reference, page positions in it) for pages with a host copy, consecutive
        pages of one object grouped, in order (what a prefill job's `host_prefix` takes)."""
        out: list[tuple[str, list[int]]] = []
        for locs in locations:
            loc = next(loc for loc in locs if isinstance(loc, HostPage))
            if out and out[-1][0] == loc.object_key:
                out[-1][1].append(loc.page)
            else:
                out.append((loc.object_key, [loc.page]))
        return [(self._objects[key][0], positions) for key, positions in out]


class KVStore:
    def __init__(self, page_size: int, kv_bytes_per_page: int, max_bytes: int, host_copies: str | None = None):
        self.index = KVIndex(page_size, max_bytes)
        self.host = HostObjects()
        self.page_size, self.kv_bytes_per_page = page_size, kv_bytes_per_page
        self.host_copies = host_copies  # "int8" | "none": the host tier's compression; None: no host tier

    # -- lookup and pins -----------------------------------------------------------------------
    def match(self, token_ids: Sequence[int], max_pages: int) -> PrefixMatch:
        return self.index.match_prefix(token_ids, max_pages)

    def num_host_pages(self, match: PrefixMatch) -> int:
        """Leading matched pages that have a host copy (0 without a host tier)."""
        if not self.host_copies:
            return 0
        return sum(1 for _ in itertools.takewhile(lambda locs: any(isinstance(l, HostPage) for l in locs),
                                                  match.locations))

    def host_prefix(self, locations) -> list[tuple[object, list[int]]]:
        return self.host.prefix(locations)

    def pin(self, hashes: Sequence[int], now_s: float) -> None:
        self.index.acquire(hashes, now_s)

    def unpin(self, hashes: Sequence[int]) -> None:
        if hashes:
            self.index.release(hashes)

    def num_worker_pages(self, worker: str) -> int:
        return self.index.num_worker_pages(worker)

    # -- publish -------------------------------------------------------------------------------
    def publish_prefill(self, worker: str, token_ids: Sequence[int], own_pages: Sequence[int],
                        num_prefix_pages: int, new_pages: Sequence[int], now_s: float,
                        can_export: bool) -> list:
        """A prefill's new full prompt pages (after `num_prefix_pages` reused ones) on `worker`.
        With the host tier on and `can_export`, also export the pages with no host copy yet
        (the worker runs the export before any later free of those pages)."""
        actions: list = []
        pages = list(own_pages) + list(new_pages)
        if self.host_copies and new_pages and can_export:
            run = self.index.leading_run(token_ids, len(pages), lambda loc: isinstance(loc, HostPage))
            if run < len(pages):
                actions.append(ExportPages(worker, tuple(token_ids), run, tuple(pages[run:]), self.host_copies))
        locations = [None] * num_prefix_pages + [PoolPage(worker, p, self.kv_bytes_per_page) for p in new_pages]
        try:
            published = self.index.publish(token_ids, locations, now_s)
        except ValueError:  # the prefix was not what the index held: keep nothing
            return actions + self.free([loc for loc in locations if loc is not None])
        return actions + self._gone(published)

    def publish_finished(self, worker: str, token_ids: Sequence[int], pages: Sequence[int], now_s: float) -> list:
        """A finished request's full pages (prompt and generated tokens) on `worker`, so a later
        turn reuses them. The worker holds one reference on each; pages the index already holds
        there keep theirs, so the extra reference is dropped."""
        held = [self.index.holds(worker, p) for p in pages]
        locations = [None if h else PoolPage(worker, p, self.kv_bytes_per_page) for p, h in zip(pages, held)]
        extra = [PoolPage(worker, p, 0) for p, h in zip(pages, held) if h]
        try:
            published = self.index.publish(token_ids, locations, now_s)
        except ValueError:  # an earlier page left the index meanwhile: cache nothing
            return self.free([PoolPage(worker, p, 0) for p in pages])
        return self.free(extra) + self._gone(published)

    def add_host_copy(self, token_ids: Sequence[int], first: int, num_pages: int, node_id: str,
                      num_bytes: int, payload, now_s: float) -> list:
        """A host copy of pages [first, first + num_pages) of `token_ids` now exists."""
        key = self.host.add(payload, num_pages)
        per_page = num_bytes // max(1, num_pages)
        locations = [None] * first + [HostPage(node_id, key, i, per_page, self.host_copies or "none")
                                      for i in range(num_pages)]
        try:
            published = self.index.publish(token_ids, locations, now_s)
        except ValueError:  # the prefix left the index meanwhile: the copy has nothing to extend
            self.host.discard(key)
            return []
        return self._gone(published)

    # -- evict and free ------------------------------------------------------------------------
    def make_room(self, worker: str, num_pages: int, now_s: float) -> list:
        """Evict up to `num_pages` cached pages of `worker`'s pool."""
        if num_pages <= 0:
            return []
        return self.free([loc for ev in self.index.evict_worker(worker, num_pages, now_s) for loc in ev.locations])

    def clear(self, workers: Iterable[str], now_s: float, pools_only: bool = False) -> list:
        """Evict every unpinned page (only the pool copies of `workers` with `pools_only`)."""
        if pools_only:
            evicted = [ev for w in workers for ev in self.index.evict_worker(w, 1 << 62, now_s)]
        else:
            evicted = self.index.evict(now_s, need_bytes=self.index.max_bytes + self.index.used_bytes + 1)
        return self.free([loc for ev in evicted for loc in ev.locations])

    def remove_worker(self, worker: str) -> None:
        """A dead worker's pages went with it: forget them (nothing to free)."""
        self.index.remove_worker(worker)

    def free(self, locations: Iterable[Location]) -> list[FreePages]:
        """Let go of copies: host pages drop their object's count, pool pages become FreePages."""
        by_worker: dict[str, list[int]] = defaultdict(list)
        for loc in locations:
            match loc:
                case HostPage(object_key=key):
                    self.host.drop_page(key)
                case PoolPage(worker_id=worker, page=page):
                    by_worker[worker].append(page)
                case _:
                    raise TypeError(f"not a KV store tier: {loc!r}")
        return [FreePages(w, tuple(pages)) for w, pages in by_worker.items()]

    def _gone(self, published: PublishResult) -> list[FreePages]:
        return self.free(list(published.redundant) + [loc for ev in published.evicted for loc in ev.locations])

    # -- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.index.stats()
        return dict(num_entries=s.num_entries, used_bytes=s.used_bytes, max_bytes=s.max_bytes, hit_rate=s.hit_rate,
                    num_hit_pages=s.num_hit_pages, num_miss_pages=s.num_miss_pages, num_evicted=s.num_evicted,
                    num_host_objects=len(self.host), host_copies=self.host_copies)

    def check(self) -> None:
        self.index.check()


__all__ = ["KVStore", "HostObjects", "PoolPage", "HostPage", "Location", "FreePages", "ExportPages", "Evicted"]
