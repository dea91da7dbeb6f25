"""Reference model of _core/balance.pyx: target health and the load balancers, in plain Python —
the code the data plane ran before they were compiled. tests/property/test_balance.py drives the
two side by side.

Only targets whose health says `available` are considered. Weights are honoured by every
balancer: smooth weighted round-robin (nginx's), least connections by active/weight, power of two
random choices by active/weight, weighted random, and a consistent-hash ring (160 points per
weight-100 target) that walks clockwise past unavailable targets.
"""
from __future__ import annotations

import bisect
import random
import zlib

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class TargetHealth:
    __slots__ = ("address", "active_up", "_act_ok", "_act_fail", "failures", "max_failures", "eject_for",
                 "ejected_until", "breaker", "b_window", "b_min", "b_ratio", "b_open_for", "b_start",
                 "b_total", "b_failed", "b_until", "b_probe", "fail_statuses", "log")

    def __init__(self, address: str, passive=None, breaker=None):
        self.address = address
        self.log = []  # the events the compiled Health logs: ejected, open, closed, healthy, unhealthy
        self.active_up = True
        self._act_ok = self._act_fail = 0
        self.failures = 0
        self.max_failures = passive.max_failures if passive is not None else 0
        self.eject_for = passive.eject_for if passive is not None else 0.0
        # responses that count as failures (passive checks and the breaker); default: any 5xx
        self.fail_statuses = frozenset(passive.failure_statuses if passive is not None else range(500, 600))
        self.ejected_until = 0.0
        self.breaker = CLOSED
        self.b_window = breaker.window if breaker else 0.0
        self.b_min = breaker.min_requests if breaker else 0
        self.b_ratio = breaker.failure_ratio if breaker else 0.0
        self.b_open_for = breaker.open_for if breaker else 0.0
        self.b_start = 0.0
        self.b_total = self.b_failed = 0
        self.b_until = 0.0
        self.b_probe = False

    def available(self, now: float) -> bool:
        if not self.active_up or now < self.ejected_until:
            return False
        if self.breaker == CLOSED:
            return True
        if self.breaker == OPEN:
            if now < self.b_until:
                return False
            self.breaker = HALF_OPEN
            self.b_probe = False
        return not self.b_probe  # half-open: exactly one probe in flight

    def on_pick(self) -> None:
        if self.breaker == HALF_OPEN:
            self.b_probe = True

    def report(self, ok: bool, now: float) -> None:
        if ok:
            self.failures = 0
        else:
            self.failures += 1
            if self.max_failures and self.failures >= self.max_failures:
                self.ejected_until = now + self.eject_for
                self.failures = 0
                self.log.append("ejected")
        if not self.b_window:
            return
        if self.breaker == HALF_OPEN:
            self.b_probe = False
            if ok:
                self.breaker = CLOSED
                self.b_start, self.b_total, self.b_failed = now, 0, 0
                self.log.append("closed")
            else:
                self._open(now)
            return
        if now - self.b_start > self.b_window:
            self.b_start, self.b_total, self.b_failed = now, 0, 0
        self.b_total += 1
        if not ok:
            self.b_failed += 1
            if self.b_total >= self.b_min and self.b_failed >= self.b_ratio * self.b_total:
                self._open(now)

    def _open(self, now: float) -> None:
        self.breaker = OPEN
        self.b_until = now + self.b_open_for
        self.log.append("open")

    def active_result(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> None:
        if ok:
            self._act_fail = 0
            self._act_ok += 1
            if not self.active_up and self._act_ok >= healthy_threshold:
                self.active_up = True
                self.log.append("healthy")
        else:
            self._act_ok = 0
            self._act_fail += 1
            if self.active_up and self._act_fail >= unhealthy_threshold:
                self.active_up = False
                self.log.append("unhealthy")

    def snapshot(self, now: float) -> dict:
        return {"address": self.address, "available": self.available(now), "active_up": self.active_up,
                "ejected": now < self.ejected_until, "circuit": ("closed", "open", "half_open")[self.breaker]}


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
        if n == 0:
            return None
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
        if n == 0:
            return None
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
