"""The control plane with real processes: `fastgate run` with an admin listener, the admin API over
real HTTP (httpx), keys reaching the workers through the SQLite store, config pushes, the CLI
wrappers, and the control process restarted after SIGKILL while the data plane keeps serving."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fastgate.policies.auth import hash_key
from tests.harness import free_port, wait_for

TOKEN = "test-admin-token-0123456789"

CONFIG = """
workers: 2
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
plans:
  - {{name: gold}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "one"}}}}
  - {{name: private, paths: [/private], mock: {{body: "secret"}}, policies: [{{type: key-auth}}]}}
apis:
  - name: pets
    base_path: /pets
    versions:
      - {{version: v1, state: published, routes: [{{name: pets-list, paths: [/list], mock: {{json: []}}}}]}}
      - {{version: v2, routes: [{{name: pets-v2, paths: [/v2/list], mock: {{json: [2]}}}}]}}
"""



class ControlledGateway:
    """`fastgate run` in a subprocess; `config` is a template with {db}, {port} and {admin} fields."""

    def __init__(self, tmp: Path, config: str = CONFIG):
        self.tmp = tmp
        self.db = tmp / "store.db"
        self.port, self.admin_port = free_port(), free_port()
        self.cfg = tmp / "gw.yaml"
        self.cfg.write_text(config.format(db=self.db, port=self.port, admin=self.admin_port))
        self.log = tmp / "gw.log"
        self.env = {**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "-c", str(self.cfg), "--pid-file", str(tmp / "gw.pid")],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=self.env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.admin = httpx.Client(base_url=self.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        try:
            wait_for(lambda: httpx.get(self.url + "/hello", timeout=1).status_code == 200, 20, "the proxy")
            wait_for(lambda: self.admin.get("/status").status_code == 200, 20, "the admin API")
        except AssertionError:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text()) from None

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5, **kw)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        """An admin call that waits out a control process restarting (its socket queues meanwhile)."""
        return wait_for(lambda: self.admin.request(method, path, **kw), 20, f"{method} {path}")

    def stop(self) -> int:
        self.admin.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = ControlledGateway(tmp_path_factory.mktemp("admin"))
    yield g
    assert g.stop() == 0, g.log.read_text()[-3000:]


def status_of(gw, path: str, key: str | None = None) -> int:
    return gw.get(path, headers={"apikey": key} if key else {}).status_code


def test_admin_api_needs_the_token(gw):
    assert httpx.get(gw.admin_url + "/consumers").status_code == 401
    r = httpx.get(gw.admin_url + "/consumers", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(gw.admin_url + "/openapi.json").status_code == 401
    assert gw.call("GET", "/consumers").status_code == 200


def test_key_created_through_the_api_works_stored_hashed_and_revoked(gw):
    r = gw.call("POST", "/consumers", json={"username": "alice", "plan": "gold", "groups": ["staff"]})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "api"
    assert status_of(gw, "/private") == 401
    r = gw.call("POST", "/consumers/alice/credentials")
    assert r.status_code == 201, r.text
    cred, key = r.json(), r.json()["key"]
    assert r.headers["cache-control"] == "no-store"
    wait_for(lambda: status_of(gw, "/private", key) == 200, 10, "the new key to be accepted")
    for _ in range(10):  # every worker has it (the connection goes to either)
        assert status_of(gw, "/private", key) == 200
    # the key is shown once: never again by the API, and stored only as its hash
    again = gw.call("GET", f"/credentials/{cred['id']}").json()
    assert "key" not in again and key not in json.dumps(again)
    with sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True) as conn:
        hashes = [h for (h,) in conn.execute("SELECT key_hash FROM credentials WHERE id = ?", (cred["id"],))]
        dump = "\n".join(conn.iterdump())
    assert hashes == [hash_key(key)]
    assert key not in dump
    for f in gw.tmp.glob("store.db*"):
        assert key.encode() not in f.read_bytes()
    # rotation: the new key works, the old one stops
    r = gw.call("POST", f"/credentials/{cred['id']}/rotate")
    assert r.status_code == 200, r.text
    new_key = r.json()["key"]
    assert new_key != key
    wait_for(lambda: status_of(gw, "/private", new_key) == 200, 10, "the rotated key")
    wait_for(lambda: status_of(gw, "/private", key) == 401, 10, "the old key to be refused")
    # revocation
    r = gw.call("DELETE", f"/credentials/{cred['id']}")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    wait_for(lambda: status_of(gw, "/private", new_key) == 401, 10, "the revoked key to be refused")
    for _ in range(10):
        assert status_of(gw, "/private", new_key) == 401


def test_crud_on_the_other_entities(gw):
    dev = gw.call("POST", "/developers", json={"email": "dev@example.com", "name": "Dev"})
    assert dev.status_code == 201, dev.text
    app = gw.call("POST", "/apps", json={"name": "shop", "developer_id": dev.json()["id"]})
    assert app.status_code == 201, app.text
    plan = gw.call("POST", "/plans", json={"name": "silver", "rate_limits": [{"rate": 10}], "quotas": [
        {"limit": 1000, "period": "day"}]})
    assert plan.status_code == 201, plan.text
    sub = gw.call("POST", "/subscriptions", json={"app_id": app.json()["id"], "plan": "silver"})
    assert sub.status_code == 201 and sub.json()["state"] == "pending"
    r = gw.call("PATCH", f"/subscriptions/{sub.json()['id']}", json={"state": "active"})
    assert r.json()["state"] == "active"
    assert gw.call("PATCH", f"/subscriptions/{sub.json()['id']}", json={"state": "nope"}).status_code == 422
    assert gw.call("DELETE", "/plans/silver").status_code == 409  # still subscribed to
    assert gw.call("PATCH", "/plans/gold", json={"description": "x"}).status_code == 409  # from the config
    assert gw.call("GET", "/plans/gold").json()["read_only"] is True
    assert gw.call("DELETE", f"/apps/{app.json()['id']}").status_code == 204
    assert gw.call("DELETE", "/plans/silver").status_code == 204
    assert gw.call("GET", "/plans/silver").status_code == 404
    assert gw.call("POST", "/consumers", json={"username": "x y"}).status_code == 422
    assert gw.call("POST", "/consumers", json={"username": "z", "plan": "missing"}).status_code == 404
    routes = {r["name"] for r in gw.call("GET", "/routes").json()}
    assert {"hello", "private", "pets-list"} <= routes
    assert gw.call("GET", "/apis").json()[0]["versions"][0]["routes"] == ["pets-list"]
    assert gw.call("GET", "/config").json()["admin"]["token_env"] == "FG_TEST_ADMIN_TOKEN"


def test_openapi_document(gw):
    doc = gw.call("GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/consumers", "/consumers/{name}/credentials", "/credentials/{id}/rotate", "/config", "/audit"} <= set(
        doc["paths"])
    ref = doc["paths"]["/consumers"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]


def test_audit_has_an_entry_for_each_change(gw):
    r = gw.call("POST", "/consumers", json={"username": "audited"})
    assert r.status_code == 201
    key = gw.call("POST", "/consumers/audited/credentials").json()
    gw.call("DELETE", f"/credentials/{key['id']}")
    gw.call("DELETE", "/consumers/audited")
    entries = gw.call("GET", "/audit", params={"limit": 50}).json()
    mine = [(e["action"], e["entity"], e["entity_id"]) for e in entries
            if e["entity_id"] in ("audited", str(key["id"]))][:4]
    assert mine == [("delete", "consumer", "audited"), ("revoke", "credential", str(key["id"])),
                    ("create", "credential", str(key["id"])), ("create", "consumer", "audited")]
    revoke = next(e for e in entries if e["action"] == "revoke" and e["entity_id"] == str(key["id"]))
    assert revoke["before"]["state"] == "active" and revoke["after"]["state"] == "revoked"
    assert revoke["actor"].startswith("admin@127.0.0.1") and revoke["at"].endswith("Z")
    assert key["key"] not in json.dumps(entries)


def test_cli_wrappers(gw):
    env = {**gw.env, "FASTGATE_ADMIN_URL": gw.admin_url, "FASTGATE_ADMIN_TOKEN": TOKEN}

    def cli(*args) -> str:
        p = subprocess.run([sys.executable, "-m", "fastgate", *args], env=env, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert "carol created" in cli("consumers", "create", "carol", "--plan", "gold")
    assert any(line.split()[:2] == ["carol", "gold"] for line in cli("consumers", "list").splitlines())
    created = json.loads(cli("keys", "create", "carol", "--json"))
    key = created["key"]
    wait_for(lambda: status_of(gw, "/private", key) == 200, 10, "the CLI's key")
    rotated = cli("keys", "rotate", str(created["id"])).splitlines()[-1]
    wait_for(lambda: status_of(gw, "/private", rotated) == 200, 10, "the CLI's rotated key")
    assert "revoked" in cli("keys", "revoke", str(created["id"]))
    wait_for(lambda: status_of(gw, "/private", rotated) == 401, 10, "the CLI's revoked key to be refused")
    assert "pets" in cli("apis", "list")
    assert cli("apis", "state", "pets", "v2", "deprecated", "--successor", "v1").strip() == (
        "pets v2: deprecated (set here, successor v1)")
    wait_for(lambda: gw.get("/pets/v2/list").headers.get("deprecation") == "true", 10, "v2 deprecated")
    assert "v2 (deprecated, set here)" in cli("apis", "list")
    assert cli("apis", "state", "pets", "v2", "--reset").strip() == "pets v2: published (the config's)"
    assert cli("apis", "state", "pets", "v2").strip() == "pets v2: published (the config's)"
    wait_for(lambda: "deprecation" not in gw.get("/pets/v2/list").headers, 10, "v2 published again")
    assert "deleted" in cli("consumers", "delete", "carol")
    assert "carol" not in cli("consumers", "list")
    bad = subprocess.run([sys.executable, "-m", "fastgate", "consumers", "list", "--admin-token", "wrong-wrong-wrong"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "401" in bad.stderr


def _lifecycle_logged(gw) -> int:
    return gw.log.read_text().count("API lifecycle:")


def test_api_version_state_set_through_the_api_reaches_every_worker(gw):
    """Deprecate, retire, draft and publish again an API version at run time: each worker recompiles
    its routes (its log says so) and answers accordingly; no reload, no restart."""
    state = "/apis/pets/versions/v1/state"
    r = gw.get("/pets/list")
    assert r.status_code == 200 and "deprecation" not in r.headers
    assert gw.call("GET", state).json() == {"api": "pets", "version": "v1", "state": "published", "sunset": None,
                                            "successor": None, "source": "config", "config_state": "published",
                                            "updated_at": None}
    reloads = gw.log.read_text().count("reloaded")
    seen = _lifecycle_logged(gw)
    r = gw.call("PUT", state, json={"state": "deprecated", "sunset": "Wed, 01 Jan 2031 00:00:00 GMT", "successor": "v2"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "deprecated" and r.json()["source"] == "store" and r.json()["config_state"] == "published"
    wait_for(lambda: _lifecycle_logged(gw) == seen + 2, 10, "both workers to recompile")  # workers: 2
    for _ in range(10):  # every worker serves the new state (the connection goes to either)
        r = gw.get("/pets/list")
        assert r.status_code == 200 and r.headers["deprecation"] == "true", r.headers
        assert r.headers["sunset"] == "Wed, 01 Jan 2031 00:00:00 GMT"
        assert r.headers["link"] == '</pets/v2>; rel="successor-version"'
    v1 = gw.call("GET", "/apis").json()[0]["versions"][0]
    assert (v1["state"], v1["config_state"], v1["state_source"], v1["successor"]) == (
        "deprecated", "published", "store", "v2")
    assert {r["name"]: r["state"] for r in gw.call("GET", "/routes").json()}["pets-list"] == "deprecated"
    # retired: 410 with the successor, nothing forwarded
    seen = _lifecycle_logged(gw)
    # PUT replaces the whole row: no successor given, the config's (none)
    assert gw.call("PUT", state, json={"state": "retired"}).json()["successor"] is None
    wait_for(lambda: _lifecycle_logged(gw) == seen + 2, 10, "both workers to retire v1")
    for _ in range(10):
        r = gw.get("/pets/list")
        assert r.status_code == 410 and r.json() == {"error": "api_retired", "api": "pets", "version": "v1"}
    # a draft is not routed at all
    gw.call("PUT", state, json={"state": "draft"})
    wait_for(lambda: gw.get("/pets/list").status_code == 404, 10, "v1 as a draft")
    assert gw.get("/pets/list").json()["error"] == "no_route"
    assert gw.get("/pets/v2/list").json() == [2]  # the other version untouched
    # refused: what the running config cannot have, and bodies out of shape
    assert gw.call("PUT", state, json={"state": "deprecated", "successor": "v7"}).status_code == 409
    assert gw.call("PUT", state, json={"state": "deprecated", "successor": "v1"}).status_code == 409
    r = gw.call("PUT", state, json={"state": "deprecated", "sunset": "next week"})
    assert r.status_code == 422 and "$.sunset" in r.json()["detail"]
    assert gw.call("PUT", state, json={"state": "gone"}).status_code == 422
    assert gw.call("PUT", "/apis/cats/versions/v1/state", json={"state": "retired"}).status_code == 404
    assert gw.call("PUT", "/apis/pets/versions/v9/state", json={"state": "retired"}).status_code == 404
    assert [(s["api"], s["version"], s["state"], s["applies"]) for s in gw.call("GET", "/api-states").json()] == [
        ("pets", "v1", "draft", True)]
    # dropped: the config's state again
    r = gw.call("DELETE", state)
    assert r.status_code == 200 and r.json()["source"] == "config" and r.json()["state"] == "published"
    wait_for(lambda: gw.get("/pets/list").status_code == 200, 10, "v1 published again")
    for _ in range(10):
        r = gw.get("/pets/list")
        assert r.status_code == 200 and "deprecation" not in r.headers
    assert gw.call("DELETE", state).status_code == 404
    assert gw.call("GET", "/api-states").json() == []
    trail = [(e["action"], (e["after"] or e["before"])["state"]) for e in gw.call(
        "GET", "/audit", params={"entity": "api_state", "limit": 10}).json()]
    assert trail[:4] == [("delete", "draft"), ("update", "draft"), ("update", "retired"), ("create", "deprecated")]
    assert gw.log.read_text().count("reloaded") == reloads  # no reload: the same workers all along


def test_post_config_invalid_is_422_with_every_error_and_valid_one_reloads(gw):
    before = gw.cfg.read_text()
    bad = "workers: 0\nroutes:\n  - {name: x, paths: [nope], upstream: missing}\n  - {name: y, paths: [/y], mock: {status: 9}}\n"
    r = gw.call("POST", "/config", content=bad, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422, r.text
    paths = {e["path"] for e in r.json()["errors"]}
    assert {"$.workers", "$.routes[0].paths[0]", "$.routes[0].upstream", "$.routes[1].mock.status"} <= paths
    assert all(e["message"] for e in r.json()["errors"])
    assert gw.call("POST", "/config", content="routes: [", headers={"Content-Type": "application/yaml"}).status_code == 422
    assert gw.cfg.read_text() == before
    assert gw.get("/hello").text == "one"
    # a valid one (JSON this time): written, reloaded, the new route answers
    doc = {"workers": 2, "store": {"path": str(gw.db)}, "admin": {"token_env": "FG_TEST_ADMIN_TOKEN"},
           "listeners": [{"kind": "proxy", "port": gw.port}, {"kind": "admin", "port": gw.admin_port}],
           "plans": [{"name": "gold"}],
           "routes": [{"name": "hello", "paths": ["/hello"], "mock": {"body": "two"}},
                      {"name": "private", "paths": ["/private"], "mock": {"body": "secret"},
                       "policies": [{"type": "key-auth"}]},
                      {"name": "fresh", "paths": ["/fresh"], "mock": {"body": "new route"}}]}
    r = gw.call("POST", "/config", json=doc)
    assert r.status_code == 202, r.text
    wait_for(lambda: gw.get("/fresh").text == "new route", 20, "the pushed config's route")
    assert gw.get("/hello").text == "two"
    assert "fresh" in gw.cfg.read_text()
    # the control process came back on the new config
    wait_for(lambda: "fresh" in {x["name"] for x in gw.call("GET", "/routes").json()}, 20, "the admin API's new view")
    audit = gw.call("GET", "/audit", params={"entity": "config"}).json()
    assert audit[0]["action"] == "update" and "fresh" in json.dumps(audit[0]["after"])
    # keys made earlier still work after the reload (the store outlives generations)
    gw.call("POST", "/consumers", json={"username": "dave"})
    key = gw.call("POST", "/consumers/dave/credentials").json()["key"]
    wait_for(lambda: status_of(gw, "/private", key) == 200, 10, "a key after the reload")


def test_killed_control_process_is_restarted_while_the_data_plane_serves(gw):
    old = gw.call("GET", "/status").json()["pid"]
    os.kill(old, signal.SIGKILL)
    for _ in range(20):  # the proxy never depends on the control process
        assert gw.get("/hello").status_code == 200
    new = wait_for(lambda: (p := gw.admin.get("/status").json()["pid"]) != old and p, 20, "a new control process")
    assert new != old
    assert gw.call("GET", "/consumers").status_code == 200
    assert f"control process {old} died unexpectedly" in gw.log.read_text()


def test_admin_listener_without_a_token_is_refused(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("listeners: [{kind: proxy, port: 8000}, {kind: admin, address: 0.0.0.0, port: 8001}]\n"
                   "admin: {allow_no_token: true}\n")
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 1 and "$.listeners[1].address" in p.stderr and "allow_no_token" in p.stderr
    cfg.write_text("listeners: [{kind: proxy, port: 8000}, {kind: admin, port: 8001}]\n")
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 1 and "$.admin" in p.stderr and "needs a token" in p.stderr
    cfg.write_text("listeners: [{kind: proxy, port: 8000}, {kind: admin, port: 8001}]\n"
                   "admin: {allow_no_token: true}\n")
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# --- found by the schemathesis run (test_admin_schemathesis.py) ---------------------------------------
def _bodies():
    from fastgate.control.admin import ENDPOINTS

    return [(m, p.replace("{name}", "gold").replace("{id}", "1").replace("{api}", "pets").replace("{version}", "v1"),
             body) for m, p, _h, _s, body, _st in ENDPOINTS if body is not None and "oauth" not in p]


@pytest.mark.parametrize(("method", "path", "body"), _bodies(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_bad_body_is_422_naming_the_field_path(gw, method, path, body):
    field = body.__struct_fields__[0]
    r = gw.call(method, path, json={field: {"not": "this"}})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_body" and f"at `$.{field}`" in r.json()["detail"], r.text
    r = gw.call(method, path, json={"no_such_field": 1})
    assert r.status_code == 422 and "no_such_field" in r.json()["detail"], r.text


def test_an_integral_float_is_an_integer(gw):
    dev = gw.call("POST", "/developers", json={"email": "float@example.com"}).json()
    r = gw.call("POST", "/apps", json={"name": "floaty", "developer_id": float(dev["id"])})
    assert r.status_code == 201 and r.json()["developer_id"] == dev["id"], r.text
    r = gw.call("POST", "/apps", json={"name": "floaty2", "developer_id": dev["id"] + 0.5})
    assert r.status_code == 422 and "$.developer_id" in r.json()["detail"], r.text


def test_ids_too_large_for_sqlite_are_404_or_422_not_500(gw):
    huge = 2**64
    for path in ("/subscriptions", "/developers", "/apps", "/credentials"):
        assert gw.call("GET", f"{path}/{huge}").status_code == 404
        assert gw.call("GET", f"{path}/0").status_code == 404
    r = gw.call("POST", "/subscriptions", json={"app_id": huge, "plan": "gold"})
    assert r.status_code == 422 and "$.app_id" in r.json()["detail"], r.text
    for query in ({"app_id": str(huge)}, {"app_id": "x"}):
        r = gw.call("GET", "/subscriptions", params=query)
        assert r.status_code == 422 and r.json()["error"] == "invalid_query" and "app_id" in r.json()["detail"]
    for query in ({"limit": "0"}, {"limit": "1001"}, {"before": "-1"}, {"before": str(huge)}):
        assert gw.call("GET", "/audit", params=query).status_code == 422, query
    assert gw.call("GET", "/audit", params={"limit": "1000"}).status_code == 200


def test_email_pattern_is_the_same_for_the_document_and_the_server(gw):
    import re

    doc = gw.call("GET", "/openapi.json").json()
    pattern = re.compile(doc["components"]["schemas"]["DeveloperCreate"]["properties"]["email"]["pattern"])
    for email in ("a\x1db@example.com", "a b@example.com", "a\ufeff@example.com"):  # \s differs in Python and JSON Schema
        assert pattern.search(email) is None
        r = gw.call("POST", "/developers", json={"email": email})
        assert r.status_code == 422 and "$.email" in r.json()["detail"], r.text


def test_the_document_describes_answers_and_errors(gw):
    doc = gw.call("GET", "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    consumers = doc["paths"]["/consumers"]
    assert consumers["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "array", "items": {"$ref": "#/components/schemas/Consumer"}}
    assert {"username", "plan", "groups", "source", "read_only"} <= set(schemas["Consumer"]["required"])
    assert "key" in schemas["CredentialWithKey"]["required"]
    # a reference in the body that does not exist: 404, documented
    assert "404" in doc["paths"]["/apps"]["post"]["responses"]
    assert gw.call("POST", "/apps", json={"name": "orphan", "developer_id": 999999}).status_code == 404
    assert doc["paths"]["/subscriptions/{id}"]["get"]["parameters"][0]["schema"] == {
        "type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    assert {p["name"] for p in doc["paths"]["/audit"]["get"]["parameters"]} == {"entity", "limit", "before"}
    assert set(doc["paths"]["/config"]["post"]["responses"]) >= {"202", "401", "409", "415", "422"}


@pytest.mark.parametrize("body", ["", "null\n", "~\n"])
def test_post_config_empty_or_null_document_is_422(gw, body):
    before = gw.cfg.read_text()
    r = gw.call("POST", "/config", content=body, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_config" and r.json()["errors"][0]["path"] == "$"
    assert gw.cfg.read_text() == before
    assert gw.get("/hello").status_code == 200


def test_post_config_with_a_nul_in_a_file_name_is_422_not_500(gw):
    """Found by the run: os.stat raises ValueError (not OSError) for a NUL, and the check let it through."""
    doc = {"routes": [{"name": "v", "paths": ["/v"], "mock": {"body": "x"},
                       "policies": [{"type": "openapi-validation", "spec": "a\u0000b.yaml"}]}]}
    before = gw.cfg.read_text()
    r = gw.call("POST", "/config", json=doc)
    assert r.status_code == 422, r.text
    assert any("NUL" in e["message"] and e["path"].startswith("$.routes[0].policies[0]") for e in r.json()["errors"])
    assert gw.cfg.read_text() == before


def test_a_repeated_query_parameter_is_422(gw):
    """Found by the run: `?app_id=1&app_id=x` used the last value; now it is refused, naming it."""
    for path, name in (("/subscriptions", "app_id"), ("/credentials", "consumer"), ("/audit", "entity"),
                       ("/usage", "to"), ("/analytics/summary", "window")):
        r = gw.call("GET", path, params=[(name, "1"), (name, "2")])
        assert r.status_code == 422 and r.json()["error"] == "invalid_query" and name in r.json()["detail"], (path, r.text)


PRIVILEGED_CONFIG = CONFIG.replace("workers: 2\n", "workers: 2\nuser: nobody\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the supervisor must run as root and the "
                    "workers and control process as `user: nobody` (run the suite as root to cover it)")
def test_post_config_reloads_when_the_control_process_runs_as_nobody():
    """The control process has dropped to `nobody` and cannot signal the root supervisor (EPERM):
    POST /config asks through the reload pipe the supervisor made before forking it."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="fastgate-nobody-"))  # not under pytest's 0700 tmp: nobody writes here
    try:
        tmp.chmod(0o777)
        g = ControlledGateway(tmp, PRIVILEGED_CONFIG)
        try:
            status = g.call("GET", "/status").json()
            assert os.stat(f"/proc/{status['pid']}").st_uid != 0  # the control process is nobody's
            with pytest.raises(PermissionError):  # what os.kill(supervisor, SIGHUP) would meet there
                _kill_as_nobody(status["supervisor"])
            doc = {"workers": 2, "user": "nobody", "store": {"path": str(g.db)},
                   "admin": {"token_env": "FG_TEST_ADMIN_TOKEN"},
                   "listeners": [{"kind": "proxy", "port": g.port},
                                 {"kind": "admin", "address": "127.0.0.1", "port": g.admin_port}],
                   "plans": [{"name": "gold"}],
                   "routes": [{"name": "hello", "paths": ["/hello"], "mock": {"body": "one"}},
                              {"name": "fresh", "paths": ["/fresh"], "mock": {"body": "new route"}}]}
            r = g.call("POST", "/config", json=doc)
            assert r.status_code == 202 and r.json()["reload"] is True, r.text
            wait_for(lambda: g.get("/fresh").text == "new route", 20, "the pushed config's route")
            wait_for(lambda: "fresh" in {x["name"] for x in g.call("GET", "/routes").json()}, 20,
                     "the control process on the new config")
            assert "reloaded: generation 2 serving" in g.log.read_text()
            # SIGHUP still works
            doc["routes"].append({"name": "third", "paths": ["/third"], "mock": {"body": "3"}})
            g.cfg.write_text(json.dumps(doc))
            os.kill(status["supervisor"], signal.SIGHUP)
            wait_for(lambda: g.get("/third").text == "3", 20, "the route after SIGHUP")
        finally:
            assert g.stop() == 0, g.log.read_text()[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_as_nobody(pid: int) -> None:
    """os.kill(pid, 0) from a child that switched to nobody: raises what that child met."""
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.kill(pid, 0)
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 1:
        raise PermissionError(f"nobody may not signal {pid}")
