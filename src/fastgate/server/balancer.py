"""Load balancers over an upstream's targets. Each `pick(key, now)` returns a Target or None.

Only targets whose health says `available` are considered. Weights are honoured by every
balancer: smooth weighted round-robin (nginx's), least connections by active/weight, power of two
random choices by active/weight, weighted random, and a consistent-hash ring (160 points per
weight-100 target) that walks clockwise past unavailable targets.
"""
from __future__ import annotations

import bisect
import random
import zlib

# what a consistent-hash upstream hashes on (UpstreamGroup.hash_on; -1: not hashing)
HASH_IP, HASH_HEADER, HASH_COOKIE, HASH_CONSUMER = 0, 1, 2, 3


class Balancer:
    __slots__ = ("targets", "_rand")

    def __init__(self, targets):
        self.targets = [t for t in targets if t.weight > 0]
        self._rand = random.Random()

    def pick(self, key, now: float, exclude=()):  # pragma: no cover - interface
        raise NotImplementedError


class RoundRobin(Balancer):
    __slots__ = ("_current", "_equal", "_i")

    def __init__(self, targets):
        super().__init__(targets)
        self._current = [0] * len(self.targets)
        self._equal = len({t.weight for t in self.targets}) <= 1
        self._i = -1

    def pick(self, key, now, exclude=()):
        ts = self.targets
        n = len(ts)
        if n == 1:
            t = ts[0]
            return t if t.health.available(now) and not exclude else None
        if self._equal:
            for _ in range(n):
                self._i = i = (self._i + 1) % n
                t = ts[i]
                if t.health.available(now) and t not in exclude:
                    return t
            return None
        best, total, cur = -1, 0, self._current
        for i, t in enumerate(ts):
            if not t.health.available(now) or t in exclude:
                continue
            cur[i] += t.weight
            total += t.weight
            if best < 0 or cur[i] > cur[best]:
                best = i
        if best < 0:
            return None
        cur[best] -= total
        return ts[best]


class LeastConnections(Balancer):
    __slots__ = ()

    def pick(self, key, now, exclude=()):
        best, best_load = None, 0.0
        for t in self.targets:
            if not t.health.available(now) or t in exclude:
                continue
            load = (t.active + 1) / t.weight
            if best is None or load < best_load:
                best, best_load = t, load
        return best


class PowerOfTwo(Balancer):
    __slots__ = ()

    def pick(self, key, now, exclude=()):
        up = [t for t in self.targets if t.health.available(now) and t not in exclude]
        if len(up) <= 1:
            return up[0] if up else None
        a, b = self._rand.sample(up, 2)
        return a if (a.active + 1) / a.weight <= (b.active + 1) / b.weight else b


class WeightedRandom(Balancer):
    __slots__ = ()

    def pick(self, key, now, exclude=()):
        up = [t for t in self.targets if t.health.available(now) and t not in exclude]
        if not up:
            return None
        return self._rand.choices(up, weights=[t.weight for t in up])[0]


def key_hash(data: bytes) -> int:
    """A 32-bit hash of a key: CRC-32 then MurmurHash3's finalizer. CRC-32 alone is linear, so keys
    that differ in a few characters (user1, user2, ...) land close together: 16 such names all fell
    on one of two ring targets in about 6% of random rings; with the finalizer, as rarely as chance
    allows (2 in 65,536)."""
    h = zlib.crc32(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)



class ConsistentHash(Balancer):
    """Ring with 160 points per weight-100 target; `key` (bytes) picks a point clockwise."""

    __slots__ = ("_points", "_owners", "_fallback")
    POINTS = 160

    def __init__(self, targets):
        super().__init__(targets)
        ring = []
        for t in self.targets:
            n = max(1, self.POINTS * t.weight // 100)
            for i in range(n):
                ring.append((key_hash(f"{t.address}#{i}".encode()), t.address, t))
        ring.sort(key=lambda p: (p[0], p[1]))
        self._points = [p[0] for p in ring]
        self._owners = [p[2] for p in ring]
        self._fallback = RoundRobin(targets)

    def pick(self, key, now, exclude=()):
        if not key:
            return self._fallback.pick(key, now, exclude)
        n = len(self._points)
        start = bisect.bisect_left(self._points, key_hash(key)) % n
        seen = set()
        for k in range(n):
            t = self._owners[(start + k) % n]
            if t in seen:
                continue
            if t.health.available(now) and t not in exclude:
                return t
            seen.add(t)
            if len(seen) == len(self.targets):
                break
        return None


BALANCERS = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "p2c": PowerOfTwo,
    "random": WeightedRandom,
    "consistent_hash": ConsistentHash,
}
