"""API versions picked by header or query, and their lifecycle states, end to end."""
from __future__ import annotations

import httpx
import pytest

from fastgate.config.load import load_config, parse_document
from fastgate.errors import ConfigError
from tests.harness import Upstream, config, gateway


def _versions(version_by: str, **extra) -> list[dict]:
    return [{"name": "pets", "base_path": "/pets", "version_by": version_by, **extra, "versions": [
        {"version": "v1", "state": "deprecated", "sunset": "Wed, 01 Jan 2031 00:00:00 GMT", "successor": "v2",
         "routes": [{"name": "p1-list", "paths": ["/"], "methods": ["GET"], "mock": {"body": "one"}},
                    {"name": "p1-item", "paths": ["/{id}"], "upstream": "u"}]},
        {"version": "v0", "state": "retired", "successor": "v2",
         "routes": [{"name": "p0", "paths": ["/", "/{id}"], "mock": {"body": "zero"}}]},
        {"version": "v3", "state": "draft", "routes": [{"name": "p3", "paths": ["/"], "mock": {"body": "3"}}]},
        {"version": "v2", "routes": [{"name": "p2-list", "paths": ["/"], "methods": ["GET"], "mock": {"body": "two"}},
                                     {"name": "p2-create", "paths": ["/"], "methods": ["POST"],
                                      "mock": {"status": 201, "body": "made"}}]}]}]


async def test_versions_picked_by_header(loop):
    async with Upstream() as up:
        doc = config(apis=_versions("header"), upstreams=[{"name": "u", "targets": [{"address": up.address}]}])
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}/pets/"
            r = await c.get(base)  # no header: the newest published version
            assert r.text == "two" and "deprecation" not in r.headers
            r = await c.get(base, headers={"Api-Version": "v1"})
            assert r.text == "one" and r.headers["deprecation"] == "true"
            assert r.headers["sunset"].startswith("Wed, 01 Jan 2031")
            assert r.headers["link"] == '</pets>; rel="successor-version"'
            # the same path, another method, another route of the version
            r = await c.post(base, headers={"api-version": "v2"})
            assert r.status_code == 201 and r.text == "made"
            r = await c.post(base, headers={"Api-Version": "v1"})  # v1 has no POST
            assert r.status_code == 404 and r.json()["error"] == "no_route"
            # a path only v1 has: proxied with its params; under v2 it does not exist
            r = await c.get(base + "7", headers={"Api-Version": "v1"})
            assert r.status_code == 200 and up.requests[-1].url == b"/pets/7"
            assert (await c.get(base + "7")).status_code == 404
            n = len(up.requests)
            r = await c.get(base + "7", headers={"Api-Version": "v0"})
            assert r.status_code == 410
            assert r.json()["successor_version"] == "v2" and len(up.requests) == n
            r = await c.get(base, headers={"Api-Version": "v3"})  # a draft is not routed
            assert r.status_code == 404 and r.json()["error"] == "unknown_api_version"
            r = await c.get(base, headers={"Api-Version": "v9"})
            assert r.status_code == 404 and r.json()["error"] == "unknown_api_version"


async def test_versions_picked_by_query_with_a_default(loop):
    doc = config(apis=_versions("query", version_key="api-version", default_version="v1"),
                 upstreams=[{"name": "u", "targets": [{"address": "127.0.0.1:1"}]}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}/pets/"
        r = await c.get(base)
        assert r.text == "one"  # the configured default, deprecated or not
        assert r.headers["link"] == '</pets?api-version=v2>; rel="successor-version"'
        assert (await c.get(base + "?x=1&api-version=v2")).text == "two"
        assert (await c.get(base + "?version=v2")).text == "one"  # not the configured parameter
        r = await c.get(base + "1?api-version=v0")
        assert r.status_code == 410 and r.json()["successor"] == "/pets?api-version=v2"


def test_version_config_errors_each_with_its_path():
    doc = """
upstreams: [{name: u, targets: [{address: "127.0.0.1:1"}]}]
apis:
  - name: a
    version_key: X-V
    versions: [{version: v1, successor: v7, routes: [{name: r1, paths: [/], upstream: u}]}]
  - name: b
    version_by: header
    default_version: v2
    versions:
      - {version: v1, routes: [{name: r2, paths: [/], upstream: u}]}
      - {version: v2, state: draft, routes: [{name: r3, paths: [/], upstream: u}]}
      - {version: v1, routes: [{name: r4, paths: [/x], upstream: u}]}
"""
    with pytest.raises(ConfigError) as info:
        load_config(parse_document(doc, "yaml"))
    got = {(i.path, i.message.split("`")[0]) for i in info.value.issues}
    assert ("$.apis[0].version_key", "only used with version_by: header or query") in got
    assert ("$.apis[0].versions[0].successor", "unknown version ") in got
    assert ("$.apis[1].default_version", "version ") in got
    assert ("$.apis[1].versions[2]", "duplicate version ") in got


def test_shared_paths_are_a_conflict_only_when_versions_are_picked_by_path():
    doc = """
upstreams: [{name: u, targets: [{address: "127.0.0.1:1"}]}]
apis:
  - name: a
    version_by: %s
    versions:
      - {version: v1, routes: [{name: r1, paths: [/], upstream: u}]}
      - {version: v2, routes: [{name: r2, paths: [/], upstream: u}]}
"""
    load_config(parse_document(doc % "header", "yaml"))
    with pytest.raises(ConfigError) as info:
        load_config(parse_document(doc % "path", "yaml"))
    assert [i.path for i in info.value.issues] == ["$.apis[0].versions[1].routes[0].paths[0]"]


async def test_versions_with_overlapping_patterns_match_as_if_alone(loop):
    doc = config(apis=[{"name": "pets", "base_path": "/pets", "version_by": "header", "versions": [
        {"version": "v1", "routes": [{"name": "v1-all", "paths": ["/*"], "mock": {"body": "one"}}]},
        {"version": "v2", "routes": [{"name": "v2-item", "paths": ["/{id}"], "mock": {"body": "two"}}]}]}])
    async with gateway(doc) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}/pets"

        async def get(path, version=None):
            return await c.get(base + path, headers={"Api-Version": version} if version else {})

        assert (await get("/3", "v1")).text == "one"  # the more specific /{id} is v2's: v1 still matches /*
        assert (await get("/3/x", "v1")).text == "one"
        assert (await get("/3", "v2")).text == "two"
        r = await get("/3/x", "v2")
        assert r.status_code == 404 and r.json()["error"] == "no_route"  # v2 has no route for it
        assert (await get("/9")).text == "two"  # the default: the newest published version
        r = await get("/9", "v7")
        assert r.status_code == 404 and r.json()["error"] == "unknown_api_version"
