"""The usage ledger and the dashboard's time series across nodes (`store.backend: redis`): every
worker of every node counts into Redis, and the control process moves the counts into the store's
`usage` and `metric_series` tables — exactly once.

Workers (`RedisUsageRecorder`): the same per-worker dict as the local recorder (control/analytics.py);
about once a second the pending counts become a batch with a unique id, applied by one Lua script:
`SET <batch id> NX` then `HINCRBY` per (hour, consumer, plan, api) field. A batch whose reply did
not come back (a timeout, a lost connection) is sent again with the SAME id and content until Redis
answers: applied once whatever happened (the id is kept a day). Counts never leave the worker
before Redis said so; a draining worker flushes what it has before it exits.

Control process (`UsageDrainer`, a thread): every few seconds, per hour that has counts, one script
RENAMEs `h:<hour>` to a draining key named by a fresh drain id (new increments start a new hash),
then the drain's counts and its id go into the store in ONE transaction (`usage_drains` remembers the
ids; a transaction of the store in Redis, control/replica.py, so every control node's replica has
them), then the draining key is deleted. After a crash anywhere in between, the next pass finds the
draining key: applied already (its id is in `usage_drains`) → only deleted; not applied → applied.
Usage keys share the hash tag `{usage}` (buckets: hours), series keys `{series}` (buckets: 10 s).
"""
from __future__ import annotations

import asyncio
import contextlib
import encodings.idna  # noqa: F401 - what socket.getaddrinfo imports on first use: never in the sender's thread
import logging
import os
import sqlite3
import threading
import time
import uuid

from ..counters.resp import RedisURL, SyncRedis
from .analytics import SERIES_COLS, UPSERT_USAGE, count_usage
from .replica import ReplicaThread
from .store import StoreError

log = logging.getLogger("fastgate.analytics")

SEP = "\x1f"
APPLY = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  for i = 1, #ARGV, 3 do
    local hour = ARGV[i]
    redis.call('HINCRBY', KEYS[2] .. hour, ARGV[i + 1], tonumber(ARGV[i + 2]))
    redis.call('SADD', KEYS[3], hour)
  end
  return 1
end
return 0
"""
DRAIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('SADD', KEYS[3], KEYS[2])
  return 1
end
redis.call('SREM', KEYS[4], ARGV[1])
return 0
"""


def keys(prefix: str, ns: str = "usage") -> dict[str, str]:
    """The keys of one kind of counts (`usage`: per hour; `series`: per 10 s), one hash tag each."""
    base = prefix + "{" + ns + "}:"
    return {"batch": base + "batch:", "hour": base + "h:", "hours": base + "hours", "draining": base + "draining",
            "drain": base + "d:"}


class _CountsSender:
    """A worker's counts of one kind, sent to Redis in idempotent batches (see the module docstring)."""

    NS = ""
    WHAT = ""

    def __init__(self, url: str, prefix: str, interval: float = 1.0):
        self.url = RedisURL(url)
        self.k = keys(prefix, self.NS)
        self.unsent: list[tuple[str, list]] = []  # batches sent without an answer: sent again, same id
        self.interval = interval
        self._next = 0.0
        self._task = None
        self._conn = None
        self._warned = False
        self.applied = 0  # batches Redis accepted (tests)

    def _take(self) -> list:
        """The pending counts as EVAL arguments (bucket, field, n, ...), and forget them."""
        raise NotImplementedError

    def _batch(self) -> None:
        args = self._take()
        if args:
            self.unsent.append((uuid.uuid4().hex, args))

    def send_soon(self, now: float, force: bool = False) -> None:
        if (now < self._next and not force) or (self._task is not None and not self._task.done()):
            return
        self._next = now + self.interval
        self._batch()
        if self.unsent:
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self.unsent:
            batch_id, args = self.unsent[0]
            try:
                if self._conn is None:
                    from .directory import RespStream

                    self._conn = await RespStream.open(self.url)
                await asyncio.wait_for(self._conn.call(
                    b"EVAL", APPLY, 3, self.k["batch"] + batch_id, self.k["hour"], self.k["hours"], *args), 5.0)
            except (TimeoutError, OSError, ConnectionError) as exc:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if not self._warned:
                    log.warning("%s: Redis %s: %s (counts kept, sent again with the same batch id)", self.WHAT,
                                self.url, exc)
                    self._warned = True
                return
            self.unsent.pop(0)
            self.applied += 1
            self._warned = False

    async def aclose(self) -> None:
        """Draining: what is counted reaches Redis before the worker exits (a few tries)."""
        self._batch()
        for _ in range(20):
            if self._task is not None and not self._task.done():
                await asyncio.gather(self._task, return_exceptions=True)
            if not self.unsent:
                break
            self._task = asyncio.get_running_loop().create_task(self._send())
            await asyncio.gather(self._task, return_exceptions=True)
            if self.unsent:
                await asyncio.sleep(0.1)
        if self.unsent:
            log.error("%s: %d batch(es) not written at exit", self.WHAT, len(self.unsent))
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RedisUsageRecorder(_CountsSender):
    """A worker's ledger counts (the local recorder's interface: record, tick, close)."""

    NS = "usage"
    WHAT = "usage ledger"

    def __init__(self, url: str, prefix: str, interval: float = 1.0):
        super().__init__(url, prefix, interval)
        self.pending: dict[tuple, list[int]] = {}
        self.batch = object()  # replaced with `pending`: see analytics.UsageRecorder
        self.hour = int(time.time()) // 3600

    def record(self, consumer, route, status: int, seconds: float = 0.0) -> None:
        count_usage(self.pending, self.hour, consumer, route, status, seconds)

    def _take(self) -> list:
        args: list = []
        for (hour, consumer, plan, api), (n, e, lat) in self.pending.items():
            field = SEP.join((consumer, plan, api))
            args += [str(hour), field + SEP + "r", n, str(hour), field + SEP + "e", e, str(hour), field + SEP + "l", lat]
        self.pending, self.batch = {}, object()
        return args

    def tick(self, now: float, wall: int, force: bool = False) -> None:
        self.hour = wall // 3600
        self.send_soon(now, force)

    def close(self) -> None:  # the local recorder's interface; the worker awaits aclose() instead
        pass


