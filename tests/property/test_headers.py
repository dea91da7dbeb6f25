"""Hypothesis: the compiled header code agrees with tests/models/headers_model.py.

Inputs come from small vocabularies of valid and hostile pieces (odd spellings of Content-Length
and Transfer-Encoding, obs-folds, bare LFs, CTLs, list values, Connection-listed names, chunk
extensions and trailers), glued together and then sometimes mutated byte by byte; chunked bodies
are fed in pieces split at arbitrary (and, for short bodies, every) boundaries. The framing fields
(Content-Length, Transfer-Encoding, Connection) are also enumerated exhaustively. "Agrees" means the
same result, or a ValueError from both.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastgate._core import headers as core
from tests.models import headers_model as model

SETTINGS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, *args, fields=None):
    try:
        r = fn(*args)
    except ValueError:
        return ("ValueError",)
    if r is None or fields is None:
        return ("ok", r)
    return ("ok", tuple((f, getattr(r, f)) for f in fields))


def mutate(draw, data: bytes) -> bytes:
    """Up to three byte edits: replace, insert or delete, with bytes biased to the interesting ones."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        byte = bytes([draw(st.one_of(st.sampled_from(b"\r\n\t :;,\"\\\x00\x7f\x80-0aA"), st.integers(0, 255)))])
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        if op == "insert" or at == len(data):
            data = data[:at] + byte + data[at:]
        elif op == "replace":
            data = data[:at] + byte + data[at + 1:]
        else:
            data = data[:at] + data[at + 1:]
    return data


# --- field names and values -------------------------------------------------------------------

NAMES = [b"Host", b"host", b"HOST", b"hOsT", b"Content-Length", b"content-length", b"CONTENT-LENGTH",
         b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-encoding", b"Expect", b"expect",
         b"Connection", b"connection", b"Upgrade", b"X-Request-ID", b"x-request-id", b"X-Forwarded-For",
         b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Via", b"TE", b"te", b"Trailer", b"Keep-Alive",
         b"Proxy-Connection", b"Cookie", b"X-Custom", b"Accept", b"Authorization",
         # near misses
         b"Content-Length ", b" Content-Length", b"Content_Length", b"Content-Lengths", b"Transfer-Encodin",
         b"Transfer-Encoding\x00", b"Hos", b"X-Forwarded-Fo", b"Upgrade:", b"Conn\xc3\xa9ction", b"", b"Bad Name",
         b"x\r\ny", b"\xff"]
CL_VALUES = [b"0", b"5", b"6", b"10", b"007", b"+5", b"-1", b" 5", b"5 ", b"5, 5", b"5,6", b"5,", b",5", b"",
             b"0x5", b"1e3", b"999999999999999999", b"9999999999999999999", b"5\x00", b"\xd9\xa5"]
TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b" chunked ", b"gzip, chunked", b"chunked, gzip", b"chunked,",
             b",chunked", b"", b" ", b",", b", ,", b"identity", b"gzip", b"chunked;q=1", b"chunkedx",
             b"\tchunked", b"chunked\x0b", b"chunked, chunked"]
CONN_VALUES = [b"close", b"Close", b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade, close", b"x-custom",
               b"X-Custom, cookie", b"", b",", b"close,,", b"te", b"accept, via", b"x-forwarded-for", b"expect",
               b"content-type", b"date, x-custom", b"set-cookie", b"foo bar", b"CLOSE "]
OTHER_VALUES = [b"100-continue", b"100-Continue", b" 100-continue ", b"100-continue, foo", b"200-ok",
                b"websocket", b"WebSocket ", b"h2c", b"\x0bwebsocket", b"example.com", b"a.com:8080",
                b"[::1]:80", b"bad host", b"a@b", b"%41", b"abc-123", b"a" * 200, b"a" * 201, b"a/b=+:.",
                b"text/html", b" padded ", b"a\tb", b"a\r\nInjected: 1", b"\x7f", b"\x80\xff", b"x\x00y",
                b"10.0.0.1", b"1.0 proxy"]
VALUES = CL_VALUES + TE_VALUES + CONN_VALUES + OTHER_VALUES

CL_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH"]
TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-encoding"]
CONN_NAMES = [b"Connection", b"connection"]

names = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), st.binary(max_size=8))
values = st.one_of(st.sampled_from(VALUES), st.sampled_from(VALUES), st.binary(max_size=10))
# framing fields with the values that matter for them, so that several of them meet in one head
framing = st.one_of(st.tuples(st.sampled_from(CL_NAMES), st.sampled_from(CL_VALUES)),
                    st.tuples(st.sampled_from(TE_NAMES), st.sampled_from(TE_VALUES)),
                    st.tuples(st.sampled_from(CONN_NAMES), st.sampled_from(CONN_VALUES)))
header_lists = st.lists(st.one_of(framing, st.tuples(names, values)), max_size=8)
REQUEST_FIELDS = model.REQUEST_FIELDS
RESPONSE_FIELDS = model.RESPONSE_FIELDS


@settings(SETTINGS)
@given(st.one_of(st.sampled_from(NAMES + VALUES), st.binary(max_size=12)))
def test_checked_header_refuses_what_the_model_refuses(raw):
    for name, value in ((raw, b"v"), (b"X-Name", raw)):
        ok = model.valid_header_name(name) and model.valid_header_value(value)
        try:
            pair = core.CheckedHeader(name, value)
        except ValueError:
            assert not ok
        else:
            assert ok and pair == (name, value) and type(pair) is core.CheckedHeader


@settings(SETTINGS, max_examples=300)
@given(st.one_of(st.sampled_from(NAMES + VALUES), st.binary(max_size=12)))
def test_valid_header_name_and_value_match_model(raw):
    assert core.valid_header_name(raw) == model.valid_header_name(raw)
    assert core.valid_header_value(raw) == model.valid_header_value(raw)


# the control-byte check reads 8 bytes at a time: long values, mostly clean, with one byte put
# anywhere (tab, CR, LF, NUL, DEL, a byte just outside the ranges, obs-text)
_EDGE = b"\t\r\n\x00\x1f\x7f\x7e\x20\x80\xff\x1e\x01"


@settings(SETTINGS, max_examples=600)
@given(st.binary(min_size=0, max_size=70).map(lambda b: bytes(c | 0x40 if c < 0x20 or c == 0x7F else c for c in b)),
       st.integers(0, 70), st.sampled_from(list(_EDGE)), st.booleans())
def test_control_byte_check_on_long_values_matches_model(clean, at, byte, insert):
    raw = clean[:at] + bytes([byte]) + clean[at:] if insert else clean
    assert core.valid_header_value(raw) == model.valid_header_value(raw)


@settings(SETTINGS, max_examples=600)
@given(header_lists)
def test_scan_request_matches_model(headers):
    expected = outcome(model.scan_request, headers, fields=REQUEST_FIELDS)
    assert outcome(core.scan_request, headers, fields=REQUEST_FIELDS) == expected
    event("ValueError" if expected[0] == "ValueError" else "ok")


@settings(SETTINGS, max_examples=300)
@given(header_lists, st.sampled_from([n.lower() for n in NAMES] + [b"Host", b"content-length"]))
def test_find_header_matches_model(headers, name):
    assert core.find_header(headers, name) == model.find_header(headers, name)


# --- the upstream request head ----------------------------------------------------------------

METHODS = [b"GET", b"POST", b"M-SEARCH", b"", b"G ET", b"GET\r\n", b"G(T"]
TARGETS = [b"/", b"/a?b=c", b"*", b"/a b", b"/a\r\nX: y", b"/\x00", b"/\x80", b"/\t"]
GW_VALUES = [b"upstream:80", b"127.0.0.1", b"::1", b"http", b"https", b"rid-1", b"", b"h\r\n", b"h\x7f", b"a\tb"]
DROPS = [b"cookie", b"x-custom", b"expect", b"authorization", b"Accept", b"via"]
ADDS = [(b"X-Added", b"1"), (b"X-Added", b""), (b"Bad Name", b"v"), (b"X-A", b"v\r\n"), (b"", b"x"),
        (b"X-B", b"\x80")]
ADDS += [core.CheckedHeader(n, v) for n, v in ADDS  # copied without a second check
         if model.valid_header_name(n) and model.valid_header_value(v)]


@st.composite
def request_heads(draw):
    drop = draw(st.one_of(st.none(), st.frozensets(st.sampled_from(DROPS), max_size=3)))
    if drop is not None and draw(st.integers(0, 4)) == 0:  # more names than the C-stack list holds (32)
        drop = drop | {b"x-filler-%d" % i for i in range(draw(st.sampled_from([29, 30, 40])))}
    add = draw(st.one_of(st.none(), st.lists(st.sampled_from(ADDS), max_size=3).map(tuple)))
    return (draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)), draw(header_lists),
            draw(st.sampled_from(GW_VALUES)), draw(st.sampled_from(GW_VALUES)), draw(st.sampled_from(GW_VALUES)),
            draw(st.sampled_from(GW_VALUES)), drop, add, draw(st.integers(0, 3)),
            draw(st.one_of(st.integers(0, 12), st.integers(-2, -1), st.integers(0, 2**62))), draw(st.booleans()))


