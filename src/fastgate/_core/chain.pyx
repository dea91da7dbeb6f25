"""The typed part of a route's policy chain (fields in chain.pxd; policies/base.py's Chain builds
it). A separate module so that policies/base.py can import it without importing the data plane,
which imports policies/base.py."""


cdef class ChainCore:
    pass
