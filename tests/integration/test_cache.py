"""proxy-cache and response-body through real sockets: what is stored, what is replayed, what the
client gets, and what the upstream saw."""
from __future__ import annotations

import asyncio

import httpx
import orjson

from fastgate.policies.cache import ProxyCachePolicy
from tests.harness import Upstream, config, gateway, raw, reply


def doc(up: Upstream, *policies) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": list(policies)}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}])


def counting(headers=None, body=b"hello", status=200):
    calls = []

    def handler(req):
        calls.append(req)
        return reply(status, body + b" %d" % len(calls), headers)

    return handler, calls


async def test_a_hit_is_answered_at_the_gateway(loop):
    handler, calls = counting({"Cache-Control": "max-age=60"})
    async with Upstream(handler) as up, gateway(doc(up, {"type": "proxy-cache"})) as gw, \
            httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/a?x=1"
        first = await c.get(url)
        assert first.headers["x-cache"] == "MISS" and first.text == "hello 1"
        second = await c.get(url)
        assert second.headers["x-cache"] == "HIT" and second.text == "hello 1"
        assert int(second.headers["age"]) >= 0 and second.headers["x-request-id"] != first.headers["x-request-id"]
        head = await c.head(url)
        assert head.status_code == 200 and head.headers["x-cache"] == "HIT" and head.content == b""
        assert (await c.get(f"http://127.0.0.1:{gw.port}/a?x=2")).text == "hello 2"  # the query is in the key
        assert len(calls) == 2
        # Cache-Control: no-cache from the client skips the lookup and refreshes the entry
        fresh = await c.get(url, headers={"Cache-Control": "no-cache"})
        assert fresh.headers["x-cache"] == "MISS" and fresh.text == "hello 3"
        assert (await c.get(url)).text == "hello 3"


async def test_what_is_never_stored(loop):
    cases = [({"Cache-Control": "no-store"}, 200), ({"Cache-Control": "private"}, 200),
             ({"Set-Cookie": "s=1"}, 200), ({"Vary": "*"}, 200), ({}, 500)]
    for headers, status in cases:
        handler, calls = counting(headers, status=status)
        async with Upstream(handler) as up, gateway(doc(up, {"type": "proxy-cache"})) as gw, \
                httpx.AsyncClient() as c:
            for _ in range(2):
                await c.get(f"http://127.0.0.1:{gw.port}/a")
            assert len(calls) == 2, (headers, status)


async def test_authenticated_requests_bypass_unless_allowed(loop):
    for allowed, want_calls in ((False, 2), (True, 1)):
        handler, calls = counting({"Cache-Control": "max-age=60"})
        policy = {"type": "proxy-cache", "cache_authenticated": allowed}
        async with Upstream(handler) as up, gateway(doc(up, policy)) as gw, httpx.AsyncClient() as c:
            got = [await c.get(f"http://127.0.0.1:{gw.port}/a", headers={"Authorization": "Bearer t"})
                   for _ in range(2)]
            assert len(calls) == want_calls
            assert got[0].headers["x-cache"] == ("MISS" if allowed else "BYPASS")


async def test_vary_and_expiry(loop):
    handler, calls = counting({"Cache-Control": "max-age=30", "Vary": "Accept-Language"})
    async with Upstream(handler) as up, gateway(doc(up, {"type": "proxy-cache"})) as gw, \
            httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/v"
        en = await c.get(url, headers={"Accept-Language": "en"})
        assert (await c.get(url, headers={"Accept-Language": "en"})).text == en.text
        de = await c.get(url, headers={"Accept-Language": "de"})  # a different variant: a miss
        assert de.text != en.text and de.headers["x-cache"] == "MISS"
        assert len(calls) == 2
        # 31 s later the entry is stale (the policy's clock is moved, no sleeping)
        policy = gw.state.gen.routes[0].chain.policies[0]
        assert isinstance(policy, ProxyCachePolicy)
        real = policy.now
        policy.now = lambda: real() + 31
        try:
            assert (await c.get(url, headers={"Accept-Language": "de"})).headers["x-cache"] == "MISS"
        finally:
            policy.now = real
        assert len(calls) == 3


async def test_response_body_removes_and_renames_json_fields(loop):
    body = orjson.dumps({"id": 7, "secret": "s", "owner": {"name": "a", "password": "p"},
                         "items": [{"sku": "x", "cost": 1}, {"sku": "y", "cost": 2}]})

    def handler(req):
        return reply(200, body, {"Content-Type": "application/json", "ETag": '"v1"'})

    policy = {"type": "response-body", "remove": ["secret", "owner.password", "items.cost"],
              "rename": {"id": "order_id"}}
    async with Upstream(handler) as up, gateway(doc(up, policy)) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/o")
        assert r.json() == {"order_id": 7, "owner": {"name": "a"}, "items": [{"sku": "x"}, {"sku": "y"}]}
        assert int(r.headers["content-length"]) == len(r.content)
        assert "etag" not in r.headers  # the body changed: its validator goes