def _check_head(head: bytes) -> None:
    """No field injection: every line ends in CRLF and holds no other CR or LF."""
    assert head.endswith(b"\r\n\r\n")
    for line in head[:-4].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line


@settings(SETTINGS, max_examples=800)
@given(request_heads())
def test_build_request_head_matches_model(args):
    expected = outcome(model.build_request_head, *args)
    assert outcome(core.build_request_head, *args) == expected
    if expected[0] == "ok":
        _check_head(expected[1])
    event(expected[0])


# --- response heads ---------------------------------------------------------------------------

STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified",
                b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 100 Continue", b"HTTP/1.1 404", b"HTTP/1.1 500 ",
                b"HTTP/1.1 200 OK\tfine", b"HTTP/1.1 099 Low", b"HTTP/1.1 999 High", b"HTTP/1.2 200 OK",
                b"HTTP/2.0 200 OK", b"http/1.1 200 OK", b"HTTP/1.1  200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK",
                b"HTTP/1.1 200\x00OK", b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 200 \xc3\xa9", b"HTTP/1.1 2x0 OK",
                b"HTTP/1.1 200 O\rK", b" HTTP/1.1 200 OK", b"", b"HTTP/1.1"]
RESP_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding", b"transfer-encoding",
              b"Connection", b"connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer", b"Upgrade",
              b"X-Custom", b"Date", b"Set-Cookie", b"Content-Type", b"Content-Length ", b" Content-Length",
              b"\tX-Custom", b"Content\x00Length", b"", b"X\xffY", b"Transfer-Encoding\t"]
SEPARATORS = [b": ", b": ", b":", b":\t", b" : ", b": \t "]
RESP_VALUES = CL_VALUES + TE_VALUES + CONN_VALUES + [b"text/plain", b"a=b; Path=/", b"5 \t", b"a\rb", b"\x01",
                                                     b"\x80", b"websocket", b"a:b"]
RAW_LINES = [b" folded continuation", b"\tfolded", b"no colon", b":empty name", b"X: a\rb"]
EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b""]


