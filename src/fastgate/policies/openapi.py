"""openapi-validation: requests checked against an OpenAPI 3.0 or 3.1 document before the upstream
sees them — path, query and header parameters (types, required, enums, any schema keyword) and
JSON request bodies.

The document is loaded and every schema the route can need is compiled once per config generation
(fastjsonschema turns a schema into Python code: ~9 µs for a typical 300-byte order body, where
jsonschema's Draft202012Validator takes ~140 µs; see README). `$ref`s resolve within the document
(`#/components/...`); other files and URLs are not fetched. OpenAPI 3.0 schemas validate as JSON
Schema draft 4 with `nullable` honoured; 3.1 schemas as draft 7 (the 2020-12 keywords draft 7 lacks
— prefixItems, unevaluated*, dependent*, $dynamicRef, min/maxContains — are config errors rather
than silently ignored; a `$ref` with sibling keywords is read as allOf, as 2020-12 means it).

Without `operation` the request is matched by method and path template among the document's
`paths` (concrete paths before templated ones), trying the request path, the request path without
a `servers` base path, and the upstream path. Parameter values are strings coerced to the schema's
type (integer, number, boolean; arrays: repeated query keys, else comma-separated) before
validation. Only JSON bodies (`application/json`, `*/*+json`) are validated; a body whose type the
operation does not list is 415 when the operation accepts only JSON, else it passes unvalidated.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from urllib.parse import unquote_to_bytes

import orjson

try:
    import fastjsonschema
except ImportError:  # a missing dependency fails this policy's check, not every policy's import
    fastjsonschema = None

from ..config.schema import OpenApiValidation
from .base import register

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
UNSUPPORTED_31 = frozenset(("prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentSchemas",
                            "dependentRequired", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "minContains",
                            "maxContains", "contentSchema"))
ANNOTATIONS = frozenset(("$ref", "description", "summary", "title", "$comment", "example", "examples", "deprecated",
                         "readOnly", "writeOnly", "default", "externalDocs", "xml"))
IGNORED_HEADERS = frozenset(("accept", "content-type", "authorization"))  # OpenAPI: described elsewhere
DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT7 = "http://json-schema.org/draft-07/schema#"
MAX_DETAILS = 10
FORMATS = {"uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}  # beside
# draft 7's (date-time, date, email, ipv4, uri...); OpenAPI's int32, int64, byte... are not checked


class SpecError(ValueError):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# --- the document ----------------------------------------------------------------------------------
def _load(path: str) -> dict:
    import yaml

    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise SpecError(f"cannot read the OpenAPI document {path}: {exc.strerror or exc}",
                        "a path to a YAML or JSON file (relative to the working directory)") from None
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not YAML or JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
        raise SpecError(f"{path}: not an OpenAPI document (no `paths`)", "openapi: 3.0.x or 3.1.x")
    version = str(doc.get("openapi", ""))
    if not re.match(r"^3\.[01]\.", version):
        found = f"`openapi: {version}`" if version else f"`swagger: {doc['swagger']}`" if "swagger" in doc else "none"
        raise SpecError(f"{path}: only OpenAPI 3.0 and 3.1 are supported (found {found})",
                        "convert Swagger 2.0 documents with swagger2openapi")
    return doc


def _escape(token) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _pointer_get(doc, pointer: str):
    if not pointer.startswith("#"):
        raise SpecError(f"`$ref: {pointer}`: only references within the document (#/...) are supported")
    node = doc
    for raw in pointer[1:].split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise SpecError(f"`$ref: {pointer}` does not resolve")
    return node


def _deref(doc, obj, pointer: str):
    """(object, its pointer) after following `$ref`s of a non-schema object (parameter, path item...)."""
    for _ in range(32):
        if not (isinstance(obj, dict) and "$ref" in obj):
            return obj, pointer
        pointer = obj["$ref"]
        obj = _pointer_get(doc, pointer)
    raise SpecError(f"`$ref` loop at {pointer}")


def _prepare(doc: dict, v30: bool) -> dict:
    """A copy of the document with its schemas made plain JSON Schema for fastjsonschema."""
    doc = copy.deepcopy(doc)
    stack: list = [(doc, "#")]
    while stack:
        node, ptr = stack.pop()
        if isinstance(node, dict):
            if v30 and node.get("nullable") is True:
                t = node.get("type")
                if isinstance(t, str):
                    node["type"] = [t, "null"]
                if isinstance(node.get("enum"), list) and None not in node["enum"]:
                    node["enum"] = node["enum"] + [None]
            if not v30:
                bad = UNSUPPORTED_31.intersection(node)
                if bad and ptr.startswith(("#/paths", "#/components", "#/webhooks")):
                    raise SpecError(f"{ptr}: `{sorted(bad)[0]}` (JSON Schema 2020-12) is not supported",
                                    "express it with draft 7 keywords (items, dependencies, contains)")
                if isinstance(node.get("$ref"), str) and set(node) - ANNOTATIONS:
                    ref = node.pop("$ref")
                    node["allOf"] = [{"$ref": ref}] + list(node.get("allOf", []))
            stack.extend((v, f"{ptr}/{_escape(k)}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{ptr}/{i}") for i, v in enumerate(node))
    return doc


_DOCS: dict = {}
_PREPARED: dict = {}


def _file_key(path: str):
    """(absolute path, mtime, size): a cache key valid while the file is unchanged; None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def load_document(path: str) -> dict:
    """The parsed document, shared while the file is unchanged (the validation policy and mocks from
    examples read the same files); SpecError if it is not OpenAPI 3.x. Callers never mutate it."""
    key = _file_key(path)
    doc = _DOCS.get(key) if key is not None else None
    if doc is None:
        doc = _load(path)
        if key is not None:
            if len(_DOCS) >= 64:
                _DOCS.clear()
            _DOCS[key] = doc
    return doc


