"""Access policies through real sockets: ip-restriction, real-ip, cors, request-size, user-agent and
request-termination against an in-process gateway and a real upstream."""
from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest

from fastgate.config import load_config
from fastgate.errors import ConfigError
from fastgate.server.worker import Worker
from tests.harness import Upstream, config, gateway, parse_responses, raw


class SeenClient:
    """A test plugin (phase limits): tells the upstream what `ex.client_ip` is after the access phase."""

    phase = "limits"

    def __init__(self, config, ctx):
        pass

    def request(self, ex):
        ex.add_upstream_header(b"X-Seen-Client", ex.client_ip)


SEEN = {"type": "plugin", "module": "tests.integration.test_access:SeenClient"}


def doc(up: Upstream, policies: list, route_policies: list | None = None, **extra) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": route_policies or []}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}], policies=policies, **extra)


def issues(d: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        load_config(d)
    return {i.path: i.message for i in ei.value.issues}


# --- ip-restriction ---------------------------------------------------------------------------------
async def test_ip_restriction_on_the_peer(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        async with gateway(doc(up, [{"type": "ip-restriction", "deny": ["127.0.0.1"], "message": "go away"}])) as gw:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x")
            assert r.status_code == 403 and r.json()["error"] == "ip_forbidden" and r.json()["message"] == "go away"
        async with gateway(doc(up, [{"type": "ip-restriction", "allow": ["10.0.0.0/8", "2001:db8::/32"]}])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 403
        assert up.requests == []  # refused before the upstream
        allow = {"type": "ip-restriction", "allow": ["127.0.0.0/8"], "deny": ["127.0.0.2/32"], "status": 404}
        async with gateway(doc(up, [allow])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 200
        # deny wins over allow
        both = {"type": "ip-restriction", "allow": ["0.0.0.0/0"], "deny": ["127.0.0.0/24"], "status": 451}
        async with gateway(doc(up, [both])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 451
        assert len(up.requests) == 1


async def test_real_ip_sets_the_client_for_ip_restriction_and_later_policies(loop):
    real_ip = {"type": "real-ip", "trusted": ["127.0.0.1", "10.0.0.0/8"]}
    deny = {"type": "ip-restriction", "deny": ["203.0.113.0/24", "2001:db8::/32"]}
    async with Upstream() as up, gateway(doc(up, [real_ip, deny, SEEN])) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"

        async def seen(xff: str | None, **headers) -> str | int:
            h = dict(headers)
            if xff is not None:
                h["X-Forwarded-For"] = xff
            r = await c.get(url, headers=h)
            return up.requests[-1].header("x-seen-client") if r.status_code == 200 else r.status_code

        assert await seen("198.51.100.7") == "198.51.100.7"
        # recursive: the rightmost address that is not a trusted proxy
        assert await seen("192.0.2.1, 198.51.100.7, 10.1.2.3") == "198.51.100.7"
        assert await seen("203.0.113.5, 10.0.0.9") == 403  # the real client is denied
        assert await seen("[2001:db8::5]:4711, 10.0.0.9") == 403
        assert await seen("198.51.100.7:51000") == "198.51.100.7"  # a port is dropped
        assert await seen("::ffff:198.51.100.8") == "198.51.100.8"  # IPv4-mapped is the IPv4 address
        assert await seen("2001:DB9:0::1") == "2001:db9::1"  # canonical text
        # all trusted: the leftmost
        assert await seen("10.0.0.1, 10.0.0.2") == "10.0.0.1"
        # malformed anywhere on the way from the right: the peer is kept
        assert await seen("198.51.100.7, garbage") == "127.0.0.1"
        assert await seen("198.51.100.7,") == "127.0.0.1"
        assert await seen("300.1.1.1") == "127.0.0.1"
        assert await seen(None) == "127.0.0.1"
        # a forged leftmost entry does not help a denied client behind a trusted proxy
        assert await seen("198.51.100.7, 203.0.113.5") == 403
        # several header fields are one list, in order
        r = await raw(gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.1\r\n"
                               b"X-Forwarded-For: 198.51.100.2, 10.0.0.1\r\nConnection: close\r\n\r\n")
        assert parse_responses(r)[0][0] == 200 and up.requests[-1].header("x-seen-client") == "198.51.100.2"


async def test_real_ip_not_recursive_forwarded_header_and_untrusted_peer(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        rip = {"type": "real-ip", "trusted": ["127.0.0.0/8", "10.0.0.0/8"], "recursive": False}
        async with gateway(doc(up, [rip, SEEN])) as gw:
            await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"X-Forwarded-For": "198.51.100.7, 10.0.0.1"})
            assert up.requests[-1].header("x-seen-client") == "10.0.0.1"  # the rightmost, trusted or not
        fwd = {"type": "real-ip", "trusted": ["127.0.0.1/32"], "header": "Forwarded"}
        async with gateway(doc(up, [fwd, SEEN])) as gw:
            await c.get(f"http://127.0.0.1:{gw.port}/x",
                        headers={"Forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https'})
            assert up.requests[-1].header("x-seen-client") == "2001:db8:cafe::17"
            await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"Forwarded": "for=_hidden"})
            assert up.requests[-1].header("x-seen-client") == "127.0.0.1"
        untrusted = {"type": "real-ip", "trusted": ["10.0.0.0/8"]}
        async with gateway(doc(up, [untrusted, SEEN])) as gw:
            await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"X-Forwarded-For": "198.51.100.7"})
            assert up.requests[-1].header("x-seen-client") == "127.0.0.1"  # the peer is not a trusted proxy


async def test_real_ip_declared_after_ip_restriction_still_applies_first(loop):
    deny = {"type": "ip-restriction", "deny": ["203.0.113.0/24"]}
    rip = {"type": "real-ip", "trusted": ["127.0.0.1"]}
    # global ip-restriction, route-level real-ip: the chain runs ip-restriction first
    async with Upstream() as up, gateway(doc(up, [deny], [rip, SEEN])) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 403
        r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"X-Forwarded-For": "198.51.100.1"})
        assert r.status_code == 200 and up.requests[-1].header("x-seen-client") == "198.51.100.1"


