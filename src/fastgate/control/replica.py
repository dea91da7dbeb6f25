"""The store across nodes (`store.backend: redis`): Redis holds the record, every control node a replica.

Redis keeps the store as a log of committed transactions and an image of the whole database:

    <prefix>{store}:id     the store's id (made when Redis is first seeded)
    <prefix>{store}:seq    the number of the last transaction; :hash its chain hash
    <prefix>{store}:log    a stream, one entry per transaction (id "<seq>-0"): its SQL statements with
                           their arguments as JSON (e), the chain hash it follows (p) and its own (h)
    <prefix>{store}:image  a hash {seq, data}: the SQLite file as of transaction `seq`
    <prefix>{store}:lock   the writers' lock (SET NX PX, a random token)

Each control node keeps its SQLite file (`store.path`) as a replica: the same code, the same
constraints (foreign keys on every connection, so a replayed delete cascades as it did where it
ran), the same queries as with `backend: sqlite`. A write (`Replica.write`, what `Store.tx` is in
this mode) takes the lock, brings the replica up to the log's end inside its SQLite transaction,
runs, and appends its statements with a Lua script that checks the lock's token, the expected
sequence number and chain hash: a writer whose lock expired (a pause longer than `LOCK_TTL`) cannot
append, and rolls back. Only then does it commit locally. Every value a statement uses (times, ids,
hashes) is an argument computed before it ran, so replaying it gives the same rows. Every node's
follower (`ReplicaFollower`) applies new entries within `FOLLOW_INTERVAL`, each only on top of the
entry it names: a replica that holds a transaction Redis lost (a failover to a Redis replica that
lagged) notices at the next entry and takes Redis's state instead of building on a different past.

Every `IMAGE_EVERY` transactions the writer stores an image and trims the log to the last `KEEP`
entries; a replica too far behind, or a new one, loads the image. A file that belongs to another
store (or to none, with data in it: a node moved from `backend: sqlite`) is copied aside
(`<path>.<id>.<time>.bak`) before it is replaced. A Redis without the store (new, or restarted
empty) is seeded after an election: each control node that notices says how current it is, and
after `ELECTION` seconds the most current one (a former replica before a new file, then the higher
transaction number) seeds it; the others follow. Redis is the record: run it with persistence.

Tables that describe the node, not the store (`analytics_cursor`: what this host's metrics were when
last counted), are kept as they are across an image load. Redis unreachable: reads keep answering
from the replica, writes answer 503 `store_unavailable` (StoreUnavailable) — and when the answer to
an append itself was lost, the error says the outcome is unknown (the log tells: the replica
follows it either way).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
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
ELECTION = 1.0  # seconds the control nodes take to say how current they are before one seeds Redis
LOCAL_TABLES = ("analytics_cursor",)  # this node's own rows: kept across an image load
BATCH = 512  # log entries per XRANGE

APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq ~= tonumber(ARGV[2]) then return -2 end
if (redis.call('GET', KEYS[3]) or '') ~= ARGV[3] then return -3 end
seq = seq + 1
redis.call('SET', KEYS[2], seq)
redis.call('SET', KEYS[3], ARGV[5])
redis.call('XADD', KEYS[4], seq .. '-0', 'e', ARGV[4], 'p', ARGV[3], 'h', ARGV[5])
return seq
"""
"""KEYS lock, seq, hash, log; ARGV token, the sequence number and chain hash the writer caught up
to, the entry, its chain hash."""

UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

PROPOSE = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('PEXPIRE', KEYS[1], ARGV[3]) return 1"

ELECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local best = ''
for _, claim in ipairs(redis.call('HVALS', KEYS[6])) do
  if claim > best then best = claim end
