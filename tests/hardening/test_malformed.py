"""Malformed requests get the right 4xx, the connection is closed, and nothing reaches the upstream."""
from __future__ import annotations

import asyncio

import pytest

from tests.harness import Upstream, gateway, raw, simple_config

H = b"Host: x\r\n"

BAD_400 = {
    "bad_request_line": b"GET\r\n\r\n",
    "bad_version": b"GET / HTTP/1.2.3\r\n" + H + b"\r\n",
    "lowercase_version": b"GET / http/1.1\r\n" + H + b"\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "content_length_and_chunked": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate_content_length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "differing_content_length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "content_length_not_digits": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5x\r\n\r\nhello",
    "content_length_plus": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "obs_fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "bare_lf_line": b"GET / HTTP/1.1\n" + H + b"\r\n",
    "bare_lf_header": b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    "unknown_transfer_coding": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
    "chunked_not_last": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n",
    "no_colon": b"GET / HTTP/1.1\r\n" + H + b"X-A\r\n\r\n",
    "nul_in_header": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "missing_host_http11": b"GET / HTTP/1.1\r\n\r\n",
    "duplicate_host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad_host": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "dot_segment_above_root": b"GET /../etc/passwd HTTP/1.1\r\n" + H + b"\r\n",
    "bad_percent_encoding": b"GET /a%zz HTTP/1.1\r\n" + H + b"\r\n",
    "h2c_upgrade": b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    "authority_form": b"GET example.com:80 HTTP/1.1\r\n" + H + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_400))
async def test_malformed_request_is_400_and_not_forwarded(loop, name):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        out = await raw(gw.port, BAD_400[name])
        assert out.startswith(b"HTTP/1.1 400 "), out[:100]
        assert b'"error":' in out
        assert up.requests == [] and up.connections == 0


@pytest.mark.parametrize("payload,status", [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n", 417),
])
async def test_limits_and_refusals(loop, payload, status):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        out = await raw(gw.port, payload)
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:100]
        assert up.requests == []


async def test_chunked_body_over_limit_is_413(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"max_body_bytes": 1000}}) as gw:
        body = b"".join(b"100\r\n" + b"z" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
        out = await raw(gw.port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        assert out.startswith(b"HTTP/1.1 413 ")
        assert all(len(r.body) <= 1000 for r in up.requests)  # never a complete oversized body


async def test_pipelined_request_after_a_bad_one_is_not_served(loop):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        out = await raw(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
                                 b"GET /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                                 b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        assert b"HTTP/1.1 400 " in out
        assert [r.url for r in up.requests] == [b"/ok"]


async def test_slowloris_header_timeout(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"header_timeout": 0.3}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        response = asyncio.ensure_future(reader.read())
        for _ in range(20):  # keep trickling header bytes: the deadline counts from the first byte
            await asyncio.sleep(0.1)
            if response.done():
                break
            writer.write(b"X-a: b\r\n")
        out = await asyncio.wait_for(response, 5)
        assert out.startswith(b"HTTP/1.1 408 ")
        writer.close()
        assert up.requests == []


async def test_idle_keepalive_connection_is_closed(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"keepalive_timeout": 0.2}}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
        writer.close()


async def test_requests_per_connection_limit(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"keepalive_requests": 3}}) as gw:
        data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 5
        out = await raw(gw.port, data)
        assert out.count(b"HTTP/1.1 200") == 3
        assert out.count(b"Connection: close") == 1


async def test_local_answers_to_head_carry_no_body(loop):
    """A body after a HEAD answer would be read as the next response on a kept-alive connection."""
    from tests.harness import config, gateway, parse_responses, raw

    doc = config(routes=[{"name": "m", "paths": ["/m"], "mock": {"body": "hello"},
                          "policies": [{"type": "rate-limit", "rate": 1, "per": 60}]}])
    async with gateway(doc) as gw:
        resp = await raw(gw.port, b"HEAD /nope HTTP/1.1\r\nHost: a\r\n\r\nHEAD /m HTTP/1.1\r\nHost: a\r\n\r\n"
                                  b"HEAD /m HTTP/1.1\r\nHost: a\r\n\r\nGET /m HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    heads = resp.split(b"\r\n\r\n")
    # three heads with no body between them, then the GET's 429 with its JSON body
    assert [h[:12] for h in heads[:4]] == [b"HTTP/1.1 404", b"HTTP/1.1 200", b"HTTP/1.1 429", b"HTTP/1.1 429"]
    assert heads[4].startswith(b'{"error":"rate_limited"')
    assert [r[0] for r in parse_responses(resp[resp.index(b"HTTP/1.1 429", 40) + 0:])][-1:] == [429]