async def test_real_ip_keys_the_rate_limiter(loop):
    policies = [{"type": "real-ip", "trusted": ["127.0.0.1"]}, {"type": "rate-limit", "rate": 2, "per": 3600}]
    async with Upstream() as up, gateway(doc(up, policies)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"
        a = [(await c.get(url, headers={"X-Forwarded-For": "198.51.100.1"})).status_code for _ in range(3)]
        b = [(await c.get(url, headers={"X-Forwarded-For": "198.51.100.2"})).status_code for _ in range(3)]
        assert a == b == [200, 200, 429]


@contextlib.asynccontextmanager
async def dual_stack_gateway(d: dict):
    """A gateway listening on [::] with IPV6_V6ONLY off: IPv4 clients arrive as ::ffff:a.b.c.d."""
    cfg = load_config(d)
    try:
        sock = socket.socket(socket.AF_INET6)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError as exc:
        pytest.skip(f"no dual-stack IPv6 here: {exc}")
    sock.listen(64)
    sock.setblocking(False)
    worker = Worker(cfg, [(sock, cfg.listeners[0])], install_signals=False)
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


async def test_ipv4_mapped_peer_matches_ipv4_rules(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        async with dual_stack_gateway(doc(up, [{"type": "ip-restriction", "deny": ["127.0.0.1/32"]}])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 403
        mapped_rule = {"type": "ip-restriction", "allow": ["::ffff:127.0.0.0/104"]}
        async with dual_stack_gateway(doc(up, [mapped_rule, SEEN])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 200
            assert up.requests[-1].header("x-seen-client") == "::ffff:127.0.0.1"  # the peer as reported
        # real-ip trusting 127.0.0.1 trusts the mapped peer too
        rip = {"type": "real-ip", "trusted": ["127.0.0.1"]}
        async with dual_stack_gateway(doc(up, [rip, SEEN])) as gw:
            await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"X-Forwarded-For": "198.51.100.3"})
            assert up.requests[-1].header("x-seen-client") == "198.51.100.3"


def test_ip_config_errors_name_the_entry():
    d = config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
        {"type": "ip-restriction", "allow": ["10.0.0.0/8", "10.0.0.1/8", "1.2.3.4/33"], "deny": ["nope"]},
        {"type": "ip-restriction"},
        {"type": "real-ip", "trusted": ["fe80::/10", "fe80::1/10"]},
        {"type": "real-ip", "trusted": []}]}])
    got = issues(d)
    base = "$.routes[0].policies"
    assert f"{base}[0].allow[1]" in got and "host bits" in got[f"{base}[0].allow[1]"]
    assert f"{base}[0].allow[2]" in got and f"{base}[0].deny[0]" in got and f"{base}[0].allow[0]" not in got
    assert "allow" in got[f"{base}[1]"]
    assert f"{base}[2].trusted[1]" in got and f"{base}[2].trusted[0]" not in got
    assert f"{base}[3].trusted" in got
    with pytest.raises(ConfigError) as ei:
        load_config(d)
    hints = [i.hint for i in ei.value.issues]
    assert "did you mean 10.0.0.0/8?" in hints


