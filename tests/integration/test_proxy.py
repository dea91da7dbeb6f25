"""The data plane end to end over real sockets, on uvloop and on stock asyncio."""
from __future__ import annotations

import asyncio
import re

import httpx
import orjson

from tests.harness import Upstream, config, gateway, parse_responses, raw, reply, simple_config


async def test_get_is_proxied_with_forwarding_headers(loop):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/a/b?x=1", headers={"X-Forwarded-For": "10.0.0.1"})
        assert r.status_code == 200 and r.text == "ok"
        rid = r.headers["x-request-id"]
        req = up.requests[0]
        assert req.url == b"/a/b?x=1"
        assert req.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
        assert req.header("x-forwarded-proto") == "http"
        assert req.header("x-forwarded-host") == f"127.0.0.1:{gw.port}"
        assert req.header("via") == "1.1 fastgate"
        assert req.header("x-request-id") == rid
        assert req.header("host") == up.address  # preserve_host is off by default


async def test_valid_client_request_id_is_kept_and_invalid_replaced(loop):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        async with httpx.AsyncClient() as c:
            r1 = await c.get(f"http://127.0.0.1:{gw.port}/", headers={"X-Request-ID": "abc-123"})
            r2 = await c.get(f"http://127.0.0.1:{gw.port}/", headers={"X-Request-ID": "bad id\t!"})
        assert r1.headers["x-request-id"] == "abc-123"
        assert up.requests[1].header("x-request-id") not in ("bad id\t!", None)
        assert r2.headers["x-request-id"] == up.requests[1].header("x-request-id")


async def test_generated_request_ids_are_the_workers_prefix_and_a_counter(loop):
    async with Upstream(lambda r: reply(200, b"x" * 1234)) as up, gateway(simple_config(up)) as gw:
        async with httpx.AsyncClient() as c:
            rs = [await c.get(f"http://127.0.0.1:{gw.port}/") for _ in range(3)]
    ids = [r.headers["x-request-id"] for r in rs]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len({i[:16] for i in ids}) == 1  # one worker, one prefix
    assert [int(i[16:], 16) for i in ids] == [int(ids[0][16:], 16) + k for k in range(3)]
    assert all(r.headers["content-length"] == "1234" and len(r.content) == 1234 for r in rs)


async def test_keep_alive_reuses_one_upstream_connection(loop):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        async with httpx.AsyncClient() as c:
            for i in range(20):
                r = await c.get(f"http://127.0.0.1:{gw.port}/n/{i}")
                assert r.status_code == 200
        assert len(up.requests) == 20
        assert up.connections == 1


async def test_pipelined_requests_are_answered_in_order(loop):
    async def handler(req):
        if req.url == b"/slow":
            await asyncio.sleep(0.2)
        return reply(200, req.url)

    async with Upstream(handler) as up, gateway(simple_config(up)) as gw:
        data = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"/slow", b"/fast", b"/third"))
        data += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = parse_responses(await raw(gw.port, data))
        assert [b for _s, _h, b in out] == [b"/slow", b"/fast", b"/third", b"/last"]


async def test_request_bodies_content_length_and_chunked(loop):
    async with Upstream(lambda req: reply(200, b"%d:%s" % (len(req.body), req.header("transfer-encoding").encode()
                                                            if req.header("transfer-encoding") else b"cl"))) as up:
        async with gateway(simple_config(up, ) | {"limits": {"max_body_bytes": 8 << 20}}) as gw:
            async with httpx.AsyncClient() as c:
                body = b"x" * (3 << 20)
                r = await c.post(f"http://127.0.0.1:{gw.port}/up", content=body)
                assert r.text == f"{len(body)}:cl"

                async def gen():
                    for _ in range(10):
                        yield b"y" * 1000

                r = await c.post(f"http://127.0.0.1:{gw.port}/up", content=gen())
                assert r.text == "10000:chunked"
        assert up.requests[0].body == body


