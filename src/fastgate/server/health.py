"""Target health: passive ejection, circuit breaker and active checks.

Passive (nginx's max_fails/fail_timeout): `max_failures` consecutive failures eject a target for
`eject_for` seconds. Circuit breaker: over a rolling `window`, once `min_requests` were seen and the
failure ratio reaches `failure_ratio`, the breaker opens for `open_for` seconds, then lets one probe
request through (half-open); its result closes or re-opens the breaker. Active: a GET to `path`
every `interval`; `unhealthy_threshold` failures in a row mark a target down and
`healthy_threshold` successes bring it back.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("fastgate.health")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class TargetHealth:
    __slots__ = ("address", "active_up", "_act_ok", "_act_fail", "failures", "max_failures", "eject_for",
                 "ejected_until", "breaker", "b_window", "b_min", "b_ratio", "b_open_for", "b_start",
                 "b_total", "b_failed", "b_until", "b_probe", "fail_statuses")

    def __init__(self, address: str, passive=None, breaker=None):
        self.address = address
        self.active_up = True
        self._act_ok = self._act_fail = 0
        self.failures = 0
        self.max_failures = passive.max_failures if passive is not None else 0
        self.eject_for = passive.eject_for if passive is not None else 0.0
        # responses that count as failures (passive checks and the breaker); default: any 5xx
        self.fail_statuses = frozenset(passive.failure_statuses if passive is not None else range(500, 600))
        self.ejected_until = 0.0
        self.breaker = CLOSED
        self.b_window = breaker.window if breaker else 0.0
        self.b_min = breaker.min_requests if breaker else 0
        self.b_ratio = breaker.failure_ratio if breaker else 0.0
        self.b_open_for = breaker.open_for if breaker else 0.0
        self.b_start = 0.0
        self.b_total = self.b_failed = 0
        self.b_until = 0.0
        self.b_probe = False

    def available(self, now: float) -> bool:
        if not self.active_up or now < self.ejected_until:
            return False
        if self.breaker == CLOSED:
            return True
        if self.breaker == OPEN:
            if now < self.b_until:
                return False
            self.breaker = HALF_OPEN
            self.b_probe = False
        return not self.b_probe  # half-open: exactly one probe in flight

    def on_pick(self) -> None:
        if self.breaker == HALF_OPEN:
            self.b_probe = True

    def report(self, ok: bool, now: float) -> None:
        if ok:
            self.failures = 0
        else:
            self.failures += 1
            if self.max_failures and self.failures >= self.max_failures:
                self.ejected_until = now + self.eject_for
                self.failures = 0
                log.warning("target %s ejected for %.1fs after consecutive failures", self.address, self.eject_for)
        if not self.b_window:
            return
        if self.breaker == HALF_OPEN:
            self.b_probe = False
            if ok:
                self.breaker = CLOSED
                self.b_start, self.b_total, self.b_failed = now, 0, 0
                log.warning("circuit for %s closed", self.address)
            else:
                self._open(now)
            return
        if now - self.b_start > self.b_window:
            self.b_start, self.b_total, self.b_failed = now, 0, 0
        self.b_total += 1
        if not ok:
            self.b_failed += 1
            if self.b_total >= self.b_min and self.b_failed >= self.b_ratio * self.b_total:
                self._open(now)

    def _open(self, now: float) -> None:
        self.breaker = OPEN
        self.b_until = now + self.b_open_for
        log.warning("circuit for %s open for %.1fs", self.address, self.b_open_for)

    def active_result(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> None:
        if ok:
            self._act_fail = 0
            self._act_ok += 1
            if not self.active_up and self._act_ok >= healthy_threshold:
                self.active_up = True
                log.warning("target %s healthy again (active check)", self.address)
        else:
            self._act_ok = 0
            self._act_fail += 1
            if self.active_up and self._act_fail >= unhealthy_threshold:
                self.active_up = False
                log.warning("target %s unhealthy (active check)", self.address)

    def snapshot(self, now: float) -> dict:
        return {"address": self.address, "available": self.available(now), "active_up": self.active_up,
                "ejected": now < self.ejected_until, "circuit": ("closed", "open", "half_open")[self.breaker]}


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
