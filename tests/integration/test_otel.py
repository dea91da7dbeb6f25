"""OpenTelemetry export: the gateway's SERVER spans reach a collector as OTLP/HTTP JSON that the
official OTLP message types accept, with the right trace ids, parents, sampling and status."""
from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from fastgate.config.load import load_config
from fastgate.errors import ConfigError
from tests.harness import Upstream, config, gateway, reply

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _doc(up: Upstream, collector_port: int, **otlp) -> dict:
    return config(routes=[{"name": "users", "paths": ["/users/*"], "upstream": "u"},
                          {"name": "down", "paths": ["/down"], "upstream": "nowhere"}],
                  upstreams=[{"name": "u", "targets": [{"address": up.address}]},
                             {"name": "nowhere", "targets": [{"address": "127.0.0.1:1"}], "retries": 0}],
                  tracing={"otlp": {"endpoint": f"http://127.0.0.1:{collector_port}/v1/traces",
                                    "service_name": "edge", **otlp}})


async def _spans(collector: Upstream, n: int, timeout: float = 10.0) -> list:
    """The spans the collector received, each batch checked against the OTLP message types."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        spans = []
        for req in collector.requests:
            assert req.method == b"POST" and req.url == b"/v1/traces"
            assert req.header("content-type") == "application/json"
            msg = json_format.ParseDict(_ids_to_base64(json.loads(req.body)), ExportTraceServiceRequest())
            for rs in msg.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                assert attrs["service.name"] == "edge"
                for ss in rs.scope_spans:
                    spans += list(ss.spans)
        if len(spans) >= n or asyncio.get_running_loop().time() > deadline:
            return spans
        await asyncio.sleep(0.05)


def _ids_to_base64(doc: dict) -> dict:
    """OTLP/JSON writes trace and span ids as hex (not protobuf JSON's base64): check that, then
    convert for the strict protobuf parser (which fails on any unknown field or wrong type)."""
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for field, size in (("traceId", 32), ("spanId", 16), ("parentSpanId", 16)):
                    if field in span:
                        assert re.fullmatch(f"[0-9a-f]{{{size}}}", span[field]), span[field]
                        span[field] = base64.b64encode(bytes.fromhex(span[field])).decode()
    return doc


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value if v.HasField("int_value") \
            else v.double_value
    return out


async def test_span_joins_the_clients_trace(loop):
    async with Upstream() as up, Upstream() as collector, gateway(_doc(up, collector.port)) as gw:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{gw.port}/users/7",
                            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
            assert r.status_code == 200
        sent = up.requests[0].header("traceparent")
        version, trace, span, flags = sent.split("-")
        assert (version, trace, flags) == ("00", CLIENT_TRACE, "01") and span != CLIENT_SPAN
        (s,) = await _spans(collector, 1)
        assert s.trace_id.hex() == CLIENT_TRACE and s.span_id.hex() == span and s.parent_span_id.hex() == CLIENT_SPAN
        assert s.name == "GET users" and s.kind == s.SPAN_KIND_SERVER
        assert 0 < s.start_time_unix_nano < s.end_time_unix_nano
        a = _attrs(s)
        assert a["http.request.method"] == "GET" and a["url.path"] == "/users/7"
        assert a["http.response.status_code"] == 200 and a["fastgate.route"] == "users"
        assert a["fastgate.upstream"] == "u" and a["fastgate.upstream_ms"] >= 0
        assert s.status.code == s.status.STATUS_CODE_UNSET


async def test_sampling_follows_the_parent_and_the_ratio(loop):
    async with Upstream() as up, Upstream() as collector, gateway(_doc(up, collector.port, sample=0)) as gw:
        async with httpx.AsyncClient() as c:
            # not sampled by the client: passed on unsampled, nothing exported
            await c.get(f"http://127.0.0.1:{gw.port}/users/1",
                        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
            # a trace the gateway starts, at sample 0: unsampled
            await c.get(f"http://127.0.0.1:{gw.port}/users/2")
            # sampled by the client: exported whatever the ratio
            await c.get(f"http://127.0.0.1:{gw.port}/users/3",
                        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert [r.header("traceparent")[-2:] for r in up.requests] == ["00", "00", "01"]
        spans = await _spans(collector, 1)
        await asyncio.sleep(1.0)  # a tick or two more: nothing else arrives
        spans = await _spans(collector, 1, timeout=0)
        assert [_attrs(s)["url.path"] for s in spans] == ["/users/3"]


async def test_gateway_started_trace_and_error_status(loop):
    async with Upstream() as up, Upstream() as collector, gateway(_doc(up, collector.port)) as gw:
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{gw.port}/users/1")).status_code == 200
            assert (await c.get(f"http://127.0.0.1:{gw.port}/down")).status_code == 502
        spans = sorted(await _spans(collector, 2), key=lambda s: s.name)
        assert [s.name for s in spans] == ["GET down", "GET users"]
        down, users = spans
        assert users.parent_span_id == b"" and users.trace_id.hex() == up.requests[0].header("traceparent")[3:35]
        assert down.status.code == down.status.STATUS_CODE_ERROR and _attrs(down)["http.response.status_code"] == 502


async def test_collector_down_or_failing_costs_no_request(loop):
    async with Upstream() as up, Upstream(lambda req: reply(503, b"busy")) as failing:
        for port in (1, failing.port):  # refused, then answering 503
            async with gateway(_doc(up, port)) as gw, httpx.AsyncClient() as c:
                for _ in range(20):
                    assert (await c.get(f"http://127.0.0.1:{gw.port}/users/1")).status_code == 200
                spans = gw.state.spans
                deadline = asyncio.get_running_loop().time() + 10
                while spans.failed < 20 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
                assert spans.failed == 20 and spans.exported == 0


def test_otlp_config_errors():
    with pytest.raises(ConfigError) as info:
        load_config({"tracing": {"propagate": False, "otlp": {"endpoint": "http://127.0.0.1:4318/v1/traces"}}})
    assert [i.path for i in info.value.issues] == ["$.tracing"]
    with pytest.raises(ConfigError) as info:
        load_config({"tracing": {"otlp": {"endpoint": "grpc://collector:4317", "sample": 2}}})
    assert {i.path for i in info.value.issues} >= {"$.tracing.otlp.endpoint"}
