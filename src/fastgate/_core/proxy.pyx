# cython: freethreading_compatible = False
"""The data plane, compiled: one GatewayProtocol per client connection, one UpstreamProtocol per
upstream connection, an Exchange per request (the fields are typed in proxy.pxd).

httptools (llhttp, strict mode) is the judge of request framing. Per request:
parse → normalise path → route match (compiled) → build the upstream head (compiled) → pick a
target → write head and body to a pooled keep-alive connection → the upstream protocol writes
the response back. Requests are answered strictly in order; a request parsed while another is
in flight waits in `_pipeline` (reading is paused meanwhile). Errors the gateway produces itself
(400, 404, 413, 502, ...) are "local" exchanges queued in the same order, so pipelining never
reorders responses. Timeouts are checked by the worker's tick (`check`), not by a timer per
request.

Upstream side: an `UpstreamProtocol` serves one exchange at a time. It scans the response head
with the compiled `scan_response_head` (strict: a malformed head is a 502 and the connection is
closed, never pooled), writes the rewritten head to the client and then passes the body through
untouched, counting Content-Length or following chunked framing with the compiled
`ChunkedScanner`. A connection goes back to its pool only when the response ended exactly where
its framing said, the request was fully sent, and both sides allow keep-alive.

This was server/protocol.py and server/upstream.py, interpreted, until the CPU per request
(bench/RESULTS.md) showed the interpreter's attribute lookups as the largest cost left.
"""
import asyncio
import collections
import logging
import re
import socket
import os
from random import random
from time import time, time_ns

import httptools

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.ref cimport PyObject
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport floor, isinf, isnan
from libc.stdint cimport uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcpy, strlen
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        pass
    tm* gmtime_r(const time_t* timep, tm* result)
    size_t strftime(char* s, size_t max, const char* fmt, const tm* t)

from .headers import ChunkedScanner
from .balance cimport HASH_CONSUMER, HASH_COOKIE, HASH_HEADER
from .headers cimport build_request_head, find_header, scan_request, scan_response_head
from .router cimport normalize_path
from ..errors import (GatewayError, NoHealthyUpstream, UpstreamConnectError, UpstreamProtocolError,
                      UpstreamResetError, UpstreamTimeout)
from ..accesslog import BATCH as ALOG_BATCH

cdef Py_ssize_t ALOG_BATCH_N = ALOG_BATCH

from .capi cimport PyDict_GetItemWithError
from ..policies.base import IDENTITY_HEADERS
from ..server.responses import CLOSE, CONTINUE, KEEP_ALIVE, build_error


# --- reading the request's HTTP version straight from httptools' llhttp state --------------------
# HttpParser.get_http_version() formats a str with str.format: about 5% of a proxied request's
# instructions (callgrind). httptools keeps its llhttp_t* as the first field after the vtable; we
# read http_major/http_minor and the method code there (a code's name comes from get_method() the first
# time the code is seen, then from _METHOD_NAMES), only after _llhttp_probe() proved at
# import, on this very httptools build, that the pointer is where we think (llhttp_t.data points
# back at the parser object) and that the fields read back what a parser fed known requests set.
# Any mismatch (another httptools layout) and the data plane keeps calling get_http_version().
cdef extern from *:
    """
    #include <stdint.h>
    typedef struct {
        int32_t _index; void* _span_pos0; void* _span_cb0; int32_t error; const char* reason;
        const char* error_pos; void* data; void* _current; uint64_t content_length;
        uint8_t type; uint8_t method; uint8_t http_major; uint8_t http_minor;
        uint8_t header_state; uint16_t lenient_flags; uint8_t upgrade; uint8_t finish; uint16_t flags;
    } fg_llhttp_head;
    typedef struct { PyObject_HEAD void* vtab; fg_llhttp_head* cparser; } fg_httptools_parser;
    """
    ctypedef struct fg_llhttp_head:
        void* data
        unsigned char method
        unsigned char http_major
        unsigned char http_minor
        unsigned short flags  # F_CONNECTION_KEEP_ALIVE 1, F_CONNECTION_CLOSE 2 (llhttp 9's layout)
    ctypedef struct fg_httptools_parser:
        fg_llhttp_head* cparser


cdef inline fg_llhttp_head* _llhttp(object parser) noexcept:
    return (<fg_httptools_parser*><void*>parser).cparser


class _Probe:
    def on_url(self, url):
        pass


class _KeepAliveProbe:
    """Records, at each head's end, what the flags say and what should_keep_alive() says."""

    def __init__(self):
        self.parser = None
        self.seen = []

    def on_headers_complete(self):
        self.seen.append((_keep_alive_flags(_llhttp(self.parser)), self.parser.should_keep_alive()))


