"""Mock responses taken from an OpenAPI 3.0/3.1 document's examples (`mock: {openapi: ...}`).

An operation is named by its `operationId` or as `METHOD /path/template`. Its response is the one
`status` names, else the lowest 2xx response with an example (else the lowest 2xx response without
content, such as a 204). Within it the media type is `media_type`, else `application/json` (then any
other JSON type, then the rest, in document order) that has an example. The example is, in order:
`examples.<name>.value` (`example` names it, default the first), the media type's `example`, the
schema's `example` (3.1: its first `examples` item), following `#/...` references.

JSON media types get the value serialised as JSON (a string value is a JSON string, as the OpenAPI
specification says); other media types get a string value as it is. Everything is resolved when a
config generation is built, so a request costs what a static mock costs.
"""
from __future__ import annotations

import difflib
import re

import orjson

from .policies.openapi import METHODS, SpecError, _deref, _escape, _is_json, load_document

_NONE = object()
OPERATION_REF = re.compile(r"^([A-Za-z]+)\s+(/\S*)$")


class ExampleError(SpecError):
    """A mock example that cannot be served; `field` names the `mock.openapi` key to blame."""

    def __init__(self, message: str, hint: str = "", field: str = "operation"):
        super().__init__(message, hint)
        self.field = field


class ExampleResponse:
    __slots__ = ("status", "media_type", "body")

    def __init__(self, status: int, media_type: str | None, body: bytes):
        self.status = status
        self.media_type = media_type  # None: no body (the response has no content)
        self.body = body

    def __repr__(self) -> str:
        return f"ExampleResponse({self.status}, {self.media_type!r}, {self.body[:40]!r})"


def operations(doc: dict):
    """Yield (template, method, operation, pointer) for every operation of `paths`, in document order."""
    for template, item in (doc.get("paths") or {}).items():
        try:
            item, item_ptr = _deref(doc, item, f"#/paths/{_escape(template)}")
        except SpecError:
            continue
        if not isinstance(item, dict):
            continue
        for method in METHODS:
            op = item.get(method)
            if isinstance(op, dict):
                yield str(template), method, op, f"{item_ptr}/{method}"


def find_operation(doc: dict, ref: str) -> tuple[str, str, dict, str]:
    """(template, method, operation, pointer) of `operationId` or `METHOD /path/template`."""
    m = OPERATION_REF.match(ref.strip())
    known = []
    for template, method, op, ptr in operations(doc):
        if m is not None and method == m.group(1).lower() and template == m.group(2):
            return template, method, op, ptr
        if op.get("operationId") == ref:
            return template, method, op, ptr
        known.append(op.get("operationId") or f"{method.upper()} {template}")
    close = difflib.get_close_matches(ref, known, n=1)
    raise ExampleError(f"no operation `{ref}` in the document",
                       f"did you mean `{close[0]}`?" if close else "an operationId or `METHOD /path`; the document has: "
                       + (", ".join(known[:20]) or "no operations"), "operation")


def example_response(spec: str, operation: str, status: int | None = None, example: str | None = None,
                     media_type: str | None = None) -> ExampleResponse:
    """The response `mock: {openapi: ...}` serves; ExampleError (or SpecError for the file) if none."""
    doc = load_document(spec)
    _template, _method, op, ptr = find_operation(doc, operation)
    return select(doc, op, ptr, operation, status, example, media_type)


def select(doc: dict, op: dict, op_ptr: str, label: str, status: int | None = None, example: str | None = None,
           media_type: str | None = None) -> ExampleResponse:
    """The example response of one operation (see the module doc for the order of choice)."""
    responses = op.get("responses")
    codes: dict[str, tuple[dict, str]] = {}
    for k, v in (responses.items() if isinstance(responses, dict) else ()):
        resp, rptr = _deref(doc, v, f"{op_ptr}/responses/{_escape(k)}")
        if isinstance(resp, dict):
            codes[str(k)] = (resp, rptr)
    listed = ", ".join(codes) or "none"
    if status is not None:
        if str(status) not in codes:
            raise ExampleError(f"operation `{label}` has no response {status}", f"responses: {listed}", "status")
        resp, rptr = codes[str(status)]
        found = _from_response(doc, resp, rptr, status, media_type, example)
        if found is None:
            raise ExampleError(f"no example for response {status} of `{label}`", _NO_EXAMPLE_HINT, "status")
        return found
    candidates = sorted(int(k) for k in codes if k.isdigit() and 200 <= int(k) < 300)
    if not candidates:
        raise ExampleError(f"operation `{label}` has no 2xx response", f"set `status` (responses: {listed})", "status")
    empty = None
    for code in candidates:
        resp, rptr = codes[str(code)]
        if not resp.get("content"):
            if empty is None and media_type is None and example is None:
                empty = ExampleResponse(code, None, b"")
            continue
        try:
            found = _from_response(doc, resp, rptr, code, media_type, example)
        except ExampleError:
            if code == candidates[-1] and empty is None:
                raise
            continue
        if found is not None:
            return found
    if empty is not None:
        return empty
    raise ExampleError(f"no example in the 2xx responses of `{label}`", _NO_EXAMPLE_HINT, "operation")


