# cython: language_level=3
"""Rate-limit algorithms over the shared table (shm.pyx): every worker of a host, one exact count.

Each decision locks the key's slot, reads and writes its values, and unlocks: tens of
nanoseconds, no system call (CLOCK_MONOTONIC is read through the vDSO). Times are CLOCK_MONOTONIC
nanoseconds; `now_ns=0` reads the clock (tests pass their own). Every decision returns
(allowed, remaining, retry_after_ns, reset_ns):
  remaining       requests of cost 1 that could still pass right now
  retry_after_ns  0 when allowed, else how long until this request could pass
  reset_ns        how long until the limit is back to its full quota (bucket full / window over)

Slot values per algorithm (tests/models/ratelimit_model.py is the reference):
  gcra            a = TAT, the theoretical arrival time; expires = TAT (after it the bucket is full)
  sliding_window  a = window index + 1 (0 = fresh), b = this window's count, c = the previous one's
  fixed_window    a = window id + 1, b = count
  acquire/release b = requests in flight
"""
cimport cython
from libc.math cimport ceil, floor
from libc.stdint cimport int64_t

from .shm cimport SharedTable, Slot, fg_monotonic_ns, unlock_slot


def _positive(name, value):
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {value}")


@cython.final
cdef class Limiter:
    """Limiter(table): the algorithms, counting in `table`."""

    def __cinit__(self, SharedTable table not None):
        self.table = table

    def gcra(self, bytes key not None, double rate, int64_t per_ns, int64_t burst, int64_t cost=1,
             int64_t now_ns=0):
        """Token bucket as GCRA: `burst` requests at once from a full bucket, then `rate` per `per_ns`."""
        if not rate > 0 or per_ns <= 0 or burst <= 0 or cost <= 0:
            _positive("rate", rate); _positive("per_ns", per_ns); _positive("burst", burst); _positive("cost", cost)
        cdef int64_t remaining, retry_ns, reset_ns
        cdef bint allowed = self.gcra_c(key, rate, per_ns, burst, cost, now_ns or fg_monotonic_ns(),
                                        &remaining, &retry_ns, &reset_ns)
        return allowed, remaining, retry_ns, reset_ns

    cdef bint gcra_c(self, bytes key, double rate, int64_t per_ns, int64_t burst, int64_t cost, int64_t now,
                     int64_t *remaining, int64_t *retry_ns, int64_t *reset_ns):
        """`gcra` for C callers whose arguments are already checked (positive)."""
        cdef int64_t T = <int64_t>(<double>per_ns / rate)
        if T < 1:
            T = 1
        cdef int64_t tau = T * burst
        cdef Slot* s = self.table.lock_key(key, now, True)
        cdef int64_t tat = s.a if s.a > now else now
        cdef int64_t new_tat = tat + T * cost
        cdef int64_t allow_at = new_tat - tau
        cdef int64_t left
        if allow_at > now:
            if s.expires == 0:
                s.expires = tat if tat > now else now + 1
            unlock_slot(s)
            left = (tau - (tat - now)) // T
            remaining[0] = left if left > 0 else 0
            retry_ns[0] = allow_at - now
            reset_ns[0] = tat - now
            return False
        s.a = new_tat
        s.expires = new_tat
        unlock_slot(s)
        remaining[0] = (now - allow_at) // T
        retry_ns[0] = 0
        reset_ns[0] = new_tat - now
        return True

    token_bucket = gcra

    def sliding_window(self, bytes key not None, int64_t limit, int64_t window_ns, int64_t cost=1,
                       int64_t now_ns=0):
        """`limit` per `window_ns`, the previous window weighted by how much of it still overlaps."""
        if limit <= 0 or window_ns <= 0 or cost <= 0:
            _positive("limit", limit); _positive("window_ns", window_ns); _positive("cost", cost)
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef int64_t idx = now // window_ns
        cdef int64_t elapsed = now - idx * window_ns
        cdef Slot* s = self.table.lock_key(key, now, True)
        if s.a != idx + 1:
            s.c = s.b if (s.a != 0 and s.a == idx) else 0
            s.b = 0
            s.a = idx + 1
        s.expires = (idx + 2) * window_ns
        cdef int64_t b = s.b
        cdef int64_t c = s.c
        cdef double est = <double>c * (<double>(window_ns - elapsed) / <double>window_ns) + <double>b
        cdef bint allowed = est + <double>cost <= <double>limit
        if allowed:
            s.b = b + cost
        unlock_slot(s)
        cdef double left = <double>limit - est - (<double>cost if allowed else 0.0)
        cdef int64_t remaining = <int64_t>floor(left) if left > 0 else 0
        cdef double retry = 0.0
        if not allowed:
            retry = _sliding_retry(limit, window_ns, cost, b, c, elapsed)
        return allowed, remaining, <int64_t>retry, window_ns - elapsed

    def fixed_window(self, bytes key not None, int64_t limit, int64_t window_id, int64_t ttl_ns,
                     int64_t cost=1, int64_t now_ns=0):
        """`limit` per window named by `window_id` (an hour, a calendar day...): (allowed, remaining)."""
        if limit <= 0 or ttl_ns <= 0 or cost <= 0:
            _positive("limit", limit); _positive("ttl_ns", ttl_ns); _positive("cost", cost)
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef Slot* s = self.table.lock_key(key, now, True)
        if s.a != window_id + 1:
            s.a = window_id + 1
            s.b = 0
        s.expires = now + ttl_ns
        cdef bint allowed = s.b + cost <= limit
        if allowed:
            s.b += cost
        cdef int64_t remaining = limit - s.b
        unlock_slot(s)
        return allowed, remaining if remaining > 0 else 0

    def acquire(self, bytes key not None, int64_t limit, int64_t ttl_ns, int64_t now_ns=0):
        """Take one of `limit` concurrent places: (taken, in_use). A place a crashed worker never gave
        back is forgotten `ttl_ns` after the key's last use."""
        if limit <= 0 or ttl_ns <= 0:
            _positive("limit", limit); _positive("ttl_ns", ttl_ns)
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef Slot* s = self.table.lock_key(key, now, True)
        cdef bint taken = s.b < limit
        if taken:
            s.b += 1
        s.expires = now + ttl_ns
        cdef int64_t in_use = s.b
        unlock_slot(s)
        return taken, in_use

    def release(self, bytes key not None, int64_t now_ns=0) -> int:
        """Give a place back; returns the places still in use."""
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef Slot* s = self.table.lock_key(key, now, False)
        cdef int64_t in_use
        if s == NULL:
            return 0
        if s.b > 0:
            s.b -= 1
        in_use = s.b
        unlock_slot(s)
        return in_use


