import pytest

from spanjax.engine.pages import PagePool, PoolExhausted


def test_allocate_release_and_exhaustion():
    pool = PagePool(num_pages=4, page_size=8)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [1, 2, 3]  # page 0 is the reserved null page
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(pages[0])
    assert pool.allocate() == pages[0]


def test_registered_pages_are_hit_and_evicted_lru_only_when_unreferenced():
    pool = PagePool(num_pages=4, page_size=8)
    a, b, c = (pool.allocate() for _ in range(3))
    assert pool.register(a, "A", 0, 8) and pool.register(b, "B", 8, 8)
    assert not pool.register(c, "A", 0, 8)  # same content already published: c stays private
    pool.release(a)
    pool.release(b)
    # A hit takes a reference and removes the page from the eviction order.
    assert pool.lookup("A") == a
    assert pool.lookup("missing") is None
    pool.release(c)  # private page -> free list
    assert pool.allocate() == c
    # Next allocation must evict B (unreferenced), never A (referenced).
    assert pool.allocate() == b
    assert pool.lookup("B") is None
    assert pool.stats.evictions == 1
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(a)
    assert pool.allocate() == a  # now evictable


def test_lru_order_follows_last_release():
    pool = PagePool(num_pages=3, page_size=4)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, "A", 0, 4)
    pool.register(b, "B", 0, 4)
    pool.release(a)
    pool.release(b)
    pool.release(pool.lookup("A"))  # A used again: B is now least recently used
    assert pool.allocate() == b


def test_double_release_is_an_error():
    pool = PagePool(num_pages=3, page_size=4)
    a = pool.allocate()
    pool.release(a)
    with pytest.raises(RuntimeError):
        pool.release(a)
