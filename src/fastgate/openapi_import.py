"""`fastgate import`: an OpenAPI 3.0/3.1 document → one fastgate API (one version) with a route per
operation, as a config fragment or merged into a config.

- Each operation (`paths.<template>.<method>`) is a route: `paths: [<template>]` under the API's
  `base_path`, `methods: [<METHOD>]`, named after its `operationId` made to fit the config's `Name`
  (`find pet by id` → `find-pet-by-id`; none: `get-pets-id`), unique (`-2`, `-3`…). Template
  parameters map onto fastgate's whole-segment `{param}`s; names outside `[A-Za-z_][A-Za-z0-9_]*`
  are rewritten (`{pet-id}` → `{pet_id}`); a segment mixing text and a parameter (`{id}.json`)
  becomes a whole-segment parameter, with a warning (openapi-validation still checks the exact form).
- `base_path`: the path of `servers[0].url` (its variables at their defaults), unless given.
- With an upstream the routes proxy to it (the request path is kept); otherwise each route is a
  mock naming the operation's example (`mock: {openapi: ...}`), or, for an operation without one,
  a static `501 {"error": "no_example"}` mock and a warning.
- With validation, operations that take parameters or a body get an `openapi-validation` policy
  fixed on their `operationId` (or matched by method and path when they have none).

Every problem is collected before anything is refused: Swagger 2.0, other OpenAPI versions,
external or unresolvable `$ref`s, schemas the validator cannot compile, bad names, and whatever the
resulting config fails in `fastgate check` (name clashes with `--into`, overlapping routes...).
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any

from .errors import ConfigError, ConfigIssue, OpenApiImportError
from .openapi_examples import ExampleError, operations, select
from .policies.openapi import SpecError, _escape, _pointer_get

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # config/schema.py: Name
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # _core/router.pyx: parameter names
NAME_MAX = 128


class Imported:
    """The result: `config` (a fragment, or the merged document), `warnings`, and what was built."""

    __slots__ = ("config", "warnings", "api", "routes", "mocks", "no_example", "validated")

    def __init__(self, config: dict, warnings: list[str], api: dict):
        self.config = config
        self.warnings = warnings
        self.api = api
        self.routes = api["versions"][0]["routes"]
        self.mocks = sum(1 for r in self.routes if "mock" in r)
        self.no_example = sum(1 for r in self.routes if "mock" in r and "openapi" not in r["mock"])
        self.validated = sum(1 for r in self.routes if r.get("policies"))


# --- names -----------------------------------------------------------------------------------------
def sanitize_name(text: str) -> str:
    """`text` made to fit the config's Name pattern ('' when nothing usable is left)."""
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "-", text.strip())
    s = re.sub(r"-{2,}", "-", s)
    s = s.lstrip("-_.").rstrip("-")
    return s[:NAME_MAX].rstrip("-")


