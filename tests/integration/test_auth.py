"""Authentication and authorization policies through real sockets: key-auth, basic-auth, hmac-auth,
jwt (static keys and a JWKS served by a real HTTP server), introspection against a real
authorization server, acl and require-scopes. Clients are httpx; no mocks."""
from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import time
from urllib.parse import parse_qs

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastgate.policies.auth import hash_key, hash_password
from tests.harness import Upstream, config, dead_port, gateway, reply

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk_of(private, kid: str, alg: str) -> dict:
    doc = orjson.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
    return {**doc, "kid": kid, "alg": alg, "use": "sig"}


def token(private=RSA_KEY, alg="RS256", kid=None, exp_in=300, **claims) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + exp_in, **claims}
    return jwt.encode(body, private, algorithm=alg, headers={"kid": kid} if kid else None)


def routed(up: Upstream, policies: list, **extra) -> dict:
    if "consumers" in extra:
        extra.setdefault("plans", [{"name": "gold"}])
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": policies}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}], **extra)


def json_server(handler):
    """An Upstream answering JSON documents: handler(req) -> (status, doc)."""
    def serve(req):
        status, doc = handler(req)
        return reply(status, orjson.dumps(doc), {"Content-Type": "application/json"})
    return Upstream(serve)


CONSUMERS = [
    {"username": "alice", "groups": ["admins"], "plan": "gold", "keys": [hash_key("alice-key-1")],
     "basic": [{"username": "alice", "password_hash": hash_password("s3cret", iterations=1000)}],
     "hmac": [{"key_id": "alice-hmac", "secret_env": "FG_TEST_HMAC_ALICE"}]},
    {"username": "bob", "groups": ["users"], "keys": [hash_key("bob-key")]},
]


