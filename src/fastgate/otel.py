"""OpenTelemetry export: one SERVER span per proxied request, sent as OTLP/HTTP JSON.

With `tracing.otlp`, the gateway takes part in the trace instead of only passing `traceparent` on:
a request with a valid `traceparent` gets a span of its own (parent: the client's span id; the
upstream receives the gateway's span id), a request without one starts a trace, sampled with
probability `sample` (parent-based otherwise: the client's sampled flag decides).

The hot path appends a tuple to a per-worker list; the worker's tick hands the list to a
background thread through a bounded queue (full: the batch is dropped and counted, never waited
for); the thread serialises with orjson and POSTs to the collector's `/v1/traces` over one kept-alive
connection, with a timeout. A collector that is down costs a log line and dropped spans, never a
request's latency.
"""
from __future__ import annotations

import http.client
import logging
import queue
import ssl
import threading
from urllib.parse import urlsplit

import orjson

log = logging.getLogger("fastgate.otel")

BATCH = 512
SERVER, ERROR, UNSET = 2, 2, 0


class SpanExporter:
    __slots__ = ("cfg", "pending", "queue", "thread", "dropped", "exported", "failed", "resource", "_conn",
                 "_warned", "host", "port", "path", "tls", "headers", "sample")

    def __init__(self, cfg, worker: int = 0):
        self.cfg = cfg
        self.sample = cfg.sample
        u = urlsplit(cfg.endpoint)
        self.tls = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.tls else 80)
        self.path = (u.path or "/v1/traces") + (f"?{u.query}" if u.query else "")
        self.headers = {"Content-Type": "application/json", **cfg.headers}
        self.pending: list[tuple] = []
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.max_queue // BATCH))
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self.resource = {"attributes": [_attr("service.name", cfg.service_name),
                                        _attr("service.instance.id", f"worker-{worker}")]}
        self._conn = None
        self._warned = False
        self.thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)
        self.thread.start()

    # --- the worker's side ------------------------------------------------------------------------
    def record(self, span: tuple) -> None:
        """(trace_id hex, span_id hex, parent hex or None, method, route, api, consumer, path, status,
        client_ip, upstream name, start_ns, end_ns, upstream_ms)."""
        self.pending.append(span)
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            self.queue.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch)

    def close(self, timeout: float = 2.0) -> None:
        self.flush()
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)

    # --- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                break
            try:
                self._post(self.encode(batch))
                self.exported += len(batch)
                if self._warned:
                    log.info("OTLP export to %s:%d works again", self.host, self.port)
                self._warned = False
            except (OSError, http.client.HTTPException, ExportError) as exc:
                self.failed += len(batch)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if not self._warned:
                    log.warning("OTLP export to %s:%d%s failed (%s): spans dropped until it works",
                                self.host, self.port, self.path, exc)
                    self._warned = True

    def _post(self, body: bytes) -> None:
        if self._conn is None:
            if self.tls:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.cfg.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.cfg.timeout)
        self._conn.request("POST", self.path, body, self.headers)
        resp = self._conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise ExportError(f"HTTP {resp.status}")

    def encode(self, batch: list[tuple]) -> bytes:
        spans = []
        for (trace, span, parent, method, route, api, consumer, path, status, client, target, start, end,
             upstream_ms) in batch:
            attrs = [_attr("http.request.method", method), _attr("url.path", path),
                     _attr("fastgate.route", route), _attr_int("http.response.status_code", status),
                     _attr("client.address", client)]
            if api:
                attrs.append(_attr("fastgate.api", api))
            if consumer:
                attrs.append(_attr("fastgate.consumer", consumer))
            if target:
                attrs.append(_attr("fastgate.upstream", target))
            if upstream_ms is not None:
                attrs.append({"key": "fastgate.upstream_ms", "value": {"doubleValue": upstream_ms}})
            doc = {"traceId": trace, "spanId": span, "name": f"{method} {route}", "kind": SERVER,
                   "startTimeUnixNano": str(start), "endTimeUnixNano": str(end), "attributes": attrs,
                   "status": {"code": ERROR} if status >= 500 or status == 0 else {}}
            if parent:
                doc["parentSpanId"] = parent
            spans.append(doc)
        return orjson.dumps({"resourceSpans": [{"resource": self.resource, "scopeSpans": [
            {"scope": {"name": "fastgate"}, "spans": spans}]}]})


class ExportError(Exception):
    pass


def _attr(key: str, value: str) -> dict:
    return {"key": key, "value": {"stringValue": value}}


def _attr_int(key: str, value: int) -> dict:
    return {"key": key, "value": {"intValue": str(value)}}
