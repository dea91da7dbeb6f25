# cython: language_level=3
"""Header work on the hot path, in C loops over the bytes: one call each per request.

- ``scan_request(headers)``: one pass over the client's headers → ``RequestInfo`` (Host, framing,
  Expect, Upgrade, X-Request-ID, Connection: close).
- ``build_request_head(...)``: the upstream request head in one pass through a ``Writer`` over a
  stack buffer (aiohttp's ``_http_writer``): hop-by-hop and Connection-listed headers dropped,
  X-Forwarded-*, Via, X-Request-ID and framing written by the gateway; CR, LF and other control
  bytes refused in everything written.
- ``scan_response_head(data, ...)``: a strict parse of an upstream response head → ``ResponseHead``
  (status, framing, keep-alive, and the head rewritten for the client without hop-by-hop headers).
- ``ChunkedScanner``: follows chunked framing across any split of the stream, passing bytes
  through (or decoding them for HTTP/1.0 clients).

The pure-Python oracle is ``tests/models/headers_model.py``.
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memchr, memcpy

cdef enum:
    WRITER_SMALL = 4096
    # header codes
    H_OTHER = 0
    H_HOST = 1
    H_CONTENT_LENGTH = 2
    H_TRANSFER_ENCODING = 3
    H_CONNECTION = 4
    H_KEEP_ALIVE = 5
    H_PROXY_CONNECTION = 6
    H_TE = 7
    H_TRAILER = 8
    H_UPGRADE = 9
    H_XFF = 10
    H_XFP = 11
    H_XFH = 12
    H_VIA = 13
    H_REQUEST_ID = 14
    H_EXPECT = 15
    # chunked scanner states
    C_SIZE = 0
    C_EXT = 1
    C_SIZE_LF = 2
    C_DATA = 3
    C_DATA_CR = 4
    C_DATA_LF = 5
    C_TRAILER = 6
    C_TRAILER_LINE = 7
    C_TRAILER_LF = 8
    C_END_LF = 9
    C_DONE = 10
    C_ERROR = 11
    C_TRAILER_NAME = 12

cdef bint TCHAR[256]
cdef bint HOSTCHAR[256]
cdef bint RIDCHAR[256]
cdef int HEXVAL[256]


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        TCHAR[c] = (c'0' <= c <= c'9') or (c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or c in b"!#$%&'*+-.^_`|~"
        HOSTCHAR[c] = (c'0' <= c <= c'9') or (c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or c in b"-._~!$&'()*+,;=:[]%"
        RIDCHAR[c] = (c'0' <= c <= c'9') or (c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or c in b"-_.:+/="
        HEXVAL[c] = -1
        if c'0' <= c <= c'9':
            HEXVAL[c] = c - c'0'
        elif c'a' <= c <= c'f':
            HEXVAL[c] = c - c'a' + 10
        elif c'A' <= c <= c'F':
            HEXVAL[c] = c - c'A' + 10


_init_tables()


# --- small C helpers ---------------------------------------------------------------------------
cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c | 0x20 if c'A' <= c <= c'Z' else c


cdef inline bint _ieq(const char* p, Py_ssize_t n, const char* lit, Py_ssize_t ln) noexcept nogil:
    """p[:n] equals the lowercase literal, ignoring ASCII case."""
    cdef Py_ssize_t i
    if n != ln:
        return False
    for i in range(n):
        if _lower(<unsigned char>p[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _ctl_free(const char* p, Py_ssize_t n) noexcept nogil:
    """No CR, LF, NUL or other control byte (HTAB allowed).

    Eight bytes at a time first (the "has a byte less than" word trick: a byte < 0x20, or equal to
    0x7F, sets its high bit in the mask; bytes >= 0x80 never do), then byte by byte from the first
    word that has one — which is then decided exactly (it may only be a tab)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t x, y
    cdef unsigned char c
    while i + 8 <= n:
        memcpy(&x, p + i, 8)
        y = x ^ 0x7F7F7F7F7F7F7F7FULL
        if (((x - 0x2020202020202020ULL) & ~x) | ((y - 0x0101010101010101ULL) & ~y)) & 0x8080808080808080ULL:
            break
        i += 8
    if i < n and i + 8 > n:  # the tail: the last 8 bytes (overlapping), or the short value padded
        if n >= 8:
            memcpy(&x, p + n - 8, 8)
        else:
            x = 0x4141414141414141ULL
            memcpy(&x, p, n)
        y = x ^ 0x7F7F7F7F7F7F7F7FULL
        if not ((((x - 0x2020202020202020ULL) & ~x) | ((y - 0x0101010101010101ULL) & ~y)) & 0x8080808080808080ULL):
            return True
    while i < n:
        c = <unsigned char>p[i]
        if (c < 0x20 and c != 0x09) or c == 0x7F:
            return False
        i += 1
    return True


