"""Target health and load balancers, compiled (fields and signatures in balance.pxd).

Health — passive ejection, circuit breaker, active-check state. Passive (nginx's
max_fails/fail_timeout): `max_failures` consecutive failures eject a target for `eject_for` seconds.
Circuit breaker: over a rolling `window`, once `min_requests` were seen and the failure ratio
reaches `failure_ratio`, the breaker opens for `open_for` seconds, then lets one probe request
through (half-open); its result closes or re-opens the breaker. Active checks (server/health.py
runs them) move `active_up` after `unhealthy_threshold` failures or `healthy_threshold` successes
in a row.

Balancers — `pick(key, now, exclude=())` returns a target or None, considering only targets whose
health is `available` and that are not in `exclude` (the ones that failed this request). Weights are
honoured by every balancer: smooth weighted round-robin (nginx's), least connections by
active/weight, power of two random choices by active/weight, weighted random, and a
consistent-hash ring (160 points per weight-100 target) that walks clockwise past unavailable
targets. They were Python (server/balancer.py, server/health.py) until callgrind showed a proxied
request spending ~3,000 instructions in their frames and attribute lookups;
tests/models/balance_model.py keeps that code as the reference the property tests hold these to.
"""
import logging
import os
import zlib

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memset

log = logging.getLogger("fastgate.health")

_crc32 = zlib.crc32


cpdef uint32_t key_hash(bytes data) except? 0:
    """A 32-bit hash of a key: CRC-32 then MurmurHash3's finalizer. CRC-32 alone is linear, so keys
    that differ in a few characters (user1, user2, ...) land close together: 16 such names all fell
    on one of two ring targets in about 6% of random rings; with the finalizer, as rarely as chance
    allows (2 in 65,536)."""
    cdef uint32_t h = <uint32_t>_crc32(data)
    h ^= h >> 16
    h *= 0x85EBCA6BU
    h ^= h >> 13
    h *= 0xC2B2AE35U
    return h ^ (h >> 16)


cdef class Health:
    def __init__(self, str address, passive=None, breaker=None):
        self.address = address
        self.active_up = True
        self.act_ok = self.act_fail = 0
        self.failures = 0
        self.max_failures = passive.max_failures if passive is not None else 0
        self.eject_for = passive.eject_for if passive is not None else 0.0
        # responses that count as failures (passive checks and the breaker); default: any 5xx
        self.fail_statuses = frozenset(passive.failure_statuses if passive is not None else range(500, 600))
        memset(self.fail_map, 0, STATUS_MAP)
        for s in self.fail_statuses:
            if 0 <= s < STATUS_MAP:
                self.fail_map[s] = 1
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

    cpdef bint available(self, double now):
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

    cpdef on_pick(self):
        if self.breaker == HALF_OPEN:
            self.b_probe = True

    cpdef report(self, bint ok, double now):
        if ok:
            self.failures = 0
        else:
            self.failures += 1
            if self.max_failures and self.failures >= self.max_failures:
                self.ejected_until = now + self.eject_for
                self.failures = 0
                log.warning("target %s ejected for %.1fs after consecutive failures", self.address, self.eject_for)
        if not self.b_window:
            return
        if self.breaker == HALF_OPEN:
            self.b_probe = False
            if ok:
                self.breaker = CLOSED
                self.b_start, self.b_total, self.b_failed = now, 0, 0
                log.warning("circuit for %s closed", self.address)
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

    cdef _open(self, double now):
        self.breaker = OPEN
        self.b_until = now + self.b_open_for
        log.warning("circuit for %s open for %.1fs", self.address, self.b_open_for)

    def active_result(self, bint ok, int healthy_threshold, int unhealthy_threshold):
        if ok:
            self.act_fail = 0
            self.act_ok += 1
            if not self.active_up and self.act_ok >= healthy_threshold:
                self.active_up = True
                log.warning("target %s healthy again (active check)", self.address)
        else:
            self.act_ok = 0
            self.act_fail += 1
            if self.active_up and self.act_fail >= unhealthy_threshold:
                self.active_up = False
                log.warning("target %s unhealthy (active check)", self.address)

    def failing_status(self, int status):
        """True when a response with this status counts as a failure."""
        return self.failing(status)

    def snapshot(self, double now):
        return {"address": self.address, "available": self.available(now), "active_up": self.active_up,
                "ejected": now < self.ejected_until, "circuit": ("closed", "open", "half_open")[self.breaker]}


cdef class Peer:
    pass


cdef inline bint _excluded(tuple exclude, Peer t) noexcept:
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE(exclude)):
        if <object>PyTuple_GET_ITEM(exclude, i) is t:
            return True
    return False


cdef inline bint _up(Peer t, double now, tuple exclude):
    """available first (it may move an open breaker to half-open), then not excluded."""
    return t.health.available(now) and not _excluded(exclude, t)


cdef inline double _load(Peer t) noexcept:
    return (t.active + 1) / <double>t.weight


