"""Authentication by credentials kept in the config (key-auth, basic-auth, hmac-auth) and the
authorization policies that read what authentication found (acl, require-scopes).

Credentials in the config are hashes wherever the protocol allows it:
  keys      "sha256:<hex>" of each API key — make one with `hash_key` below:
            python -c 'from fastgate.policies.auth import hash_key; print(hash_key("the-key"))'
  basic     password hashes in Django's formats (pbkdf2_sha256$… or scrypt$…), see `hash_password`
  hmac      HMAC needs the shared secret itself to compute the signature, so a hash cannot work:
            the config names an environment variable that holds it, read when the chain is built.

A presented API key is hashed and looked up in a dict (hash → consumer) built once per chain: the
plaintext is never compared. A timing side channel of the dict lookup could at most reveal how a
SHA-256 digest of the attacker's own input compares with stored digests, which does not help to
find a key with a given digest (preimage resistance), so no constant-time compare is needed there.
Password and signature checks, which compare secrets, use hmac.compare_digest.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.utils
import hashlib
import hmac
import logging
import os
import re
import time
from urllib.parse import unquote

from .._core.headers import CheckedHeader
from ..config.schema import Acl, BasicAuth, HmacAuth, KeyAuth, RequireScopes
from .base import ConsumerInfo, register

log = logging.getLogger("fastgate.auth")


# --- helpers shared by the authentication policies ---------------------------------------------------
def hash_key(key: str | bytes) -> str:
    """The config form of an API key: "sha256:<64 hex>"."""
    if isinstance(key, str):
        key = key.encode()
    return "sha256:" + hashlib.sha256(key).hexdigest()


def hash_password(password: str, iterations: int = 600_000, salt: str | None = None) -> str:
    """A basic-auth password hash, Django's pbkdf2_sha256 format (OWASP 2023: 600,000 iterations)."""
    salt = salt or base64.b64encode(os.urandom(12)).decode().rstrip("=").replace("+", "x").replace("/", "y")
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(dk).decode()}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Check a password against a pbkdf2_sha256$… or scrypt$… hash (Django's formats)."""
    parts = encoded.split("$")
    try:
        if parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            expected = base64.b64decode(parts[3])
            dk = hashlib.pbkdf2_hmac("sha256", password, parts[2].encode(), int(parts[1]), len(expected))
        elif parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[3]), int(parts[4])
            expected = base64.b64decode(parts[5])
            dk = hashlib.scrypt(password, salt=parts[2].encode(), n=n, r=r, p=p,
                                maxmem=128 * r * (n + p + 2) + (1 << 20), dklen=len(expected))
        else:
            return False
    except (ValueError, binascii.Error, MemoryError):
        return False
    return hmac.compare_digest(dk, expected)


def header_values(ex, name: bytes) -> list[bytes]:
    """Every value of request header `name` (lowercase)."""
    ln = len(name)
    return [v for n, v in ex.headers if len(n) == ln and n.lower() == name]


def query_values(query: bytes, name: str) -> list[str]:
    """Every value of query parameter `name` (percent-decoded)."""
    out = []
    if not query:
        return out
    for part in query.split(b"&"):
        k, _, v = part.partition(b"=")
        if unquote(k.decode("latin-1").replace("+", " ")) == name:
            out.append(unquote(v.decode("latin-1").replace("+", " ")))
    return out


def strip_query_param(ex, name: str) -> None:
    """Remove parameter `name` from the query forwarded upstream (ex.target_path is path?query)."""
    target, sep, query = ex.target_path.partition(b"?")
    if not sep:
        return
    kept = [p for p in query.split(b"&")
            if unquote(p.partition(b"=")[0].decode("latin-1").replace("+", " ")) != name]
    ex.target_path = target + b"?" + b"&".join(kept) if kept else target


def anonymous_consumer(ctx, name: str | None) -> ConsumerInfo | None:
    if name is None:
        return None
    return ctx.consumers.get(name) or ConsumerInfo(name)


def _challenge(scheme: str) -> bytes:
    return f'WWW-Authenticate: {scheme} realm="fastgate"\r\n'.encode()


