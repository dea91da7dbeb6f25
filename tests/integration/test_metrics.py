"""Prometheus /metrics across real worker processes: one host-wide count, kept over reloads."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import free_port
from tests.integration.test_supervisor import Gateway

CONFIG = """
listeners:
  - {kind: proxy, port: 8000}
  - {kind: metrics, address: 127.0.0.1, port: %d}
routes:
  - {name: hello, paths: [/hello], mock: {body: hi}}
  - name: limited
    paths: [/m]
    mock: {body: ok}
    policies: [{type: rate-limit, rate: 5, per: 3600, key: route}]
"""


def scrape(port: int) -> dict[str, float]:
    """/metrics through the Prometheus client's own text parser (a malformed exposition raises),
    as {'name{label="v",...}': value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def wait_for(port: int, want: dict[str, float], timeout: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = scrape(port)
        if all(got.get(k) == v for k, v in want.items()):
            return got
        time.sleep(0.2)
    raise AssertionError(f"wanted {want}, last scrape had "
                         f"{ {k: got.get(k) for k in want} }")


def test_metrics_are_summed_over_workers_and_survive_reloads(tmp_path):
    mport = free_port()
    gw = Gateway(tmp_path, CONFIG % mport, workers=2)
    try:
        base = gw.url.replace("/hello", "")
        with httpx.Client() as c:
            gw_hello = sum(1 for _ in range(30) if httpx.get(base + "/hello").status_code == 200)  # new connections
            statuses = [c.get(base + "/m").status_code for _ in range(8)]
            assert c.get(base + "/nowhere").status_code == 404
        assert gw_hello == 30 and statuses == [200] * 5 + [429] * 3
        # the Gateway helper's own readiness probes also hit /hello: count them from the scrape
        got = wait_for(mport, {
            'fastgate_requests_total{route="limited",status="2xx"}': 5,
            'fastgate_requests_total{route="limited",status="4xx"}': 3,
            'fastgate_requests_total{route="(unmatched)",status="4xx"}': 1,
            'fastgate_ratelimit_decisions_total{route="limited",result="allowed"}': 5,
            'fastgate_ratelimit_decisions_total{route="limited",result="limited"}': 3,
            'fastgate_request_duration_seconds_count{route="limited"}': 8,
        })
        deadline = time.monotonic() + 15
        while got.get('fastgate_requests_total{route="hello",status="2xx"}', 0) < 30:  # flushed each tick
            assert time.monotonic() < deadline, got.get('fastgate_requests_total{route="hello",status="2xx"}')
            time.sleep(0.2)
            got = scrape(mport)
        hello = got['fastgate_requests_total{route="hello",status="2xx"}']
        assert got['fastgate_request_duration_seconds_bucket{route="hello",le="+Inf"}'] == hello
        buckets = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v) for k, v in got.items()
                         if k.startswith('fastgate_request_duration_seconds_bucket{route="hello"') and "+Inf" not in k)
        assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)  # cumulative
        assert got["fastgate_reloads_total"] == 0 and got["fastgate_worker_restarts_total"] == 0

        before = gw.workers()
        gw.signal(signal.SIGHUP)
        gw.wait_workers(2, exclude=before, timeout=20)
        os.kill(gw.workers()[0], signal.SIGKILL)
        after = wait_for(mport, {"fastgate_reloads_total": 1, "fastgate_worker_restarts_total": 1})
        # counts made by the old generation are still there
        assert after['fastgate_requests_total{route="limited",status="2xx"}'] == 5
        # bad scrapes get an answer, not a hang
        assert httpx.get(f"http://127.0.0.1:{mport}/other", timeout=5).status_code == 404
        assert httpx.post(f"http://127.0.0.1:{mport}/metrics", timeout=5).status_code == 405
    finally:
        gw.stop()


def test_policy_hooks_are_timed_on_sampled_requests(tmp_path):
    mport = free_port()
    gw = Gateway(tmp_path, CONFIG % mport, workers=1)
    try:
        with httpx.Client() as c:
            for _ in range(200):  # 1 in 64 is timed: 3 samples at least
                c.get(gw.url.replace("/hello", "/m"))
        deadline = time.monotonic() + 15
        key = 'fastgate_policy_duration_seconds_count{route="limited",policy="rate-limit@route:limited#0"}'
        while scrape(mport).get(key, 0) < 3:
            assert time.monotonic() < deadline, "no policy timing in the scrape"
            time.sleep(0.2)
    finally:
        gw.stop()


CONSUMERS = """
listeners:
  - {kind: proxy, port: 8000}
  - {kind: metrics, address: 127.0.0.1, port: %d}
metrics: {consumer_label: %s}
consumers:
  - {username: alice, keys: ["%s"]}
  - {username: bob, keys: ["%s"]}
routes:
  - {name: hello, paths: [/hello], mock: {body: hi}}
  - {name: private, paths: ["/p/*"], mock: {body: ok}, policies: [{type: key-auth}]}
  - {name: gone, paths: [/p/gone], mock: {status: 410, body: gone}, policies: [{type: key-auth}]}
"""


def test_consumer_label_is_opt_in_and_summed_over_workers(tmp_path):
    from fastgate.policies.auth import hash_key

    for opt_in in (True, False):
        mport = free_port()
        (tmp_path / str(opt_in)).mkdir()
        gw = Gateway(tmp_path / str(opt_in), CONSUMERS % (mport, str(opt_in).lower(), hash_key("ak"), hash_key("bk")),
                     workers=2)
        try:
            base = gw.url.replace("/hello", "")
            for key, path, n in (("ak", "/p/x", 7), ("bk", "/p/y", 4), ("bk", "/p/gone", 2)):
                for _ in range(n):  # a new connection each: both workers count
                    httpx.get(base + path, headers={"apikey": key})
            assert httpx.get(base + "/p/x").status_code == 401  # anonymous: no consumer series
            fam = "fastgate_consumer_requests_total"
            want = {f'{fam}{{route="private",consumer="alice",status="2xx"}}': 7,
                    f'{fam}{{route="private",consumer="bob",status="2xx"}}': 4,
                    f'{fam}{{route="gone",consumer="bob",status="4xx"}}': 2}
            if opt_in:
                got = wait_for(mport, want)
                assert {k: v for k, v in got.items() if k.startswith(fam)} == want
            else:
                wait_for(mport, {'fastgate_requests_total{route="private",status="2xx"}': 11})
                assert not any(k.startswith(fam) for k in scrape(mport))
        finally:
            gw.stop()