end
if best ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[4], KEYS[6])
redis.call('HSET', KEYS[5], 'seq', ARGV[3], 'data', ARGV[5])
return 1
"""
"""KEYS id, seq, hash, log, image, candidates; ARGV this node's claim, id, seq, hash, image. Seeds a
Redis that holds no store, from the most current replica that said so (the highest claim)."""

IMAGE = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2])
local first = tonumber(ARGV[1]) - tonumber(ARGV[4])
if first > 0 then redis.call('XTRIM', KEYS[2], 'MINID', first .. '-0') end
return 1
"""
"""KEYS image, log, id; ARGV seq, image, id, entries to keep."""


def chain(prev: str, entry: bytes) -> str:
    """The chain hash after `entry`: a replica applies an entry only on top of the one it follows."""
    return hashlib.sha256(prev.encode() + b"\n" + entry).hexdigest()[:32]


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
                 lock_wait: float = LOCK_WAIT, image_every: int = IMAGE_EVERY, keep: int = KEEP,
                 election: float | None = None):
        self.conn = conn
        conn.execute("PRAGMA foreign_keys = ON")  # a replayed DELETE cascades as it did where it ran
        self.rec = Recorder(conn)
        self.url = RedisURL(url)
        k = f"{prefix}{{store}}:"
        self.k_id, self.k_seq, self.k_hash, self.k_log = k + "id", k + "seq", k + "hash", k + "log"
        self.k_image, self.k_lock, self.k_cand = k + "image", k + "lock", k + "candidates"
        self.lock_ttl, self.lock_wait = lock_ttl, lock_wait
        self.image_every, self.keep = image_every, keep
        self.election = ELECTION if election is None else election
        self._r: SyncRedis | None = None
        self.applied = 0  # entries applied from the log (for tests and logs)
        self.images_loaded = 0
        self.backups: list[str] = []  # files kept when this replica was replaced by another store's
        conn.execute("CREATE TABLE IF NOT EXISTS replica (k TEXT PRIMARY KEY, v TEXT NOT NULL)")

    # --- Redis ------------------------------------------------------------------------------------
    def _call(self, *args, resend: bool = True):
        """One command. `resend`: a kept connection that Redis had closed (it restarted) gets the
        command again on a new one — never for a command whose effect must not be guessed at."""
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
                if attempt or not resend or not reused or not isinstance(exc, (ConnectionError, BrokenPipeError)):
                    raise StoreUnavailable(f"the store's Redis ({self.url}) is unavailable: {exc}") from None

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None

    # --- the replica's own bookkeeping ------------------------------------------------------------
    def _local(self) -> tuple[str | None, int, str]:
        """(store id, transaction number, chain hash) of this replica."""
        rows = dict(self.conn.execute("SELECT k, v FROM replica WHERE k IN ('id', 'seq', 'hash')").fetchall())
        return rows.get("id"), int(rows.get("seq") or 0), rows.get("hash") or ""

    def _set_local(self, **values) -> None:
        self.conn.executemany("INSERT INTO replica (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                              [(k, str(v)) for k, v in values.items()])

    def local_seq(self) -> int:
        return self._local()[1]

    def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # another connection holds the file past its busy timeout
            raise StoreUnavailable(f"the store's file is busy ({exc}); try again") from None

    # --- following the log ------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring the replica up to the log's end (outside a transaction): what the follower does."""
        self._catch_up()
        self.conn.execute("COMMIT")

    def _catch_up(self) -> None:
        """Leave a write transaction open on a replica that has the log's transactions (all of them
        while the writers' lock is held; a writer holds it). Entries are fetched before the SQLite
        transaction begins, so the file is locked only while they are applied."""
        for _ in range(4):  # at most: a seed or a foreign file, an image, then the log past it
            rid, last, rhash = self._call("MGET", self.k_id, self.k_seq, self.k_hash)
            lid, seq, lhash = self._local()
            if rid is None:
                self._elect(lid, seq, lhash)
                continue
            if rid.decode() != lid:
                self._replace_foreign(lid)
                continue
            last, rhash = int(last or 0), (rhash or b"").decode()
            if seq > last or (seq == last and lhash != rhash):
                log.error("store: this node's replica (transaction %d) is not in Redis's log (at %d): Redis lost "
                          "writes; this node takes Redis's image", seq, last)
                self._load_image()
                continue
            entries = []
            while seq + len(entries) < last:
                got = self._call("XRANGE", self.k_log, f"{seq + len(entries) + 1}-0", "+", "COUNT", BATCH) or []
                if not got:
                    break
                entries += got
            self._begin()
            try:
                if self._apply(entries, last):
                    return
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("ROLLBACK")
            self._load_image()
        raise StoreUnavailable("this node's replica cannot follow the store in Redis (see the log)")

    def _apply(self, entries: list, last: int) -> bool:
        """In the open transaction: apply the entries this replica lacks, each only on top of the
        one it follows. False when one is missing (the log was trimmed) or does not follow (Redis
        lost writes this replica had): the image is needed."""
        _lid, seq, lhash = self._local()  # another connection of this node may have applied some
        for eid, fields in entries:
            n = int(eid.split(b"-")[0])
            if n <= seq:
                continue
            f = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
            if n != seq + 1 or f.get(b"p", b"").decode() != lhash:
                log.error("store: transaction %d of Redis's log does not follow this node's replica (at %d): "
                          "loading the image", n, seq)
                return False
            try:
                self._replay(json.loads(f[b"e"]))
            except sqlite3.Error as exc:  # the replica has diverged: start again from the image
                log.error("store: transaction %d does not apply here (%s): loading the image", n, exc)
                return False
            seq, lhash = n, f[b"h"].decode()
            self.applied += 1
        self._set_local(seq=seq, hash=lhash)
        return seq >= last

    def _replay(self, statements: list) -> None:
        for st in statements:
            if len(st) == 3:
                self.conn.executemany(st[0], st[1])
            else:
                self.conn.execute(st[0], st[1])

    # --- a Redis without a store ------------------------------------------------------------------
    def _elect(self, lid: str | None, seq: int, lhash: str) -> None:
        """Redis holds no store (new, or restarted empty): every control node that notices says how
        current its replica is; after `election` seconds the most current seeds Redis with its file
        (a node that was a replica before beats a new one, then the higher transaction number)."""
        me = secrets.token_hex(8)
        claim = f"{1 if lid else 0}:{seq:020d}:{me}"
        self._call("EVAL", PROPOSE, 1, self.k_cand, me, claim, int(self.election * 5000))
        time.sleep(self.election)
        sid = lid or secrets.token_hex(16)
        _seq, data = self._image(id=sid)
        if self._call("EVAL", ELECT, 6, self.k_id, self.k_seq, self.k_hash, self.k_log, self.k_image, self.k_cand,
                      claim, sid, seq, lhash, data, resend=False):
            self._begin()
            self._set_local(id=sid)
            self.conn.execute("COMMIT")
            if lid is None:
                log.info("store: created in Redis %s, from this node's file", self.url)
            else:
                log.warning("store: Redis %s held no store: seeded it from this node's replica (transaction %d), "
                            "the most current of the control nodes that answered", self.url, seq)
            return
        if self._call("EXISTS", self.k_id) == 0:
            raise StoreUnavailable("Redis holds no store: a more current control node is seeding it")

    def _replace_foreign(self, lid: str | None) -> None:
        """This file is not a replica of the store in Redis: keep a copy when it holds anything (it
        may be a store of its own: a node moved from backend sqlite, or from another cluster), then
        take Redis's image."""
        if lid is not None or self.conn.execute("SELECT EXISTS (SELECT 1 FROM audit)").fetchone()[0]:
            path = self.conn.execute("PRAGMA database_list").fetchone()[2]
            backup = f"{path}.{lid or 'own'}.{int(time.time())}.bak"
            dest = sqlite3.connect(backup)
            try:
                self.conn.backup(dest)
            finally:
                dest.close()
            os.chmod(backup, 0o600)
            self.backups.append(backup)
            log.warning("store: this node's file is not a replica of the store in Redis: kept as %s, "
                        "replaced by Redis's", backup)
        self._load_image()

    # --- images -----------------------------------------------------------------------------------
    def _image(self, **replica) -> tuple[int, bytes]:
        """(transaction number, the file's bytes) — with `replica` rows set in the copy only."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        try:
            self.conn.backup(mem)
            if replica:
                mem.executemany("INSERT INTO replica (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                                [(k, str(v)) for k, v in replica.items()])
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
        self._begin()
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
        rid = self._local()[0] or ""
        return bool(self._call("EVAL", IMAGE, 3, self.k_image, self.k_log, self.k_id, seq, data, rid, self.keep))

    # --- writing ----------------------------------------------------------------------------------
    @contextmanager
    def write(self):
        """One replicated transaction: yields the recording connection. StoreUnavailable when Redis
        cannot be reached or the lock cannot be had within `lock_wait` (nothing was written), or
        when Redis did not answer the append (then the change is in the log or not: this replica
        learns which from the log)."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lock_wait
        while not self._call("SET", self.k_lock, token, "NX", "PX", int(self.lock_ttl * 1000), resend=False):
            if time.monotonic() > deadline:
                raise StoreUnavailable("another writer holds the store's lock; try again")
            time.sleep(0.005)
        seq = None
        try:
            self._catch_up()
            try:
                self.rec.log = []
                yield self.rec
                if self.rec.log:
                    entry = json.dumps(self.rec.log, separators=(",", ":")).encode()
                    _lid, last, prev = self._local()
                    h = chain(prev, entry)
                    try:
                        seq = self._call("EVAL", APPEND, 4, self.k_lock, self.k_seq, self.k_hash, self.k_log,
                                         token, last, prev, entry, h, resend=False)
                    except StoreUnavailable as exc:
                        raise StoreUnavailable(f"{exc} — during a write: whether it was recorded is not known; "
                                               "look before trying again") from None
                    if seq < 0:
                        raise StoreUnavailable("this write lost the store's lock (it took too long); try again")
                    self._set_local(seq=seq, hash=h)
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


class ReplicaThread:
    """A thread of the control process with a replica of its own (its own SQLite connection): calls
    `step(replica)` every `interval` seconds. A failure of an `expected` kind is logged once
    (`failed`) until a step succeeds again (`recovered`); anything else with its traceback; the
    thread goes on either way."""

    name = "replica-thread"
    expected: tuple = (StoreError, sqlite3.Error)

    def __init__(self, path: str, url: str, prefix: str, interval: float):
        self.path, self.store_url, self.prefix, self.interval = path, url, prefix, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replica: Replica | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def step(self, replica: Replica) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        log.warning("%s: %s (retried)", self.name, exc)

    def recovered(self) -> None:
        pass

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.replica = Replica(conn, self.store_url, self.prefix)
        warned = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.step(self.replica)
                    if warned:
                        self.recovered()
                    warned = False
                except self.expected as exc:
                    if not warned:
                        self.failed(exc)
                        warned = True
                except Exception:  # noqa: BLE001 - a bug or a garbled reply must not end the thread
                    log.exception("%s failed (retried)", self.name)
        finally:
            self.replica.close()
            conn.close()


class ReplicaFollower(ReplicaThread):
    """Applies other nodes' transactions to this node's replica."""

    name = "store-follower"

    def __init__(self, path: str, url: str, prefix: str, interval: float = FOLLOW_INTERVAL):
        super().__init__(path, url, prefix, interval)

    def step(self, replica: Replica) -> None:
        replica.sync()

    def failed(self, exc: Exception) -> None:
        log.warning("store: cannot follow the store in Redis (%s); retrying", exc)

    def recovered(self) -> None:
        log.info("store: following Redis %s again", self.replica.url)
