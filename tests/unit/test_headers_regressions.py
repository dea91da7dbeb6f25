"""Bugs found in _core/headers.pyx, each pinned by the input that showed it."""
from __future__ import annotations

import re

from fastgate._core.headers import build_request_head


def _head(content_length: int) -> bytes:
    return build_request_head(b"POST", b"/", [(b"Content-Length", b"%d" % content_length)], b"up", b"127.0.0.1",
                              b"http", b"rid", frozenset(), (), 1, content_length, False)


def test_content_length_after_a_zero_length_request_is_not_zero():
    """The digits buffer lives on the C stack: a `0` left by an earlier call once leaked into
    the next head as `Content-Length: 0` followed by the real body — a request-smuggling bug."""
    for n in [0, 4, 0, 7, 10, 0, 1, 123456789, 0, 9]:
        lengths = re.findall(rb"\r\nContent-Length: (\d+)\r\n", _head(n))
        assert lengths == [b"%d" % n]


def test_offsets_outside_the_buffer_are_refused_not_read():
    import pytest

    from fastgate._core.headers import ChunkedScanner, scan_response_head

    data = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for start, max_size in [(-1, 100), (len(data) + 1, 100), (0, -1)]:
        with pytest.raises(ValueError):
            scan_response_head(data, start, False, max_size)
    assert scan_response_head(data, len(data), False, 100) is None  # at the end: nothing yet
    with pytest.raises(ValueError):
        ChunkedScanner().feed(b"0\r\n\r\n", 6)
    with pytest.raises(ValueError):
        ChunkedScanner().feed(b"0\r\n\r\n", -1)
