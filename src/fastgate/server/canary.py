"""Canary and blue-green releases: a route's traffic split between its upstream and a canary.

`route.canary: {upstream, weight, sticky, cookie, release, rollback}` sends `weight` percent of the
route's requests to the canary upstream (0 = none, 100 = all: a blue-green switch). Stickiness keeps
a client on one side: by consumer or client IP (a stable hash, so every worker and node agrees), or
by a cookie the gateway sets on the first answer.

Automatic rollback: every worker adds each canary answer into the host's shared table (the
metrics SharedTable the supervisor maps before forking) under keys per half-window, so the
decision sees the whole host. When, over the last two half-windows, the canary has answered at
least `min_requests` and its share of errors (5xx, including the gateway's own 502/504) or of
answers slower than `max_p99` (more than 1% slower ⇔ p99 above it) is over the threshold, the
worker that sees it sets the rollback flag — a key without expiry, so it outlives reloads — and
logs why. Every worker reads the flag each tick; from then on the route sends nothing to the
canary until the operator changes `release` (a new release, a new flag) or resets it through the
admin API (`POST /canaries/{route}/reset`).
"""
from __future__ import annotations

import logging
import random

from .._core.balance import key_hash
from .._core.shm import monotonic_ns

log = logging.getLogger("fastgate.canary")

REASONS = {1: "error_rate", 2: "p99_latency"}
_MONO = 1_000_000_000


def flag_key(route: str, release: str) -> bytes:
    return b"cn|%s|%s|rb" % (route.encode(), release.encode())


def window_keys(route: str, release: str, slot: int) -> tuple[bytes, bytes, bytes]:
    base = b"cn|%s|%s|%d|" % (route.encode(), release.encode(), slot)
    return base + b"req", base + b"err", base + b"slow"


class Canary:
    __slots__ = ("route", "group", "stable", "share", "sticky", "cookie", "cookie_set", "release", "table",
                 "window_ns", "min_requests", "max_error_rate", "max_p99", "rolled_back", "flag")

    def __init__(self, route_name: str, cfg, group, stable, table):
        self.route = route_name
        self.group = group  # the canary's UpstreamGroup
        self.stable = stable  # the route's own UpstreamGroup
        self.share = int(round(cfg.weight * 100))  # out of 10,000
        self.sticky = cfg.sticky
        self.cookie = cfg.cookie.encode()
        self.cookie_set = b"Set-Cookie: %s=%%s; Path=/; HttpOnly; SameSite=Lax\r\n" % self.cookie
        self.release = cfg.release
        self.table = table  # the host's shared table, or None (a lone worker without one: no rollback)
        rb = cfg.rollback
        self.window_ns = int(rb.window * _MONO / 2) if rb is not None else 0
        self.min_requests = rb.min_requests if rb is not None else 0
        self.max_error_rate = rb.max_error_rate if rb is not None else None
        self.max_p99 = rb.max_p99 if rb is not None else None
        self.flag = flag_key(route_name, cfg.release)
        self.rolled_back = 0
        self.refresh()

    # --- the split ------------------------------------------------------------------------------------
    def choose(self, ex, cookie_header: bytes | None, consumer: bytes | None) -> bool:
        """Whether this request goes to the canary; may add a Set-Cookie line to the response."""
        share = self.share
        if self.rolled_back or share <= 0:
            return False
        if share >= 10000:
            return True
        sticky = self.sticky
        if sticky == "cookie":
            if cookie_header:
                name = self.cookie
                for part in cookie_header.split(b";"):
                    k, _, v = part.strip().partition(b"=")
                    if k == name and v in (b"c", b"s"):
                        return v == b"c"
            pick = random.randrange(10000) < share
            ex.resp_extra += self.cookie_set % (b"c" if pick else b"s")
            return pick
        if sticky == "consumer" and consumer is not None:
            return key_hash(consumer) % 10000 < share
        if sticky in ("consumer", "ip"):
            return key_hash(ex.client_ip) % 10000 < share
        return random.randrange(10000) < share

    # --- outcomes and rollback ----------------------------------------------------------------------
    def record(self, status: int, upstream_seconds: float) -> None:
        """One canary answer; trips the rollback when the window's counts are over a threshold."""
        table = self.table
        if table is None or not self.window_ns or self.rolled_back:
            return
        now = monotonic_ns()
        slot = now // self.window_ns
        ttl = 3 * self.window_ns
        k_req, k_err, k_slow = window_keys(self.route, self.release, slot)
        table.add(k_req, 1, ttl, now)
        if status >= 500 or status == 0:
            table.add(k_err, 1, ttl, now)
        if self.max_p99 is not None and (upstream_seconds < 0 or upstream_seconds > self.max_p99):
            table.add(k_slow, 1, ttl, now)
        req, err, slow = self.window(now)
        if req < self.min_requests:
            return
        reason = 0
        if self.max_error_rate is not None and err > self.max_error_rate * req:
            reason = 1
        elif self.max_p99 is not None and slow > 0.01 * req:
            reason = 2
        if reason and table.get(self.flag) == 0:
            if table.add(self.flag + b"|t", 1) == 1:  # the first worker to trip it sets the reason and says so
                table.add(self.flag, reason)
                slower = f", {slow} slower than {self.max_p99} s" if self.max_p99 is not None else ""
                log.warning("canary of route %s (release %s) rolled back: %s over the last %.0f s — %d answers, "
                            "%d errors%s", self.route, self.release, REASONS[reason], 2 * self.window_ns / _MONO,
                            req, err, slower)
            self.rolled_back = reason

    def window(self, now: int | None = None) -> tuple[int, int, int]:
        """(answers, errors, slow answers) over the current and the previous half-window."""
        table = self.table
        if table is None or not self.window_ns:
            return 0, 0, 0
        now = monotonic_ns() if now is None else now
        slot = now // self.window_ns
        out = [0, 0, 0]
        for s in (slot - 1, slot):
            for i, k in enumerate(window_keys(self.route, self.release, s)):
                out[i] += table.get(k, now)
        return out[0], out[1], out[2]

    def refresh(self) -> None:
        """Read the shared rollback flag (each tick)."""
        if self.table is not None:
            self.rolled_back = self.table.get(self.flag)


