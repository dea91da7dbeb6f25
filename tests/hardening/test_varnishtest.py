"""varnishtest scripts (`tests/hardening/vtc/*.vtc`) run against the real gateway.

Each script is fastgate's own: it carries over the facts of HAProxy's
`reg-tests/http-messaging/*.vtc` (payloads, expected statuses and framings), not their haproxy
parts. Its `server s1 -listen 127.0.0.1:${up_port}` is the upstream and its clients connect to
`127.0.0.1:${gw_port}`, a one-worker gateway running in this test's loop; varnishtest runs as a
subprocess (`-t`; not `-q`, which would print only "FAILED" where its default prints the whole log of
a failing script and one line for a passing one), and anything but exit code 0 fails the test with
that log.

Where the upstream must see nothing (smuggling, rejected framing), a script's server expects a
*sentinel* as the first request of its first connection (`expect req.url == "/sentinel"`) and a
later client sends it: any byte forwarded before it fails the script. `test_sentinel_idiom_fails_
when_bytes_are_forwarded` proves the idiom by running such a script against a plain TCP relay,
which forwards everything.

By hand: `varnishtest -t 20 -Dgw_port=<gateway> -Dup_port=<free port> tests/hardening/vtc/<f>.vtc`
with a gateway configured as `vtc_config()` below (see README "Hardening").
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.harness import config, free_port, gateway

VTC_DIR = Path(__file__).parent / "vtc"
SCRIPTS = sorted(VTC_DIR.glob("*.vtc"))
# scripts that show a known gateway bug: xfail(strict=True), so fixing the bug fails here until the
# mark goes (README "Hardening")
KNOWN_BUGS: dict[str, str] = {}  # none today
VTC_TIMEOUT = 20  # seconds, varnishtest's own -t; the subprocess is killed a little after it


def vtc_config(up_port: int) -> dict:
    """The gateway every script runs against (also the config to use by hand)."""
    return config(
        routes=[{"name": "vtc", "paths": ["/*"], "upstream": "u", "preserve_host": True}],
        upstreams=[{"name": "u", "targets": [{"address": f"127.0.0.1:{up_port}"}],
                    "retries": 0,  # a script's server answers each request once: no replay
                    "health": {"passive": None},  # faulty answers are the point, never an ejection
                    "timeouts": {"connect": 1, "read": 2, "write": 2}}],
        limits={"header_timeout": 1, "body_timeout": 1, "max_headers": 100, "max_header_bytes": 32768})


def _varnishtest() -> str:
    import shutil

    path = shutil.which("varnishtest")
    if path is None:
        msg = "varnishtest is missing: install with apt-get install varnish"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


async def run_vtc(binary: str, script: Path, gw_port: int, up_port: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        binary, "-t", str(VTC_TIMEOUT), f"-Dgw_port={gw_port}", f"-Dup_port={up_port}", str(script),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), VTC_TIMEOUT + 10)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode("latin-1") + "\n(killed: varnishtest outlived its own -t)"
    return proc.returncode, out.decode("latin-1")


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
@pytest.mark.parametrize("script", [
    pytest.param(s, id=s.stem, marks=[pytest.mark.xfail(reason=KNOWN_BUGS[s.stem], strict=True)])
    if s.stem in KNOWN_BUGS else pytest.param(s, id=s.stem) for s in SCRIPTS])
async def test_vtc(loop, script):
    binary = _varnishtest()
    up_port = free_port()
    async with gateway(vtc_config(up_port)) as gw:
        rc, out = await run_vtc(binary, script, gw.port, up_port)
    assert rc == 0, f"varnishtest {script.name} failed (exit {rc}):\n{out[-12000:]}"


class _Relay:
    """A byte-for-byte TCP relay: the worst possible 'gateway', forwarding whatever it reads."""

    def __init__(self, up_port: int):
        self.up_port = up_port
        self.port = 0
        self.server = None
        self.tasks: set = set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _conn(self, reader, writer):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.up_port)
        except OSError:
            writer.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        tasks = [asyncio.ensure_future(pipe(reader, uw)), asyncio.ensure_future(pipe(ur, writer))]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.difference_update(tasks)


SENTINEL_PROBE = """varnishtest "the sentinel idiom of request_framing.vtc, alone"
server s1 -listen 127.0.0.1:${up_port} {
    rxreq
    expect req.url == "/sentinel"
    txresp
} -start
client c1 -connect 127.0.0.1:${gw_port} {
    timeout 1
    # request_framing.vtc c7: the gateway refuses it (400), a relay forwards it
    send "POST /smuggled HTTP/1.1\\r\\nHost: a\\r\\nTransfer-Encoding: gzip\\r\\nContent-Length: 0\\r\\n\\r\\n"
    rxresp
    expect resp.status == 400
} -run
client c2 -connect 127.0.0.1:${gw_port} {
    txreq -url "/sentinel"
    rxresp
    expect resp.status == 200
} -run
server s1 -wait
"""


@pytest.mark.parametrize("loop", ["uvloop"], indirect=True)
async def test_sentinel_idiom_fails_when_bytes_are_forwarded(loop, tmp_path):
    """The idiom the smuggling scripts use to prove "nothing reached the upstream": it passes against
    the gateway and FAILS against a relay that forwards the refused request, because the server's
    first request is then `/smuggled`, not the sentinel."""
    binary = _varnishtest()
    probe = tmp_path / "sentinel.vtc"
    probe.write_text(SENTINEL_PROBE)
    up_port = free_port()
    async with gateway(vtc_config(up_port)) as gw:
        rc, out = await run_vtc(binary, probe, gw.port, up_port)
    assert rc == 0, f"the probe fails against the gateway:\n{out[-6000:]}"
    up_port = free_port()
    async with _Relay(up_port) as relay:
        rc, out = await run_vtc(binary, probe, relay.port, up_port)
    assert rc != 0, f"the probe passed although the request was forwarded:\n{out[-6000:]}"
    assert 'EXPECT req.url (/smuggled) == "/sentinel" failed' in out, out[-6000:]
