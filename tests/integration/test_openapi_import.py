"""`fastgate import` end to end on the OAI's own example documents (tests/data/openapi): the real CLI
writes a config, `fastgate check` passes it, the gateway serves it on a real socket, and an HTTP
client calls every imported operation: mocks answer with the document's examples, proxied routes
reach a real upstream with their path parameters, and request validation keeps bad bodies away
from it. Also `--into` (clashes refused, nothing written) and `--admin` against `fastgate run`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import Upstream, free_port, gateway, reply

DATA = Path(__file__).resolve().parents[1] / "data" / "openapi"
PETSTORE = DATA / "petstore-expanded.yaml"
EXAMPLES = DATA / "api-with-examples.yaml"
FASTGATE = str(Path(sys.executable).with_name("fastgate"))


def fastgate(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([FASTGATE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60)


def imported(tmp_path, *args) -> dict:
    """Run `fastgate import`, then `fastgate check` on what it wrote; the config as a dict."""
    out = tmp_path / "gw.yaml"
    r = fastgate("import", *args, "-o", out)
    assert r.returncode == 0, r.stderr
    check = fastgate("check", "-c", out)
    assert check.returncode == 0, check.stderr
    return yaml.safe_load(out.read_text())


def example(doc_path: Path, path: str, status: str, name: str = "foo"):
    doc = yaml.safe_load(doc_path.read_text())
    return doc["paths"][path]["get"]["responses"][status]["content"]["application/json"]["examples"][name]["value"]


async def test_mocks_answer_with_the_documents_examples(loop, tmp_path):
    cfg = imported(tmp_path, EXAMPLES)
    async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        r = await c.get("/")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == example(EXAMPLES, "/", "200")
        r = await c.get("/v2")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == example(EXAMPLES, "/v2", "200")
        assert (await c.post("/v2")).status_code == 404  # only the documented method
        assert (await c.get("/v3")).status_code == 404


async def test_mock_options_status_example_and_media_type(loop, tmp_path):
    """A hand-written `mock: {openapi: ...}` choosing a response other than the first."""
    spec = str(EXAMPLES)
    cfg = {"listeners": [{"kind": "proxy", "port": 1}], "routes": [
        {"name": "v203", "paths": ["/v2"], "mock": {"headers": {"X-Mock": "yes"}, "openapi": {
            "spec": spec, "operation": "GET /v2", "status": 203, "example": "foo",
            "media_type": "application/json"}}},
        {"name": "v300", "paths": ["/"], "mock": {"openapi": {"spec": spec, "operation": "listVersionsv2",
                                                              "status": 300}}}]}
    f = tmp_path / "gw.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert fastgate("check", "-c", f).returncode == 0
    async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        r = await c.get("/v2")
        assert (r.status_code, r.headers["x-mock"]) == (203, "yes")
        assert r.json() == example(EXAMPLES, "/v2", "203")
        r = await c.get("/")  # this example's value is a YAML string: served as a JSON string
        assert r.status_code == 300 and r.json() == example(EXAMPLES, "/", "300")


async def test_petstore_mocks_and_validation(loop, tmp_path):
    cfg = imported(tmp_path, PETSTORE, "--mock")
    async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
        r = await c.delete("/api/pets/7")  # 204 without content in the document
        assert r.status_code == 204 and r.content == b""
        r = await c.get("/api/pets")  # no example in the document: says so
        assert r.status_code == 501 and r.json() == {"error": "no_example", "operation": "findPets"}
        bad = await c.get("/api/pets/seven")  # id: integer
        assert bad.status_code == 400 and bad.json()["details"][0]["in"] == "path"
        bad = await c.post("/api/pets", json={"tag": "no name"})
        assert bad.status_code == 400 and bad.json()["error"] == "validation_failed"
        assert (await c.get("/pets")).status_code == 404  # under the servers' base path only


async def test_upstream_gets_requests_with_path_params_and_never_invalid_bodies(loop, tmp_path):
    async with Upstream(lambda req: reply(200, b'{"ok": true}', {"Content-Type": "application/json"})) as up:
        cfg = imported(tmp_path, PETSTORE, "--upstream", f"pets={up.address}")
        assert cfg["upstreams"] == [{"name": "pets", "targets": [{"address": up.address}]}]
        async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            assert (await c.get("/api/pets?tags=cat&tags=dog&limit=2")).status_code == 200
            assert (await c.get("/api/pets/42")).json() == {"ok": True}
            assert (await c.delete("/api/pets/7")).status_code == 200
            assert (await c.post("/api/pets", json={"name": "rex", "tag": "dog"})).status_code == 200
            seen = [(q.method, q.url, q.body) for q in up.requests]
            assert seen == [(b"GET", b"/api/pets?tags=cat&tags=dog&limit=2", b""), (b"GET", b"/api/pets/42", b""),
                            (b"DELETE", b"/api/pets/7", b""), (b"POST", b"/api/pets", b'{"name":"rex","tag":"dog"}')]
            # refused at the gateway: nothing more reaches the upstream
            for method, path, body in (("POST", "/api/pets", {"tag": "dog"}), ("POST", "/api/pets", {"name": 5}),
                                       ("GET", "/api/pets?limit=ten", None), ("GET", "/api/pets/x", None),
                                       ("DELETE", "/api/pets/1.5", None)):
                r = await c.request(method, path, json=body)
                assert r.status_code == 400, (method, path, r.text)
                assert r.json()["error"] == "validation_failed"
            assert len(up.requests) == 4


async def test_no_validate_forwards_what_validation_would_refuse(loop, tmp_path):
    async with Upstream() as up:
        cfg = imported(tmp_path, PETSTORE, "--upstream", f"pets={up.address}", "--no-validate", "--base-path", "")
        async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            assert (await c.post("/pets", json={"tag": "dog"})).status_code == 200
            assert (await c.get("/pets/x")).status_code == 200
            assert [q.url for q in up.requests] == [b"/pets", b"/pets/x"]


async def test_base_path_override_keeps_validation_working(loop, tmp_path):
    async with Upstream() as up:
        cfg = imported(tmp_path, PETSTORE, "--upstream", f"pets={up.address}", "--base-path", "/petstore/v1")
        async with gateway(cfg) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            assert (await c.get("/petstore/v1/pets/3")).status_code == 200
            assert (await c.get("/petstore/v1/pets/three")).status_code == 400
            assert [q.url for q in up.requests] == [b"/petstore/v1/pets/3"]


def test_into_merges_and_refuses_clashes(tmp_path):
    base = tmp_path / "gw.yaml"
    base.write_text("# mine\nupstreams: [{name: pets, targets: [{address: '127.0.0.1:9'}]}]\n"
                    "routes: [{name: hello, paths: [/hello], mock: {body: hi}}]\n")
    r = fastgate("import", PETSTORE, "--upstream", "pets", "--into", base)
    assert r.returncode == 0, r.stderr
    merged = yaml.safe_load(base.read_text())
    assert [a["name"] for a in merged["apis"]] == ["swagger-petstore"] and merged["routes"][0]["name"] == "hello"
    assert (tmp_path / "gw.yaml.bak").read_text().startswith("# mine")
    assert fastgate("check", "-c", base).returncode == 0
    # again: every clash reported, the file untouched
    before = base.read_text()
    r = fastgate("import", PETSTORE, "--upstream", "pets", "--into", base)
    assert r.returncode == 1 and "nothing written" in r.stderr
    for text in ("API `swagger-petstore`", "route `findPets`", "route `addPet`", "route `find-pet-by-id`",
                 "route `deletePet`"):
        assert text in r.stderr
    assert base.read_text() == before
    # -o writes the merged config elsewhere, leaving the original alone
    r = fastgate("import", EXAMPLES, "--into", base, "-o", tmp_path / "out.yaml")
    assert r.returncode == 0, r.stderr
    assert base.read_text() == before
    assert {a["name"] for a in yaml.safe_load((tmp_path / "out.yaml").read_text())["apis"]} == {
        "swagger-petstore", "simple-api-overview"}


def test_refusals_list_every_problem(tmp_path):
    (tmp_path / "swagger.json").write_text('{"swagger": "2.0", "info": {"title": "t", "version": "1"}, "paths": {}}')
    r = fastgate("import", tmp_path / "swagger.json")
    assert r.returncode == 1 and "Swagger 2.0" in r.stderr and r.stdout == ""
    (tmp_path / "ext.yaml").write_text(
        "openapi: 3.1.0\ninfo: {title: t, version: '1'}\npaths:\n"
        "  /a: {get: {parameters: [{$ref: 'other.yaml#/P'}], responses: {'200': {description: ok}}}}\n"
        "  /b: {get: {parameters: [{$ref: '#/components/parameters/Q'}], responses: {'200': {description: ok}}}}\n")
    r = fastgate("import", tmp_path / "ext.yaml", "--upstream", "nope")
    assert r.returncode == 1
    assert "2 problem(s)" in r.stderr and "external `$ref: other.yaml#/P`" in r.stderr and "does not resolve" in r.stderr
    r = fastgate("import", PETSTORE, "--upstream", "nope", "-o", tmp_path / "x.yaml")
    assert r.returncode == 1 and "--upstream: upstream `nope` is not defined" in r.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_stdout_and_warnings(tmp_path):
    r = fastgate("import", PETSTORE)
    assert r.returncode == 0
    assert yaml.safe_load(r.stdout)["apis"][0]["name"] == "swagger-petstore"
    assert "warning: findPets: mocked as 501" in r.stderr and "4 route(s)" in r.stderr


ADMIN_TOKEN = "import-admin-token-0123456789"


@pytest.fixture
def running(tmp_path):
    """`fastgate run` with an admin listener and one route of its own."""
    port, admin = free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"workers: 1\nstore: {{path: {tmp_path / 'store.db'}}}\nadmin: {{token_env: FG_IMPORT_TOKEN}}\n"
                   f"listeners: [{{kind: proxy, port: {port}}}, {{kind: admin, address: 127.0.0.1, port: {admin}}}]\n"
                   "routes: [{name: hello, paths: [/hello], mock: {body: hi}}]\n")
    log = tmp_path / "gw.log"
    proc = subprocess.Popen([FASTGATE, "run", "-c", cfg, "--pid-file", tmp_path / "gw.pid"], cwd=tmp_path,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "FG_IMPORT_TOKEN": ADMIN_TOKEN})
    try:
        _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/hello", timeout=1).status_code == 200, "the proxy", log)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{admin}/status", timeout=1,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200,
              "the admin API", log)
        yield port, f"http://127.0.0.1:{admin}", cfg
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(pred, what: str, log: Path, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_admin_pushes_the_merged_config_to_a_running_gateway(running, tmp_path):
    port, admin_url, cfg = running
    r = fastgate("import", EXAMPLES, "--admin", admin_url, "--admin-token", ADMIN_TOKEN)
    assert r.returncode == 0, r.stderr
    assert "POST /config: 202" in r.stderr
    _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/v2", timeout=1).status_code == 200, "the imported route",
          tmp_path / "gw.log")
    assert httpx.get(f"http://127.0.0.1:{port}/v2").json() == example(EXAMPLES, "/v2", "200")
    assert httpx.get(f"http://127.0.0.1:{port}/hello").text == "hi"  # the running config's own route stays
    assert "simple-api-overview" in cfg.read_text()
    # a second push clashes: refused before anything is sent
    r = fastgate("import", EXAMPLES, "--admin", admin_url, "--admin-token", ADMIN_TOKEN)
    assert r.returncode == 1 and "already has an API `simple-api-overview`" in r.stderr
