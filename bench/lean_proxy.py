"""The ceiling of a Python proxy on uvloop + httptools: the least a proxy can do per request.

One upstream keep-alive connection per client connection; the request head is parsed by
httptools (strict) and re-sent with the upstream's Host; the response is parsed by httptools and
its bytes are passed to the client unchanged. No routing, no header policy, no limits, no timeouts,
no metrics: NOT a gateway, only the yardstick `bench/compare.py --scenario lean` puts beside nginx
and fastgate, to show how much of fastgate's cost is Python's floor and how much is fastgate's.

    python bench/lean_proxy.py LISTEN_PORT UPSTREAM_PORT
"""
from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client):
        self.client = client
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport
        self.client.upstream_ready(self)

    def data_received(self, data):
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.client.response_done()

    def connection_lost(self, exc):
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, loop, up_port: int):
        self.loop = loop
        self.up_port = up_port
        self.host = b"127.0.0.1:%d" % up_port
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.upstream = None
        self.queue = []
        self.busy = False
        self.url = b""
        self.headers = []

    def connection_made(self, transport):
        self.transport = transport
        self.loop.create_task(self.loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.up_port))

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url = url

    def on_header(self, name, value):
        if name.lower() != b"host":
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self):
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (self.parser.get_method(), self.url, self.host,
                                                           b"".join(self.headers))
        self.headers = []
        self.queue.append(head)
        self.pump()

    def upstream_ready(self, up):
        self.upstream = up
        self.pump()

    def pump(self):
        if self.upstream is not None and not self.busy and self.queue:
            self.busy = True
            self.upstream.transport.write(self.queue.pop(0))

    def response_done(self):
        self.busy = False
        self.pump()

    def connection_lost(self, exc):
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def main(port: int, up_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(loop, up_port), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