async def test_expect_100_continue(loop):
    async with Upstream(lambda req: reply(200, req.body)) as up, gateway(simple_config(up)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert line.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        assert up.requests[0].header("expect") is None


async def test_expect_continue_refused_early_when_body_too_large(loop):
    async with Upstream() as up, gateway(simple_config(up) | {"limits": {"max_body_bytes": 100}}) as gw:
        out = await raw(gw.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413")
        assert b"100 Continue" not in out
        assert up.requests == []


async def test_mock_route_and_404(loop):
    doc = config(routes=[{"name": "m", "paths": ["/hello"], "mock": {"json": {"hi": 1}, "headers": {"X-A": "b"}}}])
    async with gateway(doc) as gw:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/hello")
            assert r.status_code == 200 and r.json() == {"hi": 1} and r.headers["x-a"] == "b"
            assert r.headers["content-type"] == "application/json"
            r = await c.get(f"http://127.0.0.1:{gw.port}/nope")
            assert r.status_code == 404
            body = r.json()
            assert body["error"] == "no_route" and body["request_id"] == r.headers["x-request-id"]


async def test_path_params_rewrite_and_strip_path(loop):
    async with Upstream(lambda req: reply(200, req.url)) as up:
        doc = config(
            routes=[{"name": "u", "paths": ["/users/{id}/files/{rest*}"], "upstream": "u",
                     "path_rewrite": "/v2/{id}/{rest}"},
                    {"name": "s", "paths": ["/api/*"], "upstream": "u", "strip_path": True},
                    {"name": "e", "paths": ["/exact"], "upstream": "u", "strip_path": True}],
            upstreams=[{"name": "u", "targets": [{"address": up.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}"
            assert (await c.get(base + "/users/42/files/a/b.txt?q=1")).text == "/v2/42/a/b.txt?q=1"
            assert (await c.get(base + "/api/things/1")).text == "/things/1"
            assert (await c.get(base + "/exact?z")).text == "/?z"
            assert (await c.get(base + "/api")).status_code == 404


async def test_hosts_methods_and_priority(loop):
    async with Upstream(lambda req: reply(200, b"up")) as up:
        doc = config(
            routes=[{"name": "a", "paths": ["/x"], "hosts": ["api.example.com"], "mock": {"body": "exact-host"}},
                    {"name": "b", "paths": ["/x"], "hosts": ["*.example.com"], "mock": {"body": "wild-host"}},
                    {"name": "c", "paths": ["/x"], "methods": ["POST"], "mock": {"body": "post"}},
                    {"name": "d", "paths": ["/{any}"], "priority": 5, "methods": ["DELETE"], "mock": {"body": "prio"}},
                    {"name": "e", "paths": ["/x"], "upstream": "u"}],
            upstreams=[{"name": "u", "targets": [{"address": up.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}/x"
            assert (await c.get(base, headers={"Host": "API.example.com:8000"})).text == "exact-host"
            assert (await c.get(base, headers={"Host": "a.b.example.com"})).text == "wild-host"
            assert (await c.get(base, headers={"Host": "example.com"})).text == "up"
            assert (await c.post(base)).text == "post"
            assert (await c.delete(base)).text == "prio"


async def test_http10_client_and_chunked_upstream(loop):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    async with Upstream(lambda req: chunked) as up, gateway(simple_config(up)) as gw:
        out = await raw(gw.port, b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"hello world"  # de-chunked, delimited by close
        out = await raw(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = parse_responses(out)
        assert resp[0][1]["transfer-encoding"] == "chunked" and resp[0][2] == b"hello world"


async def test_http10_keep_alive_when_asked(loop):
    async with Upstream() as up, gateway(simple_config(up)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Connection: keep-alive" in head
            assert await reader.readexactly(2) == b"ok"
        writer.close()


async def test_head_request_keeps_content_length_without_body(loop):
    async with Upstream(lambda req: b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n") as up:
        async with gateway(simple_config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Content-Length: 1234" in head
            head2 = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head2.startswith(b"HTTP/1.1 200")  # no body bytes in between
            writer.close()


async def test_hop_by_hop_headers_removed_both_ways(loop):
    resp = (b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 2\r\n\r\nok")
    async with Upstream(lambda req: resp) as up, gateway(simple_config(up)) as gw:
        out = await raw(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\n"
                                 b"X-Private: p\r\nTE: trailers\r\nKeep-Alive: 300\r\n\r\n")
        status, headers, body = parse_responses(out)[0]
        assert status == 200 and body == b"ok"
        assert "x-secret" not in headers and "keep-alive" not in headers
        req = up.requests[0]
        assert req.header("x-private") is None and req.header("te") is None and req.header("keep-alive") is None


async def test_response_header_policy(loop):
    async with Upstream(lambda req: reply(200, b"ok", {"Server": "secret/1.0"})) as up:
        doc = simple_config(up)
        doc["routes"][0]["policies"] = [{"type": "response-headers", "add": {"X-Added": "yes"}, "remove": ["Server"]},
                                        {"type": "request-headers", "add": {"X-Up": "1"}, "remove": ["X-Drop"]}]
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/", headers={"X-Drop": "d"})
            assert r.headers["x-added"] == "yes" and "server" not in r.headers
            assert up.requests[0].header("x-up") == "1" and up.requests[0].header("x-drop") is None


async def test_api_lifecycle_states(loop):
    doc = config(apis=[{"name": "pets", "base_path": "/pets", "versions": [
        {"version": "v1", "state": "deprecated", "sunset": "Wed, 01 Jan 2031 00:00:00 GMT", "successor": "v2",
         "routes": [{"name": "p1", "paths": ["/v1/*"], "mock": {"body": "one"}}]},
        {"version": "v0", "state": "retired", "successor": "v2",
         "routes": [{"name": "p0", "paths": ["/v0/*"], "mock": {"body": "zero"}}]},
        {"version": "v3", "state": "draft", "routes": [{"name": "p3", "paths": ["/v3/*"], "mock": {"body": "3"}}]},
        {"version": "v2", "routes": [{"name": "p2", "paths": ["/v2/*"], "mock": {"body": "two"}}]}]}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}/pets"
        r = await c.get(base + "/v1/a")
        assert r.text == "one" and r.headers["deprecation"] == "true"
        assert r.headers["sunset"].startswith("Wed, 01 Jan 2031") and 'rel="successor-version"' in r.headers["link"]
        r = await c.get(base + "/v0/a")
        assert r.status_code == 410 and r.json()["successor"] == "/pets/v2"
        assert (await c.get(base + "/v3/a")).status_code == 404
        r = await c.get(base + "/v2/a")
        assert r.text == "two" and "deprecation" not in r.headers


async def test_json_error_shape(loop):
    doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                 upstreams=[{"name": "u", "targets": [{"address": "127.0.0.1:1"}], "retries": 0}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/")
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/json"
        body = orjson.loads(r.content)
        assert body == {"error": "upstream_connect_failed", "request_id": r.headers["x-request-id"]}