_NO_EXAMPLE_HINT = ("add `example` or `examples` to the response's media type or its schema, set `status` to a "
                    "response that has one, or use a static mock (json/body)")


def _from_response(doc, resp: dict, rptr: str, code: int, media_type: str | None, example: str | None):
    content = resp.get("content") or {}
    if not isinstance(content, dict) or not content:
        if media_type is not None or example is not None:
            raise ExampleError(f"response {code} has no content", "drop media_type/example, or pick another status",
                               "media_type" if media_type is not None else "example")
        return ExampleResponse(code, None, b"")
    types = {str(m).split(";")[0].strip().lower(): m for m in content}
    if media_type is not None:
        key = types.get(media_type.split(";")[0].strip().lower())
        if key is None:
            raise ExampleError(f"response {code} has no media type `{media_type}`",
                               "media types: " + ", ".join(map(str, content)), "media_type")
        order = [key]
    else:
        order = sorted(content, key=lambda m: (str(m).split(";")[0].strip().lower() != "application/json",
                                               not _is_json(str(m).split(";")[0].strip().lower())))
    for m in order:
        media = content[m]
        if not isinstance(media, dict):
            continue
        value = _example_of(doc, media, f"{rptr}/content/{_escape(m)}", example)
        if value is not _NONE:
            return ExampleResponse(code, *_encode(value, str(m)))
    if example is not None:
        raise ExampleError(f"no example `{example}` in response {code}", "check `examples` in the document",
                           "example")
    return None


def _example_of(doc, media: dict, mptr: str, name: str | None):
    examples = media.get("examples")
    if isinstance(examples, dict) and examples:
        if name is None:
            name = next(iter(examples))
        elif name not in examples:
            close = difflib.get_close_matches(name, list(map(str, examples)), n=1)
            raise ExampleError(f"no example `{name}` at {mptr}/examples",
                               f"did you mean `{close[0]}`?" if close else "examples: " + ", ".join(map(str, examples)),
                               "example")
        ex, eptr = _deref(doc, examples[name], f"{mptr}/examples/{_escape(name)}")
        if isinstance(ex, dict) and "value" in ex:
            return ex["value"]
        if isinstance(ex, dict) and "externalValue" in ex:
            raise ExampleError(f"{eptr}: `externalValue` examples are not fetched", "inline the example as `value`",
                               "example")
        raise ExampleError(f"{eptr}: an Example Object needs `value`", "examples: {name: {value: ...}}", "example")
    if name is not None:
        return _NONE
    if "example" in media:
        return media["example"]
    schema = media.get("schema")
    for _ in range(32):
        if isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and "example" not in schema:
            schema, _p = _deref(doc, {"$ref": schema["$ref"]}, mptr)
        else:
            break
    if isinstance(schema, dict):
        if "example" in schema:
            return schema["example"]
        if isinstance(schema.get("examples"), list) and schema["examples"]:  # 3.1: JSON Schema's examples
            return schema["examples"][0]
    return _NONE


def _encode(value, media: str) -> tuple[str, bytes]:
    """(Content-Type, body) of an example value."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in media):
        raise ExampleError(f"media type {media!r} has control characters", "", "media_type")
    base = media.split(";")[0].strip().lower()
    if _is_json(base) or "*" in base:
        ctype = media if "*" not in base else "application/json"
        try:
            return ctype, orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise ExampleError(f"the example for {media} cannot be written as JSON: {exc}", "", "example") from None
    if isinstance(value, bytes):
        return media, value
    if not isinstance(value, str | int | float):
        raise ExampleError(f"the example for {media} is a {type(value).__name__}, not text",
                           "write it as a string, or pick a JSON media type", "example")
    if isinstance(value, bool):
        value = "true" if value else "false"
    return media, str(value).encode()
