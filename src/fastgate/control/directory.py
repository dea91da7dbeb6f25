"""The workers' view of the store: API key hash → consumer, and the revoked OAuth token ids (`jti`s
of tokens this gateway issued and then revoked, until they expire), held in memory.

A worker opens the SQLite file read-only and, once per tick at most every `interval` seconds, asks
`PRAGMA data_version` whether another connection (the control process) committed since; only
then does it reload the whole map. Requests never touch the store: a key found or not found is one
dict lookup. So a key made or revoked through the admin API takes effect within about a second, and
so does a token revoked at `POST /oauth/revoke` (the jwt policy's `check_revoked`: one set lookup).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from urllib.parse import quote

from ..policies.base import ConsumerInfo
from .store import ACTIVE_KEYS_SQL, OAUTH_SCHEMA, REVOKED_JTIS_SQL

log = logging.getLogger("fastgate.directory")


class Directory:
    __slots__ = ("path", "interval", "conn", "version", "keys", "revoked", "_next", "_warned")

    def __init__(self, path: str, interval: float = 0.5):
        self.path = os.path.abspath(path)
        self.interval = interval
        self.conn: sqlite3.Connection | None = None
        self.version = None
        self.keys: dict[bytes, tuple[ConsumerInfo, bytes]] = {}  # sha256 hex digest → (consumer, identifier)
        self.revoked: frozenset[str] = frozenset()  # jtis of revoked, unexpired OAuth tokens (replaced whole)
        self._next = 0.0
        self._warned = False
        self.poll(0.0)

    @classmethod
    def for_config(cls, cfg) -> Directory | None:
        store = getattr(cfg, "store", None)
        if store is None or store.backend != "sqlite":
            return None
        return cls(store.path)

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
        keys: dict[bytes, tuple[ConsumerInfo, bytes]] = {}
        infos: dict[str, ConsumerInfo] = {}
        for username, custom_id, plan, groups, key_hash, _id in self.conn.execute(ACTIVE_KEYS_SQL):
            info = infos.get(username)
            if info is None:
                info = infos[username] = ConsumerInfo(username, custom_id, plan, json.loads(groups))
            digest = key_hash[7:].encode()  # key_hash is UNIQUE in the store
            # the credential identifier names the key without revealing it, as for config keys
            keys[digest] = (info, b"sha256:" + digest[:16])
        revoked: frozenset[str] = frozenset()
        if self.conn.execute("PRAGMA user_version").fetchone()[0] >= OAUTH_SCHEMA:  # an older store has none
            # expired ones are left out: the jwt policy refuses an expired token anyway
            revoked = frozenset(jti for (jti,) in self.conn.execute(REVOKED_JTIS_SQL, (time.time(),)))
        self.keys = keys
        self.revoked = revoked

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
