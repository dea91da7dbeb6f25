"""The OpenAPI importer's mapping (openapi_import.py) and example mocks (openapi_examples.py):
path templates, names, base paths, 3.0 and 3.1, refusals that list every problem, merging, and the
config errors of `mock: {openapi: ...}`. Documents are the real ones in tests/data/openapi, or
small ones written here for a case the real ones lack."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fastgate.config import load_config
from fastgate.errors import ConfigError, OpenApiImportError
from fastgate.openapi_examples import ExampleError, example_response
from fastgate.openapi_import import (
    base_path_of,
    build,
    check_result,
    gateway_pattern,
    merge,
    sanitize_name,
    unique,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "openapi"
PETSTORE = str(DATA / "petstore-expanded.yaml")
EXAMPLES = str(DATA / "api-with-examples.yaml")
WEBHOOK_31 = str(DATA / "webhook-example.yaml")


def write(tmp_path, doc: dict, name: str = "spec.json") -> str:
    f = tmp_path / name
    f.write_text(json.dumps(doc))
    return str(f)


def op(responses=None, **kw) -> dict:
    return {"responses": responses or {"200": {"description": "ok"}}, **kw}


class TestPathTemplates:
    @pytest.mark.parametrize(("template", "pattern"), [
        ("/pets", "/pets"),
        ("/pets/{id}", "/pets/{id}"),
        ("/{dataset}/{version}/fields", "/{dataset}/{version}/fields"),
        ("/pets/{pet-id}/toys/{toy.id}", "/pets/{pet_id}/toys/{toy_id}"),
        ("/a/{1st}", "/a/{_1st}"),
        ("/a/{x-y}/{x_y}", "/a/{x_y}/{x_y_2}"),  # sanitising may not collide
        ("/", "/"),
        ("/pets/", "/pets/"),
    ])
    def test_whole_segment_params(self, template, pattern):
        assert gateway_pattern(template) == (pattern, [])

    def test_mixed_segment_is_a_whole_segment_param_with_a_warning(self):
        pattern, warnings = gateway_pattern("/reports/{id}.{format}")
        assert pattern == "/reports/{id}"
        assert len(warnings) == 1 and "{id}.{format}" in warnings[0]

    @pytest.mark.parametrize("template", ["pets", "/files/*", "/a/{b", "/a/{}x"])
    def test_refused(self, template):
        with pytest.raises(ValueError):
            gateway_pattern(template)


class TestNames:
    @pytest.mark.parametrize(("text", "name"), [
        ("findPets", "findPets"),
        ("find pet by id", "find-pet-by-id"),
        ("list-data-sets", "list-data-sets"),
        ("  _get/users/{id}  ", "get-users-id"),
        ("Pets::list", "Pets-list"),
        ("ünïcode", "n-code"),
        ("%%%", ""),
    ])
    def test_sanitize(self, text, name):
        assert sanitize_name(text) == name

    def test_sanitized_names_fit_the_config_pattern(self):
        from fastgate.openapi_import import NAME_RE

        for text in ("x" * 300, "-a-", "a b\tc", ".hidden", "v1.0 beta"):
            s = sanitize_name(text)
            assert NAME_RE.match(s) and len(s) <= 128, s

    def test_unique(self):
        taken: set[str] = set()
        assert [unique(n, taken) for n in ("a", "a", "a", "b", "a-2")] == ["a", "a-2", "a-3", "b", "a-2-2"]

    def test_colliding_operation_ids_and_fallbacks(self, tmp_path):
        spec = write(tmp_path, {"openapi": "3.0.3", "info": {"title": "T", "version": "1"}, "paths": {
            "/a": {"get": op(operationId="get a"), "post": op(operationId="get-a")},
            "/b/{id}": {"get": op(), "delete": op(operationId="%%")}}})
        routes = build(spec, validate=False).routes
        assert [r["name"] for r in routes] == ["get-a", "get-a-2", "get-b-id", "delete-b-id"]
        # the mock names its operation as the document does: operationId, else METHOD /path
        ops = [r["mock"].get("openapi", {}).get("operation") or r["mock"]["json"]["operation"] for r in routes]
        assert ops == ["get a", "get-a", "GET /b/{id}", "%%"]


class TestBasePath:
    @pytest.mark.parametrize(("servers", "base"), [
        ([{"url": "http://petstore.swagger.io/api"}], "/api"),
        ([{"url": "https://x.example/v1/"}], "/v1"),
        ([{"url": "/v2"}], "/v2"),
        ([{"url": "v3"}], "/v3"),
        ([{"url": "https://x.example"}], ""),
        ([{"url": "/"}], ""),
        ([{"url": "{scheme}://developer.uspto.gov/ds-api",
           "variables": {"scheme": {"default": "https"}}}], "/ds-api"),
        ([{"url": "https://x.example/{ver}", "variables": {"ver": {"default": "v9"}}}], "/v9"),
        ([], ""),
        (None, ""),
    ])
    def test_from_servers(self, servers, base):
        assert base_path_of({"servers": servers} if servers is not None else {}) == base

    def test_variable_without_default_is_refused(self, tmp_path):
        spec = write(tmp_path, {"openapi": "3.0.0", "info": {"title": "t", "version": "1"},
                                "servers": [{"url": "/{tenant}/api"}], "paths": {"/x": {"get": op()}}})
        with pytest.raises(OpenApiImportError) as e:
            build(spec)
        assert [i.path for i in e.value.issues] == ["#/servers/0/url"]
        assert build(spec, base_path="/t/api").api["base_path"] == "/t/api"  # --base-path overrides it

    def test_override(self):
        assert build(PETSTORE, base_path="").api.get("base_path") is None
        assert build(PETSTORE, base_path="/v1/").api["base_path"] == "/v1"


class TestRealDocuments:
    def test_petstore_expanded_30(self):
        r = build(PETSTORE, upstream="pets", upstream_target="127.0.0.1:9")
        assert r.api["name"] == "swagger-petstore" and r.api["base_path"] == "/api"
        assert r.api["versions"][0]["version"] == "1.0.0"
        assert [(x["name"], x["paths"], x["methods"]) for x in r.routes] == [
            ("findPets", ["/pets"], ["GET"]), ("addPet", ["/pets"], ["POST"]),
            ("find-pet-by-id", ["/pets/{id}"], ["GET"]), ("deletePet", ["/pets/{id}"], ["DELETE"])]
        assert all(x["upstream"] == "pets" and "mock" not in x for x in r.routes)
        assert [x["policies"][0]["operation"] for x in r.routes] == ["findPets", "addPet", "find pet by id",
                                                                     "deletePet"]
        assert r.config["upstreams"] == [{"name": "pets", "targets": [{"address": "127.0.0.1:9"}]}]
        check_result(r.config, "pets")  # passes fastgate check's validation

    def test_petstore_mocks_without_examples_answer_501_with_warnings(self):
        r = build(PETSTORE)
        mocks = {x["name"]: x["mock"] for x in r.routes}
        assert mocks["deletePet"] == {"openapi": {"spec": PETSTORE, "operation": "deletePet"}}  # 204, no content
        assert mocks["findPets"] == {"status": 501, "json": {"error": "no_example", "operation": "findPets"}}
        assert sorted(w.split(":")[0] for w in r.warnings) == ["addPet", "find pet by id", "findPets"]
        assert r.no_example == 3

    def test_examples_document_has_no_validation_policies(self):
        r = build(EXAMPLES, name="versions", version="v2.1")
        assert (r.api["name"], r.api["versions"][0]["version"]) == ("versions", "v2.1")
        assert "base_path" not in r.api
        assert [x["paths"] for x in r.routes] == [["/"], ["/v2"]]
        assert all("policies" not in x for x in r.routes)  # no parameters, no bodies
        assert r.warnings == []

    def test_openapi_31_document(self):
        r = build(WEBHOOK_31)
        assert [x["name"] for x in r.routes] == ["listPets"]
        assert r.routes[0]["policies"] == [{"type": "openapi-validation", "spec": WEBHOOK_31, "operation": "listPets"}]
        assert any("webhooks" in w for w in r.warnings)
        check_result(r.config)

    def test_31_keywords_the_validator_lacks_are_reported_per_operation(self, tmp_path):
        body = {"content": {"application/json": {"schema": {"type": "array", "prefixItems": [{"type": "string"}]}}}}
        spec = write(tmp_path, {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {
            "/a": {"post": op(operationId="a", requestBody=body)},
            "/b": {"post": op(operationId="b", requestBody=body)},
            "/c": {"post": op(operationId="c", requestBody={"content": {"application/json": {"schema": {}}}})}}})
        with pytest.raises(OpenApiImportError) as e:
            build(spec)
        # the validator refuses the whole document (every operation's policy would fail): said once
        assert [i.path for i in e.value.issues] == ["#"]
        assert "prefixItems" in e.value.issues[0].message and "#/paths/~1" in e.value.issues[0].message
        assert len(build(spec, validate=False).routes) == 3  # --no-validate imports it
        # the same document as 3.0 is validated as draft 4, where prefixItems is only an unknown keyword
        spec30 = write(tmp_path, {**json.loads(Path(spec).read_text()), "openapi": "3.0.3"}, "s30.json")
        assert len(build(spec30).routes) == 3


    def test_bad_schemas_are_reported_per_operation(self, tmp_path):
        def body(t):
            return {"content": {"application/json": {"schema": {"type": t}}}}

        spec = write(tmp_path, {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {
            "/a": {"post": op(operationId="a", requestBody=body("intger"))},
            "/b": {"post": op(operationId="b", requestBody=body("strng"))},
            "/c": {"post": op(operationId="c", requestBody=body("string"))}}})
        with pytest.raises(OpenApiImportError) as e:
            build(spec)
        assert [i.path for i in e.value.issues] == ["operationId `a`", "operationId `b`"]


class TestRefusals:
    def test_swagger_20(self, tmp_path):
        spec = write(tmp_path, {"swagger": "2.0", "info": {"title": "t", "version": "1"}, "paths": {}})
        with pytest.raises(OpenApiImportError) as e:
            build(spec)
        assert "Swagger 2.0" in str(e.value) and "swagger2openapi" in e.value.issues[0].hint

    @pytest.mark.parametrize("version", ["2.0", "3.2.0", "4.0.0", ""])
    def test_other_versions(self, tmp_path, version):
        spec = write(tmp_path, {"openapi": version, "info": {"title": "t", "version": "1"}, "paths": {}})
        with pytest.raises(OpenApiImportError, match="only OpenAPI 3.0 and 3.1"):
            build(spec)

    def test_not_a_document(self, tmp_path):
        (tmp_path / "x.yaml").write_text("- a\n- b\n")
        (tmp_path / "bad.yaml").write_text("openapi: [\n")
        for name, text in (("x.yaml", "not a mapping"), ("bad.yaml", "not YAML or JSON"),
                           ("missing.yaml", "cannot read")):
            with pytest.raises(OpenApiImportError, match=text):
                build(str(tmp_path / name))

    def test_every_problem_is_reported(self, tmp_path):
        spec = write(tmp_path, {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {
            "/a": {"get": op(parameters=[{"$ref": "common.yaml#/components/parameters/Limit"}])},
            "/b": {"post": op(requestBody={"$ref": "https://example.com/bodies.json#/Pet"})},
            "/c": {"get": op(parameters=[{"$ref": "#/components/parameters/Nope"}])},
            "/d/*": {"get": op()}}})
        with pytest.raises(OpenApiImportError) as e:
            build(spec, name="bad name!")
        by_path = {i.path: i.message for i in e.value.issues}
        assert "external `$ref: common.yaml#/components/parameters/Limit`" in by_path["#/paths/~1a/get/parameters/0"]
        assert "external" in by_path["#/paths/~1b/post/requestBody"]
        assert "does not resolve" in by_path["#/paths/~1c/get/parameters/0"]
        assert "literal `*`" in by_path["#/paths/~1d~1*"]
        assert "not a valid name" in by_path["--name"]
        assert len(e.value.issues) == 5

    def test_no_paths(self, tmp_path):
        spec = write(tmp_path, {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "webhooks": {}})
        with pytest.raises(OpenApiImportError, match="nothing to import"):
            build(spec)

    def test_duplicate_operation_ids_are_referred_to_by_method_and_path(self, tmp_path):
        spec = write(tmp_path, {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {
            "/a": {"get": op(operationId="x", parameters=[{"name": "q", "in": "query", "schema": {"type": "integer"}}])},
            "/b": {"get": op(operationId="x")}}})
        r = build(spec)
        assert [x["mock"]["openapi"]["operation"] for x in r.routes] == ["GET /a", "GET /b"]
        assert r.routes[0]["policies"] == [{"type": "openapi-validation", "spec": spec}]  # matched by method+path
        assert "policies" not in r.routes[1]  # nothing to validate
        assert any("more than once" in w for w in r.warnings)
        check_result(r.config)


class TestMerge:
    def test_clashes_are_all_refused(self):
        fragment = build(PETSTORE, upstream="pets", upstream_target="127.0.0.1:9").config
        base = {"upstreams": [{"name": "pets", "targets": [{"address": "127.0.0.1:1"}]}],
                "routes": [{"name": "addPet", "paths": ["/x"], "mock": {}}],
                "apis": [{"name": "swagger-petstore", "versions": [{"version": "1", "routes": [
                    {"name": "deletePet", "paths": ["/y"], "mock": {}}]}]}]}
        with pytest.raises(OpenApiImportError) as e:
            merge(base, fragment)
        assert sorted(i.path for i in e.value.issues) == ["--name", "--upstream", "route `addPet`",
                                                         "route `deletePet`"]
        assert "$.apis[0].versions[0].routes[0]" in str(e.value)

    def test_merged_keeps_what_was_there(self):
        base = {"workers": 2, "upstreams": [{"name": "pets", "targets": [{"address": "127.0.0.1:1"}]}],
                "routes": [{"name": "hello", "paths": ["/hello"], "mock": {"body": "hi"}}]}
        merged = merge(base, build(PETSTORE, upstream="pets").config)
        assert merged["workers"] == 2 and merged["routes"] == base["routes"]
        assert [u["name"] for u in merged["upstreams"]] == ["pets"]
        assert merged["apis"][0]["name"] == "swagger-petstore"
        check_result(merged, "pets")
        assert "apis" not in base  # not modified in place

    def test_undefined_upstream(self):
        with pytest.raises(OpenApiImportError) as e:
            check_result(build(PETSTORE, upstream="nope").config, "nope")
        assert [i.path for i in e.value.issues] == ["--upstream"] and "nope=HOST:PORT" in e.value.issues[0].hint

    def test_overlapping_routes_fail_the_check(self):
        fragment = build(PETSTORE, name="p1", upstream="u", upstream_target="127.0.0.1:9").config
        second = build(PETSTORE, name="p2", upstream="u").config
        for r in second["apis"][0]["versions"][0]["routes"]:
            r["name"] += "-again"
        with pytest.raises(OpenApiImportError) as e:
            check_result(merge(fragment, second), "u")
        assert any("same host, path" in i.message for i in e.value.issues)


class TestExamples:
    DOC = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {"/things/{id}": {
        "get": {"operationId": "getThing", "responses": {
            "200": {"description": "ok", "content": {
                "application/xml": {"example": "<thing/>"},
                "application/json": {"examples": {
                    "small": {"value": {"id": 1}},
                    "big": {"$ref": "#/components/examples/Big"},
                    "far": {"externalValue": "https://example.com/x.json"}}}}},
            "404": {"description": "no", "content": {"application/problem+json": {
                "schema": {"$ref": "#/components/schemas/Problem"}}}},
            "default": {"description": "x"}}},
        "put": {"responses": {"201": {"description": "made", "content": {"text/plain": {"schema": {
            "type": "string", "examples": ["made it"]}}}}}},
        "delete": {"responses": {"202": {"description": "later", "content": {"application/json": {}}},
                                 "204": {"description": "gone"}}},
        "post": {"responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {}}}}}}}},
        "components": {"examples": {"Big": {"value": {"id": 2, "size": "XL"}}},
                       "schemas": {"Problem": {"type": "object", "example": {"title": "not found"}}}}}

    @pytest.fixture
    def spec(self, tmp_path):
        return write(tmp_path, self.DOC)

    def test_choices(self, spec):
        r = example_response(spec, "getThing")
        assert (r.status, r.media_type, json.loads(r.body)) == (200, "application/json", {"id": 1})  # JSON first
        assert json.loads(example_response(spec, "getThing", example="big").body) == {"id": 2, "size": "XL"}
        r = example_response(spec, "getThing", media_type="application/xml")
        assert (r.media_type, r.body) == ("application/xml", b"<thing/>")
        r = example_response(spec, "getThing", status=404)  # a schema-level example behind a $ref
        assert (r.status, r.media_type, r.body) == (404, "application/problem+json", b'{"title":"not found"}')
        r = example_response(spec, "PUT /things/{id}")  # no operationId; 3.1 schema `examples`
        assert (r.status, r.media_type, r.body) == (201, "text/plain", b"made it")
        r = example_response(spec, "DELETE /things/{id}")  # no example anywhere: the 2xx without content
        assert (r.status, r.media_type, r.body) == (204, None, b"")

    @pytest.mark.parametrize(("args", "field", "text"), [
        (("getThings",), "operation", "did you mean `getThing`?"),
        (("GET /nope",), "operation", "no operation"),
        (("getThing", 201), "status", "responses: 200, 404, default"),
        (("getThing", None, "huge"), "example", "examples: small, big, far"),
        (("getThing", None, "far"), "example", "externalValue"),
        (("getThing", None, None, "text/csv"), "media_type", "media types: application/xml, application/json"),
        (("POST /things/{id}",), "operation", "no example in the 2xx responses"),
        (("DELETE /things/{id}", 202), "status", "no example for response 202"),
    ])
    def test_errors_name_their_field(self, spec, args, field, text):
        with pytest.raises(ExampleError) as e:
            example_response(spec, *args)
        assert e.value.field == field
        assert text in str(e.value) + " " + e.value.hint

    def test_config_errors_carry_their_path(self, spec):
        def route(**mock) -> dict:
            return {"name": f"r{len(routes)}", "paths": [f"/r{len(routes)}"], "mock": mock}

        routes: list = []
        for m in ({"openapi": {"spec": spec, "operation": "getThing"}},
                  {"openapi": {"spec": spec, "operation": "nope"}},
                  {"openapi": {"spec": spec, "operation": "getThing", "example": "huge"}},
                  {"openapi": {"spec": spec + ".missing", "operation": "getThing"}},
                  {"openapi": {"spec": spec, "operation": "getThing"}, "json": {}},
                  {"openapi": {"spec": spec, "operation": "getThing"}, "status": 201}):
            routes.append(route(**m))
        with pytest.raises(ConfigError) as e:
            load_config({"routes": routes})
        paths = sorted(i.path for i in e.value.issues)
        assert paths == ["$.routes[1].mock.openapi.operation", "$.routes[2].mock.openapi.example",
                         "$.routes[3].mock.openapi.spec", "$.routes[4].mock", "$.routes[5].mock"]
        load_config({"routes": routes[:1]})  # the good one alone passes


def test_fragment_is_plain_yaml():
    text = yaml.safe_dump(build(PETSTORE).config, sort_keys=False)
    assert yaml.safe_load(text) == build(PETSTORE).config
