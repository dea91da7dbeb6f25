"""Pure-Python reference for _core/shm.pyx + _core/ratelimit.pyx (a dict instead of shared slots).

Same arithmetic as the compiled code, written the plain way: integers where it uses int64,
floats where it uses doubles (IEEE doubles behave the same in C and Python). No eviction: the
property tests give the compiled table room enough that it never evicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Slot:
    expires: int = 0
    a: int = 0
    b: int = 0
    c: int = 0


class Model:
    def __init__(self):
        self.slots: dict[bytes, Slot] = {}

    def _slot(self, key: bytes, now: int, create: bool = True) -> Slot | None:
        s = self.slots.get(key)
        if s is None:
            if not create:
                return None
            s = self.slots[key] = Slot()
        if s.expires and s.expires <= now:
            s.expires = s.a = s.b = s.c = 0
        return s

    # SharedTable
    def get(self, key, now):
        s = self._slot(key, now, create=False)
        return 0 if s is None else s.a

    def add(self, key, delta, ttl, now):
        s = self._slot(key, now)
        s.a += delta
        if ttl > 0:
            s.expires = now + ttl
        return s.a

    # Limiter
    def gcra(self, key, rate, per, burst, cost, now):
        t = max(1, int(per / rate))
        tau = t * burst
        s = self._slot(key, now)
        tat = max(s.a, now)
        new_tat = tat + t * cost
        allow_at = new_tat - tau
        if allow_at > now:
            if s.expires == 0:
                s.expires = tat if tat > now else now + 1
            return False, max(0, _cdiv(tau - (tat - now), t)), allow_at - now, tat - now
        s.a = s.expires = new_tat
        return True, (now - allow_at) // t, 0, new_tat - now

    def sliding_window(self, key, limit, window, cost, now):
        idx = now // window
        elapsed = now - idx * window
        s = self._slot(key, now)
        if s.a != idx + 1:
            s.c = s.b if (s.a != 0 and s.a == idx) else 0
            s.b = 0
            s.a = idx + 1
        s.expires = (idx + 2) * window
        b, c = s.b, s.c
        est = float(c) * (float(window - elapsed) / float(window)) + float(b)
        allowed = est + cost <= limit
        if allowed:
            s.b = b + cost
        left = float(limit) - est - (float(cost) if allowed else 0.0)
        remaining = math.floor(left) if left > 0 else 0
        retry = 0 if allowed else int(_sliding_retry(limit, window, cost, b, c, elapsed))
        return allowed, remaining, retry, window - elapsed

    def fixed_window(self, key, limit, window_id, ttl, cost, now):
        s = self._slot(key, now)
        if s.a != window_id + 1:
            s.a, s.b = window_id + 1, 0
        s.expires = now + ttl
        allowed = s.b + cost <= limit
        if allowed:
            s.b += cost
        return allowed, max(0, limit - s.b)

    def acquire(self, key, limit, ttl, now):
        s = self._slot(key, now)
        taken = s.b < limit
        if taken:
            s.b += 1
        s.expires = now + ttl
        return taken, s.b

    def release(self, key, now):
        s = self._slot(key, now, create=False)
        if s is None:
            return 0
        s.b = max(0, s.b - 1)
        return s.b


def _cdiv(a: int, b: int) -> int:
    """C's truncating division."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _sliding_retry(limit, window, cost, b, c, elapsed) -> float:
    w = float(window)
    room = float(limit - b - cost)
    if room >= 0 and c > 0:
        e = float(math.ceil(w - room * w / float(c)))
        return e - float(elapsed) if e > float(elapsed) else 1.0
    if limit < cost:
        return 2.0 * w
    e = float(math.ceil(w - float(limit - cost) * w / float(b))) if b > 0 else 0.0
    return (w - float(elapsed)) + (e if e > 0 else 0.0)
