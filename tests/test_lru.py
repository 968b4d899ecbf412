"""The bounded cache behind the daemon's and the store's memos."""

from store.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    lru = Lru[str, int](2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    lru.put("a", 4)
    assert len(lru) == 2 and lru.get("a") == 4
