"""Clustered nodes (`store.backend: redis`): a key made or revoked through one node's admin API
reaches the workers of another node, which has no control process and no store file of its own,
through Redis pub/sub — and survives Redis going away and coming back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness import free_port, wait_for
from tests.redis_server import RedisServer

TOKEN = "cluster-admin-token-0123456789"

NODE = """
workers: 2
store: {{backend: redis, path: {db}, redis_url: "{redis}", key_prefix: "t1:"}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
{listeners}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "hi"}}}}
  - {{name: private, paths: [/private], mock: {{body: "secret"}}, policies: [{{type: key-auth}}]}}
apis:
  - name: billing
    versions:
      - {{version: v1, routes: [{{name: billed, paths: [/billed], mock: {{body: "b"}}, policies: [{{type: key-auth}}]}}]}}
"""



class Node:
    def __init__(self, tmp, name: str, redis_url: str, admin: bool):
        self.port = free_port()
        self.admin_port = free_port() if admin else None
        listeners = f"  - {{kind: proxy, port: {self.port}}}"
        if admin:
            listeners += f"\n  - {{kind: admin, port: {self.admin_port}}}"
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(NODE.format(db=tmp / f"{name}.db", redis=redis_url, listeners=listeners))
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", str(cfg)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN})
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: httpx.get(self.url + "/hello", timeout=1).status_code == 200, 20, f"node {name}")
        if admin:
            self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=10,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
            wait_for(lambda: self.admin.get("/status").status_code == 200, 20, "the admin API")

    def status(self, key: str) -> int:
        # a fresh connection each time: either worker may take it
        return httpx.get(self.url + "/private", headers={"apikey": key}, timeout=5).status_code

    def every_worker(self, key: str, status: int) -> bool:
        return all(self.status(key) == status for _ in range(8))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def billed(node: Node, n: int, key: str) -> None:
    """`n` requests to node's `billing` API route with `key`, each answered 200."""
    with httpx.Client(timeout=5) as c:
        for _ in range(n):
            assert c.get(node.url + "/billed", headers={"apikey": key}).status_code == 200


@pytest.fixture
def cluster(tmp_path):
    with RedisServer() as redis:
        a = Node(tmp_path, "a", redis.url, admin=True)
        b = None
        try:
            b = Node(tmp_path, "b", redis.url, admin=False)
            yield redis, a, b
        finally:
            a.stop()
            if b is not None:
                b.stop()


def test_keys_reach_another_node_through_redis(cluster):
    redis, a, b = cluster
    assert a.admin.post("/consumers", json={"username": "carol"}).status_code == 201
    cred = a.admin.post("/consumers/carol/credentials").json()
    key = cred["key"]
    wait_for(lambda: b.every_worker(key, 200), 5, "the key on node b")
    assert not (b.log.parent / "b.db").exists()  # node b never had a store file: Redis told it
    # what Redis holds is the directory: hashes, never the key
    blob = redis.command("GET", "t1:directory")
    assert key.encode() not in blob and b"carol" in blob
    # revoked through node a: refused on node b
    assert a.admin.delete(f"/credentials/{cred['id']}").status_code == 200
    wait_for(lambda: b.every_worker(key, 401), 5, "the revocation on node b")


def _billed_status(node: Node) -> int:
    return httpx.get(node.url + "/billed", timeout=5).status_code  # without a key: 401 while published


def test_api_version_state_reaches_another_node(cluster):
    """An API version retired through node a's admin API: node b's workers answer 410, a worker that
    starts on node b afterwards too, from its first request; dropped, 401 (key-auth) again."""
    _redis, a, b = cluster
    assert _billed_status(b) == 401
    r = a.admin.put("/apis/billing/versions/v1/state", json={"state": "retired"})
    assert r.status_code == 200 and r.json()["source"] == "store", r.text
    wait_for(lambda: all(_billed_status(b) == 410 for _ in range(8)), 5, "v1 retired on node b")
    before = _children(b.proc.pid)
    os.kill(before[0], signal.SIGKILL)
    deadline, started = time.monotonic() + 20, None
    while time.monotonic() < (deadline if started is None else started + 2):
        assert _billed_status(b) == 410  # while its replacement starts: never served in the config's state
        now = _children(b.proc.pid)
        if started is None and len(now) == len(before) and before[0] not in now:
            started = time.monotonic()  # forked: it serves within the next two seconds
    assert started is not None, "node b's worker was not restarted"
    assert "API lifecycle" in b.log.read_text()
    assert a.admin.delete("/apis/billing/versions/v1/state").status_code == 200
    wait_for(lambda: all(_billed_status(b) == 401 for _ in range(8)), 5, "v1 published again on node b")


