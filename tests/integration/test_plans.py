"""plan-limits (per-consumer rate limits and calendar quotas) and concurrency-limit through real sockets.

Consumers are found by a small test plugin (X-User names a configured consumer). Quotas use the
policy's injectable clock (`now`) to cross hour, day and month ends without sleeping."""
from __future__ import annotations

import asyncio
import socket
import struct
from datetime import UTC, datetime

import httpx
import pytest

from fastgate.policies.plans import ConcurrencyLimitPolicy, PlanLimitsPolicy, period_window
from tests.harness import Upstream, config, gateway, parse_responses, raw, reply


class HeaderAuth:
    """A test plugin (phase authentication): X-User names a consumer of the config; X-Plan overrides
    its plan (to reach a plan the config does not define)."""

    phase = "authentication"

    def __init__(self, config, ctx):
        self.consumers = ctx.consumers

    def request(self, ex):
        from fastgate.policies.base import ConsumerInfo

        name = ex.header(b"x-user")
        if name is None:
            return None
        c = self.consumers.get(name.decode())
        plan = ex.header(b"x-plan")
        if plan is not None:
            c = ConsumerInfo(name.decode(), plan=plan.decode())
        if c is not None:
            ex.authenticated(c)
        return None


AUTH = {"type": "plugin", "module": "tests.integration.test_plans:HeaderAuth"}
PLANS = [{"name": "free", "rate_limits": [{"rate": 3, "per": 3600}], "quotas": [{"limit": 5, "period": "day"}]},
         {"name": "daily", "quotas": [{"limit": 2, "period": "day"}]},
         {"name": "hourly", "quotas": [{"limit": 1, "period": "hour"}, {"limit": 3, "period": "month"}]},
         {"name": "open"}]
CONSUMERS = [{"username": "alice", "plan": "free"}, {"username": "bob", "plan": "free"},
             {"username": "dora", "plan": "daily"}, {"username": "hank", "plan": "hourly"},
             {"username": "olga", "plan": "open"}, {"username": "nobody"}]


def plans_doc(**plan_limits) -> dict:
    return config(routes=[{"name": "m", "paths": ["/m"], "mock": {"body": "ok"}},
                          {"name": "n", "paths": ["/n"], "mock": {"body": "ok"}}],
                  policies=[AUTH, {"type": "plan-limits", **plan_limits}], plans=PLANS, consumers=CONSUMERS)


def policies_of(gw, cls) -> list:
    return [p for r in gw.state.gen.routes for p in r.chain.policies if isinstance(p, cls)]


class Clock:
    def __init__(self, when: datetime):
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t


def set_clock(gw, clock: Clock) -> None:
    for p in policies_of(gw, PlanLimitsPolicy):
        p.now = clock


async def test_plan_rate_limit_per_consumer_with_headers(loop):
    async with gateway(plans_doc()) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/m"
        got = [await c.get(url, headers={"X-User": "alice"}) for _ in range(4)]
        assert [r.status_code for r in got] == [200, 200, 200, 429]
        h = got[0].headers
        assert h["ratelimit-policy"] == '"free.rate";q=3;w=3600, "free.day";q=5;w=86400'
        assert h["ratelimit"].startswith('"free.rate";r=2;t=') and '"free.day";r=4;t=' in h["ratelimit"]
        assert h["x-ratelimit-limit-day"] == "5" and h["x-ratelimit-remaining-day"] == "4"
        assert h["x-ratelimit-limit"] == "3" and h["x-ratelimit-remaining"] == "2"  # the tighter one
        assert got[3].json()["error"] == "rate_limited" and int(got[3].headers["retry-after"]) >= 1
        # another consumer, and another route under the same global policy instance... counts per consumer
        assert (await c.get(url, headers={"X-User": "bob"})).status_code == 200
        assert (await c.get(f"http://127.0.0.1:{gw.port}/n", headers={"X-User": "alice"})).status_code == 429
        # no consumer, or one without a plan, passes; a plan without limits passes
        assert (await c.get(url)).status_code == 200
        assert (await c.get(url, headers={"X-User": "nobody"})).status_code == 200
        assert [(await c.get(url, headers={"X-User": "olga"})).status_code for _ in range(5)] == [200] * 5
        r = await c.get(url, headers={"X-User": "nobody", "X-Plan": "ghost"})
        assert r.status_code == 403 and r.json()["error"] == "unknown_plan"


