"""A chaos upstream: every way an upstream can misbehave maps to the documented answer in time, leaks
nothing, and never poisons a pooled connection.

The upstream is a raw asyncio server in the test whose behaviour per connection is scripted: refuse,
reset, hang, trickle, close a keep-alive connection just as the next request arrives, garbage, bad
status lines, bodies where none may be (204/304/HEAD), bytes after a response, truncated bodies, CL+TE.

After each scenario the gateway's open file descriptors (/proc/self/fd: the gateway runs in this
process) and asyncio tasks are back to their baseline, allowing only for pooled idle connections.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.harness import config, dead_port, gateway, parse_responses

TIMEOUTS = {"connect": 0.5, "read": 0.6, "write": 0.6, "total": 2.0}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Chaos:
    """A raw upstream: `script(n, reader, writer)` runs for the n-th connection (0-based)."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.server = None
        self.port = 0
        self.tasks: set = set()
        self.writers: set = set()
        self.stopping = False

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        self.stopping = True
        for w in list(self.writers):
            w.transport.abort()  # scripts see EOF or a write error and return (cancelling them would
        await asyncio.gather(*self.tasks, return_exceptions=True)  # make asyncio's start_server log)
        await self.server.wait_closed()

    async def _conn(self, reader, writer):
        n = self.connections
        self.connections += 1
        self.writers.add(writer)
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await self.script(self, n, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):
            pass  # the gateway (or __aexit__) closed the connection: RuntimeError is uvloop's write-after-close
        finally:
            self.tasks.discard(task)
            self.writers.discard(writer)
            writer.transport.abort()

    async def wait(self, reader, writer, seconds: float = 30.0) -> None:
        """Hang: hold the connection until the peer closes it (or `seconds` pass)."""
        try:
            async with asyncio.timeout(seconds):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            pass

    async def sleep(self, writer, seconds: float) -> None:
        """Sleep, but raise ConnectionError as soon as the gateway closed the connection."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if writer.transport.is_closing() or self.stopping:
                raise ConnectionResetError
            await asyncio.sleep(min(0.02, seconds))

    async def head(self, reader) -> bytes:
        h = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(h)
        return h


def doc(port: int, **up) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                  upstreams=[{"name": "u", "targets": [{"address": f"127.0.0.1:{port}"}],
                              "timeouts": TIMEOUTS, "retries": 0, **up}])


async def request(port: int, data: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout: float = 5.0):
    """(bytes read, closed by the gateway?, seconds)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks, closed = [], False
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
                out = b"".join(chunks)
                if data.startswith(b"GET") and b"Connection: close" not in data and parse_responses(out) \
                        and b"Connection: close" not in out:
                    break  # a complete keep-alive response: done
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks), closed, time.monotonic() - t0


def idle_pooled(gw) -> int:
    return sum(len(t.idle) for g in gw.state.gen.groups.values() for t in g.targets)


def gateway_tasks(chaos=None) -> int:
    """asyncio tasks, without the chaos upstream's per-connection handlers."""
    own = chaos.tasks if chaos is not None else set()
    return len([t for t in asyncio.all_tasks() if t not in own])


