"""The policy engine through real sockets: a user's plugin class (examples/plugins/tenant.py) with
request, body and response hooks; identity headers a client cannot spoof; plugin config errors."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import Upstream, config, gateway, parse_responses, raw

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def tenant_doc(up: Upstream, **plugin_config) -> dict:
    plugin = {"type": "plugin", "module": "tenant:TenantPolicy",
              "config": {"allowed": ["acme", "globex"], **plugin_config}}
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u", "policies": [plugin]}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}])


async def test_plugin_request_and_response_hooks(loop):
    async with Upstream() as up, gateway(tenant_doc(up)) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        ok = await c.get(base + "/x", headers={"X-Tenant": "acme"})
        assert ok.status_code == 200 and ok.headers["x-served-tenant"] == "acme"
        assert up.requests[-1].header("x-tenant-verified") == "acme"
        bad = await c.get(base + "/x", headers={"X-Tenant": "initech"})
        assert bad.status_code == 403 and bad.json()["error"] == "unknown_tenant"
        missing = await c.get(base + "/x")
        assert missing.status_code == 403
        assert len(up.requests) == 1  # refused requests never reach the upstream


async def test_identity_headers_from_the_client_are_dropped(loop):
    async with Upstream() as up, gateway(tenant_doc(up)) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/x",
                        headers={"X-Tenant": "acme", "X-Consumer-ID": "admin", "X-Consumer-Username": "root",
                                 "X-Credential-Identifier": "k", "X-Keep": "yes"})
        assert r.status_code == 200
        got = up.requests[-1]
        assert got.header("x-consumer-id") is None and got.header("x-consumer-username") is None
        assert got.header("x-credential-identifier") is None
        assert got.header("x-keep") == "yes"


async def test_body_hook_sees_the_whole_body_before_anything_is_forwarded(loop):
    async with Upstream() as up, gateway(tenant_doc(up, forbidden_words=["DROP"], max_body=64)) as gw:
        async with httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}"
            h = {"X-Tenant": "acme"}
            assert (await c.post(base + "/x", headers=h, content=b"hello")).status_code == 200
            assert up.requests[-1].body == b"hello"

            async def chunks():
                for part in (b"no ", b"DR", b"OP ", b"here"):
                    yield part

            refused = await c.post(base + "/x", headers=h, content=chunks())  # split over chunks
            assert refused.status_code == 422 and refused.json()["error"] == "forbidden_content"
            too_big = await c.post(base + "/x", headers=h, content=b"x" * 65)
            assert too_big.status_code == 413
            assert len(up.requests) == 1
        # Expect: 100-continue: the gateway asks for the body, checks it, then forwards it whole
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nX-Tenant: globex\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abcde")
        resp = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert resp.startswith(b"HTTP/1.1 200")
        assert up.requests[-1].body == b"abcde" and up.requests[-1].header("expect") is None
        # pipelined: a refused body does not disturb the next request on the connection
        resp = await raw(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nX-Tenant: acme\r\nContent-Length: 4\r\n\r\nDROP"
                                  b"GET /y HTTP/1.1\r\nHost: a\r\nX-Tenant: acme\r\nConnection: close\r\n\r\n")
        assert [r[0] for r in parse_responses(resp)] == [422, 200]
        assert up.requests[-1].url == b"/y"


def _check(tmp_path, text: str) -> subprocess.CompletedProcess:
    f = tmp_path / "gw.yaml"
    f.write_text(text)
    env = {"PYTHONPATH": str(EXAMPLES), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(f)], capture_output=True,
                          text=True, env=env)


def test_plugin_errors_are_reported_with_their_paths(tmp_path):
    r = _check(tmp_path, """
routes:
  - name: a
    paths: [/a]
    mock: {}
    policies:
      - {type: plugin, module: "tenant:TenantPolicy", config: {allowed: "acme", colour: blue}}
      - {type: plugin, module: "no_such_module:Thing"}
      - {type: plugin, module: "not a path"}
