"""A property-based run of schemathesis against the admin API's own OpenAPI document, through real
HTTP: `fastgate run` with an admin listener in a subprocess (as in test_admin.py), the document
loaded from the live `GET /openapi.json`, and every operation it lists exercised with generated
requests, valid ones and invalid ones, each response checked against the document.

Checks: no 5xx (`not_a_server_error`); only documented status codes (`status_code_conformance`) and
content types (`content_type_conformance`); bodies that match the documented schemas
(`response_schema_conformance`); invalid data answered 4xx (`negative_data_rejection`); valid data
not answered 400/422 (`positive_data_acceptance`).

Bounded: a few examples per operation (about 20 s on two shared cores). Under CI=true hypothesis
draws a fixed sequence (derandomize) so a run is reproducible."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from fastgate.config.load import load_config
from fastgate.control.admin import OAUTH_ENDPOINTS, openapi_document
from fastgate.errors import ConfigError
from tests.conftest import IN_CI
from tests.integration.test_admin import TOKEN, ControlledGateway

CONFIG = """
workers: 2
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
oauth:
  enabled: true
  issuer: http://127.0.0.1:{admin}
  audience: https://api.example.com
  scopes: [orders.read, orders.write]
plans:
  - {{name: gold}}
consumers:
  - {{username: configured, plan: gold}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "one"}}}}
  - {{name: private, paths: [/private], mock: {{body: "secret"}}, policies: [{{type: key-auth}}]}}
"""

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance]
MAX_EXAMPLES = 6  # per operation and mode


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = ControlledGateway(tmp_path_factory.mktemp("schemathesis"), CONFIG)
    # something for the generated calls to find: a consumer, a developer with an app, a subscription
    g.call("POST", "/consumers", json={"username": "alice", "plan": "gold"})
    dev = g.call("POST", "/developers", json={"email": "dev@example.com"}).json()
    app = g.call("POST", "/apps", json={"name": "shop", "developer_id": dev["id"]}).json()
    g.call("POST", "/subscriptions", json={"app_id": app["id"], "plan": "gold"})
    g.call("POST", "/consumers/alice/credentials")
    yield g
    assert g.stop() == 0, g.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def api_schema(gw):
    return schemathesis.openapi.from_url(gw.admin_url + "/openapi.json", headers=AUTH, timeout=10)


# The operations, for test ids: the document this code builds, with the OAuth endpoints the config
# above serves on the admin listener. The run itself uses the live document (and a test checks that
# it lists exactly these). schemathesis's own lazy `from_fixture` loader cannot be used: it sets
# pytest's private `Function._nodeid`, gone in pytest 9.
DOCUMENT = openapi_document(oauth_endpoints=True)
OPERATIONS = [(m.upper(), path) for path, item in DOCUMENT["paths"].items() for m in item]
# what a negative case can make invalid: without parameters or a body there is nothing
NEGATABLE = {(m.upper(), path) for path, item in DOCUMENT["paths"].items() for m, op in item.items()
             if op.get("parameters") or op.get("requestBody")}
# POST /config rewrites the config file and reloads the gateway: a generated valid config (`{}` is
# one, and a "negative" case may negate a header and keep such a body) would replace the listeners
# under the run. So its cases are filtered: only those this code's loader refuses are sent (the
# server must answer them 422 and leave the file alone, which is checked after each). Valid pushes
# are test_admin.py's.
def would_load(body) -> bool:
    if not isinstance(body, dict):
        return False
    try:
        load_config(body)
    except (ConfigError, ValueError, TypeError):
        return False
    return True


# The OAuth endpoints answer 400 (RFC 6749 §5.2) for rules no schema can state: two client
# authentication methods at once (Basic and form fields), scopes beyond the client's. Their valid-data
# check is test_oauth.py's; every other check runs on them.
OAUTH_PATHS = {path for _m, path, _s in OAUTH_ENDPOINTS}
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te", "trailer"}


def run_operation(gw, op, mode: GenerationMode) -> list[int]:
    """Run one operation's cases in one mode; the statuses answered."""
    path = op.path
    # POST /config: the document gives the config's shape, but its cross-checks (an unknown upstream, a
    # duplicate route, a port taken twice) are beyond JSON Schema, so a well-shaped document may be 422
    checks = [c for c in CHECKS if not ((path in OAUTH_PATHS or path == "/config") and c is positive_data_acceptance)]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, derandomize=IN_CI, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def check(case):
        assume(path != "/config" or not would_load(case.body))
        # a generated header that frames the HTTP message itself (a negative case once sent
        # `content-length: i-oC~Sn`) is the HTTP server's to refuse (uvicorn: 400, before the app):
        # it is no input of this API's, so it is not sent
        for name in [h for h in (case.headers or {}) if h.lower() in FRAMING]:
            del case.headers[name]
        before = gw.cfg.read_bytes()
        # the real token replaces the generated one; a negative case that left the header out (or an
        # OAuth endpoint, where the client authenticates itself) is sent as generated
        sent = {k.lower() for k in case.headers or {}}
        headers = AUTH if "authorization" in sent and path not in OAUTH_PATHS else None
        response = case.call_and_validate(base_url=gw.admin_url, headers=headers, checks=checks, timeout=10)
        statuses.append(response.status_code)
        assert gw.cfg.read_bytes() == before, "the config file changed"

    statuses: list[int] = []
    check()
    return statuses


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_the_document(gw, api_schema, method, path):
    op = api_schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if (method, path) in NEGATABLE else [])
    for mode in modes:
        statuses = run_operation(gw, op, mode)
        if mode is GenerationMode.POSITIVE and path not in OAUTH_PATHS:
            # valid cases got past the token check: the run tested the handlers (an OAuth client is
            # generated, so unknown: 401 there)
            assert any(s != 401 for s in statuses), statuses


def test_the_live_document_lists_every_operation(gw, api_schema):
    live = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    # schemathesis leaves out the operation that serves the document itself
    assert live | {("GET", "/openapi.json")} == set(OPERATIONS)
    assert httpx.get(gw.admin_url + "/openapi.json").status_code == 401


def test_the_document_lists_the_scopes_a_client_may_be_given(gw):
    """Found by the run: any scope string was valid per the document, and the server refused those
    outside `oauth.scopes` with 422. The document now says which."""
    doc = gw.call("GET", "/openapi.json").json()
    for name in ("OAuthClientCreate", "OAuthClientUpdate"):
        assert doc["components"]["schemas"][name]["properties"]["scopes"]["items"] == {
            "enum": ["orders.read", "orders.write"]}
    app = gw.call("POST", "/apps", json={"name": "scoped"}).json()
    assert gw.call("POST", f"/apps/{app['id']}/oauth-clients", json={"scopes": ["orders.read"]}).status_code == 201
    r = gw.call("POST", f"/apps/{app['id']}/oauth-clients", json={"scopes": ["other"]})
    assert r.status_code == 422 and "scopes" in r.json()["detail"]
    r = gw.call("POST", f"/apps/{app['id']}/oauth-clients", json={"scopes": "orders.read"})
    assert r.status_code == 422 and "at `$.scopes`" in r.json()["detail"], r.text
    r = gw.call("PATCH", "/oauth-clients/nope", json={"scopes": [1]})
    assert r.status_code == 422 and "at `$.scopes[0]`" in r.json()["detail"], r.text
