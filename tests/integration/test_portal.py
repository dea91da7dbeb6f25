"""The developer portal with real processes: `fastgate run` with proxy, admin and portal listeners,
driven by a real headless browser (Playwright over Debian's chromium) — sign up, sign in, an app, a
plan, a key shown once that works through the gateway, try-it, revoke — plus CSRF, the sign-in
rate limit and the catalog's search over plain HTTP (httpx)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import free_port, screenshot, wait_for

TOKEN = "test-admin-token-0123456789"
CHROMIUM = os.environ.get("FASTGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NO_CHROMIUM = "chromium not found: apt-get install chromium (Debian's package; Playwright's own browsers are not used)"

OPENAPI = """
openapi: 3.0.3
info: {title: Pet store, version: "2.0", description: Find and list the pets.}
paths:
  /v2/list:
    get:
      summary: List the pets
      operationId: listPets
      parameters:
        - {name: limit, in: query, required: false, description: how many at most, schema: {type: integer}}
      responses:
        "200":
          description: the pets
          content:
            application/json:
              schema: {type: array, items: {$ref: "#/components/schemas/Pet"}}
              example: [{name: Rex}]
components:
  schemas:
    Pet: {type: object, required: [name], properties: {name: {type: string}}}
"""

CONFIG = """
workers: 1
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
  - {{kind: portal, address: 127.0.0.1, port: {portal}}}
plans:
  - {{name: gold, rate_limits: [{{rate: 100, per: 1}}], quotas: [{{limit: 1000, period: day}}]}}
  - {{name: platinum, approval: true}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "one"}}}}
apis:
  - name: pets
    base_path: /pets
    openapi: pets.yaml
    versions:
      - {{version: v1, state: deprecated, sunset: "Sun, 01 Jun 2031 00:00:00 GMT", successor: v2,
          routes: [{{name: pets-v1, paths: [/v1/list], mock: {{json: []}}, policies: [{{type: key-auth}}]}}]}}
      - {{version: v2, routes: [{{name: pets-v2, paths: [/v2/list], mock: {{json: [{{name: Rex}}]}},
          policies: [{{type: key-auth}}]}}]}}
