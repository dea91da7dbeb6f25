"""Reference model of fastgate._core.router: brute force over every entry, no tries, no ranks.

Same API as the compiled module (Router, parse_pattern, normalize_path). It is meant to be read
next to the contract, rule by rule; speed does not matter here.
"""
from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LABELS = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEX = b"0123456789abcdefABCDEF"
UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"

STATIC, PARAM, CATCHALL = 2, 1, 0       # also the per-segment specificity ranks


# --- patterns ---------------------------------------------------------------------------------

def parse_segments(pattern: str) -> list[tuple[int, str]]:
    """[(kind, text)]: text is the static text, or the param name ("*" for a bare `*`)."""
    if not isinstance(pattern, str):
        raise TypeError("route pattern must be a str")
    if not pattern.startswith("/"):
        raise ValueError(f"invalid route pattern {pattern!r}: it must start with '/'")
    parts = pattern.split("/")[1:]
    segs = []
    for i, part in enumerate(parts):
        if part == "*":
            kind, text = CATCHALL, "*"
        elif re.fullmatch(r"\{.*\*\}", part):
            kind, text = CATCHALL, part[1:-2]
        elif re.fullmatch(r"\{.*\}", part):
            kind, text = PARAM, part[1:-1]
        elif "{" in part or "}" in part or "*" in part:
            raise ValueError(f"invalid route pattern {pattern!r}: bad segment {part!r}")
        else:
            kind, text = STATIC, part
        if kind != STATIC and text != "*" and not NAME.fullmatch(text):
            raise ValueError(f"invalid route pattern {pattern!r}: bad parameter name {text!r}")
        if kind == CATCHALL and i != len(parts) - 1:
            raise ValueError(f"invalid route pattern {pattern!r}: catch-all {part!r} is not last")
        segs.append((kind, text))
    names = [text for kind, text in segs if kind != STATIC]
    if len(set(names)) != len(names):
        raise ValueError(f"invalid route pattern {pattern!r}: duplicate parameter name")
    return segs


def parse_pattern(pattern: str) -> tuple[str, ...]:
    return tuple(text for kind, text in parse_segments(pattern) if kind != STATIC)


def match_path(segs: list[tuple[int, str]], path: bytes) -> tuple[bytes, ...] | None:
    """The params if `path` matches the pattern, else None."""
    if not path.startswith(b"/"):
        return None
    parts = path.split(b"/")[1:]
    params = []
    for i, (kind, text) in enumerate(segs):
        if i >= len(parts):
            return None
        if kind == CATCHALL:
            params.append(b"/".join(parts[i:]))
            return tuple(params)
        if kind == PARAM:
            if parts[i] == b"":
                return None
            params.append(parts[i])
        elif parts[i] != text.encode("utf-8"):
            return None
    if len(parts) != len(segs):
        return None
    return tuple(params)


# --- hosts ------------------------------------------------------------------------------------

def check_host(host: str | None) -> None:
    if host is None:
        return
    if not isinstance(host, str):
        raise TypeError("route host must be a str or None")
    h = host.lower()
    if not host.isascii():
        raise ValueError(f"invalid route host {host!r}: not ASCII")
    if h.startswith("*."):
        h = h[2:]
        if not LABELS.fullmatch(h):
            raise ValueError(f"invalid route host {host!r}")
    elif not (LABELS.fullmatch(h) or IPV6.fullmatch(h)):
        raise ValueError(f"invalid route host {host!r}")


def request_host(raw: bytes) -> bytes:
    """The Host header value without its ":port", lowercase."""
    colon = raw.rfind(b":")
    if colon > raw.rfind(b"]"):
        raw = raw[:colon]
    return raw.lower()


def host_matches(host: str | None, req: bytes) -> bool:
    if host is None:
        return True
    pat = host.lower().encode("ascii")
    if pat.startswith(b"*."):
        suffix = pat[1:]
        return req.endswith(suffix) and len(req) > len(suffix)
    return req == pat


def host_rank(host: str | None) -> tuple[int, int]:
    if host is None:
        return (0, 0)
    if host.startswith("*."):
        return (1, len(host) - 1)
    return (2, 0)


# --- methods ----------------------------------------------------------------------------------

def check_methods(methods) -> None:
    if isinstance(methods, (str, bytes)):
        raise TypeError("route methods must be a tuple of str")
    for m in methods:
        if not isinstance(m, str):
            raise TypeError("route method must be a str")
        if not TOKEN.fullmatch(m):
            raise ValueError(f"invalid route method {m!r}")


# --- the router -------------------------------------------------------------------------------

class Router:
    def __init__(self, entries):
        self._entries = []
        for i, entry in enumerate(entries):
            host, methods, pattern, priority, value = entry
            try:
                segs = parse_segments(pattern)
                check_host(host)
                check_methods(methods)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"route entry {i}: {exc}") from None
            self._entries.append((host, tuple(m.encode() for m in methods), segs, int(priority), value))

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, method: bytes, host: bytes, path: bytes):
        req = request_host(host)
        best = None
        for i, (h, methods, segs, priority, value) in enumerate(self._entries):
            if not host_matches(h, req):
                continue
            if methods and method not in methods:
                continue
            params = match_path(segs, path)
            if params is None:
                continue
            spec = tuple(kind for kind, _ in segs)
            key = (priority, host_rank(h), spec, bool(methods), -i)
            if best is None or key > best[0]:
                best = (key, value, params)
        return None if best is None else (best[1], best[2])


# --- paths ------------------------------------------------------------------------------------

def normalize_path(path: bytes) -> bytes | None:
    if not path.startswith(b"/"):
        return None
    if any(b < 0x21 or b >= 0x7F or b == ord("#") for b in path):
        return None
    out = bytearray()
    i = 0
    while i < len(path):
        if path[i] == ord("%"):
            hh = path[i + 1:i + 3]
            if len(hh) != 2 or hh[0] not in HEX or hh[1] not in HEX:
                return None
            byte = int(hh, 16)
            if byte in UNRESERVED:
                out.append(byte)
            else:
                out += b"%" + hh.upper()
            i += 3
        else:
            out.append(path[i])
            i += 1
    # remove dot segments (RFC 3986 §5.2.4), with ".." above the root refused
    segments = bytes(out).split(b"/")[1:]
    stack: list[bytes] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b".":
            if last:
                stack.append(b"")
        elif seg == b"..":
            if not stack:
                return None
            stack.pop()
            if last:
                stack.append(b"")
        else:
            stack.append(seg)
    return b"/" + b"/".join(stack)
