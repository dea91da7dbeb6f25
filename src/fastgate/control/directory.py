"""The workers' view of the store: API key hash → consumer, the revoked OAuth token ids (`jti`s
of tokens this gateway issued and then revoked, until they expire) and the API versions whose
lifecycle state was set at run time (config/lifecycle.py), held in memory.

A worker opens the SQLite file read-only and, once per tick at most every `interval` seconds, asks
`PRAGMA data_version` whether another connection (the control process) committed since; only
then does it reload the whole map. Requests never touch the store: a key found or not found is one
dict lookup. So a key made or revoked through the admin API takes effect within about a second, and
so does a token revoked at `POST /oauth/revoke` (the jwt policy's `check_revoked`: one set lookup),
and an API version deprecated or retired through the admin API (the worker's tick recompiles the
routes whose state changed: Generation.set_lifecycle).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from urllib.parse import quote

from ..config.lifecycle import overrides_from_rows
from ..policies.base import ConsumerInfo
from .store import ACTIVE_KEYS_SQL, API_STATES_SQL, LIFECYCLE_SCHEMA, OAUTH_SCHEMA, REVOKED_JTIS_SQL

log = logging.getLogger("fastgate.directory")


class Directory:
    __slots__ = ("path", "interval", "conn", "version", "keys", "revoked", "names", "lifecycle", "_next", "_warned")

    def __init__(self, path: str, interval: float = 0.5):
        self.path = os.path.abspath(path)
        self.interval = interval
        self.conn: sqlite3.Connection | None = None
        self.version = None
        self.keys: dict[bytes, tuple[ConsumerInfo, bytes]] = {}  # sha256 hex digest → (consumer, identifier)
        self.revoked: frozenset[str] = frozenset()  # jtis of revoked, unexpired OAuth tokens (replaced whole)
        self.names: frozenset[str] = frozenset()
        self.lifecycle: dict = {}  # {(api, version): (state, sunset, successor)}: a new dict when it changes
        self._next = 0.0
        self._warned = False
        self.poll(0.0)

    @classmethod
    def for_config(cls, cfg):
        store = getattr(cfg, "store", None)
        if store is None:
            return None
        if store.backend == "redis":
            return RedisDirectory(store_redis_url(cfg), store.key_prefix)
        return cls(store.path)

    def start(self, loop) -> None:
        pass

    async def wait_loaded(self, timeout: float) -> None:
        """Return once the first snapshot is in (at once here: __init__ read the file)."""

    def get(self, digest: bytes):
        """(ConsumerInfo, credential identifier) for a key's SHA-256 hex digest, or None."""
        return self.keys.get(digest)

    def poll(self, now: float) -> bool:
        """Reload the map when the store changed; returns whether it did. Never raises."""
        if now < self._next:
            return False
        self._next = now + self.interval
        try:
            if self.conn is None:
                if not os.path.exists(self.path):
                    return False
                self.conn = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True, isolation_level=None,
                                            check_same_thread=False)
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self.version:
                return False
            self._load()
            self.version = version
            self._warned = False
            return True
        except sqlite3.Error as exc:
            if not self._warned:  # a store not created (or migrated) yet, a file we may not read
                log.warning("store %s: %s (keys made through the admin API are not seen yet)", self.path, exc)
                self._warned = True
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return False

    def _load(self) -> None:
        self.apply(read_snapshot(self.conn))

    def apply(self, snap: dict) -> None:
        """Replace the maps with a snapshot's (read_snapshot's shape)."""
        keys: dict[bytes, tuple[ConsumerInfo, bytes]] = {}
        infos: dict[str, ConsumerInfo] = {}
        for username, custom_id, plan, groups, key_hash in snap["keys"]:
            info = infos.get(username)
            if info is None:
                info = infos[username] = ConsumerInfo(username, custom_id, plan, json.loads(groups))
            digest = key_hash[7:].encode()  # key_hash is UNIQUE in the store
            # the credential identifier names the key without revealing it, as for config keys
            keys[digest] = (info, b"sha256:" + digest[:16])
        self.keys = keys
        self.revoked = frozenset(snap["revoked"])
        self.names = frozenset(infos)  # the store's consumers with a key (the consumer metrics label)
        lifecycle = overrides_from_rows(snap.get("lifecycle", ()))
        if lifecycle != self.lifecycle:
            self.lifecycle = lifecycle

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def read_snapshot(conn: sqlite3.Connection) -> dict:
    """What the workers need from the store: active key hashes with their consumers, the revoked,
    unexpired OAuth token ids (expired ones are left out: the jwt policy refuses those anyway), and
    the API lifecycle rows."""
    keys = [[u, cid, plan, groups, kh] for u, cid, plan, groups, kh, _id in conn.execute(ACTIVE_KEYS_SQL)]
    revoked: list[str] = []
    lifecycle: list[list] = []
    schema = conn.execute("PRAGMA user_version").fetchone()[0]  # an older store has neither
    if schema >= OAUTH_SCHEMA:
        revoked = [jti for (jti,) in conn.execute(REVOKED_JTIS_SQL, (time.time(),))]
    if schema >= LIFECYCLE_SCHEMA:
        lifecycle = [list(row) for row in conn.execute(API_STATES_SQL)]
    return {"keys": keys, "revoked": revoked, "lifecycle": lifecycle}


