"""Canary and blue-green releases: the split, stickiness, and automatic rollback (one worker in this
loop, then a whole host — supervisor, two workers, the admin API — in a subprocess)."""
from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys

import httpx
import pytest

from fastgate.config.load import load_config
from fastgate.errors import ConfigError
from tests.harness import Upstream, config, free_port, gateway, reply


def _doc(stable: Upstream, canary: Upstream, **canary_cfg) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "stable",
                           "canary": {"upstream": "next", **canary_cfg}}],
                  upstreams=[{"name": "stable", "targets": [{"address": stable.address}]},
                             {"name": "next", "targets": [{"address": canary.address}], "retries": 0}])


def _within(count: int, n: int, p: float) -> bool:
    """`count` of `n` is a plausible draw at probability `p` (six standard deviations)."""
    return abs(count - n * p) <= 6 * math.sqrt(n * p * (1 - p))


async def test_weight_splits_requests(loop):
    async with Upstream() as a, Upstream() as b:
        async with gateway(_doc(a, b, weight=30)) as gw, httpx.AsyncClient() as c:
            for _ in range(600):
                assert (await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code == 200
        assert len(a.requests) + len(b.requests) == 600
        assert _within(len(b.requests), 600, 0.30), (len(a.requests), len(b.requests))


@pytest.mark.parametrize("weight, to_canary", [(0, 0), (100, 40)])
async def test_blue_green_switch_sends_all_or_nothing(loop, weight, to_canary):
    async with Upstream() as a, Upstream() as b:
        async with gateway(_doc(a, b, weight=weight)) as gw, httpx.AsyncClient() as c:
            for _ in range(40):
                await c.get(f"http://127.0.0.1:{gw.port}/x")
        assert (len(a.requests), len(b.requests)) == (40 - to_canary, to_canary)


async def test_cookie_keeps_a_client_on_its_side(loop):
    async with Upstream() as a, Upstream() as b:
        async with gateway(_doc(a, b, weight=50, sticky="cookie", cookie="side")) as gw:
            sides = set()
            for _ in range(30):  # thirty new clients: each gets a cookie and then stays
                async with httpx.AsyncClient() as c:
                    r = await c.get(f"http://127.0.0.1:{gw.port}/x")
                    assert r.headers["set-cookie"].split(";")[0] in ("side=c", "side=s")
                    assert "HttpOnly" in r.headers["set-cookie"]
                    side = c.cookies["side"]
                    sides.add(side)
                    before = (len(a.requests), len(b.requests))
                    for _ in range(5):
                        r = await c.get(f"http://127.0.0.1:{gw.port}/x")
                        assert "set-cookie" not in r.headers
                    after = (len(a.requests), len(b.requests))
                    moved = (after[0] - before[0], after[1] - before[1])
                    assert moved == ((0, 5) if side == "c" else (5, 0))
            assert sides == {"c", "s"}


async def test_consumer_stickiness_is_stable_per_consumer(loop):
    keys = {f"user{i}": f"key-{i}-0123456789abcdef" for i in range(40)}
    from fastgate.policies.auth import hash_key

    async with Upstream() as a, Upstream() as b:
        doc = _doc(a, b, weight=50, sticky="consumer")
        doc["routes"][0]["policies"] = [{"type": "key-auth"}]
        doc["consumers"] = [{"username": u, "keys": [hash_key(k)]} for u, k in keys.items()]
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            to_canary = 0
            for _u, k in keys.items():
                n = len(b.requests)
                for _ in range(3):
                    r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"apikey": k})
                    assert r.status_code == 200
                went = len(b.requests) - n
                assert went in (0, 3)  # all three of a consumer's requests on one side
                to_canary += went == 3
        assert 0 < to_canary < 40 and _within(to_canary, 40, 0.5)


async def test_canary_errors_roll_it_back(loop):
    async with Upstream() as a, Upstream(lambda req: reply(500, b"broken")) as b:
        doc = _doc(a, b, weight=50, rollback={"window": 60, "min_requests": 10, "max_error_rate": 0.2})
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            canary = gw.state.gen.canaries[0]
            statuses = [(await c.get(f"http://127.0.0.1:{gw.port}/x")).status_code for _ in range(200)]
            assert canary.rolled_back == 1  # error_rate
            # the canary answered 500 exactly until its tenth answer; then nothing more went to it
            assert len(b.requests) == 10 and statuses.count(500) == 10
            assert len(a.requests) == 190


