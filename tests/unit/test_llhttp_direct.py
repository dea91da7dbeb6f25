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
