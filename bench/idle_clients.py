"""Open N keep-alive client connections to a gateway, make one request on each, then hold them idle.

Prints the number held; the caller measures the gateway worker's RSS before and after.
Usage: python bench/idle_clients.py PORT N HOLD_SECONDS
"""
from __future__ import annotations

import asyncio
import resource
import sys


async def one(port: int, held: list, sem: asyncio.Semaphore) -> None:
    async with sem:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /api/r1/items/1 HTTP/1.1\r\nHost: bench\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            held.append(writer)
        except (OSError, asyncio.IncompleteReadError):
            pass


async def main(port: int, n: int, hold: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list = []
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(one(port, held, sem) for _ in range(n)))
    print(len(held), flush=True)
    await asyncio.sleep(hold)
    for w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
