"""The data plane reads each request's HTTP version from httptools' llhttp state instead of calling
get_http_version() (a str.format per request). It does so only if the import-time probe proved the
layout on the installed httptools; this test notices when an httptools upgrade turns it off."""
import httptools

from fastgate._core import proxy


def test_probe_accepts_the_installed_httptools():
    assert proxy.llhttp_direct() is True, (
        f"httptools {httptools.__version__}: llhttp_t is no longer where proxy.pyx looks; the data plane "
        "fell back to get_http_version() (correct, slower) — update fg_httptools_parser in proxy.pyx")
