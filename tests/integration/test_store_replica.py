"""The store in Redis (`store.backend: redis`, control/replica.py): every control node's SQLite file
is a replica of the log and image Redis holds. Real redis-server, real SQLite files, in-process."""
from __future__ import annotations

import itertools
import sqlite3
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate.control import replica as replica_mod
from fastgate.control.replica import ReplicaFollower, StoreUnavailable
from fastgate.control.store import ACTIVE_KEYS_SQL, Conflict, NotFound, ReadOnly, Store
from tests.redis_server import RedisServer

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as r:
        yield r


@pytest.fixture
def prefix():
    return f"r{next(_prefixes)}:"


@pytest.fixture(autouse=True)
def quick_election(request, monkeypatch):
    """A new store is created after the control nodes have had `ELECTION` seconds to say how current
    they are; these tests start one node at a time, except where they test the election itself."""
    if "real_election" not in request.keywords:
        monkeypatch.setattr(replica_mod, "ELECTION", 0.02)


def dump(store: Store) -> list[str]:
    """The store's content, without what describes the node (the replica's place, the host cursor)."""
    return [line for line in store.conn.iterdump()
            if "INTO \"replica\"" not in line and "INTO \"analytics_cursor\"" not in line]


def test_a_write_on_one_node_is_read_on_another(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    a.create_consumer("alice@a", "alice", plan=None)
    cred, _key = a.create_key("alice@a", "alice")
    assert b.list_consumers() == []  # not yet: b's follower has not looked
    b.replica.sync()
    assert [c["username"] for c in b.list_consumers()] == ["alice"]
    assert b.get_credential(cred["id"]) == cred
    # b writes next: it catches up inside its own transaction first, so ids never collide
    b.create_consumer("bob@b", "bob")
    a.replica.sync()
    assert [(c["id"], c["username"]) for c in a.list_consumers()] == [(1, "alice"), (2, "bob")]
    with pytest.raises(Conflict):  # a unique name taken on another node is taken here
        a.create_consumer("alice@a", "bob")
    assert dump(a) == dump(b)
    assert [r["actor"] for r in b.list_audit()] == ["bob@b", "alice@a", "alice@a"]
    a.close()
    b.close()


def test_changes_outside_a_transaction_are_refused(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    with pytest.raises(RuntimeError, match="outside a transaction"):
        a.conn.execute("DELETE FROM consumers")
    assert a.conn.execute("SELECT count(*) FROM consumers").fetchone() == (0,)  # reads are fine
    a.close()


def test_new_and_lagging_replicas_start_from_the_image(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    a.replica.image_every, a.replica.keep = 4, 2
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    b.create_consumer("t", "early")  # transaction 1; then b stops following
    for i in range(9):  # transactions 2 to 10, with images at 4 and 8
        a.create_consumer("t", f"c{i}")
    assert redis.command("XLEN", f"{prefix}{{store}}:log") < 10  # trimmed behind the image of transaction 8
    assert int(redis.command("HGET", f"{prefix}{{store}}:image", "seq")) == 8
    b.replica.sync()  # its next entry (2) was trimmed away: it takes the image, then the log
    assert b.replica.images_loaded == 2 and dump(b) == dump(a)
    c = Store(str(tmp_path / "c.db"), redis.url, prefix)  # a new node
    assert len(c.list_consumers()) == 10 and dump(c) == dump(a)
    for s in (a, b, c):
        s.close()


def test_a_writer_that_lost_the_lock_cannot_append(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    a.replica.lock_ttl = 0.2
    b.replica.lock_wait = 2.0
    started = threading.Event()
    failure = []

    def slow_writer():
        try:
            with a.tx() as conn:
                conn.execute("INSERT INTO developers (email, created_at, updated_at) VALUES ('slow@x', 't', 't')")
                started.set()
                time.sleep(0.5)  # past its lock's expiry: b takes the lock meanwhile
        except StoreUnavailable as exc:
            failure.append(str(exc))

    t = threading.Thread(target=slow_writer)
    t.start()
    started.wait(5)
    b.create_developer("b", "fast@x")
    t.join(5)
    assert failure and "lost the store's lock" in failure[0]
    a.replica.sync()
    assert [d["email"] for d in a.list_developers()] == ["fast@x"]  # the slow write left no trace
    assert dump(a) == dump(b)
    a.close()
    b.close()


def test_redis_away_refuses_writes_keeps_reads_and_is_seeded_again(tmp_path):
    with RedisServer() as redis:
        a = Store(str(tmp_path / "a.db"), redis.url, "s:")
        b = Store(str(tmp_path / "b.db"), redis.url, "s:")
        a.create_consumer("t", "kept")
        b.replica.sync()
        redis.stop()
        with pytest.raises(StoreUnavailable):
            a.create_consumer("t", "lost")
        assert [c["username"] for c in a.list_consumers()] == ["kept"]  # reads answer from the replica
        redis.start()  # empty (no persistence here)
        a.create_consumer("t", "after")  # a seeds Redis from its replica, then writes
        b.replica.sync()
        assert [c["username"] for c in b.list_consumers()] == ["kept", "after"]
        assert dump(a) == dump(b)
        a.close()
        b.close()


def test_a_replica_ahead_of_redis_takes_redis_image(tmp_path, caplog):
    """Redis lost acknowledged writes (here: flushed, then seeded by a node that was behind): Redis is
    the record, and the node that had more says what it dropped."""
    with RedisServer() as redis:
        a = Store(str(tmp_path / "a.db"), redis.url, "s:")
        b = Store(str(tmp_path / "b.db"), redis.url, "s:")
        a.create_consumer("t", "one")
        b.replica.sync()
        a.create_consumer("t", "two")  # b never follows this one
        redis.command("FLUSHALL")
        b.replica.sync()  # b seeds Redis at transaction 1
        a.replica.sync()
        assert [c["username"] for c in a.list_consumers()] == ["one"]
        assert "Redis lost writes" in caplog.text
        a.close()
        b.close()


def test_node_local_rows_survive_an_image_load(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    a.create_consumer("t", "x")
    a.replica.publish_image()
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    b.conn.conn.execute("INSERT INTO analytics_cursor (k, v) VALUES ('host', 'b-only')")
    b.conn.conn.execute("UPDATE replica SET v = 'another-store' WHERE k = 'id'")  # as if from elsewhere
    b.replica.sync()
    assert b.replica.images_loaded == 2
    assert b.conn.execute("SELECT v FROM analytics_cursor").fetchall() == [("b-only",)]
    a.close()
    b.close()


# --- property: replicas written in any order hold the same rows ------------------------------------
NAMES = st.sampled_from(["ann", "ben", "cat"])
OPS = st.one_of(
    st.tuples(st.just("consumer"), NAMES),
    st.tuples(st.just("key"), NAMES),
    st.tuples(st.just("revoke"), st.integers(1, 4)),
    st.tuples(st.just("rotate"), st.integers(1, 4)),
    st.tuples(st.just("delete"), NAMES),
    st.tuples(st.just("plan"), st.sampled_from(["gold", "free"])),
    st.tuples(st.just("move"), NAMES, st.sampled_from(["gold", "free"])),
    st.tuples(st.just("drop_plan"), st.sampled_from(["gold", "free"])),
)


def _run(store: Store, op: tuple) -> None:
    kind = op[0]
    try:
        if kind == "consumer":
            store.create_consumer("p", op[1])
        elif kind == "key":
            store.create_key("p", op[1])
        elif kind == "revoke":
            store.revoke_key("p", op[1])
        elif kind == "rotate":
            store.rotate_key("p", op[1])
        elif kind == "delete":
            store.delete_consumer("p", op[1])
        elif kind == "plan":
            store.create_plan("p", op[1], rate_limits=[{"rate": 5}])
        elif kind == "move":
            store.update_consumer("p", op[1], {"plan": op[2]})
        else:
            store.delete_plan("p", op[1])
    except (Conflict, NotFound, ReadOnly):
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.booleans(), OPS), max_size=25))
def test_replicas_converge_whatever_the_interleaving(redis, tmp_path_factory, ops):
    """Each step runs on node a or b, which may or may not have followed the log first; whatever the
    order, both end with the same rows as one SQLite store that ran the same steps alone."""
    d = tmp_path_factory.mktemp("conv")
    prefix = f"r{next(_prefixes)}:"
    a = Store(str(d / "a.db"), redis.url, prefix)
    b = Store(str(d / "b.db"), redis.url, prefix)
    alone = Store(str(d / "alone.db"))
    try:
        for on_a, follow, op in ops:
            node = a if on_a else b
            if follow:
                node.replica.sync()
            _run(node, op)
            _run(alone, op)
        a.replica.sync()
        b.replica.sync()
        assert dump(a) == dump(b)

        def rows(s):  # times and key hashes differ between the two runs: compare the shapes
            return ([(c["id"], c["username"], c["plan"]) for c in s.list_consumers()],
                    [(k["id"], k["consumer"], k["state"]) for k in s.list_credentials()],
                    [(p["id"], p["name"]) for p in s.list_plans()],
                    [(r["id"], r["action"], r["entity"], r["entity_id"]) for r in s.list_audit(1000)])

        assert rows(a) == rows(alone)
    finally:
        for s in (a, b, alone):
            s.close()


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_oauth_keys_rotated_on_one_node_sign_on_the_other(redis, prefix, tmp_path):
    """Two authorization servers over one store: a rotation through node b makes node a sign with
    the new key too (its cached signer follows the store), both publish the same key set, and with
    Redis away the token endpoint answers 503 while the key set is still served."""
    import jwt as pyjwt
    from starlette.testclient import TestClient

    from fastgate.config.load import load_config
    from fastgate.control.oauth import AuthServer, create_oauth_app, generate_key

    cfg = load_config({"store": {"path": str(tmp_path / "x.db")}, "admin": {"token": "t" * 24},
                       "listeners": [{"kind": "proxy", "port": 8000}, {"kind": "admin", "port": 8001}],
                       "oauth": {"enabled": True, "issuer": "http://127.0.0.1:8001", "audience": "aud",
                                 "algorithm": "ES256", "overlap_margin": 0, "publish_ahead": 0}})
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    sa, sb = AuthServer(a, cfg.oauth), AuthServer(b, cfg.oauth)
    sa.ensure_key()
    b.replica.sync()
    sb.ensure_key()  # the key node a made is there: none made here
    first = sa.signer()[0]
    assert sb.signer()[0] == first and len(b.oauth_keys()) == 1
    kid, pem, jwk = generate_key("ES256")
    b.add_oauth_key("test", kid, "ES256", pem, jwk, 0)  # a rotation through node b
    a.replica.sync()
    assert sa.signer()[0] == kid
    with TestClient(create_oauth_app(sa)) as web:
        app_id = a.create_app("t", "app")["id"]
        c, secret = a.create_oauth_client("t", app_id)
        r = web.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(c["client_id"], secret))
        assert r.status_code == 200, r.text
        assert pyjwt.get_unverified_header(r.json()["access_token"])["kid"] == kid
        assert web.get("/.well-known/jwks.json").json() == {"keys": [k["public_jwk"] for k in b.oauth_keys()]}
        redis.stop()
        try:
            r = web.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(c["client_id"], secret))
            assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
            assert web.get("/.well-known/jwks.json").status_code == 200
        finally:
            redis.start()
    a.close()
    b.close()


