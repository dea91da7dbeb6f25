"""Plans and concurrency, in the `limits` phase (after authentication has found the consumer).

plan-limits: the consumer's plan (top-level `plans:`) applies each of its `rate_limits` (GCRA, per
consumer) and then each of its `quotas`, counted in calendar windows — the UTC hour, day or month —
that all reset at the period's end (a fixed window named by the period, e.g. year*12+month, kept
until then). A request refused by a rate limit uses no quota. Headers as the rate-limit policy's:
one `RateLimit-Policy` and one `RateLimit` line per limit (named "<plan>.rate<i>" and
"<plan>.<period>"), `X-RateLimit-Limit/-Remaining/-Reset` for the limit closest to running out and,
per quota, `X-RateLimit-Limit-Day` (…-Hour, -Month) and friends. An exhausted quota is
`429 {"error": "quota_exceeded", "period": "day"}` with Retry-After until the period ends.
Counts are per attached policy instance (like rate-limit's): attached globally, one count per
consumer across every route; per API, per consumer and API.

concurrency-limit: at most `limit` requests in flight per route, consumer or client IP on this host
(the shared-memory table, whatever `counters.backend` says). A place is taken in the request hook and
given back in the done hook, which runs once per exchange when it finished or its client left.
Over the limit: 429 `concurrency_limited` (or 503 with `status: 503`), Retry-After: 1.
"""
from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from ..config.schema import ConcurrencyLimit, PlanLimits
from ..errors import CounterBackendError
from .base import register
from .limits import policy_field, state_field, x_fields

PERIOD_SUFFIX = {"hour": b"-Hour", "day": b"-Day", "month": b"-Month"}