def _prepared(path: str) -> tuple[bool, dict]:
    """(is 3.0, the prepared document), parsed once while the file is unchanged: a route per operation
    (`fastgate import` writes one) compiles each with `only`, and must not parse the file each time.
    Nothing mutates the prepared document (validators compile from a shallow copy of its root)."""
    key = _file_key(path)
    found = _PREPARED.get(key) if key is not None else None
    if found is None:
        raw = load_document(path)  # _prepare works on a deep copy: the shared parse stays as read
        v30 = str(raw["openapi"]).startswith("3.0")
        found = (v30, _prepare(raw, v30))
        if key is not None:
            if len(_PREPARED) >= 16:
                _PREPARED.clear()
            _PREPARED[key] = found
    return found


# --- compiled operations -----------------------------------------------------------------------------
def _kind(doc, schema) -> tuple[str | None, str | None]:
    """(type, item type) a parameter's string values are coerced to."""
    for _ in range(32):
        if isinstance(schema, dict) and "$ref" in schema:
            schema = _pointer_get(doc, schema["$ref"])
        elif isinstance(schema, dict) and "$ref" not in schema and len(schema.get("allOf", ())) == 1:
            schema = schema["allOf"][0]
        else:
            break
    if not isinstance(schema, dict):
        return None, None
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if t == "array":
        return "array", _kind(doc, schema.get("items", {}))[0]
    return (t if t in ("integer", "number", "boolean", "string", "object") else None), None


def _coerce(kind: str | None, value: str):
    if kind == "integer":
        try:
            return int(value)
        except ValueError:
            return value
    if kind == "number":
        try:
            f = float(value)
        except ValueError:
            return value
        return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f
    if kind == "boolean":
        return True if value == "true" else False if value == "false" else value
    return value


class Param:
    __slots__ = ("name", "lname", "where", "required", "kind", "item_kind", "explode", "validate")

    def __init__(self, p: dict, kind, item_kind, validate):
        self.name = p["name"]
        self.where = p["in"]
        self.lname = self.name.lower().encode("latin-1") if self.where == "header" else None
        self.required = bool(p.get("required")) or self.where == "path"
        self.kind, self.item_kind = kind, item_kind
        style = p.get("style", "form" if self.where == "query" else "simple")
        self.explode = bool(p.get("explode", style == "form")) and self.where == "query"
        self.validate = validate

    def value(self, raw: list[str]):
        """The typed value of the parameter's raw string values."""
        if self.kind == "array":
            items = raw if self.explode else [x for v in raw for x in v.split(",")]
            return [_coerce(self.item_kind, x) for x in items]
        return _coerce(self.kind, raw[0])


