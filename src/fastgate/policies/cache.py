"""Response caching and JSON response-body edits: the policies that need the upstream's body.

proxy-cache (phase cache): a per-worker LRU keyed by method, host, path, query and chosen request
headers. A hit is answered at the gateway (`X-Cache: HIT`, `Age`); a miss is proxied with
`X-Cache: MISS` and, when the response may be stored, copied on its way to the client (a tee: the
client is never slowed). Stored: responses to GET/HEAD with a configured status, a Content-Length
body of at most `max_body`, no `Set-Cookie`, no `Cache-Control: no-store|no-cache|private`, no
`Vary: *`; lifetime from `s-maxage`, then `max-age`, then `ttl`. A request with
`Cache-Control: no-cache` skips the lookup (and refreshes the entry); `no-store` bypasses the
cache. Requests with credentials (Authorization, an authenticated consumer) bypass it unless
`cache_authenticated`. The response's `Vary` names are stored with the entry and must match.
A hit replays the upstream's headers with the route's response-header edits; policies' response
hooks do not run on hits.

response-body (phase response): removes and renames fields of a JSON response (held back whole,
up to `max_bytes`; past it, or when the body is not JSON, see below).
"""
from __future__ import annotations

import collections
import hashlib
import time

import msgspec
import orjson

from .._core.proxy import Capture
from ..config.schema import ProxyCache, ResponseBody
from ..server.responses import CLOSE, KEEP_ALIVE
from .base import register

NO_BODY_STATUSES = (204, 304)
MAX_TTL = 365 * 86400  # the longest a response is kept, whatever it says