def _fallback_name(method: str, template: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", template)
    return sanitize_name("-".join([method] + words)) or method


def unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        taken.add(name)
        return name
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = name[: NAME_MAX - len(suffix)] + suffix
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        n += 1


def param_name(name: str, taken: set[str]) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not s or not PARAM_RE.match(s):
        s = "_" + s
    n, candidate = 2, s
    while candidate in taken:
        candidate, n = f"{s}_{n}", n + 1
    taken.add(candidate)
    return candidate


def gateway_pattern(template: str) -> tuple[str, list[str]]:
    """(fastgate path pattern, warnings) for an OpenAPI path template; ValueError if it has none."""
    if not template.startswith("/"):
        raise ValueError("a path must start with '/'")
    out, warnings, taken = [], [], set()
    for seg in template[1:].split("/"):
        m = re.fullmatch(r"\{([^{}]+)\}", seg)
        if m is not None:
            out.append("{" + param_name(m.group(1), taken) + "}")
        elif "{" in seg or "}" in seg:
            names = re.findall(r"\{([^{}/]*)\}", seg)
            if not names or not all(names):
                raise ValueError(f"segment `{seg}` has unbalanced braces")
            out.append("{" + param_name(names[0], taken) + "}")
            warnings.append(f"segment `{seg}` mixes text and parameters: the route matches any value there")
        elif seg == "*" or "*" in seg:
            raise ValueError(f"segment `{seg}` has a literal `*`, which fastgate patterns cannot express")
        else:
            out.append(seg)
    return "/" + "/".join(out), warnings


def base_path_of(doc: dict) -> str:
    """The path of `servers[0].url` with its variables at their defaults ('' for none); ValueError."""
    servers = doc.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return ""
    url = str(servers[0].get("url", ""))
    for var, spec in (servers[0].get("variables") or {}).items():
        if isinstance(spec, dict) and "default" in spec:
            url = url.replace("{" + str(var) + "}", str(spec["default"]))
    path = re.sub(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//[^/]*", "", url)
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "{" in path or "}" in path:
        raise ValueError(f"servers[0].url `{url}` has a variable without a default in its path")
    if path in ("", ".", "/", "./"):
        return ""
    if path.startswith("./"):
        path = path[1:]
    if not path.startswith("/"):
        path = "/" + path
    return path.rstrip("/")


# --- the document ----------------------------------------------------------------------------------
def read_document(path: str) -> dict:
    """Parse the file; OpenApiImportError for what makes it unusable as a whole."""
    import yaml

    def fail(message: str, hint: str = "") -> OpenApiImportError:
        return OpenApiImportError([ConfigIssue("#", message, hint)], path)

    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise fail(f"not YAML or JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise fail("not an OpenAPI document (not a mapping)")
    if "swagger" in doc:
        raise fail(f"Swagger {doc['swagger']} (OpenAPI 2) is not supported, only OpenAPI 3.0 and 3.1",
                   "convert it first, e.g. `npx swagger2openapi in.yaml -o out.yaml`")
    version = str(doc.get("openapi", ""))
    if not re.match(r"^3\.[01]\.\d", version):
        raise fail(f"only OpenAPI 3.0 and 3.1 are supported (found {'`openapi: ' + version + '`' if version else 'no `openapi`'})",
                   "openapi: 3.0.x or 3.1.x")
    return doc


def ref_issues(doc: dict) -> list[ConfigIssue]:
    """Every `$ref` that is external or does not resolve."""
    out: list[ConfigIssue] = []
    stack: list = [(doc, "#")]
    while stack:
        node, ptr = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith("#"):
                    out.append(ConfigIssue(ptr, f"external `$ref: {ref}` is not supported",
                                           "bundle the document into one file first, e.g. `npx @redocly/cli bundle`"))
                else:
                    try:
                        _pointer_get(doc, ref)
                    except SpecError as exc:
                        out.append(ConfigIssue(ptr, str(exc), "fix the reference"))
            stack.extend((v, f"{ptr}/{_escape(k)}") for k, v in node.items() if k != "$ref")
        elif isinstance(node, list):
            stack.extend((v, f"{ptr}/{i}") for i, v in enumerate(node))
    out.sort(key=lambda i: i.path)
    return out


def _validation_issues(spec_path: str, ids: list[str], anonymous: bool) -> list[ConfigIssue]:
    """Schemas openapi-validation cannot compile, one issue per operation that has one."""
    from .policies.openapi import CompiledSpec

    try:
        CompiledSpec(spec_path)
        return []
    except SpecError as whole:
        first = whole
    out = []
    for op_id in ids:  # the whole document failed: find each operation that does
        try:
            CompiledSpec(spec_path, op_id)
        except SpecError as exc:
            out.append(ConfigIssue(f"operationId `{op_id}`", str(exc), exc.hint or "fix the schema, or --no-validate"))
    if len({i.message for i in out}) == 1 and len(out) > 1:  # one problem the whole document shares
        out = []
    if not out or anonymous:
        out.append(ConfigIssue("#", str(first), first.hint or "fix the schema, or --no-validate"))
    return out


# --- building --------------------------------------------------------------------------------------
def build(spec_path: str, *, name: str | None = None, version: str | None = None, base_path: str | None = None,
          upstream: str | None = None, upstream_target: str | None = None, mock: bool = False,
          validate: bool = True, spec_ref: str | None = None, doc: dict | None = None) -> Imported:
    """The config fragment for one document; OpenApiImportError listing every problem."""
    doc = read_document(spec_path) if doc is None else doc
    spec_ref = spec_ref or os.path.abspath(spec_path)
    issues: list[ConfigIssue] = list(ref_issues(doc))
    warnings: list[str] = []
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}

    if name is None:
        api_name = sanitize_name(str(info.get("title", "")).lower()) or "api"
    elif NAME_RE.match(name) and len(name) <= NAME_MAX:
        api_name = name
    else:
        api_name = ""
        issues.append(ConfigIssue("--name", f"`{name}` is not a valid name",
                                  "letters, digits, `_`, `.` and `-`, starting with a letter or digit"))
    if version is None:
        raw_version = info.get("version")
        api_version = sanitize_name(str(raw_version)) if raw_version is not None else ""
        if not api_version:
            api_version = "1"
            warnings.append("info.version is missing or unusable: the API version is `1` (--version to choose)")
    elif NAME_RE.match(version) and len(version) <= NAME_MAX:
        api_version = version
    else:
        api_version = ""
        issues.append(ConfigIssue("--version", f"`{version}` is not a valid version name",
                                  "letters, digits, `_`, `.` and `-`"))
    if base_path is None:
        try:
            base = base_path_of(doc)
        except ValueError as exc:
            base = ""
            issues.append(ConfigIssue("#/servers/0/url", str(exc), "give --base-path"))
    else:
        base = base_path.rstrip("/")
        if base and (not base.startswith("/") or "{" in base or "*" in base):
            issues.append(ConfigIssue("--base-path", f"`{base_path}` is not a path", "like /api/v1, or ''"))

    if not isinstance(doc.get("paths"), dict) or not doc["paths"]:
        issues.append(ConfigIssue("#/paths", "the document has no paths: nothing to import", ""))
    for key in ("webhooks",):
        if doc.get(key):
            warnings.append(f"`{key}` are not imported (the gateway does not call out)")
    if doc.get("security") or (doc.get("components") or {}).get("securitySchemes"):
        warnings.append("security requirements are not turned into policies: add key-auth, jwt… to the API yourself")

    ids = [op.get("operationId") for _t, _m, op, _p in operations(doc)]
    dup_ids = {i for i in ids if i is not None and ids.count(i) > 1}
    taken: set[str] = set()
    routes = []
    with_ids, anonymous_validated = [], False
    for template, method, op, ptr in operations(doc):
        op_id = op.get("operationId")
        if op_id is not None and not isinstance(op_id, str):
            issues.append(ConfigIssue(f"{ptr}/operationId", "operationId must be a string", ""))
            op_id = None
        if op_id in dup_ids:
            warnings.append(f"operationId `{op_id}` is used more than once: {method.upper()} {template} is "
                            "referred to by method and path")
            op_id = None
        label = op_id or f"{method.upper()} {template}"
        try:
            pattern, seg_warnings = gateway_pattern(template)
        except ValueError as exc:
            issues.append(ConfigIssue(f"#/paths/{_escape(template)}", str(exc), "rename the path"))
            continue
        warnings += [f"{label}: {w}" for w in seg_warnings]
        route_name = unique((sanitize_name(op_id) if op_id else "") or _fallback_name(method, template), taken)
        route: dict[str, Any] = {"name": route_name, "paths": [pattern], "methods": [method.upper()]}
        if upstream is not None and not mock:
            route["upstream"] = upstream
        else:
            try:
                select(doc, op, ptr, label)
                route["mock"] = {"openapi": {"spec": spec_ref, "operation": label}}
            except ExampleError as exc:
                route["mock"] = {"status": 501, "json": {"error": "no_example", "operation": label}}
                warnings.append(f"{label}: mocked as 501 ({exc})")
            except SpecError as exc:  # a $ref inside the responses: reported by ref_issues
                route["mock"] = {"status": 501, "json": {"error": "no_example", "operation": label}}
                warnings.append(f"{label}: mocked as 501 ({exc})")
        if validate and _takes_input(doc, template, op):
            policy = {"type": "openapi-validation", "spec": spec_ref}
            if op_id:
                policy["operation"] = op_id
                with_ids.append(op_id)
            else:
                anonymous_validated = True
            route["policies"] = [policy]
        routes.append(route)
    if validate and not issues and (with_ids or anonymous_validated):
        issues += _validation_issues(spec_path, with_ids, anonymous_validated)
    if issues:
        raise OpenApiImportError(issues, spec_path)

    api: dict[str, Any] = {"name": api_name}
    if base:
        api["base_path"] = base
    api["openapi"] = spec_ref
    api["versions"] = [{"version": api_version, "routes": routes}]
    fragment: dict[str, Any] = {}
    if upstream is not None and upstream_target is not None:
        fragment["upstreams"] = [{"name": upstream, "targets": [{"address": upstream_target}]}]
    fragment["apis"] = [api]
    return Imported(fragment, warnings, api)


def _takes_input(doc: dict, template: str, op: dict) -> bool:
    if op.get("parameters") or op.get("requestBody"):
        return True
    item = doc["paths"].get(template)
    return isinstance(item, dict) and bool(item.get("parameters"))


# --- merging ---------------------------------------------------------------------------------------
def _route_names(cfg: dict) -> dict[str, str]:
    out = {}
    for i, r in enumerate(cfg.get("routes") or ()):
        if isinstance(r, dict) and isinstance(r.get("name"), str):
            out[r["name"]] = f"$.routes[{i}]"
    for a, api in enumerate(cfg.get("apis") or ()):
        for v, ver in enumerate((api or {}).get("versions") or ()):
            for i, r in enumerate((ver or {}).get("routes") or ()):
                if isinstance(r, dict) and isinstance(r.get("name"), str):
                    out[r["name"]] = f"$.apis[{a}].versions[{v}].routes[{i}]"
    return out


def merge(base: dict | None, fragment: dict) -> dict:
    """`base` with the fragment's APIs and upstreams added; OpenApiImportError on every name clash."""
    base = copy.deepcopy(base) if base else {}
    if not isinstance(base, dict):
        raise OpenApiImportError([ConfigIssue("$", "the config is not a mapping", "")])
    issues = []
    apis = {a.get("name"): i for i, a in enumerate(base.get("apis") or ()) if isinstance(a, dict)}
    ups = {u.get("name"): i for i, u in enumerate(base.get("upstreams") or ()) if isinstance(u, dict)}
    routes = _route_names(base)
    for api in fragment.get("apis", ()):
        if api["name"] in apis:
            issues.append(ConfigIssue("--name", f"the config already has an API `{api['name']}` "
                                      f"($.apis[{apis[api['name']]}])", "choose another --name"))
        for r in api["versions"][0]["routes"]:
            if r["name"] in routes:
                issues.append(ConfigIssue(f"route `{r['name']}`", f"the config already has a route `{r['name']}` "
                                          f"({routes[r['name']]})", "rename the operationId or the existing route"))
    for u in fragment.get("upstreams", ()):
        if u["name"] in ups:
            issues.append(ConfigIssue("--upstream", f"the config already has an upstream `{u['name']}` "
                                      f"($.upstreams[{ups[u['name']]}])", f"use `--upstream {u['name']}` alone "
                                      "to proxy to it, or choose another name"))
    if issues:
        raise OpenApiImportError(issues, "name clashes with the config")
    for key in ("upstreams", "apis"):
        if fragment.get(key):
            base[key] = list(base.get(key) or []) + copy.deepcopy(fragment[key])
    return base


def check_result(doc: dict, upstream: str | None = None) -> None:
    """Run `fastgate check`'s validation on the result; OpenApiImportError with its issues."""
    from .config.load import load_config

    try:
        load_config(doc)
    except ConfigError as exc:
        issues = list(exc.issues)
        if upstream is not None and any(f"unknown upstream `{upstream}`" in i.message for i in issues):
            issues = [i for i in issues if f"unknown upstream `{upstream}`" not in i.message]
            issues.insert(0, ConfigIssue("--upstream", f"upstream `{upstream}` is not defined",
                                         f"give --upstream {upstream}=HOST:PORT, or --into a config that defines it"))
        raise OpenApiImportError(issues, "the result does not pass `fastgate check`") from None