cdef double _sliding_retry(int64_t limit, int64_t window, int64_t cost, int64_t b, int64_t c,
                           int64_t elapsed) noexcept:
    """ns until a refused request of `cost` would pass, if nothing else is counted meanwhile."""
    cdef double w = <double>window
    cdef double room = <double>(limit - b - cost)
    cdef double e
    if room >= 0 and c > 0:
        # later in this window the previous one weighs less: c*(w-e)/w + b + cost <= limit
        e = ceil(w - room * w / <double>c)
        return e - <double>elapsed if e > <double>elapsed else 1.0
    if limit < cost:
        return 2.0 * w   # can never pass; say "after two windows" rather than forever
    # in the next window this one is the previous: b*(w-e)/w + cost <= limit
    e = ceil(w - <double>(limit - cost) * w / <double>b) if b > 0 else 0.0
    return (w - <double>elapsed) + (e if e > 0 else 0.0)


@cython.final
cdef class Lease:
    """Lease(kind, args, tail, ttl): tokens of one key a worker took from Redis in lease mode, and
    the fetch in flight (counters/redis.py keeps them and fetches; the compiled rate-limit hook,
    hooks.RedisLease, spends them reading these fields as C fields). Times are the event loop's."""

    def __init__(self, int kind, tuple args not None, bytes tail not None, double ttl):
        self.tokens = 0
        self.expires = 0.0
        self.remaining = 0  # what Redis had left after the last grant
        self.reset_at = 0.0
        self.refused_until = 0.0  # Redis said no token for `refused_cost` before this
        self.refused_cost = 0
        self.refill_after = 0.0  # a top-up failed: none before this
        self.waiters = None  # [(future, cost)] while a fetch is in flight
        self.want = 0
        self.kind = kind
        self.args = args  # the decision's arguments but cost, for the fallback
        self.tail = tail  # the packed keys and the first two script arguments
        self.ttl = ttl  # how long leased tokens may be spent