def head_values(head: bytes, name: bytes) -> list[bytes]:
    """The values of header `name` (lowercase) in a raw response head."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == name:
            out.append(v.strip())
    return out


def _directives(values: list[bytes]) -> dict[bytes, bytes]:
    d = {}
    for v in values:
        for part in v.split(b","):
            k, _, val = part.strip().partition(b"=")
            if k:
                d[k.lower()] = val.strip(b'"')
    return d


class Entry:
    __slots__ = ("expires", "stored", "head", "body", "vary")

    def __init__(self, expires: float, stored: float, head: bytes, body: bytes, vary: tuple):
        self.expires = expires
        self.stored = stored
        self.head = head
        self.body = body
        self.vary = vary  # ((name, request value), ...) the response's Vary named


@register(ProxyCache)
class ProxyCachePolicy:
    phase = "cache"
    now = staticmethod(time.monotonic)  # tests move the clock

    def __init__(self, cfg: ProxyCache, ctx):
        self.cfg = cfg
        self.methods = {m.encode() for m in cfg.methods}
        self.statuses = frozenset(cfg.statuses)
        self.vary_headers = tuple(h.lower().encode() for h in cfg.vary_headers)
        self.entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self.hits = self.misses = self.errors = 0
        # backend redis: entries live in Redis (shared by every worker and node), keyed per route
        self.redis = ctx.counters.backend("redis") if cfg.backend == "redis" else None
        self.scope = f"cache:{ctx.owner}|{ctx.route}:".encode()

    def _key(self, ex) -> bytes:
        parts = [b"GET" if ex.method == b"HEAD" else ex.method, ex.host, ex.path]
        if self.cfg.query:
            parts.append(ex.query)
        for h in self.vary_headers:
            parts.append(ex.header(h) or b"")
        return b"\x00".join(parts)

    def request(self, ex):
        if ex.method not in self.methods:
            return None
        if not self.cfg.cache_authenticated and (ex.consumer is not None or ex.claims is not None
                                                 or ex.header(b"authorization") is not None):
            ex.resp_extra += b"X-Cache: BYPASS\r\n"
            return None
        cc = _directives([ex.header(b"cache-control") or b""])
        if b"no-store" in cc:
            ex.resp_extra += b"X-Cache: BYPASS\r\n"
            return None
        key = self._key(ex)
        if self.redis is not None:
            return self._shared_lookup(ex, key, b"no-cache" not in cc)
        if b"no-cache" not in cc:
            entry = self.entries.get(key)
            if entry is not None:
                now = self.now()
                if entry.expires <= now:
                    del self.entries[key]
                elif all(ex.header(name) == value for name, value in entry.vary):
                    self.entries.move_to_end(key)
                    self.hits += 1
                    return self._hit(ex, entry, now)
        self.misses += 1
        ex.cache_key = key
        ex.resp_extra += b"X-Cache: MISS\r\n"
        return None

    # --- backend redis ------------------------------------------------------------------------
    def _redis_key(self, key: bytes) -> bytes:
        return self.scope + hashlib.sha256(key).hexdigest().encode()

    def _shared_lookup(self, ex, key: bytes, lookup: bool):
        ex.cache_key = key
        if not lookup:
            self.misses += 1
            ex.resp_extra += b"X-Cache: MISS\r\n"
            return None
        rkey = self._redis_key(key)
        try:
            fut = self.redis.command(rkey, b"GET", self.redis.full_key(rkey))
        except Exception:  # noqa: BLE001 - Redis down: a miss (the cache is an optimisation)
            return self._shared_miss(ex, error=True)
        return self._shared_wait(ex, fut)

    async def _shared_wait(self, ex, fut):
        try:
            blob = await fut
        except Exception:  # noqa: BLE001 - slow, down, an error reply: a miss
            return self._shared_miss(ex, error=True)
        if blob is None:
            return self._shared_miss(ex)
        try:
            stored, head, body, vary = msgspec.msgpack.decode(blob)
        except (msgspec.DecodeError, ValueError, TypeError):
            return self._shared_miss(ex, error=True)
        if not all(ex.header(name) == value for name, value in vary):
            return self._shared_miss(ex)
        self.hits += 1
        now = time.time()
        return self._hit(ex, Entry(0.0, stored, head, body, tuple(vary)), now)

    def _shared_miss(self, ex, error: bool = False):
        self.misses += 1
        self.errors += error
        ex.resp_extra += b"X-Cache: MISS\r\n"
        return None

    def _shared_store(self, key: bytes, ttl: float, vary, head: bytes, body: bytes) -> None:
        rkey = self._redis_key(key)
        blob = msgspec.msgpack.encode((time.time(), head, body, [list(v) for v in vary]))
        try:
            fut = self.redis.command(rkey, b"SET", self.redis.full_key(rkey), blob, b"PX", str(int(ttl * 1000)))
        except Exception:  # noqa: BLE001 - not stored: the next request is a miss, nothing else
            self.errors += 1
            return
        fut.add_done_callback(self._stored)

    def _stored(self, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.errors += 1

    def _hit(self, ex, entry: Entry, now: float) -> bytes:
        route = ex.route
        head = entry.head
        if route.resp_remove:
            head = b"\r\n".join([head.split(b"\r\n", 1)[0]] + [
                ln for ln in head.split(b"\r\n")[1:] if ln.partition(b":")[0].strip().lower() not in route.resp_remove])
        status = int(head[9:12])
        parts = [head, b"\r\nAge: %d\r\nX-Cache: HIT\r\nX-Request-ID: " % int(now - entry.stored), ex.request_id,
                 b"\r\n", route.resp_add, ex.resp_extra]
        if status not in NO_BODY_STATUSES:
            parts.append(b"Content-Length: %d\r\n" % len(entry.body))
        if not ex.keep_alive:
            parts.append(CLOSE)
        elif ex.version == 10:
            parts.append(KEEP_ALIVE)
        parts.append(b"\r\n")
        if not ex.head_request and status not in NO_BODY_STATUSES:
            parts.append(entry.body)
        return b"".join(parts)

    def response(self, ex, rh):
        key = ex.cache_key
        if key is None or rh.status not in self.statuses or ex.head_request:
            return
        if rh.status not in NO_BODY_STATUSES and (rh.body_mode != 1 or rh.content_length > self.cfg.max_body):
            return  # only Content-Length bodies (chunked ones stream through uncached)
        head = rh.head
        cc = _directives(head_values(head, b"cache-control"))
        if b"no-store" in cc or b"no-cache" in cc or b"private" in cc or head_values(head, b"set-cookie"):
            return
        vary_names = []
        for v in head_values(head, b"vary"):
            vary_names += [n.strip().lower() for n in v.split(b",") if n.strip()]
        if b"*" in vary_names:
            return
        ttl = self.cfg.ttl
        for d in (b"s-maxage", b"max-age"):
            if d in cc:
                try:
                    ttl = float(min(int(cc[d]), MAX_TTL))  # a 400-digit max-age: a year, not an OverflowError
                except ValueError:
                    return
                break
        if ttl <= 0:
            return
        ex.cache_key = (key, ttl, tuple((n, ex.header(n)) for n in vary_names), head.rstrip(b"\r\n"))
        if ex.capture is None:
            ex.capture = Capture(tee=True, cap=self.cfg.max_body)

    def response_end(self, ex, body: bytes):
        note = ex.cache_key
        if type(note) is not tuple:
            return None
        key, ttl, vary, head = note
        if self.redis is not None:
            self._shared_store(key, ttl, vary, head, body)
            return None
        now = self.now()
        self.entries[key] = Entry(now + ttl, now, head, body, vary)
        self.entries.move_to_end(key)
        while len(self.entries) > self.cfg.max_entries:
            self.entries.popitem(last=False)
        return None


MISSING = object()


def _compile_path(path: str) -> list[str]:
    return path.split(".")


def _remove(node, parts: list[str]) -> None:
    if not parts:
        return
    first, rest = parts[0], parts[1:]
    if first == "*":
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in list(children):
            if rest:
                _remove(child, rest)
        if not rest and isinstance(node, dict):
            node.clear()
        return
    if isinstance(node, list):
        for item in node:  # a field path applies to every item of an array on the way
            _remove(item, parts)
        return
    if not isinstance(node, dict) or first not in node:
        return
    if rest:
        _remove(node[first], rest)
    else:
        del node[first]


def _rename(node, parts: list[str], new: str) -> None:
    first, rest = parts[0], parts[1:]
    if isinstance(node, list):
        for item in node:
            _rename(item, parts, new)
        return
    if not isinstance(node, dict):
        return
    if first == "*":
        for child in list(node.values()):
            if rest:
                _rename(child, rest, new)
        return
    if first not in node:
        return
    if rest:
        _rename(node[first], rest, new)
    else:
        node[new] = node.pop(first)


@register(ResponseBody)
class ResponseBodyPolicy:
    """Holds the response back whole (up to max_bytes; past it the client gets 502
    `response_too_large`), edits JSON bodies, and passes anything that is not JSON unchanged."""

    phase = "response"

    def __init__(self, cfg: ResponseBody, ctx):
        self.cap = cfg.max_bytes
        self.removes = [_compile_path(p) for p in cfg.remove]
        self.renames = [(_compile_path(p), new) for p, new in cfg.rename.items()]

    def response(self, ex, rh):
        if ex.head_request or rh.status in NO_BODY_STATUSES or rh.status < 200:
            return
        ctype = b",".join(head_values(rh.head, b"content-type")).lower()
        if b"json" not in ctype:
            return
        ex.resp_drop = (ex.resp_drop or frozenset()) | {b"content-md5", b"etag"}  # the body changes
        if ex.capture is None or ex.capture.tee:
            ex.capture = Capture(tee=False, cap=self.cap)

    def response_end(self, ex, body: bytes):
        if ex.capture is None or ex.capture.tee or not body:
            return None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None  # said JSON, is not: passed on as it came
        for parts in self.removes:
            _remove(doc, parts)
        for parts, new in self.renames:
            _rename(doc, parts, new)
        return orjson.dumps(doc)
