"""Upstream side: targets with keep-alive pools, and the protocol that reads responses.

An `UpstreamProtocol` serves one exchange at a time. It scans the response head with the compiled
`scan_response_head` (strict: a malformed head is a 502 and the connection is closed, never pooled),
writes the rewritten head to the client and then passes the body through untouched, counting
Content-Length or following chunked framing with the compiled `ChunkedScanner`. A connection goes
back to its pool only when the response ended exactly where its framing said, the request was
fully sent, and both sides allow keep-alive.
"""
from __future__ import annotations

import asyncio
import socket

from .._core.headers import ChunkedScanner, scan_response_head
from ..errors import UpstreamConnectError, UpstreamProtocolError, UpstreamResetError
from .health import TargetHealth

MAX_RESPONSE_HEAD = 65536
HEAD_NONE, HEAD_LENGTH, HEAD_CHUNKED, HEAD_CLOSE = 0, 1, 2, 3


class Target:
    """One upstream server: address, weight, health and its pool of idle connections."""

    __slots__ = ("address", "host", "port", "weight", "health", "active", "idle", "max_idle",
                 "idle_timeout", "max_requests", "host_header", "loop")

    def __init__(self, address: str, host: str, port: int, weight: int, pool_cfg, health: TargetHealth,
                 host_header: bytes):
        self.address = address
        self.host = host
        self.port = port
        self.weight = weight
        self.health = health
        self.active = 0  # exchanges in flight (least-connections, p2c)
        self.idle: list[UpstreamProtocol] = []  # LIFO: the warmest connection first
        self.max_idle = pool_cfg.max_idle
        self.idle_timeout = pool_cfg.idle_timeout
        self.max_requests = pool_cfg.max_requests
        self.host_header = host_header
        self.loop = None

    def take_idle(self):
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def give_back(self, conn: UpstreamProtocol, now: float) -> None:
        if conn.closed:
            return
        if len(self.idle) >= self.max_idle or conn.requests >= self.max_requests:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def sweep_idle(self, now: float) -> None:
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

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("target", "transport", "ex", "buf", "mode", "remaining", "scanner", "decode", "requests",
                 "idle_since", "closed", "got_bytes", "tunnel", "keep_alive", "lost_waiter", "sink")

    def __init__(self, target: Target):
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
    def _head(self, ex, data, start: int) -> None:
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
        end = rh.end
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

    def _body(self, ex, data, start: int, head=None) -> None:
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
    def attach(self, ex) -> None:
        self.ex = ex
        self.mode = -1
        self.buf = None
        self.scanner = None
        self.got_bytes = False
        self.keep_alive = True
        self.requests += 1

    def detach(self) -> None:
        self.ex = None

    def close(self) -> None:
        self.closed = True
        self.ex = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.ex = None
        if self.transport is not None:
            self.transport.abort()


async def connect(loop, target: Target, timeout: float) -> UpstreamProtocol:
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

    def __init__(self, tee: bool, cap: int):
        self.tee = tee
        self.cap = cap
        self.transport = None
        self.head = b""
        self.body = bytearray()
        self.over = False

    def start(self, transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data) -> None:
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

    def writelines(self, parts) -> None:
        for p in parts:
            self.write(p)


def _send(transport, head, body) -> None:
    if head is None:
        if body:
            transport.write(body)
    elif body:
        transport.writelines((head, body))
    else:
        transport.write(head)