async def test_require_plan(loop):
    async with gateway(plans_doc(require_plan=True)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/m"
        for headers in ({}, {"X-User": "nobody"}):
            r = await c.get(url, headers=headers)
            assert r.status_code == 403 and r.json()["error"] == "plan_required"
        assert (await c.get(url, headers={"X-User": "olga"})).status_code == 200


async def test_daily_quota_resets_at_utc_midnight(loop):
    async with gateway(plans_doc()) as gw, httpx.AsyncClient() as c:
        clock = Clock(datetime(2026, 3, 14, 23, 59, 0, tzinfo=UTC))
        set_clock(gw, clock)
        url = f"http://127.0.0.1:{gw.port}/m"
        got = [await c.get(url, headers={"X-User": "dora"}) for _ in range(3)]
        assert [r.status_code for r in got] == [200, 200, 429]
        assert got[2].json() == {"error": "quota_exceeded", "request_id": got[2].headers["x-request-id"],
                                 "period": "day"}
        assert got[2].headers["retry-after"] == "60"  # until 00:00 UTC
        assert got[1].headers["x-ratelimit-reset-day"] == "60"
        clock.t += 59
        assert (await c.get(url, headers={"X-User": "dora"})).status_code == 429
        clock.t += 1  # 2026-03-15 00:00:00 UTC
        r = await c.get(url, headers={"X-User": "dora"})
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-day"] == "1"
        assert r.headers["x-ratelimit-reset-day"] == "86400"


async def test_hour_and_month_quotas(loop):
    async with gateway(plans_doc()) as gw, httpx.AsyncClient() as c:
        clock = Clock(datetime(2026, 1, 31, 22, 30, tzinfo=UTC))
        set_clock(gw, clock)
        url = f"http://127.0.0.1:{gw.port}/m"

        async def status():
            return (await c.get(url, headers={"X-User": "hank"})).status_code

        assert [await status(), await status()] == [200, 429]  # 1 per hour
        r = await c.get(url, headers={"X-User": "hank"})
        assert r.json()["period"] == "hour" and r.headers["retry-after"] == "1800"
        clock.t = datetime(2026, 1, 31, 23, 0, tzinfo=UTC).timestamp()
        assert [await status(), await status()] == [200, 429]
        clock.t = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()
        assert await status() == 429  # still the same hour: the hour quota refuses
        # three per month used? two so far (the refused ones count for nothing)
        clock.t = datetime(2026, 2, 1, 0, 0, tzinfo=UTC).timestamp()  # new hour AND new month
        r = await c.get(url, headers={"X-User": "hank"})
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-month"] == "2"
        assert r.headers["x-ratelimit-reset-month"] == str(28 * 86400)  # February 2026


async def test_quota_month_exhausted(loop):
    async with gateway(plans_doc()) as gw, httpx.AsyncClient() as c:
        clock = Clock(datetime(2026, 12, 31, 20, 0, tzinfo=UTC))
        set_clock(gw, clock)
        url = f"http://127.0.0.1:{gw.port}/m"
        for h in (20, 21, 22):
            clock.t = datetime(2026, 12, 31, h, 0, tzinfo=UTC).timestamp()
            assert (await c.get(url, headers={"X-User": "hank"})).status_code == 200
        clock.t = datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp()
        r = await c.get(url, headers={"X-User": "hank"})
        assert r.status_code == 429 and r.json()["period"] == "month" and r.headers["retry-after"] == "3600"
        clock.t = datetime(2027, 1, 1, 0, 0, tzinfo=UTC).timestamp()  # a new year's month
        assert (await c.get(url, headers={"X-User": "hank"})).status_code == 200


async def test_a_rate_limited_request_uses_no_quota(loop):
    async with gateway(plans_doc()) as gw, httpx.AsyncClient() as c:
        set_clock(gw, Clock(datetime(2026, 5, 5, 12, tzinfo=UTC)))
        url = f"http://127.0.0.1:{gw.port}/m"
        got = [await c.get(url, headers={"X-User": "alice"}) for _ in range(6)]
        assert [r.status_code for r in got] == [200, 200, 200, 429, 429, 429]
        # the day quota (5) saw only the three that passed the rate limit
        assert got[2].headers["x-ratelimit-remaining-day"] == "2"
        assert got[5].json()["error"] == "rate_limited" and "x-ratelimit-remaining-day" not in got[5].headers


@pytest.mark.parametrize(("when", "period", "wid", "end"), [
    (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), "month", 2026 * 12 + 11, datetime(2027, 1, 1, tzinfo=UTC)),
    (datetime(2024, 2, 29, 12, tzinfo=UTC), "month", 2024 * 12 + 1, datetime(2024, 3, 1, tzinfo=UTC)),
    (datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "day", None, datetime(2026, 3, 30, tzinfo=UTC)),
    (datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "hour", None, datetime(2026, 3, 29, 2, tzinfo=UTC)),
])
def test_period_window(when, period, wid, end):
    got_wid, start, got_end = period_window(period, when.timestamp())
    assert got_end == end.timestamp() and start <= when.timestamp() < got_end
    if wid is not None:
        assert got_wid == wid
    assert period_window(period, got_end)[0] != got_wid and period_window(period, got_end - 0.001)[0] == got_wid


