"""Access policies: who may call (real-ip, ip-restriction, user-agent), browsers (cors), body size
(request-size) and fixed answers (request-termination). All run in the `access` phase, before
authentication, and decide without a coroutine.

Addresses are compared as integers: each CIDR list is compiled once into sorted, merged ranges per
family, and a client address is parsed with inet_pton (cached per address string). An IPv4-mapped
IPv6 address (::ffff:1.2.3.4, what a dual-stack socket reports) is the IPv4 address, and a rule
inside ::ffff:0:0/96 is the IPv4 rule.

Ordering: real-ip sets `ex.client_ip`, which ip-restriction and the limits read. It is an access
policy like them, so within the phase declaration order counts (global → API → route, then the
order written). Declare real-ip globally or first; an ip-restriction that a real-ip of its chain
would follow applies that real-ip itself first (it is a pure function of the TCP peer and the
header), so the order cannot let a spoofable peer through.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from bisect import bisect_right

import orjson

from ..config.schema import Cors, IpRestriction, RealIp, RequestSize, RequestTermination, UserAgent
from ..server.responses import CLOSE, KEEP_ALIVE, status_line
from .base import attached, register

# --- addresses --------------------------------------------------------------------------------------
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def parse_ip(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an int), an IPv4-mapped IPv6 address as IPv4; None if it is not one.
    A zone (`fe80::1%eth0`) is ignored."""
    try:
        if ":" in text:
            if "%" in text:
                text = text.partition("%")[0]
            n = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
            if n >> 32 == 0xFFFF:
                return 4, n & 0xFFFFFFFF
            return 6, n
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):  # UnicodeError and an embedded NUL are ValueErrors
        return None


def format_ip(addr: tuple[int, int]) -> str:
    fam, n = addr
    return socket.inet_ntop(_AF[fam], n.to_bytes(4 if fam == 4 else 16, "big"))


_CACHE: dict[bytes, tuple[int, int] | None] = {}


def client_addr(ip: bytes) -> tuple[int, int] | None:
    """`parse_ip` of an `ex.client_ip`, cached: a request's policies parse its address once."""
    try:
        return _CACHE[ip]
    except KeyError:
        pass
    if len(_CACHE) >= 4096:
        _CACHE.clear()
    try:
        addr = parse_ip(ip.decode("ascii"))
    except UnicodeDecodeError:
        addr = None
    _CACHE[ip] = addr
    return addr


