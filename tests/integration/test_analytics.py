"""Analytics with real processes: `fastgate run` (2 workers) with admin and metrics listeners and
key-auth consumers. The usage ledger counts every answered request exactly once, across a reload
(SIGHUP) in the middle; its CSV export (API and `fastgate usage export`) matches; the summary's
counts match what was sent; the dashboard renders in a real headless browser (Debian chromium)."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fastgate.policies.auth import hash_key
from tests.harness import dead_port, free_port, screenshot, wait_for

TOKEN = "test-admin-token-analytics-0123"
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef00", "carol": "carol-key-0123456789abcdef"}

CONFIG = """
workers: 2
store: {{path: {db}}}
admin: {{token_env: FG_TEST_ADMIN_TOKEN}}
listeners:
  - {{kind: proxy, address: 127.0.0.1, port: {port}}}
  - {{kind: admin, address: 127.0.0.1, port: {admin}}}
  - {{kind: metrics, address: 127.0.0.1, port: {metrics}}}
plans:
  - {{name: gold}}
  - {{name: silver}}
consumers:
  - {{username: alice, plan: gold, keys: ["{ka}"]}}
  - {{username: bob, plan: silver, keys: ["{kb}"]}}
  - {{username: carol, plan: gold, keys: ["{kc}"]}}
upstreams:
  - {{name: backend, targets: [{{address: "127.0.0.1:{dead}"}}]}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: "hi"}}}}
  - name: limited
    paths: [/limited]
    mock: {{body: "ok"}}
    policies: [{{type: key-auth}}, {{type: rate-limit, rate: 2, per: 3600, key: route}}]
apis:
  - name: shop
    base_path: /shop
    policies: [{{type: key-auth}}]
    versions:
      - version: v1
        state: published
        routes:
          - {{name: shop-items, paths: [/items], mock: {{json: [1, 2]}}}}
          - {{name: shop-missing, paths: [/missing], mock: {{status: 404, body: "no"}}}}