def store_redis_url(cfg) -> str:
    """`store.redis_url`, else the counters' Redis (config/load.py makes sure one of them is set)."""
    if cfg.store.redis_url:
        return cfg.store.redis_url
    return cfg.counters.redis.url


# --- clustered nodes: the directory through Redis ---------------------------------------------------
# The control process publishes each new snapshot: SET <prefix>directory <json>, then PUBLISH on the
# channel <prefix>directory. Every worker of every node holds a subscription and GETs the snapshot
# when told (and whenever its subscription is new: nothing is missed across a disconnection).


SILENCE = 35.0  # seconds without a message before a subscriber assumes its connection is dead


class RedisDirectory(Directory):
    """A worker's directory when `store.backend: redis`: the same maps, fed through Redis pub/sub.
    While Redis is unreachable the last snapshot stays in force; the worker reconnects with back-off."""

    __slots__ = ("url", "key", "channel", "_task", "loaded", "_first")

    def __init__(self, url: str, prefix: str):
        from ..counters.resp import RedisURL

        self.url = RedisURL(url)
        self.key = (prefix + "directory").encode()
        self.channel = self.key
        self.keys = {}
        self.revoked = frozenset()
        self.names = frozenset()
        self.lifecycle = {}
        self._task = None
        self._warned = False
        self.loaded = 0  # snapshots applied (tests and logs)
        self._first = None  # set once the first snapshot is in, or Redis failed once

    def poll(self, now: float) -> bool:
        return False  # pushed, not polled

    def start(self, loop) -> None:
        import asyncio

        if self._task is None:
            self._first = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def wait_loaded(self, timeout: float) -> None:
        """A new worker serves with the store's keys and API states, not before: wait for the first
        snapshot, up to `timeout` (Redis unreachable: at once, with none)."""
        import asyncio

        if self._first is not None:
            try:
                await asyncio.wait_for(self._first.wait(), timeout)
            except TimeoutError:
                pass

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        import asyncio

        backoff = 0.05
        while True:
            sub = None
            try:
                sub = await RespStream.open(self.url)
                await sub.call(b"SUBSCRIBE", self.channel)  # the confirmation
                await self._fetch()
                if self._warned:
                    log.info("directory: Redis %s is back", self.url)
                self._warned = False
                backoff = 0.05
                while True:
                    # the publisher republishes every 10 s: silence for longer means a dead link
                    # (a NAT or a failover dropped it without a reset), so reconnect and fetch again
                    msg = await asyncio.wait_for(sub.read(), SILENCE)
                    if isinstance(msg, list) and msg and msg[0] == b"message":
                        await self._fetch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - OSError, a reply error, bad JSON: retry later
                if not self._warned:
                    log.warning("directory: Redis %s unavailable (%s); keeping the last snapshot", self.url, exc)
                    self._warned = True
                if self._first is not None:  # a worker starting now serves without the store's entities
                    self._first.set()
            finally:
                if sub is not None:
                    sub.close()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def _fetch(self) -> None:
        conn = await RespStream.open(self.url)
        try:
            raw = await conn.call(b"GET", self.key)
        finally:
            conn.close()
        if raw is not None:
            self.apply(json.loads(raw))
            self.loaded += 1
        if self._first is not None:
            self._first.set()


