"""The store across nodes (`store.backend: redis`): Redis holds the record, every control node a replica.

Redis keeps the store as a log of committed transactions and an image of the whole database:

    <prefix>{store}:id     the store's id (a new one when Redis is seeded)
    <prefix>{store}:seq    the number of the last transaction
    <prefix>{store}:log    a stream, one entry per transaction (id "<seq>-0"): its SQL statements with
                           their arguments, as JSON
    <prefix>{store}:image  a hash {seq, data}: the SQLite file as of transaction `seq`
    <prefix>{store}:lock   the writers' lock (SET NX PX, a random token)

Each control node keeps its SQLite file (`store.path`) as a replica: the same code, the same
constraints, the same queries as with `backend: sqlite`. A write (`Replica.write`, what
`Store.tx` is in this mode) takes the lock, brings the replica up to the log's end inside its SQLite
transaction, runs, and appends its statements to the log with a Lua script that checks both the
lock's token and the expected sequence number: a writer whose lock expired (a pause longer than
`LOCK_TTL`) cannot append, and rolls back. Only then does it commit locally. So every replica applies
the same statements in the same order; every value a statement uses (times, ids, hashes) is an
argument computed before it ran, so replaying it gives the same rows. Every other node's follower
(`ReplicaFollower`) applies new entries within `FOLLOW_INTERVAL`.

Every `IMAGE_EVERY` transactions the writer stores an image and trims the log to the last `KEEP`
entries; a replica too far behind, a new one, or one from another store (its id differs) loads the
image. Redis restarted empty: the first node to notice seeds it again from its own replica (a new id
is not made: the others follow the same store). A replica ahead of Redis (Redis lost acknowledged
writes: restored from an older save) loads Redis's image and says so; Redis is the record.

Tables that describe the node, not the store (`analytics_cursor`: what this host's metrics were when
last counted), are kept as they are across an image load. Redis unreachable: reads keep answering
from the replica, writes answer 503 `store_unavailable` (StoreUnavailable).
"""
from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager

from ..counters.resp import RedisURL, SyncRedis
from .store import StoreError, StoreUnavailable, migrate

log = logging.getLogger("fastgate.store")

LOCK_TTL = 10.0  # seconds a writer may hold the lock (a transaction takes milliseconds)
LOCK_WAIT = 3.0  # seconds a writer waits for the lock before answering 503
IMAGE_EVERY = 1000  # transactions between two images
KEEP = 2000  # log entries kept behind the latest image, for replicas a little behind
FOLLOW_INTERVAL = 0.2  # seconds between two looks at the log, on every node
LOCAL_TABLES = ("analytics_cursor",)  # this node's own rows: kept across an image load

APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq ~= tonumber(ARGV[2]) then return -2 end
seq = seq + 1
redis.call('SET', KEYS[2], seq)
redis.call('XADD', KEYS[3], seq .. '-0', 'e', ARGV[3])
return seq
"""
"""KEYS lock, seq, log; ARGV token, the sequence number the writer caught up to, the entry."""

UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[4], 'seq', ARGV[2], 'data', ARGV[3])
return 1
"""
"""KEYS id, seq, log, image; ARGV id, seq, image. Only into a Redis that holds no store."""