# --- cors -------------------------------------------------------------------------------------------
CORS = {"type": "cors", "origins": ["https://app.example", "*.example.com", "http://localhost:3000"],
        "methods": ["GET", "POST"], "headers": ["Content-Type", "X-Token"], "expose_headers": ["X-Total"],
        "credentials": True, "max_age": 600}


async def test_cors_preflight_is_answered_here(loop):
    async with Upstream() as up, gateway(doc(up, [CORS])) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/items"
        r = await c.options(url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 204 and r.content == b""
        h = r.headers
        assert h["access-control-allow-origin"] == "https://app.example"
        assert h["access-control-allow-methods"] == "GET, POST"
        assert h["access-control-allow-headers"] == "Content-Type, X-Token"
        assert h["access-control-allow-credentials"] == "true"
        assert h["access-control-max-age"] == "600"
        assert "Origin" in h["vary"] and "content-length" not in h
        # a subdomain of the wildcard; the bare domain and a look-alike are not
        r = await c.options(url, headers={"Origin": "https://a.b.example.com", "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == "https://a.b.example.com"
        for bad in ("https://example.com", "https://evilexample.com", "https://app.example.evil",
                    "http://localhost:3001", "null"):
            r = await c.options(url, headers={"Origin": bad, "Access-Control-Request-Method": "GET"})
            assert r.status_code == 204 and "access-control-allow-origin" not in r.headers, bad
        # the port is part of the origin
        r = await c.options(url, headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert up.requests == []  # preflights never reach the upstream
        # a plain OPTIONS (no Access-Control-Request-Method) is forwarded
        r = await c.options(url, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and len(up.requests) == 1


async def test_cors_actual_requests(loop):
    async with Upstream() as up, gateway(doc(up, [CORS])) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/items"
        r = await c.get(url, headers={"Origin": "https://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-expose-headers"] == "X-Total"
        assert r.headers["vary"] == "Origin"
        bad = await c.get(url, headers={"Origin": "https://evil.example"})
        assert bad.status_code == 200 and "access-control-allow-origin" not in bad.headers  # browsers enforce
        assert bad.headers["vary"] == "Origin"
        none = await c.get(url)
        assert none.headers["vary"] == "Origin" and "access-control-allow-origin" not in none.headers
        assert len(up.requests) == 3


async def test_cors_star_echo_of_headers_and_on_refusals(loop):
    star = {"type": "cors", "origins": ["*"]}
    ua = {"type": "user-agent", "deny": ["^blocked"]}
    async with Upstream() as up, gateway(doc(up, [star, ua])) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/items"
        r = await c.options(url, headers={"Origin": "https://any.where", "Access-Control-Request-Method": "PUT",
                                          "Access-Control-Request-Headers": "X-A, x-b"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-allow-headers"] == "X-A, x-b"  # asked for, echoed
        assert "access-control-allow-credentials" not in r.headers and "vary" not in r.headers
        ok = await c.get(url, headers={"Origin": "https://any.where"})
        refused = await c.get(url, headers={"Origin": "https://any.where", "User-Agent": "blocked/1"})
        assert ok.status_code == 200 and refused.status_code == 403
        # a browser can read the refusal: the CORS headers are on the gateway's own answers too
        assert refused.headers["access-control-allow-origin"] == "*"


def test_cors_config_errors():
    d = config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
        {"type": "cors", "origins": ["*"], "credentials": True},
        {"type": "cors", "origins": ["https://ok.example", "example.com", "https://a.example/path", "https://*x.com"]},
        {"type": "cors", "origins": []}]}])
    got = issues(d)
    base = "$.routes[0].policies"
    assert "credentials" in got[f"{base}[0]"]
    assert {f"{base}[1].origins[1]", f"{base}[1].origins[2]", f"{base}[1].origins[3]"} <= set(got)
    assert f"{base}[1].origins[0]" not in got
    assert f"{base}[2].origins" in got


# --- request-size -----------------------------------------------------------------------------------
async def test_request_size_declared_and_chunked(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        async with gateway(doc(up, [], [{"type": "request-size", "max_bytes": 10}])) as gw:
            url = f"http://127.0.0.1:{gw.port}/x"
            assert (await c.post(url, content=b"x" * 10)).status_code == 200
            assert (await c.post(url, content=b"x" * 11)).status_code == 413

            async def chunks(parts):
                for p in parts:
                    yield p

            small = await c.post(url, content=chunks([b"abc", b"def"]))
            assert small.status_code == 200 and up.requests[-1].body == b"abcdef"
            big = await c.post(url, content=chunks([b"abcdef", b"ghijkl"]))
            assert big.status_code == 413
            assert len(up.requests) == 2
            # refused from the head, before the body is sent (Expect: 100-continue gets no 100)
            r = await raw(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n"
                                   b"Expect: 100-continue\r\n\r\n", timeout=5)
            assert r.startswith(b"HTTP/1.1 413") and b"100 Continue" not in r
        async with gateway(doc(up, [], [{"type": "request-size", "max_bytes": 10, "chunked": "reject"}])) as gw:
            url = f"http://127.0.0.1:{gw.port}/x"
            # (raw, whole request in one write: the gateway answers from the head and closes a connection
            # whose body it has not read, which can reset a client still sending)
            r = await raw(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"1\r\na\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            got = parse_responses(r)
            assert [s for s, _h, _b in got] == [411, 200] and b"length_required" in got[0][2]
            assert (await c.post(url, content=b"x" * 11)).status_code == 413
            assert (await c.post(url, content=b"x" * 3)).status_code == 200
        assert len(up.requests) == 4 and up.requests[2].url == b"/y"
    got = issues(config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
        {"type": "request-size", "max_bytes": 1 << 20}, {"type": "request-size", "max_bytes": 1 << 20, "chunked": "reject"},
        {"type": "request-size", "max_bytes": -1}]}]))
    assert "chunked: reject" in got["$.routes[0].policies[0]"] and "$.routes[0].policies[1]" not in got
    assert "$.routes[0].policies[2].max_bytes" in got


# --- user-agent -------------------------------------------------------------------------------------
async def test_user_agent(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        ua = {"type": "user-agent", "deny": ["(?i)bot", "^curl/"], "allow": ["GoodBot/"]}
        async with gateway(doc(up, [ua])) as gw:
            url = f"http://127.0.0.1:{gw.port}/x"

            async def status(agent):
                return (await c.get(url, headers={"User-Agent": agent})).status_code

            assert await status("Mozilla/5.0") == 200
            assert await status("EvilBOT 1.0") == 403
            assert await status("curl/8.0") == 403
            assert await status("GoodBot/2.1") == 200  # allow first
            r = await raw(gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert parse_responses(r)[0][0] == 200  # no User-Agent: matched as ""
        only = {"type": "user-agent", "allow": ["^Partner/"], "status": 401}
        async with gateway(doc(up, [only])) as gw:
            url = f"http://127.0.0.1:{gw.port}/x"
            assert (await c.get(url, headers={"User-Agent": "Partner/1"})).status_code == 200
            r = await c.get(url, headers={"User-Agent": "Other/1"})
            assert r.status_code == 401 and r.json()["error"] == "user_agent_forbidden"
    d = config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
        {"type": "user-agent", "deny": ["ok", "(unclosed"]}, {"type": "user-agent"}]}])
    got = issues(d)
    assert "$.routes[0].policies[0].deny[1]" in got and "$.routes[0].policies[0].deny[0]" not in got
    assert "$.routes[0].policies[1]" in got


