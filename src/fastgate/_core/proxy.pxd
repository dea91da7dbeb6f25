# The data plane's per-connection objects as cdef classes: one field access is a C struct read,
# one method call among them a C call (uvloop's handles/*.pxd pattern: fields typed in the .pxd,
# the inline helpers final). Policies (Python) see Exchange's fields as `public` attributes.

cdef class Target:
    cdef public str address
    cdef public str host
    cdef public int port
    cdef public int weight
    cdef public object health
    cdef public Py_ssize_t active  # exchanges in flight (least-connections, p2c)
    cdef public list idle  # LIFO: the warmest connection first
    cdef public Py_ssize_t max_idle
    cdef public double idle_timeout
    cdef public Py_ssize_t max_requests
    cdef public bytes host_header
    cdef public object loop

    cpdef object take_idle(self)
    cpdef give_back(self, UpstreamProtocol conn, double now)


cdef class UpstreamProtocol:
    cdef public Target target
    cdef public object transport
    cdef public Exchange ex  # the Exchange being served, None while idle
    cdef object buf  # partial response head (bytearray)
    cdef int mode  # -1: reading the head; else HEAD_* body mode
    cdef Py_ssize_t remaining
    cdef object scanner
    cdef bint decode
    cdef public Py_ssize_t requests
    cdef public double idle_since
    cdef public bint closed
    cdef public bint got_bytes
    cdef public bint tunnel
    cdef bint keep_alive
    cdef object sink  # where the response goes: the client's transport, or a Capture

    cdef _head(self, Exchange ex, object data, Py_ssize_t start)
    cdef _body(self, Exchange ex, object data, Py_ssize_t start, object head=*)
    cdef attach(self, Exchange ex)
    cpdef close(self)
    cpdef abort(self)


cdef class Exchange:
    cdef public GatewayProtocol proto
    cdef public object binding
    cdef public object route
    cdef public bytes method
    cdef public int version
    cdef public bint keep_alive
    cdef public bytes request_id
    cdef public list headers
    cdef public object info
    cdef public bytes target_path
    cdef public object upgrade
    cdef public int body_mode  # 0 none, 1 content-length, 2 chunked
    cdef public Py_ssize_t content_length
    cdef public bint head_request
    cdef public bint req_done
    cdef public list out  # body frames not yet written upstream
    cdef public object sent  # frames written upstream, kept for a retry (None once past REPLAY_LIMIT)
    cdef public Py_ssize_t sent_bytes
    cdef public Py_ssize_t body_bytes
    cdef public UpstreamProtocol conn
    cdef public Target target
    cdef public int attempt
    cdef public tuple excluded
    cdef public bint responded
    cdef public double started
    cdef public double last
    cdef public bint connecting
    cdef public object local
    cdef public bint expect
    cdef public int status
    cdef public object consumer
    cdef public object resp_extra
    cdef public object pending
    cdef public bytes path
    cdef public bytes query
    cdef public tuple up_add
    cdef public object claims
    cdef public object body_parts
    cdef public bint held
    cdef public object scratch
    cdef public object client_ip
    cdef public bint finished
    cdef public double t0
    cdef public double t_up
    cdef public double t_head
    cdef public object resp_drop
    cdef public object capture
    cdef public object cache_key
    cdef public object trace
    cdef public Py_ssize_t upstream_bytes
    cdef public object up_drop
    cdef public tuple params
    cdef public bytes host
    cdef public object group
    cdef public object canary
    cdef public object span_parent


cdef class WorkerState:
    cdef public object loop
    cdef public object gen
    cdef public set connections
    cdef public bytes date
    cdef public bytes rid_prefix
    cdef public unsigned long long rid_n
    cdef public bint draining
    cdef public object stats
    cdef public double now  # refreshed by the worker's tick: timeouts have the tick's granularity
    cdef public Py_ssize_t requests
    cdef public object metrics
    cdef public Py_ssize_t sampled
    cdef public object access_log
    cdef public object usage
    cdef public object spans

    cpdef bytes new_request_id(self)


cdef class GatewayProtocol:
    cdef WorkerState _state
    cdef object _loop
    cdef public object transport
    cdef object _parser
    cdef public bytes client_ip
    cdef bytes _scheme
    cdef Exchange _current
    cdef object _pipeline
    cdef int _paused
    cdef Py_ssize_t _requests
    cdef int _phase
    cdef double _since
    cdef Py_ssize_t _head_bytes
    cdef bint _dead
    cdef bint _eof
    cdef double _linger
    cdef UpstreamProtocol _tunnel
    cdef object _tunnel_buf
    cdef bint _wpaused
    cdef double _wpaused_since
    cdef bint _closed
    cdef Exchange _starting
    cdef bytes _url
    cdef list _headers
    cdef Py_ssize_t _hbytes
    cdef Exchange _ex

    cdef _no_route(self, Exchange ex, str error)
    cdef _body_ready(self, Exchange ex)
    cdef _enqueue(self, Exchange ex)
    cdef _run_chain(self, Exchange ex, tuple chain, Py_ssize_t i)
    cdef _run_chain_timed(self, Exchange ex, object chain)
    cdef _start(self, Exchange ex)
    cdef _finish(self, Exchange ex)
    cdef _close(self)
    cdef _linger_close(self)
    cdef bytes _mock(self, Exchange ex, object mock)
    cdef bytes _error_bytes(self, Exchange ex, int status, str reason, bint close)
    cdef _reject(self, int status, str reason, str detail=*)
    cdef _reject_parse(self, int status, str reason, str detail)
    cdef _proxy(self, Exchange ex)
    cdef _send(self, Exchange ex, UpstreamProtocol conn)
    cdef _flush(self, Exchange ex)
    cdef _drop_upstream(self, Exchange ex, bint failed)
    cdef _retry_or_fail(self, Exchange ex, Target target, object exc, bint connect_failed=*, bint idle_reset=*)
    cdef _fail(self, Exchange ex, object exc)
    cdef _abort_client(self)
    cdef _timeout(self, Exchange ex, str what)
    cdef bytes _hash_key(self, Exchange ex, object group)
    cdef _count_consumer(self, Exchange ex, int status)
    cpdef pause_client_reading(self, int reason)
    cpdef resume_client_reading(self, int reason)
    cdef informational(self, Exchange ex, object rh)
    cdef bytes response_head(self, Exchange ex, UpstreamProtocol conn, object rh)
    cdef response_done(self, Exchange ex, UpstreamProtocol conn, bint reusable)
    cdef _captured(self, Exchange ex)
    cdef upstream_failed(self, Exchange ex, UpstreamProtocol conn, object exc)
    cdef abort_response(self, Exchange ex, UpstreamProtocol conn, object exc)
    cdef start_tunnel(self, Exchange ex, object rh, object rest)
    cdef tunnel_closed(self)
