"""Fixed-size hash table in one anonymous shared mapping made before fork (compiled; see shm.pyx)."""
from typing import final

def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock every worker of a host shares."""

@final
class SharedTable:
    def __init__(self, capacity: int) -> None:
        """At least `capacity` slots (rounded up to a power of two, 64 minimum); MemoryError if unmappable."""
    @property
    def capacity(self) -> int: ...
    @property
    def used(self) -> int:
        """Slots ever claimed by a key (stale ones included)."""
    @property
    def full_events(self) -> int:
        """Inserts that found no free or stale slot and evicted a live key: raise the capacity."""
    @property
    def evictions(self) -> int:
        """Inserts that reused the slot of an expired key."""
    @property
    def nbytes(self) -> int: ...
    def get(self, key: bytes, now_ns: int = 0) -> int:
        """The key's value (0 when absent or expired)."""
    def add(self, key: bytes, delta: int, ttl_ns: int = 0, now_ns: int = 0) -> int:
        """Add `delta` and return the new value; `ttl_ns` > 0 (re)sets the key's expiry."""
    def clear(self) -> None:
        """Forget every key (not while workers count)."""
    def _hold(self, key: bytes) -> None:
        """Lock the key's slot and never unlock it (tests only)."""

@final
class SharedArray:
    def __init__(self, n: int) -> None:
        """n int64 counters in one shared mapping (made before fork), added to atomically."""
    def __len__(self) -> int: ...
    def add(self, i: int, delta: int) -> None: ...
    def get(self, i: int) -> int: ...
