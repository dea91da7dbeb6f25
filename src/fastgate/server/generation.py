"""Compile a validated Config once into a Generation: router, routes, upstream groups.

Workers swap whole generations on reload; nothing here is consulted
from the config per request.
"""
from __future__ import annotations

import logging

import orjson

from .._core.balance import BALANCERS, HASH_ON, Health, UpstreamCore
from .._core.proxy import RouteCore, RouterValue, Target
from .._core.router import Router, parse_pattern
from ..config.load import all_routes, split_address
from ..config.schema import Config, RequestHeaders, ResponseHeaders
from ..control.directory import Directory
from ..metrics import RouteStats
from ..policies.base import NO_POLICIES
from .canary import Canary
from .health import run_active_checks
from .responses import status_line

log = logging.getLogger("fastgate.generation")


class UpstreamGroup(UpstreamCore):
    """An upstream: its targets, balancer and timeouts (typed in UpstreamCore, which the data plane
    reads in C) and its active health checks."""

    __slots__ = ("active", "_task")

    def __init__(self, cfg):
        self.name = cfg.name
        self.targets = []
        for t in cfg.targets:
            host, port = split_address(t.address)
            host_header = (cfg.host_header or t.address).encode()
            health = Health(t.address, cfg.health.passive, cfg.circuit_breaker)
            self.targets.append(Target(t.address, host, port, t.weight, cfg.pool, health, host_header))
        self.balancer = BALANCERS[cfg.balancer](self.targets)
        self.hash_on = HASH_ON[cfg.hash_on] if cfg.balancer == "consistent_hash" else -1
        self.hash_key = (cfg.hash_key or "").lower().encode()
        self.connect_timeout = cfg.timeouts.connect
        self.read_timeout = cfg.timeouts.read
        self.write_timeout = cfg.timeouts.write
        self.total_timeout = cfg.timeouts.total
        self.retries = cfg.retries
        self.active = cfg.health.active
        self._task = None

    def start(self, loop) -> None:
        if self.active is not None and self._task is None:
            self._task = loop.create_task(run_active_checks(self, self.active))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for t in self.targets:
            t.close_all()

    def snapshot(self, now: float) -> dict:
        return {"name": self.name, "targets": [t.health.snapshot(now) for t in self.targets]}


class CompiledRoute(RouteCore):
    """A route as the data plane serves it (fields typed in RouteCore, read in C)."""

    __slots__ = ()

    def __init__(self, r, group, mock, req_drop, req_add, resp_add, resp_remove, api=None, version=None,
                 stats=None):
        self.chain = NO_POLICIES  # the route's compiled policies (policies/base.py)
        self.stats = stats if stats is not None else RouteStats(r.name)  # this worker's counts for /metrics (metrics.py)
        self.name = r.name
        self.group = group
        self.mock = mock  # (head bytes without Date/Connection, body bytes) or None
        self.preserve_host = r.preserve_host
        self.req_drop = req_drop
        self.req_add = req_add
        self.resp_add = resp_add
        self.resp_remove = resp_remove
        self.api = api
        self.version = version
        self.canary = None  # server/canary.Canary: part of the traffic to another upstream


class Binding(RouterValue):
    """The router's value for one (route, path pattern): how to build the upstream path (route,
    plain and switch, which is False here, are RouterValue's typed fields)."""

    __slots__ = ("names", "strip", "rewrite")

    def __init__(self, route: CompiledRoute, pattern: str, strip_path: bool, rewrite: str | None):
        self.switch = False  # a VersionSwitch stands in the router's place of a Binding: the protocol asks this
        self.route = route
        self.names = parse_pattern(pattern)
        self.strip = b""
        if strip_path:
            static = pattern.split("{", 1)[0].split("*", 1)[0]
            self.strip = static.rstrip("/").encode()
        self.rewrite = _compile_template(rewrite, self.names) if rewrite else None
        self.plain = self.rewrite is None and not self.strip  # the upstream path is the request's

    def upstream_path(self, path: bytes, params: tuple) -> bytes:
        if self.rewrite is not None:
            return b"".join(p if isinstance(p, bytes) else params[p] for p in self.rewrite)
        if self.strip:
            path = path[len(self.strip):]
            if not path.startswith(b"/"):
                path = b"/" + path
        return path