""")
    assert r.returncode == 1
    err = r.stderr
    assert "$.routes[0].policies[0].config" in err
    assert "$.routes[0].policies[1].module" in err and "no_such_module" in err
    assert "$.routes[0].policies[2].module" in err
    ok = _check(tmp_path, "routes: [{name: a, paths: [/a], mock: {}, policies: "
                          "[{type: plugin, module: 'tenant:TenantPolicy', config: {allowed: [acme]}}]}]\n")
    assert ok.returncode == 0, ok.stderr


async def test_a_refusal_before_the_body_is_read_reaches_the_client(loop):
    """Lingering close: the client is still sending a large body when the gateway has answered;
    the answer must not be destroyed by a reset (nginx's lingering_close)."""
    async with Upstream() as up, gateway(tenant_doc(up)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = b"x" * 900_000  # below limits.max_body_bytes: the plugin refuses it, not the size cap
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nX-Tenant: nobody\r\nContent-Length: %d\r\n\r\n" % len(body))
        got = b""
        try:
            for i in range(0, len(body), 65536):
                writer.write(body[i:i + 65536])
                await writer.drain()
        except ConnectionError:
            pass  # the gateway may stop reading once it has dropped enough; the answer is what counts
        try:
            got = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert got.startswith(b"HTTP/1.1 403 "), got[:100]
        assert up.requests == []
        # the same for a body refused for its size, before any of it is read
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        big = b"x" * (4 << 20)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nX-Tenant: acme\r\nContent-Length: %d\r\n\r\n" % len(big))
        try:
            for i in range(0, len(big), 65536):
                writer.write(big[i:i + 65536])
                await writer.drain()
        except ConnectionError:
            pass
        try:
            got = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert got.startswith(b"HTTP/1.1 413 "), got[:100]


class DropAndParams:
    """A plugin for the test below: drops one client header for this request, and reports the
    route's captured params upstream."""

    phase = "request"

    def __init__(self, config, ctx):
        pass

    def request(self, ex):
        if ex.header(b"x-secret") is not None:
            ex.drop_upstream_header(b"X-Secret")
        ex.add_upstream_header(b"X-Params", b",".join(ex.params))
        return None


async def test_per_request_header_drop_and_route_params(loop):
    doc = config(routes=[{"name": "r", "paths": ["/users/{id}/items/{item}"], "upstream": "u", "policies": [
        {"type": "plugin", "module": "tests.integration.test_plugins:DropAndParams"}]}],
        upstreams=[])
    async with Upstream() as up:
        doc["upstreams"] = [{"name": "u", "targets": [{"address": up.address}]}]
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{gw.port}/users/7/items/x", headers={"X-Secret": "s", "X-Keep": "k"})
            got = up.requests[-1]
            assert got.header("x-secret") is None and got.header("x-keep") == "k"
            assert got.header("x-params") == "7,x"
            await c.get(f"http://127.0.0.1:{gw.port}/users/8/items/y", headers={"X-Keep": "k"})
            assert up.requests[-1].header("x-params") == "8,y"


ECHO_PLUGIN = '''
import msgspec


class EchoPolicy:
    """Copies the client's X-Echo header upstream as X-Echoed, whatever it holds."""

    phase = "request"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        pass

    def __init__(self, config, ctx):
        pass

    def request(self, ex):
        value = ex.header(b"x-echo")
        if value is not None:
            ex.add_upstream_header(b"X-Echoed", value.replace(b"~", b"\\r\\n"))
        return None
'''


async def test_a_header_a_plugin_adds_that_cannot_be_sent_gets_a_400_and_is_not_forwarded(loop, tmp_path,
                                                                                          monkeypatch):
    (tmp_path / "echo_plugin.py").write_text(ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u",
                          "policies": [{"type": "plugin", "module": "echo_plugin:EchoPolicy"}]}],
                 upstreams=[{"name": "u", "targets": [{"address": "127.0.0.1:1"}]}])
    async with Upstream() as up:
        doc["upstreams"][0]["targets"][0]["address"] = up.address
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}"
            ok = await c.get(base + "/x", headers={"X-Echo": "fine"})
            assert ok.status_code == 200 and up.requests[-1].header("x-echoed") == "fine"
            bad = await c.get(base + "/x", headers={"X-Echo": "a~Injected: 1"})  # the plugin makes it a CRLF
            assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
            assert len(up.requests) == 1  # the bad one never reached the upstream
