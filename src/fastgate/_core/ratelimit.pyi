"""Rate-limit algorithms over a SharedTable (compiled; see ratelimit.pyx).

Times are CLOCK_MONOTONIC nanoseconds; now_ns=0 reads the clock.
"""
from typing import final

from .shm import SharedTable

Decision = tuple[bool, int, int, int]
"""(allowed, remaining, retry_after_ns, reset_ns)"""

@final
class Limiter:
    def __init__(self, table: SharedTable) -> None: ...
    def gcra(self, key: bytes, rate: float, per_ns: int, burst: int, cost: int = 1, now_ns: int = 0) -> Decision:
        """Token bucket as GCRA: `burst` at once from a full bucket, then `rate` per `per_ns`."""
    token_bucket = gcra
    def sliding_window(self, key: bytes, limit: int, window_ns: int, cost: int = 1, now_ns: int = 0) -> Decision:
        """`limit` per `window_ns`, the previous window weighted by its remaining overlap."""
    def fixed_window(self, key: bytes, limit: int, window_id: int, ttl_ns: int, cost: int = 1,
                     now_ns: int = 0) -> tuple[bool, int]:
        """`limit` per window named `window_id`: (allowed, remaining)."""
    def acquire(self, key: bytes, limit: int, ttl_ns: int, now_ns: int = 0) -> tuple[bool, int]:
        """Take one of `limit` concurrent places: (taken, in_use)."""
    def release(self, key: bytes, now_ns: int = 0) -> int:
        """Give a place back; returns the places still in use."""

@final
class Lease:
    """Tokens of one key a worker took from Redis in lease mode, and the fetch in flight."""
    tokens: int
    remaining: int
    refused_cost: int
    want: int
    expires: float
    reset_at: float
    refused_until: float
    refill_after: float
    ttl: float
    kind: int
    waiters: list | None
    args: tuple
    tail: bytes
    def __init__(self, kind: int, args: tuple, tail: bytes, ttl: float) -> None: ...