# --- key-auth ---------------------------------------------------------------------------------------
async def test_key_auth_header(loop):
    async with Upstream() as up, gateway(routed(up, [{"type": "key-auth"}], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        ok = await c.get("/x", headers={"apikey": "alice-key-1"})
        assert ok.status_code == 200
        got = up.requests[-1]
        assert got.header("x-consumer-username") == "alice" and got.header("x-consumer-plan") == "gold"
        assert got.header("x-consumer-groups") == "admins"
        assert got.header("x-credential-identifier") == "sha256:" + hash_key("alice-key-1")[7:23]
        assert got.header("apikey") is None  # hide_credentials
        missing = await c.get("/x")
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"] == 'Key realm="fastgate"'
        wrong = await c.get("/x", headers={"apikey": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_credentials"
        assert len(up.requests) == 1


async def test_key_auth_query_and_anonymous(loop):
    policy = {"type": "key-auth", "query": "api_key", "anonymous": "guest"}
    async with Upstream() as up, gateway(routed(up, [policy], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        ok = await c.get("/x?a=1&api_key=bob-key&b=2")
        assert ok.status_code == 200
        got = up.requests[-1]
        assert got.header("x-consumer-username") == "bob"
        assert got.url == b"/x?a=1&b=2"  # the key is not forwarded
        only = await c.get("/y?api_key=bob-key")
        assert only.status_code == 200 and up.requests[-1].url == b"/y"
        anon = await c.get("/x")
        assert anon.status_code == 200 and up.requests[-1].header("x-consumer-username") == "guest"
        assert up.requests[-1].header("x-credential-identifier") is None
        assert (await c.get("/x?api_key=wrong")).status_code == 401  # a wrong key is not anonymous


# --- basic-auth -------------------------------------------------------------------------------------
async def test_basic_auth(loop):
    async with Upstream() as up, gateway(routed(up, [{"type": "basic-auth"}], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        for _ in range(3):  # the first verifies (KDF), the others hit the cache
            ok = await c.get("/x", auth=("alice", "s3cret"))
            assert ok.status_code == 200
            assert up.requests[-1].header("x-consumer-username") == "alice"
            assert up.requests[-1].header("authorization") is None
        bad = await c.get("/x", auth=("alice", "wrong"))
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_credentials"
        assert bad.headers["www-authenticate"] == 'Basic realm="fastgate"'
        assert (await c.get("/x", auth=("mallory", "s3cret"))).status_code == 401
        assert (await c.get("/x", headers={"Authorization": "Basic !!!"})).status_code == 401
        none = await c.get("/x")
        assert none.status_code == 401 and none.json()["error"] == "unauthorized"
        assert len(up.requests) == 3


# --- hmac-auth --------------------------------------------------------------------------------------
def hmac_headers(method: str, target: str, secret: bytes, signed=("date", "request-line"), key_id="alice-hmac",
                 date: float | None = None, body: bytes | None = None) -> dict:
    h = {"Date": email.utils.formatdate(date if date is not None else time.time(), usegmt=True)}
    if body is not None:
        h["Digest"] = "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()
    lines = []
    for name in signed:
        lines.append(f"{method} {target} HTTP/1.1" if name == "request-line" else f"{name}: {h[name.title()]}")
    sig = base64.b64encode(hmac.new(secret, "\n".join(lines).encode(), hashlib.sha256).digest()).decode()
    h["Authorization"] = (f'hmac username="{key_id}", algorithm="hmac-sha256", headers="{" ".join(signed)}", '
                          f'signature="{sig}"')
    return h


async def test_hmac_auth(loop, monkeypatch):
    monkeypatch.setenv("FG_TEST_HMAC_ALICE", "hmac-secret")
    secret = b"hmac-secret"
    policy = {"type": "hmac-auth", "validate_body": True}
    async with Upstream() as up, gateway(routed(up, [policy], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        body = b'{"n": 1}'
        signed = ("date", "request-line", "digest")
        ok = await c.post("/x?q=1", content=body, headers=hmac_headers("POST", "/x?q=1", secret, signed, body=body))
        assert ok.status_code == 200
        assert up.requests[-1].header("x-consumer-username") == "alice" and up.requests[-1].body == body
        assert up.requests[-1].header("x-credential-identifier") == "alice-hmac"
        # the body changed after signing: the Digest no longer matches
        h = hmac_headers("POST", "/x", secret, signed, body=body)
        assert (await c.post("/x", content=b'{"n": 2}', headers=h)).status_code == 401
        # Digest not signed while validate_body is on
        h = hmac_headers("POST", "/x", secret, ("date", "request-line"), body=body)
        assert (await c.post("/x", content=body, headers=h)).status_code == 401
        # signed for another path
        h = hmac_headers("POST", "/other", secret, signed, body=body)
        assert (await c.post("/x", content=body, headers=h)).status_code == 401
        # a replay from ten minutes ago
        h = hmac_headers("POST", "/x", secret, signed, date=time.time() - 600, body=body)
        r = await c.post("/x", content=body, headers=h)
        assert r.status_code == 401 and "skew" in r.json()["detail"]
        # wrong secret, unknown key id
        h = hmac_headers("POST", "/x", b"guess", signed, body=body)
        assert (await c.post("/x", content=body, headers=h)).status_code == 401
        h = hmac_headers("POST", "/x", secret, signed, key_id="nobody", body=body)
        assert (await c.post("/x", content=body, headers=h)).status_code == 401
        assert len(up.requests) == 1


async def test_hmac_auth_date_must_be_signed(loop, monkeypatch):
    monkeypatch.setenv("FG_TEST_HMAC_ALICE", "hmac-secret")
    async with Upstream() as up, gateway(routed(up, [{"type": "hmac-auth"}], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        assert (await c.get("/x", headers=hmac_headers("GET", "/x", b"hmac-secret"))).status_code == 200
        r = await c.get("/x", headers=hmac_headers("GET", "/x", b"hmac-secret", signed=("request-line",)))
        assert r.status_code == 401
        assert len(up.requests) == 1


# --- acl --------------------------------------------------------------------------------------------
async def test_acl(loop):
    doc = config(routes=[
        {"name": "admin", "paths": ["/admin/*"], "upstream": "u",
         "policies": [{"type": "acl", "allow": ["admins"]}, {"type": "key-auth"}]},  # phase order, not listing
        {"name": "open", "paths": ["/open/*"], "upstream": "u",
         "policies": [{"type": "key-auth"}, {"type": "acl", "deny": ["users"]}]},
        {"name": "noauth", "paths": ["/noauth/*"], "upstream": "u", "policies": [{"type": "acl", "allow": ["x"]}]},
    ], upstreams=[], consumers=CONSUMERS, plans=[{"name": "gold"}])
    async with Upstream() as up:
        doc["upstreams"] = [{"name": "u", "targets": [{"address": up.address}]}]
        async with gateway(doc) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            assert (await c.get("/admin/a", headers={"apikey": "alice-key-1"})).status_code == 200
            r = await c.get("/admin/a", headers={"apikey": "bob-key"})
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            assert (await c.get("/admin/a")).status_code == 401
            assert (await c.get("/open/a", headers={"apikey": "alice-key-1"})).status_code == 200
            assert (await c.get("/open/a", headers={"apikey": "bob-key"})).status_code == 403
            assert (await c.get("/noauth/a")).status_code == 401
            assert len(up.requests) == 2


# --- jwt --------------------------------------------------------------------------------------------
async def test_jwt_static_key_consumer_and_headers(loop):
    policy = {"type": "jwt", "keys": [{"algorithm": "RS256", "key": RSA_PEM}], "issuer": "https://idp",
              "audience": "api", "claims_to_headers": {"tenant": "X-Tenant", "roles": "X-Roles"}}
    async with Upstream() as up, gateway(routed(up, [policy], consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        t = token(iss="https://idp", aud="api", tenant="acme", roles=["a", "b"], scope="read write")
        for _ in range(2):  # verified, then from the cache
            r = await c.get("/x", headers={"Authorization": f"Bearer {t}", "X-Tenant": "spoofed"})
            assert r.status_code == 200
            got = up.requests[-1]
            assert got.header("x-consumer-username") == "alice" and got.header("x-consumer-groups") == "admins"
            assert got.all("x-tenant") == ["acme"] and got.header("x-roles") == "a,b"
            assert got.header("x-authenticated-scope") == "read write"
        stranger = token(sub="carol", iss="https://idp", aud="api")
        r = await c.get("/x", headers={"Authorization": f"Bearer {stranger}"})
        assert r.status_code == 200 and up.requests[-1].header("x-consumer-username") == "carol"
        assert up.requests[-1].header("x-consumer-groups") is None
        r = await c.get("/x")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = await c.get("/x", headers={"Authorization": "Bearer abc.def.ghi"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_jwt_jwks_fetch_rotation_and_outage(loop):
    state = {"keys": [jwk_of(EC_KEY, "ec-1", "ES256")], "up": True}

    def handler(req):
        if not state["up"]:
            return 500, {"error": "down"}
        return 200, {"keys": state["keys"]}

    async with json_server(handler) as idp, Upstream() as up:
        policy = {"type": "jwt", "jwks_url": f"http://{idp.address}/jwks", "jwks_cooldown": 0.01,
                  "jwks_refresh": 0.05}
        async with gateway(routed(up, [policy])) as gw, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            # the first request waits for the key set
            r = await c.get("/x", headers={"Authorization": f"Bearer {token(EC_KEY, 'ES256', 'ec-1')}"})
            assert r.status_code == 200
            # rotation: a token with a new kid makes the gateway refetch
            new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            state["keys"] = [jwk_of(new_key, "rsa-2", "RS256")]
            await asyncio.sleep(0.02)  # past the cooldown
            r = await c.get("/x", headers={"Authorization": f"Bearer {token(new_key, 'RS256', 'rsa-2')}"})
            assert r.status_code == 200
            # the key server goes down: the keys it gave are kept
            state["up"] = False
            fetched = len(idp.requests)
            while len(idp.requests) < fetched + 2:  # refreshes keep failing
                await asyncio.sleep(0.02)
            r = await c.get("/x", headers={"Authorization": f"Bearer {token(new_key, 'RS256', 'rsa-2', sub='x')}"})
            assert r.status_code == 200
            # the removed key no longer verifies, even for a token cached before
            r = await c.get("/x", headers={"Authorization": f"Bearer {token(EC_KEY, 'ES256', 'ec-1')}"})
            assert r.status_code == 401


async def test_jwt_jwks_unreachable_is_503(loop):
    port = dead_port()  # refuses connections
    policy = {"type": "jwt", "jwks_url": f"http://127.0.0.1:{port}/jwks", "jwks_timeout": 1}
    async with Upstream() as up, gateway(routed(up, [policy])) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        r = await c.get("/x", headers={"Authorization": f"Bearer {token(EC_KEY, 'ES256', 'ec-1')}"})
        assert r.status_code == 503 and r.json()["error"] == "jwks_unavailable"
        assert not up.requests


# --- require-scopes ---------------------------------------------------------------------------------
async def test_require_scopes_and_claims(loop):
    policies = [{"type": "jwt", "keys": [{"algorithm": "RS256", "key": RSA_PEM}]},
                {"type": "require-scopes", "scopes": ["orders:write"], "claims": {"tenant": "acme"}}]
    async with Upstream() as up, gateway(routed(up, policies)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        def auth(**claims):
            return {"Authorization": f"Bearer {token(**claims)}"}

        assert (await c.get("/x", headers=auth(scope="orders:read orders:write", tenant="acme"))).status_code == 200
        assert (await c.get("/x", headers=auth(scp=["orders:write"], tenant=["acme", "x"]))).status_code == 200
        r = await c.get("/x", headers=auth(scope="orders:read", tenant="acme"))
        assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert (await c.get("/x", headers=auth(scope="orders:write", tenant="globex"))).status_code == 403
        assert len(up.requests) == 2


# --- introspection ----------------------------------------------------------------------------------
async def test_introspection(loop, monkeypatch):
    monkeypatch.setenv("FG_TEST_INTROSPECT", "client-secret")
    seen = []

    def handler(req):
        form = parse_qs(req.body.decode())
        seen.append(form["token"][0])
        assert req.header("authorization") == "Basic " + base64.b64encode(b"gw:client-secret").decode()
        if form["token"][0] == "good":
            return 200, {"active": True, "sub": "alice", "scope": "read", "exp": int(time.time()) + 3600}
        return 200, {"active": False}

    async with json_server(handler) as asrv, Upstream() as up:
        policy = {"type": "introspection", "endpoint": f"http://{asrv.address}/introspect", "client_id": "gw",
                  "client_secret_env": "FG_TEST_INTROSPECT"}
        async with gateway(routed(up, [policy], consumers=CONSUMERS)) as gw, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            rs = await asyncio.gather(*(c.get("/x", headers={"Authorization": "Bearer good"}) for _ in range(5)))
            assert all(r.status_code == 200 for r in rs)
            assert up.requests[-1].header("x-consumer-username") == "alice"
            assert up.requests[-1].header("x-authenticated-scope") == "read"
            for _ in range(2):
                r = await c.get("/x", headers={"Authorization": "Bearer revoked"})
                assert r.status_code == 401 and r.json()["error"] == "invalid_token"
            assert seen == ["good", "revoked"]  # one call each: shared, then cached (active and inactive)
            assert (await c.get("/x")).status_code == 401
        await asyncio.sleep(0)

    # the authorization server is gone: 503, not 401
    async with Upstream() as up:
        policy = {"type": "introspection", "endpoint": f"http://{asrv.address}/introspect", "client_id": "gw",
                  "client_secret_env": "FG_TEST_INTROSPECT", "timeout": 1}
        async with gateway(routed(up, [policy])) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"Authorization": "Bearer good"})
            assert r.status_code == 503 and r.json()["error"] == "introspection_unavailable"


async def test_introspection_scopes(loop, monkeypatch):
    monkeypatch.setenv("FG_TEST_INTROSPECT", "s")

    async with json_server(lambda req: (200, {"active": True, "sub": "bob", "scope": "read"})) as asrv, \
            Upstream() as up:
        policy = {"type": "introspection", "endpoint": f"http://{asrv.address}/i", "client_id": "gw",
                  "client_secret_env": "FG_TEST_INTROSPECT", "required_scopes": ["write"]}
        async with gateway(routed(up, [policy])) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"Authorization": "Bearer t"})
            assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
