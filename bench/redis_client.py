"""Client CPU per Redis command: fastgate's pipelining client (counters/resp.py) vs redis-py asyncio.

Starts its own redis-server on a free port (pinned to the last CPU, the client to the first), runs
N commands from C concurrent coroutines on uvloop, and reports the client process's CPU time
(time.process_time) per command, median over rounds. Redis's own CPU is not counted.

    .venv/bin/python bench/redis_client.py [--commands 20000] [--concurrency 64] [--rounds 5]

redis-py is only needed for the comparison: `.venv/bin/pip install -q redis` (skipped if missing).

Subjects
  resp INCR          RespConnection.execute("INCR", k): generic packing, one future per command
  resp INCR direct   the same, each command written at once instead of one write per loop iteration
  counters gcra      RedisCounters.gcra in exact mode: EVALSHA of the GCRA script, tuple result
  counters lease     RedisCounters.gcra in lease mode (lease_size 10): mostly no round trip
  redis-py INCR      redis.asyncio.Redis.incr (connection pool: one connection per concurrent command)
  redis-py EVALSHA   redis.asyncio.Redis.evalsha of the same GCRA script
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import uvloop  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

from fastgate.counters.redis import GCRA_LUA, RedisCounters  # noqa: E402
from fastgate.counters.resp import RedisURL, connect  # noqa: E402


async def run_concurrently(n: int, concurrency: int, one) -> float:
    """CPU seconds of this process to run `one(i)` n times from `concurrency` coroutines."""
    per = n // concurrency

    async def worker(w: int):
        base = w * per
        for i in range(base, base + per):
            await one(i)

    t0 = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.process_time() - t0


async def resp_incr(url: str, n: int, c: int, coalesce: bool) -> float:
    conn = await connect(RedisURL(url), 5.0, 5.0, coalesce=coalesce)
    try:
        return await run_concurrently(n, c, lambda i: conn.execute("INCR", b"bench:incr"))
    finally:
        conn.close()


async def counters_gcra(url: str, n: int, c: int, mode: str) -> float:
    rc = RedisCounters(url, mode=mode, lease_size=10, timeout=5.0)
    await rc.start()
    assert rc.state == "up"

    async def one(i):
        r = rc.gcra(b"bench:%d" % (i & 1023), 1e9, 1.0, 1_000_000)
        if type(r) is not tuple:
            await r

    try:
        return await run_concurrently(n, c, one)
    finally:
        await rc.close()


async def redispy(url: str, n: int, c: int, what: str) -> float:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        sha = await r.script_load(GCRA_LUA)
        await asyncio.gather(*(r.ping() for _ in range(c)))  # open the pool's connections first
        if what == "incr":
            def one(i):
                return r.incr(b"bench:incr")
        else:
            def one(i):
                return r.evalsha(sha, 1, b"bench:{%d}" % (i & 1023), 1000.0, 1000000, 1, 1)
        return await run_concurrently(n, c, one)
    finally:
        await r.aclose()


def measure(name: str, fn, rounds: int, n: int) -> tuple[str, float]:
    samples = []
    for _ in range(rounds):
        loop = uvloop.new_event_loop()
        try:
            samples.append(loop.run_until_complete(fn()) / n * 1e6)
        finally:
            loop.close()
    return name, statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, c = args.commands - args.commands % args.concurrency, args.concurrency
    cpus = sorted(os.sched_getaffinity(0))
    server = RedisServer(port=free_port())
    server.start()
    try:
        if len(cpus) > 1:
            os.sched_setaffinity(server.proc.pid, {cpus[-1]})
            os.sched_setaffinity(0, {cpus[0]})
        url = server.url
        subjects = [
            ("resp INCR", lambda: resp_incr(url, n, c, True)),
            ("resp INCR direct", lambda: resp_incr(url, n, c, False)),
            ("counters gcra (exact)", lambda: counters_gcra(url, n, c, "exact")),
            ("counters gcra (lease)", lambda: counters_gcra(url, n, c, "lease")),
        ]
        try:
            import redis  # noqa: F401

            subjects += [("redis-py INCR", lambda: redispy(url, n, c, "incr")),
                         ("redis-py EVALSHA", lambda: redispy(url, n, c, "evalsha"))]
            missing = ""
        except ImportError:
            missing = "redis-py not installed (.venv/bin/pip install -q redis): its figures are skipped"
        print(f"{n} commands, concurrency {c}, uvloop, median of {args.rounds} rounds; "
              f"client CPU (time.process_time) per command")
        for name, fn in subjects:
            measure(name, fn, 1, n)  # warm up
            label, us = measure(name, fn, args.rounds, n)
            print(f"  {label:24s} {us:7.2f} us/command")
        if missing:
            print(missing)
    finally:
        server.close()


if __name__ == "__main__":
    main()
