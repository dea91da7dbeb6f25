"""fastgate as an OAuth 2.0 authorization server, with real processes: `fastgate run` (two workers)
with proxy, admin and portal listeners; client credentials made through the admin API (and the
portal), tokens from `POST /oauth/token` on the portal listener, checked by the gateway's own `jwt`
policy through the gateway's own JWKS URL; signing-key rotation with overlap; revocation reaching
every worker through the store. Plus in-process checks (Starlette's TestClient over the same apps)
of the admin-listener placement and of keys dropped once their tokens have expired."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.harness import free_port, wait_for

TOKEN = "test-admin-token-0123456789"
AUDIENCE = "https://api.example.test"
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}

CONFIG = """
workers: 2
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
  - {{kind: portal, address: 127.0.0.1, port: {portal}}}
oauth:
  enabled: true
  issuer: http://127.0.0.1:{portal}
  audience: {audience}
  token_lifetime: 600
  publish_ahead: 2
  algorithm: RS256
  scopes: [read, write, admin]
plans:
  - {{name: gold}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "one"}}}}
  - name: api
    paths: [/api]
    mock: {{body: "protected"}}
    policies:
      - type: jwt
        jwks_url: http://127.0.0.1:{portal}/.well-known/jwks.json
        jwks_cooldown: 1
        issuer: http://127.0.0.1:{portal}
        audience: {audience}
        check_revoked: true
  - name: writer
    paths: [/write]
    mock: {{body: "written"}}
    policies:
      - {{type: jwt, jwks_url: "http://127.0.0.1:{portal}/.well-known/jwks.json", jwks_cooldown: 0.2,
          issuer: "http://127.0.0.1:{portal}", audience: {audience}, check_revoked: true, required_scopes: [write]}}