# --- request-termination ----------------------------------------------------------------------------
async def test_request_termination(loop):
    async with Upstream() as up, httpx.AsyncClient() as c:
        async with gateway(doc(up, [], [{"type": "request-termination"}])) as gw:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x")
            assert r.status_code == 503 and r.json() == {"message": "Service Unavailable"}
            assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
        term = {"type": "request-termination", "status": 410, "body": "gone for good", "content_type": "text/plain"}
        async with gateway(doc(up, [], [term])) as gw:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x")
            assert r.status_code == 410 and r.text == "gone for good" and r.headers["content-type"] == "text/plain"
            head = await c.head(f"http://127.0.0.1:{gw.port}/x")
            assert head.status_code == 410 and head.content == b"" and head.headers["content-length"] == "13"
            # keep-alive and pipelining still work around a terminated request
            resp = await raw(gw.port, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n"
                                      b"Connection: close\r\n\r\n")
            assert [s for s, _h, _b in parse_responses(resp)] == [410, 410]
        async with gateway(doc(up, [], [{"type": "request-termination", "status": 200,
                                          "json": {"maintenance": True}}])) as gw:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).json() == {"maintenance": True}
        assert up.requests == []
    d = config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
        {"type": "request-termination", "body": "x", "json": {}},
        {"type": "request-termination", "status": 204, "body": "x"},
        {"type": "request-termination", "status": 100}]}])
    got = issues(d)
    assert {"$.routes[0].policies[0]", "$.routes[0].policies[1]", "$.routes[0].policies[2].status"} <= set(got)
