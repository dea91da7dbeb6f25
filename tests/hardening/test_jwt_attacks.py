"""Attacks on token and key authentication, each through a real gateway socket (RFC 8725 and the
usual JWT/API-key mistakes): alg none, HS256 keyed with the RSA public key, missing or string exp,
wrong aud/iss, expiry, nbf, oversized tokens, kid path traversal, unknown-kid floods against a real
JWKS server, jku/x5u/jwk header keys, credentials in the query, duplicated credential headers,
spoofed identity headers, and the RFC 7515 A.1 vector."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgate.config import load_config
from fastgate.errors import ConfigError
from fastgate.policies.auth import hash_key
from tests.harness import Upstream, config, gateway, reply

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict, sig: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(sig)}"


def claims(**extra) -> dict:
    return {"sub": "alice", "exp": int(time.time()) + 300, **extra}


def rs256(body: dict | None = None, key=RSA_KEY, **headers) -> str:
    return jwt.encode(body if body is not None else claims(), key, algorithm="RS256", headers=headers or None)


def doc(up: Upstream, policy: dict, **extra) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": [policy]}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}], **extra)


JWT = {"type": "jwt", "keys": [{"algorithm": "RS256", "key": RSA_PEM, "kid": "main"}], "issuer": "https://idp",
       "audience": "api", "leeway": 30}


async def refused(c: httpx.AsyncClient, tok: str) -> dict:
    r = await c.get("/x", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_token"
    return r.json()


async def test_jwt_claim_and_algorithm_attacks(loop):
    good = {"iss": "https://idp", "aud": "api"}
    async with Upstream() as up, gateway(doc(up, JWT)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        ok = await c.get("/x", headers={"Authorization": f"Bearer {rs256(claims(**good), kid='main')}"})
        assert ok.status_code == 200
        # alg none, with and without the kid
        await refused(c, unsigned({"alg": "none", "typ": "JWT"}, claims(**good)))
        await refused(c, unsigned({"alg": "none", "kid": "main"}, claims(**good)))
        await refused(c, unsigned({"alg": "None", "kid": "main"}, claims(**good)))
        # HS256 "signed" with the RSA public key's PEM as the HMAC secret (the classic confusion)
        import hashlib
        import hmac as hmac_mod
        head = b64(json.dumps({"alg": "HS256", "kid": "main"}).encode())
        body = b64(json.dumps(claims(**good)).encode())
        sig = hmac_mod.new(RSA_PEM.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        await refused(c, f"{head}.{body}.{b64(sig)}")
        # exp missing, exp a string (pyjwt alone would int() it), nbf/iat strings
        await refused(c, rs256({"sub": "a", **good}, kid="main"))
        await refused(c, rs256({"sub": "a", "exp": str(int(time.time()) + 300), **good}, kid="main"))
        await refused(c, rs256(claims(nbf=str(int(time.time()) - 10), **good), kid="main"))
        await refused(c, rs256(claims(exp=True, **good), kid="main"))
        # wrong audience or issuer, or none at all
        await refused(c, rs256(claims(iss="https://idp", aud="other"), kid="main"))
        await refused(c, rs256(claims(iss="https://evil", aud="api"), kid="main"))
        await refused(c, rs256(claims(aud="api"), kid="main"))
        await refused(c, rs256(claims(iss="https://idp"), kid="main"))
        # expired beyond the leeway is refused; within it, accepted
        await refused(c, rs256(claims(exp=int(time.time()) - 120, **good), kid="main"))
        within = await c.get("/x", headers={"Authorization": f"Bearer {rs256(claims(exp=int(time.time()) - 5, **good), kid='main')}"})
        assert within.status_code == 200
        # not yet valid
        await refused(c, rs256(claims(nbf=int(time.time()) + 600, **good), kid="main"))
        await refused(c, rs256(claims(iat=int(time.time()) + 600, **good), kid="main"))
        # signed by another key under our kid
        await refused(c, rs256(claims(**good), key=ATTACKER, kid="main"))
        assert len(up.requests) == 2


async def test_oversized_token_is_refused_before_decoding(loop):
    policy = {**JWT, "max_token_bytes": 1024}
    async with Upstream() as up, gateway(doc(up, policy)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        big = rs256(claims(iss="https://idp", aud="api", pad="x" * 2000), kid="main")  # validly signed
        body = await refused(c, big)
        assert "detail" not in body  # refused on its size alone, not by a decoder
        junk = "a" * 5000  # would not even decode
        body = await refused(c, junk)
        assert "detail" not in body
        assert not up.requests


FILE_SECRET = "contents-of-a-file-on-the-gateway-host"


async def test_kid_path_traversal_finds_no_key(loop, tmp_path, monkeypatch):
    secret_file = tmp_path / "secret"
    secret_file.write_text(FILE_SECRET)
    monkeypatch.setenv("FG_TEST_HS", "real-secret-of-at-least-32-bytes!!")
    policy = {"type": "jwt", "keys": [{"algorithm": "HS256", "secret_env": "FG_TEST_HS", "kid": "hs"}]}
    async with Upstream() as up, gateway(doc(up, policy)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        ok = jwt.encode(claims(), "real-secret-of-at-least-32-bytes!!", algorithm="HS256", headers={"kid": "hs"})
        assert (await c.get("/x", headers={"Authorization": f"Bearer {ok}"})).status_code == 200
        for kid in ("../../../../" + str(secret_file), str(secret_file), "/dev/null", "hs/../hs", "hs\x00"):
            tok = jwt.encode(claims(), FILE_SECRET, algorithm="HS256", headers={"kid": kid})
            await refused(c, tok)
        assert len(up.requests) == 1


async def test_embedded_and_remote_header_keys_are_ignored(loop):
    """jku / x5u / jwk in the token header name the attacker's key; the gateway never uses them."""
    attacker_jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER.public_key()))
    async with Upstream(lambda req: reply(200, orjson.dumps({"keys": [{**attacker_jwk, "kid": "main"}]}))) \
            as evil, Upstream() as up, gateway(doc(up, JWT)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        good = claims(iss="https://idp", aud="api")
        url = f"http://{evil.address}/jwks"
        await refused(c, rs256(good, key=ATTACKER, kid="main", jku=url))
        await refused(c, rs256(good, key=ATTACKER, kid="main", x5u=url))
        await refused(c, rs256(good, key=ATTACKER, kid="main", jwk={**attacker_jwk, "kid": "main"}))
        await refused(c, rs256(good, key=ATTACKER, jwk=attacker_jwk))
        await asyncio.sleep(0.05)
        assert not evil.requests and not up.requests


async def test_unknown_kid_flood_fetches_at_most_once_per_cooldown(loop):
    key_jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwks = {"keys": [{**key_jwk, "kid": "k1", "alg": "RS256"}]}
    async with Upstream(lambda req: reply(200, orjson.dumps(jwks), {"Content-Type": "application/json"})) \
            as idp, Upstream() as up:
        policy = {"type": "jwt", "jwks_url": f"http://{idp.address}/jwks", "jwks_cooldown": 60}
        async with gateway(doc(up, policy)) as gw, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            good = rs256(kid="k1")
            assert (await c.get("/x", headers={"Authorization": f"Bearer {good}"})).status_code == 200
            # made-up kids, concurrently and one after another
            flood = [rs256(key=ATTACKER, kid=str(uuid.uuid4())) for _ in range(20)]
            rs = await asyncio.gather(*(c.get("/x", headers={"Authorization": f"Bearer {t}"}) for t in flood))
            assert all(r.status_code == 401 for r in rs)
            for t in flood[:10]:
                await refused(c, t)
            assert 1 <= len(idp.requests) <= 2  # the first load, then at most one refetch per cooldown
            assert (await c.get("/x", headers={"Authorization": f"Bearer {good}"})).status_code == 200
            assert len(up.requests) == 2


SHARED = b"a-shared-secret-of-at-least-32-bytes"


async def test_jwks_never_supplies_hmac_keys(loop):
    """A symmetric key in a (public) JWKS is ignored, and HS algorithms cannot be allowed for it."""
    jwks = {"keys": [{"kty": "oct", "kid": "k", "k": b64(SHARED), "alg": "HS256"}]}
    async with Upstream(lambda req: reply(200, orjson.dumps(jwks))) as idp, Upstream() as up:
        policy = {"type": "jwt", "jwks_url": f"http://{idp.address}/jwks", "jwks_timeout": 2}
        async with gateway(doc(up, policy)) as gw, httpx.AsyncClient() as c:
            tok = jwt.encode(claims(), SHARED, algorithm="HS256", headers={"kid": "k"})
            r = await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 503  # no usable key in the set
    with pytest.raises(ConfigError):
        load_config(config(policies=[{"type": "jwt", "jwks_url": "http://x/j", "jwks_algorithms": ["HS256"]}]))


def test_hs_key_must_be_a_secret_and_public_keys_cannot_be_hs():
    with pytest.raises(ConfigError):  # an HS key given as a PEM
        load_config(config(policies=[{"type": "jwt", "keys": [{"algorithm": "HS256", "key": RSA_PEM}]}]))
    with pytest.raises(ConfigError):  # an RS key from the environment
        load_config(config(policies=[{"type": "jwt", "keys": [{"algorithm": "RS256", "secret_env": "X"}]}]))
    with pytest.raises(ConfigError) as e:  # `fastgate check` parses the PEM
        load_config(config(policies=[{"type": "jwt", "keys": [{"algorithm": "RS256", "key": "not a pem"}]}]))
    assert "keys[0].key" in str(e.value)


async def test_rfc7515_a1_vector(loop, monkeypatch):
    """RFC 7515 appendix A.1 (HS256): the signature verifies with the RFC's key, and the token is
    still refused, because its exp (2011) has passed; with another key it fails on the signature."""
    k = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
    tok = ("eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6"
           "Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    monkeypatch.setenv("FG_TEST_RFC", "base64:" + k)
    monkeypatch.setenv("FG_TEST_OTHER", "another-secret-of-at-least-32-bytes")
    async with Upstream() as up:
        for env, detail in (("FG_TEST_RFC", "expired"), ("FG_TEST_OTHER", "signature")):
            policy = {"type": "jwt", "keys": [{"algorithm": "HS256", "secret_env": env}], "consumer_claim": "iss"}
            async with gateway(doc(up, policy)) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
                body = await refused(c, tok)
                assert detail in body["detail"].lower()
        assert not up.requests


# RFC 7520 (JOSE Cookbook): its keys (figures 3 and 5) and two of its signatures (4.1 RS256, 4.4 HS256)
RFC7520_RSA_JWK = {
    "kty": "RSA", "kid": "bilbo.baggins@hobbiton.example", "e": "AQAB",
    "n": "n4EPtAOCc9AlkeQHPzHStgAbgs7bTZLwUBZdR8_KuKPEHLd4rHVTeT-O-XV2jRojdNhxJWTDvNd7nqQ0VEiZQHz_AJmSCpMaJMRBSF"
         "KrKb2wqVwGU_NsYOYL-QtiWN2lbzcEe6XC0dApr5ydQLrHqkHHig3RBordaZ6Aj-oBHqFEHYpPe7Tpe-OfVfHd1E6cS6M1FZcD1NNL"
         "YD5lFHpPI9bTwJlsde3uhGqC0ZCuEHg8lhzwOHrtIQbS0FVbb9k3-tVTU4fg_3L_vniUFAKwuCLqKnS2BYwdq_mzSnbLY7h_qixoR7j"
         "ig3__kRhuaxwUkRz5iaiQkqgc5gHdrNP5zw"}
RFC7520_HMAC_K = "hJtXIZ2uSN5kbQfbtTNWbpdmhkV8FJG-Onbc6mxCcYg"
RFC7520_PAYLOAD = ("SXTigJlzIGEgZGFuZ2Vyb3VzIGJ1c2luZXNzLCBGcm9kbywgZ29pbmcgb3V0IHlvdXIgZG9vci4gWW91IHN0ZXAgb250byB0aGUg"
                   "cm9hZCwgYW5kIGlmIHlvdSBkb24ndCBrZWVwIHlvdXIgZmVldCwgdGhlcmXigJlzIG5vIGtub3dpbmcgd2hlcmUgeW91IG1pZ2h0"
                   "IGJlIHN3ZXB0IG9mZiB0by4")
RFC7520_4_1 = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZXhhbXBsZSJ9." + RFC7520_PAYLOAD + "."
               "MRjdkly7_-oTPTS3AXP41iQIGKa80A0ZmTuV5MEaHoxnW2e5CZ5NlKtainoFmKZopdHM1O2U4mwzJdQx996ivp83xuglII7PNDi8"
               "4wnB-BDkoBwA78185hX-Es4JIwmDLJK3lfWRa-XtL0RnltuYv746iYTh_qHRD68BNt1uSNCrUCTJDt5aAE6x8wW1Kt9eRo4QPocSad"
               "nHXFxnt8Is9UzpERV0ePPQdLuW3IS_de3xyIrDaLGdjluPxUAhb6L2aXic1U12podGU0KLUQSE_oI-ZnmKJ3F4uOZDnd6QZWJushZ4"
               "1Axf_fcIe8u9ipH84ogoree7vjbU5y18kDquDg")
RFC7520_4_4 = ("eyJhbGciOiJIUzI1NiIsImtpZCI6IjAxOGMwYWU1LTRkOWItNDcxYi1iZmQ2LWVlZjMxNGJjNzAzNyJ9." + RFC7520_PAYLOAD
               + ".s0h6KThzkfBBBkLspW1h84VsJZFTsPPqMDA7g1Md7p0")


def _rfc7520_rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization

    return jwt.PyJWK(RFC7520_RSA_JWK).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize("section", ["4.1", "4.4"])
async def test_rfc7520_vectors(loop, monkeypatch, section):
    """RFC 7520 4.1 (RS256) and 4.4 (HS256): the gateway verifies the RFC's signatures with the RFC's
    keys — and still refuses the tokens, whose payload is a quote, not a claim set (past the
    signature: the detail says so); with another key of the same kind they fail on the signature."""
    monkeypatch.setenv("FG_TEST_RFC", "base64:" + RFC7520_HMAC_K)
    monkeypatch.setenv("FG_TEST_OTHER", "another-secret-of-at-least-32-bytes")
    if section == "4.1":
        tok = RFC7520_4_1
        keys = [({"algorithm": "RS256", "key": _rfc7520_rsa_pem(), "kid": "bilbo.baggins@hobbiton.example"},
                 "payload"),
                ({"algorithm": "RS256", "key": RSA_PEM, "kid": "bilbo.baggins@hobbiton.example"}, "signature")]
    else:
        tok = RFC7520_4_4
        keys = [({"algorithm": "HS256", "secret_env": "FG_TEST_RFC", "kid": "018c0ae5-4d9b-471b-bfd6-eef314bc7037"},
                 "payload"),
                ({"algorithm": "HS256", "secret_env": "FG_TEST_OTHER", "kid": "018c0ae5-4d9b-471b-bfd6-eef314bc7037"},
                 "signature")]
    async with Upstream() as up:
        for key, detail in keys:
            async with gateway(doc(up, {"type": "jwt", "keys": [key]})) as gw, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
                body = await refused(c, tok)
                assert detail in body["detail"].lower(), body
        assert not up.requests


# --- credentials in the wrong place, twice, or spoofed ---------------------------------------------------
CONSUMERS = [{"username": "alice", "keys": [hash_key("alice-key")]},
             {"username": "bob", "keys": [hash_key("bob-key")]}]


async def test_key_in_query_when_only_header_allowed(loop):
    async with Upstream() as up, gateway(doc(up, {"type": "key-auth"}, consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        r = await c.get("/x?apikey=alice-key")
        assert r.status_code == 401 and r.json()["error"] == "invalid_credentials"
        r = await c.get("/x?apikey=alice-key", headers={"apikey": "alice-key"})  # not even beside a good one
        assert r.status_code == 401
        assert not up.requests


async def test_duplicated_credential_headers(loop):
    async with Upstream() as up, gateway(doc(up, {"type": "key-auth"}, consumers=CONSUMERS)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        for pair in (("alice-key", "alice-key"), ("alice-key", "bob-key"), ("wrong", "alice-key")):
            r = await c.get("/x", headers=[("apikey", pair[0]), ("ApiKey", pair[1])])
            assert r.status_code == 401
        assert not up.requests
    async with Upstream() as up, gateway(doc(up, JWT)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        t = rs256(claims(iss="https://idp", aud="api"), kid="main")
        r = await c.get("/x", headers=[("Authorization", f"Bearer {t}"), ("Authorization", f"Bearer {t}")])
        assert r.status_code == 401
        assert not up.requests


async def test_spoofed_identity_headers_are_dropped(loop):
    spoof = [("X-Consumer-Username", "admin"), ("X-Consumer-ID", "0"), ("X-Consumer-Groups", "admins"),
             ("X-Credential-Identifier", "root"), ("X-Authenticated-Scope", "admin"), ("X-Tenant", "evil")]
    policy = {**JWT, "claims_to_headers": {"tenant": "X-Tenant"}}
    async with Upstream() as up, gateway(doc(up, policy)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        t = rs256(claims(iss="https://idp", aud="api", sub="bob", tenant="acme", scope="read"), kid="main")
        r = await c.get("/x", headers=[("Authorization", f"Bearer {t}"), *spoof])
        assert r.status_code == 200
        got = up.requests[-1]
        assert got.all("x-consumer-username") == ["bob"] and got.all("x-consumer-id") == ["bob"]
        assert got.all("x-consumer-groups") == [] and got.all("x-tenant") == ["acme"]
        assert got.all("x-credential-identifier") == ["main"] and got.all("x-authenticated-scope") == ["read"]
        # a refused request is never forwarded, spoofed headers or not
        r = await c.get("/x", headers=spoof)
        assert r.status_code == 401 and len(up.requests) == 1


async def test_header_injection_through_claims_is_refused(loop):
    async with Upstream() as up, gateway(doc(up, JWT)) as gw, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        await refused(c, rs256(claims(iss="https://idp", aud="api", sub="bob\r\nX-Admin: 1"), kid="main"))
        assert not up.requests
