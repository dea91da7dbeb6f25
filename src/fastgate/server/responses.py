"""Responses the gateway writes itself, prebuilt as bytes where they can be."""
from __future__ import annotations

import email.utils
import time
from http import HTTPStatus

import orjson

REASONS = {s.value: s.phrase for s in HTTPStatus}
REASONS.setdefault(431, "Request Header Fields Too Large")
STATUS_LINE = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in REASONS.items()}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
JSON_TYPE = b"Content-Type: application/json\r\n"


def status_line(code: int) -> bytes:
    line = STATUS_LINE.get(code)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % code


def date_line(now: float | None = None) -> bytes:
    """`Date: ...\\r\\n`; the worker's tick refreshes it once a second (uvicorn's approach)."""
    return b"Date: " + email.utils.formatdate(now if now is not None else time.time(), usegmt=True).encode() + b"\r\n"


def error_body(reason: str, request_id: bytes | None, **extra) -> bytes:
    doc = {"error": reason, "request_id": request_id.decode("latin-1") if request_id else None}
    doc.update(extra)
    return orjson.dumps(doc)


def build_error(code: int, reason: str, request_id: bytes | None, date: bytes, close: bool,
                extra_headers: bytes = b"", **extra) -> bytes:
    """A complete JSON error response: `{"error": reason, "request_id": ...}`."""
    body = error_body(reason, request_id, **extra)
    parts = [status_line(code), date, JSON_TYPE, b"Content-Length: %d\r\n" % len(body)]
    if request_id:
        parts.append(b"X-Request-ID: " + request_id + b"\r\n")
    if close:
        parts.append(CLOSE)
    parts += [extra_headers, b"\r\n", body]
    return b"".join(parts)