"""



class OAuthGateway:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = tmp / "store.db"
        self.port, self.admin_port, self.portal_port = free_port(), free_port(), free_port()
        cfg = tmp / "gw.yaml"
        cfg.write_text(CONFIG.format(db=self.db, port=self.port, admin=self.admin_port, portal=self.portal_port,
                                     audience=AUDIENCE))
        self.log = tmp / "gw.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "-c", str(cfg), "--pid-file", str(tmp / "gw.pid")],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN})
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = f"http://127.0.0.1:{self.portal_port}"
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}",
                                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        self.portal = httpx.Client(base_url=self.issuer, timeout=10)
        try:
            wait_for(lambda: httpx.get(self.url + "/hello", timeout=1).status_code == 200, 20, "the proxy")
            wait_for(lambda: self.admin.get("/status").status_code == 200, 20, "the admin API")
            wait_for(lambda: self.portal.get("/.well-known/jwks.json").status_code == 200, 20, "the JWKS")
        except AssertionError:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text()) from None

    def client(self, scopes=("read", "write")) -> dict:
        app = self.admin.post("/apps", json={"name": f"app-{time.monotonic_ns()}"})
        assert app.status_code == 201, app.text
        r = self.admin.post(f"/apps/{app.json()['id']}/oauth-clients", json={"scopes": list(scopes)})
        assert r.status_code == 201, r.text
        assert r.headers["cache-control"] == "no-store"
        return r.json()

    def token(self, client: dict, **form) -> httpx.Response:
        return self.portal.post("/oauth/token", data={"grant_type": "client_credentials", **form},
                                auth=(client["client_id"], client["client_secret"]))

    def call(self, path: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # a fresh connection each time: the kernel spreads them over both workers
        return httpx.get(self.url + path, headers=headers, timeout=5).status_code

    def stop(self) -> int:
        self.admin.close()
        self.portal.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = OAuthGateway(tmp_path_factory.mktemp("oauth"))
    yield g
    assert g.stop() == 0, g.log.read_text()[-3000:]


def kids(gw) -> list[str]:
    doc = gw.portal.get("/.well-known/jwks.json").json()
    for k in doc["keys"]:
        assert not PRIVATE_JWK_MEMBERS & set(k), f"private key material published: {sorted(k)}"
    return [k["kid"] for k in doc["keys"]]


def test_metadata_document(gw):
    r = gw.portal.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200
    doc = r.json()
    assert doc["issuer"] == gw.issuer
    assert doc["token_endpoint"] == gw.issuer + "/oauth/token"
    assert doc["jwks_uri"] == gw.issuer + "/.well-known/jwks.json"
    assert doc["revocation_endpoint"] == gw.issuer + "/oauth/revoke"
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {"client_secret_basic", "client_secret_post"}
    assert doc["scopes_supported"] == ["admin", "read", "write"]
    # the endpoints are the portal's, not the admin API's (which needs its token for everything)
    assert httpx.get(f"http://127.0.0.1:{gw.admin_port}/.well-known/jwks.json").status_code == 401


def test_jwks_has_public_parts_only(gw):
    doc = gw.portal.get("/.well-known/jwks.json").json()
    assert len(doc["keys"]) >= 1
    for k in doc["keys"]:
        assert k["kty"] == "RSA" and k["alg"] == "RS256" and k["use"] == "sig" and k["kid"]
        assert {"n", "e"} <= set(k) and not PRIVATE_JWK_MEMBERS & set(k)
    with_key = json.dumps(doc)
    dump = "\n".join(__import__("sqlite3").connect(f"file:{gw.db}?mode=ro", uri=True).iterdump())
    assert "PRIVATE KEY" in dump and "PRIVATE KEY" not in with_key  # kept in the store, never published


def test_token_rotation_overlap_and_revocation_end_to_end(gw):
    client = gw.client()
    assert gw.call("/api", None) == 401
    r = gw.token(client)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600 and body["scope"] == "read write"
    old = body["access_token"]
    header, claims = jwt.get_unverified_header(old), jwt.decode(old, options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["kid"] in kids(gw)
    assert claims["iss"] == gw.issuer and claims["aud"] == AUDIENCE and claims["client_id"] == client["client_id"]
    assert claims["sub"] == client["consumer"] and claims["scope"] == "read write"
    assert claims["exp"] - claims["iat"] == 600 and claims["jti"]
    wait_for(lambda: gw.call("/api", old) == 200, 15, "the token to be accepted")
    for _ in range(10):  # every worker fetched the key set and accepts it
        assert gw.call("/api", old) == 200
    assert gw.call("/write", old) == 200  # it carries the `write` scope

    # rotation: the new key is published at once and signs `publish_ahead` (2 s) later — longer than
    # the verifiers' jwks_cooldown (1 s) — so its first token is accepted by every worker at once;
    # the old key stays published, the old token works
    before = kids(gw)
    r = gw.admin.post("/oauth-keys/rotate")
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["state"] == "next" and rotated["kid"] != header["kid"] and rotated["signs_from"] > time.time()
    assert set(kids(gw)) == {rotated["kid"], header["kid"]} and set(before) < set(kids(gw))
    still = gw.token(client).json()["access_token"]
    assert jwt.get_unverified_header(still)["kid"] == header["kid"]  # the old key signs until then
    time.sleep(max(0.0, rotated["signs_from"] - time.time()) + 0.05)
    new = gw.token(client).json()["access_token"]
    assert jwt.get_unverified_header(new)["kid"] == rotated["kid"] != header["kid"]
    for _ in range(10):  # no waiting: every worker knows the key, or may refetch the set at once
        assert gw.call("/api", new) == 200
        assert gw.call("/api", old) == 200
    keys = {k["kid"]: k for k in gw.admin.get("/oauth-keys").json()}
    assert keys[header["kid"]]["state"] == "retired" and keys[rotated["kid"]]["state"] == "active"
    assert keys[header["kid"]]["drop_after"] >= claims["exp"]  # not dropped before its last token expires

    # revocation (RFC 7009, client_secret_post this time): refused on every worker within ~a second
    r = gw.portal.post("/oauth/revoke", data={"token": old, "token_type_hint": "access_token",
                                              "client_id": client["client_id"],
                                              "client_secret": client["client_secret"]})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    wait_for(lambda: gw.call("/api", old) == 401, 10, "the revoked token to be refused")
    for _ in range(10):
        assert gw.call("/api", old) == 401
        assert gw.call("/api", new) == 200  # only that token
    r = httpx.get(gw.url + "/api", headers={"Authorization": f"Bearer {old}"}, timeout=5)
    assert r.json()["error"] == "invalid_token"
    # unknown and malformed tokens: still 200 (RFC 7009 §2.2)
    for junk in ("not-a-jwt", jwt.encode({"jti": "nope", "exp": 1}, "k" * 32, algorithm="HS256")):
        assert gw.portal.post("/oauth/revoke", data={"token": junk},
                              auth=(client["client_id"], client["client_secret"])).status_code == 200


def test_token_endpoint_errors(gw):
    client = gw.client(scopes=["read"])
    cid, secret = client["client_id"], client["client_secret"]

    def check(r: httpx.Response, status: int, error: str):
        assert r.status_code == status, r.text
        assert r.json()["error"] == error, r.text
        assert r.headers["cache-control"] == "no-store"

    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(cid, "wrong-secret")),
          401, "invalid_client")
    r = gw.portal.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(cid, "wrong-secret"))
    assert r.headers["www-authenticate"].startswith("Basic")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": cid,
                                               "client_secret": secret + "x"}), 401, "invalid_client")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=("fgc_nobody", secret)),
          401, "invalid_client")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials"}), 401, "invalid_client")
    check(gw.portal.post("/oauth/token", data={"grant_type": "password"}, auth=(cid, secret)),
          400, "unsupported_grant_type")
    check(gw.portal.post("/oauth/token", data={}, auth=(cid, secret)), 400, "invalid_request")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials", "scope": "read write"},
                         auth=(cid, secret)), 400, "invalid_scope")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials", "scope": "elsewhere"},
                         auth=(cid, secret)), 400, "invalid_scope")
    check(gw.portal.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": cid,
                                               "client_secret": secret}, auth=(cid, secret)), 400, "invalid_request")
    check(gw.portal.post("/oauth/token", json={"grant_type": "client_credentials"}, auth=(cid, secret)),
          400, "invalid_request")
    check(gw.portal.post("/oauth/token", content="grant_type=client_credentials&grant_type=client_credentials",
                         headers={"Content-Type": "application/x-www-form-urlencoded"}, auth=(cid, secret)),
          400, "invalid_request")
    # the right ones: a narrower scope than allowed is fine, and Basic credentials are form-encoded first
    r = gw.token(client, scope="read")
    assert r.status_code == 200 and r.json()["scope"] == "read"
    basic = base64.b64encode(f"{cid}:{secret}".encode()).decode()
    r = gw.portal.post("/oauth/token", data={"grant_type": "client_credentials"},
                       headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text
    tok = r.json()["access_token"]
    wait_for(lambda: gw.call("/api", tok) == 200, 15, "the token")
    assert gw.call("/write", tok) == 403  # no `write` scope: the route's required_scopes refuse it


def test_client_secret_rotation_and_client_revocation(gw):
    client = gw.client()
    tok = gw.token(client).json()["access_token"]
    r = gw.admin.post(f"/oauth-clients/{client['client_id']}/rotate")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    rotated = r.json()
    assert rotated["client_id"] == client["client_id"] and rotated["client_secret"] != client["client_secret"]
    assert gw.token(client).status_code == 401  # the old secret
    assert gw.token(rotated).status_code == 200
    wait_for(lambda: gw.call("/api", tok) == 200, 15, "a token from before the secret's rotation")
    # the secret is never shown again, and stored only as its hash
    listed = gw.admin.get(f"/oauth-clients/{client['client_id']}").json()
    assert "client_secret" not in listed and "secret_hash" not in listed
    for f in gw.tmp.glob("store.db*"):
        assert rotated["client_secret"].encode() not in f.read_bytes()
    # revoking the client revokes the tokens it was given
    r = gw.admin.delete(f"/oauth-clients/{client['client_id']}")
    assert r.status_code == 200 and r.json()["state"] == "revoked" and r.json()["tokens_revoked"] >= 2
    assert gw.token(rotated).status_code == 401
    wait_for(lambda: gw.call("/api", tok) == 401, 10, "the revoked client's token to be refused")
    for _ in range(10):
        assert gw.call("/api", tok) == 401


def test_a_client_cannot_revoke_another_clients_token(gw):
    alice, bob = gw.client(), gw.client()
    tok = gw.token(alice).json()["access_token"]
    r = gw.portal.post("/oauth/revoke", data={"token": tok}, auth=(bob["client_id"], bob["client_secret"]))
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    assert gw.portal.post("/oauth/revoke", data={"token": tok}, auth=(bob["client_id"], "wrong")).status_code == 401
    wait_for(lambda: gw.call("/api", tok) == 200, 15, "alice's token")
    for _ in range(5):
        assert gw.call("/api", tok) == 200


def test_scopes_outside_the_configured_set_are_refused_by_the_admin_api(gw):
    app = gw.admin.post("/apps", json={"name": "scoped"}).json()
    r = gw.admin.post(f"/apps/{app['id']}/oauth-clients", json={"scopes": ["read", "billing"]})
    assert r.status_code == 422 and "billing" in r.json()["detail"]
    r = gw.admin.post(f"/apps/{app['id']}/oauth-clients", json={"scopes": ["bad scope"]})
    assert r.status_code == 422
    assert gw.admin.post("/apps/99999/oauth-clients", json={}).status_code == 404
    doc = gw.admin.get("/openapi.json").json()
    assert {"/apps/{id}/oauth-clients", "/oauth-clients/{client_id}/rotate", "/oauth-keys/rotate"} <= set(doc["paths"])
    assert "/oauth/token" not in doc["paths"]  # served on the portal listener here


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_portal_creates_client_credentials(gw):
    with httpx.Client(base_url=gw.issuer, timeout=10) as c:
        form = {"email": "oauth-dev@example.com", "password": "correct horse battery"}
        assert c.post("/signup", data={**form, "csrf": csrf_of(c.get("/signup").text)}).status_code in (200, 303)
        r = c.post("/signin", data={**form, "csrf": csrf_of(c.get("/signin").text)}, follow_redirects=True)
        assert r.status_code == 200, r.text
        r = c.post("/apps", data={"name": "portal-app", "csrf": csrf_of(r.text)}, follow_redirects=True)
        app_url = str(r.url)
        assert re.search(r"/apps/\d+$", app_url) and 'id="new-client-form"' not in r.text  # not subscribed yet
        app_id = app_url.rsplit("/", 1)[1]
        r = c.post("/subscribe", data={"app_id": app_id, "plan": "gold", "csrf": csrf_of(r.text)}, follow_redirects=True)
        assert 'id="new-client-form"' in r.text and "Create OAuth2 client credentials" in r.text
        r = c.post(f"/apps/{app_id}/oauth-clients", data={"csrf": csrf_of(r.text)}, follow_redirects=True)
        assert r.status_code == 200, r.text
        cid = re.search(r'id="client-id-value">([^<]+)<', r.text).group(1)
        secret = re.search(r'id="client-secret-value">([^<]+)<', r.text).group(1)
        assert secret not in c.get(app_url).text  # shown once
    r = gw.token({"client_id": cid, "client_secret": secret})
    assert r.status_code == 200, r.text
    tok = r.json()["access_token"]
    assert jwt.decode(tok, options={"verify_signature": False})["sub"] == f"app-{app_id}"
    wait_for(lambda: gw.call("/api", tok) == 200, 15, "the portal client's token")


# --- in-process: the same apps the control process serves ------------------------------------------
@pytest.fixture
def store_cfg(tmp_path):
    from fastgate.config.load import load_config
    from fastgate.control.store import Store

    cfg = load_config({"store": {"path": str(tmp_path / "s.db")}, "admin": {"token": TOKEN},
                       "listeners": [{"kind": "proxy", "port": 8000}, {"kind": "admin", "port": 8001}],
                       "oauth": {"enabled": True, "issuer": "http://127.0.0.1:8001", "audience": AUDIENCE,
                                 "algorithm": "ES256", "overlap_margin": 0}})
    store = Store(cfg.store.path)
    yield store, cfg
    store.close()


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_without_a_portal_listener_the_admin_listener_serves_the_endpoints_without_its_token(store_cfg):
    from starlette.testclient import TestClient

    from fastgate.control.admin import create_app
    from fastgate.control.oauth import AuthServer

    store, cfg = store_cfg
    server = AuthServer(store, cfg.oauth)
    server.ensure_key()
    c = TestClient(create_app(store, cfg, TOKEN, oauth=server, serve_oauth=True), base_url="http://127.0.0.1:8001")
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/consumers").status_code == 401  # the admin API still needs its token
    assert c.get("/.well-known/oauth-authorization-server").json()["issuer"] == "http://127.0.0.1:8001"
    (key,) = c.get("/.well-known/jwks.json").json()["keys"]
    assert key["kty"] == "EC" and key["alg"] == "ES256" and "d" not in key
    app = c.post("/apps", json={"name": "a"}, headers=admin).json()
    client = c.post(f"/apps/{app['id']}/oauth-clients", json={}, headers=admin).json()
    r = c.post("/oauth/token", data={"grant_type": "client_credentials"},
               auth=(client["client_id"], client["client_secret"]))
    assert r.status_code == 200, r.text
    claims = jwt.decode(r.json()["access_token"], jwt.PyJWK(key).key, algorithms=["ES256"], audience=AUDIENCE,
                        issuer="http://127.0.0.1:8001")
    assert claims["client_id"] == client["client_id"] and claims["scope"] == ""
    doc = c.get("/openapi.json", headers=admin).json()
    assert doc["paths"]["/oauth/token"]["post"]["security"] == [{"client_basic": []}, {}]
    # with oauth off, its admin endpoints say so
    off = TestClient(create_app(store, cfg, TOKEN), base_url="http://127.0.0.1:8001")
    r = off.post(f"/apps/{app['id']}/oauth-clients", json={}, headers=admin)
    assert r.status_code == 409 and r.json()["error"] == "oauth_disabled"
    assert off.get("/.well-known/jwks.json").status_code == 401  # not served, and behind the token


def test_a_retired_key_is_dropped_once_its_last_token_has_expired(store_cfg):
    from fastgate.control.oauth import AuthServer, generate_key

    store, cfg = store_cfg
    server = AuthServer(store, cfg.oauth)
    server.ensure_key()
    old = store.active_oauth_key()["kid"]
    store.record_oauth_token("short-lived", "fgc_x", old, time.time() + 1.0)  # its last token: 1 s left
    kid, pem, jwk = generate_key("ES256")
    out = store.add_oauth_key("test", kid, "ES256", pem, jwk, margin=0)
    assert out["previous"]["kid"] == old
    assert [k["kid"] for k in store.oauth_keys()] == [kid, old]  # overlap: both published
    wait_for(lambda: [k["kid"] for k in store.oauth_keys()] == [kid], 10, "the retired key to leave the JWKS")
    store.prune_oauth()
    assert store.conn.execute("SELECT count(*) FROM oauth_keys WHERE kid = ?", (old,)).fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM oauth_tokens").fetchone()[0] == 0


def test_the_workers_directory_loads_revoked_unexpired_jtis(store_cfg, tmp_path):
    from fastgate.control.directory import Directory

    store, _cfg = store_cfg
    now = time.time()
    for jti, exp in (("live", now + 600), ("revoked", now + 600), ("expired", now - 1)):
        store.record_oauth_token(jti, "fgc_x", "k", exp)
    d = Directory(store.path)
    assert d.revoked == frozenset()
    assert store.revoke_oauth_token("revoked", "fgc_x") == "revoked"
    assert store.revoke_oauth_token("expired", "fgc_x") == "revoked"
    assert store.revoke_oauth_token("revoked", "fgc_other") == "not_owner"
    assert store.revoke_oauth_token("unknown", "fgc_x") == "unknown"
    assert d.poll(time.monotonic() + 10)
    assert d.revoked == frozenset({"revoked"})  # the expired one is refused by `exp` anyway
    d.close()


def test_cli_wrapper_rotates_the_signing_key(gw):
    env = {**os.environ, "FASTGATE_ADMIN_URL": f"http://127.0.0.1:{gw.admin_port}", "FASTGATE_ADMIN_TOKEN": TOKEN}

    def cli(*args) -> str:
        p = subprocess.run([sys.executable, "-m", "fastgate", "oauth", *args], env=env, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout

    active = next(k["kid"] for k in json.loads(cli("keys", "--json")) if k["state"] == "active")
    out = cli("rotate-key")
    assert "is published; it signs from" in out
    new = out.split()[2]
    states = {k["kid"]: k["state"] for k in json.loads(cli("keys", "--json"))}
    assert new != active and states[new] == "next" and states[active] == "active"
    assert set(kids(gw)[:2]) == {active, new}  # published ahead of signing


def test_a_key_published_ahead_signs_from_its_time_even_across_a_restart(store_cfg):
    from fastgate.control.oauth import AuthServer, generate_key

    store, cfg = store_cfg
    server = AuthServer(store, cfg.oauth)
    server.ensure_key()
    old = server.signer()[0]
    store.record_oauth_token("alive", "fgc_x", old, time.time() + 60)  # keeps the old key published
    kid, pem, jwk = generate_key("ES256")
    out = store.schedule_oauth_key("test", kid, "ES256", pem, jwk, time.time() + 0.5)
    assert out["state"] == "next"
    assert [k["kid"] for k in store.oauth_keys()] == [old, kid]  # published, not signing
    restarted = AuthServer(store, cfg.oauth)  # a control process that restarts meanwhile
    restarted.ensure_key()
    assert restarted.signer()[0] == old and store.active_oauth_key()["kid"] == old
    time.sleep(0.6)
    assert restarted.signer()[0] == kid  # its time came: it signs, the old one retires
    keys = {k["kid"]: k for k in store.oauth_keys()}
    assert keys[kid]["state"] == "active" and keys[old]["state"] == "retired"
    assert [a["action"] for a in store.list_audit(10, "oauth_key")][:2] == ["activate", "schedule"]
