"""The data plane reads each request's HTTP version from httptools' llhttp state instead of calling
get_http_version() (a str.format per request), and its keep-alive from llhttp's flags instead of
calling should_keep_alive(). It does so only if the import-time probe proved the
layout on the installed httptools; this test notices when an httptools upgrade turns it off. The ids the data plane writes in hex
(request ids, trace and span ids) come from hex16, checked here against Python's formatting."""
import httptools
from hypothesis import given
from hypothesis import strategies as st

from fastgate._core import proxy


def test_probe_accepts_the_installed_httptools():
    assert proxy.llhttp_direct() is True, (
        f"httptools {httptools.__version__}: llhttp_t is no longer where proxy.pyx looks; the data plane "
        "fell back to get_http_version() (correct, slower) — update fg_httptools_parser in proxy.pyx")


def test_keep_alive_probe_accepts_the_installed_httptools():
    assert proxy.keep_alive_direct() is True, (
        f"httptools {httptools.__version__}: llhttp_t's flags are no longer where proxy.pyx looks; the data "
        "plane fell back to should_keep_alive() (correct, slower) — update fg_llhttp_head in proxy.pyx")


@given(st.integers(0, 2**64 - 1))
def test_hex16_writes_the_16_lowercase_hex_digits(v):
    assert proxy.hex16(v) == b"%016x" % v


_CONN = st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b"CLOSE", b"upgrade", b"foo", b"keep-alive, close",
                         b"close, keep-alive", b"foo, keep-alive", b"te, close", b""])


@given(st.lists(st.tuples(st.sampled_from([b"1.0", b"1.1"]), st.lists(_CONN, max_size=2),
                          st.sampled_from([b"", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"])),
                min_size=1, max_size=4))
def test_keep_alive_from_the_flags_is_should_keep_alives(heads):
    """The data plane's reading of llhttp's flags against should_keep_alive(), head by head on one
    connection, until a head that closes it."""
    probe = proxy._KeepAliveProbe()
    probe.parser = httptools.HttpRequestParser(probe)
    for version, conns, framing in heads:
        body = {b"": b"", b"Content-Length: 3\r\n": b"abc"}.get(framing, b"3\r\nabc\r\n0\r\n\r\n")
        head = b"POST / HTTP/" + version + b"\r\nHost: a\r\n" + b"".join(b"Connection: %s\r\n" % c for c in conns)
        before = len(probe.seen)
        try:
            probe.parser.feed_data(head + framing + b"\r\n" + body)
        except httptools.HttpParserError:
            break  # a head after one that closed the connection
        assert len(probe.seen) == before + 1
        flags, reference = probe.seen[-1]
        assert flags == reference, (version, conns, framing)
        if not reference:
            break
