"""Access log, W3C trace context and latency headers, through real sockets and real worker processes."""
from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx

from tests.harness import Upstream, config, gateway
from tests.integration.test_supervisor import Gateway

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def proxied(up: Upstream, **extra) -> dict:
    return config(routes=[{"name": "r", "paths": ["/*"], "upstream": "u"},
                          {"name": "m", "paths": ["/mock"], "mock": {"body": "m"}}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]}], **extra)


async def test_traceparent_is_forwarded_when_valid_and_generated_otherwise(loop):
    async with Upstream() as up, gateway(proxied(up)) as gw, httpx.AsyncClient() as c:
        url = f"http://127.0.0.1:{gw.port}/x"
        await c.get(url, headers={"traceparent": TP})
        assert up.requests[-1].header("traceparent") == TP
        made = []
        for _ in range(20):
            await c.get(url)
            made.append(up.requests[-1].header("traceparent"))
        for tp in made:  # lowercase hex, ids not all zero, sampled
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp), tp
            assert int(tp[3:35], 16) and int(tp[36:52], 16)
        assert len({tp[3:35] for tp in made}) == len({tp[36:52] for tp in made}) == 20  # all new ids
        for bad in ["00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
                    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 with more
                    "00-0x00000000000000000000000000000a-00f067aa0ba902b7-01",  # not hex digits only
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f0_7aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7--1",  # a signed flag
                    "garbage"]:
            await c.get(url, headers={"traceparent": bad})
            sent = [v for k, v in up.requests[-1].headers if k.lower() == b"traceparent"]
            assert len(sent) == 1 and sent[0].decode() != bad and len(sent[0]) == 55, bad


async def test_tracing_off_passes_the_header_untouched(loop):
    async with Upstream() as up, gateway(proxied(up, tracing={"propagate": False})) as gw, \
            httpx.AsyncClient() as c:
        await c.get(f"http://127.0.0.1:{gw.port}/x", headers={"traceparent": "garbage"})
        assert up.requests[-1].header("traceparent") == "garbage"
        await c.get(f"http://127.0.0.1:{gw.port}/x")
        assert up.requests[-1].header("traceparent") is None


async def test_latency_headers_are_opt_in(loop):
    async with Upstream() as up:
        async with gateway(proxied(up)) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x")
            assert "x-upstream-latency" not in r.headers
        async with gateway(proxied(up, latency_headers=True)) as gw, httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/x")
            assert int(r.headers["x-upstream-latency"]) >= 0 and int(r.headers["x-gateway-latency"]) >= 0


