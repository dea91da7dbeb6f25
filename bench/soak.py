"""A bounded soak: mixed traffic (successes, errors, upstream timeouts, resets, client aborts, malformed
requests) against `fastgate run --workers 2`, sampling each worker's RSS and open fds from /proc.

    .venv/bin/python bench/soak.py --minutes 5 [--concurrency 24] [--json soak.json]

Verdict (exit 0 when both hold):
  plateau  the workers' total RSS at the end is < 10% above its level after warm-up (the first 20% of
           the run, at least 10 s): mean of the last 20% of samples vs mean of the first 10% after warm-up;
  fds      once the load stops and idle connections time out, each worker's fd count is back to what it
           was before the load (+2 of slack).
The upstream (in this process) answers by path: /ok, /big (64 KiB), /chunked, /slow (past the read
timeout → 504), /reset (aborts → 502), /garbage (→ 502), /hang-body (stalls mid-body → truncated).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
workers: 2
limits: {{header_timeout: 2, body_timeout: 2, keepalive_timeout: 2, send_timeout: 2, max_body_bytes: 65536}}
upstreams:
  - name: up
    targets: [{{address: "127.0.0.1:{up_port}"}}]
    timeouts: {{connect: 1, read: 0.3, write: 1, total: 3}}
    pool: {{max_idle: 16, idle_timeout: 1}}
    retries: 0
    health: {{passive: {{max_failures: 1000000}}}}
routes:
  - {{name: mock, paths: [/mock], mock: {{json: {{hello: world}}}}}}
  - {{name: up, paths: ["/up/*"], upstream: up, strip_path: true}}
  - name: limited
    paths: [/limited]
    mock: {{body: ok}}
    policies: [{{type: rate-limit, rate: 10, per: 1, key: ip}}]
"""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + b"b" * 65536
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the upstream ----------------------------------------------------------------------------------

