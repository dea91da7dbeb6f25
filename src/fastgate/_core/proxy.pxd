from libc.stdint cimport uint64_t

from .balance cimport Balancer, Health, Peer, UpstreamCore
from .chain cimport ChainCore
from .headers cimport RequestInfo, ResponseHead, remove_headers
from .router cimport Router
from .stats cimport RouteStats

# The data plane's per-connection objects as cdef classes: one field access is a C struct read,
# one method call among them a C call (uvloop's handles/*.pxd pattern: fields typed in the .pxd,
# the inline helpers final). Policies (Python) see Exchange's fields as `public` attributes.

cdef class RouteCore:
    """What the data plane reads of a compiled route (server/generation.py's CompiledRoute extends it)."""
    cdef public RouteStats stats  # this worker's counts for /metrics
    cdef public str name
    cdef public UpstreamCore group
    cdef public object mock  # (head bytes without Date/Connection, body bytes) or None
    cdef public bint preserve_host
    cdef public frozenset req_drop
    cdef public tuple req_add
    cdef public bytes resp_add
    cdef public frozenset resp_remove
    cdef public object api  # the API's name, or None
    cdef public object version  # the API version's name, or None
    cdef public ChainCore chain  # the route's compiled policies (policies/base.py)
    cdef public object canary  # server/canary.Canary: part of the traffic to another upstream
    cdef bytes log_fields  # the access log's `,"route":…,"api":…` for this route, made at its first line
    cdef readonly dict usage_slots  # the usage ledger's counts of this route by username (_count_usage_route)...
    cdef object usage_batch  # ...in the usage recorder's batch with this token


cdef class RouterValue:
    """What the router holds for a path pattern (server/generation.py): a Binding (one route and
    how to build its upstream path) or a VersionSwitch (an API whose versions share the pattern)."""
    cdef public bint switch  # a VersionSwitch: its select() picks the binding
    cdef public bint plain  # the upstream path is the request's (no strip, no rewrite)
    cdef public RouteCore route  # a Binding's route


cdef class Target(Peer):  # Peer: weight, active, health (balance.pxd)
    cdef public str address
    cdef public str host
    cdef public int port
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
    cdef public RouterValue binding  # the router's value: server.generation.Binding
    cdef public RouteCore route  # server.generation.CompiledRoute (None: nothing routed)
    cdef public bytes method
    cdef public int version
    cdef public bint keep_alive
    cdef public bytes request_id
    cdef public list headers
    cdef public object info  # headers.scan_request's RequestInfo
    cdef public bytes target_path
    cdef public object upgrade  # b"websocket" when the client asked to upgrade
    cdef public int body_mode  # 0 none, 1 content-length, 2 chunked
    cdef public Py_ssize_t content_length
    cdef public bint head_request
    cdef public bint req_done
    cdef public list out  # body frames not yet written upstream
    cdef public object sent  # frames written upstream, kept for a retry (None once past REPLAY_LIMIT)
    cdef public Py_ssize_t sent_bytes
    cdef public Py_ssize_t body_bytes
    cdef public UpstreamProtocol conn  # the upstream connection serving this exchange
    cdef public Target target
    cdef public int attempt  # retries so far
    cdef public tuple excluded  # targets that failed this exchange (not picked again)
    cdef public bint responded
    cdef public double started  # loop time when proxying began; last: the last byte either way
    cdef public double last
    cdef public bint connecting
    cdef public object local  # a response the gateway writes itself (bytes)
    cdef public bint expect
    cdef public int status
    cdef public object consumer  # set by an authentication policy
    cdef public object resp_extra  # header lines policies add to the response
    cdef public object pending  # a policy's awaitable the exchange waits for
    cdef public bytes path  # the normalised request path (no query)
    cdef public bytes query  # the raw query string, without "?"
    cdef public tuple up_add  # (name, value) header pairs policies add for the upstream
    cdef public object claims  # what authentication verified (JWT claims, introspection answer)
    cdef public object body_parts  # the body, buffered while body hooks wait for all of it
    cdef public bint held  # started, but waiting for the whole body before proxying
    cdef public object scratch  # per-request state a policy keeps between its hooks
    cdef public object client_ip  # the peer, or who a trusted proxy says the client is
    cdef public bint finished
    cdef public double t0  # perf_counter() when the head was parsed; t_up: sent upstream; t_head: its answer
    cdef public double t_up
    cdef public double t_head
    cdef public object resp_drop  # lowercase names of upstream response headers response hooks remove
    cdef public object capture  # Capture when a response hook needs the body (cache, transforms)
    cdef public object cache_key  # the proxy-cache policy's note between its request and response hooks
    cdef public object trace  # the traceparent sent upstream (W3C trace context)
    cdef public Py_ssize_t upstream_bytes  # bytes the upstream sent for this exchange (access log)
    cdef public object up_drop  # lowercase request header names policies keep from the upstream
    cdef public tuple params  # the route pattern's captured {params}, in order
    cdef public bytes host  # the authority routed on: Host, or an absolute-form target's (RFC 9112 3.2.2)
    cdef public UpstreamCore group  # the UpstreamGroup proxied to: the route's, or its canary's
    cdef public object canary  # the route's Canary when this request went to the canary
    cdef public object span_parent  # OTLP export: the client's span id (hex), the parent of the gateway's span

    cpdef authenticated(self, object consumer, object claims=*, object credential=*)
    cdef identified(self, object consumer, tuple identity)


