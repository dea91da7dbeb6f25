"""Reference model of fastgate._core.headers: plain Python over whole byte strings, rule by rule.

Same API as the compiled module (scan_request, find_header, build_request_head, scan_response_head,
ChunkedScanner, valid_header_name, valid_header_value). It is meant to be read next to RFC 9110 and
RFC 9112; speed does not matter here. Every error is a ValueError, as in the compiled module.

Where the module is deliberately stricter or looser than the RFC, the rule says so:
- request Content-Length is one bare number (no list, no OWS: the HTTP parser strips OWS); several
  Content-Length lines must agree (RFC 9112 §6.3 ¶5);
- response Content-Length may be a list of equal numbers ("5, 5"), but an empty element is refused;
- a response whose Transfer-Encoding has a coding after chunked is refused (not read-until-close);
- a chunk extension is anything without CTLs after the size (";" or BWS), except that a
  quoted-string (with its quoted-pairs) must close before the CR;
- a trailer line is `token ":" value-without-CTLs`; obs-fold is refused everywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ALNUM = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TCHARS = frozenset(ALNUM + b"!#$%&'*+-.^_`|~")                     # RFC 9110 §5.6.2
HOSTCHARS = frozenset(ALNUM + b"-._~!$&'()*+,;=:[]%")              # RFC 3986 host, with port and brackets
RIDCHARS = frozenset(ALNUM + b"-_.:+/=")
HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
CR, LF, HTAB, SP = 13, 10, 9, 32

# hop-by-hop fields (RFC 9110 §7.6.1, plus the old Keep-Alive / Proxy-Connection / Trailer names)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# request fields the gateway writes itself (framing, Host, X-Forwarded-*, Via, X-Request-ID)
REWRITTEN = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                       b"x-forwarded-host", b"via", b"x-request-id"})


# --- character classes ------------------------------------------------------------------------

def is_ctl(c: int) -> bool:
    """CTL other than HTAB (RFC 5234), i.e. never allowed in a field value."""
    return (c < 0x20 and c != HTAB) or c == 0x7F


def valid_header_name(name: bytes) -> bool:
    return len(name) > 0 and all(c in TCHARS for c in name)


def valid_header_value(value: bytes) -> bool:
    return not any(is_ctl(c) for c in value)


def strip_ows(value: bytes) -> bytes:
    return value.strip(b" \t")


def list_elements(value: bytes) -> list[bytes]:
    """RFC 9110 §5.6.1 list: the comma-separated elements, OWS-stripped, empty ones kept."""
    return [strip_ows(e) for e in value.split(b",")]


def decimal(value: bytes) -> int | None:
    """1*DIGIT, at most 18 digits (so it fits in an int64)."""
    return int(value) if re.fullmatch(rb"[0-9]{1,18}", value) else None


def checked(value: bytes) -> bytes:
    if not valid_header_value(value):
        raise ValueError("control character")
    return value


def field_line(name: bytes, value: bytes) -> bytes:
    if not valid_header_name(name):
        raise ValueError(f"invalid header name {name!r}")
    return name + b": " + checked(value) + b"\r\n"


# --- requests ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestInfo:
    host: bytes | None = None
    content_length: int = -1
    chunked: bool = False
    expect_continue: bool = False
    expect_other: bool = False
    upgrade: bytes | None = None
    request_id: bytes | None = None
    connection_close: bool = False


REQUEST_FIELDS = tuple(RequestInfo.__dataclass_fields__)


def scan_request(headers: list[tuple[bytes, bytes]]) -> RequestInfo:
    host = None
    content_length = -1
    codings: list[bytes] = []
    expect_continue = expect_other = False
    upgrade_value = None
    connection: list[bytes] = []
    request_id = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            # RFC 9112 §3.2: more than one Host line, or an invalid one, is a 400
            if host is not None:
                raise ValueError("duplicate Host header")
            if any(c not in HOSTCHARS for c in value):
                raise ValueError("invalid Host header")
            host = value
        elif lname == b"content-length":
            n = decimal(value)
            if n is None or (content_length >= 0 and n != content_length):
                raise ValueError("invalid Content-Length")
            content_length = n
        elif lname == b"transfer-encoding":
            # all Transfer-Encoding lines form one list (RFC 9110 §5.3); empty elements are ignored
            codings += [e for e in list_elements(value) if e]
        elif lname == b"expect":
            if strip_ows(value).lower() == b"100-continue":
                expect_continue = True
            else:
                expect_other = True
        elif lname == b"connection":
            connection += [e.lower() for e in list_elements(value)]
        elif lname == b"upgrade":
            upgrade_value = value
        elif lname == b"x-request-id":
            if 1 <= len(value) <= 200 and all(c in RIDCHARS for c in value):
                request_id = value
    upgrade = None
    if b"upgrade" in connection and upgrade_value is not None:
        upgrade = upgrade_value.strip().lower()
    return RequestInfo(
        host=host,
        content_length=content_length,
        chunked=bool(codings) and codings[-1].lower() == b"chunked",
        expect_continue=expect_continue,
        expect_other=expect_other,
        upgrade=upgrade,
        request_id=request_id,
        connection_close=b"close" in connection,
    )


def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def connection_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Field names a Connection header lists (RFC 9110 §7.6.1), lowercase."""
    out = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out |= {e.lower() for e in list_elements(value)}
    return out - {b"", b"close", b"keep-alive", b"upgrade"}


