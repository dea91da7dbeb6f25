"""Load a config document and report EVERY problem in it, each with its path and a hint.

msgspec stops at the first validation error (msgspec#721), so on failure we walk the document
ourselves: each Struct field, list item and dict value is converted on its own, and the
`$`-relative path in msgspec's message is rewritten to the item's full path.
"""
from __future__ import annotations

import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ConfigError, ConfigIssue
from .schema import Config

_BAD = object()


def parse_document(text: str | bytes, fmt: str) -> Any:
    """Text → builtins. `fmt` is yaml, toml or json. Raises ConfigError on a syntax error."""
    try:
        if fmt == "json":
            return json.loads(text)
        if fmt == "toml":
            import tomllib

            return tomllib.loads(text.decode() if isinstance(text, bytes) else text)
        import yaml

        # libyaml's loader when PyYAML has it: several times faster, and the pure-Python one's
        # node objects for a 10,000-route file cost ~60 MB that the process never gives back
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception as exc:  # every parser has its own error type
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "$"
        raise ConfigError([ConfigIssue(where, f"not valid {fmt.upper()}: {exc}".splitlines()[0],
                                       "fix the syntax first")]) from None


def _format_of(path: str) -> str:
    ext = Path(path).suffix.lower()
    return {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}.get(ext, "yaml")


def load_file(path: str | os.PathLike) -> Config:
    """Read, parse and validate a config file; raise ConfigError listing every issue."""
    p = str(path)
    try:
        text = Path(p).read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("$", f"cannot read {p}: {exc.strerror}", "check the path")], p) from None
    try:
        return load_config(parse_document(text, _format_of(p)))
    except ConfigError as exc:
        exc.source = p
        raise ConfigError(exc.issues, p) from None


def load_file_isolated(path: str | os.PathLike) -> Config:
    """`load_file` in a short-lived forked child; the validated config comes back as msgpack.

    Parsing a large YAML file leaves tens of MB of freed Python objects behind that the process never
    returns to the OS; the supervisor forks every worker from its own memory, so it parses in a child
    and keeps only the decoded Structs (msgspec builds them straight from msgpack, no dicts)."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: parse, validate, send, exit
        code = 0
        try:
            os.close(r)
            try:
                payload = b"C" + msgspec.msgpack.encode(load_file(path))
            except ConfigError as exc:
                payload = b"E" + pickle.dumps(([tuple(i) for i in exc.issues], exc.source))
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    if payload[:1] == b"C":
        return msgspec.msgpack.decode(payload[1:], type=Config)
    if payload[:1] == b"E":
        issues, source = pickle.loads(payload[1:])
        raise ConfigError([ConfigIssue(*i) for i in issues], source)
    return load_file(path)  # the child failed unexpectedly: do it here and report what it says


def load_config(data: Any) -> Config:
    if data is None:
        data = {}
    issues: list[ConfigIssue] = []
    cfg = _collect(data, Config, "$", issues)
    if cfg is _BAD:
        if isinstance(data, dict):  # still check references among the parts that are valid
            issues.extend(_partial_references(data))
            issues.extend(_policy_issues(data))
        raise ConfigError(issues or [ConfigIssue("$", "invalid config")])
    issues.extend(check_references(cfg))
    issues.extend(_policy_issues(data))
    if issues:
        raise ConfigError(issues)
    return cfg


def _partial_references(data: dict) -> list[ConfigIssue]:
    """Cross-reference issues of a document with type errors: checked over every top-level value and
    list item that converts on its own; items that failed are left out, and a reference to one of
    them (by name) is not reported again."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(Config)}
    kwargs, index_maps, failed_names = {}, {}, set()
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            continue
        tp = _strip_annotated(f.type)
        if typing.get_origin(tp) is list and isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            good, idx = [], []
            for i, item in enumerate(value):
                try:
                    good.append(msgspec.convert(item, item_tp))
                    idx.append(i)
                except msgspec.ValidationError:
                    if isinstance(item, dict) and isinstance(item.get("name", item.get("username")), str):
                        failed_names.add(item.get("name", item.get("username")))
            kwargs[f.name] = good
            index_maps[key] = idx
        else:
            try:
                kwargs[f.name] = msgspec.convert(value, f.type)
            except msgspec.ValidationError:
                pass
    try:
        partial = msgspec.structs.replace(Config(), **kwargs)
    except (msgspec.ValidationError, ValueError, TypeError):
        return []
    out = []
    for issue in check_references(partial):
        if any(f"`{name}`" in issue.message for name in failed_names) and issue.message.startswith("unknown"):
            continue
        path = issue.path
        for key, idx in index_maps.items():
            prefix = f"$.{key}["
            if path.startswith(prefix):
                k, rest = path[len(prefix):].split("]", 1)
                path = f"{prefix}{idx[int(k)]}]{rest}"
                break
        out.append(ConfigIssue(path, issue.message, issue.hint))
    return out