def describe(table, route, stable: str) -> dict:
    """A route's canary as the admin API shows it (read from the host's shared table)."""
    c = route.canary
    flag = table.get(flag_key(route.name, c.release)) if table is not None else 0
    doc = {"route": route.name, "upstream": stable, "canary": c.upstream, "weight": c.weight, "sticky": c.sticky,
           "release": c.release, "state": "rolled_back" if flag else ("off" if c.weight <= 0 else "active"),
           "reason": REASONS.get(flag, "error_rate") if flag else None,
           "rollback": None if c.rollback is None else {
               "window": c.rollback.window, "min_requests": c.rollback.min_requests,
               "max_error_rate": c.rollback.max_error_rate, "max_p99": c.rollback.max_p99}}
    if c.rollback is not None and table is not None:
        probe = Canary.__new__(Canary)
        probe.table, probe.route, probe.release = table, route.name, c.release
        probe.window_ns = int(c.rollback.window * _MONO / 2)
        req, err, slow = probe.window()
        doc["window"] = {"requests": req, "errors": err, "slow": slow}
    return doc


def reset(table, route) -> int:
    """Clear a route's rollback flag and the window that tripped it (else the next answer would trip
    it again); returns what the flag was (0: it was not set)."""
    c = route.canary
    key = flag_key(route.name, c.release)
    was = table.get(key)
    if c.rollback is not None:
        now = monotonic_ns()
        half = int(c.rollback.window * _MONO / 2)
        slot = now // half
        for s in (slot - 1, slot, slot + 1):
            for k in window_keys(route.name, c.release, s):
                n = table.get(k, now)
                if n:
                    table.add(k, -n, 3 * half, now)  # expires like the key it zeroes
    if was:
        table.add(key, -was)
    tripped = table.get(key + b"|t")
    if tripped:
        table.add(key + b"|t", -tripped)
    return was
