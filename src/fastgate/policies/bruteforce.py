"""Brute-force protection (`auth-failure-limit`): a client whose requests were answered with one of
`statuses` (401 by default: a wrong key, password, signature or token — from a policy or from the
upstream's own login) `max_failures` times within one fixed `window` is refused with 429
`too_many_auth_failures` for `block_for` seconds, before any credential is looked at, so guessing
costs the attacker the block and the gateway nothing.

Counts live in the host's shared table (every worker sees them; they outlive reloads), keyed per
attached policy instance and per client IP (the one real-ip found) or a header's value. A
successful request does not clear the count.
"""
from __future__ import annotations

import math

from .._core.headers import find_header
from .._core.shm import monotonic_ns
from ..config.schema import AuthFailureLimit
from .base import register

NS = 1_000_000_000


@register(AuthFailureLimit)
class AuthFailureLimitPolicy:
    phase = "access"  # before authentication: a blocked client's credentials are never checked
    __slots__ = ("table", "max_failures", "window_ns", "block_ns", "header", "prefix", "statuses", "metric",
                 "before")

    def __init__(self, cfg: AuthFailureLimit, ctx):
        self.table = ctx.counters.local.table
        self.max_failures = cfg.max_failures
        self.window_ns = int(cfg.window * NS)
        self.block_ns = int(cfg.block_for * NS)
        self.header = cfg.header.lower().encode() if cfg.header else None
        self.prefix = f"af:{ctx.owner}:".encode()
        self.statuses = frozenset(cfg.statuses)
        self.metric = b"rl|%s|auth_blocked" % ctx.route.encode()
        # a real-ip declared after this policy in the same chain: apply it first, so the client
        # checked here is the one counted when the answer is known (as ip-restriction does)
        from .access import RealIpPolicy, _real_ips_after

        self.before = tuple(RealIpPolicy(r) for r in _real_ips_after(ctx))

    def _who(self, ex) -> bytes:
        if self.header is not None:
            v = find_header(ex.headers, self.header)
            if v:  # no header: the client IP (else every such client would share one count)
                return b"h:" + v
        return b"ip:" + ex.client_ip

    def request(self, ex):
        for p in self.before:
            p.request(ex)
        now = monotonic_ns()
        until = self.table.get(self.prefix + b"b:" + self._who(ex), now)
        if until == 0 or until <= now:
            return None
        ex.proto.count(self.metric)
        return ex.reply(429, "too_many_auth_failures", b"Retry-After: %d\r\n" % max(1, math.ceil((until - now) / NS)))

    def done(self, ex):
        status = ex.status or (int(ex.local[9:12]) if ex.local else 0)
        if status not in self.statuses:
            return
        now = monotonic_ns()
        who = self._who(ex)
        window = now // self.window_ns
        key = self.prefix + b"f:%d:" % window + who
        table = self.table
        if table.add(key, 1, self.window_ns, now) != self.max_failures:
            return
        # exactly one worker sees the count reach the limit: it blocks the client (the key's value
        # is when the block ends) and starts the count afresh for after the block
        table.add(key, -self.max_failures)
        block = self.prefix + b"b:" + who
        if table.get(block, now) <= now:
            table.add(block, now + self.block_ns - table.get(block, now), self.block_ns, now)
