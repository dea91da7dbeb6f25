"""request-transformer and response-transformer through real sockets: what the upstream received
(headers, query string, path) and what the client got; config errors with their paths."""
from __future__ import annotations

import httpx
import pytest

from fastgate.config import load_config
from fastgate.errors import ConfigError
from tests.harness import Upstream, config, gateway, reply


def doc_for(up: Upstream, policies: list, paths=("/*",), global_policies=()) -> dict:
    return config(routes=[{"name": "r", "paths": list(paths), "upstream": "u", "policies": policies}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}],
                  policies=list(global_policies))


HEADERS = {"type": "request-transformer",
           "remove": ["X-Secret"],
           "rename": {"X-Old": "X-New"},
           "replace": {"X-Rep": "replaced"},
           "add": {"X-Added": "static", "X-Keep": "gateway", "X-User": "$(consumer.username)",
                   "X-Who": "user=$(query.who)", "X-Ip": "$(client_ip)", "X-Echo": "$(header.x-src)"},
           "append": {"X-App": "two"}}


async def test_request_headers_are_edited_in_order(loop):
    async with Upstream() as up, gateway(doc_for(up, [HEADERS])) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        r = await c.get(base + "/a?who=al%20ice", headers=[
            ("X-Secret", "s"), ("X-Old", "moved"), ("X-New", "stale"), ("X-Rep", "orig"), ("X-Keep", "client"),
            ("X-App", "one"), ("X-Src", "src-value"), ("X-Other", "untouched")])
        assert r.status_code == 200
        got = up.requests[-1]
        assert got.header("x-secret") is None
        assert got.header("x-old") is None and got.all("x-new") == ["moved"]
        assert got.all("x-rep") == ["replaced"]
        assert got.all("x-keep") == ["client"]  # add: only when absent
        assert got.header("x-added") == "static"
        assert got.header("x-user") is None  # no consumer: a missing reference sets nothing
        assert got.header("x-who") == "user=al ice"
        assert got.header("x-ip") == "127.0.0.1"
        assert got.header("x-echo") == "src-value"
        assert got.all("x-app") == ["one", "two"]
        assert got.header("x-other") == "untouched"

        # nothing to rename or replace: client headers of those names pass as they were
        await c.get(base + "/b", headers={"X-New": "mine"})
        got = up.requests[-1]
        assert got.all("x-new") == ["mine"] and got.header("x-rep") is None
        assert got.all("x-app") == ["two"] and got.header("x-keep") == "gateway" and got.header("x-who") is None


async def test_a_template_value_that_is_not_a_header_value_is_not_set(loop):
    policy = {"type": "request-transformer", "add": {"X-Q": "$(query.q)"}}
    async with Upstream() as up, gateway(doc_for(up, [policy])) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/a?q=x%0d%0aX-Injected:%20yes")
        assert r.status_code == 200
        got = up.requests[-1]
        assert got.header("x-q") is None and got.header("x-injected") is None


async def test_transformers_on_one_route_see_each_others_edits(loop):
    first = {"type": "request-transformer", "rename": {"X-A": "X-B"}}
    second = {"type": "request-transformer", "replace": {"X-B": "second"}, "append": {"X-B": "more"}}
    async with Upstream() as up, gateway(doc_for(up, [second], global_policies=[first])) as gw, \
            httpx.AsyncClient() as c:
        await c.get(f"http://127.0.0.1:{gw.port}/a", headers={"X-A": "1"})
        got = up.requests[-1]
        assert got.header("x-a") is None and got.all("x-b") == ["second", "more"]
        await c.get(f"http://127.0.0.1:{gw.port}/a")
        assert up.requests[-1].all("x-b") == ["more"]


async def test_query_edits_keep_untouched_parameters_byte_for_byte(loop):
    policy = {"type": "request-transformer",
              "query": {"remove": ["token"], "rename": {"old": "new name"}, "replace": {"page": "2"},
                        "add": {"v": "a b&c=d+é", "keep": "never", "from": "$(header.x-from)"}}}
    async with Upstream() as up, gateway(doc_for(up, [policy])) as gw, httpx.AsyncClient() as c:
        base = f"http://127.0.0.1:{gw.port}"
        await c.get(base + "/x?keep=%2Fraw%20&token=s&old=1&page=1&flag&page=9&to%6Ben=encoded",
                    headers={"X-From": "hdr"})
        assert up.requests[-1].url == (b"/x?keep=%2Fraw%20&new%20name=1&page=2&flag"
                                       b"&v=a%20b%26c%3Dd%2B%C3%A9&from=hdr")
        await c.get(base + "/x?token=only")
        assert up.requests[-1].url == b"/x?v=a%20b%26c%3Dd%2B%C3%A9&keep=never"


