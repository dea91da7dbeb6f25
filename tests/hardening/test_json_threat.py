"""json-threat: hostile JSON bodies are refused at the gateway (and never crash it); the walk is
checked against a plain recursive model on generated documents."""
from __future__ import annotations

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate.config import load_config
from fastgate.errors import ConfigError
from fastgate.policies.threat import find_violation, is_json_type
from tests.harness import Upstream, config, gateway, parse_responses, raw


def doc(up: Upstream, **limits) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u",
                           "policies": [{"type": "json-threat", **limits}]}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}])


J = {"Content-Type": "application/json"}


async def test_limits_are_enforced_and_named(loop):
    limits = {"max_depth": 4, "max_keys": 3, "max_string": 10, "max_array": 5, "max_total_keys": 6}
    async with Upstream() as up, gateway(doc(up, **limits)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"

        async def post(body: bytes, headers=J):
            return await c.post(url, content=body, headers=headers)

        ok = b'{"a": [1, 2, {"b": "short"}], "c": null}'
        r = await post(ok)
        assert r.status_code == 200 and up.requests[-1].body == ok  # forwarded untouched
        cases = {
            "max_depth": b"[[[[[1]]]]]",
            "max_keys": b'{"a":1,"b":2,"c":3,"d":4}',
            "max_string": b'{"a":"12345678901"}',
            "max_array": b"[1,2,3,4,5,6]",
            "max_total_keys": b'[{"a":1,"b":2,"c":3},{"d":1,"e":2},{"f":1,"g":2}]',
        }
        for limit, body in cases.items():
            r = await post(body)
            assert r.status_code == 400, limit
            assert r.json()["error"] == "json_threat" and r.json()["limit"] == limit
            assert r.json()["max"] == limits[limit]
        r = await post(b'{"a_key_that_is_too_long": 1}')
        assert r.json()["limit"] == "max_string"  # keys count as strings
        assert (await post(b"[[[[1]]]]")).status_code == 200  # exactly max_depth
        assert (await post(b'"0123456789"')).status_code == 200
        bad = await post(b'{"a": ')
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_json"
        assert (await post(b"\xff\xfe")).json()["error"] == "invalid_json"
        assert (await post(b"[1]", {"Content-Type": "application/problem+json; charset=utf-8"})).status_code == 200
        form = await post(b"a=1", {"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415 and form.json()["error"] == "unsupported_media_type"
        assert (await c.get(url)).status_code == 200  # no body: nothing to check
        assert len(up.requests) == 5


async def test_a_very_deep_document_is_refused_not_a_crash(loop):
    async with Upstream() as up, gateway(doc(up, max_depth=1000)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"
        # (all under 256 KiB: see JsonThreat.body_limit in config/schema.py)
        for body in (b"[" * 100000 + b"]" * 100000, b'{"a":' * 30000 + b"1" + b"}" * 30000, b"[" * 100000):
            r = await c.post(url, content=body, headers=J)
            assert r.status_code == 400 and r.json() == {"error": "json_threat", "limit": "max_depth", "max": 1000,
                                                         "request_id": r.headers["x-request-id"]}
        deep_ok = b"[" * 1000 + b"]" * 1000
        assert (await c.post(url, content=deep_ok, headers=J)).status_code == 200
        assert (await c.post(url, content=b"[" * 1001 + b"]" * 1001, headers=J)).status_code == 400
        assert (await c.get(url)).status_code == 200  # the worker is fine
        assert len(up.requests) == 2


async def test_body_limit_non_json_and_pipelining(loop):
    async with Upstream() as up, gateway(doc(up, body_limit=64, allow_non_json=True)) as gw, \
            httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"
        assert (await c.post(url, content=b"[" + b"1," * 40 + b"1]", headers=J)).status_code == 413
        r = await c.post(url, content=b"plain text, not checked", headers={"Content-Type": "text/plain"})
        assert r.status_code == 200 and up.requests[-1].body == b"plain text, not checked"
        # a refused body does not disturb the next request on the connection
        resp = await raw(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 4\r\n\r\n[1,]GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert [s for s, _h, _b in parse_responses(resp)] == [400, 200]


def test_config_limits():
    with pytest.raises(ConfigError) as ei:
        load_config(config(routes=[{"name": "a", "paths": ["/a"], "mock": {}, "policies": [
            {"type": "json-threat", "max_depth": 5000, "max_keys": 0, "body_limit": 300000}]}]))
    paths = {i.path for i in ei.value.issues}
    assert {"$.routes[0].policies[0].max_depth", "$.routes[0].policies[0].max_keys",
            "$.routes[0].policies[0].body_limit"} <= paths


def test_json_types():
    assert is_json_type(b"application/json") and is_json_type(b"Application/JSON; charset=utf-8")
    assert is_json_type(b"application/vnd.api+json")
    assert not is_json_type(b"text/json+x") and not is_json_type(None) and not is_json_type(b"application/jsonx")


# --- the iterative walk against a recursive model -----------------------------------------------------
def model(doc, max_depth, max_keys, max_string, max_array, max_total_keys) -> set[str]:
    """Every limit the document breaks (the walk reports one of them)."""
    broken = set()
    total = 0

    def walk(v, depth):
        nonlocal total
        if isinstance(v, dict):
            if depth > max_depth:
                broken.add("max_depth")
            if len(v) > max_keys:
                broken.add("max_keys")
            total += len(v)
            for k, x in v.items():
                if len(k) > max_string:
                    broken.add("max_string")
                walk(x, depth + 1)
        elif isinstance(v, list):
            if depth > max_depth:
                broken.add("max_depth")
            if len(v) > max_array:
                broken.add("max_array")
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, str) and len(v) > max_string:
            broken.add("max_string")

    walk(doc, 1)
    if max_total_keys is not None and total > max_total_keys:
        broken.add("max_total_keys")
    return broken


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(json_values, st.integers(1, 6), st.integers(0, 5), st.integers(0, 6), st.integers(0, 5),
       st.none() | st.integers(0, 12))
def test_walk_matches_the_recursive_model(value, depth, keys, string, array, total):
    value = orjson.loads(orjson.dumps(value))  # what the policy sees: parsed JSON
    broken = model(value, depth, keys, string, array, total)
    got = find_violation(value, depth, keys, string, array, total)
    if broken:
        assert got is not None and got[0] in broken
    else:
        assert got is None