def build_request_head(method, target, headers, host, client_ip, proto, request_id, drop, add, body_mode,
                       content_length, upgrade) -> bytes:
    if not valid_header_name(method):
        raise ValueError("invalid method")
    if b" " in target:
        raise ValueError("space in request target")
    out = [method + b" " + checked(target) + b" HTTP/1.1\r\n", b"Host: " + checked(host) + b"\r\n"]
    removed = connection_listed(headers) | set(drop or ())
    xff, via, client_host, upgrade_value = [], [], None, None
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            xff.append(value)
        elif lname == b"via":
            via.append(value)
        elif lname == b"host":
            client_host = value
        elif lname == b"upgrade":
            upgrade_value = value
        if lname in HOP_BY_HOP or lname in REWRITTEN or lname in removed:
            continue
        out.append(field_line(name, value))
    out.append(b"X-Forwarded-For: " + b", ".join(checked(v) for v in [*xff, client_ip]) + b"\r\n")
    out.append(b"X-Forwarded-Proto: " + checked(proto) + b"\r\n")
    if client_host is not None:
        out.append(b"X-Forwarded-Host: " + checked(client_host) + b"\r\n")
    out.append(b"Via: " + b", ".join(checked(v) for v in [*via, b"1.1 fastgate"]) + b"\r\n")
    out.append(b"X-Request-ID: " + checked(request_id) + b"\r\n")
    if body_mode == 1:
        if content_length < 0:
            raise ValueError("negative Content-Length")
        out.append(b"Content-Length: %d\r\n" % content_length)
    elif body_mode == 2:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade and upgrade_value is not None:
        out.append(b"Upgrade: " + checked(upgrade_value) + b"\r\nConnection: upgrade\r\n")
    for name, value in add or ():
        out.append(field_line(name, value))
    out.append(b"\r\n")
    return b"".join(out)


# --- responses --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseHead:
    status: int
    version: int
    head: bytes
    end: int
    body_mode: int          # 0 none, 1 Content-Length, 2 chunked, 3 until close
    content_length: int
    keep_alive: bool
    te: bytes | None


RESPONSE_FIELDS = tuple(ResponseHead.__dataclass_fields__)

# RFC 9112 §4: HTTP-version SP 3DIGIT [SP reason], the reason without CTLs (the SP may be missing)
STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")


def scan_response_head(data, start: int, head_request: bool, max_size: int) -> ResponseHead | None:
    data = bytes(data)
    too_large = len(data) - start > max_size
    window = data[start:start + max_size] if too_large else data[start:]
    lines = []                  # (name, raw line with its CRLF)
    status_line = None
    cl = None
    codings: list[bytes] = []
    te_values: list[bytes] = []
    connection: list[bytes] = []
    pos = 0
    while True:
        lf = window.find(b"\n", pos)
        if lf < 0:
            if too_large:
                raise ValueError("response head too large")
            return None
        raw = window[pos:lf + 1]
        pos = lf + 1
        if not raw.endswith(b"\r\n"):
            raise ValueError("bare LF")
        line = raw[:-2]
        if status_line is None:
            status_line = STATUS_LINE.fullmatch(line)
            if status_line is None or int(status_line[2]) < 100:
                raise ValueError("bad status line")
            continue
        if line == b"":
            break
        name, colon, value = line.partition(b":")
        if not colon or not valid_header_name(name):      # also refuses obs-fold and "name :"
            raise ValueError("bad header line")
        value = strip_ows(value)
        if not valid_header_value(value):
            raise ValueError("control character in response header")
        lname = name.lower()
        if lname == b"content-length":
            # RFC 9112 §6.3 ¶5: a list of identical valid values is that value
            for e in list_elements(value):
                n = decimal(e)
                if n is None or (cl is not None and n != cl):
                    raise ValueError("invalid Content-Length in response")
                cl = n
        elif lname == b"transfer-encoding":
            for e in list_elements(value):
                if not e:
                    continue
                if codings and codings[-1].lower() == b"chunked":
                    raise ValueError("chunked is not the last transfer coding")
                codings.append(e)
            te_values.append(value)
        elif lname == b"connection":
            connection += [e.lower() for e in list_elements(value)]
        lines.append((lname, raw))

    version = 11 if status_line[1] == b"1" else 10
    status = int(status_line[2])
    reason = status_line[3] or b""
    listed = set(connection) - {b"", b"close", b"keep-alive", b"upgrade"}
    head = [b"HTTP/1.1 " + status_line[2] + b" " + reason + b"\r\n"]
    for lname, raw in lines:
        if lname == b"content-length" or lname in listed:
            continue
        if lname in HOP_BY_HOP and not (lname == b"upgrade" and status == 101):
            continue
        head.append(raw)

    te_seen = bool(codings)
    chunked = te_seen and codings[-1].lower() == b"chunked"
    te = None
    content_length = -1
    if head_request or status < 200 or status in (204, 304):   # RFC 9112 §6.3 ¶1
        body_mode = 0
        if not te_seen and status >= 200 and status != 204 and cl is not None:
            content_length = cl
    elif te_seen:                                                # ¶4: chunked last, else until close —
        if not chunked:                                          # but a coding the gateway would drop
            raise ValueError("response transfer coding other than chunked")  # is refused (502)
        body_mode = 2
        te = b", ".join(te_values)
    elif cl is not None:
        body_mode = 1
        content_length = cl
    else:
        body_mode = 3
    close = b"close" in connection
    persistent = (version == 11 and not close) or (version == 10 and b"keep-alive" in connection and not close)
    keep_alive = (persistent and body_mode != 3
                  and not (te_seen and cl is not None)           # §6.3 ¶3: smuggling suspect
                  and not (te_seen and version == 10))          # §6.1: TE in HTTP/1.0 is faulty framing
    return ResponseHead(status=status, version=version, head=b"".join(head), end=start + pos,
                        body_mode=body_mode, content_length=content_length, keep_alive=keep_alive, te=te)


