"""Metrics shared by every worker of a host, and their Prometheus exposition.

The hot path only bumps per-worker C counters (`_core.stats.RouteStats`) and a dict (`WorkerMetrics.inc`);
each worker adds its deltas into shared memory the supervisor mapped before forking (HostMetrics)
once per tick, so a scrape of any worker sees the whole host, and the counts outlive reloads and
worker restarts.

- Per-route series (requests by status class, both latency histograms) live in a dense
  SharedArray: the supervisor numbers routes by name (new names get new numbers at a reload), so
  a route costs RECORD counters of 8 bytes — 10,000 routes take 2.6 MB, whatever the traffic.
- Everything else (rate-limit decisions, policy timings, supervisor and Redis events) lives in a
  SharedTable keyed by b"<family>|<label values joined by |>"; histograms keep one key per bucket
  plus `|sum_us` and `|count`.
Series are named by config objects, so the exposition enumerates them from the config.
"""
from __future__ import annotations

import bisect
import collections
import os

from ._core.shm import SharedArray, SharedTable
from ._core.stats import BUCKETS, RouteStats

BUCKETS_FINE = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)  # policy hooks: µs
CLASSES = (b"1xx", b"2xx", b"3xx", b"4xx", b"5xx")
_CLASS = {i: CLASSES[i - 1] for i in range(1, 6)}


NB = len(BUCKETS) + 1  # histogram slots: one per bucket, then +Inf
# a route's record in the SharedArray: 6 status classes (index = status // 100, 0 = other),
# then for each histogram (gateway, upstream) NB buckets, a sum in µs and a count
RECORD = 6 + 2 * (NB + 2)


def _route_names(cfg) -> list[str]:
    from .config.load import all_routes

    return [r.name for _p, r, _a, _v in all_routes(cfg)] + ["(unmatched)"]


class HostMetrics:
    """The host's shared metrics, made by the supervisor before forking (or by a lone worker)."""

    def __init__(self, cfg, table_slots: int = 16384):
        names = _route_names(cfg)
        self.records = max(1024, 2 * len(names))  # room for routes a reload adds
        self.array = SharedArray(self.records * RECORD)
        self.table = SharedTable(max(table_slots, 8 * len(names)))
        self.index: dict[str, int] = {}
        self.register(cfg)

    def register(self, cfg) -> list[str]:
        """Number the config's routes (kept across reloads); returns names left without a record."""
        full = []
        for name in _route_names(cfg):
            if name not in self.index:
                if len(self.index) >= self.records:
                    full.append(name)
                    continue
                self.index[name] = len(self.index)
        return full


class WorkerMetrics:
    """A worker's not-yet-shared counts. `flush` (each tick) adds them to the host's table."""

    __slots__ = ("host", "table", "pending", "dirty", "counted", "unmatched", "lost", "remote")

    def __init__(self, host: HostMetrics | None):
        self.host = host
        self.table = host.table if host is not None else None
        self.lost = 0  # requests of routes that got no record (more new routes than room)
        self.pending = collections.Counter()
        self.dirty: list[RouteStats] = []  # RouteStats touched since the last flush (the data plane appends)
        # compiled hooks (_core/hooks.pyx) holding counts since the last flush: each drain()s into pending
        self.counted: list = []
        self.unmatched = RouteStats("(unmatched)")
        self.remote = None  # store.backend redis: the time series also go to Redis (control/usage_redis.py)

    def inc(self, key: bytes, n: int = 1) -> None:
        self.pending[key] += n

    def policy(self, route: str, name: str, seconds: float) -> None:
        _observe(self.pending, b"pol|%s|%s" % (route.encode(), name.encode()), seconds, BUCKETS_FINE)

    def flush(self) -> None:
        for hook in self.counted:
            hook.drain(self.pending)
        self.counted.clear()
        if self.host is None:
            return
        add = self.table.add
        arr_add = self.host.array.add
        index = self.host.index
        remote = self.remote
        for rs in self.dirty:
            if remote is not None:
                remote.route(rs)
            i = index.get(rs.name)
            if i is None:
                self.lost += sum(rs.classes)
                rs.reset()
                continue
            rs.flush(arr_add, i * RECORD)
        self.dirty.clear()
        for key, n in self.pending.items():
            add(key, n)
            if remote is not None and key[:3] == b"rl|" and key.endswith(b"|limited"):
                remote.limited(key[3:-8].decode(), n)
        self.pending.clear()


def _observe(p, prefix: bytes, seconds: float, buckets=BUCKETS) -> None:
    i = bisect.bisect_left(buckets, seconds)
    if i < len(buckets):
        p[prefix + b"|b%d" % i] += 1
    p[prefix + b"|count"] += 1
    p[prefix + b"|sum_us"] += int(seconds * 1e6)


