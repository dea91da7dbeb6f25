"""Bearer JWTs (RFC 7519) checked the way RFC 8725 (JWT best current practices) asks:

- the algorithm belongs to the key: a token is tried only with keys whose configured algorithm
  equals its `alg` header, so `none` never verifies and an RSA public key is never used as an HMAC
  secret (an HS key can only be a secret from the environment; pyjwt also refuses PEM-looking
  HMAC secrets);
- `exp` is required and must be a number; `nbf` and `iat`, when present, must be numbers and not in
  the future, all with `leeway`; `iss` and `aud` are checked when configured;
- the token's size is capped before anything decodes it;
- `jku`, `x5u` and `jwk` header parameters are ignored: keys come from the config or the
  configured JWKS URL only; `kid` is only ever a dict key, so `../../etc/passwd` just finds no key.

Verified tokens are cached (LRU, `cache_size`) until `exp` (+ leeway): a hit costs one dict lookup.
A JWKS is fetched by a background task every `jwks_refresh` seconds; a token with an unknown `kid`
may trigger one refetch per `jwks_cooldown` (concurrent ones share it), so a flood of made-up kids
is not a flood of fetches. Keys are kept while the key server is down. Before the first key set
arrives, requests wait for it up to `jwks_timeout`, then get 503 `jwks_unavailable`.

With `check_revoked`, a token whose `jti` is in the store's revoked set (control/directory.py: the
worker reloads it when the store changes, so a revocation lands within about a second) is refused,
cached or not: one set lookup per request, no I/O.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import time
import weakref

import jwt
import msgspec
import orjson
from jwt.algorithms import get_default_algorithms

from ..config.schema import Jwt
from .auth import insufficient_scope, query_values, token_scopes
from .base import ConsumerInfo, register
from .introspection import HttpError, http_request, safe_name

log = logging.getLogger("fastgate.jwt")

INVALID = b'WWW-Authenticate: Bearer realm="fastgate", error="invalid_token"\r\n'
BEARER = b'WWW-Authenticate: Bearer realm="fastgate"\r\n'
RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


class Key:
    """One verification key, with the one algorithm it may be used with."""

    __slots__ = ("kid", "alg", "key", "issuer", "alive", "ident")

    def __init__(self, kid, alg, key, issuer=None, ident=None):
        self.kid = kid
        self.alg = alg
        self.key = key
        self.issuer = issuer
        self.alive = True  # False once a refreshed JWKS no longer has it: cached tokens drop too
        self.ident = ident


def prepare_key(alg: str, material: str | bytes):
    """A key object for `alg` from a PEM (or an HS secret); raises on a key of the wrong kind."""
    algo = get_default_algorithms()[alg]
    return algo.prepare_key(material)


def _pad(s: str) -> str:
    return s + "=" * (-len(s) % 4)


def static_keys(cfg: Jwt) -> tuple[list[Key], list[tuple[str, str, str]]]:
    """The configured keys, and (relpath, message, hint) for each that cannot be used."""
    out, problems = [], []
    for i, k in enumerate(cfg.keys):
        if k.secret_env is not None:
            material = os.environ.get(k.secret_env)
            if not material:
                problems.append((f"keys[{i}].secret_env", f"environment variable {k.secret_env} is not set",
                                 "set it in the gateway's environment"))
                continue
            if material.startswith("base64:"):  # a binary secret (RFC 7515 A.1's, say), base64 or base64url
                try:
                    material = base64.urlsafe_b64decode(_pad(material[7:].replace("+", "-").replace("/", "_")))
                except ValueError as exc:
                    problems.append((f"keys[{i}].secret_env", f"{k.secret_env}: bad base64: {exc}", ""))
                    continue
        else:
            material = k.key
        try:
            obj = prepare_key(k.algorithm, material)
        except Exception as exc:  # InvalidKeyError, ValueError from cryptography, ...
            problems.append((f"keys[{i}].key", f"not a usable {k.algorithm} key: {exc}",
                             "a PEM public key for RS/PS/ES/EdDSA; HS keys come from secret_env"))
            continue
        out.append(Key(k.kid, k.algorithm, obj, k.issuer, f"keys[{i}]"))
    return out, problems


def jwks_keys(doc, algorithms: frozenset[str]) -> list[tuple[str | None, str, str, object]]:
    """(kid, alg, identity, key object) for each usable key of a JWKS document. Symmetric (`oct`)
    keys are never taken from a key set; a key without `alg` gets each allowed algorithm of its type."""
    out = []
    for jwk in doc.get("keys", ()) if isinstance(doc, dict) else ():
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kty, kid = jwk.get("kty"), jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        if kty == "RSA":
            cands = RSA_ALGS
        elif kty == "EC":
            cands = (EC_ALGS.get(jwk.get("crv")),)
        elif kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448"):
            cands = ("EdDSA",)
        else:
            continue
        if "alg" in jwk:
            cands = tuple(a for a in cands if a == jwk["alg"])
        ident = orjson.dumps(jwk, option=orjson.OPT_SORT_KEYS).decode()
        for alg in cands:
            if alg not in algorithms:
                continue
            try:
                obj = jwt.PyJWK(jwk, algorithm=alg).key
            except Exception as exc:
                log.warning("jwks: key %s unusable for %s: %r", kid, alg, exc)
                continue
            out.append((kid, alg, ident, obj))
    return out


async def _refresher(ref) -> None:
    """The key set's background task: fetch, then again every `refresh` (sooner until one worked)."""
    while True:
        ks = ref()
        if ks is None:
            return
        fut = ks.fetch()
        del ks
        try:
            await fut
        except Exception:  # logged by the fetch
            pass
        ks = ref()
        if ks is None:
            return
        delay = ks.refresh if ks.loaded else ks.cooldown
        del ks
        await asyncio.sleep(delay)