cdef bint _llhttp_probe():
    cdef fg_llhttp_head* h
    try:
        for req, version in ((b"GET / HTTP/1.0\r\n\r\n", "1.0"), (b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n", "1.1")):
            p = httptools.HttpRequestParser(_Probe())
            if type(p) is not httptools.HttpRequestParser:
                return False
            h = _llhttp(p)
            if h == NULL or h.data != <void*>p:
                return False
            p.feed_data(req)
            if p.get_http_version() != version or "%d.%d" % (h.http_major, h.http_minor) != version:
                return False
            if h.method != (1 if p.get_method() == b"GET" else 3 if p.get_method() == b"POST" else 255):
                return False  # llhttp's codes: HTTP_GET 1, HTTP_POST 3
    except Exception:
        return False
    return True


cdef bint LLHTTP_DIRECT = _llhttp_probe()


cdef inline bint _keep_alive_flags(fg_llhttp_head* h) noexcept:
    """llhttp_should_keep_alive() for a request head, from its flags: HTTP/1.1 unless Connection
    says close, HTTP/1.0 only if it says keep-alive (a request never needs EOF)."""
    if h.http_major > 0 and h.http_minor > 0:
        return not (h.flags & 2)
    return (h.flags & 1) != 0


cdef bint _keep_alive_probe():
    """The flags are where llhttp 9 keeps them on this httptools build: every answer of
    should_keep_alive() over heads that set neither, one or both Connection flags is theirs."""
    # one parser per connection; the first one's second head checks the flags reset between heads
    conns = (((b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True), (b"GET / HTTP/1.0\r\n\r\n", False)),
             ((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True), (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False)),
             ((b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n", False),),
             ((b"GET / HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n", True),),
             ((b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n", False),))
    if not LLHTTP_DIRECT:
        return False
    try:
        for conn in conns:
            probe = _KeepAliveProbe()
            probe.parser = httptools.HttpRequestParser(probe)
            for req, _ in conn:
                probe.parser.feed_data(req)
            if probe.seen != [(want, want) for _, want in conn]:
                return False
        return True
    except Exception:
        return False


cdef bint KEEPALIVE_DIRECT = _keep_alive_probe()
cdef list _METHOD_NAMES = [None] * 256  # llhttp method code -> get_method()'s bytes, as seen


cdef inline bytes _method(object parser):
    cdef unsigned char code
    cdef object name
    if not LLHTTP_DIRECT:
        return parser.get_method()
    code = _llhttp(parser).method
    name = _METHOD_NAMES[code]
    if name is None:
        name = parser.get_method()
        _METHOD_NAMES[code] = name
    return name


def llhttp_direct():
    """True when requests' HTTP versions and methods are read from llhttp's state (the probe above
    passed)."""
    return LLHTTP_DIRECT


def keep_alive_direct():
    """True when a request's keep-alive is read from llhttp's flags (_keep_alive_probe passed)."""
    return KEEPALIVE_DIRECT



IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))  # retried on failure

MAX_RESPONSE_HEAD = 65536
cdef enum:
    HEAD_NONE = 0
    HEAD_LENGTH = 1
    HEAD_CHUNKED = 2
    HEAD_CLOSE = 3
    # parser phases (for timeouts)
    IDLE = 0
    HEAD = 1
    BODY = 2
    WAIT = 3
    # reasons reading from the client is paused (bitmask)
    P_PIPELINE = 1
    P_UPSTREAM = 2
    P_BUFFER = 4
    P_DEAD = 8
    SAMPLE_MASK = 63  # one request in 64 has its policy hooks timed for fastgate_policy_duration_seconds
    REPLAY_LIMIT = 65536  # request bodies up to this size are kept for a retry
    BUFFER_HIGH = 262144  # body bytes buffered before an upstream is ready: pause reading past this

cdef double LINGER = 5.0  # seconds a lingering close keeps reading a client's unwanted body
cdef double DRAIN_GRACE = 1.0  # seconds an idle keep-alive connection may still send one last request
UNMATCHED = "(unmatched)"  # the route label of requests no route took (404, 400 before routing)
TERMINAL_CHUNK = b"0\r\n\r\n"

log = logging.getLogger("fastgate.protocol")


cdef inline double perf_counter() noexcept:
    """time.perf_counter() without the Python call (both read CLOCK_MONOTONIC on Linux)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t _random64(WorkerState st) noexcept:
    """xorshift128+: trace and span ids need to be unique and unpredictable enough, not secret
    (W3C trace context 4.2.2); each worker seeds its own state from os.urandom after the fork."""
    cdef uint64_t s1 = st.rng0
    cdef uint64_t s0 = st.rng1
    st.rng0 = s0
    s1 ^= s1 << 23
    st.rng1 = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26)
    return st.rng1 + s0


cdef extern from *:
    """
    /* 8 lowercase hex digits of v, most significant first: the nibbles spread one per byte, then
       '0' added to each and 'a'-'0'-10 more where the nibble is above 9 (SWAR, no loop). */
    static inline void fg_hex8(char* out, uint32_t v) {
    #if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t x = v, m;
        x = ((x & 0xFFFF0000ULL) << 16) | (x & 0xFFFFULL);
        x = ((x & 0x0000FF000000FF00ULL) << 8) | (x & 0x000000FF000000FFULL);
        x = ((x & 0x00F000F000F000F0ULL) << 4) | (x & 0x000F000F000F000FULL);
        m = ((x + 0x0606060606060606ULL) >> 4) & 0x0101010101010101ULL;
        x = __builtin_bswap64(x + 0x3030303030303030ULL + m * 0x27);
        memcpy(out, &x, 8);
    #else
        int i;
        for (i = 7; i >= 0; i--) { out[i] = "0123456789abcdef"[v & 15]; v >>= 4; }
    #endif
    }
    """
    void fg_hex8(char* out, uint32_t v) noexcept nogil


cdef inline void _hex16(char* out, uint64_t v) noexcept:
    fg_hex8(out, <uint32_t>(v >> 32))
    fg_hex8(out + 8, <uint32_t>v)


def hex16(uint64_t v):
    """The 16 hex digits the data plane writes for `v` (request and trace ids); for tests."""
    cdef char out[16]
    _hex16(out, v)
    return PyBytes_FromStringAndSize(out, 16)


cdef bytes _new_traceparent(WorkerState st, bint sampled):
    """00-<trace id>-<parent id>-<flags>, both ids random and never all zero."""
    cdef bytes tp = PyBytes_FromStringAndSize(NULL, 55)
    cdef char* p = PyBytes_AS_STRING(tp)
    memcpy(p, b"00-", 3)
    _hex16(p + 3, _random64(st))
    _hex16(p + 19, _random64(st) | 1)
    p[35] = b"-"
    _hex16(p + 36, _random64(st) | 1)
    memcpy(p + 52, b"-01" if sampled else b"-00", 3)
    return tp


cdef bytes _child_traceparent(WorkerState st, bytes parent):
    """The client's valid traceparent with the gateway's own span id as the parent id."""
    cdef bytes tp = PyBytes_FromStringAndSize(PyBytes_AS_STRING(parent), len(parent))
    _hex16(PyBytes_AS_STRING(tp) + 36, _random64(st) | 1)
    return tp


@cython.cdivision(True)
cdef inline char* _put_u64(char* w, uint64_t v) noexcept:
    """`v` in decimal, as %llu writes it (snprintf's format parsing costs more than the digits)."""
    cdef char tmp[20]
    cdef int n = 0
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    while n > 0:
        n -= 1
        w[0] = tmp[n]
        w += 1
    return w


@cython.cdivision(True)
cdef inline char* _put_thousandths(char* w, uint64_t k) noexcept:
    """".%03d" % k for 0 <= k < 1000."""
    w[0] = 46
    w[1] = <char>(48 + k // 100)
    w[2] = <char>(48 + (k // 10) % 10)
    w[3] = <char>(48 + k % 10)
    return w + 4


cdef inline char* _put_i64(char* w, long long v) noexcept:
    if v < 0:
        w[0] = 45
        return _put_u64(w + 1, <uint64_t>(-(v + 1)) + 1)
    return _put_u64(w, <uint64_t>v)


cdef inline Py_ssize_t _format_content_length(char* buf, Py_ssize_t n) noexcept:
    """Writes b"Content-Length: %d\\r\\n" % n (n >= 0) to buf (48 bytes), without printf; its length."""
    memcpy(buf, b"Content-Length: ", 16)
    cdef char* w = _put_u64(buf + 16, <uint64_t>n)
    w[0] = 13
    w[1] = 10
    return w + 2 - buf


# A response head is assembled from at most MAX_PIECES pieces (pointers into bytes objects the
# caller holds, or into C buffers) in one allocation, with the body appended when it is small and
# already here: one bytes object and one write, no list, no join, no body slice.
cdef struct Piece:
    const char* p
    Py_ssize_t n

cdef enum:
    MAX_PIECES = 16
    SMALL_BODY = 8192  # bodies up to this size ride in the head's buffer


cdef inline int _add(Piece* ps, int k, object b) noexcept:
    if b is not None and PyBytes_GET_SIZE(b):
        ps[k].p = PyBytes_AS_STRING(b)
        ps[k].n = PyBytes_GET_SIZE(b)
        return k + 1
    return k


cdef inline int _lit(Piece* ps, int k, const char* s, Py_ssize_t n) noexcept:
    ps[k].p = s
    ps[k].n = n
    return k + 1


cdef bytes _assemble(Piece* ps, int k, const char* body, Py_ssize_t body_len):
    cdef Py_ssize_t total = body_len, at = 0
    cdef int i
    for i in range(k):
        total += ps[i].n
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    for i in range(k):
        memcpy(dst + at, ps[i].p, ps[i].n)
        at += ps[i].n
    if body_len:
        memcpy(dst + at, body, body_len)
    return out


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the response is already queued."""


# --- upstream side ------------------------------------------------------------------------------
cdef class RouteCore:
    pass


cdef class RouterValue:
    pass


cdef class Target:
    """One upstream server: address, weight, health and its pool of idle connections."""


    def __init__(self, str address, str host, int port, int weight, pool_cfg, health, bytes host_header):
        self.address = address
        self.host = host
        self.port = port
        self.weight = weight
        self.health = health
        self.active = 0  # exchanges in flight (least-connections, p2c)
        self.idle = []
        self.max_idle = pool_cfg.max_idle
        self.idle_timeout = pool_cfg.idle_timeout
        self.max_requests = pool_cfg.max_requests
        self.host_header = host_header
        self.loop = None

    cpdef object take_idle(self):
        cdef UpstreamProtocol conn
        idle = self.idle
        while idle:
            conn = <UpstreamProtocol>idle.pop()
            if not conn.closed:
                return conn
        return None

    cpdef give_back(self, UpstreamProtocol conn, double now):
        if conn.closed:
            return
        if len(self.idle) >= self.max_idle or conn.requests >= self.max_requests:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def sweep_idle(self, double now):
        """Close idle connections older than idle_timeout (oldest are at the front)."""
        idle = self.idle
        limit = now - self.idle_timeout
        n = 0
        for conn in idle:
            if conn.idle_since > limit and not conn.closed:
                break
            n += 1
        if n:
            for conn in idle[:n]:
                conn.close()
            del idle[:n]

    def close_all(self):
        for conn in self.idle:
            conn.close()
        self.idle.clear()


cdef class UpstreamProtocol:

    def __init__(self, Target target):
        self.target = target
        self.transport = None
        self.ex = None  # the Exchange being served, None while idle
        self.buf = None  # partial response head
        self.mode = -1  # -1: reading the head; else HEAD_* body mode
        self.remaining = 0
        self.scanner = None
        self.decode = False
        self.requests = 0
        self.idle_since = 0.0
        self.closed = False
        self.got_bytes = False
        self.tunnel = False
        self.keep_alive = True
        self.sink = None  # where the response goes: the client's transport, or a Capture

    # --- asyncio hooks ----------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc):
        self.closed = True
        ex = self.ex
        if ex is None:
            return
        self.ex = None
        if self.tunnel:
            ex.proto.tunnel_closed()
        elif self.mode == HEAD_CLOSE:
            ex.proto.response_done(ex, self, False)
        else:
            ex.proto.upstream_failed(ex, self, UpstreamResetError("upstream closed the connection"))

    def eof_received(self):
        return False  # the upstream half-closed: close; connection_lost decides what it meant

    def pause_writing(self):
        ex = self.ex
        if ex is not None:
            ex.proto.pause_client_reading(2)

    def resume_writing(self):
        ex = self.ex
        if ex is not None:
            ex.proto.resume_client_reading(2)

    def data_received(self, data):
        ex = self.ex
        if ex is None:  # bytes on an idle connection: the upstream is confused; never reuse it
            self.close()
            return
        self.got_bytes = True
        ex.upstream_bytes += len(data)
        ex.last = ex.proto._state.now
        if self.tunnel:
            ex.proto.transport.write(data)
            return
        if self.mode < 0:
            if self.buf is not None:
                self.buf += data
                data = self.buf
            self._head(ex, data, 0)
        else:
            self._body(ex, data, 0)

    # --- response reading -------------------------------------------------------------------------
    cdef _head(self, Exchange ex, object data, Py_ssize_t start):
        cdef ResponseHead rh
        while True:
            try:
                rh = scan_response_head(data, start, ex.head_request, MAX_RESPONSE_HEAD)
            except ValueError as exc:
                self.keep_alive = False
                ex.proto.upstream_failed(ex, self, UpstreamProtocolError(str(exc)))
                return
            if rh is None:
                self.buf = bytearray(data[start:]) if start or not isinstance(data, bytearray) else data
                return
            self.buf = None
            status = rh.status
            if 100 <= status < 200 and status != 101:
                ex.proto.informational(ex, rh)
                start = rh.end
                if start >= len(data):
                    return
                continue
            break
        self.keep_alive = rh.keep_alive
        mode = rh.body_mode
        if status == 101:
            if ex.upgrade is None:
                self.keep_alive = False
                ex.proto.upstream_failed(ex, self, UpstreamProtocolError("101 to a request without Upgrade"))
                return
            self.tunnel = True
            ex.proto.start_tunnel(ex, rh, data[rh.end:])
            return
        self.mode = mode
        cdef Py_ssize_t end = rh.end, n = len(data)
        if (mode == HEAD_LENGTH and 0 < rh.content_length <= n - end and rh.content_length <= SMALL_BODY
                and ex.capture is None and type(data) is bytes):
            # the whole (small) body is here: one buffer, one write (response_head appends it)
            whole = ex.proto.response_head(ex, self, rh, PyBytes_AS_STRING(data) + end, rh.content_length)
            if ex.capture is None:
                self.sink = ex.proto.transport
                self.remaining = 0
                self.sink.write(whole)
                if end + rh.content_length < n:
                    self.keep_alive = False  # extra bytes after the body: never reuse
                ex.proto.response_done(ex, self, self.keep_alive)
                return
            head = whole  # a response hook started a capture: the head alone came back
        else:
            head = ex.proto.response_head(ex, self, rh)
        cap = ex.capture
        if cap is None:
            self.sink = ex.proto.transport
        else:
            cap.start(ex.proto.transport, head)
            self.sink = cap
        if mode == HEAD_LENGTH:
            self.remaining = rh.content_length
        elif mode == HEAD_CHUNKED:
            # HTTP/1.0 clients and held-back responses get the body de-chunked
            self.decode = ex.version == 10 or (cap is not None and not cap.tee)
            self.scanner = ChunkedScanner(self.decode)
        if mode == HEAD_NONE or (mode == HEAD_LENGTH and self.remaining == 0):
            self.sink.write(head)
            if end < len(data):
                self.keep_alive = False  # bytes after a body-less response: poisoned
            ex.proto.response_done(ex, self, self.keep_alive)
            return
        if end < len(data):
            self._body(ex, data, end, head)  # head and the first body bytes in one writev
        else:
            self.sink.write(head)

    cdef _body(self, Exchange ex, object data, Py_ssize_t start, object head=None):
        mode = self.mode
        proto = ex.proto
        sink = self.sink
        if mode == HEAD_LENGTH:
            n = len(data) - start
            rem = self.remaining
            if n < rem:
                self.remaining = rem - n
                _send(sink, head, data if start == 0 else data[start:])
                return
            _send(sink, head, data[start:start + rem] if start or n > rem else data)
            if n > rem:
                self.keep_alive = False  # extra bytes after the body: never reuse
            self.remaining = 0
            proto.response_done(ex, self, self.keep_alive)
        elif mode == HEAD_CHUNKED:
            try:
                end = self.scanner.feed(data, start)
            except ValueError:
                self.keep_alive = False
                if head is not None:
                    sink.write(head)
                proto.abort_response(ex, self, UpstreamProtocolError("bad chunked framing from upstream"))
                return
            if self.decode:
                _send(sink, head, self.scanner.take())
            elif end < 0:
                _send(sink, head, data if start == 0 else data[start:])
            else:
                _send(sink, head, data[start:end])
            if end >= 0:
                if end < len(data):
                    self.keep_alive = False
                proto.response_done(ex, self, self.keep_alive)
        else:  # HEAD_CLOSE: until the upstream closes
            _send(sink, head, data if start == 0 else data[start:])


    # --- exchange management ----------------------------------------------------------------------
    cdef attach(self, Exchange ex):
        self.ex = ex
        self.mode = -1
        self.buf = None
        self.scanner = None
        self.got_bytes = False
        self.keep_alive = True
        self.requests += 1

    def detach(self):
        self.ex = None

    cpdef close(self):
        self.closed = True
        self.ex = None
        if self.transport is not None:
            self.transport.close()

    cpdef abort(self):
        self.closed = True
        self.ex = None
        if self.transport is not None:
            self.transport.abort()


async def connect(loop, Target target, double timeout):
    """Open a new connection to a target; UpstreamConnectError on refusal or timeout."""
    try:
        _t, proto = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamProtocol(target), target.host, target.port), timeout)
    except TimeoutError:
        raise UpstreamConnectError(f"connect to {target.address} timed out", 504, "upstream_connect_timeout") from None
    except OSError as exc:
        raise UpstreamConnectError(f"connect to {target.address}: {exc.strerror or exc}") from None
    return proto


class Capture:
    """Where a response goes when policies need its body (ex.capture, set by a response hook).

    tee=True   written through to the client as usual, and a copy of the body kept up to `cap`
               bytes (a cache stores it); past the cap the copy is dropped (`over`).
    tee=False  held back whole (a body transform rewrites it); the head written here is the one
               response_head built without framing. Past `cap` the response is `over`: the
               gateway answers 502 instead of sending a truncated or untransformed body.
    """


    __slots__ = ("tee", "cap", "transport", "head", "body", "over")

    def __init__(self, bint tee, Py_ssize_t cap):
        self.tee = tee
        self.cap = cap
        self.transport = None
        self.head = b""
        self.body = bytearray()
        self.over = False

    def start(self, transport, bytes head):
        self.transport = transport
        self.head = head

    def write(self, data):
        if self.tee:
            self.transport.write(data)
        if data is self.head and not self.body:
            return  # the head: the client has it (tee) or response_done builds it (held)
        if not self.over:
            if len(self.body) + len(data) > self.cap:
                self.over = True
                self.body = bytearray()
            else:
                self.body += data

    def writelines(self, parts):
        for p in parts:
            self.write(p)


cdef inline _send(transport, head, body):
    if head is None:
        if body:
            transport.write(body)
    elif body:
        transport.writelines((head, body))
    else:
        transport.write(head)


# --- client side --------------------------------------------------------------------------------
cdef inline _init_exchange(Exchange ex, GatewayProtocol proto):
    # fields not set here start as None, 0 or False (tp_new); proxy.pxd says what each one holds
    ex.proto = proto
    ex.method = ex.request_id = ex.target_path = ex.resp_extra = ex.path = ex.query = ex.host = b""
    ex.version = 11
    ex.keep_alive = True
    ex.content_length = -1
    ex.out = []
    ex.sent = []
    ex.excluded = ex.up_add = ex.params = ()
    ex.client_ip = proto.client_ip
    ex.t_up = ex.t_head = -1.0


cdef Exchange _new_exchange(GatewayProtocol proto):
    """Exchange(proto) without the Python call (the data plane makes one per request)."""
    cdef Exchange ex = Exchange.__new__(Exchange)
    _init_exchange(ex, proto)
    return ex


@cython.freelist(64)
cdef class Exchange:
    """One request/response. `local` is set for responses the gateway writes itself."""

    def __init__(self, GatewayProtocol proto):
        _init_exchange(self, proto)

    # --- for policies -----------------------------------------------------------------------------
    def header(self, bytes name):
        """The first value of the request header `name` (lowercase bytes), or None."""
        return find_header(self.headers, name)

    def reply(self, int status, str reason, bytes extra_headers=b"", **fields):
        """A complete JSON error response for a policy to return: {"error": reason, ...fields}."""
        return build_error(status, reason, self.request_id, self.proto.date, not self.keep_alive,
                           self.resp_extra + extra_headers, **fields)

    def add_upstream_header(self, bytes name not None, bytes value not None):
        self.up_add = self.up_add + ((name, value),)

    def drop_upstream_header(self, bytes name):
        """Keep the client's header `name` (any case) from the upstream, for this request only."""
        self.up_drop = (self.up_drop or frozenset()) | {name.lower()}

    cpdef authenticated(self, object consumer, object claims=None, object credential=None):
        """An authentication policy found who this is: the upstream is told in X-Consumer-* headers."""
        first = self.consumer is None
        self.consumer = consumer
        if claims is not None:
            self.claims = claims
        # a later authentication replaces an earlier one's identity, never adds a second copy
        # (client copies never get here: they are dropped with the request's headers)
        cdef tuple add
        if first:
            add = self.up_add
        else:
            kept = []
            for p in self.up_add:
                if p[0].lower() not in IDENTITY_HEADERS:
                    kept.append(p)
            add = tuple(kept)
        add += consumer.headers
        if credential is not None:
            add += ((b"X-Credential-Identifier", credential),)
        self.up_add = add

    cdef identified(self, object consumer, tuple identity):
        """authenticated(consumer, None, credential) with its headers made already: `identity` is
        consumer.headers and the X-Credential-Identifier pair (a key-auth policy makes it once per key)."""
        cdef tuple cred
        if self.consumer is None:
            self.consumer = consumer
            self.up_add = self.up_add + identity if self.up_add else identity
        else:  # a second authentication: authenticated() takes out the first one's headers
            cred = <tuple>identity[len(identity) - 1]
            self.authenticated(consumer, None, cred[1])


cdef class WorkerState:
    """Global state shared by every connection of a worker."""


    def __init__(self, loop, gen, bytes date, bytes rid_prefix):
        self.loop = loop
        self.gen = gen
        limits = gen.limits
        self.max_connections = limits.max_connections
        self.max_uri_bytes = limits.max_uri_bytes
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_body_bytes = limits.max_body_bytes
        self.keepalive_requests = limits.keepalive_requests
        self.underscores_in_headers = limits.underscores_in_headers
        self.tracing = gen.tracing
        self.latency_headers = gen.latency_headers
        self.consumer_label = gen.consumer_label
        self.router = gen.router
        seed = os.urandom(16)
        self.rng0 = int.from_bytes(seed[:8], "little") | 1  # xorshift needs a state that is not all zero
        self.rng1 = int.from_bytes(seed[8:], "little")
        self.connections = set()
        self.date = date
        self.rid_prefix = rid_prefix
        self.rid_n = 0
        self.draining = False
        self.stats = collections.Counter()
        self.now = loop.time()  # refreshed by the worker's tick: timeouts have the tick's granularity
        self.requests = 0
        self.metrics = None  # metrics.WorkerMetrics, set by the worker
        self.access_log = None  # accesslog.AccessLog when the config has one
        self.spans = None  # otel.SpanExporter with tracing.otlp
        self.usage = None  # control.analytics.UsageRecorder: the billing ledger's counts, set by the worker
        self.sampled = 0  # requests with policies; every SAMPLE_MASK+1-th has its hooks timed

    @property
    def access_log(self):
        """accesslog.AccessLog when the config has one. Its line list (which it empties in place),
        sample and pid are read by the data plane as C fields, copied here when it is set: a later
        change to the log's `sample` or `pid` is not seen (set access_log again)."""
        return self._access_log

    @access_log.setter
    def access_log(self, alog):
        self._access_log = alog
        self.alog_lines = alog.lines if alog is not None else None
        self.alog_sample = alog.sample if alog is not None else 1.0
        self.alog_pid = alog.pid if alog is not None else 0

    cpdef bytes new_request_id(self):
        """The worker's random prefix and a 16-hex-digit counter."""
        cdef Py_ssize_t n = len(self.rid_prefix)
        cdef bytes rid = PyBytes_FromStringAndSize(NULL, n + 16)
        cdef char* p = PyBytes_AS_STRING(rid)
        self.rid_n += 1
        memcpy(p, PyBytes_AS_STRING(self.rid_prefix), n)
        _hex16(p + n, self.rid_n)
        return rid

    def use_router(self, router):
        """Match new requests with `router`: the generation's, rebuilt after an API version's state
        changed (Generation.set_lifecycle)."""
        self.router = router


cdef class GatewayProtocol:

    def __init__(self, WorkerState state, bytes scheme=b"http"):
        self._state = state
        self._loop = state.loop
        self.transport = None
        self._parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self._scheme = scheme
        self._current = None
        self._pipeline = collections.deque()
        self._paused = 0
        self._requests = 0
        self._phase = IDLE
        self._since = 0.0
        self._head_bytes = 0
        self._dead = False
        self._eof = False  # the client half-closed: close once answered
        self._linger = 0.0  # lingering close: reading (and dropping) the client's bytes until then
        self._tunnel = None
        self._tunnel_buf = None
        self._wpaused = False
        self._wpaused_since = 0.0
        self._closed = False
        self._starting = None  # queued during this read; started once the whole read is parsed
        self._url = b""
        self._headers = []
        self._hbytes = 0
        self._ex = None

    # --- asyncio hooks ----------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        state = self._state
        if <Py_ssize_t>len(state.connections) >= state.max_connections or state.draining:
            state.stats["connections_refused"] += 1
            transport.abort()
            self._closed = True
            return
        state.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b"unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=65536, low=16384)
        self._since = self._loop.time()

    def connection_lost(self, exc):
        self._closed = True
        self._state.connections.discard(self)
        ex = self._current
        if ex is not None:
            self._drop_upstream(ex, failed=False)
            _done(ex)
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        for ex in self._pipeline:
            ex.conn = None
            _done(ex)
        self._pipeline.clear()
        self._current = None
        self._ex = None

    def pause_writing(self):
        self._wpaused = True
        self._wpaused_since = self._loop.time()
        up = self._tunnel or (self._current.conn if self._current is not None else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self):
        self._wpaused = False
        up = self._tunnel or (self._current.conn if self._current is not None else None)
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    def eof_received(self):
        # a client half-close: answer what was asked, then close
        if self._linger > 0:
            self._closed = True
            return False  # lingering close done: the client has sent everything
        if self._current is None and not self._pipeline:
            return False
        self._eof = True  # closed once what was asked is answered
        return True

    def data_received(self, data):
        if self._tunnel is not None:
            self._tunnel.transport.write(data)
            return
        if self._tunnel_buf is not None:  # upgrade requested, waiting for the upstream's 101
            self._tunnel_buf += data
            return
        if self._dead:
            return
        if self._phase == IDLE or self._phase == WAIT:
            self._phase = HEAD
            self._since = self._state.now
            self._head_bytes = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data, exc.args[0])
        except httptools.HttpParserCallbackError:
            pass  # a callback rejected the request and queued the response
        except httptools.HttpParserError as exc:
            self._reject_parse(400, "bad_request", str(exc))
        else:
            if self._phase == HEAD:
                self._head_bytes += len(data)
                if self._head_bytes > self._state.max_header_bytes + self._state.max_uri_bytes:
                    self._reject_parse(431, "headers_too_large", "")
        ex = self._starting
        if ex is not None:
            self._starting = None
            if ex is self._current and not self._closed:
                self._start(ex)
            return
        ex = self._current
        if ex is not None and ex.out and ex.conn is not None:
            self._flush(ex)

    # --- parser callbacks (httptools) -------------------------------------------------------------
    def on_url(self, bytes url):
        # llhttp hands the target over in one piece unless it straddles two reads
        self._url = url if PyBytes_GET_SIZE(self._url) == 0 else self._url + url
        if PyBytes_GET_SIZE(self._url) > self._state.max_uri_bytes:
            self._reject(414, "uri_too_long")

    def on_header(self, bytes name, bytes value):
        if self._ex is not None:
            return  # a trailer field of a chunked body: never a header (of this or the next request)
        # (memchr: on 3.11 `b"_" in name` first tries b"_" as an int and raises and clears a TypeError)
        if memchr(<const char*>name, 95, len(name)) != NULL and not self._state.underscores_in_headers:
            return  # like nginx: CGI-style servers would read X_Consumer_ID as X-Consumer-ID
        headers = self._headers
        headers.append((name, value))
        self._hbytes += len(name) + len(value) + 4
        if len(headers) > self._state.max_headers:
            self._reject(431, "too_many_headers")
        if self._hbytes > self._state.max_header_bytes:
            self._reject(431, "headers_too_large")

    def on_headers_complete(self):
        cdef WorkerState state = self._state
        cdef Exchange ex = _new_exchange(self)
        parser = self._parser
        ex.t0 = perf_counter()
        self._ex = ex
        ex.method = method = _method(parser)
        cdef fg_llhttp_head* lh
        if LLHTTP_DIRECT:
            lh = _llhttp(parser)
            ex.version = lh.http_major * 10 + lh.http_minor if lh.http_major == 1 and lh.http_minor <= 1 else -1
            if ex.version < 0:
                version = "%d.%d" % (lh.http_major, lh.http_minor)
        else:
            version = parser.get_http_version()
            ex.version = 11 if version == "1.1" else 10 if version == "1.0" else -1
        if ex.version < 0:  # HTTP/0.9 has no headers to route on; 2.0 and later never arrive as text
            return self._reject(505 if version[:1] >= "2" else 400, "http_version_not_supported")
        if KEEPALIVE_DIRECT:  # should_keep_alive() without its method call
            ex.keep_alive = _keep_alive_flags(lh) and not state.draining
        else:
            ex.keep_alive = parser.should_keep_alive() and not state.draining
        headers = self._headers
        ex.headers = headers
        cdef RequestInfo info
        try:
            info = scan_request(headers)
        except ValueError as exc:
            return self._reject(400, "bad_request", str(exc))
        ex.info = info
        ex.request_id = info.request_id or state.new_request_id()
        self._requests += 1
        if self._requests >= state.keepalive_requests:
            ex.keep_alive = False
        if method == b"CONNECT":
            return self._reject(405, "method_not_allowed")
        upgrade = info.upgrade
        if upgrade is not None:
            if upgrade != b"websocket":
                return self._reject(400, "upgrade_refused")
            ex.upgrade = upgrade
        if info.expect_other:
            return self._reject(417, "expectation_failed")
        cdef bytes url = self._url
        cdef const char* qm
        cdef Py_ssize_t ulen = PyBytes_GET_SIZE(url)
        host = info.host
        if ulen and PyBytes_AS_STRING(url)[0] == c'/':
            qm = <const char*>memchr(PyBytes_AS_STRING(url), c'?', ulen)
            if qm == NULL:
                path, query = url, b""
            else:
                path = PyBytes_FromStringAndSize(PyBytes_AS_STRING(url), qm - PyBytes_AS_STRING(url))
                query = PyBytes_FromStringAndSize(qm + 1, ulen - (qm + 1 - PyBytes_AS_STRING(url)))
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            if b"#" in url:  # absolute-URI has no fragment (RFC 9112 3.2.2), as origin-form has none
                return self._reject(400, "bad_request", "invalid request target")
            try:
                u = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                return self._reject(400, "bad_request", "invalid request target")
            if host is None and ex.version == 11:  # RFC 9112 3.2: a 1.1 request needs Host anyway
                return self._reject(400, "bad_request", "missing Host header")
            host = u.host + (b":%d" % u.port if u.port else b"")
            path, query = u.path or b"/", u.query or b""
        else:
            return self._reject(400, "bad_request", "invalid request target")
        if host is None:
            if ex.version == 11:
                return self._reject(400, "bad_request", "missing Host header")
            host = b""
        ex.host = host
        npath = normalize_path(path)
        if npath is None:
            ex.path = path
            return self._reject(400, "bad_request", "invalid path")
        ex.path = npath
        ex.query = query
        if info.content_length > state.max_body_bytes > 0:
            return self._reject(413, "body_too_large")
        if ex.version == 10 and (info.chunked or find_header(headers, b"transfer-encoding") is not None):
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing
            return self._reject(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if info.chunked or info.content_length < 0:
            te = find_header(headers, b"transfer-encoding")
            if te is not None and te.strip().lower() != b"chunked":
                # RFC 9112 6.1: chunked not last → 400; other codings we do not implement → 501
                if info.chunked:
                    return self._reject(501, "unsupported_transfer_coding")
                return self._reject(400, "bad_request", "transfer-encoding without chunked")
        if info.chunked:
            ex.body_mode = 2
        elif info.content_length >= 0:
            ex.body_mode = 1
            ex.content_length = info.content_length
        elif method in (b"POST", b"PUT", b"PATCH"):
            ex.body_mode = 1
            ex.content_length = 0
        ex.head_request = method == b"HEAD"
        found = state.router.match(method, host, npath)
        if found is None:
            return self._no_route(ex, "no_route")
        cdef RouterValue binding = <RouterValue?>(<tuple>found)[0]
        params = (<tuple>found)[1]
        if binding.switch:  # an API whose versions share paths: header or query picks
            found = binding.select(method, host, npath, headers, query)
            if found.__class__ is str:
                return self._no_route(ex, found)
            binding = <RouterValue?>(<tuple>found)[0]
            params = (<tuple>found)[1]
        ex.params = params
        cdef RouteCore route = binding.route
        ex.binding = binding
        ex.route = route
        ex.expect = info.expect_continue
        if route.mock is None:
            target = npath if binding.plain else binding.upstream_path(npath, params)
            ex.target_path = target + b"?" + query if query else target
            if state.tracing:
                tp = find_header(headers, b"traceparent")
                spans = state.spans
                if tp is None or not _valid_traceparent(tp):
                    sampled = spans is None or spans.sample >= 1.0 or random() < spans.sample
                    tp = _new_traceparent(state, sampled)
                elif spans is not None:  # the gateway's own span, a child of the client's
                    ex.span_parent = tp[36:52]
                    tp = _child_traceparent(state, tp)
                ex.trace = tp
                ex.up_add = ((b"traceparent", tp),)
        cdef ChainCore chain = route.chain
        if chain.active:
            if chain.body:
                if info.content_length > chain.body_limit:
                    return self._reject(413, "body_too_large")
                ex.body_parts = []
            if chain.request:
                state.sampled += 1
                if state.sampled & SAMPLE_MASK:
                    self._run_chain(ex, chain.request, 0)
                else:
                    self._run_chain_timed(ex, chain)
        if route.mock is not None and ex.local is None and ex.pending is None and ex.body_parts is None:
            ex.local = self._mock(ex, route.mock)
        self._phase = BODY
        self._since = state.now
        self._url = b""  # ready for the next request on this connection (no on_message_begin hook)
        self._headers = []
        self._hbytes = 0
        self._enqueue(ex)

    cdef _no_route(self, Exchange ex, str error):
        if ex.upgrade is not None:
            return self._reject(404, error)
        # a well-formed request nothing routes: answered in order, the connection kept
        ex.local = self._error_bytes(ex, 404, error, not ex.keep_alive)
        self._phase = BODY
        self._since = self._state.now
        self._url = b""
        self._headers = []
        self._hbytes = 0
        self._enqueue(ex)

    def on_body(self, body):
        ex = self._ex
        if ex is None:
            return
        n = len(body)
        ex.body_bytes += n
        self._since = self._state.now
        limit = self._state.max_body_bytes
        if limit and ex.body_bytes > limit:
            return self._reject(413, "body_too_large")
        if ex.local is not None or ex.upgrade is not None:
            return  # a mock or refused request: the body is read and dropped
        parts = ex.body_parts
        if parts is not None:
            if ex.body_bytes > ex.route.chain.body_limit:
                return self._reject(413, "body_too_large")
            parts.append(body)
            if ex.route.mock is not None:
                return
        if ex.body_mode == 2:
            ex.out += (b"%x\r\n" % n, body, b"\r\n")
        else:
            ex.out.append(body)
        if ex.conn is None and ex.body_bytes > BUFFER_HIGH and ex.body_parts is None:
            # (a body held for body hooks is bounded by their body_limit instead)
            self.pause_client_reading(P_BUFFER)

    def on_message_complete(self):
        ex = self._ex
        self._ex = None
        self._phase = WAIT
        if ex is None:
            return
        ex.req_done = True
        if ex.body_mode == 2 and ex.local is None:
            ex.out.append(TERMINAL_CHUNK)
        if ex.body_parts is not None and ex.pending is None:
            self._body_ready(ex)

    cdef _body_ready(self, Exchange ex):
        """The whole body is here and the request hooks are done: run the body hooks."""
        body = b"".join(ex.body_parts)
        ex.body_parts = None
        if ex.local is None:
            for hook in ex.route.chain.body:
                r = hook(ex, body)
                if r is not None:
                    ex.local = r
                    break
            if ex.local is None and ex.route.mock is not None:
                ex.local = self._mock(ex, ex.route.mock)
        if ex.held:
            ex.held = False
            if self._current is ex and self._starting is not ex and not self._closed:
                self._start(ex)

    # --- queueing ---------------------------------------------------------------------------------
    cdef _enqueue(self, Exchange ex):
        if self._current is None:
            self._current = ex
            self._starting = ex  # started by data_received once this read is parsed
        else:
            self._pipeline.append(ex)
            self.pause_client_reading(P_PIPELINE)

    # --- policies ---------------------------------------------------------------------------------
    @property
    def date(self):
        return self._state.date

    def count(self, bytes key, n=1):
        """Bump a host-wide metric (metrics.py key format)."""
        m = self._state.metrics
        if m is not None:
            m.pending[key] += n

    cdef _run_chain(self, Exchange ex, tuple chain, Py_ssize_t i):
        """Run request hooks from i on; stop at a response, or park the exchange on an awaitable."""
        n = len(chain)
        while i < n:
            r = chain[i](ex)
            i += 1
            if r is not None:
                self._answered(ex, r, chain, i)
                return

    cdef _answered(self, Exchange ex, object r, tuple chain, Py_ssize_t i):
        """A request hook answered: bytes is the response; an awaitable parks the exchange until
        it is done, then the chain goes on from hook i."""
        if type(r) is bytes:
            ex.local = r
            return
        fut = asyncio.ensure_future(r)
        ex.pending = fut
        fut.add_done_callback(lambda f, ex=ex, chain=chain, i=i: self._chain_resumed(ex, chain, i, f))

    cdef _run_chain_timed(self, Exchange ex, ChainCore chain):
        """_run_chain for a sampled request: each hook's own time goes to the policy histogram
        (a hook that waits is timed up to the moment it hands back its awaitable)."""
        hooks = chain.request
        names = chain.request_names
        metrics = self._state.metrics
        route = ex.route.name
        i, n = 0, len(hooks)
        while i < n:
            t = perf_counter()
            r = hooks[i](ex)
            if metrics is not None:
                metrics.policy(route, names[i], perf_counter() - t)
            i += 1
            if r is not None:
                self._answered(ex, r, hooks, i)
                return

    def _chain_resumed(self, Exchange ex, tuple chain, Py_ssize_t i, fut):
        ex.pending = None
        if self._closed:
            return
        try:
            r = fut.result()
        except Exception as exc:  # a policy failed: a bug or a backend error it did not handle
            log.error("policy failed on %s: %r", ex.route.name, exc)
            r = self._error_bytes(ex, 500, "policy_error", not ex.keep_alive)
        if r is not None:
            ex.local = r
        else:
            self._run_chain(ex, chain, i)
        if ex.pending is None:
            if ex.body_parts is not None:
                if not ex.req_done:
                    if self._current is ex and self._starting is not ex:
                        self._start(ex)  # sends 100 Continue if asked, then holds for the body
                    return
                self._body_ready(ex)  # starts the exchange if it was held
                if ex.held or self._current is not ex:
                    return
            if ex.local is None and ex.route.mock is not None:
                ex.local = self._mock(ex, ex.route.mock)
            if self._current is ex and self._starting is not ex:
                self._start(ex)

    cdef _start(self, Exchange ex):
        self._current = ex
        if ex.pending is not None:
            return  # started when the policy it waits for is done
        if ex.local is not None:
            self.transport.write(ex.local if not ex.head_request else _head_only(ex.local))
            ex.responded = True
            if ex.expect and not ex.req_done:
                ex.keep_alive = False  # the client was never told to send its body
            self._finish(ex)
            return
        if ex.expect and not ex.req_done and ex.version == 11:
            self.transport.write(CONTINUE)
        if ex.body_parts is not None:
            ex.held = True  # body hooks first: started again once the body is complete
            return
        ex.started = ex.last = self._state.now
        self._proxy(ex)


    cdef _finish(self, Exchange ex):
        """The response to `ex` is complete: next request, idle, or close."""
        cdef int status
        cdef double elapsed, upstream
        self._current = None
        if ex.canary is not None:
            ex.canary.record(ex.status or (int(ex.local[9:12]) if ex.local else 0),
                             ex.t_head - ex.t_up if ex.t_head >= 0 else -1.0)
        metrics = self._state.metrics
        if metrics is not None and ex.t0:
            status = ex.status if ex.status else (int(ex.local[9:12]) if ex.local else 0)
            elapsed = perf_counter() - ex.t0
            upstream = ex.t_head - ex.t_up if ex.t_head >= 0 else -1.0
            rs = <RouteStats>(ex.route.stats if ex.route is not None else metrics.unmatched)
            if rs.record(status, elapsed, upstream):
                metrics.dirty.append(rs)
            if ex.consumer is not None and self._state.consumer_label:
                self._count_consumer(ex, status)
            usage = self._state.usage
            if ex.consumer is not None and usage is not None:
                if ex.route is not None:
                    _count_usage_route(usage, ex.consumer, ex.route, status, elapsed)
                else:
                    count_usage(usage.pending, usage.hour, ex.consumer, None, status, elapsed)
            lines = self._state.alog_lines
            if lines is not None and (status >= 400 or self._state.alog_sample >= 1.0
                                      or random() < self._state.alog_sample):
                self._log_line(ex, lines, status, elapsed, upstream)
        spans = self._state.spans
        if spans is not None and ex.trace is not None and ex.t0 and int(ex.trace[53:55], 16) & 1:
            end = time_ns()
            route = ex.route
            consumer = ex.consumer
            status = ex.status if ex.status else (int(ex.local[9:12]) if ex.local else 0)
            spans.record((ex.trace[3:35].decode(), ex.trace[36:52].decode(),
                          ex.span_parent.decode() if ex.span_parent else None, ex.method.decode("latin-1"),
                          route.name, route.api, consumer.username if consumer is not None else None,
                          ex.path.decode("latin-1"), status, ex.client_ip.decode(),
                          ex.group.name if ex.group is not None else None,
                          end - int((perf_counter() - ex.t0) * 1e9), end,
                          round((ex.t_head - ex.t_up) * 1000, 3) if ex.t_head >= 0 else None))
        if ex.route is not None and ex.route.chain.done:
            _done(ex)
        state = self._state
        if self._closed:
            return
        if not ex.keep_alive or not ex.req_done or state.draining or (self._eof and not self._pipeline):
            self._pipeline.clear()
            if not ex.req_done or self._linger < 0:
                self._linger_close()
            else:
                self._close()
            return
        pipeline = self._pipeline
        if self._dead and not pipeline:
            self._close()
        elif pipeline:
            nxt = pipeline.popleft()
            if not pipeline:
                self.resume_client_reading(P_PIPELINE)
            self._start(nxt)
        elif self._phase == WAIT:
            self._phase = IDLE
            self._since = state.now

    cdef _log_line(self, Exchange ex, list lines, int status, double elapsed, double upstream):
        """The access log's line appended to the worker's list (AccessLog.lines), without a Python frame. The
        connection's fields (worker, client address) and the route's (route, API) are made once, by
        the helpers access_line uses too."""
        cdef RouteCore route = ex.route
        cdef bytes route_fields
        if ex.client_ip is not self._log_ip or self._log_fields is None:
            self._log_fields = _conn_fields(self._state.alog_pid, ex.client_ip)
            self._log_ip = ex.client_ip
        if route is None:
            route_fields = _NO_ROUTE_FIELDS
        else:
            route_fields = route.log_fields
            if route_fields is None:
                route_fields = route.log_fields = _route_fields(route.name, route.api)
        consumer = ex.consumer
        lines.append(_line(_realtime(), ex.request_id, ex.trace, True, self._log_fields, ex.method, ex.path,
                           route_fields, consumer.username if consumer is not None else None, status, ex.body_bytes,
                           ex.upstream_bytes if ex.t_up >= 0 else -1, len(ex.local) if ex.local else -1,
                           elapsed * 1000, upstream * 1000 if upstream >= 0 else -1.0))
        if PyList_GET_SIZE(lines) >= ALOG_BATCH_N:
            self._state._access_log.flush()

    cdef _count_consumer(self, Exchange ex, int status):
        """metrics.consumer_label: only consumers the config or the store knows get a series — a
        token's free-form `sub` must not fill the shared table with keys nobody lists."""
        gen = self._state.gen
        name = ex.consumer.username
        if name in gen.consumers or (gen.directory is not None and name in gen.directory.names):
            self._state.metrics.pending[b"cq|%s|%s|%d" % (ex.route.name.encode(), name.encode(), status // 100)] += 1

    cdef _close(self):
        if not self._closed:
            self._closed = True
            self.transport.close()

    cdef _linger_close(self):
        """Answered before the client finished sending its body: shut our side, then read and drop
        what it still sends for up to LINGER seconds (nginx's lingering close). Closing at once
        would make the kernel answer those bytes with a reset, which can destroy the response
        before the client has read it."""
        t = self.transport
        if self._closed or not t.can_write_eof():
            self._close()
            return
        self._dead = True
        self._linger = self._state.now + LINGER
        t.write_eof()
        self._paused = 0
        t.resume_reading()

    # --- local responses --------------------------------------------------------------------------
    cdef bytes _mock(self, Exchange ex, object mock):
        head, body = mock
        parts = [head, self._state.date, b"X-Request-ID: ", ex.request_id, b"\r\n", ex.route.resp_add, ex.resp_extra]
        if not ex.keep_alive:
            parts.append(CLOSE)
        elif ex.version == 10:
            parts.append(KEEP_ALIVE)
        parts.append(b"\r\n")
        if not ex.head_request:
            parts.append(body)
        return b"".join(parts)

    cdef bytes _error_bytes(self, Exchange ex, int status, str reason, bint close):
        rid = ex.request_id if ex is not None and ex.request_id else self._state.new_request_id()
        self._state.stats[f"status_{status}"] += 1
        data = build_error(status, reason, rid, self._state.date, close)
        return data if ex is None or not ex.head_request else _head_only(data)

    cdef _reject(self, int status, str reason, str detail=""):
        """From a parser callback: answer with an error (in order) and stop reading this connection."""
        self._reject_parse(status, reason, detail)
        raise _Reject(reason)

    cdef _reject_parse(self, int status, str reason, str detail):
        if self._dead:
            return
        if detail:
            log.debug("rejecting request from %s: %s (%s)", self.client_ip, reason, detail)
        self._dead = True
        self._phase = WAIT
        ex = self._ex or _new_exchange(self)
        self._ex = None
        if ex is self._current:
            if ex.responded:  # the response already started: nothing left but to cut the connection
                self._abort_client()
                return
            # the upstream may hold a head and part of a body: abort it, so it never sees a complete request
            ex.connecting = False
            self._drop_upstream(ex, failed=False)
            self._current = None
        if ex.request_id == b"":
            ex.request_id = self._state.new_request_id()
        ex.keep_alive = False
        if status == 413 and not ex.req_done:
            self._linger = -1.0  # the client is still sending the body we refused: close lingering
        ex.req_done = True
        ex.out = []
        ex.local = self._error_bytes(ex, status, reason, True)
        if self._starting is not None and self._starting is not self._current:
            self._starting = None
        if self._current is None:
            self._starting = None
            self._start(ex)
        elif ex not in self._pipeline:
            self._pipeline.append(ex)
        self.pause_client_reading(P_DEAD)

    # --- upstream side ----------------------------------------------------------------------------
    cdef bytes _hash_key(self, Exchange ex, UpstreamCore group):
        if group.hash_on == HASH_HEADER:
            return find_header(ex.headers, group.hash_key) or b""
        if group.hash_on == HASH_COOKIE:
            cookies = find_header(ex.headers, b"cookie") or b""
            for part in cookies.split(b";"):
                k, _, v = part.strip().partition(b"=")
                if k.lower() == group.hash_key:
                    return v
            return b""
        if group.hash_on == HASH_CONSUMER and ex.consumer is not None:
            return ex.consumer.username.encode()
        return ex.client_ip  # the client real-ip found (the TCP peer otherwise); anonymous requests too

    cdef _proxy(self, Exchange ex):
        cdef UpstreamCore group = ex.group
        cdef RouteCore route
        cdef Target target
        if group is None:
            route = ex.route
            group = route.group
            canary = route.canary
            if canary is not None and canary.choose(ex, find_header(ex.headers, b"cookie"),
                                                    ex.consumer.username.encode() if ex.consumer else None):
                group = canary.group
                ex.canary = canary
            ex.group = group
        now = self._state.now
        key = self._hash_key(ex, group) if group.hash_on >= 0 else None
        target = group.balancer.pick(key, now, ex.excluded)
        if target is None and ex.excluded:
            target = group.balancer.pick(key, now)
        if target is None:
            self._fail(ex, NoHealthyUpstream("no healthy target"))
            return
        target.health.on_pick()
        target.active += 1
        ex.target = target
        conn = target.take_idle()
        if conn is not None:
            self._send(ex, conn)
        else:
            ex.connecting = True
            self._loop.create_task(self._connect(ex, target))

    async def _connect(self, Exchange ex, Target target):
        try:
            conn = await connect(self._loop, target, ex.group.connect_timeout)
        except GatewayError as exc:
            ex.connecting = False
            if ex.target is target and self._current is ex and not self._closed:
                target.active -= 1
                target.health.report(False, self._loop.time())
                ex.target = None
                self._retry_or_fail(ex, target, exc, True)
            return
        ex.connecting = False
        if self._current is not ex or self._closed or ex.target is not target:
            target.give_back(conn, self._loop.time())  # the client went away meanwhile
            return
        self._send(ex, conn)

    cdef _send(self, Exchange ex, UpstreamProtocol conn):
        cdef Target target = ex.target
        conn.attach(ex)
        ex.conn = conn
        cdef RouteCore route = ex.route
        host = ex.host if route.preserve_host and ex.host else target.host_header
        drop = route.req_drop if ex.up_drop is None else route.req_drop | ex.up_drop
        try:
            head = build_request_head(ex.method, ex.target_path, ex.headers, host, self.client_ip, self._scheme,
                                      ex.request_id, drop if not ex.expect else drop | {b"expect"},
                                      route.req_add + ex.up_add if ex.up_add else route.req_add, ex.body_mode,
                                      ex.content_length, ex.upgrade is not None)
        except (ValueError, TypeError) as exc:  # a header a policy added that cannot be sent
            conn.detach()
            target.active -= 1
            target.give_back(conn, self._loop.time())
            ex.conn = None
            ex.target = None
            self._fail(ex, GatewayError(str(exc), 400, "bad_request"))
            return
        ex.last = self._state.now
        ex.t_up = perf_counter()
        out = ex.out
        if out:
            ex.out = []
            out.insert(0, head)
            data = b"".join(out)
            _keep_sent(ex, out[1:])
        else:
            data = head
        conn.transport.write(data)
        if self._wpaused:
            conn.transport.pause_reading()
        if ex.body_bytes > BUFFER_HIGH or self._paused & P_BUFFER:
            self.resume_client_reading(P_BUFFER)

    cdef _flush(self, Exchange ex):
        out = ex.out
        ex.out = []
        ex.conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
        _keep_sent(ex, out)


    cdef _drop_upstream(self, Exchange ex, bint failed):
        conn = ex.conn
        if conn is not None:
            ex.conn = None
            conn.abort()
        if ex.target is not None:
            ex.target.active -= 1
            if failed:
                ex.target.health.report(False, self._loop.time())
            ex.target = None

    cdef _retry_or_fail(self, Exchange ex, Target target, object exc, bint connect_failed=False, bint idle_reset=False):
        cdef UpstreamCore group = ex.group
        replayable = ex.sent is not None and (ex.method in IDEMPOTENT or connect_failed or idle_reset)
        # a kept-alive connection that the upstream had closed (its idle timeout crossed our request)
        # does not use up a retry, as in nginx: each such one leaves the pool, a new one is not reused
        if (not ex.responded and replayable and (idle_reset or ex.attempt < group.retries)
                and ex.upgrade is None):
            self._state.stats["retries"] += 1
            if not idle_reset:
                ex.attempt += 1
                ex.excluded = ex.excluded + (target,)
            ex.out = ex.sent + ex.out
            ex.sent = []
            ex.sent_bytes = 0
            self._proxy(ex)
            return
        self._fail(ex, exc)

    cdef _fail(self, Exchange ex, object exc):
        """Answer `ex` with an error, or cut the client off if the response had already started."""
        if ex.responded:
            self._abort_client()
            return
        log.info("%s %s -> %d %s (%s)", ex.method.decode(), ex.target_path[:200], exc.status, exc.reason, exc)
        ex.local = self._error_bytes(ex, exc.status, exc.reason, not (ex.keep_alive and ex.req_done))
        if not ex.req_done:
            ex.keep_alive = False
        self.transport.write(ex.local if not ex.head_request else _head_only(ex.local))
        ex.responded = True
        self._finish(ex)

    cdef _abort_client(self):
        self._current = None
        self._pipeline.clear()
        self._closed = True
        self.transport.abort()

    # --- called by UpstreamProtocol ---------------------------------------------------------------
    cdef informational(self, Exchange ex, ResponseHead rh):
        if rh.status != 100 and ex.version == 11:
            self.transport.write(rh.head + b"\r\n")

    cdef bytes response_head(self, Exchange ex, UpstreamProtocol conn, ResponseHead rh, const char* body=NULL,
                             Py_ssize_t body_len=0):
        """The head to send the client (the caller writes it, with the first body bytes). Given
        `body` (the whole body, already read), the head comes back with the body appended, unless
        a response hook started a capture (then the caller sends the body as usual: check
        ex.capture)."""
        ex.status = rh.status
        ex.t_head = perf_counter()
        cdef RouteCore route = ex.route
        for hook in route.chain.response:
            hook(ex, rh)
        cdef bytes head = rh.head
        if route.resp_remove or ex.resp_drop:
            head = remove_headers(head, route.resp_remove | ex.resp_drop if ex.resp_drop else route.resp_remove)
        cdef int mode = rh.body_mode, k = 0
        cdef Piece ps[MAX_PIECES]
        cdef char clbuf[48]
        cdef bytes latency = None
        held = ex.capture is not None and not ex.capture.tee
        k = _add(ps, k, head)
        if held:
            pass  # framing is decided when the whole (transformed) body is known: response_done
        elif mode == 1 or (mode == 0 and rh.content_length >= 0):
            k = _lit(ps, k, clbuf, _format_content_length(clbuf, rh.content_length))
        elif mode == 2:
            if ex.version == 11:
                k = _lit(ps, k, "Transfer-Encoding: ", 19)
                k = _add(ps, k, rh.te)
                k = _lit(ps, k, "\r\n", 2)
            else:
                ex.keep_alive = False
        elif mode == 3:
            ex.keep_alive = False
        if not ex.req_done:
            ex.keep_alive = False
        if not ex.keep_alive or self._state.draining:
            k = _add(ps, k, CLOSE)
        elif ex.version == 10:
            k = _add(ps, k, KEEP_ALIVE)
        if self._state.latency_headers:
            now = perf_counter()
            latency = (b"X-Upstream-Latency: %d\r\nX-Gateway-Latency: %d\r\n"
                       % (int((now - ex.t_up) * 1000), int((ex.t_up - ex.t0) * 1000)))
            k = _add(ps, k, latency)
        k = _lit(ps, k, "X-Request-ID: ", 14)
        k = _add(ps, k, ex.request_id)
        k = _lit(ps, k, "\r\n", 2)
        k = _add(ps, k, route.resp_add)
        k = _add(ps, k, ex.resp_extra)
        if held:
            return _assemble(ps, k, NULL, 0)  # not sent yet: response_done adds the framing and the body
        k = _lit(ps, k, "\r\n", 2)
        ex.responded = True
        return _assemble(ps, k, body if ex.capture is None else NULL, body_len if ex.capture is None else 0)

    cdef response_done(self, Exchange ex, UpstreamProtocol conn, bint reusable):
        if ex.capture is not None:
            self._captured(ex)
        cdef Target target = ex.target
        cdef Health health
        cdef bint failed
        ex.conn = None
        ex.target = None
        state = self._state
        now = state.now
        if target is not None:
            target.active -= 1
            health = target.health
            failed = health.failing(ex.status)
            if failed or health.failures or health.b_window:
                health.report(not failed, now)
        if reusable and ex.req_done and not conn.closed:
            conn.ex = None
            target.give_back(conn, now)
        else:
            conn.close()
        state.requests += 1
        if self._current is ex:
            self._finish(ex)

    cdef _captured(self, Exchange ex):
        """The whole response went through a Capture: send a held one (transformed), or hand a
        tee'd copy to the policies that wanted it."""
        cap = ex.capture
        hooks = ex.route.chain.response_end
        if cap.tee:
            if not cap.over:
                body = bytes(cap.body)
                for hook in hooks:
                    hook(ex, body)
            return
        if cap.over:
            ex.responded = False
            ex.local = self._error_bytes(ex, 502, "response_too_large", True)
            ex.keep_alive = False
            self.transport.write(ex.local)
            ex.responded = True
            return
        body = bytes(cap.body)
        try:
            for hook in hooks:
                r = hook(ex, body)
                if r is not None:
                    body = r
        except Exception:  # a transform failed on this body: never send it half-done
            log.exception("response transform failed on %s", ex.route.name)
            self.transport.write(self._error_bytes(ex, 502, "response_transform_failed", True))
            ex.keep_alive = False
            ex.responded = True
            return
        n = len(body)
        if ex.head_request or ex.status in (204, 304) or 100 <= ex.status < 200:
            self.transport.write(cap.head + b"\r\n")
        else:
            self.transport.writelines((cap.head, b"Content-Length: %d\r\n\r\n" % n, body))
        ex.responded = True

    cdef upstream_failed(self, Exchange ex, UpstreamProtocol conn, object exc):
        cdef Target target = ex.target
        idle_reset = conn.requests > 1 and not conn.got_bytes
        ex.conn = None
        ex.target = None
        conn.abort()
        if target is not None:
            target.active -= 1
            if not idle_reset:
                target.health.report(False, self._loop.time())
        if self._current is not ex or self._closed:
            return
        self._retry_or_fail(ex, target, exc, False, idle_reset)

    cdef abort_response(self, Exchange ex, UpstreamProtocol conn, object exc):
        log.warning("upstream broke a response mid-body: %s", exc)
        self._drop_upstream(ex, failed=True)
        self._abort_client()

    # --- tunnels (WebSocket) ----------------------------------------------------------------------
    def _on_upgrade(self, data, Py_ssize_t offset):
        ex = self._ex or self._current
        if ex is None or ex.upgrade is None or ex.local is not None:
            self._reject_parse(400, "bad_request", "unexpected upgrade")
            return
        ex.req_done = True
        ex.keep_alive = False
        self._tunnel_buf = bytearray(data[offset:])
        ex.out = []

    cdef start_tunnel(self, Exchange ex, ResponseHead rh, object rest):
        conn = ex.conn
        ex.responded = True
        self.transport.write(rh.head + b"Connection: upgrade\r\n\r\n" + rest)
        self._tunnel = conn
        buf = self._tunnel_buf
        self._tunnel_buf = None
        if buf:
            conn.transport.write(bytes(buf))
        self._state.stats["tunnels"] += 1

    cdef tunnel_closed(self):
        self._tunnel = None
        self._close()

    # --- flow control -----------------------------------------------------------------------------
    cpdef pause_client_reading(self, int reason):
        if self._linger > 0:
            return  # a lingering close reads (and drops) everything until it closes
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    cpdef resume_client_reading(self, int reason):
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and not self._closed:
            self.transport.resume_reading()

    # --- timeouts (called by the worker tick) -----------------------------------------------------
    def check(self, double now):
        cdef UpstreamCore group
        if self._linger > 0:
            if now > self._linger:
                self._close()
            return
        limits = self._state.gen.limits
        phase = self._phase
        if phase == IDLE and self._current is None:
            limit = limits.keepalive_timeout if self._requests else limits.header_timeout
            if self._state.draining:
                limit = min(limit, DRAIN_GRACE)
            if now - self._since > limit:
                self._close()
                return
        elif phase == HEAD and now - self._since > limits.header_timeout and not self._dead:
            self._state.stats["header_timeouts"] += 1
            self._reject_parse(408, "request_timeout", "header timeout")
            return
        elif phase == BODY and now - self._since > limits.body_timeout and not self._dead:
            ex = self._ex
            if ex is not None and ex is self._current and ex.responded:
                self._abort_client()
                return
            if ex is not None and ex is self._current:
                self._drop_upstream(ex, failed=False)
                self._current = None
            self._ex = None
            self._reject_parse(408, "request_timeout", "body timeout")
            return
        if self._wpaused and now - self._wpaused_since > limits.send_timeout:
            self._abort_client()
            return
        ex = self._current
        if ex is not None and ex.local is None and (ex.conn is not None or ex.connecting):
            group = ex.group
            if group.total_timeout and now - ex.started > group.total_timeout:
                self._timeout(ex, "upstream total timeout")
            elif ex.conn is not None and now - ex.last > group.read_timeout and not self._wpaused:
                self._timeout(ex, "upstream read timeout")

    cdef _timeout(self, Exchange ex, str what):
        self._state.stats["upstream_timeouts"] += 1
        ex.connecting = False
        self._drop_upstream(ex, failed=True)
        self._fail(ex, UpstreamTimeout(what))

    def drain(self, double now):
        """Worker shutdown begins. A busy connection closes after its current response (which says
        `Connection: close`). An idle one gets DRAIN_GRACE seconds: a request arriving meanwhile is
        served with `Connection: close`; then it is closed. Closing idle keep-alive connections at
        once would race clients that are sending on them right now (RFC 9112 §9.3.1)."""
        if self._current is None and self._phase in (IDLE, WAIT):
            self._phase = IDLE
            self._since = now

    def abort(self):
        if not self._closed:
            self._abort_client()
        if self._tunnel is not None:
            self._tunnel.abort()


cdef bytes _head_only(bytes response):
    """A local response to a HEAD request: the head, Content-Length kept, no body (RFC 9110 9.3.2) —
    a body here would be read as the start of the next response on a kept-alive connection."""
    end = response.find(b"\r\n\r\n")
    return response if end < 0 else response[:end + 4]


_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}").fullmatch


cdef bint _valid_traceparent(bytes tp):
    """W3C trace context, version 00: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, ids not
    all zero (a later version may carry more after the first 55 bytes)."""
    if len(tp) < 55 or tp[2:3] != b"-" or tp[35:36] != b"-" or tp[52:53] != b"-":
        return False
    version = tp[:2]
    if version == b"ff" or (version == b"00" and len(tp) != 55) or (len(tp) > 55 and tp[55:56] != b"-"):
        return False
    if _TRACEPARENT(tp[:55]) is None:  # lowercase hex digits only (int(x, 16) would take 0x, _, signs)
        return False
    return tp[3:35] != b"0" * 32 and tp[36:52] != b"0" * 16


cdef _done(Exchange ex):
    """Run the route's done hooks once per routed exchange (it finished or its client left)."""
    if ex.finished or ex.route is None:
        return
    ex.finished = True
    for hook in ex.route.chain.done:
        try:
            hook(ex)
        except Exception:  # a policy's bug must not take the connection with it
            log.exception("done hook failed on %s", ex.route.name)


cdef _keep_sent(Exchange ex, list frames):
    if ex.sent is None:
        return
    for f in frames:
        ex.sent_bytes += len(f)
    if ex.sent_bytes > REPLAY_LIMIT:
        ex.sent = None
    else:
        ex.sent += frames



# --- the access log's lines (accesslog.py writes them; its Python formatting is the reference) -----
cdef double _realtime() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef const char* _HEX = b"0123456789abcdef"
cdef long _ts_sec = -1
cdef char _ts_prefix[24]  # "YYYY-MM-DDTHH:MM:SS" of _ts_sec: one strftime per second of traffic


cdef unsigned char _JSON_PLAIN[256]  # 1: the byte goes into a JSON string as it is (ASCII, not " \\ or a control)
for _c in range(256):
    _JSON_PLAIN[_c] = 32 <= _c < 128 and _c != 34 and _c != 92


cdef inline char* _json_str(char* w, const unsigned char* s, Py_ssize_t n, bint latin1) noexcept:
    """A JSON string of `s`: bytes as Latin-1 (each byte one character, as bytes.decode("latin-1")),
    or UTF-8 already (str values), escaped as JSON requires. Runs of plain bytes are copied whole."""
    cdef Py_ssize_t i = 0, j
    cdef unsigned char c
    w[0] = 34
    w += 1
    cdef uint64_t x, q, b
    while i < n:
        j = i
        while j + 8 <= n:  # eight at a time: no byte >= 0x80, < 0x20, '"' or '\\' (the word tricks
            memcpy(&x, s + j, 8)  # answer "any?" exactly)
            q = x ^ 0x2222222222222222ULL
            b = x ^ 0x5C5C5C5C5C5C5C5CULL
            if (x | ((x - 0x2020202020202020ULL) & ~x) | ((q - 0x0101010101010101ULL) & ~q)
                    | ((b - 0x0101010101010101ULL) & ~b)) & 0x8080808080808080ULL:
                break
            j += 8
        if j < n and j + 8 > n:  # a tail shorter than a word: the same test on it padded with 'A's
            x = 0x4141414141414141ULL
            memcpy(&x, s + j, n - j)
            q = x ^ 0x2222222222222222ULL
            b = x ^ 0x5C5C5C5C5C5C5C5CULL
            if not ((x | ((x - 0x2020202020202020ULL) & ~x) | ((q - 0x0101010101010101ULL) & ~q)
                     | ((b - 0x0101010101010101ULL) & ~b)) & 0x8080808080808080ULL):
                j = n
        while j < n and _JSON_PLAIN[s[j]]:
            j += 1
        if j > i:
            memcpy(w, s + i, j - i)
            w += j - i
            i = j
            if i == n:
                break
        c = s[i]
        i += 1
        if c == 34 or c == 92:
            w[0] = 92
            w[1] = c
            w += 2
        elif c < 32:
            w[0] = 92
            w[1] = 117
            w[2] = 48
            w[3] = 48
            w[4] = _HEX[c >> 4]
            w[5] = _HEX[c & 15]
            w += 6
        elif c >= 128 and latin1:
            w[0] = 0xC0 | (c >> 6)
            w[1] = 0x80 | (c & 0x3F)
            w += 2
        else:
            w[0] = c
            w += 1
    w[0] = 34
    return w + 1


cdef inline char* _json_lit(char* w, const char* lit) noexcept:
    """A NUL-terminated constant: inlined, the C compiler knows its length and copies it whole."""
    cdef size_t n = strlen(lit)
    memcpy(w, lit, n)
    return w + n


cdef inline char* _json_opt_str(char* w, object v) except NULL:
    cdef Py_ssize_t n
    cdef const char* u
    if v is None:
        return _json_lit(w, b"null")
    if type(v) is bytes:
        return _json_str(w, <const unsigned char*>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), True)
    u = PyUnicode_AsUTF8AndSize(v, &n)
    return _json_str(w, <const unsigned char*>u, n, False)


@cython.cdivision(True)
cdef inline char* _json_ms(char* w, char* end, double v) noexcept:
    """A time in ms with three decimals, as round(v, 3) gives it; null when it is not a number
    (as msgspec writes inf and nan). Never past `end` (the caller leaves at least 64 bytes, room
    for "null" and more): a value too long for the room left is null.
    Below 1e7 ms, v * 1000 is within 2e-6 of the exact product, so rounding it to an integer is
    the correctly rounded value unless it lies that close to a half: those, and the rest, go
    through snprintf's %.3f."""
    cdef int n
    cdef double m, f
    cdef uint64_t k
    if isnan(v) or isinf(v):
        return _json_lit(w, b"null")
    if 0.0 <= v < 1e7 and end - w >= 16:
        m = v * 1000.0
        f = m - floor(m)
        if not 0.49999 < f < 0.50001:
            k = <uint64_t>floor(m + 0.5)
            return _put_thousandths(_put_u64(w, k // 1000), k % 1000)
    n = snprintf(w, end - w, b"%.3f", v)
    if n < 0 or n >= end - w:
        return _json_lit(w, b"null")
    return w + n


cdef inline Py_ssize_t _json_len(object v) except -1:
    if v is None:
        return 4
    cdef Py_ssize_t n
    if type(v) is bytes:
        return PyBytes_GET_SIZE(v)
    PyUnicode_AsUTF8AndSize(v, &n)  # kept by the str: _json_opt_str reads it again for free
    return n


cdef bytes _NO_ROUTE_FIELDS = b',"route":null,"api":null'


cdef bytes _conn_fields(long worker, bytes client_ip):
    """The line's `,"worker":…,"client_ip":…`: the same for every request of a connection."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(client_ip)
    cdef char small[256]
    cdef char* buf = small
    cdef char* w
    if 48 + 6 * n > 256:
        buf = <char*>PyMem_Malloc(48 + 6 * n)
        if buf == NULL:
            raise MemoryError()
    try:
        w = _put_i64(_json_lit(buf, b',"worker":'), worker)
        w = _json_lit(w, b',"client_ip":')
        w = _json_str(w, <const unsigned char*>PyBytes_AS_STRING(client_ip), n, True)
        return PyBytes_FromStringAndSize(buf, w - buf)
    finally:
        if buf != small:
            PyMem_Free(buf)


cdef bytes _route_fields(object route, object api):
    """The line's `,"route":…,"api":…`: the same for every request of a route."""
    cdef Py_ssize_t cap = 32 + 6 * (_json_len(route) + _json_len(api))
    cdef char* buf = <char*>PyMem_Malloc(cap)
    cdef char* w
    if buf == NULL:
        raise MemoryError()
    try:
        w = _json_opt_str(_json_lit(buf, b',"route":'), route)
        w = _json_opt_str(_json_lit(w, b',"api":'), api)
        return PyBytes_FromStringAndSize(buf, w - buf)
    finally:
        PyMem_Free(buf)


cpdef bytes access_line(double t, bytes request_id, object trace_id, long worker, bytes client_ip, bytes method,
                        bytes path, object route, object api, object consumer, long status, Py_ssize_t request_bytes,
                        Py_ssize_t upstream_bytes, Py_ssize_t response_bytes, double gateway_ms,
                        double upstream_ms):
    """One access-log line (JSON, newline-terminated; accesslog.FIELDS in order). Bytes values are
    read as Latin-1; -1 for upstream_bytes, response_bytes or upstream_ms is null; the two times are
    written with three decimals, as round(x, 3) gives them. The data plane writes the same line from
    the same parts (GatewayProtocol._log_line), with the connection's and the route's made once."""
    return _line(t, request_id, trace_id, False, _conn_fields(worker, client_ip), method, path,
                 _route_fields(route, api), consumer, status, request_bytes, upstream_bytes, response_bytes,
                 gateway_ms, upstream_ms)


cdef bytes _line(double t, bytes request_id, object trace, bint traceparent, bytes conn_fields, bytes method,
                 bytes path, bytes route_fields, object consumer, long status, Py_ssize_t request_bytes,
                 Py_ssize_t upstream_bytes, Py_ssize_t response_bytes, double gateway_ms, double upstream_ms):
    """access_line's work; `trace` is the trace id, or (traceparent) the traceparent it is read from."""
    global _ts_sec
    if not 0.0 <= t < 253402300800.0:  # years 1970-9999: what the ts field can say
        raise ValueError("access_line: t is not a time between 1970 and 9999")
    if traceparent:  # as `trace[3:35] if trace else None` gives it
        if not trace:
            trace = None
            traceparent = False
        elif type(trace) is not bytes or PyBytes_GET_SIZE(trace) < 35:
            trace = trace[3:35]
            traceparent = False
    cdef long sec = <long>t
    cdef time_t tt = sec
    cdef tm parts
    # the constant parts and the integers (at most 20 digits and a sign each) take about 330
    # bytes, each time at most 64 (a longer one is written null), each string byte at most 6
    # ("\\u00XX")
    cdef Py_ssize_t cap = 420 + 2 * 64 + PyBytes_GET_SIZE(conn_fields) + PyBytes_GET_SIZE(route_fields) \
        + 6 * (_json_len(request_id) + (32 if traceparent else _json_len(trace)) + _json_len(method)
               + _json_len(path) + _json_len(consumer))
    cdef char small[2048]
    cdef char* buf = small
    cdef char* w
    if cap > 2048:
        buf = <char*>PyMem_Malloc(cap)
        if buf == NULL:
            raise MemoryError()
    try:
        if sec != _ts_sec:
            gmtime_r(&tt, &parts)
            strftime(_ts_prefix, sizeof(_ts_prefix), b"%Y-%m-%dT%H:%M:%S", &parts)
            _ts_sec = sec
        w = _json_lit(buf, b'{"ts":"')
        w = _json_lit(w, _ts_prefix)
        w = _put_thousandths(w, <uint64_t>(<long long>(t * 1000) % 1000))
        w = _json_lit(w, b'Z","request_id":')
        w = _json_str(w, <const unsigned char*>PyBytes_AS_STRING(request_id), PyBytes_GET_SIZE(request_id), True)
        w = _json_lit(w, b',"trace_id":')
        if traceparent and trace is not None:
            w = _json_str(w, <const unsigned char*>PyBytes_AS_STRING(trace) + 3, 32, True)
        else:
            w = _json_opt_str(w, trace)
        memcpy(w, PyBytes_AS_STRING(conn_fields), PyBytes_GET_SIZE(conn_fields))
        w += PyBytes_GET_SIZE(conn_fields)
        w = _json_lit(w, b',"method":')
        w = _json_str(w, <const unsigned char*>PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), True)
        w = _json_lit(w, b',"path":')
        w = _json_str(w, <const unsigned char*>PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path), True)
        memcpy(w, PyBytes_AS_STRING(route_fields), PyBytes_GET_SIZE(route_fields))
        w += PyBytes_GET_SIZE(route_fields)
        w = _json_lit(w, b',"consumer":')
        w = _json_opt_str(w, consumer)
        w = _put_i64(_json_lit(w, b',"status":'), status)
        w = _put_i64(_json_lit(w, b',"request_bytes":'), request_bytes)
        w = _json_lit(w, b',"upstream_bytes":')
        w = _put_i64(w, upstream_bytes) if upstream_bytes >= 0 else _json_lit(w, b"null")
        w = _json_lit(w, b',"response_bytes":')
        w = _put_i64(w, response_bytes) if response_bytes >= 0 else _json_lit(w, b"null")
        w = _json_lit(w, b',"gateway_ms":')
        w = _json_ms(w, w + 64, gateway_ms)
        w = _json_lit(w, b',"upstream_ms":')
        w = _json_ms(w, w + 64, upstream_ms) if upstream_ms >= 0 else _json_lit(w, b"null")
        w = _json_lit(w, b"}\n")
        return PyBytes_FromStringAndSize(buf, w - buf)
    finally:
        if buf != small:
            PyMem_Free(buf)



cpdef count_usage(dict pending, object hour, object consumer, object route, int status, double seconds):
    """control/analytics.count_usage (the reference, which the recorders' own `record` uses), for
    the data plane: one answered request into a usage recorder's pending counts,
    (hour, consumer, plan, api) -> [requests, errors, µs]."""
    cdef list c
    if consumer is None:
        return
    key = (hour, consumer.username, consumer.plan or "", (route.api or "") if route is not None else "")
    c = pending.get(key)
    if c is None:
        c = pending[key] = [0, 0, 0]
    _add_usage(c, status, seconds)


cdef inline _add_usage(list c, int status, double seconds):
    c[0] += 1
    if status >= 400:
        c[1] += 1
    c[2] += <long long>(seconds * 1e6)


cdef _count_usage_route(object usage, object consumer, RouteCore route, int status, double seconds):
    """count_usage into `usage`'s pending counts for a request on `route`, without making and
    hashing the (hour, consumer, plan, api) key each time: the route remembers, per username, the
    plan, the hour and the counts list found for them, and uses that list while the plan is the
    same object and the hour equal. What it remembers is for one batch of the recorder's: a
    recorder replaces its `batch` token whenever it takes its pending counts away, and the route
    then forgets them all (so it never adds to a list already taken, and holds no more than the
    pairs of route and consumer seen in one batch)."""
    cdef list slot, c
    cdef PyObject* found
    cdef dict slots = route.usage_slots
    batch = usage.batch
    hour = usage.hour
    username = consumer.username
    plan = consumer.plan
    if slots is None or route.usage_batch is not batch:
        slots = route.usage_slots = {}
        route.usage_batch = batch
    else:
        found = PyDict_GetItemWithError(slots, username)
        if found != NULL:
            slot = <list>found
            if slot[0] is plan and (slot[1] is hour or slot[1] == hour):
                _add_usage(<list>slot[2], status, seconds)
                return
    pending = usage.pending
    key = (hour, username, plan or "", route.api or "")
    c = pending.get(key)
    if c is None:
        c = pending[key] = [0, 0, 0]
    slots[username] = [plan, hour, c]
    _add_usage(c, status, seconds)


def count_usage_route(usage, consumer, RouteCore route not None, int status, double seconds):
    """_count_usage_route, for tests: what the data plane counts for a consumer's request on a route."""
    _count_usage_route(usage, consumer, route, status, seconds)
