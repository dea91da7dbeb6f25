"""Upstream failures, retries, timeouts, balancing, health checks and the circuit breaker."""
from __future__ import annotations

import asyncio
import collections

import httpx

from fastgate.policies.auth import hash_key
from tests.harness import Upstream, config, dead_port, gateway, raw, reply, simple_config


def dead_address() -> str:
    return f"127.0.0.1:{dead_port()}"  # refuses connections


async def test_connect_refused_is_retried_on_another_target(loop):
    async with Upstream(lambda r: reply(200, b"alive")) as up:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "balancer": "round_robin", "retries": 2,
                                 "targets": [{"address": dead_address()}, {"address": up.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            for _ in range(6):
                r = await c.post(f"http://127.0.0.1:{gw.port}/", content=b"body")  # connect failures: any method
                assert r.status_code == 200 and r.text == "alive"
        assert [req.body for req in up.requests] == [b"body"] * 6


async def test_idempotent_request_retried_after_reset_but_post_is_not(loop):
    calls = collections.Counter()

    def flaky(req):
        calls[req.method] += 1
        return None  # reset the connection without answering

    async with Upstream(flaky) as bad, Upstream(lambda r: reply(200, b"good")) as good:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "retries": 1, "health": {"passive": None},
                                 "targets": [{"address": bad.address}, {"address": good.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            got = collections.Counter()
            for _ in range(4):
                r = await c.get(f"http://127.0.0.1:{gw.port}/")
                got[r.status_code] += 1
            assert got == {200: 4}
            posts = collections.Counter()
            for _ in range(4):
                r = await c.post(f"http://127.0.0.1:{gw.port}/", content=b"x")
                posts[r.status_code] += 1
                if r.status_code == 502:
                    assert r.json()["error"] == "upstream_reset"
            assert posts[502] >= 1  # a POST that reached the bad target is not replayed
        assert calls[b"POST"] == posts[502]


async def test_pooled_connection_closed_while_idle_is_retried_transparently(loop):
    async with Upstream(lambda r: reply(200, b"fine")) as up, gateway(simple_config(up, retries=1)) as gw:
        async with httpx.AsyncClient() as c:
            assert (await c.post(f"http://127.0.0.1:{gw.port}/", content=b"1")).status_code == 200
            for p in list(up.open):  # the upstream closes its idle keep-alive connection
                p.transport.close()
            await asyncio.sleep(0.05)
            r = await c.post(f"http://127.0.0.1:{gw.port}/", content=b"2")
            assert r.status_code == 200 and r.text == "fine"
        assert [q.body for q in up.requests] == [b"1", b"2"]


async def test_a_pooled_connection_reset_by_the_upstream_is_retried_even_with_no_retries(loop):
    """The upstream's keep-alive timeout crosses the next request: its connection is reset before
    any answer. That request goes again on a new connection, though `retries` is 0 (as in nginx)."""
    seen = []

    def closes_the_second(req):
        seen.append(req.url.decode())
        return None if len(seen) == 2 else reply(200, b"ok")

    async with Upstream(closes_the_second) as up, gateway(simple_config(up, retries=0)) as gw:
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/one")).status_code == 200
            r = await c.get(f"http://127.0.0.1:{gw.port}/two")
            assert r.status_code == 200 and r.text == "ok"
    assert seen == ["/one", "/two", "/two"]


async def test_read_timeout_is_504_and_total_timeout(loop):
    async def slow(req):
        await asyncio.sleep(3)
        return reply(200, b"late")

    async with Upstream(slow) as up:
        doc = simple_config(up, retries=0, timeouts={"read": 0.3})
        async with gateway(doc) as gw, httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/")
            assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
        doc = simple_config(up, retries=0, timeouts={"total": 0.3})
        async with gateway(doc) as gw, httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/")
            assert r.status_code == 504


async def test_response_cut_mid_body_never_reaches_client_complete(loop):
    async with Upstream(lambda r: (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part", "close")) as up:
        async with gateway(simple_config(up)) as gw:
            out = await raw(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = out.partition(b"\r\n\r\n")
            assert b"Content-Length: 100" in head
            assert len(body) < 100  # the client sees a truncated body and a closed connection


async def test_malformed_upstream_response_is_502_and_not_pooled(loop):
    async with Upstream(lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok") as up:
        async with gateway(simple_config(up, retries=0)) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/")
            assert r.status_code == 502 and r.json()["error"] == "upstream_bad_response"
            r = await c.get(f"http://127.0.0.1:{gw.port}/")
            assert r.status_code == 502
        assert up.connections == 2  # the broken connection was not reused


async def test_no_healthy_target_is_503(loop):
    doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                 upstreams=[{"name": "u", "retries": 0, "targets": [{"address": dead_address()}],
                             "health": {"passive": {"max_failures": 1, "eject_for": 60}}}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        assert (await c.get(f"http://127.0.0.1:{gw.port}/")).status_code == 502
        r = await c.get(f"http://127.0.0.1:{gw.port}/")
        assert r.status_code == 503 and r.json()["error"] == "no_healthy_upstream"


async def _spread(n, doc_upstream, ups, headers=None):
    doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                 upstreams=[{"name": "u", **doc_upstream}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        bodies = collections.Counter()
        for i in range(n):
            h = headers(i) if headers else None
            r = await c.get(f"http://127.0.0.1:{gw.port}/", headers=h)
            bodies[r.text] += 1
    return bodies


async def test_round_robin_weighted_and_consistent_hash(loop):
    async with Upstream(lambda r: reply(200, b"a")) as a, Upstream(lambda r: reply(200, b"b")) as b:
        got = await _spread(20, {"targets": [{"address": a.address}, {"address": b.address}]}, [a, b])
        assert got == {"a": 10, "b": 10}
        got = await _spread(40, {"targets": [{"address": a.address, "weight": 300},
                                             {"address": b.address, "weight": 100}]}, [a, b])
        assert got == {"a": 30, "b": 10}
        hashed = {"balancer": "consistent_hash", "hash_on": "header", "hash_key": "X-User",
                  "targets": [{"address": a.address}, {"address": b.address}]}
        got = await _spread(10, hashed, [a, b], headers=lambda i: {"X-User": "alice"})
        assert len(got) == 1 and sum(got.values()) == 10  # sticky
        got = await _spread(60, hashed, [a, b], headers=lambda i: {"X-User": f"user{i}"})
        assert set(got) == {"a", "b"}  # and spread


async def test_consistent_hash_on_consumer(loop):
    """hash_on consumer: the authenticated consumer picks the target (every request here comes
    from 127.0.0.1, so hashing the client IP would send them all to one target)."""
    names = [f"user{i}" for i in range(16)]
    async with Upstream(lambda r: reply(200, b"a")) as a, Upstream(lambda r: reply(200, b"b")) as b:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": [{"type": "key-auth"}]}],
                     upstreams=[{"name": "u", "balancer": "consistent_hash", "hash_on": "consumer",
                                 "targets": [{"address": a.address}, {"address": b.address}]}],
                     consumers=[{"username": n, "keys": [hash_key(f"key-{n}")]} for n in names])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            seen = collections.defaultdict(set)
            for _ in range(3):
                for n in names:
                    r = await c.get(f"http://127.0.0.1:{gw.port}/", headers={"apikey": f"key-{n}"})
                    assert r.status_code == 200
                    seen[n].add(r.text)
    assert all(len(t) == 1 for t in seen.values())  # each consumer sticks to one target
    assert {t for ts in seen.values() for t in ts} == {"a", "b"}  # and consumers spread over both


async def test_least_connections_prefers_the_idle_target(loop):
    async def slow(req):
        await asyncio.sleep(0.5)
        return reply(200, b"slow")

    async with Upstream(slow) as s, Upstream(lambda r: reply(200, b"fast")) as f:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "balancer": "least_connections",
                                 "targets": [{"address": s.address}, {"address": f.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/"
            first = asyncio.ensure_future(c.get(url))
            await asyncio.sleep(0.1)
            results = [(await c.get(url)).text for _ in range(5)]
            assert (await first).text in ("slow", "fast")
            assert results.count("fast") >= 4


async def test_active_health_check_marks_target_down_and_up(loop):
    healthy = {"on": True}

    def handler(req):
        if req.url == b"/health":
            return reply(200 if healthy["on"] else 500, b"h")
        return reply(200, b"a")

    async with Upstream(handler) as a, Upstream(lambda r: reply(200, b"b")) as b:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "targets": [{"address": a.address}, {"address": b.address}],
                                 "health": {"active": {"path": "/health", "interval": 0.05, "healthy_threshold": 1,
                                                       "unhealthy_threshold": 1}}}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            healthy["on"] = False
            await asyncio.sleep(0.4)
            texts = {(await c.get(f"http://127.0.0.1:{gw.port}/")).text for _ in range(6)}
            assert texts == {"b"}
            healthy["on"] = True
            await asyncio.sleep(0.4)
            texts = {(await c.get(f"http://127.0.0.1:{gw.port}/")).text for _ in range(6)}
            assert texts == {"a", "b"}


async def test_circuit_breaker_opens_on_error_ratio(loop):
    async with Upstream(lambda r: reply(500, b"err")) as bad, Upstream(lambda r: reply(200, b"ok")) as good:
        doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"}],
                     upstreams=[{"name": "u", "health": {"passive": None},
                                 "circuit_breaker": {"window": 60, "min_requests": 4, "failure_ratio": 0.5,
                                                     "open_for": 60},
                                 "targets": [{"address": bad.address}, {"address": good.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            for _ in range(8):
                await c.get(f"http://127.0.0.1:{gw.port}/")
            before = len(bad.requests)
            statuses = [(await c.get(f"http://127.0.0.1:{gw.port}/")).status_code for _ in range(6)]
            assert statuses == [200] * 6 and len(bad.requests) == before
