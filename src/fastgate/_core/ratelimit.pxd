# cython: language_level=3
# The limiter's C entry points, for the compiled policy hooks (hooks.pyx) to call without a
# Python call or a result tuple.
cimport cython
from libc.stdint cimport int64_t

from .shm cimport SharedTable


@cython.final
cdef class Limiter:
    cdef SharedTable table

    cdef bint gcra_c(self, bytes key, double rate, int64_t per_ns, int64_t burst, int64_t cost, int64_t now,
                     int64_t *remaining, int64_t *retry_ns, int64_t *reset_ns)


@cython.final
cdef class Lease:
    cdef public int64_t tokens, remaining, refused_cost, want
    cdef public double expires, reset_at, refused_until, refill_after, ttl
    cdef public int kind
    cdef public object waiters
    cdef public tuple args
    cdef public bytes tail