"""



class Gateway:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = tmp / "store.db"
        self.port, self.admin_port, self.metrics_port = free_port(), free_port(), free_port()
        self.cfg = tmp / "gw.yaml"
        self.cfg.write_text(CONFIG.format(db=self.db, port=self.port, admin=self.admin_port, metrics=self.metrics_port,
                                          ka=hash_key(KEYS["alice"]), kb=hash_key(KEYS["bob"]),
                                          kc=hash_key(KEYS["carol"]), dead=dead_port()))
        self.log = tmp / "gw.log"
        self.env = {**os.environ, "FG_TEST_ADMIN_TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "-c", str(self.cfg), "--pid-file", str(tmp / "gw.pid")],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=self.env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.admin = httpx.Client(base_url=self.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        self.client = httpx.Client(base_url=self.url, timeout=5)
        try:
            wait_for(lambda: self.client.get("/hello").status_code == 200, 20, "the proxy")
            wait_for(lambda: self.admin.get("/status").status_code == 200, 20, "the admin API")
        except AssertionError:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text()) from None

    def send(self, consumer: str, path: str) -> int:
        return self.client.get(path, headers={"apikey": KEYS[consumer]}).status_code

    def usage(self, **params) -> list[dict]:
        r = self.admin.get("/usage", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def totals(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = {}
        for row in self.usage():
            t = out.setdefault(row["consumer"], [0, 0])
            t[0] += row["requests"]
            t[1] += row["errors"]
        return {k: tuple(v) for k, v in out.items()}

    def stop(self) -> int:
        self.admin.close()
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("analytics"))
    yield g
    assert g.stop() == 0, g.log.read_text()[-3000:]


# what the module sends: consumer → (requests, of which 4xx/5xx)
SENT: dict[str, list[int]] = {"alice": [0, 0], "bob": [0, 0], "carol": [0, 0]}
ROUTES: dict[str, list[int]] = {}  # route → [requests, 4xx]


def _send(gw, consumer: str, path: str, route: str, expect: int) -> None:
    status = gw.send(consumer, path)
    assert status == expect, (consumer, path, status)
    SENT[consumer][0] += 1
    SENT[consumer][1] += status >= 400
    r = ROUTES.setdefault(route, [0, 0])
    r[0] += 1
    r[1] += 400 <= status < 500


def _expected() -> dict[str, tuple[int, int]]:
    return {k: tuple(v) for k, v in SENT.items() if v[0]}


def test_ledger_exact_across_reload(gw):
    for _ in range(30):
        _send(gw, "alice", "/shop/items", "shop-items", 200)
    for _ in range(7):
        _send(gw, "alice", "/shop/missing", "shop-missing", 404)
    for _ in range(12):
        _send(gw, "bob", "/shop/items", "shop-items", 200)
    wait_for(lambda: gw.totals() == _expected(), 15, "the ledger to count the first batch")

    # a reload in the middle: new workers start, the old ones drain and write what they counted
    os.kill(gw.proc.pid, signal.SIGHUP)
    for i in range(40):  # requests during and after the reload
        _send(gw, "bob" if i % 2 else "carol", "/shop/items", "shop-items", 200)
    for _ in range(5):
        _send(gw, "carol", "/shop/missing", "shop-missing", 404)
    wait_for(lambda: "reloaded: generation 2" in gw.log.read_text(), 20, "the reload")
    wait_for(lambda: gw.admin.get("/status").status_code == 200, 20, "the admin API after the reload")
    for _ in range(9):
        _send(gw, "alice", "/shop/items", "shop-items", 200)
    wait_for(lambda: gw.totals() == _expected(), 15, "the ledger to count every request")
    time.sleep(2.5)  # several more worker ticks: nothing counted twice, nothing more appears
    assert gw.totals() == _expected()

    rows = gw.usage()
    by_key = {(r["consumer"], r["plan"], r["api"]) for r in rows}
    assert ("alice", "gold", "shop") in by_key and ("bob", "silver", "shop") in by_key
    assert all(r["granularity"] == "hour" and r["period"].endswith(":00:00Z") for r in rows)
    day = gw.usage(granularity="day")
    assert sum(r["requests"] for r in day) == sum(v[0] for v in SENT.values())
    only = gw.usage(consumer="carol")
    assert {r["consumer"] for r in only} == {"carol"} and sum(r["requests"] for r in only) == SENT["carol"][0]
    future = gw.usage(**{"from": str(int(time.time()) + 7200)})
    assert future == []


def test_anonymous_and_rejected_requests_are_not_billed(gw):
    before = gw.totals()
    assert gw.client.get("/hello").status_code == 200  # no consumer
    assert gw.client.get("/shop/items", headers={"apikey": "wrong-key-wrong-key"}).status_code == 401
    ROUTES["shop-items"][0] += 1  # answered (401) on the route: in the metrics, not in the ledger
    ROUTES["shop-items"][1] += 1
    time.sleep(2.5)
    assert gw.totals() == before


def test_csv_export_matches(gw):
    wait_for(lambda: gw.totals() == _expected(), 15, "the ledger")
    r = gw.admin.get("/usage", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and set(rows[0]) == {"period", "granularity", "consumer", "plan", "api", "requests", "errors",
                                     "avg_latency_ms"}
    as_json = gw.usage()
    # every row counts answered requests, each of which took some time at the gateway
    assert all(x["requests"] > 0 and x["avg_latency_ms"] > 0 for x in as_json)
    assert [float(x["avg_latency_ms"]) for x in rows] == [x["avg_latency_ms"] for x in as_json]
    assert [(x["period"], x["consumer"], x["plan"], x["api"], int(x["requests"]), int(x["errors"])) for x in rows] == \
        [(x["period"], x["consumer"], x["plan"], x["api"], x["requests"], x["errors"]) for x in as_json]
    # the CLI wrapper
    out = subprocess.run([sys.executable, "-m", "fastgate", "usage", "export", "--format", "csv",
                          "--admin-url", gw.admin_url, "--granularity", "day", "--consumer", "alice"],
                         env={**os.environ, "FASTGATE_ADMIN_TOKEN": TOKEN}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    cli_rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert {x["consumer"] for x in cli_rows} == {"alice"}
    assert sum(int(x["requests"]) for x in cli_rows) == SENT["alice"][0]
    assert sum(int(x["errors"]) for x in cli_rows) == SENT["alice"][1]
    assert all(x["granularity"] == "day" for x in cli_rows)
    bad = gw.admin.get("/usage", params={"granularity": "week"})
    assert bad.status_code == 422
    assert httpx.get(gw.admin_url + "/usage").status_code == 401


def test_summary_consistent_with_requests(gw):
    for i in range(5):
        _send(gw, "alice", "/limited", "limited", 200 if i < 2 else 429)
    wait_for(lambda: gw.totals() == _expected(), 15, "the ledger")

    def check():
        s = gw.admin.get("/analytics/summary", params={"window": "1h"}).json()
        routes = {r["route"]: r for r in s["top_routes"]}
        for name, (n, n4xx) in ROUTES.items():
            if name not in routes or routes[name]["requests"] != n or routes[name]["status"]["4xx"] != n4xx:
                return None
        return s

    s = wait_for(check, 20, "the summary's route counts")
    assert s["window"] == "1h" and s["seconds"] == 3600
    assert routes_limited(s) == 3 and s["rate_limited"] >= 3
    consumers = {c["consumer"]: (c["requests"], c["errors"]) for c in s["top_consumers"]}
    assert consumers == _expected()
    assert s["requests"] >= sum(v[0] for v in SENT.values())  # plus the harness's /hello probes
    assert s["status"]["4xx"] >= sum(v[1] for v in SENT.values()) + 1  # + the 401 of the wrong key
    assert s["latency"]["p50"] is not None and s["latency"]["p50"] <= s["latency"]["p95"] <= s["latency"]["p99"]
    assert s["rps"] == pytest.approx(s["requests"] / 3600, abs=1e-3)
    assert s["error_rate"] == 0.0
    assert s["worker_restarts"] == 0
    assert [u["target"] for u in s["upstreams"]] and s["upstreams"][0]["upstream"] == "backend"
    assert len(s["series"]) == 360 and sum(p["requests"] for p in s["series"]) == s["requests"]
    d = gw.admin.get("/analytics/summary", params={"window": "1d"}).json()
    assert d["requests"] >= s["requests"] and len(d["series"]) == 1440
    assert gw.admin.get("/analytics/summary", params={"window": "1w"}).status_code == 422


def routes_limited(s) -> int:
    return next(r["limited"] for r in s["top_routes"] if r["route"] == "limited")


def test_series_written_to_store(gw):
    import sqlite3

    def rows():
        with sqlite3.connect(gw.db) as c:
            return c.execute("SELECT res, SUM(c2 + c4) FROM metric_series WHERE route = 'shop-items' "
                             "GROUP BY res").fetchall()

    got = wait_for(lambda: dict(rows()).get(10) == ROUTES["shop-items"][0] and dict(rows()), 25,
                   "a 10 s snapshot with every shop-items request")
    assert got[60] == got[10]  # the minute rows hold the same counts (downsampled on write)


# --- the dashboard in a real browser ----------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_dashboard_in_browser(gw):
    chromium = _chromium()
    if chromium is None:
        msg = "no chromium: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        msg = "playwright missing: pip install playwright (the browser: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)

    assert httpx.get(gw.admin_url + "/dashboard", follow_redirects=False).headers["location"] == "/dashboard/login"
    wait_for(lambda: gw.totals() == _expected(), 15, "the ledger")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            # the login form sets the cookie
            page.goto(gw.admin_url + "/dashboard")
            assert page.url.endswith("/dashboard/login")
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            assert page.locator("#error").inner_text() == "wrong token"
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#summary")
            assert page.url.endswith("/dashboard")
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies["fastgate_dashboard"]["httpOnly"] and TOKEN not in cookies["fastgate_dashboard"]["value"]
            check_page(page, gw, "1h")
            screenshot(page, "dashboard-1h")
            page.click("text=last 1d")
            page.wait_for_selector("#summary[data-window='1d']")
            check_page(page, gw, "1d")
            screenshot(page, "dashboard-1d")

            # ?token= once, in a fresh context: the cookie is set and the token leaves the URL
            ctx = browser.new_context()
            page2 = ctx.new_page()
            page2.goto(gw.admin_url + f"/dashboard?token={TOKEN}&window=1h")
            page2.wait_for_selector("#summary")
            assert "token=" not in page2.url and "window=1h" in page2.url
            ctx.close()
        finally:
            browser.close()


def check_page(page, gw, window: str) -> None:
    charts = page.locator("figure.chart svg")
    assert charts.count() == 5
    assert page.locator("figure.chart svg polyline").count() >= 5  # rps, p50/p95/p99, error rate
    assert page.locator("figure.chart svg rect").count() >= 1  # the rate-limit rejections' bar
    for title in ("Requests per second", "Latency", "Error rate", "Rate-limit rejections", "Worker restarts"):
        assert page.locator("figcaption", has_text=title).count() == 1
    s = gw.admin.get("/analytics/summary", params={"window": window}).json()
    # the page's numbers are the API's (the harness sends nothing in between)
    assert int(page.locator("#requests").inner_text()) == s["requests"]
    assert int(page.locator("#rate-limited").inner_text()) == s["rate_limited"]
    assert int(page.locator("#restarts").inner_text()) == s["worker_restarts"]
    assert int(page.locator("#client-errors").inner_text()) == s["client_errors"]
    for c in s["top_consumers"]:
        row = page.locator(f"#top-consumers tr[data-consumer='{c['consumer']}'] td")
        assert int(row.nth(1).inner_text()) == c["requests"] == SENT[c["consumer"]][0]
    for r in s["top_routes"]:
        row = page.locator(f"#top-routes tr[data-route='{r['route']}'] td")
        assert int(row.nth(1).inner_text()) == r["requests"]
    assert page.locator("#upstreams td", has_text="backend").count() == 1