# --- concurrency-limit ------------------------------------------------------------------------------
class Gate:
    """An upstream handler that holds /slow requests until released."""

    def __init__(self):
        self.waiting: list[asyncio.Future] = []
        self.arrived = asyncio.Event()

    def __call__(self, req):
        if not req.url.startswith(b"/slow"):
            return reply(200, b"fast")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.arrived.set()

        async def later():
            await fut
            return reply(200, b"slow")

        return later()

    async def wait_for(self, n: int) -> None:
        while len(self.waiting) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)

    def release_all(self) -> None:
        for f in self.waiting:
            if not f.done():
                f.set_result(None)
        self.waiting.clear()


def cc_doc(up: Upstream, **cc) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u",
                           "policies": [AUTH, {"type": "concurrency-limit", **cc}]}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}], plans=PLANS, consumers=CONSUMERS)


async def test_concurrency_limit_per_route(loop):
    gate = Gate()
    async with Upstream(gate) as up, gateway(cc_doc(up, limit=2)) as gw, httpx.AsyncClient(timeout=10) as c:
        url = f"http://127.0.0.1:{gw.port}"
        first = [asyncio.ensure_future(c.get(url + "/slow")) for _ in range(2)]
        await gate.wait_for(2)
        over = await c.get(url + "/fast")
        assert over.status_code == 429 and over.json()["error"] == "concurrency_limited"
        assert over.headers["retry-after"] == "1" and over.json()["limit"] == 2
        gate.release_all()
        assert [(await f).status_code for f in first] == [200, 200]
        # every place was given back
        assert [(await c.get(url + "/fast")).status_code for _ in range(3)] == [200] * 3
        (p,) = policies_of(gw, ConcurrencyLimitPolicy)
        assert p.held == {} and p.counters.acquire(p.prefix, 2, 1)[1] == 1  # nothing else in use