class Operation:
    __slots__ = ("op_id", "method", "template", "regex", "names", "literal", "path", "query", "headers",
                 "body_required", "media", "json_media", "json_only", "body_validate", "has_body")

    def __init__(self, method: str, template: str):
        self.method = method.upper().encode()
        self.template = template
        self.names: list[str] = []
        pattern, i = "", 0
        for m in re.finditer(r"\{([^{}/]+)\}", template):
            pattern += re.escape(template[i:m.start()]) + f"(?P<p{len(self.names)}>[^/]+)"
            self.names.append(m.group(1))
            i = m.end()
        pattern += re.escape(template[i:])
        self.regex = re.compile(pattern + r"\Z") if self.names else None
        self.literal = len(re.sub(r"\{[^{}/]+\}", "", template))
        self.op_id = None
        self.path = self.query = self.headers = ()
        self.has_body = self.body_required = self.json_only = False
        self.media: tuple = ()
        self.json_media: tuple = ()
        self.body_validate = None

    def accepts(self, media: str) -> bool:
        """Whether a body of this media type is one the operation lists (`type/*` and `*/*` included)."""
        if media in self.media or (self.json_media and _is_json(media)):
            return True
        major = media.split("/")[0] + "/*"
        return "*/*" in self.media or major in self.media

    def path_values(self, path: str) -> dict | None:
        if self.regex is None:
            return {} if path == self.template else None
        m = self.regex.match(path)
        if m is None:
            return None
        return {n: unquote_to_bytes(m.group(f"p{i}")).decode("utf-8", "replace") for i, n in enumerate(self.names)}


def _is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class CompiledSpec:
    """Every operation of one document, with its validators compiled."""

    def __init__(self, path: str, only: str | None = None):
        if fastjsonschema is None:
            raise SpecError("openapi-validation needs the fastjsonschema package", "pip install fastjsonschema")
        v30, self.doc = _prepared(path)
        doc = self.doc
        self.dialect = DRAFT4 if v30 else DRAFT7
        self._validators: dict = {}
        self.operations: list[Operation] = []
        self.by_id: dict[str, Operation] = {}
        ids = {}
        for template, item in doc["paths"].items():
            for method in METHODS:
                op = item.get(method) if isinstance(item, dict) else None
                if isinstance(op, dict) and op.get("operationId"):
                    ids[op["operationId"]] = (template, method)
        if only is not None and only not in ids:
            close = difflib.get_close_matches(only, list(ids), n=1)
            raise SpecError(f"no operationId `{only}` in {path}",
                            f"did you mean `{close[0]}`?" if close else "operationIds: " + (", ".join(sorted(ids))
                                                                                          or "none"))
        for template, item in doc["paths"].items():
            item_ptr = f"#/paths/{_escape(template)}"
            item, item_ptr = _deref(doc, item, item_ptr)
            if not isinstance(item, dict):
                continue
            for method in METHODS:
                op = item.get(method)
                if not isinstance(op, dict):
                    continue
                if only is not None and op.get("operationId") != only:
                    continue
                self._operation(template, method, item, item_ptr, op, f"{item_ptr}/{method}")
        # concrete paths before templated ones; then the longer literal part first
        self.static = {(o.method, o.template): o for o in self.operations if o.regex is None}
        self.templated = sorted((o for o in self.operations if o.regex is not None),
                                key=lambda o: (len(o.names), -o.literal))
        self.prefixes = []
        for s in doc.get("servers") or ():
            url = s.get("url", "") if isinstance(s, dict) else ""
            base = re.sub(r"^[a-z][a-z0-9+.-]*://[^/]*", "", url, flags=re.I).rstrip("/")
            if base.startswith("/") and "{" not in base:
                self.prefixes.append(base)

    def _validator(self, pointer: str):
        v = self._validators.get(pointer)
        if v is None:
            root = dict(self.doc)
            root["$schema"] = self.dialect
            root["$ref"] = pointer
            try:
                v = fastjsonschema.compile(root, formats=FORMATS, use_default=False, fast_fail=False)
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise SpecError(f"schema at {pointer}: {exc}") from None
            except re.error as exc:
                raise SpecError(f"schema at {pointer}: bad pattern: {exc}") from None
            self._validators[pointer] = v
        return v

    def _operation(self, template, method, item, item_ptr, op, op_ptr) -> None:
        doc = self.doc
        o = Operation(method, template)
        o.op_id = op.get("operationId")
        params: dict = {}
        for base, ptr in ((item, item_ptr), (op, op_ptr)):
            for i, p in enumerate(base.get("parameters") or ()):
                p, p_ptr = _deref(doc, p, f"{ptr}/parameters/{i}")
                if not isinstance(p, dict) or "name" not in p or p.get("in") not in ("path", "query", "header",
                                                                                     "cookie"):
                    raise SpecError(f"{p_ptr}: a parameter needs `name` and `in`")
                params[(p["name"], p["in"])] = (p, p_ptr)
        compiled = []
        for (name, where), (p, p_ptr) in params.items():
            if where == "cookie" or (where == "header" and name.lower() in IGNORED_HEADERS):
                continue
            if where == "path" and name not in o.names:
                raise SpecError(f"{p_ptr}: path parameter `{name}` is not in `{template}`")
            schema = p.get("schema")
            validate = self._validator(f"{p_ptr}/schema") if isinstance(schema, dict) else None
            kind, item_kind = _kind(doc, schema) if isinstance(schema, dict) else (None, None)
            compiled.append(Param(p, kind, item_kind, validate))
        o.path = tuple(p for p in compiled if p.where == "path")
        o.query = tuple(p for p in compiled if p.where == "query")
        o.headers = tuple(p for p in compiled if p.where == "header")
        body = op.get("requestBody")
        if body is not None:
            body, b_ptr = _deref(doc, body, f"{op_ptr}/requestBody")
            content = body.get("content") or {} if isinstance(body, dict) else {}
            o.has_body = True
            o.body_required = bool(body.get("required")) if isinstance(body, dict) else False
            o.media = tuple(m.split(";")[0].strip().lower() for m in content)
            o.json_media = tuple(m for m in o.media if _is_json(m))
            o.json_only = bool(o.media) and len(o.json_media) == len(o.media)
            for m, media in content.items():
                if _is_json(m.split(";")[0].strip().lower()) and isinstance(media, dict) \
                        and isinstance(media.get("schema"), dict):
                    o.body_validate = self._validator(f"{b_ptr}/content/{_escape(m)}/schema")
                    break
        self.operations.append(o)
        if o.op_id:
            self.by_id[o.op_id] = o

    def match(self, method: bytes, paths) -> tuple[Operation, dict] | None:
        for path in paths:
            o = self.static.get((method, path))
            if o is not None:
                return o, {}
            for o in self.templated:
                if o.method == method:
                    values = o.path_values(path)
                    if values is not None:
                        return o, values
        return None


