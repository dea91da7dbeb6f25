"""Request and response transformation: headers, query string and path (request-transformer), and
response headers (response-transformer).

Header edits run in the order remove → rename → replace → add → append (Kong's): `rename` moves the
values of a present header to the new name (replacing it), `replace` sets a header only when it is
present, `add` only when it is absent, `append` adds one more line always.

Values are templates compiled once: `$(header.x-foo)` (the client's header; for the identity headers
X-Consumer-* the value authentication set), `$(query.bar)` (decoded), `$(consumer.username)`,
`$(consumer.id)`, `$(consumer.plan)`, `$(client_ip)`. A value whose reference is missing (no such
header, no consumer) is not set, and neither is one that would not be a valid header value.

Upstream request headers cannot be removed per exchange: every header a request-transformer may
remove or change (remove, rename's both names, replace) is dropped for the whole route when the
chain is built (`drop_request_headers`), and the request hook adds back the values that should stay
(at the end of the head). A later request-transformer on the same route reads what an earlier one
left. Response headers are removed per exchange (`ex.resp_drop`) only when an edit changes them.
"""
from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes

from .._core.headers import find_header, valid_header_value
from .._core.router import Router, parse_pattern
from ..config.schema import RequestTransformer, ResponseTransformer
from .base import IDENTITY_HEADERS, attached, register

# headers the gateway itself writes or that frame the message: never edited by a transformer
REQUEST_OWNED = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                           b"proxy-connection", b"te", b"trailer", b"upgrade", b"expect", b"x-forwarded-for",
                           b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id"))