cdef class WorkerState:
    cdef public object loop
    cdef readonly object gen  # a worker serves one generation (a reload starts new workers)
    # the generation's settings the data plane reads per request, copied into C fields
    cdef Py_ssize_t max_connections, max_uri_bytes, max_header_bytes, max_headers, max_body_bytes
    cdef Py_ssize_t keepalive_requests
    cdef bint underscores_in_headers, tracing, latency_headers, consumer_label
    cdef Router router
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
    cdef object _access_log  # accesslog.AccessLog (the property access_log); its lines, sample and pid as C fields
    cdef list alog_lines
    cdef double alog_sample
    cdef long alog_pid
    cdef public object usage
    cdef public object spans
    cdef uint64_t rng0, rng1  # xorshift128+ for trace and span ids, seeded per worker from os.urandom

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
    cdef object _log_ip  # the client address _log_fields was made for (a trusted proxy may name others)
    cdef bytes _log_fields  # the access log's `,"worker":…,"client_ip":…` for it

    cdef _no_route(self, Exchange ex, str error)
    cdef _body_ready(self, Exchange ex)
    cdef _enqueue(self, Exchange ex)
    cdef _run_chain(self, Exchange ex, tuple chain, Py_ssize_t i)
    cdef _run_chain_timed(self, Exchange ex, ChainCore chain)
    cdef _answered(self, Exchange ex, object r, tuple chain, Py_ssize_t i)
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
    cdef bytes _hash_key(self, Exchange ex, UpstreamCore group)
    cdef _count_consumer(self, Exchange ex, int status)
    cdef _log_line(self, Exchange ex, list lines, int status, double elapsed, double upstream)
    cpdef pause_client_reading(self, int reason)
    cpdef resume_client_reading(self, int reason)
    cdef informational(self, Exchange ex, ResponseHead rh)
    cdef bytes response_head(self, Exchange ex, UpstreamProtocol conn, ResponseHead rh, const char* body=*,
                             Py_ssize_t body_len=*)
    cdef response_done(self, Exchange ex, UpstreamProtocol conn, bint reusable)
    cdef _captured(self, Exchange ex)
    cdef upstream_failed(self, Exchange ex, UpstreamProtocol conn, object exc)
    cdef abort_response(self, Exchange ex, UpstreamProtocol conn, object exc)
    cdef start_tunnel(self, Exchange ex, ResponseHead rh, object rest)
    cdef tunnel_closed(self)
