"""Rate limiting: token bucket (GCRA) or sliding window, per IP, route, API, consumer or header.

Every decision adds the IETF fields (draft-ietf-httpapi-ratelimit-headers) and the familiar ones:
  RateLimit-Policy: "<name>";q=<quota>;w=<window s>     RateLimit: "<name>";r=<remaining>;t=<reset s>
  X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset
A refusal is a 429 with `Retry-After` in whole seconds (rounded up). When the counters backend is
down in fail_closed mode the answer is 503 `counters_unavailable` (never 401 or 429).
"""
from __future__ import annotations

import math

from .._core.headers import find_header
from ..config.schema import RateLimit
from ..counters.local import NS, LocalCounters
from ..errors import CounterBackendError
from ..server.responses import build_error
from .base import register


def policy_field(name: str, quota: int, window_s: float) -> bytes:
    """`RateLimit-Policy: "<name>";q=<quota>;w=<window in whole seconds, at least 1>` (one line)."""
    return f'RateLimit-Policy: "{name}";q={quota};w={max(1, math.ceil(window_s))}\r\n'.encode()


def state_field(name: str, remaining: int, reset_s: int) -> bytes:
    """`RateLimit: "<name>";r=<remaining>;t=<reset s>` (one line)."""
    return b'RateLimit: "%s";r=%d;t=%d\r\n' % (name.encode(), remaining, reset_s)


def x_fields(limit: int, remaining: int, reset_s: int, suffix: bytes = b"") -> bytes:
    """`X-RateLimit-Limit/-Remaining/-Reset` (with `suffix`, e.g. b"-Day": X-RateLimit-Limit-Day...)."""
    return (b"X-RateLimit-Limit%s: %d\r\nX-RateLimit-Remaining%s: %d\r\nX-RateLimit-Reset%s: %d\r\n"
            % (suffix, limit, suffix, remaining, suffix, reset_s))