RESPONSE_OWNED = frozenset((b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                            b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-request-id"))

# --- templates --------------------------------------------------------------------------------------
_REF = re.compile(r"\$\(([^()]*)\)")
_CONSUMER_FIELDS = ("username", "id", "plan")
QUERY_SAFE = "-._~!$'()*,;:@/?"  # RFC 3986 query characters, minus & = + #


def _ref_getter(ref: str):
    """A function ex → bytes | None for one `$(ref)`; ValueError for an unknown reference."""
    kind, dot, name = ref.strip().partition(".")
    if kind == "client_ip" and not dot:
        return lambda ex: ex.client_ip
    if kind == "header" and name:
        lname = name.lower().encode("latin-1")
        if lname in IDENTITY_HEADERS:  # only the gateway's value, never a client's copy
            def from_identity(ex, n=lname):
                for k, v in ex.up_add:
                    if k.lower() == n:
                        return v
                return None
            return from_identity
        return lambda ex: find_header(ex.headers, lname)
    if kind == "query" and name:
        def from_query(ex, n=name):
            q = ex.query
            if not q:
                return None
            for part in q.split(b"&"):
                k, _, v = part.partition(b"=")
                if _decode_name(k) == n:
                    return unquote_to_bytes(v.replace(b"+", b" "))
            return None
        return from_query
    if kind == "consumer" and name in _CONSUMER_FIELDS:
        def from_consumer(ex, attr=name):
            c = ex.consumer
            v = getattr(c, attr, None) if c is not None else None
            return v.encode() if v else None
        return from_consumer
    raise ValueError(f"unknown reference `$({ref})`: use header.NAME, query.NAME, consumer.username, "
                     "consumer.id, consumer.plan or client_ip")


class Template:
    """A value with `$(…)` references, split once into literal bytes and getters."""

    __slots__ = ("static", "parts")

    def __init__(self, text: str):
        parts: list = []
        i = 0
        for m in _REF.finditer(text):
            if m.start() > i:
                parts.append(text[i:m.start()].encode())
            parts.append(_ref_getter(m.group(1)))
            i = m.end()
        if i < len(text):
            parts.append(text[i:].encode())
        self.parts = tuple(parts)
        self.static = b"".join(parts) if all(type(p) is bytes for p in parts) else None

    def render(self, ex) -> bytes | None:
        if self.static is not None:
            return self.static
        out = []
        for p in self.parts:
            if type(p) is not bytes:
                p = p(ex)
                if p is None:
                    return None
            out.append(p)
        return b"".join(out)


def _template_issues(field: str, values: dict, header: bool) -> list[tuple[str, str, str]]:
    out = []
    for k, text in values.items():
        try:
            t = Template(text)
        except ValueError as exc:
            out.append((f"{field}.{k}", str(exc), "e.g. $(header.x-user) or $(consumer.username)"))
            continue
        literal = b"".join(p for p in t.parts if type(p) is bytes)
        if header and not valid_header_value(literal):
            out.append((f"{field}.{k}", "not a valid header value (control characters)", "one line of text"))
    return out


def _owned_issues(fields: dict, owned: frozenset, what: str) -> list[tuple[str, str, str]]:
    out = []
    for field, names in fields.items():
        for n in names:
            ln = n.lower().encode("latin-1")
            if ln in owned:
                out.append((f"{field}.{n}" if field != "remove" else "remove", f"`{n}` is set by the gateway "
                            f"and cannot be changed by a {what}", "use another header"))
            elif what == "request-transformer" and ln in IDENTITY_HEADERS:
                out.append((f"{field}.{n}" if field != "remove" else "remove", f"`{n}` is an identity header: "
                            "only authentication sets it", "read it with $(header.…) and copy it elsewhere"))
    return out


def _decode_name(raw: bytes) -> str:
    """A query parameter name as decoded text (`+` is a space)."""
    if b"%" in raw or b"+" in raw:
        return unquote(raw.decode("latin-1").replace("+", " "))
    return raw.decode("latin-1")


def _enc(text_or_bytes) -> bytes:
    b = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return quote_from_bytes(b, safe=QUERY_SAFE).encode("ascii")


# --- shared header edits -------------------------------------------------------------------------------
class HeaderEdits:
    """Compiled header edits; `apply(state, ex)` edits {lowercase name: [(name, value)]} in place."""

    __slots__ = ("remove", "rename", "replace", "add", "append", "managed", "touched")

    def __init__(self, cfg):
        def low(n: str) -> bytes:
            return n.lower().encode("latin-1")

        self.remove = tuple(low(n) for n in cfg.remove)
        self.rename = tuple((low(o), low(n), n.encode("latin-1")) for o, n in cfg.rename.items())
        self.replace = tuple((low(n), n.encode("latin-1"), Template(v)) for n, v in cfg.replace.items())
        self.add = tuple((low(n), n.encode("latin-1"), Template(v)) for n, v in cfg.add.items())
        self.append = tuple((low(n), n.encode("latin-1"), Template(v)) for n, v in cfg.append.items())
        # names whose present values an edit may remove or change
        self.managed = frozenset(self.remove) | {o for o, _, _ in self.rename} | {n for _, n, _ in self.rename} \
            | {n for n, _, _ in self.replace}
        touched = dict.fromkeys(self.managed)
        touched.update(dict.fromkeys(n for n, _, _ in self.add + self.append))
        self.touched = tuple(touched)

    def __bool__(self) -> bool:
        return bool(self.touched)

    def apply(self, state: dict, ex) -> None:
        for n in self.remove:
            state[n] = []
        for old, new, new_name in self.rename:
            if state[old]:
                state[new] = [(new_name, v) for _, v in state[old]]
                state[old] = []
        for n, name, t in self.replace:
            if state[n]:
                v = t.render(ex)
                if v is not None and valid_header_value(v):
                    state[n] = [(name, v)]
        for n, name, t in self.add:
            if not state[n]:
                v = t.render(ex)
                if v is not None and valid_header_value(v):
                    state[n] = [(name, v)]
        for n, name, t in self.append:
            v = t.render(ex)
            if v is not None and valid_header_value(v):
                state[n].append((name, v))


# --- request-transformer -----------------------------------------------------------------------------
_ROUTES: list = [None, {}]  # [the config indexed last, {route name: (route, api)}]


def _route_of(ctx):
    cfg = ctx.config
    if cfg is None:
        return None
    if _ROUTES[0] is not cfg:
        from ..config.load import all_routes

        _ROUTES[0], _ROUTES[1] = cfg, {r.name: (r, api) for _p, r, api, _v in all_routes(cfg)}
    return _ROUTES[1].get(ctx.route)


def _path_issues(path: str | None) -> list[tuple[str, str, str]]:
    if path is None:
        return []
    if not path.startswith("/") or any(c in path for c in " ?#\r\n\t") or path.count("{") != path.count("}"):
        return [("path", f"not a path template: `{path}`", "e.g. /v2/items or /v2/items/{id} (route params)")]
    return []


@register(RequestTransformer)
class RequestTransformerPolicy:
    """Header, query and path edits for the upstream request (see the module doc)."""

    phase = "request"
    __slots__ = ("edits", "inherited", "drop_request_headers", "q_remove", "q_rename", "q_replace", "q_add",
                 "path", "router", "path_parts")

    @staticmethod
    def check(cfg: RequestTransformer) -> list[tuple[str, str, str]]:
        out = _owned_issues({"remove": cfg.remove, "rename": list(cfg.rename) + list(cfg.rename.values()),
                             "replace": cfg.replace, "add": cfg.add, "append": cfg.append},
                            REQUEST_OWNED, "request-transformer")
        for field in ("add", "replace", "append"):
            out += _template_issues(field, getattr(cfg, field), header=True)
        if cfg.query is not None:
            out += _template_issues("query.add", cfg.query.add, header=False)
            out += _template_issues("query.replace", cfg.query.replace, header=False)
        return out + _path_issues(cfg.path)

    def __init__(self, cfg: RequestTransformer, ctx=None):
        self.edits = HeaderEdits(cfg)
        owner = ctx.owner if ctx is not None else ""
        if self.edits.managed and owner.startswith(("consumer:", "plan:")):
            raise ValueError("request-transformer: remove, rename and replace need the route's header set; "
                             "attach it to a route, an API or globally (consumers and plans: add, append, query)")
        self.drop_request_headers = self.edits.managed
        # names an earlier request-transformer of this route manages: read what it left (in up_add)
        self.inherited = frozenset()
        found = _route_of(ctx) if ctx is not None else None
        if found is not None and self.edits.managed:
            pairs = attached(ctx.config, found[1], found[0])
            owners = [o for o, _ in pairs]
            if owner in owners:
                earlier = set()
                for _o, p in pairs[:owners.index(owner)]:
                    if isinstance(p, RequestTransformer):
                        earlier |= HeaderEdits(p).managed
                self.inherited = frozenset(earlier)
        q = cfg.query
        self.q_remove = frozenset(q.remove) if q else frozenset()
        self.q_rename = {o: _enc(n) for o, n in q.rename.items()} if q else {}
        self.q_replace = tuple((k, _enc(k), Template(v)) for k, v in q.replace.items()) if q else ()
        self.q_add = tuple((k, _enc(k), Template(v)) for k, v in q.add.items()) if q else ()
        self.path = None
        self.router = None
        self.path_parts = ()
        if cfg.path is not None:
            self._compile_path(cfg.path, found)

    def _compile_path(self, template: str, found) -> None:
        parts, i = [], 0
        while (j := template.find("{", i)) >= 0:
            k = template.find("}", j)
            parts += [template[i:j].encode(), template[j + 1:k].rstrip("*") or "*"]
            i = k + 1
        parts.append(template[i:].encode())
        parts = [p for p in parts if p != b""]
        names = [p for p in parts if type(p) is str]
        if not names:
            self.path = b"".join(parts)
            return
        if found is None:
            raise ValueError(f"request-transformer path `{template}` uses route parameters: attach it to a route "
                             "(or an API) whose paths have them")
        route, api = found
        base = api.base_path if api is not None else ""
        entries, per_pattern = [], []
        for idx, pat in enumerate(route.paths):
            pnames = parse_pattern(base + pat)
            missing = [n for n in names if n not in pnames]
            if missing:
                raise ValueError(f"request-transformer path `{template}`: `{{{missing[0]}}}` is not a parameter "
                                 f"of route {route.name!r} path `{pat}`")
            per_pattern.append(tuple(p if type(p) is bytes else pnames.index(p) for p in parts))
            entries.append((None, (), base + pat, 0, idx))
        self.router = Router(entries)
        self.path_parts = tuple(per_pattern)

    def request(self, ex):
        if self.edits:
            self._headers(ex)
        if ex.target_path and (self.path is not None or self.router is not None):
            self._path(ex)
        if ex.target_path and (self.q_remove or self.q_rename or self.q_replace or self.q_add):
            self._query(ex)
        return None

    def _headers(self, ex) -> None:
        edits = self.edits
        managed = edits.managed
        route_drop = ex.route.req_drop
        up = ex.up_add
        state, initial = {}, {}
        for n in edits.touched:
            from_client = (n not in self.inherited) if n in managed else (n not in route_drop)
            vals = [(k, v) for k, v in ex.headers if len(k) == len(n) and k.lower() == n] if from_client else []
            if up:
                vals += [(k, v) for k, v in up if k.lower() == n]
            state[n] = vals
            initial[n] = len(vals)
        edits.apply(state, ex)
        if up and managed:
            up = tuple(p for p in up if p[0].lower() not in managed)
        added = []
        for n, vals in state.items():
            added += vals if n in managed else vals[initial[n]:]
        ex.up_add = up + tuple(added)

    def _path(self, ex) -> None:
        if self.router is None:
            new = self.path
        else:
            found = self.router.match(ex.method, b"", ex.path)
            if found is None:
                return
            idx, params = found
            new = b"".join(p if type(p) is bytes else params[p] for p in self.path_parts[idx])
        _, sep, query = ex.target_path.partition(b"?")
        ex.target_path = new + sep + query

    def _query(self, ex) -> None:
        target, _, query = ex.target_path.partition(b"?")
        parts = query.split(b"&") if query else []
        keys = [_decode_name(p.partition(b"=")[0]) for p in parts]
        if self.q_remove:
            kept = [i for i, k in enumerate(keys) if k not in self.q_remove]
            parts, keys = [parts[i] for i in kept], [keys[i] for i in kept]
        if self.q_rename:
            for i, k in enumerate(keys):
                new = self.q_rename.get(k)
                if new is not None:
                    _, eq, v = parts[i].partition(b"=")
                    parts[i] = new + eq + v
                    keys[i] = unquote(new.decode("ascii"))
        for k, enc_k, t in self.q_replace:
            where = [i for i, kk in enumerate(keys) if kk == k]
            if where:
                v = t.render(ex)
                if v is not None:
                    parts[where[0]] = enc_k + b"=" + _enc(v)
                    for i in reversed(where[1:]):
                        del parts[i], keys[i]
        for k, enc_k, t in self.q_add:
            if k not in keys:
                v = t.render(ex)
                if v is not None:
                    parts.append(enc_k + b"=" + _enc(v))
                    keys.append(k)
        ex.target_path = target + b"?" + b"&".join(parts) if parts else target


# --- response-transformer ----------------------------------------------------------------------------
@register(ResponseTransformer)
class ResponseTransformerPolicy:
    """Header edits on the upstream's response head (mock and gateway answers are not edited)."""

    phase = "response"
    __slots__ = ("edits",)

    @staticmethod
    def check(cfg: ResponseTransformer) -> list[tuple[str, str, str]]:
        out = _owned_issues({"remove": cfg.remove, "rename": list(cfg.rename) + list(cfg.rename.values()),
                             "replace": cfg.replace, "add": cfg.add, "append": cfg.append},
                            RESPONSE_OWNED, "response-transformer")
        for field in ("add", "replace", "append"):
            out += _template_issues(field, getattr(cfg, field), header=True)
        return out

    def __init__(self, cfg: ResponseTransformer, ctx=None):
        self.edits = HeaderEdits(cfg)

    def response(self, ex, rh) -> None:
        edits = self.edits
        touched = edits.touched
        state: dict = {n: [] for n in touched}
        for line in rh.head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                n = name.strip().lower()
                if n in state:
                    state[n].append((name.strip(), value.strip()))
        initial = {n: list(v) for n, v in state.items()}
        edits.apply(state, ex)
        drop = set()
        lines = []
        for n, vals in state.items():
            before = initial[n]
            if vals == before:
                continue
            if n in edits.managed and vals[:len(before)] != before:
                drop.add(n)
                lines += vals
            else:
                lines += vals[len(before):]
        if drop:
            ex.resp_drop = (ex.resp_drop or frozenset()) | drop
        if lines:
            ex.resp_extra += b"".join(b"%s: %s\r\n" % nv for nv in lines)