def test_redis_down_keeps_the_last_directory_and_catches_up_after(cluster):
    redis, a, b = cluster
    a.admin.post("/consumers", json={"username": "dave"})
    first = a.admin.post("/consumers/dave/credentials").json()["key"]
    wait_for(lambda: b.every_worker(first, 200), 5, "the first key on node b")
    redis.stop()
    # Redis holds the store's record: no write without it, reads answer from the node's replica
    r = a.admin.post("/consumers/dave/credentials")
    assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text
    doc = a.admin.get("/openapi.json").json()  # and the API's own document says so
    assert "503" in doc["paths"]["/consumers/{name}/credentials"]["post"]["responses"]
    assert a.admin.get("/consumers/dave").status_code == 200
    time.sleep(1.0)
    assert b.every_worker(first, 200)  # the last snapshot stays in force
    redis.start()  # empty: node a's replica seeds it again, the subscribers reconnect and fetch

    def create():
        r = a.admin.post("/consumers/dave/credentials")
        return r.json()["key"] if r.status_code == 201 else None

    second = wait_for(create, 15, "a write once Redis is back")
    wait_for(lambda: b.every_worker(second, 200), 15, "the second key after Redis came back")
    assert b.every_worker(first, 200)
    assert "keeping the last snapshot" in b.log.read_text()
    assert "held no store: seeded it from this node's replica" in a.log.read_text()


def test_usage_ledger_counts_every_node_exactly_once(cluster):
    redis, a, b = cluster
    a.admin.post("/consumers", json={"username": "erin"})
    key = a.admin.post("/consumers/erin/credentials").json()["key"]
    wait_for(lambda: a.every_worker(key, 200) and b.every_worker(key, 200), 5, "the key on both nodes")
    # the counted traffic goes to the `billing` API's route; the checks above are another row
    sent = {"a": 0, "b": 0}

    def ledger() -> int:
        rows = a.admin.get("/usage", params={"consumer": "erin"}).json()
        return sum(r["requests"] for r in rows if r["api"] == "billing")

    billed(a, 37, key)
    billed(b, 55, key)
    sent["a"] += 37
    sent["b"] += 55
    wait_for(lambda: ledger() == 92, 20, "the ledger to count the first 92 requests")
    # Redis away while requests are served: the workers keep their counts and send them when it is back
    redis.stop()
    billed(b, 11, key)
    billed(a, 3, key)
    redis.start()
    sent["b"] += 11
    sent["a"] += 3
    total = sum(sent.values())

    wait_for(lambda: ledger() == total, 20, f"the ledger to count {total} requests")
    time.sleep(3)  # a few more drains: nothing counted twice
    assert ledger() == total
    rows = a.admin.get("/usage", params={"consumer": "erin"}).json()
    assert all(r["errors"] == 0 and r["avg_latency_ms"] > 0 for r in rows)


def test_dashboard_series_count_every_node(cluster):
    _redis, a, b = cluster
    a.admin.post("/consumers", json={"username": "fay"})
    key = a.admin.post("/consumers/fay/credentials").json()["key"]
    wait_for(lambda: a.every_worker(key, 200) and b.every_worker(key, 200), 5, "the key on both nodes")
    billed(a, 21, key)
    billed(b, 34, key)
    assert httpx.get(b.url + "/billed", timeout=5).status_code == 401  # refused on node b: a 4xx in the series

    def series() -> dict:
        doc = a.admin.get("/analytics/summary", params={"window": "1h"}).json()
        return next((r for r in doc["top_routes"] if r["route"] == "billed"), {})

    wait_for(lambda: series().get("requests") == 56, 20, "the dashboard to count both nodes' requests")
    time.sleep(3)  # more drains and snapshots: nothing counted twice
    got = series()
    assert got["requests"] == 56 and got["status"]["2xx"] == 55 and got["status"]["4xx"] == 1


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_dashboard_counts_every_nodes_restarts_and_reloads(cluster):
    """Worker restarts and reloads of a node without the control process reach the dashboard
    through Redis (the supervisor's HostEventSender), counted once."""
    _redis, a, b = cluster

    def summary() -> dict:
        return a.admin.get("/analytics/summary", params={"window": "1h"}).json()

    before = summary()
    os.kill(_children(b.proc.pid)[0], signal.SIGKILL)  # node b has no control process: a worker
    # (a reload at the same moment would reap the killed worker as one of the old generation's)
    wait_for(lambda: summary()["worker_restarts"] - before["worker_restarts"] == 1, 30, "node b's restart")
    b.proc.send_signal(signal.SIGHUP)
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: summary()["reloads"] - before["reloads"] == 2, 30, "both nodes' reloads")
    time.sleep(3)  # more drains and snapshots: nothing counted twice
    after = summary()
    assert after["worker_restarts"] - before["worker_restarts"] == 1
    assert after["reloads"] - before["reloads"] == 2
    assert b.every_worker("no-such-key", 401)  # node b serves on, with its restarted worker