def test_the_follower_replays_cascades_and_ids_as_they_ran(redis, prefix, tmp_path):
    """The follower's own connection (not the Store's) applies the log: a consumer's delete takes
    its keys with it there too, so a name reused later never inherits them."""
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    follower = ReplicaFollower(str(tmp_path / "b.db"), redis.url, prefix, interval=0.02)
    follower.start()
    try:
        a.create_consumer("t", "alice")
        a.create_key("t", "alice")
        a.delete_consumer("t", "alice")  # ON DELETE CASCADE: alice's key goes
        a.create_consumer("t", "mallory")  # the same consumer id, 1
        cred, _key = a.create_key("t", "mallory")
        deadline = time.monotonic() + 5
        while b.replica.local_seq() < a.replica.local_seq() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert follower.replica.applied >= 5
        assert b.conn.execute(ACTIVE_KEYS_SQL).fetchall() == a.conn.execute(ACTIVE_KEYS_SQL).fetchall()
        assert [(k["id"], k["consumer"]) for k in b.list_credentials()] == [(cred["id"], "mallory")]
        assert dump(a) == dump(b)
    finally:
        follower.stop()
        a.close()
        b.close()


def test_redis_emptied_is_seeded_by_the_most_current_node(redis, prefix, tmp_path, monkeypatch):
    """Redis comes back empty while a new node starts: the new node's empty file does not win
    over the node that holds the store."""
    monkeypatch.setattr(replica_mod, "ELECTION", 0.5)
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    for i in range(5):
        a.create_consumer("t", f"c{i}")
    for k in redis.command("KEYS", f"{prefix}*"):
        redis.command("DEL", k)
    started = {}

    def new_node():  # as the control process does (control/process.py): try again while Redis is being seeded
        for _ in range(50):
            try:
                started["c"] = Store(str(tmp_path / "c.db"), redis.url, prefix)
                return
            except StoreUnavailable as exc:
                started.setdefault("waited", str(exc))
                time.sleep(0.1)

    t = threading.Thread(target=new_node)
    t.start()
    time.sleep(0.05)
    a.replica.sync()  # a takes part in the same election (its follower would, within 0.2 s)
    t.join(10)
    c = started["c"]
    assert "a more current control node is seeding it" in started["waited"]  # it lost the election
    assert len(a.list_consumers()) == 5
    assert [x["username"] for x in c.list_consumers()] == [f"c{i}" for i in range(5)]
    assert dump(c) == dump(a)
    a.close()
    c.close()


