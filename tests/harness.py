"""Real servers and clients for integration tests: an in-process gateway worker on a real socket,
programmable upstream servers, and raw-socket helpers."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import httptools

from fastgate.config import load_config
from fastgate.server.worker import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEAD: list[socket.socket] = []


def dead_port() -> int:
    """A port that refuses connections and stays so: bound, never listening, held for the whole run.
    (A free_port() is free only until someone binds it: a gateway started next may get the very
    same port and then proxy to itself.)"""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _DEAD.append(s)
    return s.getsockname()[1]


class Request:
    __slots__ = ("method", "url", "headers", "body", "version")

    def __init__(self):
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.version = ""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.decode().lower() == name.lower():
                return v.decode("latin-1")
        return None

    def all(self, name: str) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k.decode().lower() == name.lower()]


def reply(status: int = 200, body: bytes = b"ok", headers: dict | None = None, close: bool = False) -> bytes:
    hs = {"Content-Type": "text/plain", **(headers or {})}
    if "Content-Length" not in hs and "Transfer-Encoding" not in hs:
        hs["Content-Length"] = str(len(body))
    if close:
        hs["Connection"] = "close"
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
    return head.encode() + body


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, server: Upstream):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.req = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections += 1
        self.server.open.add(self)

    def connection_lost(self, exc):
        self.server.open.discard(self)

    def data_received(self, data):
        self.server.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self):
        self.req = Request()

    def on_url(self, url):
        self.req.url += url

    def on_header(self, name, value):
        self.req.headers.append((name, value))

    def on_body(self, body):
        self.req.body += body

    def on_message_complete(self):
        req = self.req
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        self.server.requests.append(req)
        result = self.server.handler(req)
        if asyncio.iscoroutine(result):
            asyncio.ensure_future(self._later(result))
        else:
            self._send(result)

    async def _later(self, coro):
        self._send(await coro)

    def _send(self, result):
        if result is None:  # the handler wants the connection dropped
            self.transport.abort()
            return
        if isinstance(result, tuple):  # (bytes, "close")
            data, action = result
            self.transport.write(data)
            if action == "close":
                self.transport.close()
            return
        self.transport.write(result)


class Upstream:
    """An HTTP/1.1 server on a free loopback port whose handler returns the raw response bytes."""

    def __init__(self, handler=None):
        self.handler = handler or (lambda req: reply(200, b"ok"))
        self.requests: list[Request] = []
        self.raw: list[bytes] = []
        self.connections = 0
        self.open: set = set()
        self.server = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamProtocol(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        for p in list(self.open):
            p.transport.abort()
        self.server.close()
        await self.server.wait_closed()


def config(routes=None, upstreams=None, **extra) -> dict:
    doc = {"listeners": [{"kind": "proxy", "address": "127.0.0.1", "port": 1}],
           "routes": routes or [], "upstreams": upstreams or []}
    doc.update(extra)
    return doc


def simple_config(upstream: Upstream | list, path: str = "/*", **upstream_opts) -> dict:
    ups = upstream if isinstance(upstream, list) else [upstream]
    return config(routes=[{"name": "r", "paths": [path], "upstream": "u"}],
                  upstreams=[{"name": "u", "targets": [{"address": u.address} for u in ups], **upstream_opts}])


@contextlib.asynccontextmanager
async def gateway(doc: dict):
    """Run one worker of the gateway in this loop on a free port; yields the Worker (`.port`)."""
    cfg = load_config(doc)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    listener = next(li for li in cfg.listeners if li.kind == "proxy")
    worker = Worker(cfg, [(sock, listener)], install_signals=False)
    worker.port = sock.getsockname()[1]
    task = asyncio.ensure_future(worker.serve())
    while not worker.servers:
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    try:
        yield worker
    finally:
        worker.drain()
        worker._abort_all()
        await asyncio.wait_for(task, 10)
        for server in worker.servers:
            await server.wait_closed()


async def raw(port: int, data: bytes, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send bytes on a fresh connection; read until the peer closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not until_close and b"\r\n\r\n" in b"".join(chunks):
                    break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream into (status, headers, body) responses, using httptools."""
    out = []

    class P:
        def __init__(self):
            self.h, self.b = {}, b""

        def on_header(self, n, v):
            self.h[n.decode().lower()] = v.decode("latin-1")

        def on_body(self, b):
            self.b += b

        def on_message_complete(self):
            out.append((parser.get_status_code(), self.h, self.b))
            self.h, self.b = {}, b""

    p = P()
    parser = httptools.HttpResponseParser(p)
    with contextlib.suppress(httptools.HttpParserError):
        parser.feed_data(data)
    return out


ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")


def screenshot(page, name: str) -> str:
    """Keep a full-page screenshot of a browser test as an artefact (tests/artifacts/NAME.png, or
    $FASTGATE_ARTIFACTS); returns the path, after checking the file is a real, non-blank PNG."""
    out = os.environ.get("FASTGATE_ARTIFACTS") or ARTIFACTS
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.png")
    data = page.screenshot(path=path, full_page=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"screenshot {name} looks empty"
    return path


def wait_for(pred, timeout: float = 15.0, what: str = "condition", interval: float = 0.1):
    """Poll `pred` (an HTTP error counts as not yet) until it returns something true, which is
    returned; past `timeout` seconds fail, naming `what` and the last answer."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = result = pred()
        except httpx.HTTPError as exc:
            last, result = exc, None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
        time.sleep(interval)