# --- key-auth -----------------------------------------------------------------------------------------
@register(KeyAuth)
class KeyAuthPolicy:
    """An API key from a header (or query parameter), looked up by its SHA-256 hash."""

    phase = "authentication"

    def __init__(self, cfg: KeyAuth, ctx):
        self.header = cfg.header.lower().encode() if cfg.header else None
        self.query = cfg.query
        # a key in the query string when only the header is allowed is refused, never matched
        self.forbidden_query = cfg.header if cfg.query is None else None
        self.hide = cfg.hide_credentials
        self.anonymous = anonymous_consumer(ctx, cfg.anonymous)
        self.drop_request_headers = (self.header,) if cfg.hide_credentials and self.header else ()
        self.challenge = _challenge("Key")
        self.directory = getattr(ctx, "directory", None)
        owners: dict[bytes, list[ConsumerInfo]] = {}
        for c in getattr(ctx.config, "consumers", ()) or ():
            info = ctx.consumers.get(c.username) or ConsumerInfo(c.username, c.id, c.plan, c.groups)
            for h in c.keys:
                owners.setdefault(h[7:].encode(), []).append(info)
        # digest -> (consumer, credential identifier, the identity headers the upstream gets: the
        # consumer's and the credential's, made once here for the compiled hook)
        self.by_hash: dict[bytes, tuple[ConsumerInfo, bytes, tuple]] = {}
        for digest, infos in owners.items():
            if len({i.username for i in infos}) > 1:
                log.error("key-auth: one key hash belongs to consumers %s: refused for all of them",
                          ", ".join(sorted({i.username for i in infos})))
                continue
            # the credential identifier names the key without revealing it: a prefix of its hash
            cred = b"sha256:" + digest[:16]
            identity = infos[0].headers + (CheckedHeader(b"X-Credential-Identifier", cred),)
            self.by_hash[digest] = (infos[0], cred, identity)
        # the hook the route runs: its compiled form for a key in the header (_core/hooks.pyx;
        # `request` below is the reference it is tested against, and answers every other case)
        self.compiled_request = None
        if self.header is not None:
            from .._core.hooks import KeyAuth

            self.compiled_request = KeyAuth(self.header, self.by_hash, self.directory, self.request).request

    def request(self, ex):
        found = []
        if self.header is not None:
            found += header_values(ex, self.header)
        if ex.query:
            if self.query is not None:
                found += [v.encode() for v in query_values(ex.query, self.query)]
            elif self.forbidden_query and query_values(ex.query, self.forbidden_query):
                return ex.reply(401, "invalid_credentials", self.challenge,
                                detail="API keys are not accepted in the query string")
        if not found:
            if self.anonymous is not None:
                ex.authenticated(self.anonymous)
                return None
            return ex.reply(401, "unauthorized", self.challenge)
        if len(found) > 1:
            return ex.reply(401, "invalid_credentials", self.challenge, detail="more than one API key")
        digest = hashlib.sha256(found[0]).hexdigest().encode()
        hit = self.by_hash.get(digest)
        if hit is None and self.directory is not None:  # keys made through the admin API
            hit = self.directory.get(digest)
        if hit is None:
            return ex.reply(401, "invalid_credentials", self.challenge)
        if self.hide and self.query is not None:
            strip_query_param(ex, self.query)
        ex.authenticated(hit[0], None, hit[1])
        return None


# --- basic-auth ---------------------------------------------------------------------------------------
MAX_KDF_IN_FLIGHT = 64  # password checks waiting for a thread; past this new ones get 503


