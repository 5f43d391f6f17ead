"""Host copies of KV pages for the scheduler's KV store (its host tier).

Each object is one export of consecutive pages (`PrefillWorker.export_pages`), held by the
scheduler as a Ray object reference under a key that the index's `Location.on_host` names.
The table counts how many of an object's pages the index still holds; when the index lets go
of the last one (`drop_page`), the reference goes and Ray frees the object. Plain Python: the
references are opaque here.
"""

from __future__ import annotations

import itertools

from scheduler.kv_index import KIND_HOST


class HostCopies:
    def __init__(self):
        self._objects: dict[str, list] = {}  # key -> [payload reference, pages the index still holds]
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._objects)

    def add(self, ref, num_pages: int) -> str:
        """Hold a new object of `num_pages` pages. -> its key."""
        key = f"host-{next(self._keys)}"
        self._objects[key] = [ref, num_pages]
        return key

    def discard(self, key: str) -> None:
        """Forget an object the index never took."""
        self._objects.pop(key, None)

    def drop_page(self, key: str) -> None:
        """The index dropped one page of this object; the last one drops the object."""
        held = self._objects.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del self._objects[key]

    def prefix(self, locations) -> list[tuple[object, list[int]]]:
        """For pages given by their index locations (one tuple per page, each with a host
        copy): (payload reference, page positions in it), consecutive pages of one object
        grouped, in order. What `PrefillJob.host_prefix` takes."""
        out: list[tuple[str, list[int]]] = []
        for locs in locations:
            loc = next(loc for loc in locs if loc.kind == KIND_HOST)
            if out and out[-1][0] == loc.object_ref_key:
                out[-1][1].append(loc.page)
            else:
                out.append((loc.object_ref_key, [loc.page]))
        return [(self._objects[key][0], positions) for key, positions in out]