SLOT = 10  # seconds per time-series bucket


class RedisSeriesRecorder(_CountsSender):
    """A worker's per-route time-series counts (metrics.WorkerMetrics hands them over as it flushes
    its per-route stats): requests by status class, rate-limit refusals, latency sum and buckets."""

    NS = "series"
    WHAT = "time series"

    def __init__(self, url: str, prefix: str, interval: float = 1.0):
        super().__init__(url, prefix, interval)
        self.pending: dict[tuple[int, str, str], int] = {}

    def _add(self, route: str, col: str, n: int) -> None:
        key = (int(time.time()) // SLOT, route, col)
        self.pending[key] = self.pending.get(key, 0) + n

    def route(self, rs) -> None:
        """A RouteStats about to be flushed (its counts since the last flush)."""
        for i, n in enumerate(rs.classes):
            if n:
                self._add(rs.name, f"c{i}", n)
        if any(rs.lat):
            self._add(rs.name, "lat_sum_us", int(rs.lat_sum * 1e6))
            for i, n in enumerate(rs.lat):
                if n:
                    self._add(rs.name, f"b{i}", n)

    def limited(self, route: str, n: int) -> None:
        self._add(route, "limited", n)

    def _take(self) -> list:
        args: list = []
        for (slot, route, col), n in self.pending.items():
            args += [str(slot), route + SEP + col, n]
        self.pending = {}
        return args


class HostEventSender:
    """The supervisor's events (worker restarts, reloads) as time-series counts in Redis, so the
    dashboard counts every node's and not only the control node's. Batches keep their id until
    Redis answers (applied once, as above). The supervisor's select loop only calls `add`: a
    thread of this sender does the sending (`background`), so a slow DNS lookup or an unreachable
    Redis never holds up reaping, respawning or signals; while Redis does not answer it tries
    again every `retry` seconds."""

    def __init__(self, url: str, prefix: str, timeout: float = 0.25, retry: float = 5.0,
                 background: bool = True):
        self.where = (url, prefix)
        self.url = RedisURL(url)
        self.k = keys(prefix, "series")
        self.timeout = timeout
        self.retry = retry
        self.background = background
        self.pending: dict[tuple[int, str], int] = {}
        self.unsent: list[tuple[str, list]] = []
        self._lock = threading.Lock()  # pending: added to by the supervisor, taken by the sender
        self._send_lock = threading.Lock()  # one sender at a time (the thread, or close)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next = 0.0
        self._warned = False

    @contextlib.contextmanager
    def quiet(self, timeout: float = 2.0):
        """Hold the sending still across the supervisor's fork: a child must not inherit a lock that
        this thread held mid-send (an import's, the resolver's, a stream's) and hang on it. Waits for
        a send under way (bounded by the Redis timeout) up to `timeout`; yields whether it did."""
        got = self._send_lock.acquire(timeout=timeout)
        try:
            yield got
        finally:
            if got:
                self._send_lock.release()

    def add(self, col: str, n: int = 1) -> None:
        from .analytics import HOST_ROW

        key = (int(time.time()) // SLOT, HOST_ROW + SEP + col)
        with self._lock:
            self.pending[key] = self.pending.get(key, 0) + n
        if self.background:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="host-events", daemon=True)
                self._thread.start()
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.retry)
            self._wake.clear()
            self.flush()

    def flush(self, now: float | None = None) -> None:
        """Send what is pending; never raises, keeps it on failure."""
        with self._send_lock:
            now = time.monotonic() if now is None else now
            with self._lock:
                pending, self.pending = self.pending, {}
            if pending:
                args: list = []
                for (slot, field), n in pending.items():
                    args += [str(slot), field, n]
                self.unsent.append((uuid.uuid4().hex, args))
            if not self.unsent or now < self._next:
                return
            try:
                r = SyncRedis(self.url, self.timeout)
                try:
                    while self.unsent:
                        batch_id, args = self.unsent[0]
                        r.call("EVAL", APPLY, 3, self.k["batch"] + batch_id, self.k["hour"], self.k["hours"], *args)
                        self.unsent.pop(0)
                finally:
                    r.close()
                self._warned = False
            except Exception as exc:  # noqa: BLE001 - unreachable, not Redis, a bad name: keep, try later
                self._next = now + self.retry
                if not self._warned:
                    log.warning("host events: Redis %s: %s (kept, sent again)", self.url, exc)
                    self._warned = True

    def close(self) -> None:
        """One last try (the supervisor exits, or the store stops being Redis); says what is lost."""
        self._next = 0.0
        self.flush()
        lost = sum(len(args) // 3 for _id, args in self.unsent)
        if lost:
            log.error("host events: %d restart/reload count(s) not written to Redis %s", lost, self.url)


class UsageDrainer(ReplicaThread):
    """In the control process: moves the counts from Redis into the store — the usage ledger's
    and the time series' (`series`: only when `series` is True)."""

    name = "usage-drainer"
    expected = (OSError, ConnectionError, sqlite3.Error, StoreError)

    def __init__(self, store_path: str, url: str, prefix: str, interval: float = 2.0, series: bool = True):
        super().__init__(os.path.abspath(store_path), url, prefix, interval)
        self.url = RedisURL(url)
        self.kinds = [(keys(prefix, "usage"), _apply_usage)] + ([(keys(prefix, "series"), _apply_series)]
                                                               if series else [])
        self.drained = 0

    def step(self, replica) -> None:
        self.drain_once(replica)

    def failed(self, exc: Exception) -> None:
        log.warning("usage ledger: draining Redis %s: %s (retried)", self.url, exc)

    # --- one pass ------------------------------------------------------------------------------
    def drain_once(self, replica) -> int:
        """Move every bucket's counts into the store (through `replica`, a control/replica.Replica:
        every control node's file gets them); returns the number of drains applied."""
        r = SyncRedis(self.url)
        try:
            applied = 0
            for k, apply in self.kinds:
                for dkey in r.call("SMEMBERS", k["draining"]) or []:  # left over from an interrupted pass
                    applied += self._finish(r, replica, k, apply, dkey.decode())
                for bucket in r.call("SMEMBERS", k["hours"]) or []:
                    dkey = f"{k['drain']}{bucket.decode()}:{uuid.uuid4().hex}"
                    if r.call("EVAL", DRAIN, 4, k["hour"] + bucket.decode(), dkey, k["draining"], k["hours"], bucket):
                        applied += self._finish(r, replica, k, apply, dkey)
            return applied
        finally:
            r.close()

    def _finish(self, r, replica, k: dict, apply, dkey: str) -> int:
        drain_id = dkey.rsplit(":", 1)[1]
        bucket = int(dkey.rsplit(":", 2)[1])
        flat = r.call("HGETALL", dkey) or []
        fields = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        # another control node may be finishing the same drain: the store's lock orders the two, and
        # the second finds the first's drain id (an empty key means the first has committed)
        with replica.write() as conn:
            done = conn.execute("SELECT 1 FROM usage_drains WHERE id = ?", (drain_id,)).fetchone() is not None
            if not done:
                apply(conn, bucket, fields)
                conn.execute("INSERT INTO usage_drains (id, at) VALUES (?, ?)", (drain_id, time.time()))
                conn.execute("DELETE FROM usage_drains WHERE at < ?", (time.time() - 7 * 86400,))
        n = 0
        if not done:
            n = 1
            self.drained += 1
        r.call("DEL", dkey)
        r.call("SREM", k["draining"], dkey)
        return n


def _apply_usage(conn: sqlite3.Connection, hour: int, fields: dict[str, int]) -> None:
    rows: dict[tuple, list[int]] = {}
    for field, v in fields.items():
        parts = field.split(SEP)
        if len(parts) != 4 or parts[3] not in ("r", "e", "l"):
            log.error("usage ledger: a field nobody writes in Redis: %r (skipped)", field)
            continue
        consumer, plan, api, kind = parts
        rows.setdefault((hour, consumer, plan, api), [0, 0, 0])["rel".index(kind)] += v
    conn.executemany(UPSERT_USAGE, [(*key, c[0], c[1], c[2]) for key, c in rows.items()])


def _apply_series(conn: sqlite3.Connection, slot: int, fields: dict[str, int]) -> None:
    idx = {c: i for i, c in enumerate(SERIES_COLS)}
    per: dict[str, list[int]] = {}
    for field, v in fields.items():
        route, _, col = field.rpartition(SEP)
        if route and col in idx:
            per.setdefault(route, [0] * len(SERIES_COLS))[idx[col]] += v
    cols = ", ".join(SERIES_COLS)
    sql = (f"INSERT INTO metric_series (res, ts, route, {cols}) VALUES (?, ?, ?, {', '.join('?' for _ in SERIES_COLS)}) "
           f"ON CONFLICT (res, ts, route) DO UPDATE SET {', '.join(f'{c} = {c} + excluded.{c}' for c in SERIES_COLS)}")
    ts = slot * SLOT
    for res in (10, 60):
        conn.executemany(sql, [(res, ts - ts % res, route, *vals) for route, vals in per.items()])
