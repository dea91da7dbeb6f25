"""Generation.set_lifecycle (the workers' live API lifecycle change) against its reference: a
generation compiled from scratch out of the config with the same states written in
(config/lifecycle.with_lifecycle). After any sequence of state changes, every request is answered
the same way by both."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate.config.lifecycle import effective_version, refusal, with_lifecycle
from fastgate.config.load import load_config
from fastgate.policies.base import NO_POLICIES
from fastgate.server.generation import Generation

STATES = ("draft", "published", "deprecated", "retired")
SUNSET = "Wed, 01 Jan 2031 00:00:00 GMT"


def _config(version_by: str):
    def ver(name, state, *paths, successor=None):
        routes = [{"name": f"{name}-{i}", "paths": [p], "mock": {"body": f"{name}{i}"}} for i, p in enumerate(paths)]
        routes.append({"name": f"{name}-up", "paths": ["/up"], "upstream": "u", "policies": [{"type": "cors", "origins": ["*"]}]})
        return {"version": name, "state": state, "successor": successor, "routes": routes}

    prefix = (lambda v: f"/{v}") if version_by == "path" else (lambda v: "")
    api = {"name": "pets", "base_path": "/pets", "version_by": version_by, "versions": [
        ver("v1", "deprecated", prefix("v1") + "/", prefix("v1") + "/{id}", successor="v2"),
        ver("v2", "published", prefix("v2") + "/", prefix("v2") + "/{id}/toys"),
        ver("v3", "draft", prefix("v3") + "/*")]}
    for v in api["versions"]:
        v["routes"][-1]["paths"] = [prefix(v["version"]) + "/up"]
        v["routes"][-1]["name"] = f"{v['version']}-up"
    api["versions"][0]["routes"][-1]["canary"] = {"upstream": "u2", "weight": 50}
    return load_config({"upstreams": [{"name": "u", "targets": [{"address": "127.0.0.1:1"}]},
                                      {"name": "u2", "targets": [{"address": "127.0.0.1:2"}]}],
                        "routes": [{"name": "fallback", "paths": ["/pets/*"], "priority": -1, "mock": {"body": "f"}}],
                        "apis": [api]})


CONFIGS = {by: _config(by) for by in ("path", "header", "query")}
PATHS = [b"/pets/", b"/pets/7", b"/pets/7/toys", b"/pets/up", b"/pets/x/y"]
PATHS += [b"/pets/" + v + p[5:] for v in (b"v1", b"v2", b"v3", b"v9") for p in PATHS]


def _answer(gen: Generation, path: bytes, version: bytes | None, by: str):
    headers = [(b"Api-Version", version)] if version is not None and by == "header" else []
    query = b"version=" + version if version is not None and by == "query" else b""
    found = gen.router.match(b"GET", b"example.com", path)
    if found is None:
        return "no_route"
    binding, params = found
    if binding.switch:
        found = binding.select(b"GET", b"example.com", path, headers, query)
        if isinstance(found, str):
            return found
        binding, params = found
    r = binding.route
    return (r.name, r.api, r.version, r.mock, r.resp_add, r.group.name if r.group is not None else None,
            r.canary is not None, r.chain is NO_POLICIES, r.req_drop, params)


def _every_answer(gen: Generation, by: str) -> list:
    return [_answer(gen, p, v, by) for p in PATHS for v in (None, b"v1", b"v2", b"v3", b"v9")]


override = st.tuples(st.sampled_from(STATES), st.sampled_from([None, SUNSET]),
                     st.sampled_from([None, "v1", "v2", "v3", "v7"]))
overrides = st.dictionaries(st.sampled_from([("pets", "v1"), ("pets", "v2"), ("pets", "v3"), ("pets", "v9"),
                                             ("cats", "v1")]), override, max_size=4)


@settings(max_examples=60, deadline=None)
@given(by=st.sampled_from(sorted(CONFIGS)), steps=st.lists(overrides, min_size=1, max_size=4))
def test_live_lifecycle_changes_answer_like_a_fresh_compile(by, steps):
    cfg = CONFIGS[by]
    live = Generation(cfg)
    for step in steps:
        live.set_lifecycle(step)
        fresh = Generation(with_lifecycle(cfg, step))
        assert _every_answer(live, by) == _every_answer(fresh, by)
        assert [r.name for r in live.routes] == [r.name for r in fresh.routes]
        assert [c.route for c in live.canaries] == [c.route for c in fresh.canaries]  # none for draft/retired


def test_a_change_reports_itself_and_keeps_the_route_counters():
    cfg = CONFIGS["path"]
    gen = Generation(cfg)
    v1 = gen.router.match(b"GET", b"h", b"/pets/v1/")[0].route
    assert gen.set_lifecycle({}) is False  # the config's states: nothing to do
    assert gen.set_lifecycle({("pets", "v1"): ("retired", None, None)}) is True
    retired = gen.router.match(b"GET", b"h", b"/pets/v1/")[0].route
    assert retired is not v1 and retired.stats is v1.stats  # a new route; this worker's counts go on
    assert b'"successor":"/pets/v2"' in retired.mock[1] and retired.mock[0].startswith(b"HTTP/1.1 410")
    assert gen.set_lifecycle({("pets", "v1"): ("retired", None, None)}) is False
    assert v1.mock[1] == b"v10"  # a request that matched before the change keeps the route it had


def test_rows_that_cannot_apply_are_ignored():
    cfg = _config("header")
    api = cfg.apis[0]
    assert refusal(api, "v9", "published", None) is not None
    assert refusal(api, "v1", "published", "v7") is not None
    assert refusal(api, "v1", "published", "v1") is not None
    assert refusal(api, "v2", "retired", "v1") is None
    v1 = api.versions[0]
    assert effective_version(api, v1, {("pets", "v1"): ("retired", None, "v7")}) is v1
    assert effective_version(api, v1, {("pets", "v1"): ("retired", None, None)}).successor == "v2"  # the config's
    pinned = msgspec.structs.replace(api, default_version="v2")
    assert refusal(pinned, "v2", "draft", None) is not None  # the default version must stay routed
    assert refusal(pinned, "v2", "retired", None) is None
    assert with_lifecycle(cfg, {("cats", "v1"): ("draft", None, None)}) is cfg


def test_a_route_that_cannot_compile_leaves_the_generation_as_it_was(tmp_path):
    """Publishing a draft whose policy cannot be built any more (its OpenAPI file is gone) raises,
    and changes nothing: the next attempt, once the file is back, applies the whole change."""
    from pathlib import Path

    spec = tmp_path / "pets.yaml"
    spec.write_text((Path(__file__).resolve().parents[1] / "data" / "petstore.yaml").read_text())
    cfg = load_config({"apis": [{"name": "pets", "base_path": "/pets", "versions": [
        {"version": "v1", "routes": [{"name": "one", "paths": ["/v1/*"], "mock": {"body": "1"}}]},
        {"version": "v2", "state": "draft", "routes": [{"name": "two", "paths": ["/v2/*"], "mock": {"body": "2"},
                                                        "policies": [{"type": "openapi-validation",
                                                                      "spec": str(spec)}]}]}]}]})
    gen = Generation(cfg)
    router, routes = gen.router, gen.routes
    spec.unlink()
    change = {("pets", "v1"): ("retired", None, None), ("pets", "v2"): ("published", None, None)}
    with pytest.raises(ValueError, match="openapi-validation"):
        gen.set_lifecycle(change)
    assert gen.router is router and gen.routes is routes and gen.lifecycle == {}
    assert gen.router.match(b"GET", b"h", b"/pets/v1/x")[0].route.mock[1] == b"1"  # v1 not retired either
    spec.write_text((Path(__file__).resolve().parents[1] / "data" / "petstore.yaml").read_text())
    assert gen.set_lifecycle(change) is True
    assert gen.router.match(b"GET", b"h", b"/pets/v1/x")[0].route.mock[0].startswith(b"HTTP/1.1 410")
    assert gen.router.match(b"GET", b"h", b"/pets/v2/x")[0].route.name == "two"


def test_a_routeless_version_changes_the_default_version():
    cfg = load_config({"apis": [{"name": "a", "version_by": "header", "versions": [
        {"version": "v1", "routes": [{"name": "one", "paths": ["/"], "mock": {"body": "1"}}]},
        {"version": "v2"}]}]})  # the newest published: the default, though it has no route yet
    gen = Generation(cfg)
    assert gen.router.match(b"GET", b"h", b"/")[0].select(b"GET", b"h", b"/", [], b"") == "no_route"
    assert gen.set_lifecycle({("a", "v2"): ("deprecated", None, None)}) is True
    binding, _ = gen.router.match(b"GET", b"h", b"/")[0].select(b"GET", b"h", b"/", [], b"")
    assert binding.route.name == "one"