def period_window(period: str, t: float) -> tuple[int, float, float]:
    """(window id, start, end) of the UTC calendar `period` that holds the epoch time `t`."""
    if period == "hour":
        wid = int(t // 3600)
        return wid, wid * 3600.0, (wid + 1) * 3600.0
    if period == "day":
        wid = int(t // 86400)
        return wid, wid * 86400.0, (wid + 1) * 86400.0
    d = datetime.fromtimestamp(t, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
    return d.year * 12 + d.month - 1, start.timestamp(), end.timestamp()


class _Rate:
    __slots__ = ("tag", "rate", "per", "burst", "name", "policy_line")

    def __init__(self, plan: str, i: int, spec):
        self.tag = b"r%d:" % i
        self.rate = spec.rate
        self.per = spec.per
        self.burst = spec.burst or max(1, int(spec.rate))
        self.name = f"{plan}.rate{i}" if i else f"{plan}.rate"
        self.policy_line = policy_field(self.name, self.burst, self.burst * self.per / self.rate)


class _Quota:
    __slots__ = ("tag", "limit", "period", "name", "policy_line", "suffix", "window")

    def __init__(self, plan: str, i: int, spec, dup: bool):
        self.tag = f"q{i}:{spec.period}:".encode()
        self.limit = spec.limit
        self.period = spec.period
        self.name = f"{plan}.{spec.period}" + (str(i) if dup else "")
        span = {"hour": 3600, "day": 86400, "month": 31 * 86400}[spec.period]
        self.policy_line = policy_field(self.name, spec.limit, span)
        self.suffix = PERIOD_SUFFIX[spec.period]
        self.window = (0, 0.0, -1.0)  # the cached (id, start, end) of the current period


class _Plan:
    __slots__ = ("name", "checks")

    def __init__(self, plan):
        periods = [q.period for q in plan.quotas]
        self.name = plan.name
        self.checks = tuple([_Rate(plan.name, i, r) for i, r in enumerate(plan.rate_limits)]
                            + [_Quota(plan.name, i, q, periods.count(q.period) > 1)
                               for i, q in enumerate(plan.quotas)])


@register(PlanLimits)
class PlanLimitsPolicy:
    phase = "limits"
    __slots__ = ("counters", "require_plan", "prefix", "plans", "now")

    def __init__(self, cfg: PlanLimits, ctx):
        self.counters = ctx.counters.backend(cfg.backend)
        self.require_plan = cfg.require_plan
        self.prefix = f"plan:{ctx.owner}:".encode()
        self.plans = {p.name: _Plan(p) for p in (ctx.config.plans if ctx.config is not None else ())}
        self.now = time.time  # epoch seconds; a test may replace it to cross a period's end

    def request(self, ex):
        c = ex.consumer
        if c is None or not c.plan:
            return ex.reply(403, "plan_required") if self.require_plan else None
        plan = self.plans.get(c.plan)
        if plan is None:  # a consumer from the store naming a plan this config lacks: fail closed
            return ex.reply(403, "unknown_plan", plan=c.plan)
        if not plan.checks:
            return None
        return self._run(ex, plan, self.prefix + c.id.encode() + b":", 0, [])

    def _run(self, ex, plan: _Plan, key: bytes, i: int, seen: list):
        """Checks from i on; `seen` collects (check, remaining, reset s) for the headers."""
        checks = plan.checks
        counters = self.counters
        while i < len(checks):
            chk = checks[i]
            try:
                if type(chk) is _Rate:
                    r = counters.gcra(key + chk.tag, chk.rate, chk.per, chk.burst)
                else:
                    t = self.now()
                    wid, start, end = chk.window
                    if not start <= t < end:
                        chk.window = wid, start, end = period_window(chk.period, t)
                    r = counters.fixed_window(key + chk.tag, chk.limit, wid, end - t + 60.0)
            except CounterBackendError:
                return ex.reply(503, "counters_unavailable")
            if type(r) is not tuple:
                return self._later(ex, plan, key, i, seen, r)
            refusal = self._decide(ex, chk, r, seen)
            if refusal is not None:
                return refusal
            i += 1
        ex.resp_extra += self._lines(seen)
        return None

    async def _later(self, ex, plan, key, i, seen, awaitable):
        try:
            r = tuple(await awaitable)
        except CounterBackendError:
            return ex.reply(503, "counters_unavailable")
        refusal = self._decide(ex, plan.checks[i], r, seen)
        if refusal is not None:
            return refusal
        rest = self._run(ex, plan, key, i + 1, seen)
        if rest is None or type(rest) is bytes:
            return rest
        return await rest

    def _decide(self, ex, chk, r, seen: list) -> bytes | None:
        if type(chk) is _Rate:
            allowed, remaining, retry_after, reset = r
            seen.append((chk, remaining, max(0, math.ceil(reset))))
            if not allowed:
                return ex.reply(429, "rate_limited", self._lines(seen)
                                + b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after)))
            return None
        allowed, remaining = r[0], r[1]
        reset_s = max(1, math.ceil(chk.window[2] - self.now()))
        seen.append((chk, remaining, reset_s))
        if not allowed:
            return ex.reply(429, "quota_exceeded", self._lines(seen) + b"Retry-After: %d\r\n" % reset_s,
                            period=chk.period)
        return None

    @staticmethod
    def _lines(seen: list) -> bytes:
        out = []
        tightest = None
        for chk, remaining, reset_s in seen:
            out.append(chk.policy_line)
            out.append(state_field(chk.name, remaining, reset_s))
            if type(chk) is _Quota:
                out.append(x_fields(chk.limit, remaining, reset_s, chk.suffix))
            if tightest is None or remaining < tightest[1]:
                tightest = (chk, remaining, reset_s)
        chk, remaining, reset_s = tightest
        out.append(x_fields(chk.burst if type(chk) is _Rate else chk.limit, remaining, reset_s))
        return b"".join(out)


@register(ConcurrencyLimit)
class ConcurrencyLimitPolicy:
    phase = "limits"
    __slots__ = ("counters", "limit", "ttl", "key_kind", "prefix", "status", "held")

    def __init__(self, cfg: ConcurrencyLimit, ctx):
        self.counters = ctx.counters.local  # places live in this host's shared table only
        self.limit = cfg.limit
        self.ttl = cfg.ttl
        self.key_kind = cfg.key
        scope = f"{ctx.owner}|route:{ctx.route}" if cfg.key == "route" else ctx.owner
        self.prefix = f"cc:{scope}:{cfg.key}:".encode()
        self.status = cfg.status
        self.held: dict[int, bytes] = {}  # id(exchange) → the key it holds a place under, until done(ex)

    def _key(self, ex) -> bytes:
        kind = self.key_kind
        if kind == "route":
            return self.prefix
        if kind == "consumer" and ex.consumer is not None:
            return self.prefix + b"c:" + ex.consumer.id.encode()
        return self.prefix + b"ip:" + ex.client_ip

    def request(self, ex):
        key = self._key(ex)
        taken, _in_use = self.counters.acquire(key, self.limit, self.ttl)
        if not taken:
            return ex.reply(self.status, "concurrency_limited", b"Retry-After: 1\r\n", limit=self.limit)
        self.held[id(ex)] = key  # the exchange is alive until done(ex) pops it: its id is not reused
        return None

    def done(self, ex) -> None:
        key = self.held.pop(id(ex), None)
        if key is not None:
            self.counters.release(key)