_SPECS: dict = {}


def compiled_spec(path: str, only: str | None = None) -> CompiledSpec:
    """The compiled document, shared by every route (and a `check`) while the file is unchanged."""
    if "\0" in path:  # os.stat would raise ValueError, not OSError: a 500 for a config pushed to the admin API
        raise SpecError("the file name contains a NUL character", "give the path of an OpenAPI document")
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, only)
    except OSError:
        key = None
    spec = _SPECS.get(key) if key is not None else None
    if spec is None:
        spec = CompiledSpec(path, only)
        if key is not None:
            if len(_SPECS) >= 64:
                _SPECS.clear()
            _SPECS[key] = spec
    return spec


# --- errors ------------------------------------------------------------------------------------------
def _details(exc, where: str, name: str | None) -> list[dict]:
    errors = getattr(exc, "errors", None) or [exc]
    out = []
    for e in errors:
        msg = e.message
        if e.name and msg.startswith(e.name + " "):
            msg = msg[len(e.name) + 1:]
        if name is not None:
            path = name + "".join(f"[{p}]" for p in e.path[1:])
        else:
            path = "".join("/" + _escape(p) for p in e.path[1:])
        out.append({"in": where, "path": path, "message": msg})
    return out


def _check_param(p: Param, raw: list[str] | None, where: str, out: list) -> None:
    if raw is None:
        if p.required:
            out.append({"in": where, "path": p.name, "message": "is required"})
        return
    if p.validate is None:
        return
    try:
        p.validate(p.value(raw))
    except (fastjsonschema.JsonSchemaValueException, fastjsonschema.JsonSchemaValuesException) as exc:
        out += _details(exc, where, p.name)


