"""The config loader reports every error at once, each with its path and a hint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastgate.config import load_config, load_file
from fastgate.config.schema import Config
from fastgate.errors import ConfigError

GOOD = {
    "listeners": [{"kind": "proxy", "port": 8000}],
    "upstreams": [{"name": "u", "targets": [{"address": "127.0.0.1:9001"}]}],
    "routes": [{"name": "r", "paths": ["/users/{id}"], "upstream": "u", "path_rewrite": "/v1/{id}"}],
}


def issues_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        load_config(doc)
    return {i.path: i.message for i in ei.value.issues}


def test_good_config_loads():
    cfg = load_config(GOOD)
    assert isinstance(cfg, Config)
    assert cfg.routes[0].path_rewrite == "/v1/{id}"
    assert cfg.limits.max_body_bytes == 1048576


def test_empty_document_gets_defaults():
    cfg = load_config(None)
    assert cfg.listeners[0].port == 8000 and cfg.workers == 1


def test_every_error_is_reported_with_its_path():
    doc = {
        "workers": "many",
        "listeners": [{"kind": "proxy", "port": 70000}],
        "limits": {"max_headers": 0, "header_timout": 3},
        "upstreams": [{"name": "u", "targets": []}],
        "routes": [
            {"name": "a", "paths": ["/x"], "upstream": "nope"},
            {"name": "b", "paths": ["no-slash"], "upstream": "u", "methods": ["FETCH"]},
            {"name": "c", "paths": ["/y"]},
        ],
    }
    found = issues_of(doc)
    assert "$.workers" in found
    assert "$.listeners[0].port" in found
    assert "$.limits.max_headers" in found
    assert "$.limits.header_timout" in found and found["$.limits.header_timout"] == "unknown field"
    assert "$.upstreams[0].targets" in found
    assert "$.routes[1].methods[0]" in found
    assert "$.routes[2]" in found and "exactly one of" in found["$.routes[2]"]
    assert len(found) >= 7


def test_huge_counts_are_config_errors_not_crashes():
    """Counts and sizes reach C integers in the data plane: past 2**53-1 they are errors with a path."""
    doc = {"limits": {"max_body_bytes": 2**70, "max_uri_bytes": 2**63, "max_header_bytes": 2**64},
           "upstreams": [{"name": "u", "targets": [{"address": "127.0.0.1:9"}], "pool": {"max_requests": 2**64}}],
           "routes": [{"name": "r", "paths": ["/"], "upstream": "u", "priority": -(2**63)}]}
    found = issues_of(doc)
    assert {"$.limits.max_body_bytes", "$.limits.max_uri_bytes", "$.limits.max_header_bytes",
            "$.upstreams[0].pool.max_requests", "$.routes[0].priority"} <= set(found)
    doc["limits"] = {"max_body_bytes": 2**53 - 1, "max_uri_bytes": 2**53 - 1, "max_header_bytes": 2**53 - 1}
    doc["upstreams"][0]["pool"]["max_requests"] = 2**53 - 1
    doc["routes"][0]["priority"] = 0
    cfg = load_config(doc)
    assert cfg.upstreams[0].pool.max_requests == 2**53 - 1


def test_unknown_field_hint_suggests_the_close_name():
    with pytest.raises(ConfigError) as ei:
        load_config({"routes": [{"name": "a", "path": ["/x"], "mock": {}}]})
    by_path = {i.path: i for i in ei.value.issues}
    assert "did you mean `paths`" in by_path["$.routes[0].path"].hint
    assert "$.routes[0].paths" in by_path  # the missing required field too


def test_cross_references_are_checked():
    doc = json.loads(json.dumps(GOOD))
    doc["routes"].append({"name": "r", "paths": ["/a/{x}/{x}"], "upstream": "v"})
    doc["routes"].append({"name": "s", "paths": ["/users/{id}"], "upstream": "u", "path_rewrite": "/{nope}"})
    doc["consumers"] = [{"username": "alice", "plan": "gold"}]
    found = issues_of(doc)
    assert "duplicate route name" in found["$.routes[1]"]
    assert "unknown upstream" in found["$.routes[1].upstream"]
    assert "$.routes[1].paths[0]" in found
    assert "$.routes[2].path_rewrite" in found
    assert "same host, path" in found["$.routes[2].paths[0]"]
    assert "unknown plan" in found["$.consumers[0].plan"]


def test_unknown_policy_type_is_named():
    doc = json.loads(json.dumps(GOOD))
    doc["routes"][0]["policies"] = [{"type": "response-header", "add": {"X": "y"}}]
    found = issues_of(doc)
    assert "unknown type `response-header`" in found["$.routes[0].policies[0].type"]


@pytest.mark.parametrize("tag", [["key-auth"], {"name": "key-auth"}, 7, True])
def test_a_policy_type_that_is_not_a_string_is_an_error_not_a_crash(tag):
    """Found by schemathesis through POST /config: an unhashable `type` raised TypeError (a 500)."""
    doc = json.loads(json.dumps(GOOD))
    doc["routes"][0]["policies"] = [{"type": tag}]
    found = issues_of(doc)
    assert "$.routes[0].policies[0].type" in found


def test_bad_target_address_and_syntax_error(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["upstreams"][0]["targets"][0]["address"] = "localhost"
    assert "not host:port" in issues_of(doc)["$.upstreams[0].targets[0].address"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n")
    with pytest.raises(ConfigError) as ei:
        load_file(bad)
    assert "not valid YAML" in ei.value.issues[0].message


@pytest.mark.parametrize("suffix,dump", [
    (".json", json.dumps),
    (".yaml", lambda d: json.dumps(d)),  # JSON is YAML
    (".toml", None),
])
def test_formats(tmp_path, suffix, dump):
    f = tmp_path / f"c{suffix}"
    if dump is None:
        f.write_text('[[upstreams]]\nname = "u"\n[[upstreams.targets]]\naddress = "127.0.0.1:9001"\n'
                     '[[routes]]\nname = "r"\npaths = ["/x"]\nupstream = "u"\n')
    else:
        f.write_text(dump(GOOD))
    assert load_file(f).upstreams[0].name == "u"


def test_fastgate_check_cli_prints_every_error_and_exits_1(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("workers: 0\nroutes:\n  - {name: a, paths: [/x], upstream: nope}\n  - {name: b, paths: [x], mock: {}}\n")
    r = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "$.routes[0].upstream" in r.stderr and "$.routes[1].paths[0]" in r.stderr and "$.workers" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", "config/fastgate.yaml"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


OAUTH_LISTENERS = [{"kind": "proxy", "port": 8000}, {"kind": "admin", "port": 8001}]


def test_oauth_section_loads_with_defaults():
    cfg = load_config({"listeners": OAUTH_LISTENERS, "admin": {"token": "t" * 16},
                       "oauth": {"enabled": True, "issuer": "https://auth.example.com", "audience": "api"}})
    o = cfg.oauth
    assert o.enabled and o.algorithm == "RS256" and o.token_lifetime == 3600 and o.scopes == []
    assert load_config(None).oauth.enabled is False  # off unless asked for


def test_oauth_section_errors_are_all_reported_with_paths():
    found = issues_of({"listeners": OAUTH_LISTENERS, "admin": {"token": "t" * 16}, "oauth": {
        "enabled": True, "issuer": "https://auth.example.com/tenant", "audience": "api", "algorithm": "HS256",
        "token_lifetime": 5, "scopes": ["ok", "not ok"], "key_file": "/tmp/k.pem"}})
    assert "$.oauth.issuer" in found  # a path in the issuer: refused (the endpoints are at its root)
    assert "$.oauth.algorithm" in found
    assert "$.oauth.token_lifetime" in found
    assert "$.oauth.scopes[1]" in found and "$.oauth.scopes[0]" not in found
    assert found["$.oauth.key_file"] == "unknown field"
    assert len(found) == 5


def test_oauth_enabled_needs_issuer_audience_and_an_admin_listener():
    found = issues_of({"oauth": {"enabled": True, "audience": "api"}})
    assert "issuer" in found["$.oauth"]
    found = issues_of({"oauth": {"enabled": True, "issuer": "https://auth.example.com"}})
    assert "audience" in found["$.oauth"]
    found = issues_of({"oauth": {"enabled": True, "issuer": "https://auth.example.com", "audience": "api"}})
    assert "admin listener" in found["$.oauth.enabled"]


def test_jwt_check_revoked_is_a_boolean():
    doc = json.loads(json.dumps(GOOD))
    doc["routes"][0]["policies"] = [{"type": "jwt", "jwks_url": "https://idp/jwks", "check_revoked": "sometimes"}]
    assert "$.routes[0].policies[0].check_revoked" in issues_of(doc)


def test_fastgate_check_reports_oauth_errors_with_paths(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("oauth: {enabled: true, issuer: 'ftp://x', audience: api, algorthm: ES256}\n")
    r = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "$.oauth.issuer" in r.stderr and "$.oauth.algorthm" in r.stderr and "did you mean `algorithm`" in r.stderr