cdef inline bint _is_token(const char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not TCHAR[<unsigned char>p[i]]:
            return False
    return True


cdef int _classify(const char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned char c0
    if n < 2:
        return H_OTHER
    c0 = _lower(<unsigned char>p[0])
    if n == 2:
        return H_TE if _ieq(p, n, b"te", 2) else H_OTHER
    if n == 3:
        return H_VIA if _ieq(p, n, b"via", 3) else H_OTHER
    if n == 4:
        return H_HOST if _ieq(p, n, b"host", 4) else H_OTHER
    if n == 6:
        return H_EXPECT if _ieq(p, n, b"expect", 6) else H_OTHER
    if n == 7:
        if c0 == c'u':
            return H_UPGRADE if _ieq(p, n, b"upgrade", 7) else H_OTHER
        return H_TRAILER if _ieq(p, n, b"trailer", 7) else H_OTHER
    if n == 10:
        if c0 == c'c':
            return H_CONNECTION if _ieq(p, n, b"connection", 10) else H_OTHER
        return H_KEEP_ALIVE if _ieq(p, n, b"keep-alive", 10) else H_OTHER
    if n == 12:
        return H_REQUEST_ID if _ieq(p, n, b"x-request-id", 12) else H_OTHER
    if n == 14:
        return H_CONTENT_LENGTH if _ieq(p, n, b"content-length", 14) else H_OTHER
    if n == 15:
        if _ieq(p, n, b"x-forwarded-for", 15):
            return H_XFF
        return H_OTHER
    if n == 16:
        if _ieq(p, n, b"x-forwarded-host", 16):
            return H_XFH
        if _ieq(p, n, b"proxy-connection", 16):
            return H_PROXY_CONNECTION
        return H_OTHER
    if n == 17:
        if _ieq(p, n, b"transfer-encoding", 17):
            return H_TRANSFER_ENCODING
        if _ieq(p, n, b"x-forwarded-proto", 17):
            return H_XFP
        return H_OTHER
    return H_OTHER


cdef inline bint _is_hop(int code) noexcept nogil:
    return code == H_CONNECTION or code == H_KEEP_ALIVE or code == H_PROXY_CONNECTION or code == H_TE \
        or code == H_TRAILER or code == H_TRANSFER_ENCODING or code == H_UPGRADE


cdef inline bint _ows(unsigned char c) noexcept nogil:
    return c == c' ' or c == c'\t'


cdef inline void _strip(const char** p, Py_ssize_t* n) noexcept nogil:
    while n[0] > 0 and _ows(<unsigned char>p[0][0]):
        p[0] += 1
        n[0] -= 1
    while n[0] > 0 and _ows(<unsigned char>p[0][n[0] - 1]):
        n[0] -= 1


cdef inline Py_ssize_t _next_token(const char* p, Py_ssize_t n, Py_ssize_t pos, const char** tok,
                                   Py_ssize_t* tn) noexcept nogil:
    """The next comma-separated element of p[:n] from pos (stripped) → returns the position after it."""
    cdef Py_ssize_t start = pos
    while pos < n and p[pos] != c',':
        pos += 1
    tok[0] = p + start
    tn[0] = pos - start
    _strip(tok, tn)
    return pos + 1


cdef inline int64_t _digits(const char* p, Py_ssize_t n) noexcept nogil:
    """Non-negative decimal of 1..18 digits, else -1."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    if n < 1 or n > 18:
        return -1
    for i in range(n):
        if not (c'0' <= p[i] <= c'9'):
            return -1
        v = v * 10 + (p[i] - c'0')
    return v


# --- Writer: a stack buffer that grows onto the heap ------------------------------------------
cdef struct Writer:
    char* buf
    Py_ssize_t size
    Py_ssize_t cap
    bint heap


cdef inline void _w_init(Writer* w, char* small) noexcept:
    w.buf = small
    w.size = 0
    w.cap = WRITER_SMALL
    w.heap = False


cdef int _w_grow(Writer* w, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    cdef char* nb
    while cap < w.size + need:
        cap *= 2
    if w.heap:
        nb = <char*>PyMem_Realloc(w.buf, cap)
    else:
        nb = <char*>PyMem_Malloc(cap)
        if nb != NULL:
            memcpy(nb, w.buf, w.size)
    if nb == NULL:
        raise MemoryError()
    w.buf = nb
    w.cap = cap
    w.heap = True
    return 0


cdef inline int _w(Writer* w, const char* p, Py_ssize_t n) except -1:
    if w.size + n > w.cap:
        _w_grow(w, n)
    memcpy(w.buf + w.size, p, n)
    w.size += n
    return 0


cdef inline int _wb(Writer* w, bytes b) except -1:
    return _w(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef inline void _w_free(Writer* w) noexcept:
    if w.heap:
        PyMem_Free(w.buf)
        w.heap = False


cdef inline int _w_line(Writer* w, const char* n, Py_ssize_t nl, const char* v, Py_ssize_t vl) except -1:
    """`name: value` and CRLF, unchecked (one room check for the whole line)."""
    cdef char* q
    if w.size + nl + vl + 4 > w.cap:
        _w_grow(w, nl + vl + 4)
    q = w.buf + w.size
    memcpy(q, n, nl)
    q[nl] = c':'
    q[nl + 1] = c' '
    memcpy(q + nl + 2, v, vl)
    q[nl + vl + 2] = c'\r'
    q[nl + vl + 3] = c'\n'
    w.size += nl + vl + 4
    return 0


cdef int _w_header(Writer* w, const char* n, Py_ssize_t nl, const char* v, Py_ssize_t vl) except -1:
    if not _is_token(n, nl):
        raise ValueError(f"invalid header name {PyBytes_FromStringAndSize(n, nl)!r}")
    if not _ctl_free(v, vl):
        raise ValueError(f"control character in header {PyBytes_FromStringAndSize(n, nl).decode('latin-1')}")
    return _w_line(w, n, nl, v, vl)


cdef int _w_checked(Writer* w, bytes b, str what) except -1:
    if not _ctl_free(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b)):
        raise ValueError(f"control character in {what}")
    return _wb(w, b)


class CheckedHeader(tuple):
    """A (name, value) pair for the upstream request whose name is a token and whose value holds
    no control byte, checked once when it is made (an identity header of a consumer, say):
    build_request_head copies it without checking it on every request. A plain tuple is checked
    there each time. (The check is CheckedHeader(name, value)'s; code in the worker that makes one
    through tuple.__new__ skips it, as it could write the head itself.)"""

    __slots__ = ()

    def __getnewargs__(self):  # copy and pickle make it again through __new__: checked again
        return (self[0], self[1])

    def __new__(cls, name, value):
        if type(name) is not bytes or type(value) is not bytes:
            raise TypeError("CheckedHeader(name, value) takes two bytes")
        if not _is_token(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)):
            raise ValueError(f"invalid header name {name!r}")
        if not _ctl_free(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)):
            raise ValueError(f"control character in header {name.decode('latin-1')}")
        return tuple.__new__(cls, (name, value))


cdef object _CHECKED = CheckedHeader


# --- requests ----------------------------------------------------------------------------------
@cython.freelist(64)
cdef class RequestInfo:
    """What scan_request found (fields declared in headers.pxd)."""


cpdef RequestInfo scan_request(list headers):
    """One pass over the client's headers (see the module docstring)."""
    if headers is None:
        raise TypeError("headers must be a list, not None")
    cdef RequestInfo info = RequestInfo.__new__(RequestInfo)
    cdef bytes name, value, upgrade = None
    cdef const char* n
    cdef const char* v
    cdef const char* tok
    cdef Py_ssize_t nl, vl, tn, pos, i
    cdef int code
    cdef int64_t val
    cdef bint conn_upgrade = False
    info.host = None
    info.content_length = -1
    info.upgrade = None
    info.request_id = None
    for item in headers:
        name, value = <tuple>item
        n = PyBytes_AS_STRING(name)
        nl = PyBytes_GET_SIZE(name)
        code = _classify(n, nl)
        if code == H_OTHER:
            continue
        v = PyBytes_AS_STRING(value)
        vl = PyBytes_GET_SIZE(value)
        if code == H_HOST:
            if info.host is not None:
                raise ValueError("duplicate Host header")
            for i in range(vl):
                if not HOSTCHAR[<unsigned char>v[i]]:
                    raise ValueError("invalid Host header")
            info.host = value
        elif code == H_CONTENT_LENGTH:
            val = _digits(v, vl)
            if val < 0:
                raise ValueError("invalid Content-Length")
            if info.content_length >= 0 and val != info.content_length:
                raise ValueError("conflicting Content-Length")
            info.content_length = val
        elif code == H_TRANSFER_ENCODING:  # all TE lines form one list: chunked iff it is the last coding
            pos = 0
            while pos <= vl:
                pos = _next_token(v, vl, pos, &tok, &tn)
                if tn:
                    info.chunked = _ieq(tok, tn, b"chunked", 7)
        elif code == H_EXPECT:
            tok, tn = v, vl
            _strip(&tok, &tn)
            if _ieq(tok, tn, b"100-continue", 12):
                info.expect_continue = True
            else:
                info.expect_other = True
        elif code == H_CONNECTION:
            pos = 0
            while pos <= vl:
                pos = _next_token(v, vl, pos, &tok, &tn)
                if _ieq(tok, tn, b"close", 5):
                    info.connection_close = True
                elif _ieq(tok, tn, b"upgrade", 7):
                    conn_upgrade = True
        elif code == H_UPGRADE:
            upgrade = value
        elif code == H_REQUEST_ID:
            if 0 < vl <= 200:
                for i in range(vl):
                    if not RIDCHAR[<unsigned char>v[i]]:
                        break
                else:
                    info.request_id = value
    if conn_upgrade and upgrade is not None:
        info.upgrade = upgrade.strip().lower()
    return info


cpdef object find_header(list headers, bytes name):
    """The first value of header `name` (given lowercase), or None."""
    if headers is None or name is None:
        raise TypeError("find_header takes a list and a bytes name, not None")
    cdef const char* lit = PyBytes_AS_STRING(name)
    cdef Py_ssize_t ln = PyBytes_GET_SIZE(name)
    cdef bytes n
    for item in headers:
        if type(item) is tuple:  # what the parser makes
            n = (<tuple>item)[0]
            if _ieq(PyBytes_AS_STRING(n), PyBytes_GET_SIZE(n), lit, ln):
                return (<tuple>item)[1]
        else:  # a pair a plugin built otherwise (a list): read as Python reads it
            n = item[0]
            if _ieq(PyBytes_AS_STRING(n), PyBytes_GET_SIZE(n), lit, ln):
                return item[1]
    return None


cdef bint _listed(const char* n, Py_ssize_t nl, list conn_tokens, frozenset drop):
    cdef bytes t
    if conn_tokens is not None:
        for t in conn_tokens:
            if _ieq(n, nl, PyBytes_AS_STRING(t), PyBytes_GET_SIZE(t)):
                return True
    if drop:
        for t in drop:
            if _ieq(n, nl, PyBytes_AS_STRING(t), PyBytes_GET_SIZE(t)):
                return True
    return False


cdef enum:
    LINES_SMALL = 32  # response header lines kept on the C stack
    DROP_SMALL = 32  # names build_request_head drops, kept on the C stack


cdef enum:
    NAME_SETS = 4  # frozensets whose C form _names_in_c remembers (a route's drop and remove sets)

cdef PyObject* _set_ids[NAME_SETS]  # which frozenset each entry is (kept alive by _set_held)
cdef const char* _set_names[NAME_SETS][DROP_SMALL]
cdef Py_ssize_t _set_lens[NAME_SETS][DROP_SMALL]
cdef int _set_counts[NAME_SETS]
cdef list _set_held = [None] * NAME_SETS
cdef int _set_next = 0


cdef int _names_in_c(object names, const char** out, Py_ssize_t* lens) except -2:
    """`names` (a set of bytes, at most DROP_SMALL) as C pointers and lengths: their count, or -1
    when it is not such a set (the caller then looks through the set itself). The last NAME_SETS
    frozensets' pointers are remembered: a frozenset cannot change, and the reference kept here
    keeps it (and so its bytes, and so the pointers) alive, so an entry can never be stale."""
    global _set_next
    cdef int count = 0, k
    cdef bint frozen = type(names) is frozenset
    if frozen:
        for k in range(NAME_SETS):
            if _set_ids[k] == <PyObject*>names:
                count = _set_counts[k]
                memcpy(out, _set_names[k], count * sizeof(const char*))
                memcpy(lens, _set_lens[k], count * sizeof(Py_ssize_t))
                return count
    elif type(names) is not set:
        return -1
    if len(names) > DROP_SMALL:
        return -1
    for t in names:
        if type(t) is not bytes:
            return -1
        out[count] = PyBytes_AS_STRING(t)
        lens[count] = PyBytes_GET_SIZE(t)
        count += 1
    if frozen:
        k = _set_next
        _set_next = (k + 1) % NAME_SETS
        _set_held[k] = names
        _set_ids[k] = <PyObject*>names
        _set_counts[k] = count
        memcpy(_set_names[k], out, count * sizeof(const char*))
        memcpy(_set_lens[k], lens, count * sizeof(Py_ssize_t))
    return count


cdef inline bint _in_names(const char* n, Py_ssize_t nl, const char** names, Py_ssize_t* lens,
                           int count) noexcept nogil:
    cdef int i
    for i in range(count):
        if lens[i] == nl and _ieq(n, nl, names[i], nl):
            return True
    return False


cdef list _connection_tokens(list headers):
    """Lowercased Connection tokens other than close/keep-alive/upgrade, or None (the usual case)."""
    cdef list out = None
    cdef bytes name, value
    cdef const char* v
    cdef const char* tok
    cdef Py_ssize_t vl, tn, pos
    for item in headers:
        name, value = <tuple>item
        if _classify(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) != H_CONNECTION:
            continue
        v = PyBytes_AS_STRING(value)
        vl = PyBytes_GET_SIZE(value)
        pos = 0
        while pos <= vl:
            pos = _next_token(v, vl, pos, &tok, &tn)
            if tn == 0 or _ieq(tok, tn, b"close", 5) or _ieq(tok, tn, b"keep-alive", 10) \
                    or _ieq(tok, tn, b"upgrade", 7):
                continue
            if out is None:
                out = []
            out.append(PyBytes_FromStringAndSize(tok, tn).lower())
    return out


cpdef bytes build_request_head(bytes method, bytes target, list headers, bytes host, bytes client_ip, bytes proto,
                       bytes request_id, frozenset drop, tuple add, int body_mode, long long content_length,
                       bint upgrade):
    """The upstream request head, in one pass (see the module docstring)."""
    cdef char small[WRITER_SMALL]
    cdef Writer w
    cdef bytes name, value, client_host = None, upgrade_value = None
    cdef const char* n
    cdef const char* v
    cdef Py_ssize_t nl, vl
    cdef tuple pair
    cdef int code
    cdef list conn_tokens = _connection_tokens(headers)
    cdef list xff = None, via = None
    cdef char num[32]
    cdef int k
    # the names to drop, as C pointers: the set is iterated once, when the first header that is
    # not the gateway's own needs the check (often none does), not once per header; past
    # DROP_SMALL names, _listed iterates the set itself
    cdef const char* drop_names[DROP_SMALL]
    cdef Py_ssize_t drop_lens[DROP_SMALL]
    cdef int ndrop = -2  # -2: not collected yet; -1: not a small set of bytes (_listed looks)
    _w_init(&w, small)
    try:
        if not _is_token(PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method)):
            raise ValueError("invalid method")
        _wb(&w, method)
        _w(&w, b" ", 1)
        if memchr(PyBytes_AS_STRING(target), c' ', PyBytes_GET_SIZE(target)) != NULL:
            raise ValueError("space in request target")
        _w_checked(&w, target, "request target")
        _w(&w, b" HTTP/1.1\r\nHost: ", 17)
        _w_checked(&w, host, "Host")
        _w(&w, b"\r\n", 2)
        for item in headers:
            name, value = <tuple>item
            n = PyBytes_AS_STRING(name)
            nl = PyBytes_GET_SIZE(name)
            code = _classify(n, nl)
            if code != H_OTHER:
                if code == H_XFF:
                    if xff is None:
                        xff = []
                    xff.append(value)
                elif code == H_VIA:
                    if via is None:
                        via = []
                    via.append(value)
                elif code == H_HOST:
                    client_host = value
                elif code == H_UPGRADE:
                    upgrade_value = value
                if code != H_EXPECT:
                    continue
            if ndrop == -2 and drop is not None:
                ndrop = _names_in_c(drop, drop_names, drop_lens)
            if ndrop >= 0:
                if _in_names(n, nl, drop_names, drop_lens, ndrop) or (
                        conn_tokens is not None and _listed(n, nl, conn_tokens, None)):
                    continue
            elif (conn_tokens is not None or drop) and _listed(n, nl, conn_tokens, drop):
                continue
            _w_header(&w, n, nl, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        _w(&w, b"X-Forwarded-For: ", 17)
        if xff is not None:
            for value in xff:
                _w_checked(&w, value, "X-Forwarded-For")
                _w(&w, b", ", 2)
        _w_checked(&w, client_ip, "client address")
        _w(&w, b"\r\nX-Forwarded-Proto: ", 21)
        _w_checked(&w, proto, "X-Forwarded-Proto")
        _w(&w, b"\r\n", 2)
        if client_host is not None:
            _w(&w, b"X-Forwarded-Host: ", 18)
            _w_checked(&w, client_host, "X-Forwarded-Host")
            _w(&w, b"\r\n", 2)
        _w(&w, b"Via: ", 5)
        if via is not None:
            for value in via:
                _w_checked(&w, value, "Via")
                _w(&w, b", ", 2)
        _w(&w, b"1.1 fastgate\r\nX-Request-ID: ", 28)
        _w_checked(&w, request_id, "X-Request-ID")
        _w(&w, b"\r\n", 2)
        if body_mode == 1:
            if content_length < 0:
                raise ValueError("negative Content-Length")
            # digits right-aligned in num[0:32], written from the last one back
            k = 0
            while True:
                num[31 - k] = <char>(c'0' + content_length % 10)
                content_length //= 10
                k += 1
                if content_length <= 0:
                    break
            _w(&w, b"Content-Length: ", 16)
            _w(&w, num + 32 - k, k)
            _w(&w, b"\r\n", 2)
        elif body_mode == 2:
            _w(&w, b"Transfer-Encoding: chunked\r\n", 28)
        if upgrade and upgrade_value is not None:
            _w(&w, b"Upgrade: ", 9)
            _w_checked(&w, upgrade_value, "Upgrade")
            _w(&w, b"\r\nConnection: upgrade\r\n", 23)
        if add:
            for item in add:
                if not isinstance(item, tuple):
                    raise TypeError(f"a header to add is not a (name, value) tuple: {item!r}")
                pair = <tuple>item  # a CheckedHeader too: read as the tuple it is
                if len(pair) != 2:
                    raise ValueError(f"a header to add is not a (name, value) pair: {item!r}")
                name, value = pair[0], pair[1]
                if name is None or value is None:
                    raise TypeError(f"a header to add is not a pair of bytes: {item!r}")
                if type(item) is _CHECKED:  # checked when it was made: copied as it is
                    _w_line(&w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), PyBytes_AS_STRING(value),
                            PyBytes_GET_SIZE(value))
                else:
                    _w_header(&w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), PyBytes_AS_STRING(value),
                              PyBytes_GET_SIZE(value))
        _w(&w, b"\r\n", 2)
        return PyBytes_FromStringAndSize(w.buf, w.size)
    finally:
        _w_free(&w)


