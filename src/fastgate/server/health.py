"""Active health checks: a GET to each target's `path` every `interval`; the results move each
target's compiled Health (_core/balance.pyx: passive ejection, circuit breaker, active state)."""
from __future__ import annotations

import asyncio


async def probe(host: str, port: int, path: str, host_header: str, timeout: float, statuses) -> bool:
    """One active health check: GET path, True when the status is a healthy one."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
                     f"User-Agent: fastgate-health\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return False
        status = int(parts[1])
        return status in statuses if statuses else 200 <= status < 400
    except (TimeoutError, OSError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


async def run_active_checks(group, cfg) -> None:
    """Loop forever checking every target of an upstream group (cancelled on generation swap)."""
    statuses = frozenset(cfg.healthy_statuses)
    while True:
        results = await asyncio.gather(*(
            probe(t.host, t.port, cfg.path, t.host_header.decode(), cfg.timeout, statuses) for t in group.targets))
        for t, ok in zip(group.targets, results, strict=True):
            t.health.active_result(ok, cfg.healthy_threshold, cfg.unhealthy_threshold)
        await asyncio.sleep(cfg.interval)
