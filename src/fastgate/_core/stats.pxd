# per-route request counts of one worker (metrics.py flushes them into shared memory each tick)

cdef enum:
    NBUCKETS = 14  # len(BUCKETS)
    NB = 15  # histogram slots: one per bucket, then +Inf

cdef class RouteStats:
    cdef readonly str name
    # 32 bits: the counts start from zero at every flush (each tick), and 10,000 routes' stats stay small
    cdef unsigned int _classes[6]  # index = status // 100 (0: outside 100..599)
    cdef unsigned int _lat[NB]
    cdef unsigned int _ulat[NB]
    cdef public double lat_sum
    cdef public double ulat_sum
    cdef public bint dirty

    cdef bint record(self, int status, double seconds, double upstream_seconds) noexcept
    cpdef reset(self)
