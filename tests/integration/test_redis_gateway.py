"""Redis counters through whole gateways: several nodes, several workers each, one Redis; and Redis
failing under load. Real processes, a real redis-server of the test's own, real HTTP clients."""
from __future__ import annotations

import asyncio
import collections
import re
import threading
import time

import httpx
import pytest

from tests.harness import free_port
from tests.integration.test_supervisor import Gateway
from tests.redis_server import RedisServer

LIMIT = 40


def config(redis_url: str, mode: str, on_failure: str = "fail_open", lease_size: int = 5, limit: int = LIMIT,
           metrics_port: int | None = None) -> str:
    metrics = f"\n  - {{kind: metrics, port: {metrics_port}}}" if metrics_port else ""
    return f"""
listeners:
  - {{kind: proxy, port: 8000}}{metrics}
counters:
  backend: redis
  redis: {{url: "{redis_url}", mode: {mode}, lease_size: {lease_size}, timeout: 0.05, on_failure: {on_failure}}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: hi}}}}
  - name: m
    paths: [/m]
    mock: {{body: ok}}
    policies: [{{type: rate-limit, rate: {limit}, per: 3600, key: route}}]
"""


def hammer(urls: list[str], n: int, concurrency: int = 16) -> collections.Counter:
    """n GETs spread over `urls`, each on a fresh connection (so the kernel spreads them over workers)."""

    async def run():
        counts = collections.Counter()
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem, httpx.AsyncClient(timeout=10) as c:
                counts[(await c.get(urls[i % len(urls)])).status_code] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        return counts

    return asyncio.run(run())


@pytest.fixture
def redis():
    with RedisServer() as server:
        yield server


def test_exact_mode_two_nodes_admit_exactly_the_limit(tmp_path, redis):
    gws = []
    try:
        for name in "ab":
            (tmp_path / name).mkdir()
            gws.append(Gateway(tmp_path / name, config(redis.url, "exact"), workers=2))
        urls = [g.url.replace("/hello", "/m") for g in gws]
        assert hammer(urls, 200) == {200: LIMIT, 429: 200 - LIMIT}
    finally:
        for g in gws:
            g.stop()


def test_lease_mode_two_nodes_stay_within_the_stated_bound(tmp_path, redis):
    lease, workers, nodes = 5, 2, 2
    gws = []
    try:
        for name in "ab":
            (tmp_path / name).mkdir()
            gws.append(Gateway(tmp_path / name, config(redis.url, "lease", lease_size=lease), workers=workers))
        urls = [g.url.replace("/hello", "/m") for g in gws]
        counts = hammer(urls, 200)
        assert set(counts) <= {200, 429}
        # no refill within the test (limit per hour): leases can only strand tokens, never add any
        bound = lease * workers * nodes
        assert LIMIT - bound <= counts[200] <= LIMIT, counts
    finally:
        for g in gws:
            g.stop()


class Load:
    """Keep-alive clients hitting a URL in threads; records every status and transport error."""

    def __init__(self, url: str, clients: int = 4):
        self.url = url
        self.statuses: list = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self):
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                try:
                    r = c.get(self.url)
                    self.statuses.append((r.status_code, r.json().get("error") if r.status_code >= 400 else None))
                except httpx.HTTPError as exc:
                    self.statuses.append((0, repr(exc)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def wait(self, n: int, timeout: float = 30) -> list:
        """Wait for n more answers; return them."""
        start = len(self.statuses)
        deadline = time.monotonic() + timeout
        while len(self.statuses) < start + n:
            assert time.monotonic() < deadline, f"load stalled: {len(self.statuses) - start} of {n} answers"
            time.sleep(0.01)
        return self.statuses[start:start + n]


def test_fail_open_redis_stopped_paused_restarted_and_flushed_under_load(tmp_path, redis):
    mport = free_port()
    gw = Gateway(tmp_path, config(redis.url, "exact", "fail_open", limit=10**6, metrics_port=mport), workers=2)
    try:
        with Load(gw.url.replace("/hello", "/m")) as load:
            assert {s for s, _ in load.wait(100)} == {200}
            redis.stop()
            assert {s for s, _ in load.wait(300)} == {200}  # local counters decide meanwhile
            redis.start()
            time.sleep(0.5)
            redis.pause(1000)  # slower than the timeout: the same fallback, then recovery
            assert {s for s, _ in load.wait(200)} == {200}
            redis.command("SCRIPT", "FLUSH")
            assert {s for s, _ in load.wait(200)} == {200}
            redis.command("FLUSHALL")  # every counter gone at once: decisions start afresh, no error
            assert {s for s, _ in load.wait(200)} == {200}
        metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
        fallbacks = [line for line in metrics.splitlines() if line.startswith("fastgate_counters_redis_fallbacks_total")]
        assert fallbacks and float(fallbacks[0].split()[-1]) > 0
        # the workers reconnected by themselves: every decision goes to Redis again. (Counted by
        # Redis's own command statistics: a lone request's bucket expires within milliseconds, so
        # looking for keys would race it.)
        def decisions() -> int:
            stats = redis.command("INFO", "commandstats").decode()
            return sum(int(n) for n in re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", stats))

        deadline = time.monotonic() + 20
        while True:
            before = decisions()
            for _ in range(10):  # fresh connections: either worker
                assert httpx.get(gw.url.replace("/hello", "/m")).status_code == 200
            if decisions() - before == 10:
                break
            assert time.monotonic() < deadline, "decisions still made without Redis after its restart"
            time.sleep(0.1)
    finally:
        gw.stop()


def test_fail_closed_answers_503_with_a_reason_then_recovers(tmp_path, redis):
    gw = Gateway(tmp_path, config(redis.url, "exact", "fail_closed", limit=10**6), workers=2)
    url = gw.url.replace("/hello", "/m")
    try:
        with Load(url) as load:
            assert {s for s, _ in load.wait(50)} == {200}
            redis.stop()
            down = load.wait(100)
            assert (503, "counters_unavailable") in down
            assert {s for s, _ in down} <= {200, 503}  # never 401 or 429, never a transport error
            assert httpx.get(gw.url).status_code == 200  # routes without a limit are untouched
            redis.start()
            deadline = time.monotonic() + 20
            while True:  # back within the reconnect back-off, by itself
                recent = load.wait(20)
                if {s for s, _ in recent} == {200}:
                    break
                assert time.monotonic() < deadline, recent
    finally:
        gw.stop()
