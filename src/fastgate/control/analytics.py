"""Analytics: the usage ledger (billing, exact) and the host's metrics as a time series.

**Usage ledger.** Each worker counts its answered requests per (hour, consumer, plan, API) in a
dict (`UsageRecorder.record`, one call in protocol `_finish`) and, about once a second, adds them to
the store's `usage` table in ONE transaction (an UPSERT `requests = requests + ?` per key). The
counts leave the worker's memory only once that transaction has committed; a failed or busy commit
keeps them for the next try. So every request a worker answered is added exactly once, whatever
the number of workers; a worker drained by a reload or a stop writes its remainder before exiting.
The bound: a worker that dies without draining (SIGKILL, a crash) loses what it counted since its
last successful write (about one second, more if the store stayed locked meanwhile).

**Time series.** The control process (`Snapshotter`, a thread) reads the host's shared metrics
(metrics.HostMetrics, inherited at fork) every 10 s and writes per route the deltas since the last
snapshot: requests by status class, rate-limit rejections, the gateway latency histogram. It writes
a 10 s row and adds the same deltas into the minute's 60 s row (the downsampling), then prunes 10 s
rows older than an hour and 60 s rows older than a day. The last absolute values are stored in the
same transaction (`analytics_cursor`), so a restarted control process continues without a gap or a
double count (unless the supervisor itself restarted: its counters start again from zero).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time

from ..metrics import BUCKETS, NB, RECORD

log = logging.getLogger("fastgate.analytics")

INTERVAL = 10  # seconds between snapshots
WINDOWS = {"1h": (3600, 10), "1d": (86400, 60)}  # window → (seconds, resolution of its rows)
KEEP = {10: 3600, 60: 86400}
HOST_ROW = "(host)"  # the series row of host-wide counts (worker restarts, reloads)

UPSERT_USAGE = """INSERT INTO usage (hour, consumer, plan, api, requests, errors, lat_sum_us)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour, consumer, plan, api) DO UPDATE SET
    requests = requests + excluded.requests, errors = errors + excluded.errors,
    lat_sum_us = lat_sum_us + excluded.lat_sum_us"""


# --- the workers' side -------------------------------------------------------------------------------
def count_usage(pending: dict, hour: int, consumer, route, status: int, seconds: float) -> None:
    """One answered request into a recorder's pending counts: (hour, consumer, plan, api) →
    [requests, errors, µs]. Anonymous requests are in the metrics, not in the ledger."""
    if consumer is None:
        return
    key = (hour, consumer.username, consumer.plan or "", (route.api or "") if route is not None else "")
    c = pending.get(key)
    if c is None:
        c = pending[key] = [0, 0, 0]
    c[0] += 1
    if status >= 400:
        c[1] += 1
    c[2] += int(seconds * 1e6)


def merge_back(pending: dict, batch: dict) -> None:
    """Counts that were taken but not written go back into pending, merged with what came since."""
    for k, c in batch.items():
        p = pending.get(k)
        if p is None:
            pending[k] = c
        else:
            p[0] += c[0]
            p[1] += c[1]
            p[2] += c[2]


class UsageRecorder:
    """A worker's not-yet-written ledger counts. `record` is the hot path: one dict lookup."""

    __slots__ = ("path", "pending", "batch", "hour", "conn", "_next", "_warned", "interval")

    def __init__(self, path: str, interval: float = 1.0):
        self.path = os.path.abspath(path)
        self.pending: dict[tuple, list[int]] = {}  # (hour, consumer, plan, api) → [requests, errors, µs]
        # replaced with `pending` each time: the data plane keeps the counts lists it found under
        # this token (proxy._count_usage_route) and looks again once it changes
        self.batch = object()
        self.hour = int(time.time()) // 3600
        self.conn: sqlite3.Connection | None = None
        self.interval = interval
        self._next = 0.0
        self._warned = False

    @classmethod
    def for_config(cls, cfg):
        """With `store.backend: redis`, every node counts through Redis (control/usage_redis.py);
        else only with a control process (admin listener), which creates and migrates the store."""
        store = getattr(cfg, "store", None)
        if store is not None and store.backend == "redis":
            from .directory import store_redis_url
            from .usage_redis import RedisUsageRecorder

            return RedisUsageRecorder(store_redis_url(cfg), store.key_prefix)
        if store is None or not any(li.kind == "admin" for li in cfg.listeners):
            return None
        return cls(store.path)

    def record(self, consumer, route, status: int, seconds: float = 0.0) -> None:
        count_usage(self.pending, self.hour, consumer, route, status, seconds)

    def tick(self, now: float, wall: int, force: bool = False) -> None:
        """Called by the worker's tick (`now`: loop time): writes at most every `interval` seconds."""
        self.hour = wall // 3600
        if not self.pending or (now < self._next and not force):
            return
        self._next = now + self.interval
        self.flush()

    def flush(self) -> bool:
        """Add the pending counts to the store in one transaction; keep them if it fails. Never raises."""
        if not self.pending:
            return True
        batch = self.pending
        self.pending, self.batch = {}, object()
        try:
            if self.conn is None:
                if not os.path.exists(self.path):
                    raise sqlite3.OperationalError("the store does not exist yet")
                self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.05, check_same_thread=False)
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(UPSERT_USAGE, [(*k, c[0], c[1], c[2]) for k, c in batch.items()])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._warned = False
            return True
        except sqlite3.Error as exc:
            merge_back(self.pending, batch)
            if not self._warned:
                log.warning("usage ledger: store %s: %s (counts kept, retried)", self.path, exc)
                self._warned = True
            if self.conn is not None and "locked" not in str(exc) and "busy" not in str(exc):
                self.conn.close()
                self.conn = None
            return False

    def close(self) -> None:
        for _ in range(20):  # draining: a busy store gets a few more tries
            if self.flush():
                break
            time.sleep(0.1)
        if self.pending:
            log.error("usage ledger: %d count(s) not written at exit", sum(c[0] for c in self.pending.values()))
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- the control process's side ------------------------------------------------------------------------
SERIES_COLS = ["c0", "c1", "c2", "c3", "c4", "c5", "limited", "lat_sum_us", "restarts", "reloads"] + \
    [f"b{i}" for i in range(NB)]