cdef class Balancer:
    def __init__(self, targets):
        self.targets = [t for t in targets if (<Peer?>t).weight > 0]
        self.n = len(self.targets)
        self.rng = 0
        while self.rng == 0:
            self.rng = int.from_bytes(os.urandom(8), "little")

    def seed(self, uint64_t seed):
        """Make the random balancers' choices repeatable (tests)."""
        self.rng = seed or 1

    cdef inline double _unit(self) noexcept:
        """A uniform double in [0, 1): xorshift64*, top 53 bits."""
        cdef uint64_t x = self.rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.rng = x
        return ((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0)

    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        raise NotImplementedError


cdef class RoundRobin(Balancer):
    def __init__(self, targets):
        Balancer.__init__(self, targets)
        self.current = <long long*>PyMem_Malloc(max(1, self.n) * sizeof(long long))
        if self.current == NULL:
            raise MemoryError()
        memset(self.current, 0, max(1, self.n) * sizeof(long long))
        self.equal = len({(<Peer>t).weight for t in self.targets}) <= 1
        self.i = -1

    def __dealloc__(self):
        PyMem_Free(self.current)

    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        cdef Py_ssize_t n = self.n, i, best = -1, k
        cdef long long total = 0
        cdef Peer t
        cdef list ts = self.targets
        if n == 0:
            return None
        if n == 1:
            t = <Peer>ts[0]
            return t if t.health.available(now) and not exclude else None
        if self.equal:
            for k in range(n):
                self.i = i = (self.i + 1) % n
                t = <Peer>ts[i]
                if _up(t, now, exclude):
                    return t
            return None
        cdef long long* cur = self.current
        for i in range(n):
            t = <Peer>ts[i]
            if not _up(t, now, exclude):
                continue
            cur[i] += t.weight
            total += t.weight
            if best < 0 or cur[i] > cur[best]:
                best = i
        if best < 0:
            return None
        cur[best] -= total
        return <Peer>ts[best]


cdef class LeastConnections(Balancer):
    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        cdef Peer t, best = None
        cdef double load, best_load = 0.0
        for t in self.targets:
            if not _up(t, now, exclude):
                continue
            load = _load(t)
            if best is None or load < best_load:
                best, best_load = t, load
        return best


cdef list _candidates(Balancer b, double now, tuple exclude):
    cdef Peer t
    return [t for t in b.targets if _up(t, now, exclude)]


cdef class PowerOfTwo(Balancer):
    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        cdef list up = _candidates(self, now, exclude)
        cdef Py_ssize_t m = len(up), i, j
        if m <= 1:
            return <Peer>up[0] if m else None
        i = <Py_ssize_t>(self._unit() * m)
        j = <Py_ssize_t>(self._unit() * (m - 1))
        if j >= i:
            j += 1  # two distinct targets
        cdef Peer a = <Peer>up[i], b = <Peer>up[j]
        return a if _load(a) <= _load(b) else b


cdef class WeightedRandom(Balancer):
    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        cdef list up = _candidates(self, now, exclude)
        cdef Peer t
        cdef long long total = 0
        cdef double r
        if not up:
            return None
        for t in up:
            total += t.weight
        r = self._unit() * total
        for t in up:
            r -= t.weight
            if r < 0:
                return t
        return <Peer>up[len(up) - 1]  # rounding at the very top


cdef class ConsistentHash(Balancer):
    """Ring with 160 points per weight-100 target; `key` (bytes) picks a point clockwise."""
    POINTS = 160

    def __init__(self, targets):
        Balancer.__init__(self, targets)
        ring = []
        for idx, t in enumerate(self.targets):
            n = max(1, self.POINTS * (<Peer>t).weight // 100)
            for i in range(n):
                ring.append((key_hash(f"{t.address}#{i}".encode()), t.address, idx))
        ring.sort(key=lambda p: (p[0], p[1]))
        self.npoints = len(ring)
        self.points = <uint32_t*>PyMem_Malloc(max(1, self.npoints) * sizeof(uint32_t))
        self.owners = <Py_ssize_t*>PyMem_Malloc(max(1, self.npoints) * sizeof(Py_ssize_t))
        if self.points == NULL or self.owners == NULL:
            raise MemoryError()
        for i, p in enumerate(ring):
            self.points[i] = p[0]
            self.owners[i] = p[2]
        self.fallback = RoundRobin(targets)

    def __dealloc__(self):
        PyMem_Free(self.points)
        PyMem_Free(self.owners)

    cpdef Peer pick(self, object key, double now, tuple exclude=()):
        if not key:
            return self.fallback.pick(key, now, exclude)
        cdef Py_ssize_t n = self.npoints, lo = 0, hi = n, mid, k, owner, seen_count = 0
        cdef uint32_t h = key_hash(key)
        cdef Peer t
        if n == 0:
            return None
        while lo < hi:  # bisect_left
            mid = (lo + hi) >> 1
            if self.points[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        cdef Py_ssize_t start = lo % n
        cdef unsigned char small[64]
        cdef unsigned char* seen = small
        if self.n > 64:
            seen = <unsigned char*>PyMem_Malloc(self.n)
            if seen == NULL:
                raise MemoryError()
        memset(seen, 0, min(self.n, 64) if seen == small else self.n)
        try:
            for k in range(n):
                owner = self.owners[(start + k) % n]
                if seen[owner]:
                    continue
                t = <Peer>self.targets[owner]
                if _up(t, now, exclude):
                    return t
                seen[owner] = 1
                seen_count += 1
                if seen_count == self.n:
                    break
            return None
        finally:
            if seen != small:
                PyMem_Free(seen)


cdef class UpstreamCore:
    pass


# UpstreamGroup.hash_on for each config value of `hash_on`
HASH_ON = {"ip": HASH_IP, "header": HASH_HEADER, "cookie": HASH_COOKIE, "consumer": HASH_CONSUMER}

BALANCERS = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "p2c": PowerOfTwo,
    "random": WeightedRandom,
    "consistent_hash": ConsistentHash,
}