def parse_cidr(text: str) -> tuple[int, int, int]:
    """(family, first, last) of a CIDR or a single address; ValueError says what is wrong.
    Host bits set (10.0.0.1/8) is an error: it is usually a typo for a host or for the network."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if net.version == 6 and net.subnet_of(_MAPPED):
        first = int(net.network_address) & 0xFFFFFFFF
        return 4, first, first + net.num_addresses - 1
    first = int(net.network_address)
    return net.version, first, first + net.num_addresses - 1


def cidr_issues(field: str, values: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for i, text in enumerate(values):
        try:
            parse_cidr(text)
        except ValueError as exc:
            hint = "e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32"
            try:
                hint = f"did you mean {ipaddress.ip_network(text.strip(), strict=False)}?"
            except ValueError:
                pass
            out.append((f"{field}[{i}]", f"not an IP network: `{text}` ({exc})", hint))
    return out


class CidrSet:
    """Networks as sorted, merged [first, last] ranges per family; `addr in set` is a bisect."""

    __slots__ = ("ranges",)

    def __init__(self, cidrs):
        by_fam: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for text in cidrs:
            fam, first, last = parse_cidr(text)
            by_fam[fam].append((first, last))
        self.ranges = {}
        for fam, spans in by_fam.items():
            merged: list[list[int]] = []
            for first, last in sorted(spans):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            self.ranges[fam] = ([a for a, _ in merged], [b for _, b in merged])

    def __contains__(self, addr) -> bool:
        if addr is None:
            return False
        starts, ends = self.ranges[addr[0]]
        i = bisect_right(starts, addr[1]) - 1
        return i >= 0 and addr[1] <= ends[i]

    def __bool__(self) -> bool:
        return any(starts for starts, _ in self.ranges.values())


# --- local responses --------------------------------------------------------------------------------
def local_response(ex, status: int, headers: bytes = b"", body: bytes = b"") -> bytes:
    """A complete response the gateway writes itself, as a mock would be (route response headers,
    what earlier policies added to ex.resp_extra, no body for HEAD, 204 and 304)."""
    parts = [status_line(status), ex.proto.date, b"X-Request-ID: ", ex.request_id, b"\r\n", ex.route.resp_add,
             ex.resp_extra, headers]
    if status not in (204, 304):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if not ex.keep_alive:
        parts.append(CLOSE)
    elif ex.version == 10:
        parts.append(KEEP_ALIVE)
    parts.append(b"\r\n")
    if body and not ex.head_request and status not in (204, 304):
        parts.append(body)
    return b"".join(parts)


# --- real-ip ---------------------------------------------------------------------------------------
def _host_of(item: bytes, forwarded: bool) -> str | None:
    """The address text in one list element: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:443`, or for
    Forwarded `for="[2001:db8::1]:443";proto=https`."""
    s = item.strip()
    if forwarded:
        for part in s.split(b";"):
            k, _, v = part.partition(b"=")
            if k.strip().lower() == b"for":
                s = v.strip().strip(b'"')
                break
        else:
            return None
    if s.startswith(b"["):
        end = s.find(b"]")
        if end < 0:
            return None
        s = s[1:end]
    elif s.count(b":") == 1:
        s = s.partition(b":")[0]
    try:
        return s.decode("ascii")
    except UnicodeDecodeError:
        return None


def real_client(trusted: CidrSet, header: bytes, recursive: bool, ex) -> bytes | None:
    """Who the client is when the TCP peer is trusted (nginx realip): the rightmost address of the
    header's list (all its fields, in order) that is not trusted, with `recursive`; else the rightmost.
    None: keep the peer (not trusted, no header, or a malformed element on the way)."""
    if client_addr(ex.proto.client_ip) not in trusted:
        return None
    values = [v for k, v in ex.headers if len(k) == len(header) and k.lower() == header]
    if not values:
        return None
    forwarded = header == b"forwarded"
    chosen = None
    for item in reversed(b",".join(values).split(b",")):
        text = _host_of(item, forwarded)
        addr = parse_ip(text) if text else None
        if addr is None:
            return None
        chosen = addr
        if not recursive or addr not in trusted:
            break
    return format_ip(chosen).encode() if chosen is not None else None


@register(RealIp)
class RealIpPolicy:
    """Sets `ex.client_ip` (what ip-restriction, rate limits keyed by ip and the logs see)."""

    phase = "access"
    __slots__ = ("trusted", "header", "recursive")
    check = staticmethod(lambda cfg: cidr_issues("trusted", cfg.trusted))

    def __init__(self, cfg: RealIp, ctx=None):
        self.trusted = CidrSet(cfg.trusted)
        self.header = cfg.header.lower().encode()
        self.recursive = cfg.recursive

    def request(self, ex):
        ip = real_client(self.trusted, self.header, self.recursive, ex)
        if ip is not None:
            ex.client_ip = ip
        return None


# --- ip-restriction ---------------------------------------------------------------------------------
_ROUTES: list = [None, {}]  # [the config indexed last, {route name: (route, api)}]


def _real_ips_after(ctx) -> list[RealIp]:
    """The real-ip policies that come after the one being built in its route's chain (same phase)."""
    cfg = ctx.config
    if cfg is None or not ctx.owner:
        return []
    if _ROUTES[0] is not cfg:
        from ..config.load import all_routes

        _ROUTES[0], _ROUTES[1] = cfg, {r.name: (r, api) for _p, r, api, _v in all_routes(cfg)}
    found = _ROUTES[1].get(ctx.route)
    if found is None:
        return []
    pairs = attached(cfg, found[1], found[0])
    owners = [o for o, _ in pairs]
    if ctx.owner not in owners:
        return []
    return [p for _o, p in pairs[owners.index(ctx.owner) + 1:] if isinstance(p, RealIp)]


@register(IpRestriction)
class IpRestrictionPolicy:
    phase = "access"
    __slots__ = ("allow", "deny", "status", "fields", "before")

    @staticmethod
    def check(cfg: IpRestriction) -> list[tuple[str, str, str]]:
        return cidr_issues("allow", cfg.allow) + cidr_issues("deny", cfg.deny)

    def __init__(self, cfg: IpRestriction, ctx=None):
        self.allow = CidrSet(cfg.allow) if cfg.allow else None
        self.deny = CidrSet(cfg.deny)
        self.status = cfg.status
        self.fields = {"message": cfg.message} if cfg.message else {}
        # a real-ip declared after this policy in the same chain: apply it first (see the module doc)
        self.before = tuple(RealIpPolicy(r) for r in _real_ips_after(ctx)) if ctx is not None else ()

    def request(self, ex):
        for p in self.before:
            p.request(ex)
        addr = client_addr(ex.client_ip)
        if addr in self.deny or (self.allow is not None and addr not in self.allow):
            return ex.reply(self.status, "ip_forbidden", **self.fields)
        return None


# --- user-agent -------------------------------------------------------------------------------------
def _regex_issues(field: str, patterns: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for i, pat in enumerate(patterns):
        try:
            re.compile(pat)
        except re.error as exc:
            out.append((f"{field}[{i}]", f"not a regular expression: `{pat}` ({exc})",
                        "Python `re` syntax; (?i) for case-insensitive"))
    return out


class _AnyOf:
    """Patterns compiled one by one (each may carry its own global flags, like `(?i)`)."""

    __slots__ = ("searches",)

    def __init__(self, patterns: list[str]):
        self.searches = tuple(re.compile(p).search for p in patterns)

    def search(self, text: str) -> bool:
        return any(s(text) for s in self.searches)


def _any_of(patterns: list[str]):
    return _AnyOf(patterns) if patterns else None


@register(UserAgent)
class UserAgentPolicy:
    """`allow` matches pass; then `deny` matches are refused; with `allow` only, the rest are refused.
    A request without User-Agent is matched as the empty string."""

    phase = "access"
    __slots__ = ("allow", "deny", "status", "allow_only")

    @staticmethod
    def check(cfg: UserAgent) -> list[tuple[str, str, str]]:
        return _regex_issues("allow", cfg.allow) + _regex_issues("deny", cfg.deny)

    def __init__(self, cfg: UserAgent, ctx=None):
        self.allow = _any_of(cfg.allow)
        self.deny = _any_of(cfg.deny)
        self.allow_only = not cfg.deny
        self.status = cfg.status

    def request(self, ex):
        ua = (ex.header(b"user-agent") or b"").decode("latin-1")
        if self.allow is not None and self.allow.search(ua):
            return None
        if self.allow_only or self.deny.search(ua):
            return ex.reply(self.status, "user_agent_forbidden")
        return None


# --- request-termination ----------------------------------------------------------------------------
@register(RequestTermination)
class RequestTerminationPolicy:
    phase = "access"
    __slots__ = ("status", "head", "body")

    def __init__(self, cfg: RequestTermination, ctx=None):
        from ..server.responses import REASONS

        if cfg.body is not None:
            body, ctype = cfg.body.encode(), cfg.content_type or "text/plain; charset=utf-8"
        elif cfg.status in (204, 304):
            body, ctype = b"", None
        else:
            doc = cfg.json if cfg.json is not None else {"message": REASONS.get(cfg.status, "terminated")}
            body, ctype = orjson.dumps(doc), cfg.content_type or "application/json"
        self.status = cfg.status
        self.head = f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        self.body = body

    def request(self, ex):
        return local_response(ex, self.status, self.head, self.body)


# --- request-size -----------------------------------------------------------------------------------
@register(RequestSize)
class RequestSizePolicy:
    """A declared Content-Length above `max_bytes` is refused (413) before a byte of the body is read.
    A chunked body has no declared length: `chunked: buffer` buffers the route's bodies up to max_bytes
    (the gateway answers 413 as soon as it reads past it, and forwards a body only once it is whole,
    like nginx's proxy_request_buffering); `chunked: reject` answers 411 and keeps bodies streaming."""

    phase = "access"
    __slots__ = ("max_bytes", "body_limit", "request_body", "reject_chunked")

    def __init__(self, cfg: RequestSize, ctx=None):
        self.max_bytes = cfg.max_bytes
        self.reject_chunked = cfg.chunked == "reject"
        self.body_limit = cfg.max_bytes
        self.request_body = None if self.reject_chunked else self._whole_body

    def request(self, ex):
        if ex.content_length > self.max_bytes:
            return ex.reply(413, "body_too_large", max_bytes=self.max_bytes)
        if ex.body_mode == 2 and self.reject_chunked:
            return ex.reply(411, "length_required")
        return None

    @staticmethod
    def _whole_body(ex, body: bytes):
        return None  # the gateway enforced body_limit while reading it


# --- cors -------------------------------------------------------------------------------------------
def _split_origin(origin: str) -> tuple[str, str, str] | None:
    """(scheme, host, port or "") of `scheme://host[:port]`, lowercased; None if it is not that."""
    scheme, sep, rest = origin.lower().partition("://")
    if not sep or not scheme or not rest or "/" in rest:
        return None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            return None
        host, port = rest[: end + 1], rest[end + 1:]
        if port and not port.startswith(":"):
            return None
        port = port[1:]
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        return None
    return scheme, host, port


