"""Per-route request counts of one worker: status classes and two latency histograms (the
gateway's and the upstream's) in C arrays. Recording one request is a few C operations, called
straight from the data plane (proxy.pyx cimports this); metrics.py flushes the counts into the
host's shared memory once per tick. tests/models/stats_model.py is the reference."""

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
cdef double _BUCKETS[NBUCKETS]
for _i, _b in enumerate(BUCKETS):
    _BUCKETS[_i] = _b


cdef inline int _bucket(double seconds) noexcept:
    """bisect_left(BUCKETS, seconds): the first bucket whose bound is >= seconds (NBUCKETS: +Inf).
    A NaN lands in +Inf."""
    cdef int i
    for i in range(NBUCKETS):
        if seconds <= _BUCKETS[i]:
            return i
    return NBUCKETS


cdef _flush_histogram(add, unsigned int* counts, double total, Py_ssize_t at):
    """add() a histogram's non-zero buckets at `at`, then its sum in µs and its count."""
    cdef int i
    cdef long long count = 0
    for i in range(NB):
        if counts[i]:
            count += counts[i]
            add(at + i, counts[i])
    if count:
        add(at + NB, int(total * 1e6))
        add(at + NB + 1, count)


cdef class RouteStats:
    def __init__(self, str route):
        self.name = route
        self.reset()

    cdef bint record(self, int status, double seconds, double upstream_seconds) noexcept:
        """Count one answered request; True when this made the stats dirty (the caller lists them
        for the next flush). A negative upstream_seconds: no upstream was asked."""
        self._classes[status // 100 if 100 <= status < 600 else 0] += 1
        self._lat[_bucket(seconds)] += 1
        self.lat_sum += seconds
        if upstream_seconds >= 0:
            self._ulat[_bucket(upstream_seconds)] += 1
            self.ulat_sum += upstream_seconds
        if self.dirty:
            return False
        self.dirty = True
        return True

    def observe(self, int status, double seconds, double upstream_seconds=-1.0):
        """record() for Python callers (tests); returns whether the stats just became dirty."""
        return self.record(status, seconds, upstream_seconds)

    @property
    def classes(self):
        return [self._classes[i] for i in range(6)]

    @property
    def lat(self):
        return [self._lat[i] for i in range(NB)]

    @property
    def ulat(self):
        return [self._ulat[i] for i in range(NB)]

    cpdef reset(self):
        cdef int i
        for i in range(6):
            self._classes[i] = 0
        for i in range(NB):
            self._lat[i] = 0
            self._ulat[i] = 0
        self.lat_sum = self.ulat_sum = 0.0
        self.dirty = False

    def flush(self, add, Py_ssize_t base):
        """add(index, n) each count into the route's record, which starts at `base`: 6 status
        classes, then for each histogram (gateway, upstream) NB buckets, the sum in µs and the
        count. Then start again from zero."""
        cdef int i
        for i in range(6):
            if self._classes[i]:
                add(base + i, self._classes[i])
        _flush_histogram(add, self._lat, self.lat_sum, base + 6)
        _flush_histogram(add, self._ulat, self.ulat_sum, base + 6 + NB + 2)
        self.reset()
