"""Slow and greedy clients: slowloris, slow bodies, clients that never read, connection floods.

Each attack is cut off by its limit (limits.header_timeout, body_timeout, send_timeout,
max_connections) and the clients that behave keep being served meanwhile. One bounded slowhttptest
run (Debian's `slowhttptest`) hits a real `fastgate run` with 2 workers.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import httpx
import pytest

from tests.hardening.test_upstream_faults import fds, gateway_tasks
from tests.harness import Upstream, gateway, reply, simple_config

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def read_all(reader, timeout: float) -> tuple[bytes, bool]:
    """(bytes, closed by the peer?) within `timeout`."""
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    return b"".join(chunks), True
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), False


async def test_slowloris_one_byte_per_100ms_gets_408_after_header_timeout(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"header_timeout": 1}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        t0 = time.monotonic()
        request = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
        answer = asyncio.ensure_future(read_all(reader, 5))
        for b in request:  # never finishes the head: each byte 100 ms apart, forever
            if answer.done():
                break
            try:
                writer.write(bytes([b]))
            except (ConnectionError, RuntimeError):
                break
            await asyncio.sleep(0.1)
        out, closed = await answer
        took = time.monotonic() - t0
        writer.close()
        assert out.startswith(b"HTTP/1.1 408 "), out
        assert closed
        assert 0.9 < took < 2.5, took  # header_timeout counts from the first byte, not the last
        assert up.requests == [] and up.raw == []


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
async def test_stalled_body_gets_408_and_nothing_complete_reaches_upstream(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"body_timeout": 0.5}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        out, closed = await read_all(reader, 3)
        writer.close()
        assert out.startswith(b"HTTP/1.1 408 ") and closed, out
        assert up.requests == []  # the upstream may have seen the head, never a complete request


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
async def test_slow_but_steady_body_is_served(loop):
    """body_timeout is between two reads: a body trickled faster than that is fine."""
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"body_timeout": 0.5}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        for b in b"trickled":
            await asyncio.sleep(0.15)
            writer.write(bytes([b]))
        out, _ = await read_all(reader, 3)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 ")
        assert [r.body for r in up.requests] == [b"trickled"]


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
async def test_client_that_never_reads_is_aborted_after_send_timeout(loop):
    big = b"z" * (16 << 20)
    async with Upstream(lambda req: reply(200, big)) as up, \
            gateway(simple_config(up) | {"limits": {"send_timeout": 1}}) as gw:
        base_fds, base_tasks = fds(), gateway_tasks()
        sock_reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.transport.pause_reading()  # a client that stops reading
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6 and gw.state.connections:
            await asyncio.sleep(0.1)
        took = time.monotonic() - t0
        # meanwhile another client is served
        r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
        w2.write(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 5)
        w2.close()
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert took < 4, f"the stuck client was kept {took:.1f}s (send_timeout 1)"
        deadline = time.monotonic() + 3
        while fds() > base_fds + 2 * sum(len(t.idle) for g in gw.state.gen.groups.values() for t in g.targets) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway_tasks() <= base_tasks + 1


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
async def test_connection_flood_past_max_connections_spares_established_clients(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"max_connections": 10}}) as gw:
        # the established clients: keep-alive, one request each
        established = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            w.write(b"GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(r.readuntil(b"ok"), 5)
            established.append((r, w))
        # the flood: 60 more connections that send nothing
        flood = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", gw.port) for _ in range(60)),
                                     return_exceptions=True)
        await asyncio.sleep(0.3)
        assert len(gw.state.connections) <= 10
        refused = 0
        for f in flood:
            if isinstance(f, BaseException):
                refused += 1
                continue
            out, closed = await read_all(f[0], 0.05)
            refused += closed
        assert refused >= 50, refused  # past the limit: closed at once
        for r, w in established:  # still served, on their open connections
            w.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(r.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200 ")
        for f in flood:
            if not isinstance(f, BaseException):
                f[1].close()
        for _, w in established:
            w.close()


async def test_half_closed_client_is_closed_once_answered(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"keepalive_timeout": 5}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        out, closed = await read_all(reader, 2)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 ")
        assert closed, "still open 2 s after answering a half-closed client"


# --- slowhttptest against a real `fastgate run` ----------------------------------------------------

def _slowhttptest() -> str:
    path = shutil.which("slowhttptest")
    if path is None:
        msg = "slowhttptest is missing: apt-get install slowhttptest"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


GW_CONFIG = """
limits: {header_timeout: 2, body_timeout: 2, max_connections: 400}
routes:
  - {name: hello, paths: [/hello], mock: {body: "hello"}}
"""


def test_slowhttptest_does_not_starve_normal_clients(tmp_path, mode="-H"):  # -H: slowloris headers
    binary = _slowhttptest()
    from tests.integration.test_supervisor import Gateway

    gw = Gateway(tmp_path, GW_CONFIG, workers=2)
    attack = None
    try:
        attack = subprocess.Popen(
            [binary, mode, "-c", "300", "-r", "150", "-i", "1", "-l", "6", "-s", "8192", "-t", "POST",
             "-u", f"http://127.0.0.1:{gw.port}/hello", "-p", "2", "-x", "20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(2.0)  # let the attack build up its connections
        latencies, failures = [], []
        with httpx.Client(timeout=3) as client:
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    r = client.get(gw.url)
                    if r.status_code != 200 or r.text != "hello":
                        failures.append(r.status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)
        assert attack.poll() is None or attack.returncode == 0
        assert failures == [], failures
        assert len(latencies) >= 10 and sorted(latencies)[len(latencies) // 2] < 0.5, latencies
    finally:
        if attack is not None and attack.poll() is None:
            attack.terminate()
            try:
                attack.wait(5)
            except subprocess.TimeoutExpired:
                attack.kill()
        gw.stop()