def _lines(path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def test_access_log_one_line_per_request_across_workers_and_reopened_on_usr1(tmp_path):
    log = tmp_path / "access.log"
    text = f"""
access_log: {log}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: hi}}}}
"""
    gw = Gateway(tmp_path, text, workers=2)
    try:
        base = gw.url.replace("/hello", "")
        for _ in range(20):
            httpx.get(base + "/hello", headers={"traceparent": TP})
        httpx.get(base + "/missing")
        deadline = time.monotonic() + 10
        while sum(1 for x in _lines(log) if x["route"] == "hello") < 20 or not any(
                x["status"] == 404 for x in _lines(log)):
            assert time.monotonic() < deadline, _lines(log)[-3:]
            time.sleep(0.1)
        lines = _lines(log)
        hello = [x for x in lines if x["path"] == "/hello"]
        assert len({x["request_id"] for x in hello}) == len(hello)  # one line each, none twice
        first = hello[-1]
        assert first["status"] == 200 and first["method"] == "GET" and first["client_ip"] == "127.0.0.1"
        assert first["gateway_ms"] >= 0 and first["upstream_ms"] is None and first["response_bytes"] > 0
        assert first["ts"].endswith("Z")
        missing = next(x for x in lines if x["path"] == "/missing")
        assert missing["status"] == 404 and missing["route"] is None
        # logrotate: move the file away, SIGUSR1, new lines go to a new file
        os.rename(log, tmp_path / "access.log.1")
        gw.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not any(x["path"] == "/hello" for x in _lines(log)):
            assert time.monotonic() < deadline, "no line in the reopened file"
            httpx.get(base + "/hello")
            time.sleep(0.2)
    finally:
        gw.stop()


def test_access_log_lines_name_each_requests_route_api_consumer_and_client_on_one_connection(tmp_path):
    """The data plane makes a connection's and a route's part of the line once: on one keep-alive
    connection, every line must still name its own route, API, consumer, client address (a trusted
    proxy names a different one per request) and trace."""
    import hashlib
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    log = tmp_path / "access.log"
    digest = hashlib.sha256(b"alice-key").hexdigest()
    real_ip = '{type: real-ip, trusted: ["127.0.0.1/32"]}'
    gw = Gateway(tmp_path, f"""
access_log: {log}
consumers:
  - {{username: alice, keys: ["sha256:{digest}"]}}
upstreams:
  - {{name: u, targets: [{{address: "127.0.0.1:{up.server_address[1]}"}}]}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: hi}}, policies: [{real_ip}]}}
  - {{name: proxied, paths: [/up], upstream: u, policies: [{real_ip}]}}
apis:
  - name: shop
    base_path: /shop
    versions:
      - version: v1
        state: published
        routes:
          - {{name: items, paths: [/items], mock: {{body: i}}, policies: [{real_ip}, {{type: key-auth}}]}}
""", workers=1)
    sent = [("/hello", "10.0.0.1", None, None), ("/shop/items", "10.0.0.2", "alice-key", None),
            ("/up", None, None, TP), ("/hello", None, None, None), ("/shop/items", "10.0.0.1", None, None),
            ("/nowhere", "10.0.0.3", None, None), ("/up", "10.0.0.4", None, None),
            ("/shop/items", None, "alice-key", None)]
    try:
        base = gw.url.replace("/hello", "")
        with httpx.Client(base_url=base) as c:
            for path, xff, key, tp in sent:
                headers = {}
                if xff:
                    headers["x-forwarded-for"] = xff
                if key:
                    headers["apikey"] = key
                if tp:
                    headers["traceparent"] = tp
                c.get(path, headers=headers)
    finally:
        gw.stop()  # the worker flushes on its way out
        up.shutdown()
    lines = _lines(log)[-len(sent):]  # before them: the harness's own request
    got = [(x["path"], x["client_ip"], x["route"], x["api"], x["consumer"], x["status"]) for x in lines]
    assert got == [("/hello", "10.0.0.1", "hello", None, None, 200),
                   ("/shop/items", "10.0.0.2", "items", "shop", "alice", 200),
                   ("/up", "127.0.0.1", "proxied", None, None, 200),
                   ("/hello", "127.0.0.1", "hello", None, None, 200),
                   ("/shop/items", "10.0.0.1", "items", "shop", None, 401),
                   ("/nowhere", "127.0.0.1", None, None, None, 404),
                   ("/up", "10.0.0.4", "proxied", None, None, 200),
                   ("/shop/items", "127.0.0.1", "items", "shop", "alice", 200)]
    traces = [x["trace_id"] for x in lines]
    assert traces[2] == TP[3:35]  # the client's, propagated
    assert re.fullmatch("[0-9a-f]{32}", traces[6]) and traces[6] != TP[3:35]  # made for the request
    assert len({x["worker"] for x in lines}) == 1 and lines[0]["worker"] > 1


def test_access_log_sampling_keeps_errors(tmp_path):
    log = tmp_path / "access.log"
    gw = Gateway(tmp_path, f"""
access_log: {{path: {log}, sample: 0.1}}
routes:
  - {{name: hello, paths: [/hello], mock: {{body: hi}}}}
""", workers=1)
    try:
        base = gw.url.replace("/hello", "")
        with httpx.Client() as c:
            for _ in range(200):
                c.get(base + "/hello")
            for _ in range(5):
                c.get(base + "/missing")
    finally:
        gw.stop()  # the worker flushes on its way out
    lines = _lines(log)
    assert sum(x["status"] == 404 for x in lines) == 5
    assert 0 < sum(x["status"] == 200 for x in lines) < 100