def read_host(host, cfg) -> dict[str, list[int]]:
    """The host's cumulative counters per route (SERIES_COLS order), plus the HOST_ROW."""
    aget = host.array.get
    get = host.table.get
    out: dict[str, list[int]] = {}
    for name, i in host.index.items():
        base = i * RECORD
        vals = [aget(base + k) for k in range(6)]
        vals.append(get(b"rl|%s|limited" % name.encode()))
        at = base + 6
        vals.append(aget(at + NB))
        vals += [0, 0]
        vals += [aget(at + k) for k in range(NB)]
        out[name] = vals
    out[HOST_ROW] = [0] * 8 + [get(b"sup|restarts"), get(b"sup|reloads")] + [0] * NB
    return out


def _health_keys(cfg) -> list[tuple[str, str]]:
    out = []
    for u in getattr(cfg, "upstreams", None) or []:
        for t in getattr(u, "targets", None) or []:
            addr = t if isinstance(t, str) else getattr(t, "address", None) or getattr(t, "url", None) or str(t)
            out.append((u.name, str(addr)))
    return out


class Analytics:
    """The control process's analytics: snapshots (a thread) and the queries the admin API answers."""

    def __init__(self, path: str, host, cfg, supervisor_pid: int | None):
        self.host = host
        self.cfg = cfg
        # store.backend redis: the series come from every node through Redis (usage_redis.py)
        self.remote_series = getattr(getattr(cfg, "store", None), "backend", "sqlite") == "redis"
        self.supervisor = supervisor_pid or 0
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.last: dict[str, list[int]] = {}
        self._load_cursor()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _load_cursor(self) -> None:
        row = self.conn.execute("SELECT v FROM analytics_cursor WHERE k = 'host'").fetchone()
        if row is not None:
            doc = json.loads(row[0])
            if doc.get("supervisor") == self.supervisor:
                self.last = {k: v for k, v in doc["values"].items() if len(v) == len(SERIES_COLS)}

    def start(self) -> None:
        if self.host is None:
            return
        self.thread = threading.Thread(target=self._run, name="analytics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL - time.time() % INTERVAL):
            try:
                self.snapshot()
            except Exception:  # noqa: BLE001 - keep snapshotting
                log.exception("analytics snapshot failed")

    def _host_values(self) -> dict[str, list[int]]:
        return read_host(self.host, self.cfg)

    def _deltas(self, now_vals: dict[str, list[int]]) -> dict[str, list[int]]:
        out = {}
        for name, vals in now_vals.items():
            old = self.last.get(name)
            d = vals if old is None else [max(0, a - b) for a, b in zip(vals, old, strict=True)]
            if any(d):
                out[name] = d
        return out

    def snapshot(self, at: float | None = None) -> None:
        """Write the deltas since the last snapshot (10 s row + the minute's 60 s row), prune."""
        if self.host is None:
            return
        t = int(at if at is not None else time.time())
        with self.lock:
            vals = self._host_values()
            # store.backend redis: every node's routes and supervisor events (restarts, reloads)
            # come through Redis (the workers' RedisSeriesRecorder, the supervisors'
            # HostEventSender); the cursor still follows this host's values, so a later switch
            # back to sqlite does not write what already went through Redis again
            deltas = {} if self.remote_series else self._deltas(vals)
            cols = ", ".join(SERIES_COLS)
            marks = ", ".join("?" for _ in SERIES_COLS)
            adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in SERIES_COLS)
            sql = (f"INSERT INTO metric_series (res, ts, route, {cols}) VALUES (?, ?, ?, {marks}) "
                   f"ON CONFLICT (res, ts, route) DO UPDATE SET {adds}")
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for res in (10, 60):
                    ts = t - t % res
                    c.executemany(sql, [(res, ts, name, *d) for name, d in deltas.items()])
                    c.execute("DELETE FROM metric_series WHERE res = ? AND ts < ?", (res, t - KEEP[res]))
                c.execute("INSERT INTO analytics_cursor (k, v) VALUES ('host', ?) ON CONFLICT (k) DO UPDATE "
                          "SET v = excluded.v", (json.dumps({"supervisor": self.supervisor, "values": vals}),))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self.last = vals

    # --- queries --------------------------------------------------------------------------------
    def usage(self, consumer: str | None = None, start: int | None = None, end: int | None = None,
              granularity: str = "hour") -> list[dict]:
        """Ledger rows: `start`/`end` are unix seconds (end exclusive), rounded to whole hours."""
        where, args = [], []
        if consumer:
            where.append("consumer = ?")
            args.append(consumer)
        if start is not None:
            where.append("hour >= ?")
            args.append(start // 3600)
        if end is not None:
            where.append("hour < ?")
            args.append(-(-end // 3600))
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        period = "hour" if granularity == "hour" else "(hour / 24) * 24"
        sql = (f"SELECT {period} AS p, consumer, plan, api, SUM(requests), SUM(errors), SUM(lat_sum_us) "
               f"FROM usage{cond} GROUP BY p, consumer, plan, api ORDER BY p, consumer, plan, api")
        with self.lock:
            rows = self.conn.execute(sql, args).fetchall()
        return [{"period": _iso(p * 3600), "granularity": granularity, "consumer": cons, "plan": plan or None,
                 "api": api or None, "requests": n, "errors": e,
                 "avg_latency_ms": round(lat / n / 1000, 3) if n else None}
                for p, cons, plan, api, n, e, lat in rows]

    def summary(self, window: str = "1h", now: float | None = None) -> dict:
        seconds, res = WINDOWS[window]
        t = int(now if now is not None else time.time())
        since = t - seconds
        with self.lock:
            rows = self.conn.execute(
                f"SELECT ts, route, {', '.join(SERIES_COLS)} FROM metric_series WHERE res = ? AND ts >= ? "
                "ORDER BY ts", (res, since - since % res)).fetchall()
            live = self._deltas(self._host_values()) if self.host is not None and not self.remote_series else {}
            top_consumers = self.conn.execute(
                "SELECT consumer, SUM(requests), SUM(errors) FROM usage WHERE hour >= ? GROUP BY consumer "
                "ORDER BY SUM(requests) DESC, consumer LIMIT 10", (since // 3600,)).fetchall()
        now_ts = t - t % res
        rows = [(ts, route, *vals) for ts, route, *vals in rows] + [(now_ts, r, *d) for r, d in live.items()]
        idx = {c: i for i, c in enumerate(SERIES_COLS)}
        nb0 = idx["b0"]
        per_route: dict[str, list[int]] = {}
        points: dict[int, list[int]] = {}
        for ts, route, *vals in rows:
            acc = per_route.setdefault(route, [0] * len(SERIES_COLS))
            for i, v in enumerate(vals):
                acc[i] += v
            p = points.setdefault(ts, [0] * len(SERIES_COLS))
            for i, v in enumerate(vals):
                p[i] += v
        total = [sum(r[i] for r in per_route.values()) for i in range(len(SERIES_COLS))]
        requests = sum(total[idx[f"c{i}"]] for i in range(6))
        series = []
        for ts in range(since - since % res + res, now_ts + 1, res):
            p = points.get(ts, [0] * len(SERIES_COLS))
            n = sum(p[idx[f"c{i}"]] for i in range(6))
            q = _quantiles(p[nb0:nb0 + NB])
            series.append({"ts": ts, "requests": n, "rps": round(n / res, 3),
                           "errors": p[idx["c5"]], "client_errors": p[idx["c4"]],
                           "error_rate": round(p[idx["c5"]] / n, 4) if n else 0.0,
                           "limited": p[idx["limited"]], "restarts": p[idx["restarts"]],
                           "p50": q[0], "p95": q[1], "p99": q[2]})
        q = _quantiles(total[nb0:nb0 + NB])
        routes = []
        for name, acc in per_route.items():
            n = sum(acc[idx[f"c{i}"]] for i in range(6))
            if name == HOST_ROW or not (n or acc[idx["limited"]]):
                continue
            routes.append({"route": name, "requests": n, "status": {f"{i}xx": acc[idx[f"c{i}"]] for i in range(1, 6)},
                           "limited": acc[idx["limited"]]})
        routes.sort(key=lambda r: (-r["requests"], r["route"]))
        host = self.host
        return {
            "window": window, "seconds": seconds, "resolution": res, "now": t,
            "requests": requests, "rps": round(requests / seconds, 4),
            "status": {f"{i}xx": total[idx[f"c{i}"]] for i in range(1, 6)},
            "errors": total[idx["c5"]], "client_errors": total[idx["c4"]],
            "error_rate": round(total[idx["c5"]] / requests, 4) if requests else 0.0,
            "client_error_rate": round(total[idx["c4"]] / requests, 4) if requests else 0.0,
            "latency": {"p50": q[0], "p95": q[1], "p99": q[2],
                        "mean": round(total[idx["lat_sum_us"]] / 1e6 / requests, 6) if requests else None},
            "rate_limited": total[idx["limited"]],
            "worker_restarts": total[idx["restarts"]],
            "worker_restarts_total": host.table.get(b"sup|restarts") if host is not None else None,
            "reloads": total[idx["reloads"]],
            "top_routes": routes[:10],
            "top_consumers": [{"consumer": c, "requests": n, "errors": e} for c, n, e in top_consumers],
            "upstreams": self.upstream_health(),
            "series": series,
        }

    def upstream_health(self) -> list[dict]:
        """Targets of the config's upstreams; `down_workers`: workers that see the target unavailable."""
        get = self.host.table.get if self.host is not None else (lambda _k: 0)
        out = []
        workers = self.cfg.workers if isinstance(self.cfg.workers, int) else None
        for up, addr in _health_keys(self.cfg):
            down = get(b"hl|%s|%s" % (up.encode(), addr.encode()))
            out.append({"upstream": up, "target": addr, "down_workers": max(0, down), "workers": workers,
                        "healthy": down <= 0})
        return out


def _quantiles(buckets: list[int], qs=(0.5, 0.95, 0.99)) -> list[float | None]:
    """Quantiles (seconds) of a latency histogram, interpolated linearly inside the bucket."""
    n = sum(buckets)
    if not n:
        return [None for _ in qs]
    out = []
    for q in qs:
        rank = q * n
        acc = 0
        for i, c in enumerate(buckets):
            if acc + c >= rank and c:
                lo = BUCKETS[i - 1] if i > 0 else 0.0
                hi = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
                out.append(round(lo + (hi - lo) * (rank - acc) / c, 6))
                break
            acc += c
        else:
            out.append(BUCKETS[-1])
    return out


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_time(value: str | None) -> int | None:
    """Unix seconds from an integer or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    import datetime

    v = value.replace("Z", "+00:00")
    d = datetime.datetime.fromisoformat(v)
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.UTC)
    return int(d.timestamp())


def to_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    cols = ["period", "granularity", "consumer", "plan", "api", "requests", "errors", "avg_latency_ms"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in cols})
    return buf.getvalue()