async def settle(gw, base_fds: int, base_tasks: int, chaos=None, timeout: float = 3.0) -> None:
    """Wait until fds and tasks are back to the baseline (2 fds per pooled idle connection: both ends
    live in this process)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = 2 * idle_pooled(gw)
        now_fds, now_tasks = fds(), gateway_tasks(chaos)
        if now_fds <= base_fds + extra and now_tasks <= base_tasks:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leak: fds {now_fds} (baseline {base_fds} + {extra} pooled), "
                                 f"tasks {now_tasks} (baseline {base_tasks}): {asyncio.all_tasks()}")
        await asyncio.sleep(0.05)


# --- scripts ---------------------------------------------------------------------------------------

def respond(data: bytes, then: str = "keep", delay: float = 0.0):
    """Answer every request on every connection with `data`; then keep / close / hang."""
    async def script(chaos, n, reader, writer):
        while True:
            await chaos.head(reader)
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            if then == "close":
                return
            if then == "hang":
                await chaos.wait(reader, writer)
    return script


def first_then_ok(data: bytes, then: str = "close"):
    """Connection 0 answers with `data` (then closes or keeps going on OK); later connections are sane."""
    async def script(chaos, n, reader, writer):
        await chaos.head(reader)
        if n == 0:
            writer.write(data)
            await writer.drain()
            if then == "close":
                return
        else:
            writer.write(OK)
        while True:
            await chaos.head(reader)
            writer.write(OK)
            await writer.drain()
    return script


async def _reset(chaos, n, reader, writer):
    await chaos.head(reader)
    writer.transport.abort()


async def _hang(chaos, n, reader, writer):
    await chaos.head(reader)
    await chaos.wait(reader, writer)


async def _trickle_head(chaos, n, reader, writer):
    await chaos.head(reader)
    for b in OK[:-4]:  # every gap shorter than the read timeout, the whole past the total timeout
        writer.write(bytes([b]))
        await chaos.sleep(writer, 0.1)


async def _trickle_body(chaos, n, reader, writer):
    await chaos.head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nstart")
    for _ in range(100):
        await chaos.sleep(writer, 0.1)
        writer.write(b"x")


async def _stall_body(chaos, n, reader, writer):
    await chaos.head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nstart")
    await chaos.wait(reader, writer)


# (name, script, expected status or "cut" (response started, then truncated + closed), max seconds)
FAULTS = [
    ("reset_before_response", _reset, 502, 2.0),
    ("close_before_response", respond(b"", then="close"), 502, 2.0),
    ("hang", _hang, 504, 2.0),
    ("trickled_head_past_total_timeout", _trickle_head, 504, 3.5),
    ("garbage", respond(b"NOT HTTP AT ALL\r\n\r\n"), 502, 2.0),
    ("binary_garbage", respond(bytes(range(256))), 502, 2.0),
    ("status_four_digits", respond(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("status_two_digits", respond(b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("status_099", respond(b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("status_line_http2", respond(b"HTTP/2 200\r\ncontent-length: 0\r\n\r\n"), 502, 2.0),
    ("status_line_http09_body", respond(b"<html>hello</html>\r\n"), 502, 2.0),
    ("no_line_end_ever", respond(b"<html>hello</html>"), 504, 2.0),  # never a complete status line
    ("status_line_bare_lf", respond(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"), 502, 2.0),
    ("status_line_nul_reason", respond(b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("status_line_lowercase", respond(b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("header_obs_fold", respond(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("header_no_colon", respond(b"HTTP/1.1 200 OK\r\nX-A\r\nContent-Length: 0\r\n\r\n"), 502, 2.0),
    ("header_space_before_colon", respond(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"), 502, 2.0),
    ("header_ctl_value", respond(b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\nok"), 502, 2.0),
    ("cl_conflicting", respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"), 502, 2.0),
    ("cl_negative", respond(b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok"), 502, 2.0),
    ("cl_plus", respond(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"), 502, 2.0),
    ("te_chunked_not_last", respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"), 502, 2.0),
    ("te_chunked_chunked", respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"), 502, 2.0),
    ("head_too_large", respond(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n"), 502, 2.0),
    ("switching_protocols_unasked", respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"), 502, 2.0),
    ("truncated_cl_body", respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", then="close"), "cut", 2.0),
    ("truncated_chunked_body", respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nonly this", then="close"), "cut", 2.0),
    ("bad_chunk_size_mid_body", respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"), "cut", 2.0),
    ("chunk_data_overrun", respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokEXTRA\r\n0\r\n\r\n"), "cut", 2.0),
    ("stalled_body_read_timeout", _stall_body, "cut", 2.5),
    ("trickled_body_total_timeout", _trickle_body, "cut", 3.5),
]


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
@pytest.mark.parametrize("name", [f[0] for f in FAULTS])
async def test_fault_maps_to_status_in_time_and_leaks_nothing(loop, name):
    _, script, expected, limit = next(f for f in FAULTS if f[0] == name)
    async with Chaos(script) as chaos, gateway(doc(chaos.port)) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        out, closed, took = await request(gw.port)
        assert took < limit, f"{took:.2f}s"
        if expected == "cut":
            assert out.startswith(b"HTTP/1.1 200 "), out[:200]
            assert closed, "a broken response must end with a closed connection"
            assert parse_responses(out) == [], f"a truncated body was presented as complete: {out!r}"
        else:
            assert out.startswith(b"HTTP/1.1 %d " % expected), out[:300]
            reason = {502: (b"upstream_", b"bad_gateway"), 504: (b"upstream_timeout",)}[expected]
            assert any(r in out for r in reason), out
        await settle(gw, base_fds, base_tasks, chaos)


async def test_connection_refused_is_502_fast(loop):
    port = dead_port()  # refuses connections (a mere free port could become the gateway's own)
    async with gateway(doc(port)) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        out, _, took = await request(gw.port)
        assert out.startswith(b"HTTP/1.1 502 ") and b"upstream_connect_failed" in out
        assert took < 1.0
        await settle(gw, base_fds, base_tasks)


# --- the pool is never poisoned --------------------------------------------------------------------

POISON = [
    # (name, first response, what the client must get first: (status, body))
    ("body_after_204", b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\nEVIL", (204, b"")),
    ("body_after_304", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\nEVIL", (304, b"")),
    ("extra_bytes_after_cl_body", OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", (200, b"ok")),
    ("extra_bytes_after_chunked_body",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
     (200, b"ok")),
    ("cl_and_te_response_splitting",  # haproxy http_transfer_encoding.vtc, server s1 #4
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
     (200, b"")),
    ("http10_chunked_response",  # haproxy http_transfer_encoding.vtc, server s1 #3
     b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
     (200, b"")),
    ("interim_then_final", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, (200, b"ok")),
]


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
@pytest.mark.parametrize("name", [p[0] for p in POISON])
async def test_broken_response_never_poisons_the_pool(loop, name):
    _, first, (status, body) = next(p for p in POISON if p[0] == name)
    async with Chaos(first_then_ok(first, then="keep")) as chaos, gateway(doc(chaos.port)) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        out, _, _ = await request(gw.port, b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = parse_responses(out)
        assert resp and resp[-1][0] == status and resp[-1][2] == body, out
        assert b"EVIL" not in out
        for i in range(3):  # later requests: their own answers, never the stray bytes
            out, _, _ = await request(gw.port, b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (i + 2))
            assert parse_responses(out)[-1][2] == b"ok", out
        await settle(gw, base_fds, base_tasks, chaos)


@pytest.mark.parametrize("method", [b"HEAD", b"GET"])
async def test_body_on_head_or_late_stray_bytes_never_reach_the_next_client(loop, method):
    """The upstream answers, then writes a whole second response 50 ms later, while the connection sits
    in the pool: it must be closed, and the next request served on a fresh connection."""
    async def script(chaos, n, reader, writer):
        while True:
            head = await chaos.head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"" if head.startswith(b"HEAD") else b"ok"))
            await writer.drain()
            await chaos.sleep(writer, 0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")

    async with Chaos(script) as chaos, gateway(doc(chaos.port)) as gw:
        out, _, _ = await request(gw.port, method + b" / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and b"EVIL" not in out
        await asyncio.sleep(0.2)
        out, _, _ = await request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"EVIL" not in out and parse_responses(out)[0][2] == b"ok"
        assert chaos.connections == 2


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_keepalive_closed_by_upstream_as_the_next_request_arrives(loop, method):
    """The worst moment: the upstream closes an idle pooled connection right when the gateway reuses it
    (it reads the request, then closes without a byte). The request is retried on a fresh connection,
    POST included: nothing was answered, so nothing was processed (README: upstreams[].retries)."""
    async def script(chaos, n, reader, writer):
        await chaos.head(reader)
        writer.write(OK)
        await writer.drain()
        if n == 0:
            await chaos.head(reader)  # the second request on the pooled connection...
            return  # ...is answered by a FIN
        while True:
            await chaos.head(reader)
            writer.write(OK)

    async with Chaos(script) as chaos, gateway(doc(chaos.port, retries=1)) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        for i in range(2):
            body = b"Content-Length: 1\r\n\r\nx" if method == b"POST" else b"\r\n"
            out, _, _ = await request(gw.port, method + b" /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % i + body)
            assert parse_responses(out)[0][:1] == (200,), out
        assert chaos.connections == 2
        await settle(gw, base_fds, base_tasks, chaos)


async def test_many_faults_in_a_row_leave_no_residue(loop):
    """Alternate resets, hangs, garbage and good answers on one gateway; then everything is back."""
    kinds = ["ok", "reset", "garbage", "ok", "hang", "truncated", "ok"]

    async def script(chaos, n, reader, writer):
        while True:
            await chaos.head(reader)
            kind = kinds[(len(chaos.heads) - 1) % len(kinds)]
            if kind == "ok":
                writer.write(OK)
            elif kind == "reset":
                writer.transport.abort()
                return
            elif kind == "garbage":
                writer.write(b"\x00\x01garbage\r\n\r\n")
            elif kind == "hang":
                await chaos.wait(reader, writer)
                return
            elif kind == "truncated":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
                return
            await writer.drain()

    async with Chaos(script) as chaos, gateway(doc(chaos.port, health={"passive": {"max_failures": 1000}})) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        statuses = []
        for _ in range(len(kinds) * 2):
            out, _, _ = await request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            statuses.append(int(out[9:12]) if out else 0)
        assert statuses.count(200) >= 6 and set(statuses) <= {200, 502, 504}, statuses
        await settle(gw, base_fds, base_tasks, chaos)