@st.composite
def response_heads(draw):
    """(data, start, head_request, max_size): a head, maybe broken, between a prefix and a body."""
    eol = st.sampled_from(EOLS)
    kind = draw(st.integers(0, 5))
    status = (draw(st.sampled_from(STATUS_LINES[:2])) if kind < 3 else draw(st.sampled_from(STATUS_LINES)) if kind < 5
              else draw(st.binary(max_size=14)))
    parts = [status, draw(eol)]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            parts.append(draw(st.sampled_from(RAW_LINES)))
        elif kind <= 4:
            name, value = draw(framing)
            parts.append(name + b": " + value)
        else:
            parts.append(draw(st.sampled_from(RESP_NAMES)) + draw(st.sampled_from(SEPARATORS))
                         + draw(st.one_of(st.sampled_from(RESP_VALUES), st.binary(max_size=6))))
        parts.append(draw(eol))
    parts.append(draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"", b"\r"])))
    head = b"".join(parts)
    if draw(st.integers(0, 3)) == 0:
        head = mutate(draw, head)
    prefix = draw(st.sampled_from([b"", b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"xyz"]))
    data = prefix + head + draw(st.sampled_from([b"", b"hello", b"0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]))
    if draw(st.integers(0, 3)) == 0:      # a head that has not all arrived yet
        data = data[:draw(st.integers(len(prefix), len(data)))]
    n = len(data) - len(prefix)
    max_size = draw(st.one_of(st.sampled_from([65536, 4096]), st.integers(0, n + 2),
                              st.sampled_from([len(head) - 1, len(head), len(head) + 1])))
    return data, len(prefix), draw(st.booleans()), max(max_size, 0)


WRAPS = [bytes, bytearray, memoryview]


def _check_response(data, start, head_request, max_size, wrap=bytes):
    args = (start, head_request, max_size)
    expected = outcome(model.scan_response_head, data, *args, fields=RESPONSE_FIELDS)
    assert outcome(core.scan_response_head, wrap(data), *args, fields=RESPONSE_FIELDS) == expected
    if expected[0] == "ok" and expected[1] is not None:
        rh = dict(expected[1])
        _check_head(rh["head"] + b"\r\n")
        event(f"body_mode {rh['body_mode']}, keep_alive {rh['keep_alive']}")
    else:
        event(expected[0] if expected[1:] != (None,) else "incomplete")


def _rh(data, head_request=False, max_size=65536, start=0):
    return outcome(core.scan_response_head, data, start, head_request, max_size, fields=RESPONSE_FIELDS)


def _model_rh(data, head_request=False, max_size=65536, start=0):
    return outcome(model.scan_response_head, data, start, head_request, max_size, fields=RESPONSE_FIELDS)


@settings(SETTINGS, max_examples=1500)
@given(response_heads(), st.sampled_from(WRAPS))
def test_scan_response_head_matches_model(args, wrap):
    _check_response(*args, wrap=wrap)


@settings(SETTINGS, max_examples=200)
@given(st.integers(25, 90), st.lists(st.tuples(st.sampled_from(RESP_NAMES), st.sampled_from(RESP_VALUES)),
                                     min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(0, 89)), st.binary(min_size=1, max_size=3))
def test_scan_response_head_with_many_lines_matches_model(n, pool, bad_at, bad):
    """Heads with more lines than the scanner keeps on the C stack (32), one maybe broken."""
    lines = [pool[i % len(pool)][0] + b": " + pool[i % len(pool)][1] for i in range(n)]
    if bad_at is not None and bad_at < n:
        lines[bad_at] = bad + lines[bad_at]
    data = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\nbody"
    assert _rh(data) == _model_rh(data)


def test_response_head_of_100_lines_keeps_every_end_to_end_line():
    lines = [b"X-H%d: v%d" % (i, i) for i in range(100)]
    data = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"Content-Length: 4\r\n\r\nbody"
    rh = core.scan_response_head(data, 0, False, 65536)
    assert rh.head == b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines)
    assert rh.content_length == 4 and rh.end == len(data) - 4
    assert _rh(data) == _model_rh(data)


# every combination of the framing fields, both orders: small enough to enumerate
FRAMING_CL = [[], [b"0"], [b"5"], [b"5, 5"], [b"5", b"5"], [b"5", b"6"], [b"5, 6"], [b""]]
FRAMING_TE = [[], [b"chunked"], [b"Chunked "], [b"gzip"], [b"gzip, chunked"], [b"chunked, gzip"], [b"gzip", b"chunked"],
              [b"chunked", b""], [b"chunked", b"chunked"], [b""]]
FRAMING_CONN = [[], [b"keep-alive"], [b"close"], [b"Keep-Alive, X-Custom"], [b"upgrade"]]


def framing_fields():
    for cl in FRAMING_CL:
        for te in FRAMING_TE:
            for conn in FRAMING_CONN:
                fields = ([(b"Connection", v) for v in conn] + [(b"Transfer-Encoding", v) for v in te]
                          + [(b"Content-Length", v) for v in cl] + [(b"X-Custom", b"1"), (b"Upgrade", b"h2c")])
                yield fields
                yield fields[::-1]


@pytest.mark.parametrize("status", [b"100 Continue", b"101 Switching Protocols", b"200 OK", b"204 No Content",
                                    b"304 Not Modified", b"500 Oops"])
@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_response_framing_matches_model_exhaustively(version, status):
    for fields in framing_fields():
        data = version + b" " + status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
        for head_request in (False, True):
            assert _rh(data, head_request) == _model_rh(data, head_request), data


def test_request_framing_matches_model_exhaustively():
    for fields in framing_fields():
        for extra in ([], [(b"Expect", b"100-continue")], [(b"Connection", b"upgrade"), (b"Host", b"h")]):
            headers = fields + extra
            expected = outcome(model.scan_request, headers, fields=REQUEST_FIELDS)
            assert outcome(core.scan_request, headers, fields=REQUEST_FIELDS) == expected, headers


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n"]),
       st.binary(max_size=40), st.booleans(), st.sampled_from([4096, 20, 0]))
def test_scan_response_head_on_arbitrary_bytes(prefix, raw, head_request, max_size):
    _check_response(prefix + raw, 0, head_request, max_size)
    _check_response(prefix + raw + b"\r\n\r\n", 0, head_request, max_size)


# --- chunked bodies ---------------------------------------------------------------------------

EXTS = [b"", b"", b"", b";a=b", b"; a=b", b" ;a", b"\t;x", b" ", b';a="x y"', b';a="x\\"y"', b';a="x\\\\"',
        b';a="\\', b';a="unterminated', b';a="x"y"', b";\x00", b";a\nb", b';"q\r"', b';a="\\\r"', b";\xff",
        b";" + b"x" * 30, b"x", b";a=\"\t\""]
TRAILERS = [b"X-T: 1\r\n", b"X-T:\r\n", b"Expires: 0\r\n", b"X-T : 1\r\n", b" folded\r\n", b"NoColon\r\n",
            b"X: a\x00b\r\n", b"\tX: y\r\n", b"X: \xff\r\n", b":x\r\n", b"X: y\n", b"X: a:b\r\n"]


@st.composite
def sizes(draw, n):
    digits = draw(st.sampled_from(["%x", "%X", "%x", "0%x", "000%x", "%015x", "%016x"])) % n
    return digits.encode()


@st.composite
def chunked_bodies(draw):
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.one_of(st.binary(min_size=1, max_size=12), st.sampled_from([b"\r\n", b"0\r\n\r\n"])))
        parts += [draw(sizes(len(data))), draw(st.sampled_from(EXTS)), b"\r\n", data, b"\r\n"]
    parts += [draw(sizes(0)), draw(st.sampled_from(EXTS)), b"\r\n"]
    parts += draw(st.lists(st.sampled_from(TRAILERS), max_size=2))
    parts.append(draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"", b"\r\r\n"])))
    body = b"".join(parts)
    if draw(st.integers(0, 3)) == 0:
        body = mutate(draw, body)
    return body + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n", b"\r\n"]))


