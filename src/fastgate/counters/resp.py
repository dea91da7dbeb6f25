"""A small auto-pipelining Redis client: one asyncio Protocol per connection, replies parsed by
`hiredis.Reader`, no redis-py.

Every request is written as RESP without waiting for earlier replies; the requests of one loop
iteration share one `transport.write` (a `call_soon` flush; `coalesce=False` writes each one at
once). Replies come back in order, so they are matched FIFO to the pending requests.

A request is `(packed bytes, callback, arg)`: `callback(reply, arg)` is called exactly once, with
the parsed reply (`hiredis.ReplyError` for an error reply) or a `ConnectionFailure` when the
connection dies first. One timer watches the oldest pending request: if it is still unanswered
after `timeout` seconds the server is stuck (slow, paused, gone without a FIN) and the whole
connection is dropped: every pending request fails at once and `on_lost` is told.
Works on stock asyncio and on uvloop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl as _ssl
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

log = logging.getLogger("fastgate.redis")

ReplyError = hiredis.ReplyError


class ConnectionFailure(Exception):
    """The connection to Redis failed, timed out or was closed before the reply came."""


def encode(arg) -> bytes:
    if type(arg) is bytes:
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise TypeError(f"cannot send {type(arg).__name__} to redis")


def bulk(arg: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def pack(*args) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = encode(a)
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RedisURL:
    """redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path.sock?db=N (or redis+unix://);
    a Redis Cluster as redis+cluster://[user:pass@]host:port,host:port,... or redis://...?cluster=true
    (the addresses are seeds: the client learns the rest from CLUSTER SLOTS)."""

    __slots__ = ("host", "port", "path", "db", "username", "password", "tls", "cluster", "seeds", "text")

    def __init__(self, url: str):
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("redis", "rediss", "unix", "redis+unix", "redis+cluster", "rediss+cluster"):
            raise ValueError(f"unsupported redis url {url!r} (redis://, rediss://, unix://, redis+cluster://)")
        netloc, _, _ = rest.partition("/")
        netloc = netloc.partition("?")[0]
        hosts = netloc.rpartition("@")[2]
        seeds = [h for h in hosts.split(",") if h]
        # parse with the first seed only: urlsplit does not know comma-separated hosts
        u = urlsplit(url.replace(hosts, seeds[0] if seeds else "", 1) if "," in hosts else url)
        query = parse_qs(u.query)
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password is not None else None
        if self.password is None and "password" in query:
            self.password = query["password"][0]
        self.tls = scheme.startswith("rediss")
        self.cluster = scheme.endswith("+cluster") or query.get("cluster", ["no"])[0].lower() in ("1", "true", "yes")
        if scheme in ("unix", "redis+unix"):
            self.path = u.path
            self.host, self.port = None, None
            db = query.get("db", ["0"])[0]
        else:
            self.path = None
            self.host = u.hostname or "127.0.0.1"
            self.port = u.port or 6379
            db = (u.path or "/").strip("/") or query.get("db", ["0"])[0]
        try:
            self.db = int(db)
        except ValueError:
            raise ValueError(f"redis url database must be a number, not {db!r}") from None
        self.seeds = []
        if self.cluster:
            if self.path or self.db:
                raise ValueError("a redis cluster url names host:port seeds and no database")
            for h in seeds or ["127.0.0.1:6379"]:
                hu = urlsplit("//" + h)
                self.seeds.append((hu.hostname or "127.0.0.1", hu.port or 6379))
        where = self.path if self.path else ",".join(seeds) if self.cluster else f"{self.host}:{self.port}"
        self.text = f"{scheme}://{where}/{self.db}"  # no password, for logs

    def at(self, host: str, port: int) -> RedisURL:
        """The same credentials and options, another address (a cluster node)."""
        other = object.__new__(RedisURL)
        for name in RedisURL.__slots__:
            setattr(other, name, getattr(self, name))
        other.host, other.port, other.path, other.db = host, port, None, 0
        other.text = f"redis://{host}:{port}"
        return other

    def __repr__(self) -> str:
        return self.text


def _set_future(reply, fut) -> None:
    if fut.done():
        return
    if isinstance(reply, Exception):
        fut.set_exception(reply)
    else:
        fut.set_result(reply)


class RespConnection(asyncio.Protocol):
    """One pipelined connection (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, on_lost=None, coalesce: bool = True):
        self.loop = loop
        self.timeout = timeout
        self.on_lost = on_lost  # on_lost(conn, exc): called once, before the pending callbacks fail
        self.coalesce = coalesce
        self.reader = hiredis.Reader()
        self.pending: collections.deque = collections.deque()
        self.wbuf: list[bytes] = []
        self.transport = None
        self.closed = False
        self.timer = None
        self.reason = ""
        self.addr = ""  # "host:port" of a cluster node

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        gets = reader.gets
        try:
            while True:
                reply = gets()
                if reply is False:
                    return
                cb, arg, _deadline = pending.popleft()
                cb(reply, arg)
        except IndexError:
            self.fail(ConnectionFailure("redis sent a reply nobody asked for"))
        except hiredis.ProtocolError as e:
            self.fail(ConnectionFailure(f"redis protocol error: {e}"))
        except Exception:  # a bug in a callback: don't lose the rest of the replies
            log.exception("redis reply callback failed")
            self.data_received(b"")

    def connection_lost(self, exc) -> None:
        self.fail(ConnectionFailure(f"connection to redis lost: {exc}" if exc else "connection to redis closed"))

    # -- requests ---------------------------------------------------------------------------------
    def request(self, packed: bytes, cb, arg) -> None:
        """Send one packed command; `cb(reply_or_failure, arg)` is called exactly once later."""
        if self.closed:
            raise ConnectionFailure(self.reason or "connection to redis closed")
        deadline = self.loop.time() + self.timeout
        self.pending.append((cb, arg, deadline))
        if self.coalesce:
            wbuf = self.wbuf
            wbuf.append(packed)
            if len(wbuf) == 1:
                self.loop.call_soon(self._flush)
        else:
            self.transport.write(packed)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._check)

    def execute(self, *args) -> asyncio.Future:
        """Send a command; the future gets the reply or raises ReplyError / ConnectionFailure."""
        fut = self.loop.create_future()
        self.request(pack(*args), _set_future, fut)
        return fut

    def _flush(self) -> None:
        wbuf = self.wbuf
        if self.closed or not wbuf:
            wbuf.clear()
            return
        data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
        wbuf.clear()
        self.transport.write(data)

    def _check(self) -> None:
        self.timer = None
        if self.closed or not self.pending:
            return
        deadline = self.pending[0][2]
        if deadline - self.loop.time() < 0.001:  # timers are millisecond-grained
            self.fail(ConnectionFailure(f"redis did not answer within {self.timeout * 1000:g} ms"))
        else:
            self.timer = self.loop.call_at(deadline, self._check)

    # -- the end ----------------------------------------------------------------------------------
    def fail(self, exc: Exception) -> None:
        """Drop the connection: `on_lost`, then every pending callback fails with `exc`."""
        if self.closed:
            return
        self.closed = True
        self.reason = str(exc)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.wbuf.clear()
        pending, self.pending = self.pending, collections.deque()
        if self.transport is not None:
            self.transport.abort()
        if self.on_lost is not None:
            try:
                self.on_lost(self, exc)
            except Exception:
                log.exception("redis on_lost callback failed")
        for cb, arg, _deadline in pending:
            try:
                cb(exc, arg)
            except Exception:
                log.exception("redis failure callback failed")

    def close(self) -> None:
        self.fail(ConnectionFailure("connection to redis closed"))