def _query_values(query: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        key = unquote_to_bytes(k.replace(b"+", b" ")).decode("utf-8", "replace")
        out.setdefault(key, []).append(unquote_to_bytes(v.replace(b"+", b" ")).decode("utf-8", "replace"))
    return out


@register(OpenApiValidation)
class OpenApiValidationPolicy:
    """Path, query, header and JSON body validation against an OpenAPI document (module doc)."""

    phase = "request"
    __slots__ = ("spec", "fixed", "prefixes", "v_path", "v_query", "v_headers", "v_body", "status", "body_limit",
                 "request_body")

    @staticmethod
    def check(cfg: OpenApiValidation) -> list[tuple[str, str, str]]:
        try:
            compiled_spec(cfg.spec, cfg.operation)
        except SpecError as exc:
            field = "operation" if str(exc).startswith("no operationId") else "spec"
            return [(field, str(exc), exc.hint or "fix the OpenAPI document")]
        return []

    def __init__(self, cfg: OpenApiValidation, ctx=None):
        try:
            self.spec = compiled_spec(cfg.spec, cfg.operation)
        except SpecError as exc:
            raise ValueError(f"openapi-validation: {exc}") from None
        self.fixed = self.spec.by_id[cfg.operation] if cfg.operation else None
        # base paths a request path may carry before the document's templates: the `servers` ones, and
        # the API's `base_path` when the policy is on an API's route (it may differ: `fastgate import
        # --base-path`, or an API mounted elsewhere than its servers say)
        self.prefixes = list(self.spec.prefixes)
        api = getattr(ctx, "api", None)
        for a in getattr(getattr(ctx, "config", None), "apis", ()):
            base = a.base_path.rstrip("/")
            if a.name == api and base and base not in self.prefixes:
                self.prefixes.append(base)
        self.v_path = "path" in cfg.validate
        self.v_query = "query" in cfg.validate
        self.v_headers = "headers" in cfg.validate
        self.v_body = "body" in cfg.validate
        self.status = cfg.status
        self.body_limit = cfg.body_limit
        self.request_body = self._body if self.v_body else None

    def _paths(self, ex) -> list[str]:
        path = ex.path.decode("latin-1")
        paths = [path]
        for prefix in self.prefixes:
            if path.startswith(prefix + "/"):
                paths.append(path[len(prefix):])
        if ex.target_path:
            up = ex.target_path.partition(b"?")[0].decode("latin-1")
            if up not in paths:
                paths.append(up)
        return paths

    def _find(self, ex) -> tuple[Operation | None, dict | None]:
        """(operation, path values); values None when the operation is fixed and the path does not fit."""
        fixed = self.fixed
        paths = self._paths(ex)
        if fixed is not None:
            for path in paths:
                values = fixed.path_values(path)
                if values is not None:
                    return fixed, values
            return fixed, None
        found = self.spec.match(ex.method, paths)
        if found is None and ex.method == b"HEAD":  # HEAD is GET without the body
            found = self.spec.match(b"GET", paths)
        return found if found is not None else (None, None)

    def _fail(self, ex, details: list) -> bytes:
        return ex.reply(self.status, "validation_failed", details=details[:MAX_DETAILS])

    def request(self, ex):
        op, values = self._find(ex)
        if op is None:
            return self._fail(ex, [{"in": "path", "path": ex.path.decode("latin-1"), "message":
                                    f"no operation for {ex.method.decode()} {ex.path.decode('latin-1')} in the spec"}])
        details: list = []
        if self.v_path and op.path:
            if values is None:
                details.append({"in": "path", "path": ex.path.decode("latin-1"),
                                "message": f"does not match `{op.template}`"})
            else:
                for p in op.path:
                    _check_param(p, [values[p.name]], "path", details)
        if self.v_query and op.query:
            q = _query_values(ex.query) if ex.query else {}
            for p in op.query:
                _check_param(p, q.get(p.name), "query", details)
        if self.v_headers and op.headers:
            for p in op.headers:
                raw = [v.decode("latin-1") for k, v in ex.headers if k.lower() == p.lname]
                _check_param(p, raw or None, "header", details)
        if details:
            return self._fail(ex, details)
        if self.v_body and op.has_body and (ex.body_mode == 2 or ex.content_length > 0):
            ctype = ex.header(b"content-type")
            media = ctype.split(b";")[0].strip().lower().decode("latin-1") if ctype else ""
            if op.json_only and not op.accepts(media):
                return ex.reply(415, "unsupported_media_type", expected=list(op.media))
        return None

    def _body(self, ex, body: bytes):
        op, _ = self._find(ex)
        if op is None or not op.has_body:
            return None
        if not body:
            if op.body_required:
                return self._fail(ex, [{"in": "body", "path": "", "message": "a request body is required"}])
            return None
        if op.body_validate is None:
            return None
        ctype = ex.header(b"content-type")
        media = ctype.split(b";")[0].strip().lower().decode("latin-1") if ctype else ""
        if not _is_json(media):
            return None  # a listed non-JSON type (the request hook refused unlisted ones)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._fail(ex, [{"in": "body", "path": "", "message": f"not JSON: {exc}"}])
        try:
            op.body_validate(doc)
        except (fastjsonschema.JsonSchemaValueException, fastjsonschema.JsonSchemaValuesException) as exc:
            return self._fail(ex, _details(exc, "body", None))
        return None