class VersionSwitch(RouterValue):
    """The router's value for every path pattern of an API whose versions share paths: the request
    names a version in a header or a query parameter (`version_by`; none: the default version), and
    that version's own router — its routes only — matches the request. So versions may use
    different or overlapping patterns (v1 `/*`, v2 `/{id}`): each is matched as if alone."""

    __slots__ = ("api", "by_header", "key", "default", "entries", "routers")

    def __init__(self, api, default: str | None):
        self.switch = True
        self.api = api.name
        self.by_header = api.version_by == "header"
        self.key = (api.version_key or ("Api-Version" if self.by_header else "version")).lower().encode()
        self.default = default.encode() if default is not None else None
        self.entries: dict[bytes, list] = {}  # version → router entries, until `compile`
        self.routers: dict[bytes, Router] = {}

    def add(self, version: str, entry: tuple) -> None:
        self.entries.setdefault(version.encode(), []).append(entry)

    def compile(self) -> None:
        self.routers = {v: Router(entries) for v, entries in self.entries.items()}
        self.entries = {}

    def requested(self, headers, query: bytes) -> bytes | None:
        if self.by_header:
            key = self.key
            for k, v in headers:
                if len(k) == len(key) and k.lower() == key:
                    return v.strip(b" \t")
            return None
        if query:
            key = self.key + b"="
            for part in query.split(b"&"):
                if part.startswith(key):
                    return part[len(key):]
        return None

    def select(self, method: bytes, host: bytes, path: bytes, headers, query: bytes):
        """(Binding, params) in the version asked for (or the default), or the error to answer 404 with."""
        asked = self.requested(headers, query)
        router = self.routers.get(asked if asked is not None else self.default)
        if router is None:
            return "no_route" if asked is None else "unknown_api_version"
        return router.match(method, host, path) or "no_route"


def _successor(api, ver) -> str:
    """Where a deprecated or retired version's successor lives, for Link and the 410 document."""
    if api.version_by == "query":
        key = api.version_key or "version"
        return f"{api.base_path or '/'}?{key}={ver.successor}"
    if api.version_by == "header":
        return api.base_path or "/"
    return f"{api.base_path}/{ver.successor}"


def _default_version(api) -> str | None:
    if api.default_version is not None:
        return api.default_version
    for state in ("published", "deprecated"):
        for ver in reversed(api.versions):
            if ver.state == state:
                return ver.version
    return None


def _compile_template(template: str, names: tuple) -> list:
    parts, i = [], 0
    while True:
        j = template.find("{", i)
        if j < 0:
            parts.append(template[i:].encode())
            break
        k = template.find("}", j)
        parts.append(template[i:j].encode())
        name = template[j + 1 : k].rstrip("*") or "*"
        parts.append(names.index(name))
        i = k + 1
    return [p for p in parts if p != b""]


def _mock_response(m) -> tuple[bytes, bytes]:
    headers = {k.lower(): (k, v) for k, v in m.headers.items()}
    status = m.status
    if m.openapi is not None:  # resolved here, once per generation (`fastgate check` ran the same code)
        from ..openapi_examples import example_response
        from ..policies.openapi import SpecError

        o = m.openapi
        try:
            ex = example_response(o.spec, o.operation, o.status, o.example, o.media_type)
        except SpecError as exc:
            raise ValueError(f"mock.openapi: {exc}") from None
        status, body = ex.status, ex.body
        if ex.media_type is not None:
            headers.setdefault("content-type", ("Content-Type", ex.media_type))
    elif m.json is not None:
        body = orjson.dumps(m.json)
        headers.setdefault("content-type", ("Content-Type", "application/json"))
    else:
        body = (m.body or "").encode()
        if body:
            headers.setdefault("content-type", ("Content-Type", "text/plain; charset=utf-8"))
    headers.pop("content-length", None)
    head = status_line(status) + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.values())
    if status >= 200 and status not in (204, 304):
        head += b"Content-Length: %d\r\n" % len(body)
    else:
        body = b""
    return head, body


def _header_policies(policies) -> tuple[frozenset, tuple, bytes, frozenset]:
    req_drop, req_add, resp_add, resp_remove = set(), [], [], set()
    for p in policies:
        if isinstance(p, RequestHeaders):
            req_drop.update(n.lower().encode() for n in p.remove)
            for k, v in p.add.items():
                req_drop.add(k.lower().encode())
                req_add.append((k.encode(), v.encode()))
        elif isinstance(p, ResponseHeaders):
            resp_remove.update(n.lower().encode() for n in p.remove)
            for k, v in p.add.items():
                resp_remove.add(k.lower().encode())
                resp_add.append(f"{k}: {v}\r\n".encode())
    return frozenset(req_drop), tuple(req_add), b"".join(resp_add), frozenset(resp_remove)


