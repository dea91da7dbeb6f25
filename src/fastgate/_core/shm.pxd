# cython: language_level=3
# The shared table's interface: its C layout, the atomics it is built on, and the cdef methods
# ratelimit.pyx calls across the extension boundary (as asyncpg's protocol cimports pgproto).
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from *:
    """
    #include <errno.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <time.h>

    static inline int fg_cas32(uint32_t *p, uint32_t expect, uint32_t val) {
        return __atomic_compare_exchange_n(p, &expect, val, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    static inline uint32_t fg_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint64_t fg_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void fg_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t fg_add64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
    static inline void fg_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    /* A spin lock whose word holds the owner's pid, so a lock left by a killed worker is taken
       over instead of wedging every other worker on that slot. */
    static inline void fg_lock(uint32_t *p, uint32_t me) {
        unsigned spins = 0;
        for (;;) {
            uint32_t cur = fg_load32(p);
            if (cur == 0) {
                if (fg_cas32(p, 0, me)) return;
                continue;
            }
            ++spins;
            if (spins < 256) { fg_pause(); continue; }
            if ((spins & 63) == 0 && kill((pid_t)cur, 0) == -1 && errno == ESRCH) {
                if (fg_cas32(p, cur, me)) return;   /* the owner is gone: its update is lost, not the slot */
                continue;
            }
            sched_yield();
        }
    }
    static inline void fg_unlock(uint32_t *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); }
    static inline int64_t fg_monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    """
    bint fg_cas32(uint32_t* p, uint32_t expect, uint32_t val) nogil
    uint32_t fg_load32(uint32_t* p) nogil
    uint64_t fg_load64(uint64_t* p) nogil
    void fg_store64(uint64_t* p, uint64_t v) nogil
    uint64_t fg_add64(uint64_t* p, uint64_t v) nogil
    void fg_lock(uint32_t* p, uint32_t me) nogil
    void fg_unlock(uint32_t* p) nogil
    int64_t fg_monotonic_ns() nogil


cdef enum:
    SHM_MAGIC = 0x46475348          # "FGSH"
    MAX_PROBE = 32                  # a key lives within this many slots of its home slot


cdef struct Header:                 # one cache line at the start of the mapping
    uint32_t magic
    uint32_t insert_lock            # serialises inserts, so a key never gets two slots
    uint64_t mask                   # capacity - 1 (capacity is a power of two)
    uint64_t used                   # slots ever claimed (an evicted slot is reused, not freed)
    uint64_t full_events            # inserts that had to evict a live key: capacity is too small
    uint64_t evictions              # inserts that reused a stale (expired) key's slot
    uint64_t _pad[3]


cdef struct Slot:                   # one cache line per key: no false sharing between hot keys
    uint32_t lock                   # owner pid, 0 = free
    uint32_t _pad0
    uint64_t hash                   # 0 = never used
    int64_t expires                 # CLOCK_MONOTONIC ns after which the values count as fresh; 0 = never
    int64_t a                       # the values: meaning depends on the algorithm (see ratelimit.pyx)
    int64_t b
    int64_t c
    int64_t _pad1[2]


cdef class SharedTable:
    cdef char* _base
    cdef size_t _size
    cdef Header* _hdr
    cdef Slot* _slots

    cdef Slot* lock_key(self, bytes key, int64_t now, bint create) except? NULL
    cdef Slot* _insert(self, uint64_t h, int64_t now) noexcept nogil


cdef uint32_t current_pid() noexcept nogil
cdef void unlock_slot(Slot* s) noexcept nogil