def test_a_file_of_another_store_is_kept_before_it_is_replaced(redis, prefix, tmp_path):
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    a.create_consumer("t", "only-here")
    for k in redis.command("KEYS", f"{prefix}*"):  # Redis lost the store, and a new node seeds it alone
        redis.command("DEL", k)
    c = Store(str(tmp_path / "c.db"), redis.url, prefix)
    c.create_consumer("t", "new-store")
    a.replica.sync()  # a's file is not a replica of this store: a copy is kept, then it follows
    assert [x["username"] for x in a.list_consumers()] == ["new-store"]
    (backup,) = a.replica.backups
    kept = sqlite3.connect(backup)
    assert kept.execute("SELECT username FROM consumers").fetchall() == [("only-here",)]
    kept.close()
    a.close()
    c.close()


def test_a_transaction_redis_lost_is_not_built_upon(redis, prefix, tmp_path, caplog):
    """Redis goes back to an earlier state (a failover to a replica that lagged) and another node
    writes different transactions under the same numbers: the node that had the lost one notices
    (each entry names the one it follows) and takes Redis's state, rather than diverging."""
    a = Store(str(tmp_path / "a.db"), redis.url, prefix)
    b = Store(str(tmp_path / "b.db"), redis.url, prefix)
    a.create_consumer("t", "alice")
    b.replica.sync()
    kept = {k: redis.command("GET", f"{prefix}{{store}}:{k}") for k in ("seq", "hash")}
    lost = a.replica.local_seq() + 1
    a.create_key("t", "alice")  # acknowledged, then lost by Redis
    stream = f"{prefix}{{store}}:log"  # the log as it was before: its entries up to the lost one
    before = redis.command("XRANGE", stream, "-", f"{lost - 1}-0")
    redis.command("DEL", stream)
    for eid, fields in before:
        redis.command("XADD", stream, eid, *fields)
    for k, v in kept.items():
        redis.command("SET", f"{prefix}{{store}}:{k}", v)
    b.create_consumer("t", "bob")  # a different transaction with the lost one's number
    for i in range(3):
        b.create_consumer("t", f"x{i}")
    a.replica.sync()
    assert "does not follow this node's replica" in caplog.text
    assert a.list_credentials() == [] and dump(a) == dump(b)
    a.close()
    b.close()


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_the_portal_answers_503_while_the_store_is_away(redis, prefix, tmp_path):
    """Not the misleading answer of a store error it knows (409 "already exists" on sign-up)."""
    import re

    from starlette.testclient import TestClient

    from fastgate.config.load import load_config
    from fastgate.control.portal import create_portal

    cfg = load_config({"store": {"path": str(tmp_path / "p.db")},
                       "routes": [{"name": "hello", "paths": ["/hello"], "mock": {"body": "one"}}]})
    store = Store(cfg.store.path, redis.url, prefix)
    try:
        c = TestClient(create_portal(store, cfg, "t" * 24), base_url="http://127.0.0.1")
        page = c.get("/signup")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        form = {"email": "new@example.com", "password": "a long enough password", "csrf": csrf}
        redis.stop()
        try:
            r = c.post("/signup", data=form)
            assert r.status_code == 503 and "cannot save anything right now" in r.text
            assert "redis://" not in r.text
        finally:
            redis.start()
        assert c.post("/signup", data=form).status_code in (200, 201, 202, 303)
        assert [d["email"] for d in store.list_developers()] == ["new@example.com"]
    finally:
        store.close()