def run_scanner(impl, pieces, decode, max_line, max_trailers, wrap=bytes, junk=b""):
    """Every feed's result (or "ValueError"), what take() returned, and done, piece by piece."""
    sc = impl.ChunkedScanner(decode, max_line, max_trailers)
    trace = []
    for piece in pieces:
        try:
            r = sc.feed(wrap(junk + piece), len(junk))
        except ValueError:
            r = "ValueError"
        trace.append((r, sc.take(), sc.done))
    return trace


def verdict(pieces, trace):
    """("done", offset in the whole stream), ("ValueError",) or ("incomplete",): the first feed that ended."""
    offset = 0
    for piece, (r, _, _) in zip(pieces, trace, strict=True):
        if r == "ValueError":
            return ("ValueError",)
        if r >= 0:
            return ("done", offset + r)
        offset += len(piece)
    return ("incomplete",)


LIMITS = st.sampled_from([(4096, 16384)] * 4 + [(8, 16384), (3, 10), (1, 3), (20, 0)])


@settings(SETTINGS, max_examples=600)
@given(chunked_bodies(), st.lists(st.integers(0, 200), max_size=6), st.booleans(), LIMITS,
       st.sampled_from(WRAPS), st.sampled_from([b"", b"", b"junk\r\n"]))
def test_chunked_scanner_matches_model(body, cuts, decode, limits, wrap, junk):
    cuts = sorted({c % (len(body) + 1) for c in cuts})
    bounds = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] + [b"more"]
    expected = run_scanner(model, pieces, decode, *limits, junk=junk)
    assert run_scanner(core, pieces, decode, *limits, wrap, junk) == expected
    ends = [r for r, _, _ in expected]
    event("ValueError" if "ValueError" in ends[:-1] else "complete" if any(isinstance(r, int) and r >= 0
                                                                           for r in ends[:-1]) else "incomplete")


@settings(SETTINGS, max_examples=120)
@given(chunked_bodies(), st.booleans(), LIMITS)
def test_chunked_scanner_every_split(body, decode, limits):
    body = body[:64]
    whole = run_scanner(model, [body], decode, *limits)
    for k in range(len(body) + 1):
        pieces = [body[:k], body[k:]]
        expected = run_scanner(model, pieces, decode, *limits)
        assert run_scanner(core, pieces, decode, *limits) == expected, k
        # the split changes neither the verdict nor (when decoding) the bytes
        assert verdict(pieces, expected) == verdict([body], whole), k
        assert b"".join(t for _, t, _ in expected) == whole[0][1], k
    one_by_one = [body[i:i + 1] for i in range(len(body))]
    assert run_scanner(core, one_by_one, decode, *limits) == run_scanner(model, one_by_one, decode, *limits)