class KeySet:
    """A JWKS URL's keys, shared by every policy that names the same URL and settings."""

    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, url, algorithms, refresh, cooldown, timeout):
        self.url = url
        self.algorithms = frozenset(algorithms)
        self.refresh = refresh
        self.cooldown = cooldown
        self.timeout = timeout
        self.keys: dict[str | None, list[Key]] = {}
        self.loaded = False
        self.last_fetch = -1e18
        self.fetching: asyncio.Future | None = None
        self.task = None
        self.loop = None
        self.fetches = 0

    @classmethod
    def get(cls, cfg: Jwt) -> KeySet:
        ident = (cfg.jwks_url, tuple(sorted(cfg.jwks_algorithms)), cfg.jwks_refresh, cfg.jwks_cooldown,
                 cfg.jwks_timeout)
        ks = cls._shared.get(ident)
        if ks is None:
            ks = cls(cfg.jwks_url, cfg.jwks_algorithms, cfg.jwks_refresh, cfg.jwks_cooldown, cfg.jwks_timeout)
            cls._shared[ident] = ks
        return ks

    def start(self) -> None:
        """Start the refresh task in the running loop (at the first request that needs it)."""
        loop = asyncio.get_running_loop()
        if self.loop is loop and self.task is not None and not self.task.done():
            return
        if self.loop is not loop:
            self.fetching = None
            self.last_fetch = -1e18
        self.loop = loop
        self.task = loop.create_task(_refresher(weakref.ref(self)))
        weakref.finalize(self, self.task.cancel)

    def may_refetch(self) -> bool:
        return self.fetching is not None or time.monotonic() - self.last_fetch >= self.cooldown

    def fetch(self) -> asyncio.Future:
        """The fetch in flight, or a new one."""
        if self.fetching is None:
            self.last_fetch = time.monotonic()
            self.fetching = asyncio.ensure_future(self._fetch())
        return self.fetching

    async def _fetch(self) -> None:
        try:
            self.fetches += 1
            try:
                status, body = await http_request("GET", self.url, timeout=self.timeout)
                if status != 200:
                    raise HttpError(f"status {status}")
                found = jwks_keys(orjson.loads(body), self.algorithms)
            except (OSError, TimeoutError, HttpError, orjson.JSONDecodeError) as exc:
                log.warning("jwks %s: fetch failed, keeping %d key(s): %r", self.url, len(self.keys), exc)
                return
            if not found:
                log.warning("jwks %s: no usable key in the answer, keeping the old ones", self.url)
                return
            old = {(k.ident, k.alg): k for ks in self.keys.values() for k in ks}
            keys: dict[str | None, list[Key]] = {}
            for kid, alg, ident, obj in found:
                k = old.pop((ident, alg), None) or Key(kid, alg, obj, None, ident)
                keys.setdefault(kid, []).append(k)
            for k in old.values():
                k.alive = False
            self.keys = keys
            self.loaded = True
        finally:
            self.fetching = None

    def find(self, kid) -> list[Key]:
        if kid is not None:
            return self.keys.get(kid, [])
        if len(self.keys) == 1:  # no kid: only a key set with one key is unambiguous
            return next(iter(self.keys.values()))
        return self.keys.get(None, [])


