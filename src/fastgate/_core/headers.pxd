# what the data plane (proxy.pyx) reads from the header scans, as C fields
from libc.stdint cimport int64_t


cdef class RequestInfo:
    cdef readonly object host
    cdef readonly int64_t content_length
    cdef readonly bint chunked
    cdef readonly bint expect_continue
    cdef readonly bint expect_other
    cdef readonly object upgrade
    cdef readonly object request_id
    cdef readonly bint connection_close


cdef class ResponseHead:
    cdef readonly int status
    cdef readonly int version
    cdef readonly bytes head
    cdef readonly Py_ssize_t end
    cdef readonly int body_mode
    cdef readonly int64_t content_length
    cdef readonly bint keep_alive
    cdef readonly object te


cpdef bytes remove_headers(bytes head, object names)
cpdef RequestInfo scan_request(list headers)
cpdef object find_header(list headers, bytes name)
cpdef bytes build_request_head(bytes method, bytes target, list headers, bytes host, bytes client_ip, bytes proto,
                               bytes request_id, frozenset drop, tuple add, int body_mode, long long content_length,
                               bint upgrade)
cpdef object scan_response_head(object data, Py_ssize_t start, bint head_request, Py_ssize_t max_size)
