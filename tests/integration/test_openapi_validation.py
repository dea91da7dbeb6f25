"""openapi-validation through real sockets against tests/data/petstore.yaml: parameters, JSON bodies,
content types; what reached the upstream; spec errors reported by `fastgate check` with their paths."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import Upstream, config, gateway

SPEC = str(Path(__file__).resolve().parents[1] / "data" / "petstore.yaml")


def doc_for(up: Upstream, paths=("/*",), **policy) -> dict:
    p = {"type": "openapi-validation", "spec": SPEC, **policy}
    return config(routes=[{"name": "r", "paths": list(paths), "upstream": "u", "policies": [p]}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}])


async def test_parameters_are_validated(loop):
    async with Upstream() as up, gateway(doc_for(up)) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        ok = await c.get(base + "/pets?limit=10&status=sold&tags=a&tags=b", headers={"X-Trace": "0123abcd"})
        assert ok.status_code == 200
        assert up.requests[-1].url == b"/pets?limit=10&status=sold&tags=a&tags=b"
        bad = await c.get(base + "/pets?limit=0&status=lost&tags=toolongtag", headers={"X-Trace": "nope"})
        assert bad.status_code == 400
        body = bad.json()
        assert body["error"] == "validation_failed"
        got = {(d["in"], d["path"]) for d in body["details"]}
        assert got == {("query", "limit"), ("query", "status"), ("query", "tags[0]"), ("header", "X-Trace")}
        assert (await c.get(base + "/pets?limit=ten")).json()["details"][0]["message"] == "must be integer"
        # path parameters: typed, and a concrete path wins over a template
        assert (await c.get(base + "/pets/12")).status_code == 200
        assert (await c.get(base + "/pets/mine")).status_code == 200
        zero = await c.get(base + "/pets/0")
        assert zero.status_code == 400 and zero.json()["details"][0]["in"] == "path"
        # the servers' base path (/v1) is understood
        assert (await c.get(base + "/v1/pets/7")).status_code == 200
        # no operation for this method and path
        nope = await c.delete(base + "/pets/1")
        assert nope.status_code == 400 and "no operation" in nope.json()["details"][0]["message"]
        assert len(up.requests) == 4


async def test_json_bodies_are_validated(loop):
    async with Upstream() as up, gateway(doc_for(up)) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        h = {"X-Tenant": "acme"}
        ok = await c.post(base + "/pets", headers=h, json={"name": "rex", "tag": None})  # nullable (3.0)
        assert ok.status_code == 200 and json.loads(up.requests[-1].body) == {"name": "rex", "tag": None}
        order = {"items": [{"sku": "a", "qty": 0}, {"qty": "x"}], "note": "n" * 30}
        bad = await c.post(base + "/orders", json=order)
        assert bad.status_code == 400
        details = bad.json()["details"]
        assert {"in": "body", "path": "/items/0/qty", "message": "must be bigger than or equal to 1"} in details
        assert {d["path"] for d in details} == {"/items/0/qty", "/items/1", "/items/1/qty", "/note"}
        many = await c.post(base + "/orders", json={"items": [{"qty": 0} for _ in range(20)]})
        assert len(many.json()["details"]) == 10  # at most 10
        missing = await c.post(base + "/pets", headers=h)
        assert missing.status_code == 400 and missing.json()["details"][0]["message"] == "a request body is required"
        not_json = await c.post(base + "/pets", headers={**h, "Content-Type": "application/json"}, content=b"{oops")
        assert not_json.status_code == 400 and not_json.json()["details"][0]["message"].startswith("not JSON")
        no_header = await c.post(base + "/pets", json={"name": "rex"})
        assert no_header.status_code == 400 and no_header.json()["details"] == [
            {"in": "header", "path": "X-Tenant", "message": "is required"}]

        async def chunks():
            yield b'{"name": '
            yield b'""}'

        chunked = await c.post(base + "/pets", headers={**h, "Content-Type": "application/json"}, content=chunks())
        assert chunked.status_code == 400 and chunked.json()["details"][0]["path"] == "/name"
        assert len(up.requests) == 1


async def test_content_types(loop):
    async with Upstream() as up, gateway(doc_for(up)) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        r = await c.post(base + "/pets", headers={"X-Tenant": "a", "Content-Type": "text/plain"}, content=b"rex")
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        assert r.json()["expected"] == ["application/json"]
        # an operation that also takes text/plain: a text body passes unvalidated, JSON is checked
        assert (await c.put(base + "/pets/3", headers={"Content-Type": "text/plain"}, content=b"x")).status_code == 200
        assert (await c.put(base + "/pets/3", json={"name": 5})).status_code == 400
        ok = await c.put(base + "/pets/3", headers={"Content-Type": "application/json; charset=utf-8"},
                         content=b'{"name": "x"}')
        assert ok.status_code == 200
        assert [q.body for q in up.requests] == [b"x", b'{"name": "x"}']


async def test_a_fixed_operation_and_chosen_parts(loop):
    async with Upstream() as up, gateway(doc_for(up, paths=["/api/orders"], operation="createOrder",
                                                 validate=["body"], body_limit=64)) as gw, \
            httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        assert (await c.post(base + "/api/orders", json={"items": [{"sku": "a", "qty": 1}]})).status_code == 200
        assert (await c.post(base + "/api/orders", json={"items": []})).status_code == 400
        assert (await c.post(base + "/api/orders", json={"items": [{"sku": "a" * 80, "qty": 1}]})).status_code == 413
        assert len(up.requests) == 1


def _check(tmp_path, policy: str) -> subprocess.CompletedProcess:
    f = tmp_path / "gw.yaml"
    f.write_text(f"routes: [{{name: a, paths: [/a], mock: {{}}, policies: [{policy}]}}]\n")
    return subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(f)], capture_output=True,
                          text=True, cwd=tmp_path)


def test_spec_errors_are_config_errors(tmp_path):
    ok = _check(tmp_path, f"{{type: openapi-validation, spec: '{SPEC}'}}")
    assert ok.returncode == 0, ok.stderr
    r = _check(tmp_path, "{type: openapi-validation, spec: missing.yaml}")
    assert r.returncode == 1 and "$.routes[0].policies[0].spec" in r.stderr and "missing.yaml" in r.stderr
    (tmp_path / "swagger.json").write_text('{"swagger": "2.0", "paths": {}}')
    r = _check(tmp_path, "{type: openapi-validation, spec: swagger.json}")
    assert r.returncode == 1 and "only OpenAPI 3.0 and 3.1" in r.stderr
    r = _check(tmp_path, f"{{type: openapi-validation, spec: '{SPEC}', operation: createPets}}")
    assert r.returncode == 1 and "$.routes[0].policies[0].operation" in r.stderr and "createPet`?" in r.stderr
    (tmp_path / "bad.yaml").write_text(
        "openapi: 3.1.0\npaths:\n  /x:\n    post:\n      requestBody:\n        content:\n"
        "          application/json:\n            schema: {type: intger}\n")
    r = _check(tmp_path, "{type: openapi-validation, spec: bad.yaml}")
    assert r.returncode == 1 and "$.routes[0].policies[0].spec" in r.stderr and "Unknown type" in r.stderr
    (tmp_path / "ref.yaml").write_text(
        "openapi: 3.1.0\npaths:\n  /x:\n    get:\n      parameters: [{$ref: '#/components/parameters/Nope'}]\n")
    r = _check(tmp_path, "{type: openapi-validation, spec: ref.yaml}")
    assert r.returncode == 1 and "does not resolve" in r.stderr


async def test_openapi_31_document(loop, tmp_path):
    spec = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {"/things/{id}": {"post": {
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string", "format": "uuid"}}],
                "requestBody": {"content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Thing", "required": ["size"]}}}}}}},
            "components": {"schemas": {"Thing": {"type": "object", "properties": {
                "size": {"type": ["integer", "null"], "exclusiveMinimum": 0}}}}}}
    f = tmp_path / "t.json"
    f.write_text(json.dumps(spec))
    async with Upstream() as up:
        doc = doc_for(up)
        doc["routes"][0]["policies"][0]["spec"] = str(f)
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}/things/3f1c3c2e-8d6c-4a43-9c4f-7e3c1c2a9b10"
            assert (await c.post(base, json={"size": None})).status_code == 200
            r = await c.post(base, json={})  # `required` beside `$ref` counts (2020-12)
            assert r.status_code == 400 and r.json()["details"][0]["message"] == "must contain ['size'] properties"
            assert (await c.post(base, json={"size": 0})).status_code == 400
            bad_id = await c.post(f"http://127.0.0.1:{gw.port}/things/nope", json={"size": 1})
            assert bad_id.status_code == 400 and bad_id.json()["details"][0]["path"] == "id"