# --- chunked bodies ---------------------------------------------------------------------------

class BadFraming(Exception):
    pass


class ChunkedScanner:
    """RFC 9112 §7.1, written as a generator that is sent the stream one byte at a time."""

    def __init__(self, decode: bool = False, max_line: int = 4096, max_trailers: int = 16384):
        self.decode = decode
        self._out: list[int] = []
        self._state = "open"
        self._parser = self._chunked_body(max_line, max_trailers)
        next(self._parser)

    @property
    def done(self) -> bool:
        return self._state == "done"

    def take(self) -> bytes:
        out = bytes(self._out) if self.decode else b""
        self._out.clear()
        return out

    def feed(self, data, start: int = 0) -> int:
        if self._state != "open":
            raise ValueError(f"chunked body is {self._state}")
        data = bytes(data)
        for i in range(start, len(data)):
            try:
                self._parser.send(data[i])
            except StopIteration:
                self._state = "done"
                return i + 1
            except BadFraming:
                self._state = "broken"
                raise ValueError("bad chunked framing") from None
        return -1

    def _chunked_body(self, max_line: int, max_trailers: int):
        def need(ok: bool) -> None:
            if not ok:
                raise BadFraming

        while True:
            # chunk-size: 1 to 15 hex digits (2**60 - 1 at most, no overflow)
            digits = []
            c = yield
            while c in HEXDIGITS:
                need(len(digits) < 15)
                digits.append(c)
                c = yield
            need(len(digits) > 0)
            # chunk-ext: after ";" or BWS, anything without CTLs up to the CR, where a quoted-string
            # (RFC 9110 §5.6.4, with quoted-pairs) must be closed; the whole line counts to max_line
            if c in b"; \t":
                line = len(digits) + 1
                quoted = escaped = False
                while True:
                    c = yield
                    line += 1
                    need(line <= max_line)
                    if escaped:
                        need(not is_ctl(c))
                        escaped = False
                    elif quoted and c == ord("\\"):
                        escaped = True
                    elif c == ord('"'):
                        quoted = not quoted
                    elif c == CR and not quoted:
                        break
                    else:
                        need(not is_ctl(c))
            need(c == CR)
            need((yield) == LF)
            size = int(bytes(digits), 16)
            if size == 0:
                break
            for _ in range(size):
                self._out.append((yield))
            need((yield) == CR)
            need((yield) == LF)
        # trailer-section: field lines `token ":" value` (no obs-fold), then CRLF; every byte but
        # the LFs counts towards max_trailers
        count = 0
        while True:
            c = yield
            count += 1
            if c == CR:
                break
            need(c in TCHARS)
            in_name = True
            while True:
                c = yield
                count += 1
                need(count <= max_trailers)
                if in_name:
                    if c == ord(":"):
                        in_name = False
                    else:
                        need(c in TCHARS)
                elif c == CR:
                    break
                else:
                    need(not is_ctl(c))
            need((yield) == LF)
        need((yield) == LF)


def remove_headers(head: bytes, names) -> bytes:
    """The header lines of `head` whose name (before the colon, whitespace stripped, lowercased) is
    in `names`, removed; the status line is never a header line. (What the proxy did in Python;
    heads come from scan_response_head, which refuses whitespace before a colon, folded lines and
    bare LF, so stripping only SP and HTAB as the compiled scan does is the same on them.)"""
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in names]
    return b"\r\n".join(kept)
