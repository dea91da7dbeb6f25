"""The state store: one SQLite file (config `store.path`) that the control process writes and the
workers read (control/directory.py).

Holds developers, apps, consumers, credentials, plans, subscriptions and an audit log. API keys are
stored only as "sha256:<hex>" hashes: the key itself is returned once, by the call that made it.
OAuth client secrets likewise. The OAuth signing keys (control/oauth.py) are here too, private parts
included (PKCS#8 PEM): the file is created 0600, and must be kept like a key file.
Consumers and plans declared in the config file are copied in (`sync_config`, source "config") and
are read-only here: the file is where they change.

The schema evolves by migrations applied in order, each in one transaction that also sets
`PRAGMA user_version` to its number; a file newer than this code is refused, never downgraded.
Every change writes an audit row (who, what, when, the entity before and after) in the same
transaction as the change itself.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager

log = logging.getLogger("fastgate.store")

MIGRATIONS: list[list[str]] = [
    [  # 1: the first schema
        """CREATE TABLE developers (
            id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE plans (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT,
            spec TEXT NOT NULL DEFAULT '{}',
            source TEXT NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'config')),
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE apps (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, description TEXT,
            developer_id INTEGER REFERENCES developers(id) ON DELETE RESTRICT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE (developer_id, name))""",
        """CREATE TABLE consumers (
            id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE, custom_id TEXT, plan TEXT,
            groups TEXT NOT NULL DEFAULT '[]', app_id INTEGER REFERENCES apps(id) ON DELETE SET NULL,
            source TEXT NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'config')),
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE credentials (
            id INTEGER PRIMARY KEY,
            consumer_id INTEGER NOT NULL REFERENCES consumers(id) ON DELETE CASCADE,
            type TEXT NOT NULL DEFAULT 'key-auth' CHECK (type IN ('key-auth')),
            key_hash TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
            created_at TEXT NOT NULL, rotated_at TEXT, revoked_at TEXT)""",
        "CREATE INDEX credentials_by_consumer ON credentials (consumer_id)",
        """CREATE TABLE subscriptions (
            id INTEGER PRIMARY KEY, app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
            plan_id INTEGER NOT NULL REFERENCES plans(id) ON DELETE RESTRICT,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('active', 'pending', 'revoked')),
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE (app_id, plan_id))""",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
            entity TEXT NOT NULL, entity_id TEXT, before TEXT, after TEXT)""",
    ],
    [  # 2: analytics — the usage ledger (workers add to it) and the metrics time series (control/analytics.py)
        """CREATE TABLE usage (
            hour INTEGER NOT NULL, consumer TEXT NOT NULL, plan TEXT NOT NULL DEFAULT '',
            api TEXT NOT NULL DEFAULT '', requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, consumer, plan, api))""",
        "CREATE INDEX usage_by_consumer ON usage (consumer, hour)",
        """CREATE TABLE metric_series (
            res INTEGER NOT NULL, ts INTEGER NOT NULL, route TEXT NOT NULL,
            c0 INTEGER NOT NULL DEFAULT 0, c1 INTEGER NOT NULL DEFAULT 0, c2 INTEGER NOT NULL DEFAULT 0,
            c3 INTEGER NOT NULL DEFAULT 0, c4 INTEGER NOT NULL DEFAULT 0, c5 INTEGER NOT NULL DEFAULT 0,
            limited INTEGER NOT NULL DEFAULT 0, lat_sum_us INTEGER NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0, reloads INTEGER NOT NULL DEFAULT 0,
            b0 INTEGER NOT NULL DEFAULT 0, b1 INTEGER NOT NULL DEFAULT 0, b2 INTEGER NOT NULL DEFAULT 0,
            b3 INTEGER NOT NULL DEFAULT 0, b4 INTEGER NOT NULL DEFAULT 0, b5 INTEGER NOT NULL DEFAULT 0,
            b6 INTEGER NOT NULL DEFAULT 0, b7 INTEGER NOT NULL DEFAULT 0, b8 INTEGER NOT NULL DEFAULT 0,
            b9 INTEGER NOT NULL DEFAULT 0, b10 INTEGER NOT NULL DEFAULT 0, b11 INTEGER NOT NULL DEFAULT 0,
            b12 INTEGER NOT NULL DEFAULT 0, b13 INTEGER NOT NULL DEFAULT 0, b14 INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (res, ts, route))""",
        "CREATE TABLE analytics_cursor (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    ],
    [  # 3: the developer portal's accounts (password hashes kept apart from `developers`) and sessions
        """CREATE TABLE portal_accounts (
            developer_id INTEGER PRIMARY KEY REFERENCES developers(id) ON DELETE CASCADE,
            password_hash TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'pending', 'disabled')),
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE portal_sessions (
            id INTEGER PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,
            developer_id INTEGER REFERENCES developers(id) ON DELETE CASCADE,
            csrf TEXT NOT NULL, created_at TEXT NOT NULL, expires REAL NOT NULL)""",
        "CREATE INDEX portal_sessions_by_expiry ON portal_sessions (expires)",
    ],
    [  # 4: the OAuth 2.0 authorization server (control/oauth.py): clients, signing keys, issued tokens
        """CREATE TABLE oauth_clients (
            id INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE, secret_hash TEXT NOT NULL UNIQUE,
            app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
            consumer TEXT NOT NULL, scopes TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
            created_at TEXT NOT NULL, rotated_at TEXT, revoked_at TEXT)""",
        "CREATE INDEX oauth_clients_by_app ON oauth_clients (app_id)",
        # private_pem: PKCS#8, unencrypted — the store file must be protected like a key file
        """CREATE TABLE oauth_keys (
            kid TEXT PRIMARY KEY, alg TEXT NOT NULL, private_pem TEXT NOT NULL, public_jwk TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'retired')),
            created_at REAL NOT NULL, retired_at REAL, drop_after REAL)""",
        # every token issued, until it expires: whose it is, which key signed it, whether it was
        # revoked (the workers load the revoked ones: control/directory.py)
        """CREATE TABLE oauth_tokens (
            jti TEXT PRIMARY KEY, client_id TEXT NOT NULL, kid TEXT NOT NULL, exp REAL NOT NULL,
            revoked_at REAL)""",
        "CREATE INDEX oauth_tokens_by_exp ON oauth_tokens (exp)",
        "CREATE INDEX oauth_tokens_by_client ON oauth_tokens (client_id)",
        "CREATE INDEX oauth_tokens_by_kid ON oauth_tokens (kid, exp)",
        "CREATE INDEX oauth_tokens_revoked ON oauth_tokens (exp) WHERE revoked_at IS NOT NULL",
    ],
    [  # 5: latency in the usage ledger — the sum of the gateway latencies (µs) of the counted requests
        "ALTER TABLE usage ADD COLUMN lat_sum_us INTEGER NOT NULL DEFAULT 0",
    ],
    [  # 6: a rotated-in signing key is published before it signs (state 'next', signs_from)
        """CREATE TABLE oauth_keys_v6 (
            kid TEXT PRIMARY KEY, alg TEXT NOT NULL, private_pem TEXT NOT NULL, public_jwk TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('next', 'active', 'retired')),
            created_at REAL NOT NULL, retired_at REAL, drop_after REAL, signs_from REAL)""",
        """INSERT INTO oauth_keys_v6 (kid, alg, private_pem, public_jwk, state, created_at, retired_at, drop_after,
            signs_from) SELECT kid, alg, private_pem, public_jwk, state, created_at, retired_at, drop_after, created_at
            FROM oauth_keys""",
        "DROP TABLE oauth_keys",
        "ALTER TABLE oauth_keys_v6 RENAME TO oauth_keys",
    ],
    [  # 7: usage counted through Redis (store.backend redis): the drains already applied (control/usage_redis.py)
        "CREATE TABLE usage_drains (id TEXT PRIMARY KEY, at REAL NOT NULL)",
    ],
    [  # 8: API lifecycle — a version's state set at run time, over the config's (server/generation.py)
        """CREATE TABLE api_states (
            api TEXT NOT NULL, version TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('draft', 'published', 'deprecated', 'retired')),
            sunset TEXT, successor TEXT, updated_at TEXT NOT NULL, PRIMARY KEY (api, version))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
OAUTH_SCHEMA = 4  # the first schema with the oauth_* tables
LIFECYCLE_SCHEMA = 8  # the first with api_states

ACTIVE_KEYS_SQL = """
    SELECT c.username, c.custom_id, c.plan, c.groups, k.key_hash, k.id
    FROM credentials k JOIN consumers c ON c.id = k.consumer_id
    WHERE k.state = 'active' AND k.type = 'key-auth'"""
"""What the workers load (control/directory.py): every active key hash with its consumer."""

REVOKED_JTIS_SQL = "SELECT jti FROM oauth_tokens WHERE revoked_at IS NOT NULL AND exp > ?"
"""What the workers load too (schema >= OAUTH_SCHEMA): revoked tokens that have not expired yet."""

API_STATES_SQL = "SELECT api, version, state, sunset, successor FROM api_states ORDER BY api, version"
"""And (schema >= LIFECYCLE_SCHEMA) the API versions whose state was set at run time."""


class StoreError(Exception):
    status = 400
    code = "bad_request"


class NotFound(StoreError):
    status = 404
    code = "not_found"


class Conflict(StoreError):
    status = 409
    code = "conflict"


class ReadOnly(StoreError):
    status = 409
    code = "read_only"


class StoreUnavailable(StoreError):
    """The store lives in Redis (control/replica.py) and Redis cannot be reached, or another writer
    holds the store's lock for too long: nothing was written."""

    status = 503
    code = "store_unavailable"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_key(key: str) -> str:
    """The stored form of an API key (the same as the config's `consumers[].keys`)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "fg_" + secrets.token_urlsafe(32)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this file lacks, in order, each in its own transaction."""
    for number, statements in enumerate(MIGRATIONS, 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the store's schema (v{version}) is newer than this fastgate's "
                                 f"(v{SCHEMA_VERSION}): upgrade fastgate")
            if version < number:
                for sql in statements:
                    conn.execute(sql)
                conn.execute(f"PRAGMA user_version = {number}")
                log.info("store: migrated to schema v%d", number)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _row(cur, row) -> dict:
    return {d[0]: v for d, v in zip(cur.description, row, strict=True)}


class Store:
    """The control process's read-write handle. Not thread-safe: use it from one thread.

    With `redis_url` (`store.backend: redis`) the file is this node's replica of the store that
    Redis holds (control/replica.py): every transaction goes through Redis's log, reads stay local."""

    def __init__(self, path: str, redis_url: str | None = None, prefix: str = "fastgate:"):
        self.path = path
        self.replica = None
        if not os.path.exists(path):  # hashes only, but still nobody else's business
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # one thread at a time (the admin API's event loop), though not always the one that opened it
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.version = migrate(self.conn)
        if redis_url is not None:
            from .replica import Replica

            self.replica = Replica(self.conn, redis_url, prefix)
            self.conn = self.replica.rec  # notes every change made in a transaction, refuses any other
            try:
                self.replica.sync()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self.replica is not None:
            self.replica.close()
        self.conn.close()

    # --- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def tx(self):
        if self.replica is not None:
            with self.replica.write() as conn:
                yield conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _one(self, sql: str, args=()) -> dict | None:
        cur = self.conn.execute(sql, args)
        row = cur.fetchone()
        return _row(cur, row) if row is not None else None

    def _all(self, sql: str, args=()) -> list[dict]:
        cur = self.conn.execute(sql, args)
        return [_row(cur, r) for r in cur.fetchall()]

    def _audit(self, actor: str, action: str, entity: str, entity_id, before, after) -> None:
        self.conn.execute(
            "INSERT INTO audit (at, actor, action, entity, entity_id, before, after) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), actor, action, entity, None if entity_id is None else str(entity_id),
             None if before is None else json.dumps(before), None if after is None else json.dumps(after)))

    def _insert(self, table: str, values: dict) -> int:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            return self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values())).lastrowid
        except sqlite3.IntegrityError as exc:
            raise Conflict(_integrity(exc, table)) from None

    def _update(self, table: str, id_: int, values: dict) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        try:
            self.conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values.values(), id_))
        except sqlite3.IntegrityError as exc:
            raise Conflict(_integrity(exc, table)) from None

    def _delete(self, table: str, id_: int) -> None:
        try:
            self.conn.execute(f"DELETE FROM {table} WHERE id = ?", (id_,))
        except sqlite3.IntegrityError:
            raise Conflict(f"this {table[:-1]} is still referenced: delete what uses it first") from None

    # --- developers -------------------------------------------------------------------------------
    def list_developers(self) -> list[dict]:
        return self._all("SELECT * FROM developers ORDER BY id")

    def get_developer(self, id_: int) -> dict:
        d = self._one("SELECT * FROM developers WHERE id = ?", (id_,))
        if d is None:
            raise NotFound(f"no developer {id_}")
        return d

    def create_developer(self, actor: str, email: str, name: str | None = None) -> dict:
        with self.tx():
            t = now()
            id_ = self._insert("developers", {"email": email, "name": name, "created_at": t, "updated_at": t})
            after = self.get_developer(id_)
            self._audit(actor, "create", "developer", id_, None, after)
        return after

    def update_developer(self, actor: str, id_: int, changes: dict) -> dict:
        return self._simple_update(actor, "developer", self.get_developer, id_, changes)

    def delete_developer(self, actor: str, id_: int) -> None:
        self._simple_delete(actor, "developer", self.get_developer, id_)

    # --- apps -------------------------------------------------------------------------------------
    def list_apps(self) -> list[dict]:
        return self._all("SELECT * FROM apps ORDER BY id")

    def get_app(self, id_: int) -> dict:
        a = self._one("SELECT * FROM apps WHERE id = ?", (id_,))
        if a is None:
            raise NotFound(f"no app {id_}")
        return a

    def create_app(self, actor: str, name: str, developer_id: int | None = None,
                   description: str | None = None) -> dict:
        with self.tx():
            if developer_id is not None:
                self.get_developer(developer_id)
            t = now()
            id_ = self._insert("apps", {"name": name, "developer_id": developer_id, "description": description,
                                        "created_at": t, "updated_at": t})
            after = self.get_app(id_)
            self._audit(actor, "create", "app", id_, None, after)
        return after

    def update_app(self, actor: str, id_: int, changes: dict) -> dict:
        if changes.get("developer_id") is not None:
            self.get_developer(changes["developer_id"])
        return self._simple_update(actor, "app", self.get_app, id_, changes)

    def delete_app(self, actor: str, id_: int) -> None:
        self._simple_delete(actor, "app", self.get_app, id_)

    # --- plans ------------------------------------------------------------------------------------
    @staticmethod
    def _plan_out(p: dict) -> dict:
        spec = json.loads(p.pop("spec") or "{}")
        p["rate_limits"] = spec.get("rate_limits", [])
        p["quotas"] = spec.get("quotas", [])
        p["read_only"] = p["source"] == "config"
        return p

    def list_plans(self) -> list[dict]:
        return [self._plan_out(p) for p in self._all("SELECT * FROM plans ORDER BY id")]

    def get_plan(self, name: str) -> dict:
        p = self._one("SELECT * FROM plans WHERE name = ?", (name,))
        if p is None:
            raise NotFound(f"no plan `{name}`")
        return self._plan_out(p)

    def create_plan(self, actor: str, name: str, description: str | None = None, rate_limits=(), quotas=(),
                    source: str = "api") -> dict:
        with self.tx():
            t = now()
            spec = json.dumps({"rate_limits": list(rate_limits), "quotas": list(quotas)})
            self._insert("plans", {"name": name, "description": description, "spec": spec, "source": source,
                                   "created_at": t, "updated_at": t})
            after = self.get_plan(name)
            self._audit(actor, "create", "plan", name, None, after)
        return after

    def update_plan(self, actor: str, name: str, changes: dict) -> dict:
        with self.tx():
            before = self.get_plan(name)
            _writable(before, "plan")
            spec = {"rate_limits": changes.pop("rate_limits", before["rate_limits"]),
                    "quotas": changes.pop("quotas", before["quotas"])}
            self._update("plans", before["id"], {**changes, "spec": json.dumps(spec), "updated_at": now()})
            after = self.get_plan(changes.get("name", name))
            self._audit(actor, "update", "plan", name, before, after)
        return after

    def delete_plan(self, actor: str, name: str) -> None:
        with self.tx():
            before = self.get_plan(name)
            _writable(before, "plan")
            if self._one("SELECT id FROM consumers WHERE plan = ? LIMIT 1", (name,)):
                raise Conflict(f"consumers are on plan `{name}`: move them to another plan first")
            self._delete("plans", before["id"])
            self._audit(actor, "delete", "plan", name, before, None)

    # --- consumers --------------------------------------------------------------------------------
    @staticmethod
    def _consumer_out(c: dict) -> dict:
        c["groups"] = json.loads(c["groups"])
        c["read_only"] = c["source"] == "config"
        return c

    def list_consumers(self) -> list[dict]:
        return [self._consumer_out(c) for c in self._all("SELECT * FROM consumers ORDER BY id")]

    def get_consumer(self, username: str) -> dict:
        c = self._one("SELECT * FROM consumers WHERE username = ?", (username,))
        if c is None:
            raise NotFound(f"no consumer `{username}`")
        return self._consumer_out(c)

    def _check_refs(self, plan: str | None, app_id: int | None) -> None:
        if plan is not None and self._one("SELECT id FROM plans WHERE name = ?", (plan,)) is None:
            raise NotFound(f"no plan `{plan}`")
        if app_id is not None:
            self.get_app(app_id)

    def create_consumer(self, actor: str, username: str, custom_id: str | None = None, plan: str | None = None,
                        groups=(), app_id: int | None = None) -> dict:
        with self.tx():
            self._check_refs(plan, app_id)
            t = now()
            self._insert("consumers", {"username": username, "custom_id": custom_id, "plan": plan,
                                       "groups": json.dumps(sorted(set(groups))), "app_id": app_id,
                                       "created_at": t, "updated_at": t})
            after = self.get_consumer(username)
            self._audit(actor, "create", "consumer", username, None, after)
        return after

    def update_consumer(self, actor: str, username: str, changes: dict) -> dict:
        with self.tx():
            before = self.get_consumer(username)
            _writable(before, "consumer")
            self._check_refs(changes.get("plan"), changes.get("app_id"))
            if "groups" in changes:
                changes["groups"] = json.dumps(sorted(set(changes["groups"])))
            self._update("consumers", before["id"], {**changes, "updated_at": now()})
            after = self.get_consumer(changes.get("username", username))
            self._audit(actor, "update", "consumer", username, before, after)
        return after

    def delete_consumer(self, actor: str, username: str) -> None:
        with self.tx():
            before = self.get_consumer(username)
            _writable(before, "consumer")
            before["credentials"] = [k["id"] for k in self.list_credentials(username)]
            self._delete("consumers", before["id"])  # its credentials go with it
            self._audit(actor, "delete", "consumer", username, before, None)

    # --- credentials ------------------------------------------------------------------------------
    _CRED = """SELECT k.id, c.username AS consumer, k.type, substr(k.key_hash, 1, 23) AS identifier, k.state,
                      k.created_at, k.rotated_at, k.revoked_at
               FROM credentials k JOIN consumers c ON c.id = k.consumer_id"""

    def list_credentials(self, username: str | None = None) -> list[dict]:
        if username is None:
            return self._all(self._CRED + " ORDER BY k.id")
        self.get_consumer(username)
        return self._all(self._CRED + " WHERE c.username = ? ORDER BY k.id", (username,))

    def get_credential(self, id_: int) -> dict:
        k = self._one(self._CRED + " WHERE k.id = ?", (id_,))
        if k is None:
            raise NotFound(f"no credential {id_}")
        return k

    def create_key(self, actor: str, username: str, key: str | None = None,
                   taken: frozenset = frozenset()) -> tuple[dict, str]:
        """A new API key for `username`: (the credential, the key — shown this once). `taken`: hashes
        the config already gives to someone."""
        key = key or new_key()
        digest = hash_key(key)
        if digest in taken:
            raise Conflict("this key is already in use")
        with self.tx():
            consumer = self.get_consumer(username)
            try:
                id_ = self.conn.execute(
                    "INSERT INTO credentials (consumer_id, type, key_hash, created_at) VALUES (?, 'key-auth', ?, ?)",
                    (consumer["id"], digest, now())).lastrowid
            except sqlite3.IntegrityError:
                raise Conflict("this key is already in use") from None
            after = self.get_credential(id_)
            self._audit(actor, "create", "credential", id_, None, after)
        return after, key

    def rotate_key(self, actor: str, id_: int) -> tuple[dict, str]:
        """Give credential `id_` a new key; the old one stops working at once."""
        key = new_key()
        with self.tx():
            before = self.get_credential(id_)
            if before["state"] != "active":
                raise Conflict(f"credential {id_} is revoked")
            self.conn.execute("UPDATE credentials SET key_hash = ?, rotated_at = ? WHERE id = ?",
                              (hash_key(key), now(), id_))
            after = self.get_credential(id_)
            self._audit(actor, "rotate", "credential", id_, before, after)
        return after, key

    def revoke_key(self, actor: str, id_: int) -> dict:
        with self.tx():
            before = self.get_credential(id_)
            if before["state"] == "revoked":
                return before
            self.conn.execute("UPDATE credentials SET state = 'revoked', revoked_at = ? WHERE id = ?", (now(), id_))
            after = self.get_credential(id_)
            self._audit(actor, "revoke", "credential", id_, before, after)
        return after

    # --- subscriptions ----------------------------------------------------------------------------
    _SUB = """SELECT s.id, s.app_id, p.name AS plan, s.state, s.created_at, s.updated_at
              FROM subscriptions s JOIN plans p ON p.id = s.plan_id"""

    def list_subscriptions(self, app_id: int | None = None) -> list[dict]:
        if app_id is None:
            return self._all(self._SUB + " ORDER BY s.id")
        return self._all(self._SUB + " WHERE s.app_id = ? ORDER BY s.id", (app_id,))

    def get_subscription(self, id_: int) -> dict:
        s = self._one(self._SUB + " WHERE s.id = ?", (id_,))
        if s is None:
            raise NotFound(f"no subscription {id_}")
        return s

    def create_subscription(self, actor: str, app_id: int, plan: str, state: str = "pending") -> dict:
        with self.tx():
            self.get_app(app_id)
            plan_id = self.get_plan(plan)["id"]
            t = now()
            id_ = self._insert("subscriptions", {"app_id": app_id, "plan_id": plan_id, "state": state,
                                                 "created_at": t, "updated_at": t})
            after = self.get_subscription(id_)
            self._audit(actor, "create", "subscription", id_, None, after)
        return after

    def update_subscription(self, actor: str, id_: int, changes: dict) -> dict:
        if "plan" in changes:
            changes["plan_id"] = self.get_plan(changes.pop("plan"))["id"]
        return self._simple_update(actor, "subscription", self.get_subscription, id_, changes)

    def delete_subscription(self, actor: str, id_: int) -> None:
        self._simple_delete(actor, "subscription", self.get_subscription, id_)

    # --- audit ------------------------------------------------------------------------------------
    def list_audit(self, limit: int = 100, entity: str | None = None, before_id: int | None = None) -> list[dict]:
        where, args = [], []
        if entity is not None:
            where.append("entity = ?")
            args.append(entity)
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._all(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        for r in rows:
            r["before"] = json.loads(r["before"]) if r["before"] is not None else None
            r["after"] = json.loads(r["after"]) if r["after"] is not None else None
        return rows

    def audit(self, actor: str, action: str, entity: str, entity_id=None, before=None, after=None) -> None:
        """An audit row for a change made outside the store (a new config file, say)."""
        with self.tx():
            self._audit(actor, action, entity, entity_id, before, after)

    # --- the declarative config -------------------------------------------------------------------
    def sync_config(self, cfg, actor: str = "config") -> None:
        """Copy the config's plans and consumers in as read-only rows (their keys stay in the config).
        Rows the config no longer declares are deleted, unless something still refers to them (a
        subscription to a plan): those are kept, with a warning."""
        import msgspec

        with self.tx():
            t = now()
            plans = {p.name: p for p in cfg.plans}
            for name, p in plans.items():
                spec = json.dumps({"rate_limits": msgspec.to_builtins(p.rate_limits),
                                   "quotas": msgspec.to_builtins(p.quotas)})
                row = self._one("SELECT * FROM plans WHERE name = ?", (name,))
                if row is None:
                    self._insert("plans", {"name": name, "spec": spec, "source": "config", "created_at": t,
                                           "updated_at": t})
                    self._audit(actor, "create", "plan", name, None, self.get_plan(name))
                elif row["spec"] != spec or row["source"] != "config":
                    before = self.get_plan(name)
                    self._update("plans", row["id"], {"spec": spec, "source": "config", "updated_at": t})
                    self._audit(actor, "update", "plan", name, before, self.get_plan(name))
            consumers = {c.username: c for c in cfg.consumers}
            for name, c in consumers.items():
                values = {"custom_id": c.id, "plan": c.plan, "groups": json.dumps(sorted(set(c.groups))),
                          "source": "config"}
                row = self._one("SELECT * FROM consumers WHERE username = ?", (name,))
                if row is None:
                    self._insert("consumers", {"username": name, **values, "created_at": t, "updated_at": t})
                    self._audit(actor, "create", "consumer", name, None, self.get_consumer(name))
                elif any(row[k] != v for k, v in values.items()):
                    before = self.get_consumer(name)
                    self._update("consumers", row["id"], {**values, "updated_at": t})
                    self._audit(actor, "update", "consumer", name, before, self.get_consumer(name))
            for table, entity, names, key in (("consumers", "consumer", consumers, "username"),
                                              ("plans", "plan", plans, "name")):
                for row in self._all(f"SELECT * FROM {table} WHERE source = 'config'"):
                    if row[key] in names:
                        continue
                    before = self.get_consumer(row[key]) if entity == "consumer" else self.get_plan(row[key])
                    try:
                        self.conn.execute("SAVEPOINT drop_row")
                        self.conn.execute(f"DELETE FROM {table} WHERE id = ?", (row["id"],))
                        self.conn.execute("RELEASE drop_row")
                    except sqlite3.IntegrityError:
                        self.conn.execute("ROLLBACK TO drop_row")
                        self.conn.execute("RELEASE drop_row")
                        log.warning("store: %s `%s` left the config but is still in use: kept", entity, row[key])
                        continue
                    self._audit(actor, "delete", entity, row[key], before, None)

    # --- API lifecycle ----------------------------------------------------------------------------
    # The config declares each API version with a state; the admin API may set another at run time
    # (deprecate v1, retire it, publish a draft) without a new config. The row wins over the config
    # until it is deleted. The caller checks the API and version against the running config.
    def list_api_states(self) -> list[dict]:
        return self._all("SELECT * FROM api_states ORDER BY api, version")

    def get_api_state(self, api: str, version: str) -> dict | None:
        return self._one("SELECT * FROM api_states WHERE api = ? AND version = ?", (api, version))

    def set_api_state(self, actor: str, api: str, version: str, state: str, sunset: str | None = None,
                      successor: str | None = None) -> dict:
        with self.tx():
            before = self.get_api_state(api, version)
            self.conn.execute("INSERT INTO api_states (api, version, state, sunset, successor, updated_at) "
                              "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (api, version) DO UPDATE SET "
                              "state = excluded.state, sunset = excluded.sunset, successor = excluded.successor, "
                              "updated_at = excluded.updated_at", (api, version, state, sunset, successor, now()))
            after = self.get_api_state(api, version)
            self._audit(actor, "update" if before else "create", "api_state", f"{api}/{version}", before, after)
        return after

    def delete_api_state(self, actor: str, api: str, version: str) -> dict:
        with self.tx():
            before = self.get_api_state(api, version)
            if before is None:
                raise NotFound(f"API `{api}` version `{version}` has no state set here (it has the config's)")
            self.conn.execute("DELETE FROM api_states WHERE api = ? AND version = ?", (api, version))
            self._audit(actor, "delete", "api_state", f"{api}/{version}", before, None)
        return before

    # --- the developer portal ---------------------------------------------------------------------
    _ACCOUNT = """SELECT d.id, d.email, d.name, a.password_hash, a.state, a.created_at
                  FROM portal_accounts a JOIN developers d ON d.id = a.developer_id"""

    def create_portal_developer(self, actor: str, email: str, name: str | None, password_hash: str,
                                state: str = "active") -> dict:
        """A developer who signs in to the portal: the `developers` row and its account, together."""
        with self.tx():
            t = now()
            id_ = self._insert("developers", {"email": email, "name": name, "created_at": t, "updated_at": t})
            self._insert("portal_accounts", {"developer_id": id_, "password_hash": password_hash, "state": state,
                                             "created_at": t, "updated_at": t})
            after = {**self.get_developer(id_), "portal_state": state}
            self._audit(actor, "create", "developer", id_, None, after)
        return after

    def portal_account(self, email: str | None = None, developer_id: int | None = None) -> dict | None:
        if developer_id is not None:
            return self._one(self._ACCOUNT + " WHERE d.id = ?", (developer_id,))
        return self._one(self._ACCOUNT + " WHERE d.email = ?", (email,))

    def list_portal_accounts(self, state: str | None = None) -> list[dict]:
        rows = self._all(self._ACCOUNT + (" WHERE a.state = ?" if state else "") + " ORDER BY d.id",
                         (state,) if state else ())
        for r in rows:
            del r["password_hash"]
        return rows

    def set_portal_state(self, actor: str, developer_id: int, state: str) -> dict:
        """Approve (`active`), hold (`pending`) or disable a portal account."""
        with self.tx():
            before = self.portal_account(developer_id=developer_id)
            if before is None:
                raise NotFound(f"no portal account for developer {developer_id}")
            self.conn.execute("UPDATE portal_accounts SET state = ?, updated_at = ? WHERE developer_id = ?",
                              (state, now(), developer_id))
            if state != "active":
                self.conn.execute("DELETE FROM portal_sessions WHERE developer_id = ?", (developer_id,))
            before.pop("password_hash")
            after = {**before, "state": state}
            self._audit(actor, "update", "portal_account", developer_id, before, after)
        return after

    def create_session(self, developer_id: int | None, ttl: float) -> tuple[str, dict]:
        """A portal session: (its token — for the cookie, stored only hashed —, the row). Expired
        sessions are swept on the way."""
        token = secrets.token_urlsafe(32)
        t = time.time()
        with self.tx():
            self.conn.execute("DELETE FROM portal_sessions WHERE expires < ?", (t,))
            self.conn.execute(
                "INSERT INTO portal_sessions (token_hash, developer_id, csrf, created_at, expires) VALUES (?, ?, ?, ?, ?)",
                (hash_key(token), developer_id, secrets.token_urlsafe(32), now(), t + ttl))
        return token, self.get_session(token)

    def get_session(self, token: str) -> dict | None:
        return self._one("SELECT * FROM portal_sessions WHERE token_hash = ? AND expires >= ?",
                         (hash_key(token), time.time()))

    def delete_session(self, token: str) -> None:
        with self.tx():
            self.conn.execute("DELETE FROM portal_sessions WHERE token_hash = ?", (hash_key(token),))

    def list_apps_of(self, developer_id: int) -> list[dict]:
        return self._all("SELECT * FROM apps WHERE developer_id = ? ORDER BY id", (developer_id,))

    def app_consumer(self, app_id: int) -> dict | None:
        """The consumer that carries an app's keys (the first one made for it through the API)."""
        c = self._one("SELECT * FROM consumers WHERE app_id = ? AND source = 'api' ORDER BY id LIMIT 1", (app_id,))
        return self._consumer_out(c) if c is not None else None

    # --- the OAuth 2.0 authorization server (control/oauth.py) ------------------------------------
    _CLIENT = """SELECT id, client_id, app_id, consumer, scopes, state, created_at, rotated_at, revoked_at
                 FROM oauth_clients"""

    @staticmethod
    def _client_out(c: dict | None) -> dict | None:
        if c is not None:
            c["scopes"] = json.loads(c["scopes"])
        return c

    def list_oauth_clients(self, app_id: int | None = None) -> list[dict]:
        if app_id is None:
            rows = self._all(self._CLIENT + " ORDER BY id")
        else:
            self.get_app(app_id)
            rows = self._all(self._CLIENT + " WHERE app_id = ? ORDER BY id", (app_id,))
        return [self._client_out(c) for c in rows]

    def get_oauth_client(self, client_id: str) -> dict:
        c = self._client_out(self._one(self._CLIENT + " WHERE client_id = ?", (client_id,)))
        if c is None:
            raise NotFound(f"no OAuth client `{client_id}`")
        return c

    def oauth_client_secret_hash(self, client_id: str) -> tuple[dict, str] | None:
        """(the client, its secret's stored hash), to authenticate it; None for an unknown client_id."""
        row = self._one("SELECT secret_hash FROM oauth_clients WHERE client_id = ?", (client_id,))
        if row is None:
            return None
        return self.get_oauth_client(client_id), row["secret_hash"]

    def create_oauth_client(self, actor: str, app_id: int, scopes=()) -> tuple[dict, str]:
        """Client credentials for app `app_id`: (the client, its secret — shown this once, stored as
        its SHA-256 like an API key). Tokens name the app's consumer (`app-<id>`, made here when the
        app has none yet) as `sub`."""
        client_id = "fgc_" + secrets.token_urlsafe(16)
        secret = "fgs_" + secrets.token_urlsafe(32)
        with self.tx():
            app = self.get_app(app_id)
            consumer = self.app_consumer(app["id"])
            if consumer is None:
                name = f"app-{app['id']}"
                t = now()
                self._insert("consumers", {"username": name, "app_id": app["id"], "created_at": t, "updated_at": t})
                consumer = self.get_consumer(name)
                self._audit(actor, "create", "consumer", name, None, consumer)
            id_ = self._insert("oauth_clients", {
                "client_id": client_id, "secret_hash": hash_key(secret), "app_id": app["id"],
                "consumer": consumer["username"], "scopes": json.dumps(sorted(set(scopes))), "created_at": now()})
            after = self.get_oauth_client(client_id)
            self._audit(actor, "create", "oauth_client", id_, None, after)
        return after, secret

    def update_oauth_client(self, actor: str, client_id: str, scopes) -> dict:
        with self.tx():
            before = self.get_oauth_client(client_id)
            self.conn.execute("UPDATE oauth_clients SET scopes = ? WHERE client_id = ?",
                              (json.dumps(sorted(set(scopes))), client_id))
            after = self.get_oauth_client(client_id)
            self._audit(actor, "update", "oauth_client", before["id"], before, after)
        return after

    def rotate_oauth_client(self, actor: str, client_id: str) -> tuple[dict, str]:
        """A new secret; the old one stops working at once (tokens it got stay valid until they expire)."""
        secret = "fgs_" + secrets.token_urlsafe(32)
        with self.tx():
            before = self.get_oauth_client(client_id)
            if before["state"] != "active":
                raise Conflict(f"OAuth client {client_id} is revoked")
            self.conn.execute("UPDATE oauth_clients SET secret_hash = ?, rotated_at = ? WHERE client_id = ?",
                              (hash_key(secret), now(), client_id))
            after = self.get_oauth_client(client_id)
            self._audit(actor, "rotate", "oauth_client", before["id"], before, after)
        return after, secret

    def revoke_oauth_client(self, actor: str, client_id: str) -> dict:
        """Revoke the client and every unexpired token it was given (workers whose jwt policy has
        `check_revoked` refuse those within about a second)."""
        t = time.time()
        with self.tx():
            before = self.get_oauth_client(client_id)
            if before["state"] == "revoked":
                return {**before, "tokens_revoked": 0}
            self.conn.execute("UPDATE oauth_clients SET state = 'revoked', revoked_at = ? WHERE client_id = ?",
                              (now(), client_id))
            n = self.conn.execute("UPDATE oauth_tokens SET revoked_at = ? WHERE client_id = ? AND revoked_at IS "
                                  "NULL AND exp > ?", (t, client_id, t)).rowcount
            after = {**self.get_oauth_client(client_id), "tokens_revoked": n}
            self._audit(actor, "revoke", "oauth_client", before["id"], before, after)
        return after

    _KEY = "SELECT kid, alg, state, public_jwk, created_at, retired_at, drop_after, signs_from FROM oauth_keys"

    def oauth_keys(self, t: float | None = None) -> list[dict]:
        """The signing keys published at `t` (default now): the active one first, then the next one
        (published ahead of signing), then retired ones; never a private part."""
        t = time.time() if t is None else t
        rows = self._all(self._KEY + " WHERE state IN ('active', 'next') OR drop_after > ? "
                         "ORDER BY state = 'active' DESC, state = 'next' DESC, created_at DESC", (t,))
        for r in rows:
            r["public_jwk"] = json.loads(r["public_jwk"])
        return rows

    def active_oauth_key(self) -> dict | None:
        """The signing key, private PEM included, or None."""
        return self._one("SELECT * FROM oauth_keys WHERE state = 'active'")

    def next_oauth_key(self) -> dict | None:
        """The key published ahead of signing (state 'next'), or None."""
        return self._one(self._KEY + " WHERE state = 'next'")

    def schedule_oauth_key(self, actor: str, kid: str, alg: str, private_pem: str, public_jwk: dict,
                           signs_from: float) -> dict:
        """Publish `kid` now; it becomes the signing key at `signs_from` (`promote_oauth_key`). A key
        scheduled before and not yet signing is replaced."""
        t = time.time()
        with self.tx():
            old_next = self._one(self._KEY + " WHERE state = 'next'")
            if old_next is not None:
                self.conn.execute("DELETE FROM oauth_keys WHERE kid = ?", (old_next["kid"],))
                old_next.pop("public_jwk")
            self._insert("oauth_keys", {"kid": kid, "alg": alg, "private_pem": private_pem,
                                        "public_jwk": json.dumps(public_jwk), "state": "next", "created_at": t,
                                        "signs_from": signs_from})
            after = {"kid": kid, "alg": alg, "state": "next", "created_at": t, "retired_at": None,
                     "drop_after": None, "signs_from": signs_from}
            self._audit(actor, "schedule", "oauth_key", kid, old_next, after)
        return {**after, "replaced": old_next}

    def promote_oauth_key(self, margin: float, t: float | None = None) -> dict | None:
        """When the next key's time has come, make it the signing key (the active one retires as in
        `add_oauth_key`); returns it, or None when there is nothing to do."""
        t = time.time() if t is None else t
        with self.tx():
            nxt = self._one(self._KEY + " WHERE state = 'next' AND signs_from <= ?", (t,))
            if nxt is None:
                return None
            self._retire_active(t, margin)
            self.conn.execute("UPDATE oauth_keys SET state = 'active' WHERE kid = ?", (nxt["kid"],))
            nxt.pop("public_jwk")
            self._audit("oauth", "activate", "oauth_key", nxt["kid"], {**nxt}, {**nxt, "state": "active"})
        return {**nxt, "state": "active"}

    def _retire_active(self, t: float, margin: float) -> dict | None:
        old = self._one(self._KEY + " WHERE state = 'active'")
        if old is None:
            return None
        last_exp = self.conn.execute("SELECT max(exp) FROM oauth_tokens WHERE kid = ?", (old["kid"],)).fetchone()[0]
        drop_after = max(t, last_exp or t) + margin
        self.conn.execute("UPDATE oauth_keys SET state = 'retired', retired_at = ?, drop_after = ? WHERE kid = ?",
                          (t, drop_after, old["kid"]))
        old.pop("public_jwk")
        old.update(state="retired", retired_at=t, drop_after=drop_after)
        return old

    def add_oauth_key(self, actor: str, kid: str, alg: str, private_pem: str, public_jwk: dict,
                      margin: float) -> dict:
        """Make `kid` the signing key. The one it replaces is retired: still published until the last
        token it signed expires, plus `margin`, then dropped (`prune_oauth`)."""
        t = time.time()
        with self.tx():
            old = self._retire_active(t, margin)
            self._insert("oauth_keys", {"kid": kid, "alg": alg, "private_pem": private_pem,
                                        "public_jwk": json.dumps(public_jwk), "state": "active", "created_at": t,
                                        "signs_from": t})
            after = {"kid": kid, "alg": alg, "state": "active", "created_at": t, "retired_at": None,
                     "drop_after": None, "signs_from": t}
            self._audit(actor, "rotate" if old else "create", "oauth_key", kid, old, after)
        return {**after, "previous": old}

    def record_oauth_token(self, jti: str, client_id: str, kid: str, exp: float) -> None:
        with self.tx():
            self.conn.execute("INSERT INTO oauth_tokens (jti, client_id, kid, exp) VALUES (?, ?, ?, ?)",
                              (jti, client_id, kid, exp))

    def revoke_oauth_token(self, jti: str, client_id: str) -> str:
        """RFC 7009: "revoked", "unknown" (not issued here, or expired and forgotten) or "not_owner"."""
        with self.tx():
            row = self._one("SELECT client_id, revoked_at FROM oauth_tokens WHERE jti = ?", (jti,))
            if row is None:
                return "unknown"
            if row["client_id"] != client_id:
                return "not_owner"
            if row["revoked_at"] is None:
                self.conn.execute("UPDATE oauth_tokens SET revoked_at = ? WHERE jti = ?", (time.time(), jti))
        return "revoked"

    def prune_oauth(self) -> None:
        """Forget expired tokens (revoked or not: an expired token is refused anyway) and drop retired
        keys whose overlap has ended."""
        t = time.time()
        due = self.conn.execute("SELECT EXISTS (SELECT 1 FROM oauth_tokens WHERE exp < ?) OR EXISTS (SELECT 1 FROM "
                                "oauth_keys WHERE state = 'retired' AND drop_after <= ?)", (t, t)).fetchone()[0]
        if not due:  # no write transaction for nothing (the workers reload on every commit)
            return
        with self.tx():
            self.conn.execute("DELETE FROM oauth_tokens WHERE exp < ?", (t,))
            for (kid,) in self.conn.execute("SELECT kid FROM oauth_keys WHERE state = 'retired' AND drop_after <= ?",
                                            (t,)).fetchall():
                self.conn.execute("DELETE FROM oauth_keys WHERE kid = ?", (kid,))
                self._audit("oauth", "delete", "oauth_key", kid, {"kid": kid, "state": "retired"}, None)

    # --- shared helpers ---------------------------------------------------------------------------
    def _simple_update(self, actor: str, entity: str, get, id_: int, changes: dict) -> dict:
        with self.tx():
            before = get(id_)
            if changes:
                self._update(entity + "s", id_, {**changes, "updated_at": now()})
            after = get(id_)
            self._audit(actor, "update", entity, id_, before, after)
        return after

    def _simple_delete(self, actor: str, entity: str, get, id_: int) -> None:
        with self.tx():
            before = get(id_)
            self._delete(entity + "s", id_)
            self._audit(actor, "delete", entity, id_, before, None)


def _writable(row: dict, what: str) -> None:
    if row.get("source") == "config":
        raise ReadOnly(f"this {what} is declared in the config file: change it there (POST /config)")


def _integrity(exc: sqlite3.IntegrityError, table: str) -> str:
    msg = str(exc)
    if "UNIQUE" in msg:
        return f"a {table[:-1]} with this {msg.rsplit('.', 1)[-1]} already exists"
    if "FOREIGN KEY" in msg:
        return "refers to something that does not exist"
    return msg