@register(BasicAuth)
class BasicAuthPolicy:
    """`Authorization: Basic` against password hashes. The KDF runs in a thread (hashlib releases the
    GIL), so a slow hash never stalls the worker's loop; successes are cached by a hash of the
    header value in a bounded dict, failures are not."""

    phase = "authentication"

    def __init__(self, cfg: BasicAuth, ctx):
        self.anonymous = anonymous_consumer(ctx, cfg.anonymous)
        self.drop_request_headers = (b"authorization",) if cfg.hide_credentials else ()
        self.challenge = _challenge("Basic")
        self.cache_size = cfg.cache_size
        self.cache: collections.OrderedDict[bytes, tuple[ConsumerInfo, bytes]] = collections.OrderedDict()
        self.in_flight = 0
        self.users: dict[str, tuple[ConsumerInfo, str]] = {}
        for c in getattr(ctx.config, "consumers", ()) or ():
            info = ctx.consumers.get(c.username) or ConsumerInfo(c.username, c.id, c.plan, c.groups)
            for cred in c.basic:
                if cred.username in self.users:
                    log.error("basic-auth: username %s is given twice: the first one is used", cred.username)
                    continue
                self.users[cred.username] = (info, cred.password_hash)

    def request(self, ex):
        values = header_values(ex, b"authorization")
        if not values:
            if self.anonymous is not None:
                ex.authenticated(self.anonymous)
                return None
            return ex.reply(401, "unauthorized", self.challenge)
        if len(values) > 1:
            return ex.reply(401, "invalid_credentials", self.challenge, detail="more than one Authorization header")
        value = values[0]
        fp = hashlib.sha256(value).digest()
        hit = self.cache.get(fp)
        if hit is not None:
            self.cache.move_to_end(fp)
            ex.authenticated(hit[0], None, hit[1])
            return None
        scheme, _, b64 = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return ex.reply(401, "unauthorized", self.challenge)
        try:
            user, sep, password = base64.b64decode(b64.strip(), validate=True).partition(b":")
            name = user.decode()
        except (binascii.Error, UnicodeDecodeError):
            return ex.reply(401, "invalid_credentials", self.challenge)
        entry = self.users.get(name) if sep else None
        if entry is None:
            return ex.reply(401, "invalid_credentials", self.challenge)
        if self.in_flight >= MAX_KDF_IN_FLIGHT:
            return ex.reply(503, "auth_busy", b"Retry-After: 1\r\n")
        return self._verify(ex, fp, entry, password, name)

    async def _verify(self, ex, fp, entry, password, name):
        self.in_flight += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, password, entry[1])
        finally:
            self.in_flight -= 1
        if not ok:
            return ex.reply(401, "invalid_credentials", self.challenge)
        cache = self.cache
        cache[fp] = (entry[0], name.encode())
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        ex.authenticated(entry[0], None, name.encode())
        return None


# --- hmac-auth ----------------------------------------------------------------------------------------
_PARAM = re.compile(r'([A-Za-z]+)\s*=\s*"([^"]*)"')
_DIGESTS = {"hmac-sha256": hashlib.sha256, "hmac-sha384": hashlib.sha384, "hmac-sha512": hashlib.sha512}


@register(HmacAuth)
class HmacAuthPolicy:
    """Kong's hmac-auth: `Authorization: hmac username="<key_id>", algorithm="hmac-sha256",
    headers="date request-line x-foo", signature="<base64>"`. The signing string is one line per
    listed header, `name: value`, with `request-line` as `METHOD /path?query HTTP/1.1`, joined by
    "\\n". `date` (or `x-date`) must be signed and within `clock_skew` of the gateway's clock; with
    `validate_body`, `digest` must be signed too and `Digest: SHA-256=<base64>` must match the body."""

    phase = "authentication"

    def __init__(self, cfg: HmacAuth, ctx):
        self.skew = cfg.clock_skew
        self.algorithms = frozenset(cfg.algorithms)
        self.enforce = frozenset(h.lower() for h in cfg.enforce_headers)
        if cfg.validate_body:
            self.enforce |= {"digest"}
        self.anonymous = anonymous_consumer(ctx, cfg.anonymous)
        self.drop_request_headers = (b"authorization",) if cfg.hide_credentials else ()
        self.challenge = _challenge("hmac")
        self.body_limit = cfg.body_limit
        self.request_body = self._check_body if cfg.validate_body else None
        self.secrets: dict[str, tuple[ConsumerInfo, bytes]] = {}
        for c in getattr(ctx.config, "consumers", ()) or ():
            info = ctx.consumers.get(c.username) or ConsumerInfo(c.username, c.id, c.plan, c.groups)
            for cred in c.hmac:
                secret = os.environ.get(cred.secret_env)
                if not secret:
                    log.error("hmac-auth: $%s (key %s of %s) is not set: that key is refused",
                              cred.secret_env, cred.key_id, c.username)
                    continue
                self.secrets[cred.key_id] = (info, secret.encode())

    def _fail(self, ex, detail: str):
        return ex.reply(401, "invalid_credentials", self.challenge, detail=detail)

    def request(self, ex):
        values = header_values(ex, b"authorization")
        if not values:
            if self.anonymous is not None:
                ex.authenticated(self.anonymous)
                return None
            return ex.reply(401, "unauthorized", self.challenge)
        if len(values) > 1:
            return self._fail(ex, "more than one Authorization header")
        scheme, _, rest = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "hmac":
            return ex.reply(401, "unauthorized", self.challenge)
        params = dict(_PARAM.findall(rest))
        key_id, algorithm, signature = params.get("username"), params.get("algorithm"), params.get("signature")
        if not key_id or not algorithm or not signature:
            return self._fail(ex, "username, algorithm and signature are required")
        if algorithm not in self.algorithms:
            return self._fail(ex, "algorithm not allowed")
        signed = params.get("headers", "date").lower().split()
        date_name = "x-date" if "x-date" in signed else "date"
        if date_name not in signed or not self.enforce.issubset(signed):
            return self._fail(ex, "required headers are not signed")
        lines = []
        for name in signed:
            if name == "request-line":
                target = ex.path + (b"?" + ex.query if ex.query else b"")
                lines.append(b"%s %s HTTP/%s" % (ex.method, target, b"1.1" if ex.version == 11 else b"1.0"))
                continue
            vals = header_values(ex, name.encode())
            if len(vals) != 1:
                return self._fail(ex, f"signed header {name} missing or repeated")
            lines.append(name.encode() + b": " + vals[0])
        try:
            when = email.utils.parsedate_to_datetime(header_values(ex, date_name.encode())[0].decode("latin-1"))
            stamp = when.timestamp()
        except (TypeError, ValueError, IndexError):
            return self._fail(ex, "unreadable date")
        if abs(time.time() - stamp) > self.skew:
            return self._fail(ex, "date out of the allowed clock skew")
        entry = self.secrets.get(key_id)
        if entry is None:
            return self._fail(ex, "unknown key")
        expected = base64.b64encode(hmac.new(entry[1], b"\n".join(lines), _DIGESTS[algorithm]).digest())
        if not hmac.compare_digest(expected, signature.encode("latin-1")):
            return self._fail(ex, "signature mismatch")
        ex.authenticated(entry[0], None, key_id.encode())
        return None

    def _check_body(self, ex, body: bytes):
        digest = header_values(ex, b"digest")
        if not digest:
            # an authenticated request always has a signed Digest (see request): this one is anonymous
            return None if ex.consumer is self.anonymous else self._fail(ex, "Digest is required")
        want = b"SHA-256=" + base64.b64encode(hashlib.sha256(body).digest())
        if len(digest) != 1 or not hmac.compare_digest(digest[0].strip(), want):
            return self._fail(ex, "body does not match Digest")
        return None