def check_jwt(cfg: Jwt) -> list[tuple[str, str, str]]:
    """What `fastgate check` reports: keys that do not parse or whose secret is not set."""
    return static_keys(cfg)[1]


class JwtPolicy:
    phase = "authentication"

    def __init__(self, cfg: Jwt, ctx):
        self.cfg = cfg
        keys, problems = static_keys(cfg)
        for rel, msg, _hint in problems:
            log.error("jwt (%s): %s: %s — that key is not used", ctx.owner, rel, msg)
        self.by_kid: dict[str, list[Key]] = {}
        self.any_kid: list[Key] = []
        for k in keys:
            if k.kid is None:
                self.any_kid.append(k)
            else:
                self.by_kid.setdefault(k.kid, []).append(k)
        self.jwks = KeySet.get(cfg) if cfg.jwks_url else None
        self.consumers = ctx.consumers
        # the store's view (its `revoked` set is replaced whole on each reload: read it per request)
        self.directory = getattr(ctx, "directory", None) if cfg.check_revoked else None
        if cfg.check_revoked and self.directory is None:
            log.error("jwt (%s): check_revoked needs the SQLite store (store.backend: sqlite): revocations "
                      "are not seen", ctx.owner)
        self.header = cfg.header.lower().encode() if cfg.header else None
        self.bearer = self.header == b"authorization"
        self.cookie = cfg.cookie.encode() if cfg.cookie else None
        self.leeway = cfg.leeway
        self.scopes = frozenset(cfg.required_scopes)
        self.to_headers = tuple((claim, name.encode()) for claim, name in cfg.claims_to_headers.items())
        self.drop_request_headers = tuple(name.lower() for _c, name in self.to_headers)
        self.options = {"require": ["exp"], "verify_aud": cfg.audience is not None,
                        "verify_iss": cfg.issuer is not None}
        # token → (valid until (wall clock), claims, consumer or None, key, upstream headers)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        # the hook the routes run: its compiled form answers a cached token in the header when there
        # is nothing else to check (no revocation list, no required scopes, no query or cookie
        # carrier); `request` is the reference it is tested against, and answers every other case
        self.compiled_request = None
        if self.header is not None and cfg.query is None and self.cookie is None and not self.scopes \
                and not cfg.check_revoked:
            from .._core.hooks import JwtCached

            self.compiled_request = JwtCached(self.header, self.bearer, cfg.max_token_bytes, self.cache,
                                              self.request).request

    # --- the token ------------------------------------------------------------------------------------
    def _token(self, ex):
        """bytes, None (no token), or False (ambiguous or malformed carrier)."""
        found = []
        if self.header is not None:
            vals = [v for n, v in ex.headers if n.lower() == self.header]
            for v in vals:
                if self.bearer:
                    scheme, _, tok = v.strip().partition(b" ")
                    if scheme.lower() != b"bearer":
                        return False
                    v = tok
                found.append(v.strip())
        if self.cfg.query is not None and ex.query:
            found += [v.encode("latin-1", "replace") for v in query_values(ex.query, self.cfg.query)]
        if self.cookie is not None:
            for v in (v for n, v in ex.headers if n.lower() == b"cookie"):
                for part in v.split(b";"):
                    name, sep, value = part.strip().partition(b"=")
                    if sep and name == self.cookie:
                        found.append(value)
        if not found:
            return None
        if len(found) > 1 or not found[0]:
            return False
        return found[0]

    def request(self, ex):
        token = self._token(ex)
        if token is None:
            return ex.reply(401, "unauthorized", BEARER)
        if token is False or len(token) > self.cfg.max_token_bytes:  # size first: nothing decoded yet
            return self._invalid(ex)
        hit = self.cache.get(token)
        if hit is not None:
            if hit[0] > time.time() and hit[3].alive:
                self.cache.move_to_end(token)
                return self._accept(ex, hit)
            del self.cache[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self._invalid(ex)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg == "none" or (kid is not None and not isinstance(kid, str)):
            return self._invalid(ex)
        cands = [k for k in (self.by_kid.get(kid, []) if kid is not None else []) + self.any_kid if k.alg == alg]
        if cands or self.jwks is None:
            return self._verify(ex, token, cands)
        ks = self.jwks
        ks.start()
        cands = [k for k in ks.find(kid) if k.alg == alg]
        if cands:
            return self._verify(ex, token, cands)
        if not ks.loaded or (kid is not None and kid not in ks.keys):
            if ks.may_refetch():
                return self._after_fetch(ex, token, alg, kid)
            if not ks.loaded:
                return ex.reply(503, "jwks_unavailable", b"Retry-After: 5\r\n")
        return self._invalid(ex)

    async def _after_fetch(self, ex, token, alg, kid):
        ks = self.jwks
        try:
            await asyncio.wait_for(asyncio.shield(ks.fetch()), ks.timeout)
        except Exception:  # TimeoutError; the fetch logs its own failures
            pass
        if not ks.loaded:
            return ex.reply(503, "jwks_unavailable", b"Retry-After: 5\r\n")
        return self._verify(ex, token, [k for k in ks.find(kid) if k.alg == alg])

    # --- verification ---------------------------------------------------------------------------------
    def _invalid(self, ex, detail: str | None = None):
        if detail:
            return ex.reply(401, "invalid_token", INVALID, detail=detail)
        return ex.reply(401, "invalid_token", INVALID)

    def _verify(self, ex, token: bytes, cands: list[Key]):
        if not cands:
            return self._invalid(ex, "no key for this token")
        cfg = self.cfg
        claims = key = None
        for k in cands:
            try:
                claims = jwt.decode(token, k.key, algorithms=[k.alg], options=self.options, audience=cfg.audience,
                                    issuer=cfg.issuer, leeway=self.leeway)
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                return self._invalid(ex, str(exc))
            key = k
            break
        if key is None:
            return self._invalid(ex, "signature verification failed")
        for name in ("exp", "nbf", "iat"):  # pyjwt int()s strings: RFC 7519 NumericDate is a number
            v = claims.get(name)
            if (v is not None or name == "exp") and (type(v) not in (int, float) or v != v):
                return self._invalid(ex, f"`{name}` must be a number")
        if key.issuer is not None and claims.get("iss") != key.issuer:
            return self._invalid(ex, "key not valid for this issuer")
        consumer = None
        sub = claims.get(cfg.consumer_claim)
        if sub is not None:
            name = safe_name(sub)
            if name is None:
                return self._invalid(ex, f"`{cfg.consumer_claim}` is not a usable name")
            consumer = self.consumers.get(name) or ConsumerInfo(name)
        adds = []
        scope = " ".join(sorted(token_scopes(claims)))
        if scope:
            adds.append((b"X-Authenticated-Scope", scope.encode()))
        for claim, hname in self.to_headers:
            v = claims.get(claim)
            if v is None:
                continue
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                v = ",".join(v)
            text = v if isinstance(v, str) else orjson.dumps(v).decode()
            if safe_name(text) is not None or text == "":
                adds.append((hname, text.encode()))
        jti = claims.get("jti")
        entry = (claims["exp"] + self.leeway, claims, consumer, key, tuple(adds),
                 (key.kid or key.ident or "").encode(), jti if isinstance(jti, str) else None)
        cache = self.cache
        cache[token] = entry
        if len(cache) > cfg.cache_size:
            cache.popitem(last=False)
        return self._accept(ex, entry)

    def _accept(self, ex, entry):
        _until, claims, consumer, _key, adds, cred, jti = entry
        if jti is not None and self.directory is not None and jti in self.directory.revoked:
            return self._invalid(ex, "token revoked")
        if self.scopes and not self.scopes.issubset(token_scopes(claims)):
            return insufficient_scope(ex, self.scopes)
        if consumer is not None:
            ex.authenticated(consumer, claims, cred)
        else:
            ex.claims = claims
        for name, value in adds:
            ex.add_upstream_header(name, value)
        return None


@register(Jwt)
class JwtBuilder:
    """One JwtPolicy per (attachment, config, generation), shared by the routes it applies to, so a
    global jwt policy keeps one token cache rather than one per route."""

    check = staticmethod(check_jwt)
    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __new__(cls, cfg: Jwt, ctx):
        ident = (ctx.owner, msgspec.json.encode(cfg), id(ctx.consumers))
        p = cls._shared.get(ident)
        if p is None or p.consumers is not ctx.consumers:
            p = JwtPolicy(cfg, ctx)
            cls._shared[ident] = p
        return p
