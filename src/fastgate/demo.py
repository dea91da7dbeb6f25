"""A small upstream for trying fastgate: echoes the request it received as JSON.

GET /health → {"ok": true}; anything else → method, path, query, headers and body length.
Plain asyncio + httptools; not part of the gateway's data plane.
"""
from __future__ import annotations

import asyncio

import httptools
import orjson


class EchoProtocol(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.headers = []
        self.body = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self):
        self.url, self.headers, self.body = b"", [], 0

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body):
        self.body += len(body)

    def on_message_complete(self):
        path, _, query = self.url.partition(b"?")
        if path == b"/health":
            body = b'{"ok":true}'
        else:
            body = orjson.dumps({"method": self.parser.get_method().decode(), "path": path.decode("latin-1"),
                                 "query": query.decode("latin-1"), "headers": dict(self.headers),
                                 "body_bytes": self.body})
        keep = self.parser.should_keep_alive()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(body), b"" if keep else b"Connection: close\r\n", body))
        if not keep:
            self.transport.close()


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port)
    print(f"demo upstream on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def run_demo_upstream(host: str = "127.0.0.1", port: int = 9001) -> None:
    try:
        asyncio.run(_serve(host, port))
    except KeyboardInterrupt:
        pass