# --- authorization ------------------------------------------------------------------------------------
@register(Acl)
class AclPolicy:
    """Groups of the authenticated consumer: any denied group → 403; allow list given and no
    allowed group → 403; nobody authenticated → 401."""

    phase = "authorization"

    def __init__(self, cfg: Acl, ctx):
        self.allow = frozenset(cfg.allow)
        self.deny = frozenset(cfg.deny)

    def request(self, ex):
        c = ex.consumer
        if c is None:
            return ex.reply(401, "unauthorized")
        if (self.deny and not self.deny.isdisjoint(c.groups)) or (self.allow and self.allow.isdisjoint(c.groups)):
            return ex.reply(403, "forbidden")
        return None


def token_scopes(claims) -> frozenset[str]:
    """Scopes of verified claims: `scope` (space-separated, RFC 8693/7662) or `scp` (list or string)."""
    out: set[str] = set()
    for name in ("scope", "scp"):
        v = claims.get(name)
        if isinstance(v, str):
            out.update(v.split())
        elif isinstance(v, list):
            out.update(s for s in v if isinstance(s, str))
    return frozenset(out)


def insufficient_scope(ex, scopes) -> bytes:
    challenge = f'WWW-Authenticate: Bearer error="insufficient_scope", scope="{" ".join(sorted(scopes))}"\r\n'
    return ex.reply(403, "insufficient_scope", challenge.encode())


@register(RequireScopes)
class RequireScopesPolicy:
    phase = "authorization"

    def __init__(self, cfg: RequireScopes, ctx):
        self.scopes = frozenset(cfg.scopes)
        self.claims = tuple(cfg.claims.items())

    def request(self, ex):
        claims = ex.claims
        if claims is None:
            return ex.reply(401, "unauthorized", b'WWW-Authenticate: Bearer realm="fastgate"\r\n')
        if self.scopes and not self.scopes.issubset(token_scopes(claims)):
            return insufficient_scope(ex, self.scopes)
        for name, want in self.claims:
            got = claims.get(name)
            if got != want and not (isinstance(got, list) and want in got):
                return insufficient_scope(ex, self.scopes)
        return None