@register(RateLimit)
class RateLimitPolicy:
    phase = "limits"
    __slots__ = ("counters", "rate", "per", "burst", "sliding", "key_kind", "header", "prefix", "policy_line",
                 "window", "name", "metric_allowed", "metric_limited", "metric_unavailable", "fields_fmt",
                 "gcra_ns", "per_ns", "compiled_request")

    def __init__(self, cfg: RateLimit, ctx):
        backend = cfg.backend
        self.counters = ctx.counters.backend(backend)
        self.rate = cfg.rate
        self.per = cfg.per
        self.burst = cfg.burst or max(1, int(cfg.rate))
        self.sliding = cfg.algorithm == "sliding_window"
        self.key_kind = cfg.key
        self.header = (cfg.header or "").lower().encode()
        # whose bucket: per route / per API for those keys, else per attached policy instance
        # (a global limit by IP counts one bucket per IP across every route)
        if cfg.key == "route":
            scope = f"{ctx.owner}|route:{ctx.route}"
        elif cfg.key == "api":
            scope = f"{ctx.owner}|api:{ctx.api}" if ctx.api else f"{ctx.owner}|route:{ctx.route}"
        else:
            scope = ctx.owner
        self.prefix = f"rl:{scope}:{cfg.key}:".encode()
        # the window over which `burst` requests are allowed from a full bucket
        self.window = self.per if self.sliding else self.burst * self.per / self.rate
        self.name = cfg.key
        r = ctx.route.encode()
        self.metric_allowed, self.metric_limited, self.metric_unavailable = (
            b"rl|%s|allowed" % r, b"rl|%s|limited" % r, b"rl|%s|unavailable" % r)
        quota = int(self.rate) if self.sliding else self.burst
        self.policy_line = policy_field(self.name, quota, self.window)
        # every answer's fields in one %-format: (remaining, reset, remaining, reset)
        # local GCRA: the compiled limiter called straight, in nanoseconds (no wrapper, no float round trip)
        self.gcra_ns = self.counters.limiter.gcra if isinstance(self.counters, LocalCounters) and not self.sliding \
            else None
        self.per_ns = int(cfg.per * NS)
        self.fields_fmt = (self.policy_line.replace(b"%", b"%%") + state_field(self.name, 0, 0).replace(
            b"%", b"%%").replace(b";r=0;t=0", b";r=%d;t=%d") + x_fields(quota, 0, 0).replace(b"%", b"%%").replace(
            b"Remaining: 0", b"Remaining: %d").replace(b"Reset: 0", b"Reset: %d"))
        # the hook the route runs: for the local token bucket, its compiled form (_core/hooks.pyx; this
        # class's `request` is the reference it is tested against), else `request`
        self.compiled_request = None
        parts = tuple(p.replace(b"%%", b"%") for p in self.fields_fmt.split(b"%d"))
        if self.gcra_ns is not None:
            from .._core.hooks import LocalGcra

            self.compiled_request = LocalGcra(
                self.counters.limiter, self.rate, self.per_ns, self.burst, self.key_kind, self.prefix, self.header,
                self.metric_allowed, self.metric_limited, parts, self._refuse).request
        elif not self.sliding and getattr(self.counters, "lease", False) and hasattr(self.counters, "_gcra_leases"):
            from .._core.hooks import RedisLease

            self.compiled_request = RedisLease(self.counters, self.key_kind, self.prefix, self.header,
                                               self.metric_allowed, self.metric_limited, parts, self.request).request

    def _key(self, ex) -> bytes:
        kind = self.key_kind
        if kind == "ip" or (kind == "consumer" and ex.consumer is None):
            return self.prefix + ex.client_ip
        if kind == "consumer":
            return self.prefix + ex.consumer.username.encode()
        if kind == "header":
            return self.prefix + (find_header(ex.headers, self.header) or b"")
        return self.prefix

    def request(self, ex):
        key = self._key(ex)
        gcra = self.gcra_ns
        if gcra is not None:  # the common case, decided here: same answer as _decide, in whole ns
            allowed, remaining, retry_ns, reset_ns = gcra(key, self.rate, self.per_ns, self.burst, 1)
            reset_s = -(-reset_ns // NS) if reset_ns > 0 else 0
            lines = self.fields_fmt % (remaining, reset_s, remaining, reset_s)
            if allowed:
                ex.proto.count(self.metric_allowed)
                ex.resp_extra += lines
                return None
            ex.proto.count(self.metric_limited)
            return self._refuse(ex, lines, retry_ns)
        try:
            if self.sliding:
                r = self.counters.sliding_window(key, int(self.rate), self.per)
            else:
                r = self.counters.gcra(key, self.rate, self.per, self.burst)
        except CounterBackendError:
            return self._unavailable(ex)
        if type(r) is tuple:
            return self._decide(ex, r)
        return self._later(ex, r)

    @staticmethod
    def _refuse(ex, lines: bytes, retry_ns: int):
        return ex.reply(429, "rate_limited", lines + b"Retry-After: %d\r\n" % max(1, -(-retry_ns // NS)))

    async def _later(self, ex, awaitable):
        try:
            r = await awaitable
        except CounterBackendError:
            return self._unavailable(ex)
        return self._decide(ex, r)

    def _decide(self, ex, r):
        allowed, remaining, retry_after, reset = r
        ex.proto.count(self.metric_allowed if allowed else self.metric_limited)
        reset_s = max(0, math.ceil(reset))
        lines = self.fields_fmt % (remaining, reset_s, remaining, reset_s)
        if allowed:
            ex.resp_extra += lines
            return None
        lines += b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after))
        return ex.reply(429, "rate_limited", lines)

    def _unavailable(self, ex):
        ex.proto.count(self.metric_unavailable)
        return build_error(503, "counters_unavailable", ex.request_id, ex.proto.date, not ex.keep_alive)
