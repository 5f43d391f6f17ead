"""Host-side page allocator with reference counts (shared prefix pages).

Page 0 is the null page: it is never handed out, page tables are padded with it, and padded
tokens write their K/V into it, so padding can never touch a live page.
"""

from __future__ import annotations

from collections import deque

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(1, num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        if not self.can_allocate(num_pages):
            raise OutOfPages(f"asked for {num_pages} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated")
            self._refs[p] += 1

    def free(self, pages) -> None:
        """Drop one reference to each page; pages reaching zero go back to the free list."""
        for p in pages:
            if p == NULL_PAGE or self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def check(self) -> None:
        """Invariant: every page but the null page is free xor referenced."""
        free = set(self._free)
        assert len(free) == len(self._free), "page freed twice"
        for p in range(1, self.num_pages):
            assert (p in free) == (self._refs[p] == 0), f"page {p}: free list and refcount disagree"
