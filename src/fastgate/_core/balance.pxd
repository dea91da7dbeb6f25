# cython: language_level=3
# Target health and load balancing, compiled: the data plane (proxy.pyx) picks a target, marks the
# pick and reports each outcome with C calls. proxy.Target extends Peer; server/generation.py's
# UpstreamGroup builds the balancer. tests/models/balance_model.py is the reference.
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2
    # what a consistent-hash upstream hashes on (UpstreamGroup.hash_on; -1: not hashing)
    HASH_IP = 0
    HASH_HEADER = 1
    HASH_COOKIE = 2
    HASH_CONSUMER = 3
    STATUS_MAP = 1000  # fail_statuses as a byte map over 0..999


cdef class Health:
    cdef public str address
    cdef public bint active_up
    cdef public int act_ok
    cdef public int act_fail
    cdef public int failures
    cdef public int max_failures
    cdef public double eject_for
    cdef public double ejected_until
    cdef public int breaker
    cdef public double b_window
    cdef public int b_min
    cdef public double b_ratio
    cdef public double b_open_for
    cdef public double b_start
    cdef public int b_total
    cdef public int b_failed
    cdef public double b_until
    cdef public bint b_probe
    cdef readonly frozenset fail_statuses
    cdef unsigned char fail_map[STATUS_MAP]

    cpdef bint available(self, double now)
    cpdef on_pick(self)
    cpdef report(self, bint ok, double now)
    cdef inline bint failing(self, int status) noexcept:
        return 0 <= status < STATUS_MAP and self.fail_map[status]
    cdef _open(self, double now)


cdef class Peer:
    """What a balancer needs of a target (proxy.Target adds the address and the pool)."""
    cdef public int weight
    cdef public Py_ssize_t active  # exchanges in flight (least-connections, p2c)
    cdef public Health health


cdef class Balancer:
    cdef readonly list targets  # the targets with weight > 0
    cdef Py_ssize_t n
    cdef uint64_t rng

    cpdef Peer pick(self, object key, double now, tuple exclude=*)
    cdef inline double _unit(self) noexcept


cdef class RoundRobin(Balancer):
    cdef long long* current
    cdef bint equal
    cdef Py_ssize_t i


cdef class LeastConnections(Balancer):
    pass


cdef class PowerOfTwo(Balancer):
    pass


cdef class WeightedRandom(Balancer):
    pass


cdef class ConsistentHash(Balancer):
    cdef uint32_t* points
    cdef Py_ssize_t* owners  # index into targets of each ring point
    cdef Py_ssize_t npoints
    cdef RoundRobin fallback


cdef class UpstreamCore:
    """The fields of an upstream group the data plane reads (server/generation.py's UpstreamGroup
    extends it with the active-check task)."""
    cdef public str name
    cdef public list targets
    cdef public Balancer balancer
    cdef public int hash_on  # HASH_*, or -1: not hashing
    cdef public bytes hash_key
    cdef public double connect_timeout
    cdef public double read_timeout
    cdef public double write_timeout
    cdef public double total_timeout  # 0: off
    cdef public int retries


cpdef uint32_t key_hash(bytes data) except? 0