def policy_labels(cfg, route, api) -> list[str]:
    """The labels policies/base.py gives the policies attached to `route` (for the exposition)."""
    from .policies.base import attached

    return [f"{p.__struct_config__.tag}@{owner}" for owner, p in attached(cfg, api, route)]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(host: HostMetrics, cfg, gauges: dict[str, list[tuple[dict, float]]] | None = None,
           consumers=()) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of the host's metrics. `consumers`: the names
    the per-consumer series are looked up for (metrics.consumer_label)."""
    from .config.load import all_routes

    get = host.table.get
    aget = host.array.get
    out: list[str] = []
    routes = [(name, host.index[name] * RECORD) for name in _route_names(cfg) if name in host.index]

    out.append("# HELP fastgate_requests_total Requests answered, by route and status class.")
    out.append("# TYPE fastgate_requests_total counter")
    for name, base in routes:
        for i, cls in enumerate(CLASSES, start=1):
            v = aget(base + i)
            if v:
                out.append(f'fastgate_requests_total{{route="{_esc(name)}",status="{cls.decode()}"}} {v}')

    if getattr(getattr(cfg, "metrics", None), "consumer_label", False):
        fam = "fastgate_consumer_requests_total"
        out.append(f"# HELP {fam} Requests answered to an authenticated consumer, by route, consumer and status class.")
        out.append(f"# TYPE {fam} counter")
        names = sorted(set(consumers))
        for name, _base in routes:
            rkey = b"cq|" + name.encode() + b"|"
            for consumer in names:
                ckey = rkey + consumer.encode() + b"|"
                for i, cls in enumerate(CLASSES, start=1):
                    v = get(ckey + b"%d" % i)
                    if v:
                        out.append(f'{fam}{{route="{_esc(name)}",consumer="{_esc(consumer)}",status="{cls.decode()}"}} {v}')

    for h, (fam, what) in enumerate((("fastgate_request_duration_seconds", "at the gateway, head in to response out"),
                                      ("fastgate_upstream_duration_seconds", "from sending upstream to its answer"))):
        out.append(f"# HELP {fam} Latency {what}, by route.")
        out.append(f"# TYPE {fam} histogram")
        for name, base in routes:
            at = base + 6 + h * (NB + 2)
            count = aget(at + NB + 1)
            if not count:
                continue
            label = f'route="{_esc(name)}"'
            acc = 0
            for i, le in enumerate(BUCKETS):
                acc += aget(at + i)
                out.append(f'{fam}_bucket{{{label},le="{le}"}} {acc}')
            out.append(f'{fam}_bucket{{{label},le="+Inf"}} {count}')
            out.append(f"{fam}_sum{{{label}}} {aget(at + NB) / 1e6}")
            out.append(f"{fam}_count{{{label}}} {count}")

    fam = "fastgate_policy_duration_seconds"
    out.append(f"# HELP {fam} Time in each policy's request hook (sampled: one request in 64), by route.")
    out.append(f"# TYPE {fam} histogram")
    for _p, r, _a, _v in all_routes(cfg):
        for label in policy_labels(cfg, r, _a):
            prefix = b"pol|%s|%s" % (r.name.encode(), label.encode())
            count = get(prefix + b"|count")
            if not count:
                continue
            lab = f'route="{_esc(r.name)}",policy="{_esc(label)}"'
            acc = 0
            for i, le in enumerate(BUCKETS_FINE):
                acc += get(prefix + b"|b%d" % i)
                out.append(f'{fam}_bucket{{{lab},le="{le}"}} {acc}')
            out.append(f'{fam}_bucket{{{lab},le="+Inf"}} {count}')
            out.append(f"{fam}_sum{{{lab}}} {get(prefix + b'|sum_us') / 1e6}")
            out.append(f"{fam}_count{{{lab}}} {count}")

    out.append("# HELP fastgate_ratelimit_decisions_total Rate-limit decisions, by route and result.")
    out.append("# TYPE fastgate_ratelimit_decisions_total counter")
    for name, _base in routes:
        for result in ("allowed", "limited", "unavailable"):
            v = get(b"rl|%s|%s" % (name.encode(), result.encode()))
            if v:
                out.append(f'fastgate_ratelimit_decisions_total{{route="{_esc(name)}",result="{result}"}} {v}')

    for fam, key, help_ in (
        ("fastgate_worker_restarts_total", b"sup|restarts", "Workers that died and were replaced."),
        ("fastgate_reloads_total", b"sup|reloads", "Configs loaded by SIGHUP / fastgate reload."),
        ("fastgate_reload_failures_total", b"sup|reload_failures", "Reloads refused (invalid config)."),
        ("fastgate_counters_redis_errors_total", b"redis|errors", "Redis counter calls that failed or timed out."),
        ("fastgate_counters_redis_fallbacks_total", b"redis|fallbacks",
         "Decisions made on local counters because Redis was down (fail_open)."),
        ("fastgate_counters_redis_reconnects_total", b"redis|reconnects", "Reconnections to Redis."),
        ("fastgate_counters_table_full_total", None, "Counter inserts that evicted a live key: raise counters.capacity."),
    ):
        out.append(f"# HELP {fam} {help_}")
        out.append(f"# TYPE {fam} counter")
        if key is not None:
            out.append(f"{fam} {get(key)}")
        elif gauges and "table_full" in gauges:
            out.append(f"{fam} {gauges['table_full'][0][1]:g}")
    for fam, series in (gauges or {}).items():
        if fam == "table_full":
            continue
        out.append(f"# TYPE {fam} gauge")
        for labels, value in series:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"{fam}{{{lab}}} {value:g}" if lab else f"{fam} {value:g}")
    out.append(f"# serving worker pid {os.getpid()}")
    return ("\n".join(out) + "\n").encode()