# --- walking the document --------------------------------------------------------------------------
def _strip_annotated(tp):
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_name(tp) -> str:
    tp = _strip_annotated(tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _issue_from(exc: msgspec.ValidationError, path: str) -> ConfigIssue:
    text = str(exc)
    msg, sep, where = text.rpartition(" - at `")
    if not sep:
        return ConfigIssue(path, text, "")
    where = where.rstrip("`")
    full = path + where[1:] if where.startswith("$") else path
    hint = ""
    if msg.startswith("Expected"):
        hint = "check the value's type"
    return ConfigIssue(full, msg, hint)


def _collect(value, tp, path: str, issues: list[ConfigIssue]):
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        first = exc
    before = len(issues)
    base = _strip_annotated(tp)
    origin = typing.get_origin(base)
    if isinstance(base, type) and issubclass(base, msgspec.Struct) and isinstance(value, dict):
        _collect_struct(value, base, path, issues)
    elif origin is list and isinstance(value, list):
        (item_tp,) = typing.get_args(base)
        for i, item in enumerate(value):
            _collect(item, item_tp, f"{path}[{i}]", issues)
    elif origin is dict and isinstance(value, dict):
        for k, v in value.items():
            try:
                msgspec.convert({k: v}, base)
            except msgspec.ValidationError as exc:
                issues.append(_issue_from(exc, path))
    elif origin in (typing.Union, types.UnionType) and isinstance(value, dict):
        struct = _tagged_member(base, value, path, issues)
        if struct is not None:
            _collect_struct(value, struct, path, issues)
    if len(issues) == before:  # nothing more precise found: report msgspec's own message
        issues.append(_issue_from(first, path))
    return _BAD


def _tagged_member(union, value: dict, path: str, issues: list[ConfigIssue]):
    members = [t for t in typing.get_args(union) if isinstance(t, type) and issubclass(t, msgspec.Struct)]
    tagged = {m.__struct_config__.tag: m for m in members if m.__struct_config__.tag is not None}
    if not tagged:
        return members[0] if len(members) == 1 else None
    field = members[0].__struct_config__.tag_field
    tag = value.get(field)
    if isinstance(tag, str) and tag in tagged:
        return tagged[tag]
    close = difflib.get_close_matches(str(tag), list(tagged), n=1) if isinstance(tag, str) else []
    hint = f"did you mean `{close[0]}`?" if close else "one of: " + ", ".join(sorted(tagged))
    if tag is None:
        what = "missing"
    elif isinstance(tag, str):
        what = f"unknown {field} `{tag}`"
    else:  # a list or an object there is not a name (and not hashable: `in tagged` would raise)
        what = f"{field} must be a string, got {type(tag).__name__}"
    issues.append(ConfigIssue(f"{path}.{field}", f"{what}", hint))
    return None


def _collect_struct(value: dict, cls, path: str, issues: list[ConfigIssue]) -> None:
    before = len(issues)
    fields = msgspec.structs.fields(cls)
    known = {f.encode_name: f for f in fields}
    tag_field = cls.__struct_config__.tag_field
    for key in value:
        if key not in known and key != tag_field:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean `{close[0]}`?" if close else "allowed: " + ", ".join(known)
            issues.append(ConfigIssue(f"{path}.{key}", "unknown field", hint))
    for name, f in known.items():
        if name not in value:
            if f.required:
                issues.append(ConfigIssue(f"{path}.{name}", "missing required field",
                                          f"add `{name}` ({_type_name(f.type)})"))
            continue
        _collect(value[name], f.type, f"{path}.{name}", issues)
    if len(issues) == before:  # fields fine one by one: the problem is a cross-field rule
        try:
            msgspec.convert(value, cls)
        except msgspec.ValidationError as exc:
            issues.append(_issue_from(exc, path))


# --- cross-references ------------------------------------------------------------------------------
def all_routes(cfg: Config):
    """Yield (path, route, api, version) for top-level routes and every API version's routes."""
    for i, r in enumerate(cfg.routes):
        yield f"$.routes[{i}]", r, None, None
    for a, api in enumerate(cfg.apis):
        for v, ver in enumerate(api.versions):
            for i, r in enumerate(ver.routes):
                yield f"$.apis[{a}].versions[{v}].routes[{i}]", r, api, ver


def _dupes(items, what: str, key) -> list[ConfigIssue]:
    seen: dict = {}
    out = []
    for path, item in items:
        k = key(item)
        if k in seen:
            out.append(ConfigIssue(path, f"duplicate {what} `{k}`", f"first defined at {seen[k]}"))
        else:
            seen[k] = path
    return out


def check_references(cfg: Config) -> list[ConfigIssue]:
    from .._core.router import Router, parse_pattern

    issues: list[ConfigIssue] = []
    issues += _dupes(((f"$.upstreams[{i}]", u) for i, u in enumerate(cfg.upstreams)), "upstream name",
                     lambda u: u.name)
    issues += _dupes(((p, r) for p, r, _a, _v in all_routes(cfg)), "route name", lambda r: r.name)
    issues += _dupes(((f"$.listeners[{i}]", li) for i, li in enumerate(cfg.listeners)), "listener address",
                     lambda li: f"{li.address}:{li.port}")
    issues += _dupes(((f"$.apis[{i}]", a) for i, a in enumerate(cfg.apis)), "API name", lambda a: a.name)
    issues += _dupes(((f"$.plans[{i}]", p) for i, p in enumerate(cfg.plans)), "plan name", lambda p: p.name)
    issues += _dupes(((f"$.consumers[{i}]", c) for i, c in enumerate(cfg.consumers)), "consumer username",
                     lambda c: c.username)
    if not any(li.kind == "proxy" for li in cfg.listeners):
        issues.append(ConfigIssue("$.listeners", "no proxy listener", "add {kind: proxy, port: 8000}"))
    for i, li in enumerate(cfg.listeners):
        if li.tls is not None:
            for part in ("certificate", "key"):
                f = getattr(li.tls, part)
                if not os.path.isfile(f):
                    issues.append(ConfigIssue(f"$.listeners[{i}].tls.{part}", f"file not found: {f}",
                                              "give a path to a PEM file"))
    for i, u in enumerate(cfg.upstreams):
        for j, t in enumerate(u.targets):
            if _split_address(t.address) is None:
                issues.append(ConfigIssue(f"$.upstreams[{i}].targets[{j}].address",
                                          f"not host:port: `{t.address}`", "e.g. 127.0.0.1:9001"))
    upstreams = {u.name for u in cfg.upstreams}
    plans = {p.name for p in cfg.plans}
    seen_keys: dict = {}
    issues += _version_issues(cfg)
    for path, r, api, ver in all_routes(cfg):
        if r.upstream is not None and r.upstream not in upstreams:
            close = difflib.get_close_matches(r.upstream, list(upstreams), n=1)
            hint = f"did you mean `{close[0]}`?" if close else (
                "defined: " + ", ".join(sorted(upstreams)) if upstreams else "define it under `upstreams`")
            issues.append(ConfigIssue(f"{path}.upstream", f"unknown upstream `{r.upstream}`", hint))
        if r.canary is not None and r.canary.upstream not in upstreams:
            issues.append(ConfigIssue(f"{path}.canary.upstream", f"unknown upstream `{r.canary.upstream}`",
                                      "defined: " + (", ".join(sorted(upstreams)) or "none")))
        base = api.base_path if api is not None else ""
        for k, pat in enumerate(r.paths):
            try:
                names = parse_pattern(base + pat)
            except ValueError as exc:
                issues.append(ConfigIssue(f"{path}.paths[{k}]", str(exc),
                                          "patterns look like /users/{id} or /static/*"))
                continue
            if r.path_rewrite:
                for ref in _template_refs(r.path_rewrite):
                    if ref not in names:
                        issues.append(ConfigIssue(f"{path}.path_rewrite", f"`{{{ref}}}` is not a parameter of "
                                                  f"path `{pat}`", "params: " + (", ".join(names) or "none")))
            # with versions picked by header or query, each version's routes share the paths
            selector = ver.version if api is not None and api.version_by != "path" else None
            for host in r.hosts or [None]:
                key = (host, base + pat, r.priority, selector)
                methods = set(r.methods) or {"*"}
                for other_path, other_methods in seen_keys.get(key, []):
                    if (methods == other_methods == {"*"}) or methods & other_methods - {"*"}:
                        issues.append(ConfigIssue(f"{path}.paths[{k}]", f"same host, path `{pat}` and priority as "
                                                  f"{other_path}", "give one of them a different priority"))
                        break
                seen_keys.setdefault(key, []).append((path, methods))
        if r.mock is not None and r.mock.openapi is not None:
            issues += mock_example_issues(f"{path}.mock.openapi", r.mock.openapi)
        for h, host in enumerate(r.hosts):
            try:
                Router([(host, (), "/", 0, None)])
            except ValueError as exc:
                issues.append(ConfigIssue(f"{path}.hosts[{h}]", str(exc), "e.g. api.example.com or *.example.com"))
    issues += admin_issues(cfg)
    issues += _store_issues(cfg)
    issues += _redis_policy_issues(cfg)
    if cfg.oauth.enabled and not any(li.kind == "admin" for li in cfg.listeners):
        issues.append(ConfigIssue("$.oauth.enabled", "the OAuth endpoints are served by the control process, "
                                  "which runs only with an admin listener", "add {kind: admin, port: 8001} "
                                  "(and a {kind: portal} listener to serve them publicly)"))
    for i, c in enumerate(cfg.consumers):
        if c.plan is not None and c.plan not in plans:
            issues.append(ConfigIssue(f"$.consumers[{i}].plan", f"unknown plan `{c.plan}`",
                                      "defined: " + (", ".join(sorted(plans)) or "none")))
    return issues


def _redis_policy_issues(cfg: Config) -> list[ConfigIssue]:
    """A policy that asks for `backend: redis` needs the workers to have a Redis client."""
    if cfg.counters.redis is not None or cfg.counters.backend == "redis":
        return []
    found = [(f"$.policies[{i}]", p) for i, p in enumerate(cfg.policies)]
    for a, api in enumerate(cfg.apis):
        found += [(f"$.apis[{a}].policies[{i}]", p) for i, p in enumerate(api.policies)]
    for path, r, _a, _v in all_routes(cfg):
        found += [(f"{path}.policies[{i}]", p) for i, p in enumerate(r.policies)]
    for c, con in enumerate(cfg.consumers):
        found += [(f"$.consumers[{c}].policies[{i}]", p) for i, p in enumerate(con.policies)]
    for n, plan in enumerate(cfg.plans):
        found += [(f"$.plans[{n}].policies[{i}]", p) for i, p in enumerate(plan.policies)]
    return [ConfigIssue(f"{path}.backend", "backend redis, but no Redis is configured",
                        "add counters: {redis: {url: redis://host:6379/0}}")
            for path, p in found if getattr(p, "backend", None) == "redis"]


def _store_issues(cfg: Config) -> list[ConfigIssue]:
    st = cfg.store
    if st.backend != "redis":
        return []
    url = st.redis_url or (cfg.counters.redis.url if cfg.counters.redis is not None else None)
    where = "$.store.redis_url" if st.redis_url else "$.store.backend"
    if url is None:
        return [ConfigIssue(where, "store.backend redis needs a Redis", "set store.redis_url (or counters.redis)")]
    from ..counters.resp import RedisURL

    try:
        parsed = RedisURL(url)
    except ValueError as exc:
        return [ConfigIssue(where, str(exc), "e.g. redis://127.0.0.1:6379/0")]
    if parsed.cluster:
        return [ConfigIssue(where, "the store's directory needs one Redis (or a primary), not a cluster url",
                            "give store.redis_url a single node: pub/sub reaches every node of a cluster anyway")]
    return []


def _version_issues(cfg: Config) -> list[ConfigIssue]:
    out = []
    for a, api in enumerate(cfg.apis):
        names = [v.version for v in api.versions]
        out += _dupes(((f"$.apis[{a}].versions[{v}]", ver) for v, ver in enumerate(api.versions)), "version",
                      lambda ver: ver.version)
        for v, ver in enumerate(api.versions):
            if ver.successor is not None and ver.successor not in names:
                out.append(ConfigIssue(f"$.apis[{a}].versions[{v}].successor", f"unknown version `{ver.successor}`",
                                       "versions: " + ", ".join(names)))
        if api.version_by == "path":
            for field in ("version_key", "default_version"):
                if getattr(api, field) is not None:
                    out.append(ConfigIssue(f"$.apis[{a}].{field}", "only used with version_by: header or query",
                                           "set version_by, or remove it"))
        elif api.default_version is not None:
            states = {v.version: v.state for v in api.versions}
            if api.default_version not in states:
                out.append(ConfigIssue(f"$.apis[{a}].default_version", f"unknown version `{api.default_version}`",
                                       "versions: " + ", ".join(names)))
            elif states[api.default_version] == "draft":
                out.append(ConfigIssue(f"$.apis[{a}].default_version", f"version `{api.default_version}` is a "
                                       "draft (not routed)", "publish it, or name another version"))
    return out


def mock_example_issues(path: str, m) -> list[ConfigIssue]:
    """A `mock: {openapi: ...}` whose document, operation or example cannot be served."""
    from ..openapi_examples import ExampleError, example_response
    from ..policies.openapi import SpecError

    try:
        example_response(m.spec, m.operation, m.status, m.example, m.media_type)
    except ExampleError as exc:
        return [ConfigIssue(f"{path}.{exc.field}", str(exc), exc.hint)]
    except SpecError as exc:
        return [ConfigIssue(f"{path}.spec", str(exc), exc.hint or "fix the OpenAPI document")]
    return []


LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


def admin_issues(cfg: Config) -> list[ConfigIssue]:
    """An admin listener needs a token, unless it is on loopback and `admin.allow_no_token` says so."""
    out = []
    a = cfg.admin
    for i, li in enumerate(cfg.listeners):
        if li.kind != "admin" or a.token is not None or a.token_env is not None:
            continue
        if not a.allow_no_token:
            out.append(ConfigIssue("$.admin", "an admin listener needs a token", "set admin.token_env (or "
                                   "admin.token); on a loopback address only, admin.allow_no_token: true"))
        elif li.address not in LOOPBACK and not li.address.startswith("127."):
            out.append(ConfigIssue(f"$.listeners[{i}].address", f"admin.allow_no_token on a non-loopback "
                                   f"address ({li.address})", "bind the admin listener to 127.0.0.1 or set a token"))
    return out


def _policy_issues(data) -> list[ConfigIssue]:
    """What a policy can only check by running code (a plugin imports its class, say): each policy
    type's builder may have `check(policy) -> [(relative path, message, hint)]`. Walks the raw
    document, so a policy that is valid on its own is checked even when its route is not."""
    from ..policies import BUILDERS, load_builders
    from ..policies.base import COMPILED_ELSEWHERE
    from .schema import AnyPolicy

    load_builders()
    out: list[ConfigIssue] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "policies" and isinstance(v, list):
                    for j, item in enumerate(v):
                        try:
                            policy = msgspec.convert(item, AnyPolicy)
                        except msgspec.ValidationError:
                            continue  # reported by the schema pass
                        builder = BUILDERS.get(type(policy))
                        if builder is None and policy.__struct_config__.tag not in COMPILED_ELSEWHERE:
                            out.append(ConfigIssue(f"{path}.{k}[{j}].type", "this policy type is not "
                                                   "implemented in this build", "remove it or upgrade"))
                        if path.startswith(("$.consumers", "$.plans")) and \
                                getattr(builder, "phase", None) == "authentication":
                            out.append(ConfigIssue(f"{path}.{k}[{j}].type", "an authentication policy cannot be "
                                                   "attached to a consumer or plan (they run after authentication)",
                                                   "attach it to the route, API or globally"))
                        check = getattr(builder, "check", None)
                        for rel, msg, hint in check(policy) if check is not None else ():
                            out.append(ConfigIssue(f"{path}.{k}[{j}].{rel}", msg, hint))
                else:
                    walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(data, "$")
    return out


def _template_refs(template: str) -> list[str]:
    out, i = [], 0
    while (i := template.find("{", i)) >= 0:
        j = template.find("}", i)
        if j < 0:
            break
        out.append(template[i + 1 : j].rstrip("*") or "*")
        i = j + 1
    return out


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


split_address = _split_address
