"""Host-side bookkeeping of the KV page pool and the content-addressed span cache.

The device arrays live in `spanjax.models.llama.PagedKVCache`; this module only
decides which page holds what. A page is in one of three states:

- free: no content, refcount 0 (on the free list);
- in use: refcount > 0 (listed by at least one live sequence); never evicted;
- cached: refcount 0 but holding registered content under a key; reusable on a
  hit, evicted least-recently-used when a fresh page is needed.

Keys come from the span plan (chained page hashes, see spanjax/query/lower.py),
so identical spans hit whatever order a `plus` lists them in.
"""

from __future__ import annotations

import collections
import dataclasses


class PoolExhausted(RuntimeError):
    """No free or evictable page is left; the scheduler preempts and retries."""


@dataclasses.dataclass
class PageInfo:
    refcount: int = 0
    key: str | None = None  # registered content key; None = private or free
    start_pos: int = 0  # logical position its first token was computed at
    valid_len: int = 0  # tokens written


@dataclasses.dataclass
class CacheStats:
    hit_tokens: int = 0
    miss_tokens: int = 0
    evictions: int = 0


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"page pool needs num_pages >= 2 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Page 0 is reserved as the null page that padded block-table entries point at.
        self.pages = [PageInfo() for _ in range(num_pages)]
        self.pages[0].refcount = 1
        self._free = collections.deque(range(1, num_pages))
        self._index: dict[str, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced
        self.stats = CacheStats()

    # -- capacity ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Pages a single sequence could ever hold (everything but the null page)."""
        return self.num_pages - 1

    def num_available(self) -> int:
        return len(self._free) + len(self._lru)

    def num_free(self) -> int:
        """Pages that can be allocated without evicting a cached one."""
        return len(self._free)

    # -- allocation -------------------------------------------------------

    def allocate(self) -> int:
        """A fresh private page (refcount 1), evicting the LRU cached page if needed."""
        if self._free:
            page = self._free.popleft()
        elif self._lru:
            page, _ = self._lru.popitem(last=False)
            info = self.pages[page]
            del self._index[info.key]
            self.stats.evictions += 1
        else:
            raise PoolExhausted(f"all {self.capacity} KV pages are in use")
        self.pages[page] = PageInfo(refcount=1)
        return page

    def acquire(self, page: int) -> None:
        info = self.pages[page]
        if info.refcount == 0:
            self._lru.pop(page, None)
        info.refcount += 1

    def release(self, page: int) -> None:
        info = self.pages[page]
        if info.refcount <= 0:
            raise RuntimeError(f"page {page} released more often than acquired")
        info.refcount -= 1
        if info.refcount == 0:
            if info.key is None:
                self.pages[page] = PageInfo()
                self._free.append(page)
            else:
                self._lru[page] = None  # most recently used at the end

    # -- content addressing ----------------------------------------------

    def lookup(self, key: str) -> int | None:
        """The page holding `key`, acquired for the caller, or None."""
        page = self._index.get(key)
        if page is not None:
            self.acquire(page)
        return page

    def register(self, page: int, key: str, start_pos: int, valid_len: int) -> bool:
        """Publish a fully written page under `key`. Returns False when another
        page already holds that content (this one then stays private)."""
        if key in self._index:
            return False
        info = self.pages[page]
        if info.key is not None:
            del self._index[info.key]
        info.key, info.start_pos, info.valid_len = key, start_pos, valid_len
        self._index[key] = page
        return True

    def drop_cached(self) -> int:
        """Free every cached, unreferenced page; returns how many."""
        n = len(self._lru)
        while self._lru:
            page, _ = self._lru.popitem(last=False)
            del self._index[self.pages[page].key]
            self.pages[page] = PageInfo()
            self._free.append(page)
        return n

    def num_cached(self) -> int:
        return len(self._index)