async def test_response_body_limits_and_non_json(loop):
    big = orjson.dumps({"blob": "x" * 5000})
    text = b"plain text, not touched"

    def handler(req):
        if req.url == b"/big":
            return reply(200, big, {"Content-Type": "application/json"})
        if req.url == b"/chunked":
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"6\r\n{\"a\":1\r\n9\r\n,\"drop\":2\r\n1\r\n}\r\n0\r\n\r\n")
        return reply(200, text, {"Content-Type": "text/plain"})

    policy = {"type": "response-body", "remove": ["drop"], "max_bytes": 1024}
    async with Upstream(handler) as up, gateway(doc(up, policy)) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        assert (await c.get(base + "/big")).status_code == 502  # past max_bytes: never a half-edited body
        assert (await c.get(base + "/plain")).content == text
        chunked = await c.get(base + "/chunked")  # de-chunked, edited, sent with a Content-Length
        assert chunked.json() == {"a": 1} and "content-length" in chunked.headers
        # HTTP/1.0 client over the same path
        resp = await raw(gw.port, b"GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(b'{"a":1}')


async def test_cache_stores_the_transformed_body(loop):
    handler, calls = counting({"Cache-Control": "max-age=60", "Content-Type": "application/json"},
                              body=b'{"keep":1,"drop":2,"n":')

    def json_handler(req):
        calls.append(req)
        return reply(200, orjson.dumps({"keep": 1, "drop": 2, "n": len(calls)}),
                     {"Cache-Control": "max-age=60", "Content-Type": "application/json"})

    async with Upstream(json_handler) as up, gateway(doc(up, {"type": "proxy-cache"},
                                                         {"type": "response-body", "remove": ["drop"]})) as gw, \
            httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/j"
        a = await c.get(url)
        b = await c.get(url)
        assert a.json() == b.json() == {"keep": 1, "n": 1}
        assert b.headers["x-cache"] == "HIT" and len(calls) == 1


# --- backend redis: one cache for every worker and node -----------------------------------------------
def shared_doc(up: Upstream, redis_url: str, **policy) -> dict:
    d = doc(up, {"type": "proxy-cache", "backend": "redis", **policy})
    d["counters"] = {"redis": {"url": redis_url, "timeout": 0.2}}
    return d


async def test_shared_cache_is_seen_by_another_worker_and_expires(loop):
    from tests.redis_server import RedisServer

    handler, calls = counting({"Cache-Control": "max-age=1", "Vary": "Accept-Language"})
    with RedisServer() as redis:
        async with Upstream(handler) as up, gateway(shared_doc(up, redis.url)) as a, \
                gateway(shared_doc(up, redis.url)) as b, httpx.AsyncClient() as c:
            hdrs = {"Accept-Language": "fr", "Host": "api.example.com"}  # the Host is in the key
            first = await c.get(f"http://127.0.0.1:{a.port}/p", headers=hdrs)
            assert first.headers["x-cache"] == "MISS" and first.text == "hello 1"
            for _ in range(50):  # the SET is sent after the response: wait until it is there
                if redis.command("KEYS", "*cache:*"):
                    break
                await asyncio.sleep(0.02)
            # another worker (another node alike) answers from Redis
            hit = await c.get(f"http://127.0.0.1:{b.port}/p", headers=hdrs)
            assert hit.headers["x-cache"] == "HIT" and hit.text == "hello 1" and "age" in hit.headers
            # Vary: another language is another entry
            other = await c.get(f"http://127.0.0.1:{b.port}/p", headers={**hdrs, "Accept-Language": "de"})
            assert other.headers["x-cache"] == "MISS" and other.text == "hello 2"
            # the entry expires with its max-age (Redis PX)
            assert 0 < int(redis.command("PTTL", redis.command("KEYS", "*cache:*")[0])) <= 1000
            await asyncio.sleep(1.2)
            late = await c.get(f"http://127.0.0.1:{a.port}/p", headers=hdrs)
            assert late.headers["x-cache"] == "MISS" and late.text == "hello 3"
            assert len(calls) == 3


async def test_shared_cache_with_redis_down_is_a_miss_not_an_error(loop):
    from tests.redis_server import RedisServer

    handler, calls = counting({"Cache-Control": "max-age=60"})
    with RedisServer() as redis:
        async with Upstream(handler) as up, gateway(shared_doc(up, redis.url)) as gw, httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/q"
            await c.get(url)
            for _ in range(50):
                r = await c.get(url)
                if r.headers["x-cache"] == "HIT":
                    break
                await asyncio.sleep(0.02)
            assert r.headers["x-cache"] == "HIT"
            redis.stop()
            for _ in range(5):
                r = await c.get(url)
                assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
            policy = gw.state.gen.routes[0].chain.policies[0]
            assert policy.errors >= 5
            assert len(calls) == 1 + 5


def test_backend_redis_without_a_redis_is_a_config_error():
    import pytest

    from fastgate.config.load import load_config
    from fastgate.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u",
                                    "policies": [{"type": "proxy-cache", "backend": "redis"}]}],
                           upstreams=[{"name": "u", "targets": [{"address": "127.0.0.1:1"}]}]))
    assert [i.path for i in info.value.issues] == ["$.routes[0].policies[0].backend"]


async def test_an_absurd_max_age_is_clamped_not_an_error(loop):
    handler, calls = counting({"Cache-Control": "max-age=" + "9" * 400})
    async with Upstream(handler) as up, gateway(doc(up, {"type": "proxy-cache"})) as gw, \
            httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/big"
        first = await c.get(url)
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        second = await c.get(url)
        assert second.headers["x-cache"] == "HIT" and len(calls) == 1