# --- responses ---------------------------------------------------------------------------------
@cython.freelist(64)
cdef class ResponseHead:
    """A scanned upstream response head (fields declared in headers.pxd)."""


cdef struct Line:
    Py_ssize_t start      # of the name
    Py_ssize_t name_len
    Py_ssize_t end        # just past CRLF
    int code


def ascii_ieq(bytes data not None, bytes lowercase not None):
    """data == lowercase, ignoring ASCII case: the comparison header names and tokens get (tests)."""
    return _ieq(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), PyBytes_AS_STRING(lowercase),
                PyBytes_GET_SIZE(lowercase))


def valid_header_name(bytes name not None):
    return _is_token(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


def valid_header_value(bytes value not None):
    return _ctl_free(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cpdef object scan_response_head(object data, Py_ssize_t start, bint head_request, Py_ssize_t max_size):
    """A complete, strictly valid response head at data[start:] → ResponseHead; None if incomplete."""
    cdef Py_buffer buf
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        if start < 0 or start > buf.len or max_size < 0:
            raise ValueError(f"start {start} / max_size {max_size} outside a {buf.len}-byte buffer")
        return _scan_response(<const char*>buf.buf, buf.len, start, head_request, max_size)
    finally:
        PyBuffer_Release(&buf)


cdef object _scan_response(const char* p, Py_ssize_t n, Py_ssize_t start, bint head_request, Py_ssize_t max_size):
    cdef Py_ssize_t pos = start, eol, i, reason_start, reason_end, nl, vl, tn, tpos, nlines = 0, cap = LINES_SMALL
    cdef Py_ssize_t limit = n if n - start <= max_size else start + max_size
    cdef const char* v
    cdef const char* tok
    cdef const char* q
    cdef int status, version, code, j
    cdef int64_t cl = -1, val
    cdef bint te_seen = False, chunked = False, conn_close = False, conn_keep = False, cl_seen = False
    cdef Line lines_small[LINES_SMALL]
    cdef Line* lines = lines_small  # on the heap past LINES_SMALL lines
    cdef Line* ln
    cdef list conn_tokens = None
    cdef object te_value = None
    cdef ResponseHead rh
    cdef char small[WRITER_SMALL]
    cdef Writer w
    # status line
    q = <const char*>memchr(p + pos, c'\n', limit - pos)
    if q == NULL:
        if n - start > max_size:
            raise ValueError("response head too large")
        return None
    eol = q - p
    if eol == pos or p[eol - 1] != c'\r':
        raise ValueError("bare LF in status line")
    if eol - 1 - pos < 12 or not (p[pos] == c'H' and p[pos + 1] == c'T' and p[pos + 2] == c'T' and p[pos + 3] == c'P'
                                  and p[pos + 4] == c'/' and p[pos + 5] == c'1' and p[pos + 6] == c'.'):
        raise ValueError("bad status line")
    if p[pos + 7] == c'1':
        version = 11
    elif p[pos + 7] == c'0':
        version = 10
    else:
        raise ValueError("bad HTTP version")
    if p[pos + 8] != c' ':
        raise ValueError("bad status line")
    status = 0
    for i in range(pos + 9, pos + 12):
        if not (c'0' <= p[i] <= c'9'):
            raise ValueError("bad status code")
        status = status * 10 + (p[i] - c'0')
    if status < 100:
        raise ValueError("bad status code")
    reason_start = reason_end = pos + 12
    if eol - 1 > pos + 12:
        if p[pos + 12] != c' ':
            raise ValueError("bad status line")
        reason_start = pos + 13
        reason_end = eol - 1
        if not _ctl_free(p + reason_start, reason_end - reason_start):
            raise ValueError("control character in reason phrase")
    pos = eol + 1
    try:
        # header lines
        while True:
            q = <const char*>memchr(p + pos, c'\n', limit - pos) if pos < limit else NULL
            if q == NULL:
                if n - start > max_size:
                    raise ValueError("response head too large")
                return None
            eol = q - p
            if eol == pos or p[eol - 1] != c'\r':
                raise ValueError("bare LF in response head")
            if eol - 1 == pos:  # the blank line
                pos = eol + 1
                break
            if _ows(<unsigned char>p[pos]):
                raise ValueError("obs-fold in response head")
            i = pos
            while TCHAR[<unsigned char>p[i]]:  # stops at the line's CR at the latest (not a tchar)
                i += 1
            if p[i] != c':':
                if i == eol - 1:
                    raise ValueError("header line without a name or colon")
                raise ValueError("invalid header name in response")
            if i == pos:
                raise ValueError("header line without a name or colon")
            nl = i - pos
            v = p + i + 1
            vl = eol - 1 - (i + 1)
            _strip(&v, &vl)
            if not _ctl_free(v, vl):
                raise ValueError("control character in response header")
            code = _classify(p + pos, nl)
            if code == H_CONTENT_LENGTH:
                tpos = 0
                while tpos <= vl:
                    tpos = _next_token(v, vl, tpos, &tok, &tn)
                    val = _digits(tok, tn)
                    if val < 0:
                        raise ValueError("invalid Content-Length in response")
                    if cl_seen and val != cl:
                        raise ValueError("conflicting Content-Length in response")
                    cl = val
                    cl_seen = True
            elif code == H_TRANSFER_ENCODING:
                tpos = 0
                while tpos <= vl:
                    tpos = _next_token(v, vl, tpos, &tok, &tn)
                    if tn == 0:
                        continue
                    if chunked:
                        raise ValueError("chunked is not the last transfer coding")
                    te_seen = True
                    chunked = _ieq(tok, tn, b"chunked", 7)
                te_value = PyBytes_FromStringAndSize(v, vl) if te_value is None else \
                    te_value + b", " + PyBytes_FromStringAndSize(v, vl)
            elif code == H_CONNECTION:
                tpos = 0
                while tpos <= vl:
                    tpos = _next_token(v, vl, tpos, &tok, &tn)
                    if tn == 0:
                        continue
                    if _ieq(tok, tn, b"close", 5):
                        conn_close = True
                    elif _ieq(tok, tn, b"keep-alive", 10):
                        conn_keep = True
                    elif not _ieq(tok, tn, b"upgrade", 7):  # Upgrade itself is handled by its code
                        if conn_tokens is None:
                            conn_tokens = []
                        conn_tokens.append(PyBytes_FromStringAndSize(tok, tn).lower())
            if nlines == cap:
                cap = cap * 2
                if lines == lines_small:
                    ln = <Line*>PyMem_Malloc(cap * sizeof(Line))
                    if ln != NULL:
                        memcpy(ln, lines_small, nlines * sizeof(Line))
                else:
                    ln = <Line*>PyMem_Realloc(lines, cap * sizeof(Line))
                if ln == NULL:
                    raise MemoryError()
                lines = ln
            lines[nlines].start = pos
            lines[nlines].name_len = nl
            lines[nlines].end = eol + 1
            lines[nlines].code = code
            nlines += 1
            pos = eol + 1
        # the head for the client
        _w_init(&w, small)
        try:
            _w(&w, b"HTTP/1.1 ", 9)
            _w(&w, p + start + 9, 3)
            _w(&w, b" ", 1)
            _w(&w, p + reason_start, reason_end - reason_start)
            _w(&w, b"\r\n", 2)
            for j in range(nlines):
                ln = &lines[j]
                if ln.code == H_CONTENT_LENGTH or (_is_hop(ln.code) and not (ln.code == H_UPGRADE and status == 101)):
                    continue
                if conn_tokens is not None and _listed(p + ln.start, ln.name_len, conn_tokens, None):
                    continue
                _w(&w, p + ln.start, ln.end - ln.start)
            rh = ResponseHead.__new__(ResponseHead)
            rh.head = PyBytes_FromStringAndSize(w.buf, w.size)
        finally:
            _w_free(&w)
    finally:
        if lines != lines_small:
            PyMem_Free(lines)
    rh.status = status
    rh.version = version
    rh.end = pos
    rh.te = None
    rh.content_length = -1
    if head_request or status < 200 or status == 204 or status == 304:
        rh.body_mode = 0
        if not te_seen and status >= 200 and status != 204:
            rh.content_length = cl
    elif te_seen:
        if not chunked:  # gzip etc. alone: the client could not undo a coding we drop; nginx, HAProxy: 502
            raise ValueError("response transfer coding other than chunked")
        rh.body_mode = 2
        rh.te = te_value
    elif cl_seen:
        rh.body_mode = 1
        rh.content_length = cl
    else:
        rh.body_mode = 3
    rh.keep_alive = ((version == 11 and not conn_close) or (version == 10 and conn_keep and not conn_close)) \
        and rh.body_mode != 3 and not (te_seen and (cl_seen or version == 10))
    return rh


# --- chunked bodies ----------------------------------------------------------------------------
cdef class ChunkedScanner:
    """Follows chunked framing over any split of the stream (RFC 9112 §7.1)."""
    cdef int state
    cdef int64_t remaining
    cdef int digits
    cdef Py_ssize_t line
    cdef Py_ssize_t trailers
    cdef Py_ssize_t max_line
    cdef Py_ssize_t max_trailers
    cdef bint decode
    cdef list _out
    cdef bint quoted
    cdef bint escaped

    def __init__(self, bint decode=False, Py_ssize_t max_line=4096, Py_ssize_t max_trailers=16384):
        self.state = C_SIZE
        self.decode = decode
        self.max_line = max_line
        self.max_trailers = max_trailers
        self._out = [] if decode else None

    @property
    def done(self):
        return self.state == C_DONE

    def take(self):
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def feed(self, data, Py_ssize_t start=0):
        """Scan data[start:]; -1 if the body is not finished, else the offset just past its end."""
        cdef Py_buffer buf
        cdef Py_ssize_t r
        if self.state == C_DONE or self.state == C_ERROR:
            raise ValueError("chunked body already finished" if self.state == C_DONE else "chunked body is broken")
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if start < 0 or start > buf.len:
                raise ValueError(f"start {start} outside a {buf.len}-byte buffer")
            r = self._scan(<const char*>buf.buf, buf.len, start)
        finally:
            PyBuffer_Release(&buf)
        if r == -2:
            self.state = C_ERROR
            raise ValueError("bad chunked framing")
        return r

    cdef Py_ssize_t _scan(self, const char* p, Py_ssize_t n, Py_ssize_t pos) except -3:
        cdef unsigned char c
        cdef int hv
        cdef Py_ssize_t take
        while pos < n:
            c = <unsigned char>p[pos]
            if self.state == C_DATA:
                take = n - pos
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                if self.decode:
                    self._out.append(PyBytes_FromStringAndSize(p + pos, take))
                self.remaining -= take
                pos += take
                if self.remaining == 0:
                    self.state = C_DATA_CR
                continue
            pos += 1
            if self.state == C_SIZE:
                hv = HEXVAL[c]
                if hv >= 0:
                    if self.digits >= 15:
                        return -2
                    self.remaining = self.remaining * 16 + hv
                    self.digits += 1
                    self.line += 1
                elif self.digits == 0:
                    return -2
                elif c == c';' or c == c' ' or c == c'\t':
                    self.state = C_EXT
                    self.quoted = False
                    self.escaped = False
                    self.line += 1
                elif c == c'\r':
                    self.state = C_SIZE_LF
                else:
                    return -2
            elif self.state == C_EXT:
                self.line += 1
                if self.line > self.max_line:
                    return -2
                if self.escaped:  # quoted-pair: "\" ( HTAB / SP / VCHAR / obs-text )
                    self.escaped = False
                    if (c < 0x20 and c != c'\t') or c == 0x7F:
                        return -2
                elif c == c'"':
                    self.quoted = not self.quoted
                elif c == c'\\' and self.quoted:
                    self.escaped = True
                elif c == c'\r' and not self.quoted:
                    self.state = C_SIZE_LF
                elif (c < 0x20 and c != c'\t') or c == 0x7F:
                    return -2
            elif self.state == C_SIZE_LF:
                if c != c'\n':
                    return -2
                self.line = 0
                self.digits = 0
                if self.remaining == 0:
                    self.state = C_TRAILER
                else:
                    self.state = C_DATA
            elif self.state == C_DATA_CR:
                if c != c'\r':
                    return -2
                self.state = C_DATA_LF
            elif self.state == C_DATA_LF:
                if c != c'\n':
                    return -2
                self.state = C_SIZE
            elif self.state == C_TRAILER:  # the start of a trailer line, or the final CRLF
                self.trailers += 1
                if c == c'\r':
                    self.state = C_END_LF
                elif TCHAR[c]:
                    self.state = C_TRAILER_NAME
                else:
                    return -2  # obs-fold or garbage
            elif self.state == C_TRAILER_NAME:  # field-name ":", no whitespace before the colon
                self.trailers += 1
                if self.trailers > self.max_trailers:
                    return -2
                if c == c':':
                    self.state = C_TRAILER_LINE
                elif not TCHAR[c]:
                    return -2
            elif self.state == C_TRAILER_LINE:
                self.trailers += 1
                if self.trailers > self.max_trailers:
                    return -2
                if c == c'\r':
                    self.state = C_TRAILER_LF
                elif (c < 0x20 and c != c'\t') or c == 0x7F:
                    return -2
            elif self.state == C_TRAILER_LF:
                if c != c'\n':
                    return -2
                self.state = C_TRAILER
            elif self.state == C_END_LF:
                if c != c'\n':
                    return -2
                self.state = C_DONE
                return pos
        return -1


cpdef bytes remove_headers(bytes head, object names):
    """`head` (a status line and header lines, each ending CRLF) without the lines whose name —
    lowercased, OWS stripped; a line without a colon is all name — is in `names` (lowercase bytes).
    `head` itself when no line goes: the common case copies nothing."""
    cdef const char* s = PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef Py_ssize_t i, e, j, a, b, k, kept = 0
    cdef const char* hit
    cdef list out = None
    cdef bytes name
    cdef char* w
    cdef bint drop_line
    cdef const char* names_c[DROP_SMALL]
    cdef Py_ssize_t lens_c[DROP_SMALL]
    cdef int nnames
    hit = <const char*>memchr(s, 10, n)
    if hit == NULL or not names:
        return head
    nnames = _names_in_c(names, names_c, lens_c)  # compared without a lowercase copy of each line's name
    i = hit - s + 1  # the first header line
    while i < n:
        hit = <const char*>memchr(s + i, 10, n - i)
        e = (hit - s) if hit != NULL else n  # this line's LF, or the end
        j = e - 1 if e > i and s[e - 1] == 13 else e  # its content ends before CR
        hit = <const char*>memchr(s + i, 58, j - i)
        a = i
        b = (hit - s) if hit != NULL else j
        while a < b and _ows(<unsigned char>s[a]):
            a += 1
        while b > a and _ows(<unsigned char>s[b - 1]):
            b -= 1
        if nnames >= 0:
            drop_line = _in_names(s + a, b - a, names_c, lens_c, nnames)
        else:
            name = PyBytes_FromStringAndSize(NULL, b - a)
            w = PyBytes_AS_STRING(name)
            for k in range(b - a):
                w[k] = <char>_lower(<unsigned char>s[a + k])
            drop_line = name in names
        if drop_line:
            if out is None:
                out = []
            out.append(head[kept:i])
            kept = e + 1 if e < n else n
        i = e + 1
    if out is None:
        return head
    out.append(head[kept:])
    return b"".join(out)