class RespStream:
    """One plain RESP connection for the directory's few commands (not the hot path's client)."""

    def __init__(self, reader, writer):
        import hiredis

        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url, timeout: float = 2.0) -> RespStream:
        import asyncio

        if url.path:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(url.path), timeout)
        else:
            r, w = await asyncio.wait_for(asyncio.open_connection(url.host, url.port, ssl=url.tls or None), timeout)
        conn = cls(r, w)
        try:
            if url.password is not None:
                await conn.call(*((b"AUTH", url.username, url.password) if url.username else (b"AUTH", url.password)))
            if url.db:
                await conn.call(b"SELECT", str(url.db))
        except BaseException:
            conn.close()
            raise
        return conn

    async def call(self, *args):
        from ..counters.resp import pack

        self.writer.write(pack(*args))
        return await self.read()

    async def read(self):
        import hiredis

        while True:
            reply = self.parser.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise OSError(f"redis: {reply}")
                return reply
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(data)

    def close(self) -> None:
        self.writer.close()


class DirectoryPublisher:
    """In the control process: when the store changes (SQLite's data_version: a write of this node,
    or another node's applied to its replica), publish the new snapshot to Redis; republish every `refresh` seconds
    too, so a Redis that restarted empty is filled again. A thread: the store's reads are blocking."""

    def __init__(self, store_path: str, url: str, prefix: str, interval: float = 0.1, refresh: float = 10.0):
        from ..counters.resp import RedisURL

        self.path = store_path
        self.url = RedisURL(url)
        self.key = (prefix + "directory").encode()
        self.interval = interval
        self.refresh = refresh
        self.published = 0
        self._stop = None
        self._thread = None

    def start(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="directory-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(5)

    def _run(self) -> None:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(self.path))}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
        version, sent_at, warned = None, 0.0, False
        try:
            while not self._stop.is_set():
                try:
                    now_version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now_version != version or time.monotonic() - sent_at > self.refresh:
                        conn.execute("BEGIN")  # one read: the snapshot and the transaction it is as of
                        try:
                            snapshot, seq = read_snapshot(conn), _replica_seq(conn)
                        finally:
                            conn.execute("COMMIT")
                        self.publish(json.dumps(snapshot, separators=(",", ":")).encode(), seq)
                        version, sent_at = now_version, time.monotonic()
                        if warned:
                            log.info("directory: published to Redis %s again", self.url)
                        warned = False
                except (OSError, sqlite3.Error) as exc:
                    if not warned:
                        log.warning("directory: cannot publish to Redis %s (%s); retrying", self.url, exc)
                        warned = True
                self._stop.wait(self.interval if not warned else 0.5)
        finally:
            conn.close()

    def publish(self, blob: bytes, seq: int = 0) -> None:
        """SET and PUBLISH, unless another control node already published a later transaction's."""
        from ..counters.resp import SyncRedis

        r = SyncRedis(self.url)
        try:
            if r.call(b"EVAL", PUBLISH_IF_NEWER, 2, self.key, self.key + b":seq", blob, seq):
                self.published += 1
        finally:
            r.close()


PUBLISH_IF_NEWER = """
if tonumber(redis.call('GET', KEYS[2]) or '-1') > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[1], '1')
return 1
"""
"""KEYS directory, its sequence number; ARGV snapshot, the store transaction it is as of. Every
control node publishes from its replica (control/replica.py); one that is behind does not undo a
later snapshot."""


def _replica_seq(conn: sqlite3.Connection) -> int:
    try:
        row = conn.execute("SELECT v FROM replica WHERE k = 'seq'").fetchone()
    except sqlite3.OperationalError:  # not a replica (yet)
        return 0
    return int(row[0]) if row else 0
