"""Counters in one shared-memory table made by the supervisor before fork (see _core/shm.pyx).

All workers of a host see one exact count, and the table outlives a reload because new workers
fork from the supervisor that holds it. Times here are seconds; the compiled limiter works in
CLOCK_MONOTONIC nanoseconds.
"""
from __future__ import annotations

from .._core.ratelimit import Limiter
from .._core.shm import SharedTable

NS = 1_000_000_000


class LocalCounters:
    __slots__ = ("table", "limiter")

    def __init__(self, table: SharedTable):
        self.table = table
        self.limiter = Limiter(table)

    def gcra(self, key: bytes, rate: float, per_s: float, burst: int, cost: int = 1):
        allowed, remaining, retry_ns, reset_ns = self.limiter.gcra(key, rate, int(per_s * NS), burst, cost)
        return allowed, remaining, retry_ns / NS, reset_ns / NS

    def sliding_window(self, key: bytes, limit: int, window_s: float, cost: int = 1):
        allowed, remaining, retry_ns, reset_ns = self.limiter.sliding_window(key, limit, int(window_s * NS), cost)
        return allowed, remaining, retry_ns / NS, reset_ns / NS

    def fixed_window(self, key: bytes, limit: int, window_id: int, ttl_s: float, cost: int = 1):
        return self.limiter.fixed_window(key, limit, window_id, int(ttl_s * NS), cost)

    def acquire(self, key: bytes, limit: int, ttl_s: float) -> tuple[bool, int]:
        """Take one of `limit` concurrent places: (taken, in use). A place never given back (its worker
        died) is forgotten `ttl_s` after the key's last use."""
        return self.limiter.acquire(key, limit, int(ttl_s * NS))

    def release(self, key: bytes) -> int:
        """Give back a place `acquire` took; returns the places still in use."""
        return self.limiter.release(key)


class Counters:
    """The backends a worker has; policies pick theirs by name (default: the config's)."""

    __slots__ = ("local", "redis", "default")

    def __init__(self, local: LocalCounters, redis=None, default: str = "local"):
        self.local = local
        self.redis = redis
        self.default = default

    def backend(self, name: str | None):
        name = name or self.default
        if name == "redis":
            if self.redis is None:
                raise ValueError("a policy asks for redis counters but `counters.redis` is not configured")
            return self.redis
        return self.local