@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=30), st.booleans(), st.sampled_from([b"", b"5\r\nhello\r\n", b"0\r\n"]))
def test_chunked_scanner_on_arbitrary_bytes(raw, decode, prefix):
    pieces = [prefix + raw, b"\r\n\r\n"]
    assert run_scanner(core, pieces, decode, 4096, 16384) == run_scanner(model, pieces, decode, 4096, 16384)


# --- known-tricky cases -----------------------------------------------------------------------

def _build(content_length, body_mode=1, headers=()):
    return core.build_request_head(b"POST", b"/", list(headers), b"up", b"10.0.0.1", b"http", b"rid",
                                   frozenset(), (), body_mode, content_length, False)


def test_content_length_digits_do_not_leak_between_calls():
    # a Content-Length of 0 once made every later single-digit length come out as "0"
    for cl in [0, 5, 0, 7, 1, 9, 10, 0, 3, 123456789012]:
        assert b"\r\nContent-Length: %d\r\n" % cl in _build(cl)
        assert _build(cl) == model.build_request_head(b"POST", b"/", [], b"up", b"10.0.0.1", b"http", b"rid",
                                                      frozenset(), (), 1, cl, False)


def test_negative_content_length_is_refused():
    with pytest.raises(ValueError):
        _build(-1)
    assert b"Content-Length" not in _build(-1, body_mode=0)


def test_request_framing_rules():
    te = [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"")]
    assert core.scan_request(te).chunked and model.scan_request(te).chunked
    te = [(b"transfer-encoding", b"gzip"), (b"TRANSFER-ENCODING", b"chunked")]
    assert core.scan_request(te).chunked
    te = [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")]
    assert not core.scan_request(te).chunked
    for headers in ([(b"Content-Length", b"5"), (b"content-length", b"6")], [(b"Content-Length", b"5, 5")],
                    [(b"Content-Length", b"")], [(b"Content-Length", b"9999999999999999999")],
                    [(b"Host", b"a"), (b"HOST", b"a")], [(b"Host", b"a b")]):
        with pytest.raises(ValueError):
            core.scan_request(list(headers))
    assert core.scan_request([(b"Content-Length", b"5"), (b"Content-Length", b"5")]).content_length == 5


def test_request_head_hop_by_hop_and_forwarding():
    headers = [(b"Host", b"client.example"), (b"Connection", b"keep-alive, X-Secret, Upgrade"),
               (b"X-Secret", b"s"), (b"x-secret", b"t"), (b"Upgrade", b"websocket"), (b"TE", b"trailers"),
               (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-Proto", b"https"), (b"Via", b"1.0 a"),
               (b"Keep-Alive", b"300"), (b"Content-Length", b"5"), (b"Accept", b"*/*"), (b"Expect", b"100-continue")]
    head = core.build_request_head(b"GET", b"/p", headers, b"up:80", b"2.2.2.2", b"http", b"rid",
                                   frozenset({b"expect"}), ((b"X-Added", b"1"),), 2, 0, True)
    assert head == (b"GET /p HTTP/1.1\r\nHost: up:80\r\nAccept: */*\r\n"
                    b"X-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nX-Forwarded-Proto: http\r\n"
                    b"X-Forwarded-Host: client.example\r\nVia: 1.0 a, 1.1 fastgate\r\nX-Request-ID: rid\r\n"
                    b"Transfer-Encoding: chunked\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
                    b"X-Added: 1\r\n\r\n")
    assert head == model.build_request_head(b"GET", b"/p", headers, b"up:80", b"2.2.2.2", b"http", b"rid",
                                            frozenset({b"expect"}), ((b"X-Added", b"1"),), 2, 0, True)
    for bad in ([(b"X-Ok", b"a\r\nX-Injected: 1")], [(b"X Bad", b"v")], [(b"Via", b"a\nb")]):
        with pytest.raises(ValueError):
            _build(0, headers=bad)


@pytest.mark.parametrize("data, expected", [
    # TE and CL together: TE wins, CL is stripped, the connection is not reused (RFC 9112 §6.3)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", (2, -1, False)),
    # TE in an HTTP/1.0 response is faulty framing: close afterwards (RFC 9112 §6.1)
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", (2, -1, False)),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", (1, 2, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", (1, 5, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", (2, -1, True)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", (0, 7, True)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", (0, -1, True)),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", (1, 0, False)),
])
def test_response_framing(data, expected):
    got = _rh(data)
    assert got == _model_rh(data)
    rh = dict(got[1])
    assert (rh["body_mode"], rh["content_length"], rh["keep_alive"]) == expected
    assert b"Content-Length" not in rh["head"] and b"Transfer-Encoding" not in rh["head"]


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",                  # obs-fold
    b"HTTP/1.1 200 OK\r\nX: a\n\r\n",                                # bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",                # space before the colon
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",            # a coding we could not pass on
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1 200 O\rK\r\n\r\n",
])
def test_response_head_refusals(data):
    assert _rh(data) == _model_rh(data) == ("ValueError",)


def test_response_head_incomplete_and_too_large():
    head = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"
    for cut in range(len(head)):
        assert _rh(head[:cut]) == _model_rh(head[:cut]) == ("ok", None)
    assert _rh(head, max_size=len(head)) == _model_rh(head, max_size=len(head))
    assert _rh(head, max_size=len(head))[0] == "ok"
    assert _rh(head + b"body", max_size=len(head) - 1) == ("ValueError",)
    assert _rh(head[:-1], max_size=len(head) - 1) == ("ok", None)
    rh = dict(_rh(b"xx" + head + b"body", start=2)[1])
    assert rh["end"] == 2 + len(head)


def test_response_connection_listed_fields_are_dropped():
    data = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\n"
            b"X-Hop: 1\r\nKeep-Alive: t=5\r\nX-Kept: 2\r\n\r\n")
    got = _rh(data)
    assert got == _model_rh(data)
    assert dict(got[1])["head"] == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-Kept: 2\r\n"


@pytest.mark.parametrize("body, ok", [
    (b"5\r\nhello\r\n0\r\n\r\n", True),
    (b"5;a=b\r\nhello\r\n0;c\r\nX-T: 1\r\n\r\n", True),
    (b'5;a="x\\"y"\r\nhello\r\n0\r\n\r\n', True),                    # quoted-pair in an extension
    (b'5;a="x\r\nhello\r\n0\r\n\r\n', False),                        # unterminated quoted-string
    (b'5;a="x\\"\r\nhello\r\n0\r\n\r\n', False),                     # ... the escaped quote does not close it
    (b"5;a\nb\r\nhello\r\n0\r\n\r\n", False),                        # bare LF in an extension
    (b"5\nhello\r\n0\r\n\r\n", False),
    (b"00000000000000f\r\n" + b"x" * 15 + b"\r\n0\r\n\r\n", True),  # 15 hex digits: the cap
    (b"000000000000000f\r\n", False),                                # 16: refused, no overflow
    (b"fffffffffffffff\r\n", None),                                  # 2**60 - 1: just a long chunk
    (b"-5\r\n", False),
    (b"0x5\r\n", False),
    (b"5\r\nhelloX\r\n", False),                                     # data longer than the size
    (b"0\r\n folded: x\r\n\r\n", False),                             # obs-fold in the trailers
    (b"0\r\nNoColon\r\n\r\n", False),                                # trailer without a colon
    (b"0\r\nX-T : 1\r\n\r\n", False),                                # space before the colon
    (b"0\r\nX-T: a\x00\r\n\r\n", False),
    (b"0\r\n\n", False),
])
def test_chunked_examples(body, ok):
    for pieces in ([body], [body[i:i + 1] for i in range(len(body))]):
        expected = run_scanner(model, pieces, True, 4096, 16384)
        assert run_scanner(core, pieces, True, 4096, 16384) == expected
        results = [r for r, _, _ in expected]
        if ok is None:
            assert results[-1] == -1 and "ValueError" not in results
        elif ok:
            assert results[-1] == len(pieces[-1]) and expected[-1][2]
        else:
            assert results[-1] == "ValueError"


def test_chunked_scanner_after_the_end():
    for impl in (core, model):
        sc = impl.ChunkedScanner(decode=True)
        assert sc.feed(b"xx3\r\nabc\r\n0\r\n\r\nNEXT", 2) == 15
        assert sc.done and sc.take() == b"abc" and sc.take() == b""
        with pytest.raises(ValueError):
            sc.feed(b"0\r\n\r\n")
        sc = impl.ChunkedScanner()
        with pytest.raises(ValueError):
            sc.feed(b"z")
        with pytest.raises(ValueError):
            sc.feed(b"0\r\n\r\n")                                        # broken stays broken
        assert not sc.done


NAMES = [b"X-Gateway", b"Server", b"x-cache", b"Set-Cookie", b"ETag", b"Via"]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([b"", b" "]),
                                st.binary(max_size=12).filter(lambda v: b"\r" not in v and b"\n" not in v)),
                      max_size=8),
       drop=st.sets(st.sampled_from([n.lower() for n in NAMES] + [b"absent", b"X-Gateway"])),
       case=st.booleans(), filler=st.sampled_from([0, 0, 26, 40]), as_set=st.booleans())
def test_remove_headers_matches_model(lines, drop, case, filler, as_set):
    """Any case in the head; names given as a set or frozenset, below and above the 32 the scan
    keeps as C pointers; a name not in lowercase never matches."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(
        (n.upper() if case else n) + b":" + ows + v + ows + b"\r\n" for n, ows, v in lines)
    drop = drop | {b"x-filler-%d" % i for i in range(filler)}
    names = set(drop) if as_set else frozenset(drop)
    got = core.remove_headers(head, names)
    assert got == model.remove_headers(head, frozenset(drop))
    if not any(n.lower() in drop for n, _ows, _v in lines):
        assert got is head  # nothing removed: no copy


def test_remove_headers_with_more_name_sets_than_it_remembers():
    """headers.pyx remembers the C form of the last few frozensets: six sets in turn, twice round,
    each answered for its own names (a remembered entry never stands for another set)."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: v\r\n" % n for n in NAMES)
    sets = [frozenset({n.lower()}) for n in NAMES]
    for _ in range(2):
        for names in sets:
            got = core.remove_headers(head, names)
            assert got == model.remove_headers(head, names)
            assert got.count(b"\r\n") == len(NAMES)  # exactly one line gone
    for names in sets:  # equal sets that are other objects: the same answers
        again = frozenset(set(names))
        assert core.remove_headers(head, again) == model.remove_headers(head, names)


def test_find_header_reads_pairs_that_are_lists():
    """A plugin may set ex.headers to pairs of its own making: read, never a crash."""
    headers = [[b"X-A", b"1"], (b"x-b", b"2")]
    assert core.find_header(headers, b"x-a") == b"1" == model.find_header([tuple(p) for p in headers], b"x-a")
    assert core.find_header(headers, b"x-b") == b"2"


LITERALS = [b"te", b"via", b"host", b"expect", b"upgrade", b"trailer", b"connection", b"keep-alive", b"x-request-id",
            b"content-length", b"x-forwarded-for", b"x-forwarded-host", b"proxy-connection", b"transfer-encoding",
            b"chunked", b"close"]


@st.composite
def near_literal(draw):
    """A literal with its letters' case flipped at random, maybe one byte replaced by any byte."""
    lit = draw(st.sampled_from(LITERALS))
    data = bytearray(c ^ 0x20 if chr(c).isalpha() and draw(st.booleans()) else c for c in lit)
    if draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data), lit


@given(st.one_of(near_literal(), st.tuples(st.binary(max_size=20), st.sampled_from(LITERALS))))
def test_ascii_case_insensitive_compare_matches_bytes_lower(case):
    data, lit = case
    assert core.ascii_ieq(data, lit) == (data.lower() == lit)


@given(st.binary(max_size=40))
def test_control_byte_check_matches_model_at_every_length(value):
    assert core.valid_header_value(value) == model.valid_header_value(value)


def test_added_pairs_that_are_not_pairs_of_bytes_are_refused():
    """A pair a policy added that cannot be sent: TypeError (the data plane answers 400), never
    a head written from something that is not bytes."""
    args = [b"GET", b"/", [(b"Host", b"a")], b"a", b"127.0.0.1", b"http", b"rid", None]
    for bad in (([b"X-A", b"v"],), ((b"X-A", None),), ((None, b"v"),), ((b"X-A", "v"),), ((b"X-A",),)):
        with pytest.raises((TypeError, ValueError)):
            core.build_request_head(*args, bad, 0, 0, False)
    assert b"X-A: v\r\n" in core.build_request_head(*args, (core.CheckedHeader(b"X-A", b"v"),), 0, 0, False)


def test_a_checked_header_copies_and_pickles_as_itself():
    import copy
    import pickle

    pair = core.CheckedHeader(b"X-Consumer-ID", b"ann")
    for again in (copy.copy(pair), copy.deepcopy(pair), pickle.loads(pickle.dumps(pair))):
        assert again == pair and type(again) is core.CheckedHeader