async def test_concurrency_place_is_released_when_the_client_leaves(loop):
    gate = Gate()
    async with Upstream(gate) as up, gateway(cc_doc(up, limit=1, status=503)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        await gate.wait_for(1)
        r = parse_responses(await raw(gw.port, b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
        assert r[0][0] == 503
        # the client goes away (a reset) while its request is upstream; a FIN alone is a half-close the
        # gateway answers through, so the place would be held until the upstream answers
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        while up.open:  # the gateway drops the upstream connection in the same callback as the done hooks
            await asyncio.sleep(0.01)
        r = parse_responses(await raw(gw.port, b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
        assert r[0][0] == 200


async def test_concurrency_place_is_released_after_a_body_refusal(loop):
    gate = Gate()
    async with Upstream(gate) as up:
        doc = cc_doc(up, limit=1)
        doc["routes"][0]["policies"].append({"type": "json-threat", "body_limit": 16})
        async with gateway(doc) as gw:
            # the place is taken after the head; the body is refused (413) while it is read
            req = (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                   b"\r\n20\r\n" + b"[" + b"1," * 15 + b"1" + b"\r\n0\r\n\r\n")
            assert parse_responses(await raw(gw.port, req))[0][0] == 413
            ok = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 2\r\n" \
                 b"Connection: close\r\n\r\n[]"
            assert parse_responses(await raw(gw.port, ok))[0][0] == 200


async def test_concurrency_per_consumer_and_ip(loop):
    gate = Gate()
    async with Upstream(gate) as up, gateway(cc_doc(up, limit=1, key="consumer")) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        url = f"http://127.0.0.1:{gw.port}"
        held = asyncio.ensure_future(c.get(url + "/slow", headers={"X-User": "alice"}))
        await gate.wait_for(1)
        assert (await c.get(url + "/fast", headers={"X-User": "alice"})).status_code == 429
        assert (await c.get(url + "/fast", headers={"X-User": "bob"})).status_code == 200
        assert (await c.get(url + "/fast")).status_code == 200  # no consumer: keyed by IP
        gate.release_all()
        assert (await held).status_code == 200
    gate = Gate()
    async with Upstream(gate) as up, gateway(cc_doc(up, limit=1, key="ip")) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        url = f"http://127.0.0.1:{gw.port}"
        held = asyncio.ensure_future(c.get(url + "/slow", headers={"X-User": "alice"}))
        await gate.wait_for(1)
        assert (await c.get(url + "/fast", headers={"X-User": "bob"})).status_code == 429  # same IP
        gate.release_all()
        assert (await held).status_code == 200


async def test_concurrency_pipelined_requests_are_all_given_back(loop):
    """Pipelined requests run their request hooks when parsed: each must get its done hook, even when an
    earlier response closes the connection."""
    gate = Gate()
    async with Upstream(gate) as up, gateway(cc_doc(up, limit=3)) as gw, httpx.AsyncClient(timeout=10) as c:
        resp = await raw(gw.port, b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                  b"GET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n")
        assert parse_responses(resp)[0][0] == 200
        url = f"http://127.0.0.1:{gw.port}"
        held = [asyncio.ensure_future(c.get(url + "/slow")) for _ in range(3)]
        await gate.wait_for(3)
        gate.release_all()
        assert [(await f).status_code for f in held] == [200] * 3


async def test_policies_attached_to_a_consumer_and_to_a_plan(loop):
    """A consumer's own policies and its plan's run right after authentication."""
    import hashlib

    import httpx

    from tests.harness import Upstream, config, gateway

    def key(k: str) -> str:
        return "sha256:" + hashlib.sha256(k.encode()).hexdigest()

    doc = config(
        routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": [{"type": "key-auth"}]}],
        upstreams=[],
        plans=[{"name": "bronze", "policies": [{"type": "rate-limit", "rate": 2, "per": 60, "key": "consumer"}]}],
        consumers=[{"username": "alice", "plan": "bronze", "keys": [key("a")]},
                   {"username": "bob", "keys": [key("b")],
                    "policies": [{"type": "request-termination", "status": 403, "json": {"error": "suspended"}}]},
                   {"username": "carol", "keys": [key("c")]}])
    async with Upstream() as up:
        doc["upstreams"] = [{"name": "u", "targets": [{"address": up.address}]}]
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            url = f"http://127.0.0.1:{gw.port}/x"
            alice = [(await c.get(url, headers={"apikey": "a"})).status_code for _ in range(3)]
            assert alice == [200, 200, 429]  # the plan's limit
            assert (await c.get(url, headers={"apikey": "b"})).status_code == 403  # bob's own policy
            assert [(await c.get(url, headers={"apikey": "c"})).status_code for _ in range(3)] == [200] * 3
            assert len(up.requests) == 5


def test_authentication_policies_cannot_attach_to_consumers():
    import pytest

    from fastgate.config.load import load_config
    from fastgate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config({"consumers": [{"username": "a", "policies": [{"type": "key-auth"}]}],
                     "plans": [{"name": "p", "policies": [{"type": "basic-auth"}]}]})
    paths = [i.path for i in err.value.issues]
    assert "$.consumers[0].policies[0].type" in paths and "$.plans[0].policies[0].type" in paths
