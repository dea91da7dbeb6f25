# cython: language_level=3
"""Fixed-size hash table in one anonymous shared mapping, made before the workers fork.

Every worker of a host (and every later generation of workers, which fork from the same
supervisor) sees the same slots, so a count kept here is exact across processes and survives a
reload. Layout: a 64-byte Header, then `capacity` 64-byte Slots (a power of two).

Keys are bytes, placed by their Python hash — SipHash keyed by a secret that forked processes
share, so slots agree between workers and a client cannot aim its keys at another's slot. Each
slot has a pid spin lock; ratelimit.pyx does its read-modify-write inside it. Inserts also take
one table-wide lock, so two workers inserting one new key at once cannot give it two slots.

A slot is never emptied (that would break probe chains); a key whose `expires` has passed counts
as fresh and its slot is the first choice when another key needs room ("stale"). When a key's
MAX_PROBE-slot window holds no empty or stale slot, the live key that expires soonest is evicted
and `full_events` counts it: raise `counters.capacity`.
"""
cimport cython
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.object cimport PyObject_Hash
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport getpid

import os

cdef uint32_t _pid = <uint32_t>getpid()


def _after_fork():
    global _pid
    _pid = <uint32_t>getpid()


os.register_at_fork(after_in_child=_after_fork)


cdef uint32_t current_pid() noexcept nogil:
    return _pid


cdef void unlock_slot(Slot* s) noexcept nogil:
    fg_unlock(&s.lock)


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock every worker of a host shares."""
    return fg_monotonic_ns()


cdef inline uint64_t _hash(bytes key) except? 0:
    cdef uint64_t h = <uint64_t>PyObject_Hash(key)
    return h if h != 0 else 1


@cython.final
cdef class SharedTable:
    """SharedTable(capacity): at least `capacity` slots (rounded up to a power of two)."""

    def __cinit__(self, Py_ssize_t capacity):
        cdef uint64_t cap = 64
        if capacity < 1 or capacity > (1 << 26):
            raise ValueError(f"capacity must be between 1 and {1 << 26}, not {capacity}")
        while cap < <uint64_t>capacity:
            cap <<= 1
        self._size = sizeof(Header) + cap * sizeof(Slot)
        cdef void* p = mmap(NULL, self._size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            self._base = NULL
            raise MemoryError(f"cannot map {self._size} bytes of shared memory for {cap} counter slots")
        self._base = <char*>p
        self._hdr = <Header*>p
        self._slots = <Slot*>(self._base + sizeof(Header))
        self._hdr.magic = SHM_MAGIC
        self._hdr.mask = cap - 1

    def __dealloc__(self):
        if self._base != NULL:
            munmap(self._base, self._size)
            self._base = NULL

    @property
    def capacity(self) -> int:
        return self._hdr.mask + 1

    @property
    def used(self) -> int:
        """Slots ever claimed by a key (stale ones included)."""
        return self._hdr.used

    @property
    def full_events(self) -> int:
        """Inserts that found no free or stale slot and evicted a live key."""
        return self._hdr.full_events

    @property
    def evictions(self) -> int:
        """Inserts that reused the slot of an expired key."""
        return self._hdr.evictions

    @property
    def nbytes(self) -> int:
        return self._size

    cdef Slot* lock_key(self, bytes key, int64_t now, bint create) except? NULL:
        """The key's slot, locked (the caller unlocks it), values zeroed when expired.

        NULL when the key has no slot and `create` is false.
        """
        cdef uint64_t h = _hash(key)
        cdef uint64_t mask = self._hdr.mask
        cdef uint64_t i, sh
        cdef int p
        cdef Slot* s
        cdef uint32_t me = _pid
        # the GIL is kept: this takes tens of nanoseconds, and releasing it costs more (and a
        # thread of this process cannot come between the lock and the unlock)
        while True:
            i = h & mask
            s = NULL
            for p in range(MAX_PROBE):
                s = &self._slots[(i + p) & mask]
                sh = fg_load64(&s.hash)
                if sh == h:
                    break
                s = NULL
                if sh == 0:
                    break
            if s == NULL:
                if not create:
                    return NULL
                return self._insert(h, now)
            fg_lock(&s.lock, me)
            if s.hash == h:   # still ours: it was not evicted between the probe and the lock
                if s.expires != 0 and s.expires <= now:
                    s.a = s.b = s.c = 0
                    s.expires = 0
                return s
            fg_unlock(&s.lock)

    cdef Slot* _insert(self, uint64_t h, int64_t now) noexcept nogil:
        cdef uint64_t mask = self._hdr.mask
        cdef uint64_t i = h & mask
        cdef uint64_t sh
        cdef int p
        cdef Slot* s
        cdef Slot* empty = NULL
        cdef Slot* stale = NULL
        cdef Slot* soonest = NULL
        cdef uint32_t me = _pid
        fg_lock(&self._hdr.insert_lock, me)
        for p in range(MAX_PROBE):
            s = &self._slots[(i + p) & mask]
            sh = fg_load64(&s.hash)
            if sh == h:   # another worker inserted it first
                fg_unlock(&self._hdr.insert_lock)
                fg_lock(&s.lock, me)
                if s.hash == h:
                    if s.expires != 0 and s.expires <= now:
                        s.a = s.b = s.c = 0
                        s.expires = 0
                    return s
                fg_unlock(&s.lock)
                return self._insert(h, now)
            if sh == 0:
                empty = s
                break
            if stale == NULL and s.expires != 0 and s.expires <= now:
                stale = s
            if s.expires != 0 and (soonest == NULL or s.expires < soonest.expires):
                soonest = s
        if stale != NULL:
            s = stale
            fg_add64(&self._hdr.evictions, 1)
        elif empty != NULL:
            s = empty
            fg_add64(&self._hdr.used, 1)
        else:
            # every slot in the window holds a live key: evict the one expiring soonest (or, if
            # none expires, the home slot) and say the table is too small
            s = soonest if soonest != NULL else &self._slots[i]
            fg_add64(&self._hdr.full_events, 1)
        fg_lock(&s.lock, me)
        s.a = s.b = s.c = 0
        s.expires = 0
        fg_store64(&s.hash, h)
        fg_unlock(&self._hdr.insert_lock)
        return s

    # --- Python API: plain counters (quotas, tests, the admin view) ---------------------------------
    def get(self, bytes key not None, int64_t now_ns=0) -> int:
        """The key's value (0 when absent or expired)."""
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef Slot* s = self.lock_key(key, now, False)
        cdef int64_t v
        if s == NULL:
            return 0
        v = s.a
        fg_unlock(&s.lock)
        return v

    def add(self, bytes key not None, int64_t delta, int64_t ttl_ns=0, int64_t now_ns=0) -> int:
        """Add `delta` to the key's value and return the new value; `ttl_ns` > 0 (re)sets its expiry."""
        cdef int64_t now = now_ns or fg_monotonic_ns()
        cdef Slot* s = self.lock_key(key, now, True)
        cdef int64_t v
        s.a += delta
        v = s.a
        if ttl_ns > 0:
            s.expires = now + ttl_ns
        fg_unlock(&s.lock)
        return v

    def clear(self) -> None:
        """Forget every key (not safe while workers count: for tests and a full reset)."""
        cdef uint64_t mask = self._hdr.mask
        memset(self._slots, 0, (mask + 1) * sizeof(Slot))
        self._hdr.used = 0
        self._hdr.full_events = 0
        self._hdr.evictions = 0

    def _hold(self, bytes key not None) -> None:
        """Lock the key's slot and never unlock it (tests: a worker killed inside a critical section)."""
        self.lock_key(key, fg_monotonic_ns(), True)