def test_host_events_wait_for_redis_and_are_applied_once(tmp_path):
    """The supervisor's sender never raises or blocks long while Redis is down; what it kept is
    applied once when Redis is back, and the drainer puts it in the store's series."""
    import sqlite3

    from fastgate.control.analytics import HOST_ROW
    from fastgate.control.replica import Replica
    from fastgate.control.store import Store
    from fastgate.control.usage_redis import HostEventSender, UsageDrainer

    with RedisServer() as redis:
        sender = HostEventSender(redis.url, "t2:", retry=0.0, background=False)
        redis.stop()
        sender.add("restarts")
        sender.add("restarts")
        sender.add("reloads")
        t = time.monotonic()
        sender.flush()
        assert time.monotonic() - t < 2 and len(sender.unsent) == 1 and not sender.pending
        redis.start()
        sender.flush()
        sender.flush()  # nothing left: nothing sent twice
        assert not sender.unsent
        db = tmp_path / "s.db"
        Store(str(db)).close()
        conn = sqlite3.connect(db, isolation_level=None)
        replica = Replica(conn, redis.url, "t2:")
        assert UsageDrainer(str(db), redis.url, "t2:").drain_once(replica) == 1
        replica.close()
        row = conn.execute("SELECT SUM(restarts), SUM(reloads) FROM metric_series WHERE res = 10 AND route = ?",
                           (HOST_ROW,)).fetchone()
        assert row == (2, 1)



def test_host_events_survive_a_peer_that_is_not_redis():
    """A redis_url pointing at something else: garbage replies are logged and kept, never raised
    into the supervisor."""
    import socket
    import threading

    from fastgate.control.usage_redis import HostEventSender

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        sender = HostEventSender(f"redis://127.0.0.1:{srv.getsockname()[1]}", "t3:", retry=0.0, background=False)
        sender.add("reloads")
        sender.flush()
        sender.flush()
        assert len(sender.unsent) == 1  # kept for when the URL points at a Redis
    finally:
        stop.set()
        t.join(2)
        srv.close()


def test_two_control_nodes_share_one_store_in_redis(tmp_path):
    """Two nodes each with an admin API (and a store file of their own, a replica): what one writes,
    the other reads within a second, its workers honour, and no write is lost or made twice."""
    import threading

    with RedisServer() as redis:
        a = Node(tmp_path, "a", redis.url, admin=True)
        c = None
        try:
            c = Node(tmp_path, "c", redis.url, admin=True)
            assert a.admin.post("/consumers", json={"username": "gina"}).status_code == 201
            wait_for(lambda: c.admin.get("/consumers/gina").status_code == 200, 2, "gina on node c's admin API")
            cred = c.admin.post("/consumers/gina/credentials").json()  # written through the other node
            wait_for(lambda: a.every_worker(cred["key"], 200) and c.every_worker(cred["key"], 200), 5,
                     "node c's key on both nodes' workers")
            assert a.admin.delete(f"/credentials/{cred['id']}").status_code == 200
            wait_for(lambda: c.every_worker(cred["key"], 401), 5, "the revocation on node c")

            statuses = []  # the same new name on both at once: one wins, the other is told
            go = threading.Barrier(2)

            def create(node):
                go.wait()
                statuses.append(node.admin.post("/consumers", json={"username": "hal"}).status_code)

            threads = [threading.Thread(target=create, args=(n,)) for n in (a, c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(statuses) == [201, 409]

            # the ledger: each node's drain is applied on both replicas, once
            key = a.admin.post("/consumers/gina/credentials").json()["key"]
            wait_for(lambda: a.every_worker(key, 200) and c.every_worker(key, 200), 5, "the new key on both")
            billed(a, 13, key)
            billed(c, 21, key)

            def ledger(node) -> int:
                rows = node.admin.get("/usage", params={"consumer": "gina"}).json()
                return sum(r["requests"] for r in rows if r["api"] == "billing")

            wait_for(lambda: ledger(a) == 34 and ledger(c) == 34, 20, "both ledgers to count 34 requests")
            time.sleep(3)  # more drains on both nodes: nothing counted twice
            assert ledger(a) == 34 and ledger(c) == 34
            for path in ("/consumers", "/credentials", "/audit"):
                wait_for(lambda p=path: a.admin.get(p).json() == c.admin.get(p).json(), 2, f"{path} alike")
        finally:
            a.stop()
            if c is not None:
                c.stop()


def test_the_supervisor_forks_only_between_two_sends_of_host_events():
    """A send under way (here: a peer that never answers, so it lasts the 0.25 s timeout) is waited
    for before a fork, and none starts until the fork is done: a child never inherits a lock the
    sender's thread held mid-send (the hang this prevents: a new control process stuck at start)."""
    import socket

    from fastgate.control.usage_redis import HostEventSender

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        sender = HostEventSender(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", "t3:", retry=0.0)
        sender.add("reloads")  # the thread starts sending into silence
        time.sleep(0.05)
        assert sender._send_lock.locked()  # mid-send
        t = time.monotonic()
        with sender.quiet() as still:
            waited = time.monotonic() - t
            sender.add("reloads")  # wakes the thread: it must not take this while held still
            time.sleep(0.1)
            pending_during = dict(sender.pending)
        assert still and waited > 0.1  # it did wait for the send under way to end
        assert pending_during  # nothing was taken for sending while held still
    finally:
        silent.close()