async def test_path_rewrite_static_and_with_route_params(loop):
    with_param = {"type": "request-transformer", "path": "/v2/things/{id}/detail"}
    static = {"type": "request-transformer", "path": "/fixed"}
    doc = config(routes=[{"name": "p", "paths": ["/items/{id}"], "upstream": "u", "policies": [with_param]},
                         {"name": "s", "paths": ["/s/*"], "upstream": "u", "policies": [static]}],
                 upstreams=[{"name": "u", "targets": [{"address": "127.0.0.1:1"}]}])
    async with Upstream() as up:
        doc["upstreams"][0]["targets"][0]["address"] = up.address
        async with gateway(doc) as gw, httpx.AsyncClient() as c:
            base = f"http://127.0.0.1:{gw.port}"
            assert (await c.get(base + "/items/4%202?q=1")).status_code == 200
            assert up.requests[-1].url == b"/v2/things/4%202/detail?q=1"
            await c.get(base + "/s/anything/else")
            assert up.requests[-1].url == b"/fixed"


async def test_response_headers_are_edited(loop):
    def handler(req):
        return reply(200, b"ok", {"Server": "up/1.0", "X-Old": "1", "X-Rep": "a", "X-App": "one", "X-Keep": "k"})

    policy = {"type": "response-transformer", "remove": ["Server"], "rename": {"X-Old": "X-New"},
              "replace": {"X-Rep": "b", "X-Absent": "c"},
              "add": {"X-Keep": "no", "X-Added": "$(header.x-req)", "X-Missing": "$(header.x-none)"},
              "append": {"X-App": "two"}}
    async with Upstream(handler) as up, gateway(doc_for(up, [policy])) as gw, httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{gw.port}/a", headers={"X-Req": "from-request"})
        assert r.status_code == 200 and r.text == "ok"
        h = r.headers
        assert "server" not in h and "x-old" not in h and h.get_list("x-new") == ["1"]
        assert h.get_list("x-rep") == ["b"] and "x-absent" not in h
        assert h.get_list("x-keep") == ["k"] and h["x-added"] == "from-request" and "x-missing" not in h
        assert h.get_list("x-app") == ["one", "two"]
        assert h["content-type"] == "text/plain"


def _issues(doc) -> list:
    with pytest.raises(ConfigError) as info:
        load_config(doc)
    return [(i.path, i.message) for i in info.value.issues]


def test_config_errors_name_their_paths():
    up = Upstream()
    up.port = 9
    issues = _issues(doc_for(up, [
        {"type": "request-transformer", "remove": ["Host"], "add": {"X-A": "$(nope.x)"},
         "rename": {"X-Consumer-ID": "X-Id"}, "path": "no-slash"},
        {"type": "response-transformer", "replace": {"Content-Length": "1"}, "append": {"X-B": "$(client_ip"}},
    ]))
    paths = [p for p, _ in issues]
    assert "$.routes[0].policies[0].remove" in paths
    assert "$.routes[0].policies[0].add.X-A" in paths
    assert "$.routes[0].policies[0].rename.X-Consumer-ID" in paths
    assert "$.routes[0].policies[0].path" in paths
    assert "$.routes[0].policies[1].replace.Content-Length" in paths
    load_config(doc_for(up, [{"type": "response-transformer", "append": {"X-B": "$(client_ip"}}]))  # literal


def test_a_path_param_the_route_lacks_is_refused_when_built():
    from fastgate.server.generation import Generation

    up = Upstream()
    up.port = 9
    cfg = load_config(doc_for(up, [{"type": "request-transformer", "path": "/v2/{id}"}], paths=["/x/{name}"]))
    with pytest.raises(ValueError, match="`{id}` is not a parameter"):
        Generation(cfg)
