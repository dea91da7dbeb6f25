"""fastgate as an OAuth 2.0 authorization server for apps: the client credentials grant (RFC 6749
§4.4), served by the control process (control/process.py) beside the developer portal.

- `POST /oauth/token`: a client authenticates (HTTP Basic `client_id:client_secret`, or the form
  fields `client_id`/`client_secret`; never both) and gets a JWT access token (RFC 9068 shape:
  `iss`, `sub` = the app's consumer, `aud`, `exp`, `iat`, `jti`, `scope`, `client_id`; `kid` and
  `typ: at+jwt` in the header), signed with the gateway's own key (RS256 or ES256, `oauth.algorithm`).
  Errors are RFC 6749 §5.2 JSON with `Cache-Control: no-store`.
- `POST /oauth/revoke` (RFC 7009): the client revokes one of its tokens; 200 for a token that is not
  one (or no longer known). Revoked `jti`s reach every worker through the store (control/directory.py)
  and the jwt policy's `check_revoked` refuses them.
- `GET /.well-known/jwks.json`: the public keys — the signing key, the next one (published ahead of
  signing) and retired keys whose tokens may still be alive; `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata.

Keys are made here with `cryptography` and kept in the store (private part as PKCS#8 PEM, in the
SQLite file: protect it like a key file). Rotation (`rotate`, the admin API's `POST /oauth-keys/rotate`)
makes a new key and publishes it at once; it starts signing `oauth.publish_ahead` seconds later
(verifiers that cached the key set — the jwt policy refetches on an unknown kid at most once per
`jwks_cooldown` — have it by then). The old one stays in the JWKS until the last token it signed has
expired, plus `oauth.overlap_margin`, then is dropped. Nothing here signs or verifies by hand: pyjwt
does the JWS work, `cryptography` makes the keys.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from urllib.parse import parse_qsl, unquote_plus

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .store import Store, StoreUnavailable, hash_key

log = logging.getLogger("fastgate.oauth")

TOKEN_PATH = "/oauth/token"
REVOKE_PATH = "/oauth/revoke"
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
PATHS = frozenset((TOKEN_PATH, REVOKE_PATH, JWKS_PATH, METADATA_PATH))
AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
FORM_LIMIT = 16 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
_DUMMY_HASH = hash_key(secrets.token_urlsafe(32))  # compared for unknown clients: the same work done


# --- keys ------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the key's `kid`."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def generate_key(alg: str) -> tuple[str, str, dict]:
    """A new signing key for `alg` (RS256: RSA 2048; ES256: P-256): (kid, private PEM, public JWK)."""
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(f"unsupported signing algorithm {alg}")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    kid = thumbprint(jwk)
    public = {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}
    return kid, pem, {**public, "kid": kid, "alg": alg, "use": "sig"}


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(self, status: int, error: str, description: str | None = None, basic_challenge: bool = False):
        super().__init__(description or error)
        self.status = status
        self.error = error
        self.description = description
        self.basic_challenge = basic_challenge

    def response(self) -> JSONResponse:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        headers = dict(NO_STORE)
        if self.basic_challenge:
            headers["WWW-Authenticate"] = 'Basic realm="fastgate", charset="UTF-8"'
        return JSONResponse(body, self.status, headers=headers)


# --- the server ------------------------------------------------------------------------------------
class AuthServer:
    """Issues, revokes and publishes, over the store. One per control process; the store is only
    used from its event loop."""

    def __init__(self, store: Store, cfg):
        self.store = store
        self.cfg = cfg  # the config's `oauth` section
        self.issuer = cfg.issuer
        self.audience = cfg.audience
        self.supported_scopes = frozenset(cfg.scopes)
        # (kid, alg, private key object): reloaded when the store's active key is another one (a
        # rotation here, or through another control node sharing the store in Redis)
        self._signer: tuple[str, str, object] | None = None

    # --- keys -------------------------------------------------------------------------------------
    def ensure_key(self) -> None:
        """At start: a signing key of the configured algorithm (made, or rotated to, when missing)."""
        self.store.prune_oauth()
        row = self.store.active_oauth_key()
        if row is None or row["alg"] != self.cfg.algorithm:
            kid, pem, jwk = generate_key(self.cfg.algorithm)
            self.store.add_oauth_key("oauth", kid, self.cfg.algorithm, pem, jwk, self.cfg.overlap_margin)
            log.info("oauth: new %s signing key %s%s", self.cfg.algorithm, kid,
                     f" (replaces {row['kid']}, a {row['alg']} key)" if row else "")
        self._signer = None
        self._promote()  # a key scheduled before a restart whose time has come (or comes later)

    async def rotate(self, actor: str) -> dict:
        """A new signing key: published at once, signing `publish_ahead` seconds later (so verifiers
        that cached the key set learn it before its first token); the previous one keeps signing
        until then, and stays published until its tokens expire. `publish_ahead: 0`: at once."""
        kid, pem, jwk = await asyncio.to_thread(generate_key, self.cfg.algorithm)  # RSA takes a moment
        self.store.prune_oauth()
        if self.cfg.publish_ahead <= 0:
            out = self.store.add_oauth_key(actor, kid, self.cfg.algorithm, pem, jwk, self.cfg.overlap_margin)
            self._signer = None
            log.info("oauth: signing key rotated to %s%s", kid,
                     f"; {out['previous']['kid']} published until {out['previous']['drop_after']:.0f}"
                     if out["previous"] else "")
            return out
        out = self.store.schedule_oauth_key(actor, kid, self.cfg.algorithm, pem, jwk,
                                            time.time() + self.cfg.publish_ahead)
        log.info("oauth: signing key %s published; it signs from %.0f (in %g s)", kid, out["signs_from"],
                 self.cfg.publish_ahead)
        return out

    def _promote(self) -> None:
        nxt = self.store.next_oauth_key()
        if nxt is None or time.time() < nxt["signs_from"]:
            return
        row = self.store.promote_oauth_key(self.cfg.overlap_margin)
        if row is not None:
            log.info("oauth: signing key %s now signs", row["kid"])

    def signer(self) -> tuple[str, str, object]:
        """The signing key: whichever the store says is active now (two indexed reads of the local
        file per token), promoting a scheduled one whose time has come, on whichever node sees it first."""
        self._promote()
        row = self.store.active_oauth_key()
        if row is None:  # a store emptied under us: make one
            self.ensure_key()
            row = self.store.active_oauth_key()
        if self._signer is None or self._signer[0] != row["kid"]:
            private = serialization.load_pem_private_key(row["private_pem"].encode(), password=None)
            self._signer = (row["kid"], row["alg"], private)
        return self._signer

    def jwks(self) -> dict:
        return {"keys": [k["public_jwk"] for k in self.store.oauth_keys()]}

    def metadata(self) -> dict:
        doc = {
            "issuer": self.issuer,
            "token_endpoint": self.issuer + TOKEN_PATH,
            "jwks_uri": self.issuer + JWKS_PATH,
            "revocation_endpoint": self.issuer + REVOKE_PATH,
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": [],  # no authorization endpoint: client credentials only
            "token_endpoint_auth_methods_supported": AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        }
        if self.cfg.scopes:
            doc["scopes_supported"] = sorted(self.supported_scopes)
        return doc

    def check_scopes(self, scopes) -> None:
        """A client's allowed scopes must be among `oauth.scopes`, when the config lists them."""
        if self.supported_scopes:
            extra = sorted(set(scopes) - self.supported_scopes)
            if extra:
                raise ValueError(f"not in oauth.scopes: {' '.join(extra)}")

    # --- tokens -----------------------------------------------------------------------------------
    def issue(self, client: dict, scopes: list[str]) -> dict:
        kid, alg, private = self.signer()
        now = int(time.time())
        exp = now + int(self.cfg.token_lifetime)
        jti = secrets.token_urlsafe(18)
        claims = {"iss": self.issuer, "sub": client["consumer"], "aud": self.audience, "exp": exp, "iat": now,
                  "jti": jti, "client_id": client["client_id"], "scope": " ".join(scopes)}
        token = jwt.encode(claims, private, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})
        self.store.record_oauth_token(jti, client["client_id"], kid, exp)
        return {"access_token": token, "token_type": "Bearer", "expires_in": exp - now, "scope": " ".join(scopes)}

    # --- the HTTP side ----------------------------------------------------------------------------
    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise OAuthError(400, "invalid_request", "send the parameters as application/x-www-form-urlencoded")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > FORM_LIMIT:
                raise OAuthError(400, "invalid_request", "request body too large")
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError):
            raise OAuthError(400, "invalid_request", "malformed form body") from None
        form: dict[str, str] = {}
        for k, v in pairs:
            if k in form:  # RFC 6749 §3.2: no parameter more than once
                raise OAuthError(400, "invalid_request", f"parameter `{k}` given more than once")
            form[k] = v
        return form

    def authenticate(self, request: Request, form: dict[str, str]) -> dict:
        """The client, by HTTP Basic or by the form's client_id/client_secret (RFC 6749 §2.3.1)."""
        header = request.headers.get("authorization")
        in_form = "client_id" in form or "client_secret" in form
        if header is not None:
            if in_form:
                raise OAuthError(400, "invalid_request", "use one client authentication method, not two")
            scheme, _, cred = header.strip().partition(" ")
            if scheme.lower() != "basic":
                raise OAuthError(401, "invalid_client", "use HTTP Basic authentication", basic_challenge=True)
            try:
                client_id, sep, secret = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic_challenge=True) from None
            if not sep:
                raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic_challenge=True)
            client_id, secret = unquote_plus(client_id), unquote_plus(secret)  # form-encoded first (§2.3.1)
            basic = True
        elif in_form:
            client_id, secret, basic = form.get("client_id", ""), form.get("client_secret"), False
            if secret is None:
                raise OAuthError(401, "invalid_client", "client_secret is missing (public clients are not supported)")
        else:
            raise OAuthError(401, "invalid_client", "client authentication is required", basic_challenge=True)
        found = self.store.oauth_client_secret_hash(client_id) if client_id else None
        ok = hmac.compare_digest(hash_key(secret), found[1] if found else _DUMMY_HASH)
        if not ok or found is None or found[0]["state"] != "active":
            raise OAuthError(401, "invalid_client", "unknown client or wrong secret", basic_challenge=basic)
        return found[0]

    async def token_endpoint(self, request: Request) -> Response:
        try:
            form = await self.form(request)
            client = self.authenticate(request, form)
            grant = form.get("grant_type")
            if not grant:
                raise OAuthError(400, "invalid_request", "grant_type is missing")
            if grant != "client_credentials":
                raise OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
            allowed = client["scopes"]
            requested = form.get("scope", "").split(" ") if form.get("scope", "").strip() else None
            if requested is None:
                scopes = sorted(allowed)
            else:
                if any(not SCOPE_TOKEN.match(s) for s in requested):
                    raise OAuthError(400, "invalid_scope", "scopes are separated by single spaces")
                extra = sorted(set(requested) - set(allowed))
                if extra:
                    raise OAuthError(400, "invalid_scope", "not allowed for this client: " + " ".join(extra))
                scopes = sorted(set(requested))
        except OAuthError as exc:
            return exc.response()
        return JSONResponse(self.issue(client, scopes), headers=NO_STORE)

    async def revoke_endpoint(self, request: Request) -> Response:
        try:
            form = await self.form(request)
            client = self.authenticate(request, form)
            token = form.get("token")
            if not token:
                raise OAuthError(400, "invalid_request", "token is missing")
            # token_type_hint may be ignored (RFC 7009 §2.1): there are only access tokens here
            try:
                jti = jwt.decode(token, options={"verify_signature": False}).get("jti")
            except jwt.PyJWTError:
                jti = None  # not a token of ours: nothing to revoke (§2.2: still 200)
            if isinstance(jti, str):
                outcome = self.store.revoke_oauth_token(jti, client["client_id"])
                if outcome == "not_owner":  # §2.1: refused when the token was issued to another client
                    raise OAuthError(400, "unauthorized_client", "this token was not issued to this client")
                if outcome == "revoked":
                    log.info("oauth: token %s of %s revoked", jti, client["client_id"])
        except OAuthError as exc:
            return exc.response()
        return Response(b"", 200, headers=NO_STORE)

    async def jwks_endpoint(self, request: Request) -> Response:
        try:
            self.store.prune_oauth()
        except StoreUnavailable:  # the store in Redis is away: the replica's keys are still the keys
            pass
        return JSONResponse(self.jwks(), headers={"Cache-Control": "max-age=60"})

    async def metadata_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.metadata(), headers={"Cache-Control": "max-age=3600"})


def create_oauth_app(server: AuthServer) -> Starlette:
    async def crash(request, exc):  # Starlette re-raises it afterwards: uvicorn logs the traceback
        return JSONResponse({"error": "server_error"}, 500, headers=NO_STORE)

    async def unavailable(request, exc):  # the store in Redis is away: nothing can be recorded
        return JSONResponse({"error": "temporarily_unavailable", "error_description": str(exc)}, 503,
                            headers={**NO_STORE, "Retry-After": "1"})

    return Starlette(routes=[
        Route(TOKEN_PATH, server.token_endpoint, methods=["POST"]),
        Route(REVOKE_PATH, server.revoke_endpoint, methods=["POST"]),
        Route(JWKS_PATH, server.jwks_endpoint, methods=["GET"]),
        Route(METADATA_PATH, server.metadata_endpoint, methods=["GET"]),
    ], exception_handlers={StoreUnavailable: unavailable, Exception: crash})


def with_oauth(app, oauth_app):
    """An ASGI app: the OAuth endpoints' paths to `oauth_app` (no admin token, no portal session),
    everything else to `app`."""
    async def dispatch(scope, receive, send):
        if scope["type"] == "http" and scope["path"] in PATHS:
            await oauth_app(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch
