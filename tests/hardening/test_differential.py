"""Differential check: the gateway's view of a request against h11's (a second, independent parser).

Hypothesis generates requests (well-formed ones from a hostile vocabulary, and the same mutated byte by
byte). Each is fed to an h11 server-side Connection and, over a real socket, to a gateway worker that
runs in a background thread in front of a recording upstream.

- h11 rejects it        → the gateway must reject it too (an error status, nothing forwarded);
- both accept it        → the upstream gets the method, target, body bytes and end-to-end headers
                          h11 parsed (hop-by-hop and gateway-managed headers aside);
- h11 accepts, the gateway rejects → fine: the gateway is allowed to be stricter.

Requests h11 finds incomplete, or followed by extra bytes, are discarded (no second opinion to compare).
The disagreements this test first found (HTTP/0.9 and 2.0 request lines, absolute-form without
Host) are fixed and kept as regressions in test_corpus.py.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.parse

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fastgate._core.router import normalize_path
from tests.conftest import IN_CI
from tests.harness import Upstream, gateway, simple_config

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"content-length", b"host", b"expect"}
MANAGED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"x-request-id",
           b"x-consumer-id", b"x-consumer-username", b"x-consumer-plan", b"x-consumer-groups",
           b"x-credential-identifier", b"x-authenticated-scope", b"traceparent", b"tracestate"}


class BackgroundGateway:
    """A gateway worker and its upstream on their own uvloop in a thread; blocking clients talk to it."""

    def __init__(self, doc_extra: dict):
        self.doc_extra = doc_extra
        self.ready = threading.Event()
        self.loop = None
        self.stop = None
        self.up = None
        self.port = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            uvloop.run(self._main())
        except BaseException as exc:  # surfaced by __enter__/__exit__
            self.error = exc
            self.ready.set()

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        async with Upstream() as up, gateway(simple_config(up) | self.doc_extra) as gw:
            self.up, self.port = up, gw.port
            self.ready.set()
            await self.stop.wait()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(20)
        if self.error is not None or not self.port:
            raise RuntimeError(f"background gateway did not start: {self.error!r}")
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)

    def send(self, data: bytes, timeout: float = 3.0) -> bytes:
        """One connection: send, read until the first response head is complete (or the gateway closes).
        (No half-close: a half-closed client is answered but then kept open until keepalive_timeout.)"""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not _final_head(b"".join(chunks)):
                try:
                    chunk = s.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def _final_head(data: bytes) -> bool:
    """A complete response head that is not a 100 Continue is in `data`."""
    while data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:
        data = data.split(b"\r\n\r\n", 1)[1]
    return b"\r\n\r\n" in data


@pytest.fixture(scope="module")
def bg():
    with BackgroundGateway({"limits": {"header_timeout": 1, "body_timeout": 1, "max_body_bytes": 4096}}) as g:
        yield g


# --- h11's view ------------------------------------------------------------------------------------

def h11_view(data: bytes):
    """("reject", why) | ("incomplete",) | ("extra",) | ("ok", method, target, headers, body, version)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
    try:
        conn.receive_data(data)
        req, body = None, b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                return ("incomplete",)
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError as exc:
        return ("reject", str(exc))
    if conn.trailing_data[0]:
        return ("extra",)
    return ("ok", req.method, req.target, list(req.headers), body, req.http_version)


# Disagreements judged harmless: the gateway re-serialises the request, so the upstream cannot be
# desynchronised by them. Each is listed in README "## Hardening".
def tolerated(data: bytes) -> str | None:
    if data[:1] in (b"\r", b"\n") and not data.startswith(b"\r\n"):
        return "llhttp skips a stray CR or LF before the request line (RFC 9112 2.2 asks only for CRLF)"
    if b"  " in data.split(b"\r\n", 1)[0]:
        return "llhttp accepts several SP between request-line parts (RFC 9112 3: a recipient MAY)"
    return None


# --- generation ------------------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]
SEGMENTS = [b"a", b"users", b"42", b"x.y", b"~t", b"%41", b"%2F", b"caf%C3%A9", b"", b"-_"]
QUERIES = [b"", b"?q=1", b"?a=b&c=d", b"?", b"?x=%20y", b"?/path"]
NAMES = [b"Accept", b"X-Custom", b"x-custom", b"Cookie", b"Authorization", b"User-Agent", b"X-Empty",
         b"Content-Type", b"Accept-Language", b"If-None-Match", b"Cache-Control", b"X-Forwarded-For", b"Via",
         b"X-Request-ID", b"Connection", b"TE", b"Keep-Alive", b"Trailer", b"Upgrade", b"Expect", b"Foo-Bar"]
VALUES = [b"1", b"text/plain", b"a, b", b"", b" padded ", b"\tx", b"close", b"keep-alive", b"Foo-Bar",
          b"trailers", b"100-continue", b"h2c", b"v\xe9", b"a=b; c=d", b"*/*", b"\"q\"", b"x-custom",
          b"abc123-_.:+/="]


@st.composite
def requests(draw) -> bytes:
    method = draw(st.sampled_from(METHODS))
    path = b"/" + b"/".join(draw(st.lists(st.sampled_from(SEGMENTS), max_size=4)))
    if draw(st.integers(0, 9)) == 0:
        path = b"http://x" + path
    target = path + draw(st.sampled_from(QUERIES))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + target + b" " + version]
    if version == b"HTTP/1.1" or draw(st.booleans()):
        lines.append(b"Host: " + draw(st.sampled_from([b"x", b"example.com", b"example.com:8080", b"[::1]:80"])))
    for _ in range(draw(st.integers(0, 5))):
        sep = draw(st.sampled_from([b": ", b":", b":  ", b":\t"]))
        lines.append(draw(st.sampled_from(NAMES)) + sep + draw(st.sampled_from(VALUES)))
    body = draw(st.sampled_from([b"", b"hello", b"x" * 300, b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"]))
    framing = draw(st.sampled_from(["none", "cl", "chunked"]))
    if framing == "cl" or (framing == "none" and body):
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p) + b"0\r\n\r\n"
    else:
        payload = b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def mutate(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        byte = bytes([draw(st.one_of(st.sampled_from(b"\r\n\t :;,\"\\\x00\x7f\x80-0aA/?#%"), st.integers(0, 255)))])
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        if op == "insert" or at == len(data):
            data = data[:at] + byte + data[at:]
        elif op == "replace":
            data = data[:at] + byte + data[at + 1:]
        else:
            data = data[:at] + data[at + 1:]
    return data


@st.composite
def mutated_requests(draw) -> bytes:
    return mutate(draw, draw(requests()))


# --- the comparison --------------------------------------------------------------------------------

def end_to_end(headers) -> list[tuple[bytes, bytes]]:
    listed = set()
    for k, v in headers:
        if k.lower() == b"connection":
            listed |= {t.strip().lower() for t in v.split(b",")}
    # names with "_" are dropped by the gateway (limits.underscores_in_headers, nginx's default)
    return [(k.lower(), v.strip(b" \t")) for k, v in headers
            if k.lower() not in HOP and k.lower() not in MANAGED and k.lower() not in listed
            and b"_" not in k]


def expected_target(target: bytes) -> bytes:
    if not target.startswith(b"/"):
        u = urllib.parse.urlsplit(target)
        target = (u.path or b"/") + (b"?" + u.query if u.query else b"")
    path, sep, query = target.partition(b"?")
    norm = normalize_path(path)
    return (norm if norm is not None else path) + (b"?" + query if query else b"")


def check(bg: BackgroundGateway, data: bytes) -> None:
    view = h11_view(data)
    assume(view[0] in ("reject", "ok"))
    assume(tolerated(data) is None)
    up = bg.up
    before = len(up.requests)
    out = bg.send(data)
    if out.startswith(b"HTTP/1.1 100 "):
        out = out.split(b"\r\n\r\n", 1)[1]
    status = int(out[9:12]) if out[:9] == b"HTTP/1.1 " else 0
    forwarded = up.requests[before:]
    event(f"h11 {view[0]}, gateway {status // 100}xx")
    if view[0] == "reject":
        assert forwarded == [], f"h11 rejects ({view[1]}) but the gateway forwarded {data!r}"
        assert status == 0 or status >= 400, f"h11 rejects ({view[1]}), gateway said {out[:120]!r}"
        return
    _, method, target, headers, body, _version = view
    if status != 200:
        assert forwarded == [], f"gateway refused ({status}) but forwarded {data!r}"
        return  # stricter than h11: allowed
    assert len(forwarded) == 1, f"{len(forwarded)} requests forwarded for {data!r}"
    got = forwarded[0]
    assert got.method == method, data
    assert got.url == expected_target(target), data
    assert got.body == body, data
    assert end_to_end(got.headers) == end_to_end(headers), data


SETTINGS = settings(database=None, deadline=None, derandomize=IN_CI,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# Sized for about 10-20 s together on a loaded 2-core machine; raise with HYPOTHESIS_DIFF_EXAMPLES.
N = int(os.environ.get("HYPOTHESIS_DIFF_EXAMPLES", "1000"))


@settings(SETTINGS, max_examples=N)
@given(data=requests())
def test_wellformed_requests_agree_with_h11(bg, data):
    check(bg, data)


@settings(SETTINGS, max_examples=2 * N)
@given(data=mutated_requests())
def test_mutated_requests_agree_with_h11(bg, data):
    check(bg, data)


def test_h11_oracle_sanity():
    """The oracle itself: h11 rejects what RFC 9112 says to reject, and reports bodies exactly."""
    assert h11_view(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")[0] \
        in ("reject", "ok")
    assert h11_view(b"GET / HTTP/1.1\r\n\r\n")[0] == "reject"  # no Host
    assert h11_view(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")[0] == "reject"
    ok = h11_view(b"POST /a?b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert ok[0] == "ok" and ok[1] == b"POST" and ok[2] == b"/a?b" and ok[4] == b"abc"
