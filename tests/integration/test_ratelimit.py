"""Rate limiting through real HTTP: headers, 429s, and exact counts shared by worker processes."""
from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys

import httpx

from tests.harness import config, gateway
from tests.integration.test_supervisor import Gateway


def limited(rate, per=60.0, burst=None, **extra) -> dict:
    policy = {"type": "rate-limit", "rate": rate, "per": per, **extra}
    if burst is not None:
        policy["burst"] = burst
    return config(routes=[{"name": "m", "paths": ["/m"], "mock": {"body": "ok"}, "policies": [policy]},
                          {"name": "free", "paths": ["/free"], "mock": {"body": "free"}}])


async def test_token_bucket_headers_and_429(loop):
    async with gateway(limited(5, per=60, burst=5)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/m"
        got = [await c.get(url) for _ in range(7)]
        assert [r.status_code for r in got] == [200] * 5 + [429] * 2
        first = got[0].headers
        assert first["ratelimit-policy"] == '"ip";q=5;w=60'
        assert first["x-ratelimit-limit"] == "5" and first["x-ratelimit-remaining"] == "4"
        assert first["ratelimit"].startswith('"ip";r=4;t=')
        assert [int(r.headers["x-ratelimit-remaining"]) for r in got[:5]] == [4, 3, 2, 1, 0]
        refused = got[5]
        assert refused.json()["error"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1  # whole seconds, rounded up
        assert (await c.get(f"http://127.0.0.1:{gw.port}/free")).status_code == 200  # other routes untouched


async def test_sliding_window_and_header_key(loop):
    doc = limited(3, per=60, algorithm="sliding_window", key="header", header="X-Api-Key")
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/m"
        a = [(await c.get(url, headers={"X-Api-Key": "a"})).status_code for _ in range(4)]
        b = [(await c.get(url, headers={"X-Api-Key": "b"})).status_code for _ in range(4)]
        assert a == [200, 200, 200, 429] and b == [200, 200, 200, 429]


def _hammer(url: str, n: int, concurrency: int = 16) -> collections.Counter:
    async def run():
        counts = collections.Counter()
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:  # a fresh connection each time, so the kernel spreads them over workers
                async with httpx.AsyncClient(timeout=10) as c:
                    counts[(await c.get(url)).status_code] += 1

        await asyncio.gather(*(one() for _ in range(n)))
        return counts

    return asyncio.run(run())


RL_CONFIG = """
routes:
  - {name: hello, paths: [/hello], mock: {body: hi}}
  - name: m
    paths: [/m]
    mock: {body: ok}
    policies: [{type: rate-limit, rate: %d, per: 3600, key: route}]
"""


def test_exactly_the_limit_passes_across_worker_processes(tmp_path):
    gw = Gateway(tmp_path, RL_CONFIG % 50, workers=4)
    try:
        counts = _hammer(gw.url.replace("/hello", "/m"), 200)
        assert counts == {200: 50, 429: 150}
    finally:
        gw.stop()


def test_counts_survive_a_reload(tmp_path):
    gw = Gateway(tmp_path, RL_CONFIG % 30, workers=2)
    try:
        url = gw.url.replace("/hello", "/m")
        assert _hammer(url, 20) == {200: 20}
        before = gw.workers()
        gw.signal(signal.SIGHUP)
        gw.wait_workers(2, exclude=before, timeout=20)
        assert _hammer(url, 20) == {200: 10, 429: 10}
    finally:
        gw.stop()


def test_rate_limit_config_errors_are_reported():
    r = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", "/dev/stdin"], capture_output=True, text=True,
                       input="routes: [{name: a, paths: [/a], mock: {}, policies: [{type: rate-limit, rate: 0, "
                             "key: header}]}]\n")
    assert r.returncode == 1
    assert "$.routes[0].policies[0].rate" in r.stderr


async def test_a_global_limit_counts_across_routes_and_two_limits_keep_separate_buckets(loop):
    doc = config(routes=[{"name": "a", "paths": ["/a"], "mock": {"body": "a"},
                          "policies": [{"type": "rate-limit", "rate": 100, "per": 60},
                                       {"type": "rate-limit", "rate": 2, "per": 60}]},
                         {"name": "b", "paths": ["/b"], "mock": {"body": "b"}}])
    doc["policies"] = [{"type": "rate-limit", "rate": 4, "per": 60}]
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        # route a: its own 2-per-minute limit refuses the third; the 100 limit is a separate bucket
        a = [(await c.get(base + "/a")).status_code for _ in range(3)]
        assert a == [200, 200, 429]
        # the global 4-per-minute limit has counted those 3 (the refused one too: it ran first)
        b = [(await c.get(base + "/b")).status_code for _ in range(3)]
        assert b == [200, 429, 429]