@cython.final
cdef class SharedArray:
    """SharedArray(n): n int64 counters in one anonymous shared mapping, added to atomically.

    Dense where SharedTable hashes: for series whose index every process agrees on (the
    supervisor hands out route numbers before forking), at 8 bytes a counter."""

    cdef int64_t* _data
    cdef Py_ssize_t _n
    cdef size_t _size

    def __cinit__(self, Py_ssize_t n):
        if n < 1 or n > (1 << 28):
            raise ValueError(f"size must be between 1 and {1 << 28}, not {n}")
        self._n = n
        self._size = <size_t>n * sizeof(int64_t)
        cdef void* p = mmap(NULL, self._size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            self._data = NULL
            raise MemoryError(f"cannot map {self._size} bytes of shared memory")
        self._data = <int64_t*>p

    def __dealloc__(self):
        if self._data != NULL:
            munmap(self._data, self._size)
            self._data = NULL

    def __len__(self) -> int:
        return self._n

    def add(self, Py_ssize_t i, int64_t delta) -> None:
        if i < 0 or i >= self._n:
            raise IndexError(f"counter {i} outside 0..{self._n - 1}")
        fg_add64(<uint64_t*>&self._data[i], <uint64_t>delta)

    def get(self, Py_ssize_t i) -> int:
        if i < 0 or i >= self._n:
            raise IndexError(f"counter {i} outside 0..{self._n - 1}")
        return <int64_t>fg_load64(<uint64_t*>&self._data[i])
