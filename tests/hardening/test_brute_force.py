"""Brute-force attempts limited per client (auth-failure-limit): failed authentications from one
client end in a block that refuses it before any credential is checked, while other clients and
the upstream are untouched."""
from __future__ import annotations

import httpx
import pytest

from fastgate.config.load import load_config
from fastgate.errors import ConfigError
from fastgate.policies.auth import hash_key
from tests.harness import Upstream, config, gateway, reply

GOOD = "good-key-0123456789abcdef"


def _doc(up: Upstream, **limit) -> dict:
    return config(
        routes=[{"name": "api", "paths": ["/*"], "upstream": "u", "policies": [{"type": "key-auth"}]},
                {"name": "login", "paths": ["/login"], "upstream": "u"}],
        upstreams=[{"name": "u", "targets": [{"address": up.address}]}],
        consumers=[{"username": "alice", "keys": [hash_key(GOOD)]}],
        policies=[{"type": "real-ip", "trusted": ["127.0.0.1"]},
                  {"type": "auth-failure-limit", "max_failures": 5, "window": 60, "block_for": 120, **limit}])


async def test_guessing_keys_gets_the_client_blocked_before_its_key_is_checked(loop):
    async with Upstream() as up, gateway(_doc(up)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/data"
        attacker = {"X-Forwarded-For": "203.0.113.7"}
        for i in range(5):
            r = await c.get(url, headers={**attacker, "apikey": f"guess-{i}"})
            assert r.status_code == 401
        # the sixth try — even with the right key — is refused without looking at it
        r = await c.get(url, headers={**attacker, "apikey": GOOD})
        assert r.status_code == 429 and r.json()["error"] == "too_many_auth_failures"
        assert 110 <= int(r.headers["retry-after"]) <= 120
        assert up.requests == []
        # another client, and a client with a few failures only, are served
        r = await c.get(url, headers={"X-Forwarded-For": "198.51.100.1", "apikey": GOOD})
        assert r.status_code == 200
        other = {"X-Forwarded-For": "198.51.100.2"}
        for _ in range(4):
            assert (await c.get(url, headers={**other, "apikey": "nope"})).status_code == 401
        assert (await c.get(url, headers={**other, "apikey": GOOD})).status_code == 200
        assert len(up.requests) == 2


async def test_failed_logins_at_the_upstream_count_too(loop):
    async with Upstream(lambda req: reply(401, b"wrong password")) as up, gateway(_doc(up, max_failures=3)) as gw:
        async with httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/login"
            codes = [(await c.post(url, content=b"u=a&p=x")).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        assert len(up.requests) == 3


async def test_block_by_header_value(loop):
    async with Upstream() as up, gateway(_doc(up, key="header", header="X-Client-Id", max_failures=2)) as gw:
        async with httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/data"
            for _ in range(2):
                await c.get(url, headers={"X-Client-Id": "bot", "apikey": "bad"})
            r = await c.get(url, headers={"X-Client-Id": "bot", "apikey": GOOD})
            assert r.status_code == 429
            r = await c.get(url, headers={"X-Client-Id": "human", "apikey": GOOD})
            assert r.status_code == 200
            # without the header a client is told apart by its IP: one header-less guesser's block
            # is not every header-less client's
            for _ in range(2):
                await c.get(url, headers={"X-Forwarded-For": "203.0.113.50", "apikey": "bad"})
            r = await c.get(url, headers={"X-Forwarded-For": "203.0.113.50", "apikey": GOOD})
            assert r.status_code == 429
            r = await c.get(url, headers={"X-Forwarded-For": "198.51.100.9", "apikey": GOOD})
            assert r.status_code == 200


def test_header_key_needs_a_header():
    with pytest.raises(ConfigError) as info:
        load_config({"policies": [{"type": "auth-failure-limit", "key": "header"}]})
    assert [i.path for i in info.value.issues] == ["$.policies[0]"]


async def test_real_ip_attached_after_it_still_names_the_client(loop):
    """auth-failure-limit attached globally, real-ip on the route: both in the access phase, real-ip
    later — the limit applies it first, so the client it checks is the one it counts."""
    async with Upstream() as up:
        d = config(
            routes=[{"name": "api", "paths": ["/*"], "upstream": "u",
                     "policies": [{"type": "real-ip", "trusted": ["127.0.0.1"]}, {"type": "key-auth"}]}],
            upstreams=[{"name": "u", "targets": [{"address": up.address}]}],
            consumers=[{"username": "alice", "keys": [hash_key(GOOD)]}],
            policies=[{"type": "auth-failure-limit", "max_failures": 3}])
        async with gateway(d) as gw, httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/data"
            for _ in range(3):
                r = await c.get(url, headers={"X-Forwarded-For": "203.0.113.7", "apikey": "guess"})
                assert r.status_code == 401
            r = await c.get(url, headers={"X-Forwarded-For": "203.0.113.7", "apikey": GOOD})
            assert r.status_code == 429
            # the proxy (127.0.0.1) is not what was blocked: another client behind it is served
            r = await c.get(url, headers={"X-Forwarded-For": "198.51.100.1", "apikey": GOOD})
            assert r.status_code == 200
