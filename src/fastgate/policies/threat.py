"""json-threat: refuse JSON bodies whose structure could hurt the upstream's parser (deep nesting,
huge objects, arrays or strings) before the upstream sees them.

The body is parsed once (orjson) and walked iteratively, so no document can exhaust the stack here:
orjson itself refuses nesting past 1024 levels (a refusal for `max_depth`, which is at most 1000).
Empty bodies pass. A refusal is `400 {"error": "json_threat", "limit": "max_depth", "max": 32}`;
a body that is not JSON is `400 invalid_json`; a non-JSON content type is 415 unless allow_non_json.
"""
from __future__ import annotations

import orjson

from ..config.schema import JsonThreat
from .base import register


def is_json_type(ctype: bytes | None) -> bool:
    """application/json, application/<x>+json (parameters ignored)."""
    if ctype is None:
        return False
    t = ctype.partition(b";")[0].strip().lower()
    return t == b"application/json" or (t.startswith(b"application/") and t.endswith(b"+json"))


def find_violation(doc, max_depth: int, max_keys: int, max_string: int, max_array: int,
                   max_total_keys: int | None) -> tuple[str, int] | None:
    """The first limit `doc` breaks, as (limit name, its value); None if it keeps them all.
    Depth counts containers: `{}` and `[]` are depth 1, `{"a": [1]}` depth 2."""
    total_keys = 0
    stack = [(doc, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth = pop()
        t = type(value)
        if t is dict:
            if depth > max_depth:
                return "max_depth", max_depth
            if len(value) > max_keys:
                return "max_keys", max_keys
            total_keys += len(value)
            if max_total_keys is not None and total_keys > max_total_keys:
                return "max_total_keys", max_total_keys
            for k, v in value.items():
                if len(k) > max_string:
                    return "max_string", max_string
                tv = type(v)
                if tv is dict or tv is list:
                    push((v, depth + 1))
                elif tv is str and len(v) > max_string:
                    return "max_string", max_string
        elif t is list:
            if depth > max_depth:
                return "max_depth", max_depth
            if len(value) > max_array:
                return "max_array", max_array
            for v in value:
                tv = type(v)
                if tv is dict or tv is list:
                    push((v, depth + 1))
                elif tv is str and len(v) > max_string:
                    return "max_string", max_string
        elif t is str and len(value) > max_string:
            return "max_string", max_string
    return None


@register(JsonThreat)
class JsonThreatPolicy:
    phase = "request"
    __slots__ = ("limits", "max_depth", "allow_non_json", "body_limit")

    def __init__(self, cfg: JsonThreat, ctx=None):
        self.limits = (cfg.max_depth, cfg.max_keys, cfg.max_string, cfg.max_array, cfg.max_total_keys)
        self.max_depth = cfg.max_depth
        self.allow_non_json = cfg.allow_non_json
        self.body_limit = cfg.body_limit

    def request_body(self, ex, body: bytes):
        if not body:
            return None
        if not is_json_type(ex.header(b"content-type")):
            return None if self.allow_non_json else ex.reply(415, "unsupported_media_type",
                                                             expected="application/json")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc):  # nested past orjson's own 1024 levels
                return ex.reply(400, "json_threat", limit="max_depth", max=self.max_depth)
            return ex.reply(400, "invalid_json")
        bad = find_violation(doc, *self.limits)
        if bad is not None:
            return ex.reply(400, "json_threat", limit=bad[0], max=bad[1])
        return None