def _origin_pattern(text: str):
    """`*`, an exact origin, or a wildcard `[scheme://]*.domain[:port]` → (scheme|None, suffix, port)."""
    if text == "*":
        return "*"
    if text == "null":
        return "null"
    if "://" not in text:
        if not text.startswith("*."):
            raise ValueError("an origin is scheme://host[:port]; a pattern is *.example.com")
        text = "any://" + text
    parts = _split_origin(text)
    if parts is None:
        raise ValueError("an origin is scheme://host[:port], with no path")
    scheme, host, port = parts
    if "*" in host:
        if not host.startswith("*.") or "*" in host[2:] or len(host) < 4:
            raise ValueError("a wildcard is a leading `*.` label: *.example.com")
        return (None if scheme == "any" else scheme, host[1:], port)
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _origin_issues(cfg: Cors) -> list[tuple[str, str, str]]:
    out = []
    for i, text in enumerate(cfg.origins):
        try:
            _origin_pattern(text)
        except ValueError as exc:
            out.append((f"origins[{i}]", f"`{text}`: {exc}", "e.g. https://app.example.com, *.example.com or *"))
    return out


@register(Cors)
class CorsPolicy:
    """Preflights (OPTIONS with Origin and Access-Control-Request-Method) are answered here with 204 and
    never forwarded; other requests from an allowed origin get Access-Control-Allow-Origin (the origin
    echoed, with `Vary: Origin`) on whatever answers them. A disallowed origin gets no CORS headers:
    its request is still forwarded, the browser withholds the response."""

    phase = "access"
    __slots__ = ("any", "exact", "wild", "star", "vary", "preflight_fixed", "allow_headers", "actual_fixed",
                 "_seen")

    check = staticmethod(_origin_issues)

    def __init__(self, cfg: Cors, ctx=None):
        patterns = [_origin_pattern(o) for o in cfg.origins]
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if isinstance(p, str) and p != "*")
        self.wild = tuple(p for p in patterns if isinstance(p, tuple))
        # `*` without credentials: the literal `*`, the same for every origin (no Vary needed)
        self.star = self.any and not cfg.credentials
        self.vary = b"" if self.star else b"Vary: Origin\r\n"
        creds = b"Access-Control-Allow-Credentials: true\r\n" if cfg.credentials else b""
        fixed = b"Access-Control-Allow-Methods: " + ", ".join(dict.fromkeys(cfg.methods)).encode() + b"\r\n" + creds
        if cfg.max_age is not None:
            fixed += b"Access-Control-Max-Age: %d\r\n" % cfg.max_age
        self.preflight_fixed = fixed
        self.allow_headers = (None if cfg.headers is None else
                              b"Access-Control-Allow-Headers: " + ", ".join(cfg.headers).encode() + b"\r\n"
                              if cfg.headers else b"")
        actual = creds
        if cfg.expose_headers:
            actual += b"Access-Control-Expose-Headers: " + ", ".join(cfg.expose_headers).encode() + b"\r\n"
        self.actual_fixed = actual
        self._seen: dict[bytes, bool] = {}

    def allowed(self, origin: bytes) -> bool:
        seen = self._seen
        ok = seen.get(origin)
        if ok is None:
            ok = self._match(origin)
            if len(seen) >= 1024:
                seen.clear()
            seen[origin] = ok
        return ok

    def _match(self, origin: bytes) -> bool:
        if self.any:
            return True
        try:
            text = origin.decode("ascii")
        except UnicodeDecodeError:
            return False
        if text == "null":
            return "null" in self.exact
        parts = _split_origin(text)
        if parts is None:
            return False
        scheme, host, port = parts
        if f"{scheme}://{host}" + (f":{port}" if port else "") in self.exact:
            return True
        for w_scheme, suffix, w_port in self.wild:
            if (w_scheme is None or w_scheme == scheme) and w_port == port and host.endswith(suffix):
                return True
        return False

    def _allow_origin(self, origin: bytes) -> bytes:
        return b"Access-Control-Allow-Origin: " + (b"*" if self.star else origin) + b"\r\n"

    def request(self, ex):
        origin = ex.header(b"origin")
        if origin is None:
            if self.vary:
                ex.resp_extra += self.vary
            return None
        ok = self.allowed(origin)
        if ex.method == b"OPTIONS":
            want = ex.header(b"access-control-request-method")
            if want is not None:
                return self._preflight(ex, origin, ok)
        if ok:
            ex.resp_extra += self._allow_origin(origin) + self.vary + self.actual_fixed
        elif self.vary:
            ex.resp_extra += self.vary
        return None

    def _preflight(self, ex, origin: bytes, ok: bool) -> bytes:
        vary = b"" if self.star else b"Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers\r\n"
        if not ok:
            return local_response(ex, 204, vary)
        allow_headers = self.allow_headers
        if allow_headers is None:  # echo what the browser asks for (header names only)
            asked = ex.header(b"access-control-request-headers")
            allow_headers = b""
            if asked is not None:
                names = [n.strip() for n in asked.split(b",") if n.strip()]
                if names and all(_TOKEN.fullmatch(n) for n in names):
                    allow_headers = b"Access-Control-Allow-Headers: " + b", ".join(names) + b"\r\n"
        return local_response(ex, 204, self._allow_origin(origin) + vary + self.preflight_fixed + allow_headers)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