"""



class PortalGateway:
    def __init__(self, tmp: Path):
        self.port, self.admin_port, self.portal_port = free_port(), free_port(), free_port()
        (tmp / "pets.yaml").write_text(OPENAPI)
        cfg = tmp / "gw.yaml"
        cfg.write_text(CONFIG.format(db=tmp / "store.db", port=self.port, admin=self.admin_port,
                                     portal=self.portal_port))
        self.log = tmp / "gw.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "-c", str(cfg), "--pid-file", str(tmp / "gw.pid")],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN})
        self.url = f"http://127.0.0.1:{self.port}"
        self.portal = f"http://127.0.0.1:{self.portal_port}"
        try:
            wait_for(lambda: httpx.get(self.url + "/hello", timeout=1).status_code == 200, 20, "the proxy")
            wait_for(lambda: httpx.get(self.portal + "/", timeout=2).status_code == 200, 20, "the portal")
        except AssertionError:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text()) from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = PortalGateway(tmp_path_factory.mktemp("portal"))
    yield g
    assert g.stop() == 0, g.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_catalog_lists_and_searches_apis_with_docs(gw):
    with httpx.Client(base_url=gw.portal, timeout=10) as c:
        home = c.get("/")
        assert home.status_code == 200 and "Pet store" in home.text and "/hello" in home.text
        assert "pets" in c.get("/", params={"q": "pet"}).text
        found = c.get("/", params={"q": "list the pets"})
        assert 'href="/apis/pets"' in found.text
        nothing = c.get("/", params={"q": "no-such-thing-here"})
        assert 'href="/apis/pets"' not in nothing.text and "Nothing matches" in nothing.text
        api = c.get("/apis/pets").text
        assert "v1" in api and "deprecated" in api and "Sun, 01 Jun 2031" in api and "v2" in api
        op = c.get("/apis/pets/ops/0").text
        assert "limit" in op and "how many at most" in op and "Rex" in op and "properties" in op
        assert c.get("/apis/nope").status_code == 404


def test_catalog_shows_the_lifecycle_state_set_through_the_admin_api(gw):
    admin = httpx.Client(base_url=f"http://127.0.0.1:{gw.admin_port}", timeout=10,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    with admin, httpx.Client(base_url=gw.portal, timeout=10) as c:
        r = admin.put("/apis/pets/versions/v1/state", json={"state": "retired", "successor": "v2"})
        assert r.status_code == 200, r.text
        try:
            page = c.get("/apis/pets").text
            assert "Version <strong>v1</strong> is retired" in page and "Sun, 01 Jun 2031" in page
            assert "v1 <em>(retired)</em>" in c.get("/").text
            r = admin.put("/apis/pets/versions/v2/state", json={"state": "draft"})
            assert r.status_code == 200, r.text
            assert "<td>v2</td>" not in c.get("/apis/pets").text  # a draft is not in the catalog
        finally:
            admin.delete("/apis/pets/versions/v1/state")
            admin.delete("/apis/pets/versions/v2/state")
        page = c.get("/apis/pets").text
        assert "Version <strong>v1</strong> is deprecated" in page and "<td>v2</td>" in page


def test_developer_flow_in_a_browser(gw, browser):
    page = browser.new_page()
    page.goto(gw.portal + "/signup")
    page.fill("input[name=email]", "dev@example.com")
    page.fill("input[name=name]", "Dev")
    page.fill("input[name=password]", "correct horse battery")
    page.click("#signup button[type=submit]")
    page.wait_for_url("**/signin**")
    page.fill("input[name=password]", "correct horse battery")
    page.click("#signin button[type=submit]")
    page.wait_for_url("**/apps")
    cookie = next(c for c in page.context.cookies() if c["name"] == "fg_portal")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    page.fill("#new-app input[name=name]", "my-app")
    page.click("#new-app button[type=submit]")
    page.wait_for_url(re.compile(r".*/apps/\d+$"))
    app_url = page.url
    assert page.locator("#new-key-form").count() == 0  # no key before a subscription

    # a plan that needs an admin's approval: pending, still no key
    page.select_option("#subscribe select[name=plan]", "platinum")
    page.click("#subscribe button[type=submit]")
    page.wait_for_selector("#subscriptions")
    assert "pending" in page.inner_text("#subscriptions")
    assert page.locator("#new-key-form").count() == 0

    page.goto(gw.portal + "/apis/pets")
    page.select_option("#subscribe select[name=plan]", "gold")
    page.click("#subscribe button[type=submit]")
    page.wait_for_url(app_url)
    assert "active" in page.inner_text("#subscriptions")

    page.click("#new-key-form button[type=submit]")
    page.wait_for_selector("#key-value")
    key = page.inner_text("#key-value").strip()
    assert key.startswith("fg_")
    page.reload()
    assert page.locator("#key-value").count() == 0 and key not in page.content()  # shown once
    assert "active" in page.inner_text("#keys")

    def status(k):
        return httpx.get(gw.url + "/pets/v2/list", headers={"apikey": k}, timeout=5).status_code

    assert status("fg_not-a-key-at-all") == 401
    wait_for(lambda: status(key) == 200, 10, "the new key to reach the worker")

    page.goto(gw.portal + "/apis/pets/ops/0")
    page.fill("#try input[name=key]", key)
    page.click("#try button[type=submit]")
    page.wait_for_selector("#result-status")
    assert page.inner_text("#result-status") == "200"
    assert "Rex" in page.inner_text("#result-body")
    screenshot(page, "portal-try-it")

    # the call shows in the app's usage chart (the ledger is written about once a second)
    def usage_rows():
        page.goto(app_url)
        rows = page.locator("#usage tr[data-period]")
        return rows.count() and sum(int(rows.nth(i).get_attribute("data-requests")) for i in range(rows.count()))

    wait_for(usage_rows, 15, "the try-it call in the usage chart")
    assert page.locator("#usage-chart svg rect.requests").count() >= 1
    assert page.locator("#usage-chart svg polyline.latency").count() == 1
    quota = page.locator(".quota[data-period=day]")
    assert quota.get_attribute("data-limit") == "1000" and int(quota.get_attribute("data-used")) >= 1
    screenshot(page, "portal-app-usage")

    page.goto(app_url)
    page.click("#keys button.revoke")
    page.wait_for_selector("#keys .key-state:has-text('revoked')")
    wait_for(lambda: status(key) == 401, 10, "the revoked key to be refused")
    page.close()


def test_post_without_csrf_token_is_refused(gw):
    with httpx.Client(base_url=gw.portal, timeout=10) as c:
        c.get("/signin")
        assert c.post("/signin", data={"email": "dev@example.com", "password": "correct horse battery"}
                      ).status_code == 403
        assert c.post("/signin", data={"csrf": "forged", "email": "dev@example.com",
                                       "password": "correct horse battery"}).status_code == 403
    # no session at all: refused too
    assert httpx.post(gw.portal + "/apps", data={"name": "x"}, timeout=10).status_code == 403


def test_signin_failures_are_rate_limited(gw):
    with httpx.Client(base_url=gw.portal, timeout=10) as c:
        token = csrf_of(c.get("/signin").text)
        codes = [c.post("/signin", data={"csrf": token, "email": "dev@example.com", "password": "wrong password!"}
                        ).status_code for _ in range(5)]
        assert codes == [401] * 5
        r = c.post("/signin", data={"csrf": token, "email": "dev@example.com", "password": "correct horse battery"})
        assert r.status_code == 429 and "Too many" in r.text


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_new_developers_wait_for_approval_when_the_config_asks(tmp_path):
    """In-process (Starlette's TestClient over the same app the control process serves)."""
    from starlette.testclient import TestClient

    from fastgate.config.load import load_config
    from fastgate.control.portal import create_portal
    from fastgate.control.store import Store

    cfg = load_config({"portal": {"approval": True}, "store": {"path": str(tmp_path / "s.db")},
                       "routes": [{"name": "hello", "paths": ["/hello"], "mock": {"body": "one"}}]})
    store = Store(cfg.store.path)
    try:
        c = TestClient(create_portal(store, cfg, TOKEN), base_url="http://127.0.0.1")
        form = {"email": "new@example.com", "password": "a long enough password"}
        r = c.post("/signup", data={**form, "csrf": csrf_of(c.get("/signup").text)})
        assert r.status_code == 202 and "approve" in r.text
        r = c.post("/signin", data={**form, "csrf": csrf_of(c.get("/signin").text)}, follow_redirects=False)
        assert r.status_code == 403 and "approval" in r.text
        pending = c.get("/admin/developers/pending", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert [d["email"] for d in pending] == ["new@example.com"] and "password_hash" not in pending[0]
        assert c.post(f"/admin/developers/{pending[0]['id']}/approve").status_code == 401
        assert c.post(f"/admin/developers/{pending[0]['id']}/approve",
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = c.post("/signin", data={**form, "csrf": csrf_of(c.get("/signin").text)}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/apps"
        assert store.list_developers()[0]["email"] == "new@example.com"
        assert "password_hash" not in store.list_developers()[0]
    finally:
        store.close()
