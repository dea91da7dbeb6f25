# cython: language_level=3
# A route's compiled policy chain, as the data plane reads it: typed fields, so proxy.pyx reads
# them as C struct members. policies/base.py's Chain extends it and fills them.

cdef class ChainCore:
    cdef public bint active  # anything to run when a request's head is in
    cdef public tuple request  # request hooks, in phase order
    cdef public tuple request_names  # their policies' labels (the per-policy timing histogram)
    cdef public tuple body  # request-body hooks
    cdef public tuple response  # response-head hooks
    cdef public tuple response_end  # whole-response hooks, in reverse phase order
    cdef public tuple done  # after the response
    cdef public frozenset drops  # request headers never forwarded
    cdef public long long body_limit  # the smallest body limit of the body hooks' policies
    cdef public tuple policies