async def test_slow_canary_rolls_back_on_p99(loop):
    async def slow(req):
        await asyncio.sleep(0.15)
        return reply(200, b"slow")

    async with Upstream() as a, Upstream(slow) as b:
        doc = _doc(a, b, weight=100, rollback={"window": 60, "min_requests": 5, "max_error_rate": None,
                                                "max_p99": 0.05})
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            texts = [(await c.get(f"http://127.0.0.1:{gw.port}/x")).text for _ in range(8)]
            assert gw.state.gen.canaries[0].rolled_back == 2  # p99_latency
        assert texts == ["slow"] * 5 + ["ok"] * 3


def test_canary_config_errors():
    base = {"upstreams": [{"name": "u", "targets": [{"address": "127.0.0.1:1"}]}]}
    cases = {
        "a canary needs the route to have an `upstream`": {"name": "r", "paths": ["/"], "mock": {"body": "x"},
                                                           "canary": {"upstream": "u"}},
        "the canary's upstream is the route's own": {"name": "r", "paths": ["/"], "upstream": "u",
                                                     "canary": {"upstream": "u"}},
        "unknown upstream `nope`": {"name": "r", "paths": ["/"], "upstream": "u", "canary": {"upstream": "nope"}},
        "Expected `float` <= 100.0": {"name": "r", "paths": ["/"], "upstream": "u",
                                      "canary": {"upstream": "v", "weight": 150}},
    }
    for message, route in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config({**base, "routes": [route]})
        assert any(message in i.message for i in info.value.issues), (message, info.value.issues)


# --- a whole host: two workers and the admin API -------------------------------------------------------
TOKEN = "canary-admin-token-0123456789"
HOST_CONFIG = """
workers: 2
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
upstreams:
  - {{name: stable, targets: [{{address: "{stable}"}}]}}
  - {{name: next, targets: [{{address: "{canary}"}}], retries: 0, health: {{passive: {{failure_statuses: []}}}}}}
routes:
  - name: users
    paths: ["/*"]
    upstream: stable
    canary: {{upstream: next, weight: 50, rollback: {{window: 300, min_requests: 20, max_error_rate: 0.25}}}}
"""


async def _until(pred, what: str, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            got = await pred()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_rollback_is_host_wide_stated_by_the_admin_api_and_reset(tmp_path):
    failing = [True]
    async with Upstream() as a, Upstream(lambda req: reply(503 if failing[0] else 200, b"canary")) as b:
        port, admin_port = free_port(), free_port()
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(HOST_CONFIG.format(db=tmp_path / "s.db", port=port, admin=admin_port, stable=a.address,
                                          canary=b.address))
        log = tmp_path / "gw.log"
        proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", str(cfg)], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, env={**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN})
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=5,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as admin, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
                await _until(lambda: admin.get("/status"), "the admin API")
                doc = (await admin.get("/canaries")).json()
                assert [d["state"] for d in doc] == ["active"] and doc[0]["canary"] == "next"

                # many connections, so both workers take part
                async def burst(n):
                    async with httpx.AsyncClient(base_url=c.base_url, timeout=5) as one:
                        return [(await one.get("/u")).status_code for _ in range(n)]
                codes = sum(await asyncio.gather(*(burst(10) for _ in range(12))), [])
                assert 503 in codes and 200 in codes
                doc = await _until(lambda: _state(admin, "rolled_back"), "the rollback in the admin API")
                assert doc["reason"] == "error_rate" and doc["window"]["requests"] >= 20
                # give every worker a tick to read the flag, then nothing goes to the canary
                await asyncio.sleep(1.2)
                seen = len(b.requests)
                codes = sum(await asyncio.gather(*(burst(10) for _ in range(6))), [])
                assert codes == [200] * 60 and len(b.requests) == seen
                assert "rolled back: error_rate" in log.read_text()
                # the operator fixes the canary and resets: traffic reaches it again
                failing[0] = False
                r = await admin.post("/canaries/users/reset")
                assert r.status_code == 200 and r.json()["state"] == "active"
                audit = (await admin.get("/audit", params={"entity": "canary"})).json()
                assert audit and audit[0]["action"] == "reset"
                await _until(lambda: _reaches(c, b), "traffic on the canary after the reset")
                assert (await admin.post("/canaries/nope/reset")).status_code == 404
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _state(admin: httpx.AsyncClient, state: str):
    doc = (await admin.get("/canaries")).json()[0]
    return doc if doc["state"] == state else None


async def _reaches(c: httpx.AsyncClient, up: Upstream) -> bool:
    n = len(up.requests)
    for _ in range(20):
        await c.get("/u")
    return len(up.requests) > n
