"""OAuth 2.0 token introspection (RFC 7662): the gateway as a resource server asks the authorization
server whether a bearer token is active, and caches the answer.

    POST <endpoint>   Authorization: Basic base64(urlencode(client_id):urlencode(secret))
                      token=<token>&token_type_hint=access_token
    → {"active": true, "sub": "...", "scope": "a b", "exp": 1700000000, ...}

Answers are cached `cache_ttl` seconds (60 at most, never past the token's `exp`), active and
inactive ones alike; concurrent requests with one uncached token share one introspection call.
An endpoint that cannot be reached or answers anything but 200 + JSON is a 503
`introspection_unavailable`, never cached.

Also home of `http_request`, the tiny HTTP/1.1 client the auth policies use to reach key and token
servers (the package has no HTTP client dependency): one connection per call, `Connection: close`,
httptools parses the response.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import ssl
import time
from urllib.parse import quote, urlsplit

import httptools
import orjson

from ..config.schema import Introspection
from .auth import header_values, insufficient_scope, token_scopes
from .base import ConsumerInfo, register

log = logging.getLogger("fastgate.introspection")

MAX_RESPONSE_BYTES = 1 << 20


class HttpError(Exception):
    pass


async def http_request(method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"",
                       timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 request; raises HttpError (or OSError/TimeoutError)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise HttpError(f"not an http(s) URL: {url}")
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
    if ":" in u.hostname and u.port is None:
        host = f"[{u.hostname}]"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", "Accept: application/json",
             "User-Agent: fastgate"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    class Sink:
        def __init__(self):
            self.body = []
            self.size = 0
            self.done = False

        def on_body(self, chunk):
            self.size += len(chunk)
            if self.size > MAX_RESPONSE_BYTES:
                raise HttpError("response too large")
            self.body.append(chunk)

        def on_message_complete(self):
            self.done = True

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    writer = None
    async with asyncio.timeout(timeout):
        try:
            reader, writer = await asyncio.open_connection(
                u.hostname, port, ssl=ssl.create_default_context() if tls else None)
            writer.write(data)
            while not sink.done:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                try:
                    parser.feed_data(chunk)
                except httptools.HttpParserError as exc:
                    raise HttpError(f"bad response: {exc}") from None
        finally:
            if writer is not None:
                writer.close()
    if not sink.done:
        try:
            parser.feed_data(b"")  # a body delimited by the close
        except httptools.HttpParserError:
            pass
        if not sink.done and parser.get_status_code() == 0:
            raise HttpError("connection closed before a response")
    return parser.get_status_code(), b"".join(sink.body)


def safe_name(value) -> str | None:
    """A claim usable as a consumer name in headers: a short string without control characters."""
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        return None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return None
    return value


def bearer_token(ex) -> bytes | None | bool:
    """The token of the single `Authorization: Bearer` header: bytes, None (none sent), or False
    (two Authorization headers, or another scheme)."""
    values = header_values(ex, b"authorization")
    if not values:
        return None
    if len(values) > 1:
        return False
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return False
    return token


BEARER = b'WWW-Authenticate: Bearer realm="fastgate"\r\n'
INVALID = b'WWW-Authenticate: Bearer realm="fastgate", error="invalid_token"\r\n'


@register(Introspection)
class IntrospectionPolicy:
    phase = "authentication"

    def __init__(self, cfg: Introspection, ctx):
        self.cfg = cfg
        secret = os.environ.get(cfg.client_secret_env)
        if not secret:
            log.error("introspection: $%s is not set: every request gets 503", cfg.client_secret_env)
            self.auth = None
        else:
            pair = f"{quote(cfg.client_id, safe='')}:{quote(secret, safe='')}"
            self.auth = "Basic " + base64.b64encode(pair.encode()).decode()
        self.consumers = ctx.consumers
        self.scopes = frozenset(cfg.required_scopes)
        # token → (valid until, claims or None, consumer or None, scope bytes)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.in_flight: dict[bytes, asyncio.Future] = {}

    def request(self, ex):
        token = bearer_token(ex)
        if token is None:
            return ex.reply(401, "unauthorized", BEARER)
        if token is False or len(token) > self.cfg.max_token_bytes:
            return ex.reply(401, "invalid_token", INVALID)
        hit = self.cache.get(token)
        if hit is not None:
            if hit[0] > time.monotonic():
                self.cache.move_to_end(token)
                return self._decide(ex, hit)
            del self.cache[token]
        if self.auth is None:
            return ex.reply(503, "introspection_unavailable")
        return self._later(ex, token)

    async def _later(self, ex, token: bytes):
        fut = self.in_flight.get(token)
        if fut is None:
            fut = asyncio.ensure_future(self._introspect(token))
            self.in_flight[token] = fut
            fut.add_done_callback(lambda _f: self.in_flight.pop(token, None))
        entry = await asyncio.shield(fut)
        if entry is None:
            return ex.reply(503, "introspection_unavailable")
        return self._decide(ex, entry)

    async def _introspect(self, token: bytes):
        cfg = self.cfg
        body = b"token=" + quote(token.decode("latin-1"), safe="").encode() + b"&token_type_hint=access_token"
        try:
            status, data = await http_request(
                "POST", cfg.endpoint, {"Authorization": self.auth,
                                       "Content-Type": "application/x-www-form-urlencoded"}, body, cfg.timeout)
            doc = orjson.loads(data) if status == 200 else None
        except (OSError, TimeoutError, HttpError, orjson.JSONDecodeError) as exc:
            log.warning("introspection at %s failed: %r", cfg.endpoint, exc)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
            log.warning("introspection at %s: status %s, no `active` in the answer", cfg.endpoint, status)
            return None
        now_wall, now = time.time(), time.monotonic()
        ttl = cfg.cache_ttl
        exp = doc.get("exp")
        if doc["active"] and exp is not None:
            if type(exp) not in (int, float) or exp <= now_wall:
                doc = {"active": False}
            else:
                ttl = min(ttl, exp - now_wall)
        if not doc["active"]:
            entry = (now + ttl, None, None, b"")
        else:
            name = safe_name(doc.get(cfg.consumer_claim)) or safe_name(doc.get("username")) \
                or safe_name(doc.get("client_id"))
            consumer = None
            if name is not None:
                consumer = self.consumers.get(name) or ConsumerInfo(name)
            scope = " ".join(sorted(token_scopes(doc))).encode()
            entry = (now + ttl, doc, consumer, scope)
        if ttl > 0:
            self.cache[token] = entry
            if len(self.cache) > cfg.cache_size:
                self.cache.popitem(last=False)
        return entry

    def _decide(self, ex, entry):
        _until, claims, consumer, scope = entry
        if claims is None:
            return ex.reply(401, "invalid_token", INVALID)
        if self.scopes and not self.scopes.issubset(token_scopes(claims)):
            return insufficient_scope(ex, self.scopes)
        if consumer is not None:
            ex.authenticated(consumer, claims, consumer.username.encode())
        else:
            ex.claims = claims
        if scope:
            ex.add_upstream_header(b"X-Authenticated-Scope", scope)
        return None