async def connect(url: RedisURL, timeout: float, connect_timeout: float, on_lost=None, setup=(),
                  coalesce: bool = True) -> RespConnection:
    """Open a connection, AUTH and SELECT as the URL says, then send `setup` (commands as arg tuples),
    all pipelined; raises ConnectionFailure / ReplyError / OSError / TimeoutError."""
    loop = asyncio.get_running_loop()
    conn = RespConnection(loop, timeout, None, coalesce)
    if url.path:
        opening = loop.create_unix_connection(lambda: conn, url.path)
    else:
        ctx = _ssl.create_default_context() if url.tls else None
        opening = loop.create_connection(lambda: conn, url.host, url.port, ssl=ctx)
    await asyncio.wait_for(opening, connect_timeout)
    commands = []
    if url.password is not None:
        commands.append(("AUTH", url.username, url.password) if url.username else ("AUTH", url.password))
    if url.db:
        commands.append(("SELECT", url.db))
    commands.extend(setup)
    if not commands:
        commands.append(("PING",))
    try:
        replies = await asyncio.gather(*(conn.execute(*c) for c in commands), return_exceptions=True)
    except BaseException:
        conn.close()
        raise
    for r in replies:
        if isinstance(r, BaseException):
            conn.close()
            raise r
    conn.on_lost = on_lost
    if conn.closed:  # lost between the last reply and now
        raise ConnectionFailure(conn.reason)
    return conn


class SyncRedis:
    """A blocking RESP connection, for the control process's threads (directory publisher, usage
    drainer): AUTH, SELECT and TLS as the URL says; `call` raises OSError on an error reply."""

    def __init__(self, url: RedisURL, timeout: float = 5.0):
        if url.path:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.settimeout(timeout)
            self.s.connect(url.path)
        else:
            self.s = socket.create_connection((url.host, url.port), timeout=timeout)
            if url.tls:
                import ssl

                self.s = ssl.create_default_context().wrap_socket(self.s, server_hostname=url.host)
        self.reader = hiredis.Reader()
        try:
            if url.password is not None:
                self.call(*(("AUTH", url.username, url.password) if url.username else ("AUTH", url.password)))
            if url.db:
                self.call("SELECT", str(url.db))
        except BaseException:
            self.s.close()
            raise

    def call(self, *args):
        self.s.sendall(pack(*args))
        while True:
            reply = self.reader.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise OSError(f"redis: {reply}")
                return reply
            data = self.s.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)

    def close(self) -> None:
        self.s.close()
