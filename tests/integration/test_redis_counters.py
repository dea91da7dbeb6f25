"""RedisCounters against a real redis-server of its own: exact counts across "nodes", leases within
their documented bound, NOSCRIPT, outages (stop, kill, pause) and recovery, pipelining."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import httpx
import pytest

from fastgate._core.shm import SharedTable
from fastgate.counters.local import LocalCounters
from fastgate.counters.redis import RedisCounters, key_slot
from fastgate.counters.resp import RedisURL, connect
from fastgate.errors import CounterBackendError
from tests.harness import config, gateway
from tests.redis_server import RedisCluster, RedisServer

pytestmark = pytest.mark.redis

HOUR = 3600.0


@pytest.fixture
def server():
    with RedisServer() as s:
        yield s


@contextlib.asynccontextmanager
async def counters(url: str, **kw):
    kw.setdefault("mode", "exact")
    kw.setdefault("timeout", 1.0)  # generous: a loaded test machine must not look like an outage
    rc = RedisCounters(url, **kw)
    await rc.start()
    try:
        yield rc
    finally:
        await rc.close()


def local() -> LocalCounters:
    return LocalCounters(SharedTable(1024))


async def decide(r, bound: float = 5.0):
    """A decision, awaited if it is not ready (bounded: never hang)."""
    if type(r) is tuple:
        return r
    return await asyncio.wait_for(r, bound)


async def until(predicate, bound: float = 10.0) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), bound)


def calls(server: RedisServer, command: str = "evalsha") -> int:
    """How many times Redis ran `command` since the last CONFIG RESETSTAT."""
    info = server.command("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


# --- exact ---------------------------------------------------------------------------------------
async def test_exact_gcra_allows_exactly_burst_of_concurrent_calls(loop, server):
    async with counters(server.url) as rc:
        assert rc.state == "up"
        got = await asyncio.gather(*(decide(rc.gcra(b"k", 10, HOUR, 10)) for _ in range(50)))
        allowed = [r for r in got if r[0]]
        refused = [r for r in got if not r[0]]
        assert len(allowed) == 10 and len(refused) == 40
        assert sorted(r[1] for r in allowed) == list(range(10))
        t = HOUR / 10  # one token every 360 s
        for _ok, remaining, retry, reset in refused:
            assert remaining == 0 and 0 < retry <= t + 1 and 0 < reset <= 10 * t + 1
        for _ok, _remaining, retry, reset in allowed:
            assert retry == 0 and 0 < reset <= 10 * t + 1
        assert rc.errors == 0 and rc.fallbacks == 0


async def test_exact_decisions_match_local_semantics(loop, server):
    """The same sequence decided by Redis and by the local counters."""
    lc = local()
    async with counters(server.url) as rc:
        for i in range(8):
            r = await decide(rc.gcra(b"same", 3, 60.0, 3))
            lr = lc.gcra(b"same", 3, 60.0, 3)
            assert r[:2] == lr[:2], i
            assert abs(r[2] - lr[2]) < 1 and abs(r[3] - lr[3]) < 1
        r = await decide(rc.gcra(b"cost", 1, 60.0, 5, cost=3))
        assert r[:2] == (True, 2)
        r = await decide(rc.gcra(b"cost", 1, 60.0, 5, cost=3))
        assert r[:2] == (False, 2) and 59 < r[2] <= 60.01


async def test_two_nodes_exact_total_is_the_limit(loop, server):
    async with counters(server.url) as a, counters(server.url) as b:
        gc = [(a if i % 2 else b).gcra(b"shared", 50, HOUR, 50) for i in range(200)]
        sw = [(b if i % 3 else a).sliding_window(b"shared", 30, HOUR) for i in range(100)]
        got_gcra = await asyncio.gather(*(decide(r) for r in gc))
        got_sliding = await asyncio.gather(*(decide(r) for r in sw))
        assert sum(r[0] for r in got_gcra) == 50
        assert sum(r[0] for r in got_sliding) == 30


async def test_sliding_window_exact_counts_and_fields(loop, server):
    async with counters(server.url) as rc:
        got = await asyncio.gather(*(decide(rc.sliding_window(b"sw", 20, HOUR)) for _ in range(50)))
        assert [r[0] for r in got] == [True] * 20 + [False] * 30
        assert [r[1] for r in got[:20]] == list(range(19, -1, -1))
        for _ok, remaining, retry, reset in got[20:]:
            assert remaining == 0 and 0 < retry <= 2 * HOUR and 0 < reset <= HOUR
        assert all(0 < r[3] <= HOUR for r in got)


async def test_sliding_window_weighs_the_previous_window(loop, server):
    """Seed the previous window in Redis; what passes is limit - previous * (its remaining overlap)."""
    window, limit, prev = 3600, 100, 100
    secs, _us = server.command("TIME")
    idx = int(secs) // window
    keys = [b"fastgate:{pw}:sw:0", b"fastgate:{pw}:sw:1"]
    server.command("HSET", keys[(idx - 1) % 2], "w", idx - 1, "n", prev)
    async with counters(server.url) as rc:
        got = await asyncio.gather(*(decide(rc.sliding_window(b"pw", limit, float(window))) for _ in range(150)))
    expected = set()
    for s in (int(secs), int(server.command("TIME")[0])):
        elapsed = s - (s // window) * window
        if s // window == idx:
            for e in (elapsed, elapsed + 1):  # the second changes under us
                expected.add(int(limit - prev * (window - e) / window))
    assert sum(r[0] for r in got) in expected
    assert [r[0] for r in got] == sorted((r[0] for r in got), reverse=True)  # all passes first


async def test_fixed_window_and_key_layout(loop, server):
    async with counters(server.url) as rc:
        got = [await decide(rc.fixed_window(b"fw", 5, 42, 120.0)) for _ in range(7)]
        assert got == [(True, 4), (True, 3), (True, 2), (True, 1), (True, 0), (False, 0), (False, 0)]
        assert await decide(rc.fixed_window(b"fw", 5, 43, 120.0, cost=2)) == (True, 3)
        await decide(rc.gcra(b"g", 1, 60.0, 5))
        await decide(rc.sliding_window(b"s", 5, 60.0))
        keys = sorted(server.command("KEYS", "fastgate:*"))
        assert keys[:3] == [b"fastgate:{fw}:fw:42", b"fastgate:{fw}:fw:43", b"fastgate:{g}"]
        assert keys[3:] in ([b"fastgate:{s}:sw:0"], [b"fastgate:{s}:sw:1"])
        for k in keys:  # every key vanishes by itself
            assert server.command("PTTL", k) > 0
        assert 0 < server.command("PTTL", b"fastgate:{fw}:fw:42") <= 120_000


async def test_pipelining_1000_concurrent_calls_answered_in_order(loop, server):
    async with counters(server.url) as rc:
        got = await asyncio.gather(*(decide(rc.gcra(b"p", 600, HOUR, 600)) for _ in range(1000)))
        assert [r[0] for r in got] == [True] * 600 + [False] * 400
        assert [r[1] for r in got[:600]] == list(range(599, -1, -1))
    conn = await connect(RedisURL(server.url), 1.0, 1.0)
    try:
        replies = await asyncio.gather(*(conn.execute("ECHO", f"m{i}") for i in range(1000)))
        assert replies == [f"m{i}".encode() for i in range(1000)]
    finally:
        conn.close()


async def test_script_flush_mid_run_is_invisible(loop, server):
    for mode in ("exact", "lease"):
        async with counters(server.url, mode=mode, lease_size=3) as rc:
            key = mode.encode()
            first = await asyncio.gather(*(decide(rc.gcra(key, 100, HOUR, 100)) for _ in range(20)))
            server.command("SCRIPT", "FLUSH")
            pending = [rc.gcra(key, 100, HOUR, 100) for _ in range(40)]
            pending += [rc.sliding_window(key, 100, HOUR) for _ in range(20)]
            pending += [rc.fixed_window(key, 100, 1, 60.0) for _ in range(5)]
            await asyncio.sleep(0)  # written to Redis...
            flush = loop.run_in_executor(None, server.command, "SCRIPT", "FLUSH")  # ...while this runs
            second = await asyncio.gather(*(decide(r) for r in pending))
            await flush
            third = await asyncio.gather(*(decide(rc.gcra(key, 100, HOUR, 100)) for _ in range(20)))
            assert all(r[0] for r in first + second + third)
            assert rc.errors == 0 and rc.fallbacks == 0 and rc.state == "up"


# --- lease ---------------------------------------------------------------------------------------
async def test_lease_spends_locally_and_tops_up_before_running_dry(loop, server):
    async with counters(server.url, mode="lease", lease_size=10) as rc:
        server.command("CONFIG", "RESETSTAT")
        waited, held = 0, []
        for _ in range(100):  # a steady worker: each top-up is back before the next request
            r = rc.gcra(b"l", 1000, HOUR, 1000)
            waited += type(r) is not tuple
            assert (await decide(r))[0]
            lease = rc._gcra_leases[b"l"]
            held.append(lease.tokens)
            await until(lambda lease=lease: lease.waiters is None)
            held.append(lease.tokens)
        assert waited == 1  # only the first request waits on Redis
        assert max(held) == 10 and min(held) == 5  # topped up to lease_size once half is spent, never beyond
        assert calls(server) == 1 + 20  # the first fetch, then a top-up of 5 every 5 requests
        server.command("CONFIG", "RESETSTAT")
        got = [await decide(rc.gcra(b"m", 1000, HOUR, 1000)) for _ in range(100)]  # no pause between
        assert all(r[0] for r in got)
        assert 10 <= calls(server) <= 20  # a request that finds the lease empty waits on the top-up
        server.command("CONFIG", "RESETSTAT")
        got = await asyncio.gather(*(decide(rc.gcra(b"herd", 1000, HOUR, 1000)) for _ in range(100)))
        assert all(r[0] for r in got)
        assert calls(server) == 2  # one fetch for the first 10, one more for the 90 that waited on it
        assert rc.max_overshoot == 10


async def test_a_failed_top_up_is_counted_and_not_repeated_at_once(loop, server):
    async with counters(server.url, mode="lease", lease_size=10) as rc:
        assert (await decide(rc.gcra(b"t", 1000, HOUR, 1000)))[0]  # 9 tokens left
        lease = rc._gcra_leases[b"t"]
        server.command("DEL", rc.full_key(b"t"))
        server.command("HSET", rc.full_key(b"t"), "x", "1")  # the script's GET now fails: WRONGTYPE
        server.command("CONFIG", "RESETSTAT")
        for _ in range(4):  # down to 5: the top-up goes, and fails
            assert (await decide(rc.gcra(b"t", 1000, HOUR, 1000)))[0]
        await until(lambda: lease.waiters is None)
        assert rc.errors == 1 and calls(server) == 1
        for _ in range(5):  # the tokens left are spent; no second top-up within the second
            r = rc.gcra(b"t", 1000, HOUR, 1000)
            assert type(r) is tuple and r[0]
            await asyncio.sleep(0.01)  # a top-up, if one were sent, would reach Redis
        await until(lambda: lease.waiters is None)
        assert calls(server) == 1 and lease.tokens == 0 and rc.errors == 1


async def test_lease_refusal_is_remembered_until_a_token_is_due(loop, server):
    async with counters(server.url, mode="lease", lease_size=10) as rc:
        got = [await decide(rc.gcra(b"few", 3, HOUR, 3)) for _ in range(4)]
        assert [r[0] for r in got] == [True, True, True, False]
        assert 0 < got[3][2] <= HOUR / 3 + 1
        server.command("CONFIG", "RESETSTAT")
        more = [rc.gcra(b"few", 3, HOUR, 3) for _ in range(50)]
        assert all(type(r) is tuple and not r[0] for r in more)  # decided at once, no round trip
        assert calls(server) == 0
        sw = [await decide(rc.sliding_window(b"few", 3, HOUR)) for _ in range(5)]
        assert [r[0] for r in sw] == [True, True, True, False, False]


async def test_two_nodes_lease_within_documented_bound(loop, server):
    lease, limit = 4, 60
    async with counters(server.url, mode="lease", lease_size=lease, workers=1) as a, \
            counters(server.url, mode="lease", lease_size=lease, workers=1) as b:
        total = 0
        for wave in range(6):  # concurrent waves, alternating nodes
            rs = [(a if (i + wave) % 2 else b).gcra(b"both", limit, HOUR, limit) for i in range(40)]
            total += sum(r[0] for r in await asyncio.gather(*(decide(r) for r in rs)))
        bound = a.max_overshoot + b.max_overshoot  # lease_size x workers x nodes
        assert limit - bound <= total <= limit + bound
        sw_total = 0
        for wave in range(4):
            rs = [(b if (i + wave) % 2 else a).sliding_window(b"both", 30, HOUR) for i in range(25)]
            sw_total += sum(r[0] for r in await asyncio.gather(*(decide(r) for r in rs)))
        assert 30 - bound <= sw_total <= 30 + bound
        assert a.errors == b.errors == 0


# --- failures --------------------------------------------------------------------------------------
async def test_redis_stopped_fail_open_decides_locally(loop, server, caplog):
    async with counters(server.url, on_failure="fail_open", fallback=local()) as rc:
        assert (await decide(rc.gcra(b"x", 3, HOUR, 3)))[0]
        server.stop()
        got = [await decide(rc.gcra(b"down", 3, HOUR, 3)) for _ in range(5)]
        assert [r[0] for r in got] == [True, True, True, False, False]  # the local counters' decisions
        assert rc.state == "down" and rc.fallbacks == 5 and rc.errors >= 1
        warnings = [r for r in caplog.records if r.name == "fastgate.redis" and r.levelname == "WARNING"]
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # once per outage
        assert type(rc.gcra(b"down", 3, HOUR, 3)) is tuple  # no Redis attempt per request while down
        assert type(rc.sliding_window(b"down-sw", 3, HOUR)) is tuple
        assert (await decide(rc.fixed_window(b"down-fw", 1, 1, 60.0))) == (True, 0)


async def test_redis_stopped_fail_closed_raises(loop, server):
    async with counters(server.url, on_failure="fail_closed", fallback=local()) as rc:
        server.stop()
        for _ in range(3):
            with pytest.raises(CounterBackendError):
                await decide(rc.gcra(b"x", 3, HOUR, 3))
            with pytest.raises(CounterBackendError):
                await decide(rc.sliding_window(b"x", 3, HOUR))
        assert rc.state == "down"
        with pytest.raises(CounterBackendError):
            rc.gcra(b"x", 3, HOUR, 3)  # while down: at once, not on await


async def test_redis_killed_pending_calls_all_fail_at_once(loop, server):
    for on_failure in ("fail_open", "fail_closed"):
        async with counters(server.url, on_failure=on_failure, fallback=local(), timeout=60.0) as rc:
            server.pause(60_000)  # they stay pending (well within the timeout)...
            pending = [rc.gcra(b"k", 10, HOUR, 10) for _ in range(100)]
            await asyncio.sleep(0.1)
            server.kill()  # ...until the connection drops
            got = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
            if on_failure == "fail_open":
                assert sum(r[0] for r in got) == 10  # the local counters decided
            else:
                assert all(isinstance(r, CounterBackendError) for r in got)
            assert rc.state == "down"
            server.start()


async def test_lease_mode_outage_and_recovery(loop, server):
    async with counters(server.url, mode="lease", lease_size=5, fallback=local()) as rc:
        assert (await decide(rc.gcra(b"l", 100, HOUR, 100)))[0]  # 4 tokens left in the lease (for 1 s)
        leased_at = loop.time()
        server.pause(60_000)
        waiting = [rc.gcra(b"other", 100, HOUR, 100) for _ in range(10)]  # one fetch, stuck
        assert sum(type(r) is not tuple for r in waiting) == 10
        got = await asyncio.gather(*(decide(r) for r in waiting))
        assert all(r[0] for r in got) and rc.state == "down" and rc.fallbacks == 10
        spent = [rc.gcra(b"l", 100, HOUR, 100) for _ in range(4)]
        assert all(type(r) is tuple and r[0] for r in spent)
        if loop.time() - leased_at < 0.9:
            assert rc.fallbacks == 10  # leased tokens are still ours while Redis is down
        server.kill()
        server.start()
        await until(lambda: rc.state == "up")
        fallbacks = rc.fallbacks
        got = await asyncio.gather(*(decide(rc.gcra(b"l", 100, HOUR, 100)) for _ in range(3)))
        assert all(r[0] for r in got) and rc.fallbacks == fallbacks
        assert server.command("EXISTS", b"fastgate:{l}") == 1


async def test_close_resolves_what_is_pending(loop, server):
    rc = RedisCounters(server.url, mode="exact", timeout=60.0, on_failure="fail_closed")
    await rc.start()
    server.pause(60_000)
    pending = [rc.gcra(b"k", 1, HOUR, 1) for _ in range(5)]
    await asyncio.sleep(0.05)
    await rc.close()
    got = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
    assert all(isinstance(r, CounterBackendError) for r in got)
    assert rc.state == "down"
    server.kill()


async def test_redis_restarted_state_comes_back_by_itself(loop, server):
    async with counters(server.url, fallback=local()) as rc:
        assert (await decide(rc.gcra(b"before", 1, HOUR, 1)))[0]
        server.stop()
        await decide(rc.gcra(b"x", 1, HOUR, 1))
        assert rc.state == "down"
        server.start()  # same port, empty, no scripts cached
        await until(lambda: rc.state == "up")
        assert rc.reconnects == 1
        fallbacks = rc.fallbacks
        got = await asyncio.gather(*(decide(rc.gcra(b"after", 2, HOUR, 2)) for _ in range(3)))
        assert [r[0] for r in got] == [True, True, False]
        assert server.command("EXISTS", b"fastgate:{after}") == 1  # decided by Redis again
        assert rc.fallbacks == fallbacks


async def test_client_pause_longer_than_timeout_then_recovery(loop, server):
    for on_failure in ("fail_open", "fail_closed"):
        async with counters(server.url, on_failure=on_failure, fallback=local(), timeout=0.05) as rc:
            server.pause(700)
            started = time.monotonic()
            if on_failure == "fail_open":
                r = await decide(rc.gcra(b"p", 5, HOUR, 5))
                assert r[0] and rc.fallbacks == 1
            else:
                with pytest.raises(CounterBackendError):
                    await decide(rc.gcra(b"p", 5, HOUR, 5))
            assert rc.state == "down"
            await until(lambda: rc.state == "up")
            assert time.monotonic() - started > 0.5  # it could not be up while Redis was paused
            assert (await decide(rc.gcra(b"after-pause", 5, HOUR, 5)))[0]
            assert server.command("EXISTS", b"fastgate:{after-pause}") == 1
            server.command("DEL", b"fastgate:{after-pause}")


async def test_start_while_redis_is_down_then_it_comes(loop):
    srv = RedisServer()
    try:
        async with counters(srv.url, fallback=local()) as rc:
            assert rc.state == "down"
            assert (await decide(rc.gcra(b"k", 1, HOUR, 1)))[0]  # local
            srv.start()
            await until(lambda: rc.state == "up")
            assert (await decide(rc.gcra(b"k", 1, HOUR, 1)))[0]  # Redis has its own, fresh count
            assert srv.command("EXISTS", b"fastgate:{k}") == 1
    finally:
        srv.close()


async def test_fail_open_without_fallback_admits(loop, server):
    async with counters(server.url) as rc:
        server.stop()
        assert (await decide(rc.gcra(b"k", 1, HOUR, 1)))[0]
        assert rc.gcra(b"k", 1, HOUR, 1) == (True, 0, 0.0, 0.0)
        assert rc.fixed_window(b"k", 3, 1, 60.0) == (True, 2)


async def test_url_auth_and_database(loop):
    with RedisServer(password="s3cret") as srv:
        url = f"redis://:s3cret@127.0.0.1:{srv.port}/3"
        async with counters(url) as rc:
            assert rc.state == "up"
            assert (await decide(rc.gcra(b"db", 1, HOUR, 1)))[0]
        assert srv.command("EXISTS", b"fastgate:{db}") == 0  # not in db 0
        user_url = f"redis://default:s3cret@127.0.0.1:{srv.port}/3"
        async with counters(user_url) as rc:
            assert (await decide(rc.gcra(b"db", 1, HOUR, 1)))[0] is False  # same db, same count
        async with counters(f"redis://:wrong@127.0.0.1:{srv.port}/3", fallback=local()) as rc:
            assert rc.state == "down" and rc.errors >= 1
            assert (await decide(rc.gcra(b"db", 1, HOUR, 1)))[0]  # decided locally


# --- through the gateway ---------------------------------------------------------------------------
async def test_gateway_rate_limit_on_redis_then_503_when_it_is_gone(loop, server):
    doc = config(routes=[{"name": "m", "paths": ["/m"], "mock": {"body": "ok"},
                          "policies": [{"type": "rate-limit", "rate": 3, "per": 60, "burst": 3}]}],
                 counters={"backend": "redis", "redis": {"url": server.url, "mode": "exact", "timeout": 1.0,
                                                         "on_failure": "fail_closed"}})
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        try:
            url = f"http://127.0.0.1:{gw.port}/m"
            got = [await c.get(url) for _ in range(4)]
            assert [r.status_code for r in got] == [200, 200, 200, 429]
            assert [r.headers["x-ratelimit-remaining"] for r in got] == ["2", "1", "0", "0"]
            keys = server.command("KEYS", "fastgate:*")  # decided in Redis
            assert len(keys) == 1 and keys[0].startswith(b"fastgate:{rl:") and keys[0].endswith(b":127.0.0.1}")
            server.stop()
            r = await c.get(url)
            assert r.status_code == 503 and r.json()["error"] == "counters_unavailable"
        finally:
            await gw.redis.close()


# --- cluster -------------------------------------------------------------------------------------
_runs = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster() as c:
        yield c


def prefix() -> str:
    return f"t{next(_runs)}:"  # each test (and loop) its own keys in the shared cluster


async def test_cluster_counts_exactly_across_nodes(loop, cluster):
    pre = prefix()
    async with counters(cluster.url, key_prefix=pre) as rc:
        assert rc.state == "up" and len(rc._cluster.masters) == 3
        keys = [b"k%d" % i for i in range(30)]
        got = await asyncio.gather(*(decide(rc.gcra(k, 1, HOUR, 5)) for k in keys for _ in range(8)))
        sw = await asyncio.gather(*(decide(rc.sliding_window(k, 3, HOUR)) for k in keys for _ in range(5)))
        fw = await asyncio.gather(*(decide(rc.fixed_window(k, 2, 7, 60.0)) for k in keys for _ in range(4)))
        assert sum(r[0] for r in got) == 30 * 5 and sum(r[0] for r in sw) == 30 * 3
        assert sum(r[0] for r in fw) == 30 * 2
        assert rc.errors == 0 and rc.fallbacks == 0
        owners = {cluster.owner(f"{pre}{{{k.decode()}}}".encode()).port for k in keys}
        assert len(owners) == 3  # the keys really are spread over the nodes
    async with counters(cluster.url, key_prefix=pre, mode="lease", lease_size=4) as rc:
        got = await asyncio.gather(*(decide(rc.gcra(b"lease%d" % i, 1, HOUR, 20)) for i in range(10)
                                     for _ in range(30)))
        assert sum(r[0] for r in got) == 10 * 20 and rc.errors == 0


async def test_cluster_follows_ask_and_moved(loop, cluster):
    pre = prefix()
    async with counters(cluster.url, key_prefix=pre) as rc:
        key = pre.encode()[:-1]  # a slot of its own each run
        name = f"{pre}{{{key.decode()}}}".encode()
        slot = key_slot(name)
        a = cluster.owner(name)
        b = next(n for n in cluster.nodes if n is not a)
        ida, idb = cluster.node_id(a), cluster.node_id(b)
        b.command("CLUSTER", "SETSLOT", slot, "IMPORTING", ida)
        a.command("CLUSTER", "SETSLOT", slot, "MIGRATING", idb)
        assert (await decide(rc.gcra(key, 1, HOUR, 5)))[:2] == (True, 4)  # a: ASK -> b
        assert b.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        assert a.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        for n in [b, a] + [n for n in cluster.nodes if n is not a and n is not b]:
            n.command("CLUSTER", "SETSLOT", slot, "NODE", idb)
        assert (await decide(rc.gcra(key, 1, HOUR, 5)))[:2] == (True, 3)  # a: MOVED -> b, the same count
        assert rc._cluster.slots[slot] == f"127.0.0.1:{b.port}"
        assert (await decide(rc.gcra(key, 1, HOUR, 5)))[:2] == (True, 2)  # straight to b now
        assert rc.errors == 0 and rc.fallbacks == 0


async def test_cluster_node_down_fails_only_its_keys(loop, cluster):
    pre = prefix()
    async with counters(cluster.url, key_prefix=pre, fallback=local()) as rc:
        victim = cluster.nodes[2]
        names = {k: f"{pre}{{{k.decode()}}}".encode() for k in (b"k%d" % i for i in range(100))}
        down_key = next(k for k, n in names.items() if cluster.owner(n) is victim)
        up_key = next(k for k, n in names.items() if cluster.owner(n) is not victim)
        victim.stop()
        try:
            assert (await decide(rc.gcra(down_key, 1, HOUR, 2)))[0]
            assert rc.state == "down" and rc.fallbacks == 1
            assert (await decide(rc.gcra(up_key, 1, HOUR, 2)))[0]
            assert cluster.owner(names[up_key]).command("EXISTS", names[up_key]) == 1  # still decided by Redis
            assert rc.fallbacks == 1
        finally:
            victim.start()
            await loop.run_in_executor(None, cluster.wait_ok)  # a restarted node says CLUSTERDOWN for a while
        await until(lambda: rc.state == "up", 30)
        assert rc.reconnects == 1
        fallbacks = rc.fallbacks
        assert (await decide(rc.gcra(down_key, 1, HOUR, 2)))[0]
        assert victim.command("EXISTS", names[down_key]) == 1 and rc.fallbacks == fallbacks


def test_url_parsing():
    u = RedisURL("redis://us%3Aer:p%40ss@redis.example:6380/2")
    assert (u.host, u.port, u.db, u.username, u.password) == ("redis.example", 6380, 2, "us:er", "p@ss")
    assert "p@ss" not in repr(u)
    u = RedisURL("unix:///run/redis.sock?db=4")
    assert (u.path, u.db) == ("/run/redis.sock", 4)
    with pytest.raises(ValueError):
        RedisURL("http://x")
