"""The access log: one JSON line per request, for operators and for billing.

The data plane formats each line in C (`_core/proxy.access_line`'s parts; a connection's worker and
client address and a route's name and API are formatted once) and appends it to this per-worker
list, which `flush` empties in place because the data plane holds it; the worker's tick (about
once a second, and when the list grows past BATCH) hands the batch to the kernel in one write() on
a file opened O_APPEND, so lines from several workers never interleave. `record` takes a row
tuple instead and formats it here with msgspec: the reference the compiled lines are tested
against (tests/property/test_access_line.py). SIGUSR1 reopens the file (logrotate's postrotate).
`sample` logs that share of requests; 4xx/5xx answers are always logged.

Fields: ts (UTC, ms), request_id, trace_id, worker, client_ip, method, path, route, api, consumer,
status, request_bytes (body), upstream_bytes (what the upstream sent, head included; null for
local answers), response_bytes (for local answers), gateway_ms (head in → response complete),
upstream_ms (request sent → response head; null when not proxied).
"""
from __future__ import annotations

import os
import random
import time

import msgspec

BATCH = 512
FIELDS = ("ts", "request_id", "trace_id", "worker", "client_ip", "method", "path", "route", "api", "consumer",
          "status", "request_bytes", "upstream_bytes", "response_bytes", "gateway_ms", "upstream_ms")


class Line(msgspec.Struct, gc=False):
    """One access-log line; the fields in FIELDS order."""

    ts: str
    request_id: str
    trace_id: str | None
    worker: int
    client_ip: str
    method: str
    path: str
    route: str | None
    api: str | None
    consumer: str | None
    status: int
    request_bytes: int
    upstream_bytes: int | None
    response_bytes: int | None
    gateway_ms: float
    upstream_ms: float | None


_ENCODER = msgspec.json.Encoder()


class AccessLog:
    __slots__ = ("path", "sample", "fd", "pending", "lines", "pid", "dropped")

    def __init__(self, path: str, sample: float = 1.0):
        self.path = path
        self.sample = float(sample)  # a float: the data plane compares it on every request
        self.pid = os.getpid()
        self.pending: list[tuple] = []
        self.lines: list[bytes] = []  # formatted already (the data plane's)
        self.dropped = 0
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def record(self, row: tuple, status: int) -> None:
        if self.sample < 1.0 and status < 400 and random.random() >= self.sample:
            return
        self.pending.append(row)
        if len(self.pending) >= BATCH:
            self.flush()

    def add(self, line: bytes) -> None:
        """A line formatted already (sampling decided by the caller). The data plane appends to
        `lines` itself, without this frame; both leave the flush to BATCH lines or the tick."""
        self.lines.append(line)
        if len(self.lines) >= BATCH:
            self.flush()

    def flush(self) -> None:
        lines = self.lines
        if lines:  # emptied in place: the data plane holds this very list (WorkerState.access_log)
            data, n = b"".join(lines), len(lines)
            lines.clear()
            self._write(data, n)
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        pid = self.pid
        out = []
        sec, prefix = -1, ""
        for (t, rid, trace, _w, client, method, path, route, api, consumer, status, req_b, up_b, resp_b,
             gw_ms, up_ms) in rows:
            s = int(t)
            if s != sec:  # one strftime per second of traffic, not per line
                sec, prefix = s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
            out.append(Line(f"{prefix}.{int(t * 1000) % 1000:03d}Z", rid, trace, pid, client, method, path, route,
                            api, consumer, status, req_b, up_b, resp_b, gw_ms, up_ms))
        # one call for the batch: msgspec writes the lines ~10x faster than a dumps() per line
        self._write(_ENCODER.encode_lines(out), len(rows))

    def _write(self, data: bytes, n: int) -> None:
        try:
            os.write(self.fd, data)
        except OSError:  # a full disk must not take the worker down: count what was lost
            self.dropped += n

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