async def upstream_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            lower = head.lower()
            if b"content-length:" in lower:
                n = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(n)
            elif b"transfer-encoding: chunked" in lower:
                await reader.readuntil(b"0\r\n\r\n")
            if path.startswith(b"/big"):
                writer.write(BIG)
            elif path.startswith(b"/chunked"):
                writer.write(CHUNKED)
            elif path.startswith(b"/slow"):
                await asyncio.sleep(0.6)
                writer.write(OK)
            elif path.startswith(b"/reset"):
                writer.transport.abort()
                return
            elif path.startswith(b"/garbage"):
                writer.write(b"\x00garbage\r\n\r\n")
                return
            elif path.startswith(b"/hang-body"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                await asyncio.sleep(1.0)
                return
            else:
                writer.write(OK)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.transport.abort()


# --- the clients -----------------------------------------------------------------------------------

KINDS = [  # (weight, name)
    (40, "keepalive_ok"), (8, "mock"), (6, "big"), (6, "chunked"), (5, "post"), (4, "not_found"),
    (4, "slow_504"), (4, "reset_502"), (3, "garbage_502"), (3, "hang_body"), (3, "malformed_400"),
    (3, "client_abort"), (3, "limited"), (2, "client_reset"), (2, "pipelined"),
]


async def read_response(reader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(n)
    elif b"transfer-encoding: chunked" in lower:
        await reader.readuntil(b"0\r\n\r\n")
    return status


async def one(port: int, kind: str, stats: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            if kind == "keepalive_ok":
                for _ in range(10):
                    writer.write(b"GET /up/ok HTTP/1.1\r\nHost: soak\r\n\r\n")
                    status = await read_response(reader)
                    stats[status] = stats.get(status, 0) + 1
                return
            req = {
                "mock": b"GET /mock HTTP/1.1\r\nHost: soak\r\n\r\n",
                "big": b"GET /up/big HTTP/1.1\r\nHost: soak\r\n\r\n",
                "chunked": b"GET /up/chunked HTTP/1.1\r\nHost: soak\r\n\r\n",
                "post": b"POST /up/post HTTP/1.1\r\nHost: soak\r\nContent-Length: 1000\r\n\r\n" + b"p" * 1000,
                "not_found": b"GET /nope HTTP/1.1\r\nHost: soak\r\n\r\n",
                "slow_504": b"GET /up/slow HTTP/1.1\r\nHost: soak\r\n\r\n",
                "reset_502": b"GET /up/reset HTTP/1.1\r\nHost: soak\r\n\r\n",
                "garbage_502": b"GET /up/garbage HTTP/1.1\r\nHost: soak\r\n\r\n",
                "hang_body": b"GET /up/hang-body HTTP/1.1\r\nHost: soak\r\n\r\n",
                "malformed_400": b"POST / HTTP/1.1\r\nHost: soak\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "client_abort": b"GET /up/big HTTP/1.1\r\nHost: soak\r\n\r\n",
                "limited": b"GET /limited HTTP/1.1\r\nHost: soak\r\n\r\n",
                "client_reset": b"POST /up/post HTTP/1.1\r\nHost: soak\r\nContent-Length: 5000\r\n\r\nonly-a-bit",
                "pipelined": b"GET /up/ok HTTP/1.1\r\nHost: soak\r\n\r\n" * 3,
            }[kind]
            writer.write(req)
            if kind == "client_abort":
                await reader.readexactly(100)
                writer.transport.abort()
                stats["client_abort"] = stats.get("client_abort", 0) + 1
                return
            if kind == "client_reset":
                await asyncio.sleep(0.05)
                writer.transport.abort()
                stats["client_reset"] = stats.get("client_reset", 0) + 1
                return
            if kind == "hang_body":
                try:
                    await read_response(reader)
                except asyncio.IncompleteReadError:
                    stats["truncated"] = stats.get("truncated", 0) + 1
                return
            for _ in range(3 if kind == "pipelined" else 1):
                status = await read_response(reader)
                stats[status] = stats.get(status, 0) + 1
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        key = f"client_{type(exc).__name__}"
        stats[key] = stats.get(key, 0) + 1
    finally:
        writer.transport.abort()


async def load(port: int, until: float, concurrency: int, stats: dict) -> None:
    population = [k for w, k in KINDS for _ in range(w)]
    rnd = random.Random(1)

    async def client():
        while time.monotonic() < until:
            await one(port, rnd.choice(population), stats)

    await asyncio.gather(*(client() for _ in range(concurrency)))


# --- sampling --------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(workers: list[int]) -> dict:
    return {"t": time.monotonic(), "rss_kb": {p: rss_kb(p) for p in workers}, "fds": {p: fd_count(p) for p in workers}}


# --- the run ---------------------------------------------------------------------------------------

async def soak(minutes: float, concurrency: int = 24, interval: float = 0.0, log=print) -> dict:
    duration = minutes * 60
    interval = interval or max(1.0, duration / 60)
    server = await asyncio.start_server(upstream_conn, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="fastgate-soak-"))
    cfg = tmp / "gw.yaml"
    cfg.write_text(CONFIG.format(up_port=up_port))
    port = free_port()
    logf = open(tmp / "gw.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", str(cfg), "--listen", f"127.0.0.1:{port}",
                             "--pid-file", str(tmp / "gw.pid")], stdout=logf, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while len(children(proc.pid)) < 2 or not await _answers(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("gateway did not start:\n" + (tmp / "gw.log").read_text()[-3000:])
            await asyncio.sleep(0.1)
        workers = children(proc.pid)
        await asyncio.sleep(0.5)
        before = sample(workers)
        log(f"gateway pid {proc.pid}, workers {workers}, upstream :{up_port}; baseline "
            f"rss {sum(before['rss_kb'].values())} kB, fds {before['fds']}")
        stats: dict = {}
        t0 = time.monotonic()
        until = t0 + duration
        samples = []
        task = asyncio.ensure_future(load(port, until, concurrency, stats))
        while not task.done():
            await asyncio.sleep(min(interval, max(0.05, until - time.monotonic())))
            if set(children(proc.pid)) != set(workers):
                raise RuntimeError(f"workers changed (crash?): {workers} -> {children(proc.pid)}")
            s = sample(workers)
            s["t"] -= t0
            s["requests"] = sum(v for k, v in stats.items() if isinstance(k, int))
            samples.append(s)
            log(f"t={s['t']:6.1f}s rss={sum(s['rss_kb'].values()):7d} kB fds={sum(s['fds'].values()):4d} "
                f"requests={s['requests']}")
        await task
        # idle: client keep-alive (2 s) and pooled upstream connections (1 s) time out
        await asyncio.sleep(3.5)
        after = sample(workers)
        return verdict(before, samples, after, stats, duration)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logf.close()
        server.close()
        await server.wait_closed()


async def _answers(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /mock HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        return data.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False


def verdict(before: dict, samples: list[dict], after: dict, stats: dict, duration: float) -> dict:
    warm = max(10.0, 0.2 * duration)
    steady = [s for s in samples if s["t"] >= warm] or samples[-2:]
    total = [sum(s["rss_kb"].values()) for s in steady]
    k = max(1, len(total) // 10)
    first = sum(total[:k]) / k
    last_n = max(1, len(total) // 5)
    last = sum(total[-last_n:]) / last_n
    growth = (last - first) / first if first else 0.0
    fds_ok = all(after["fds"][p] <= before["fds"][p] + 2 for p in before["fds"])
    return {
        "duration_s": duration,
        "requests": samples[-1]["requests"] if samples else 0,
        "outcomes": {str(k): v for k, v in sorted(stats.items(), key=lambda kv: str(kv[0]))},
        "rss_kb_baseline": sum(before["rss_kb"].values()),
        "rss_kb_after_warmup": round(first),
        "rss_kb_end": round(last),
        "rss_kb_peak": max(sum(s["rss_kb"].values()) for s in samples) if samples else 0,
        "rss_growth_after_warmup": round(growth, 4),
        "plateau": growth < 0.10,
        "fds_before": before["fds"],
        "fds_peak": max(sum(s["fds"].values()) for s in samples) if samples else 0,
        "fds_after": after["fds"],
        "fds_back_to_baseline": fds_ok,
        "samples": [{"t": round(s["t"], 1), "rss_kb": sum(s["rss_kb"].values()), "fds": sum(s["fds"].values()),
                     "requests": s["requests"]} for s in samples],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between samples (default: duration/60)")
    ap.add_argument("--json", help="write the full result here")
    args = ap.parse_args(argv)
    result = asyncio.run(soak(args.minutes, args.concurrency, args.interval))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    short = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(short, indent=1))
    ok = result["plateau"] and result["fds_back_to_baseline"]
    print("VERDICT:", "PASS" if ok else "FAIL",
          f"(RSS growth after warm-up {result['rss_growth_after_warmup']:.1%}, fds back: {result['fds_back_to_baseline']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
