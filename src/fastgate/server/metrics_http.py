"""The Prometheus endpoint: `GET /metrics` on a listener of kind `metrics`, served by every worker.

Deliberately small: one request per connection, a head of at most 8 KiB, then the answer and
close. Scrapers send exactly that; anything else gets 400/404/405.
"""
from __future__ import annotations

import asyncio

MAX_HEAD = 8192
TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsProtocol(asyncio.Protocol):
    __slots__ = ("render", "path", "transport", "buf")

    def __init__(self, render, path: bytes = b"/metrics"):
        self.render = render  # () -> bytes
        self.path = path
        self.transport = None
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.transport is None or self.transport.is_closing():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._answer(431, b"head too large\n")
            return
        line = self.buf[:self.buf.find(b"\r\n")]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return self._answer(400, b"bad request\n")
        method, target = parts[0], parts[1].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return self._answer(405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        if target != self.path:
            return self._answer(404, b"not found: try " + self.path + b"\n")
        try:
            body = self.render()
        except Exception as exc:  # noqa: BLE001 - a scrape must get an answer, not a hang
            return self._answer(500, f"metrics failed: {exc!r}\n".encode())
        self._answer(200, body, TEXT, head_only=method == b"HEAD")

    def _answer(self, status: int, body: bytes, ctype: bytes = b"text/plain", extra: bytes = b"",
                head_only: bool = False) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  431: b"Request Header Fields Too Large", 500: b"Internal Server Error"}[status]
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                % (status, reason, ctype, len(body), extra))
        self.transport.write(head if head_only else head + body)
        self.transport.close()