class _RouteSpec:
    """One route as the config gives it, with what its state does not change, compiled once; `cr`
    is its CompiledRoute for the state it has now (`key`), remade when that changes."""

    __slots__ = ("r", "api", "ver", "headers", "mock", "group", "canary", "chain", "stats", "key", "cr", "bindings")

    def __init__(self, r, api, ver, headers, mock, group):
        self.r, self.api, self.ver = r, api, ver
        self.headers, self.mock, self.group = headers, mock, group
        self.canary = None
        self.chain = None  # built the first time a state that runs policies needs it
        self.stats = None  # this worker's counts for /metrics, kept across states
        self.key = None
        self.cr = None  # None while a draft (not routed)
        self.bindings = None  # [(pattern, Binding)] of `cr`, made once per CompiledRoute


class Generation:
    """Everything a worker needs to serve one config, compiled once. The API versions' states may
    change after (the store's lifecycle rows: `set_lifecycle`), without a new generation."""

    def __init__(self, cfg: Config, number: int = 1, counters=None, shared=None):
        """`shared`: the host's shared metrics table (canary outcomes and rollback flags)."""
        from ..policies import load_builders

        load_builders(cfg)
        from ..policies.base import ConsumerInfo

        self.cfg = cfg
        self.counters = counters
        self.number = number
        self.tracing = cfg.tracing.propagate
        self.latency_headers = cfg.latency_headers
        self.consumer_label = cfg.metrics.consumer_label
        self.limits = cfg.limits
        self.groups = {u.name: UpstreamGroup(u) for u in cfg.upstreams}
        self.consumers = {c.username: ConsumerInfo(c.username, c.id, c.plan, c.groups) for c in cfg.consumers}
        self.directory = Directory.for_config(cfg)  # the store's keys; polled by the worker's tick
        # routes mostly drop and add the same headers: one object per distinct value (about 7 MB
        # less for 10,000 routes than a frozenset, tuple and bytes of their own each)
        pool: dict = {}

        def share(value):
            return pool.setdefault(value, value)

        self._share = share
        self._specs: list[_RouteSpec] = []
        self.canaries: list[Canary] = []  # those of the routes served now (set_lifecycle)
        for _path, r, api, ver in all_routes(cfg):
            policies = list(cfg.policies) + (list(api.policies) if api is not None else []) + list(r.policies)
            headers = tuple(share(v) for v in _header_policies(policies))
            mock = _mock_response(r.mock) if r.mock is not None else None
            group = self.groups[r.upstream] if r.upstream is not None else None
            spec = _RouteSpec(r, api, ver, headers, mock, group)
            if r.canary is not None and group is not None:
                spec.canary = Canary(r.name, r.canary, self.groups[r.canary.upstream], group, shared)
            self._specs.append(spec)
        self.lifecycle = None  # the store's lifecycle rows in force ({(api, version): override})
        self._defaults: dict = {}  # API name → the version a request naming none gets (header/query APIs)
        stored = self.directory.lifecycle if self.directory is not None else {}
        try:
            self.set_lifecycle(stored)
        except Exception:
            if not stored:
                raise
            log.exception("API lifecycle: the states set in the store cannot be applied; serving the config's")
            self.set_lifecycle({})
        timeouts = [cfg.limits.header_timeout, cfg.limits.keepalive_timeout, cfg.limits.body_timeout,
                    cfg.limits.send_timeout]
        for g in self.groups.values():
            timeouts += [g.connect_timeout, g.read_timeout] + ([g.total_timeout] if g.total_timeout else [])
        self.tick = min(0.5, max(0.02, min(timeouts) / 4))

    def set_lifecycle(self, overrides: dict) -> bool:
        """Serve the API versions in the states `overrides` gives them (config/lifecycle.py) and
        return whether anything changed. A route whose state changed gets a new CompiledRoute (its
        counters and canary carried over) and the router is rebuilt; requests already matched keep
        the route they had. All or nothing: if a route cannot be compiled (a policy's file gone,
        say) this raises and the generation serves on as it was."""
        from ..config.lifecycle import effective_api

        if overrides == self.lifecycle:
            self.lifecycle = overrides
            return False
        apis = {a.name: effective_api(a, overrides) for a in self.cfg.apis}
        versions = {id(c): v for a in self.cfg.apis for c, v in zip(a.versions, apis[a.name].versions, strict=True)}
        new: dict[int, tuple] = {}  # spec index → (key, CompiledRoute or None for a draft)
        for i, spec in enumerate(self._specs):
            ver = versions[id(spec.ver)] if spec.ver is not None else None
            key = (ver.state, ver.sunset, ver.successor) if ver is not None else ("published", None, None)
            if key != spec.key:
                new[i] = key, None if key[0] == "draft" else self._compile(spec, ver, key[0])
        defaults = {a.name: _default_version(a) for a in apis.values() if a.version_by != "path"}
        if not new and defaults == self._defaults and self.lifecycle is not None:
            self.lifecycle = overrides
            return False
        for i, (key, cr) in new.items():
            spec = self._specs[i]
            spec.key, spec.cr, spec.bindings = key, cr, None
        self._route(defaults)
        self.lifecycle = overrides
        self._defaults = defaults
        return True

    def _route(self, defaults: dict) -> None:
        """The router over the routes in their current states (drafts are not routed)."""
        entries = []
        switches: dict[str, VersionSwitch] = {}
        switched: set[tuple] = set()  # (host, pattern, priority) already leading to a version switch
        routes = []
        for spec in self._specs:
            cr, r, api = spec.cr, spec.r, spec.api
            if cr is None:  # a draft
                continue
            routes.append(cr)
            if spec.bindings is None:
                base = api.base_path if api is not None else ""
                spec.bindings = [(base + pat, Binding(cr, base + pat, r.strip_path, r.path_rewrite)) for pat in r.paths]
            methods = tuple(r.methods)
            for pattern, b in spec.bindings:
                for host in r.hosts or [None]:
                    if api is not None and api.version_by != "path":
                        sw = switches.get(api.name)
                        if sw is None:
                            sw = switches[api.name] = VersionSwitch(api, defaults[api.name])
                        sw.add(spec.ver.version, (host, methods, pattern, r.priority, b))
                        if (host, pattern, r.priority) not in switched:  # every pattern leads to the switch
                            switched.add((host, pattern, r.priority))
                            entries.append((host, (), pattern, r.priority, sw))
                    else:
                        entries.append((host, methods, pattern, r.priority, b))
        for sw in switches.values():
            sw.compile()
        router = Router(entries)
        # the canaries of routes that send to one now (a draft or retired route sends nothing)
        self.canaries = [cr.canary for cr in routes if cr.canary is not None]
        self.routes, self.router = routes, router

    def _compile(self, spec: _RouteSpec, ver, state: str) -> CompiledRoute:
        from ..policies.base import IDENTITY_HEADERS, BuildContext, attached, build_chain

        r, api, share = spec.r, spec.api, self._share
        req_drop, req_add, resp_add, resp_remove = spec.headers
        mock, group = spec.mock, spec.group
        if state == "deprecated":
            resp_add += b"Deprecation: true\r\n"
            if ver.sunset:
                resp_add += f"Sunset: {ver.sunset}\r\n".encode()
            if ver.successor:
                resp_add += f'Link: <{_successor(api, ver)}>; rel="successor-version"\r\n'.encode()
        elif state == "retired":
            from ..config.schema import Mock

            doc = {"error": "api_retired", "api": api.name, "version": ver.version}
            if ver.successor:
                doc["successor"] = _successor(api, ver)
                if api.version_by != "path":
                    doc["successor_version"] = ver.successor
            mock = _mock_response(Mock(status=410, json=doc))
            group = None
        cr = CompiledRoute(r, group, mock, req_drop, req_add, resp_add, resp_remove,
                           api.name if api else None, ver.version if ver else None, spec.stats)
        spec.stats = cr.stats
        if group is not None:
            cr.canary = spec.canary
        if state != "retired":
            if spec.chain is None:
                spec.chain = build_chain(attached(self.cfg, api, r), BuildContext(
                    self.counters, r.name, cr.api, self.cfg, self.consumers, self.directory))
            cr.chain = spec.chain
            cr.req_drop = cr.req_drop | cr.chain.drops
        cr.req_drop = cr.req_drop | IDENTITY_HEADERS
        if self.tracing:
            cr.req_drop = cr.req_drop | {b"traceparent"}  # forwarded (or replaced) by the protocol
        cr.req_drop = share(cr.req_drop)
        return cr

    def start(self, loop) -> None:
        for g in self.groups.values():
            g.start(loop)
        if self.directory is not None:
            self.directory.start(loop)  # store.backend redis: the subscription

    def stop(self) -> None:
        for g in self.groups.values():
            g.stop()
        if self.directory is not None:
            self.directory.close()

    def sweep(self, now: float) -> None:
        for g in self.groups.values():
            for t in g.targets:
                if t.idle:
                    t.sweep_idle(now)
