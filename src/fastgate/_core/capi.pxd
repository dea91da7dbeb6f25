# cython: language_level=3
# CPython C-API calls the compiled modules use that Cython's own cpython/*.pxd do not declare.
from cpython.ref cimport PyObject


cdef extern from "Python.h":
    # PyDict_GetItem without its saving and restoring of the error state (NULL: not there)
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
