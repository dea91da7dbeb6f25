"""Coverage-guided fuzzing (atheris/libFuzzer) of the compiled hot path against the pure-Python models.

    .venv/bin/python tests/fuzz/fuzz_core.py -max_total_time=600 -workers=2 -jobs=2 /tmp/fastgate-corpus

Targets, chosen by the first input byte: scan_request, ChunkedScanner (split at fuzzer-chosen points,
passing through or decoding), scan_response_head, Router.match and normalize_path. Each must never raise
anything but ValueError, and must agree with tests/models (the same result, or ValueError from both).
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    from fastgate._core import headers as core
    from fastgate._core import router as core_router
    from tests.models import headers_model as model
    from tests.models import router_model as model_router

ENTRIES = [
    (None, (), "/", 0, "root"),
    (None, ("GET",), "/users/{id}", 0, "user"),
    (None, (), "/users/{id}/posts/{post}", 0, "post"),
    ("api.example.com", (), "/static/*", 0, "static-host"),
    ("*.example.com", ("GET", "POST"), "/files/{rest*}", 1, "files"),
    (None, (), "/exact", 5, "exact"),
]
ROUTER = core_router.Router(ENTRIES)
ROUTER_MODEL = model_router.Router(ENTRIES)
RESPONSE_FIELDS = model.RESPONSE_FIELDS


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ValueError:
        return ("ValueError",)


def fields(r):
    if r[0] != "ok" or r[1] is None:
        return r
    return ("ok", tuple(getattr(r[1], f) for f in RESPONSE_FIELDS))


def headers_from(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in data.split(b"\n")[:64]:
        name, _, value = line.partition(b":")
        out.append((name, value))
    return out


def chunked(fdp: atheris.FuzzedDataProvider) -> None:
    decode = fdp.ConsumeBool()
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 4)))
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    a, b = core.ChunkedScanner(decode), model.ChunkedScanner(decode)
    prev = 0
    for cut in [c for c in cuts if c < len(data)] + [len(data)]:
        piece = data[prev:cut]
        prev = cut
        ra, rb = outcome(a.feed, piece), outcome(b.feed, piece)
        assert ra == rb, (data, cuts, ra, rb)
        if ra[0] != "ok":
            return
        assert a.take() == b.take(), data
        if ra[1] >= 0:
            return


def TestOneInput(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    which = fdp.ConsumeIntInRange(0, 4)
    if which == 0:
        hs = headers_from(fdp.ConsumeBytes(fdp.remaining_bytes()))
        ra = outcome(core.scan_request, hs)
        rb = outcome(model.scan_request, hs)
        if ra[0] == "ok" and rb[0] == "ok":
            for f in ("host", "content_length", "chunked", "expect_continue", "expect_other", "upgrade",
                      "request_id", "connection_close"):
                assert getattr(ra[1], f) == getattr(rb[1], f), (hs, f)
        else:
            assert ra[0] == rb[0], (hs, ra, rb)
    elif which == 1:
        chunked(fdp)
    elif which == 2:
        head_request = fdp.ConsumeBool()
        max_size = fdp.ConsumeIntInRange(0, 8192)
        data = fdp.ConsumeBytes(fdp.remaining_bytes())
        start = min(len(data), data.find(b"HTTP/") if b"HTTP/" in data[:8] else 0)
        ra = fields(outcome(core.scan_response_head, data, start, head_request, max_size))
        rb = fields(outcome(model.scan_response_head, data, start, head_request, max_size))
        assert ra == rb, (data, ra, rb)
    elif which == 3:
        path = fdp.ConsumeBytes(fdp.remaining_bytes())
        ra, rb = core_router.normalize_path(path), model_router.normalize_path(path)
        assert ra == rb, (path, ra, rb)
        if ra is not None:
            assert core_router.normalize_path(ra) == ra, path
    else:
        method = fdp.PickValueInList([b"GET", b"POST", b"HEAD", b"DELETE", b"G\x00T", b""])
        host = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        path = fdp.ConsumeBytes(fdp.remaining_bytes())
        assert ROUTER.match(method, host, path) == ROUTER_MODEL.match(method, host, path), (method, host, path)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