IMAGE = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2])
local first = tonumber(ARGV[1]) - tonumber(ARGV[4])
if first > 0 then redis.call('XTRIM', KEYS[2], 'MINID', first .. '-0') end
return 1
"""
"""KEYS image, log, id; ARGV seq, image, id, entries to keep."""


def _is_read(sql: str) -> bool:
    return sql.lstrip()[:6].upper() == "SELECT"


class Recorder:
    """The store's connection in this mode: runs every statement, and notes the ones that change
    something while a replicated transaction is open. A change outside one is a bug, refused."""

    __slots__ = ("conn", "log")

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.log: list | None = None

    def execute(self, sql: str, args=()):
        if self.log is None and not _is_read(sql):
            raise RuntimeError("a change to the store outside a transaction (Store.tx) would not reach other nodes")
        cur = self.conn.execute(sql, args)
        if self.log is not None and not _is_read(sql):
            self.log.append([sql, list(args)])
        return cur

    def executemany(self, sql: str, rows):
        if self.log is None:
            raise RuntimeError("a change to the store outside a transaction (Store.tx) would not reach other nodes")
        rows = [list(r) for r in rows]
        cur = self.conn.executemany(sql, rows)
        self.log.append([sql, rows, 1])
        return cur

    def __getattr__(self, name):
        return getattr(self.conn, name)


class Replica:
    """One SQLite connection's view of the store in Redis. Use it from one thread at a time; every
    thread (the admin API's, the usage drainer's, the follower's) opens its own."""

    def __init__(self, conn: sqlite3.Connection, url: str, prefix: str, *, lock_ttl: float = LOCK_TTL,
                 lock_wait: float = LOCK_WAIT, image_every: int = IMAGE_EVERY, keep: int = KEEP):
        self.conn = conn
        self.rec = Recorder(conn)
        self.url = RedisURL(url)
        k = f"{prefix}{{store}}:"
        self.k_id, self.k_seq, self.k_log = k + "id", k + "seq", k + "log"
        self.k_image, self.k_lock = k + "image", k + "lock"
        self.lock_ttl, self.lock_wait = lock_ttl, lock_wait
        self.image_every, self.keep = image_every, keep
        self._r: SyncRedis | None = None
        self.applied = 0  # entries applied from other writers (for tests and logs)
        self.images_loaded = 0
        conn.execute("CREATE TABLE IF NOT EXISTS replica (k TEXT PRIMARY KEY, v TEXT NOT NULL)")

    # --- Redis ------------------------------------------------------------------------------------
    def _call(self, *args):
        for attempt in (0, 1):
            reused = self._r is not None
            try:
                if self._r is None:
                    self._r = SyncRedis(self.url, timeout=2.0)
                return self._r.call(*args)
            except (OSError, ConnectionError) as exc:  # the connection may be mid-reply: start afresh
                if self._r is not None:
                    self._r.close()
                    self._r = None
                # a kept connection that Redis closed (it restarted): the command never ran, send it again
                if attempt or not reused or not isinstance(exc, (ConnectionError, BrokenPipeError)):
                    raise StoreUnavailable(f"the store's Redis ({self.url}) is unavailable: {exc}") from None

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None

    # --- the replica's own bookkeeping ------------------------------------------------------------
    def _local(self, k: str) -> str | None:
        row = self.conn.execute("SELECT v FROM replica WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    def _set_local(self, k: str, v) -> None:
        self.conn.execute("INSERT INTO replica (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                          (k, str(v)))

    def local_seq(self) -> int:
        return int(self._local("seq") or 0)

    # --- following the log ------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring the replica up to the log's end (outside a transaction): what the follower does."""
        self._begin_caught_up()
        self.conn.execute("COMMIT")

    def _begin_caught_up(self) -> None:
        """Open a write transaction on a replica that has every transaction in the log."""
        self._check_id()
        for _ in range(3):  # at most: the image, then the log past it
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                caught_up = self._apply_pending()
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            if caught_up:
                return
            self.conn.execute("ROLLBACK")
            self._load_image()
        raise StoreUnavailable("this node's replica cannot follow the store in Redis (see the log)")

    def _check_id(self) -> None:
        rid = self._call("GET", self.k_id)
        lid = self._local("id")
        if rid is None:  # a Redis with no store: seed it from this replica (or learn who did)
            if lid is None:
                lid = secrets.token_hex(16)
                self.conn.execute("BEGIN IMMEDIATE")
                self._set_local("id", lid)
                self._set_local("seq", self.local_seq())
                self.conn.execute("COMMIT")
            seq, data = self._image()
            if self._call("EVAL", SEED, 4, self.k_id, self.k_seq, self.k_log, self.k_image, lid, seq, data):
                if seq:  # Redis lost the store (restarted empty): what this node has not followed is gone
                    log.warning("store: Redis %s held no store: seeded it from this node's replica "
                                "(transaction %d)", self.url, seq)
                else:
                    log.info("store: created in Redis %s, from this node's file", self.url)
                return
            rid = self._call("GET", self.k_id)
        if rid is not None and rid.decode() != lid:
            if lid is not None:
                log.warning("store: this node's replica belongs to another store: replaced by Redis's")
            self._load_image()

    def _apply_pending(self) -> bool:
        """Inside a write transaction: apply the log's entries this replica lacks. False when the log
        no longer has them (trimmed, or Redis lost writes): the image is needed."""
        seq = self.local_seq()
        last = int(self._call("GET", self.k_seq) or 0)
        if seq > last:
            log.error("store: this node's replica is at transaction %d, Redis at %d: Redis lost writes; "
                      "this node takes Redis's image", seq, last)
            return False
        while seq < last:
            entries = self._call("XRANGE", self.k_log, f"{seq + 1}-0", "+", "COUNT", 256) or []
            if not entries or int(entries[0][0].split(b"-")[0]) != seq + 1:
                return False
            for eid, fields in entries:
                n = int(eid.split(b"-")[0])
                try:
                    self._replay(json.loads(fields[1]))
                except sqlite3.Error as exc:  # the replica has diverged: start again from the image
                    log.error("store: transaction %d does not apply here (%s): loading the image", n, exc)
                    return False
                seq = n
                self.applied += 1
            self._set_local("seq", seq)
        return True

    def _replay(self, statements: list) -> None:
        for st in statements:
            if len(st) == 3:
                self.conn.executemany(st[0], st[1])
            else:
                self.conn.execute(st[0], st[1])

    # --- images -----------------------------------------------------------------------------------
    def _image(self) -> tuple[int, bytes]:
        mem = sqlite3.connect(":memory:")
        try:
            self.conn.backup(mem)
            row = mem.execute("SELECT v FROM replica WHERE k = 'seq'").fetchone()
            return int(row[0]) if row else 0, mem.serialize()
        finally:
            mem.close()

    def _load_image(self) -> None:
        flat = self._call("HGETALL", self.k_image) or []
        image = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        if b"data" not in image:
            raise StoreUnavailable("the store in Redis has no image to start a replica from")
        mem = sqlite3.connect(":memory:")
        try:
            data = bytearray(image[b"data"])
            if data[18:20] == b"\x02\x02":  # a WAL file's header: an in-memory database cannot open it as such
                data[18:20] = b"\x01\x01"
            mem.deserialize(bytes(data))
            own = {}
            for table in LOCAL_TABLES:
                try:
                    own[table] = self.conn.execute(f"SELECT * FROM {table}").fetchall()
                except sqlite3.OperationalError:  # not in this replica's schema yet
                    pass
            mem.backup(self.conn)
        finally:
            mem.close()
        self.conn.execute("PRAGMA journal_mode = WAL")
        migrate(self.conn)  # an image from an older fastgate: bring it to this one's schema
        self.conn.execute("CREATE TABLE IF NOT EXISTS replica (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.conn.execute("BEGIN IMMEDIATE")
        for table, rows in own.items():
            self.conn.execute(f"DELETE FROM {table}")
            if rows:
                marks = ", ".join("?" for _ in rows[0])
                self.conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        self.conn.execute("COMMIT")
        self.images_loaded += 1
        log.info("store: replica loaded from Redis's image (transaction %s)", image.get(b"seq", b"?").decode())

    def publish_image(self) -> bool:
        seq, data = self._image()
        rid = self._local("id") or ""
        return bool(self._call("EVAL", IMAGE, 3, self.k_image, self.k_log, self.k_id, seq, data, rid, self.keep))

    # --- writing ----------------------------------------------------------------------------------
    @contextmanager
    def write(self):
        """One replicated transaction: yields the recording connection. StoreUnavailable when Redis
        cannot be reached or the lock cannot be had within `lock_wait`."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lock_wait
        while not self._call("SET", self.k_lock, token, "NX", "PX", int(self.lock_ttl * 1000)):
            if time.monotonic() > deadline:
                raise StoreUnavailable("another writer holds the store's lock; try again")
            time.sleep(0.005)
        seq = None
        try:
            self._begin_caught_up()
            try:
                self.rec.log = []
                yield self.rec
                if self.rec.log:
                    entry = json.dumps(self.rec.log, separators=(",", ":"))
                    seq = self._call("EVAL", APPEND, 3, self.k_lock, self.k_seq, self.k_log, token,
                                     self.local_seq(), entry)
                    if seq < 0:
                        raise StoreUnavailable("this write lost the store's lock (it took too long); try again")
                    self._set_local("seq", seq)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            finally:
                self.rec.log = None
        finally:
            try:
                self._call("EVAL", UNLOCK, 1, self.k_lock, token)
            except StoreUnavailable:
                pass  # it expires by itself
        if seq is not None and seq % self.image_every == 0:
            try:
                self.publish_image()
            except StoreUnavailable as exc:
                log.warning("store: image at transaction %d not stored (%s): the next one will be", seq, exc)


class ReplicaFollower:
    """A thread in the control process: applies other nodes' transactions to this node's replica."""

    def __init__(self, path: str, url: str, prefix: str, interval: float = FOLLOW_INTERVAL):
        self.path, self.url, self.prefix, self.interval = path, url, prefix, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replica: Replica | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.replica = Replica(conn, self.url, self.prefix)
        warned = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.replica.sync()
                    if warned:
                        log.info("store: following Redis %s again", self.replica.url)
                    warned = False
                except (StoreError, sqlite3.Error) as exc:
                    if not warned:
                        log.warning("store: cannot follow the store in Redis (%s); retrying", exc)
                        warned = True
                except Exception:  # noqa: BLE001 - a bug or a garbled reply must not end the following
                    log.exception("store: following the store in Redis failed (retried)")
        finally:
            self.replica.close()
            conn.close()
