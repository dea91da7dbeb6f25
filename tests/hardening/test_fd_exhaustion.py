"""A worker out of file descriptors: the accept loop neither spins nor dies.

A real `fastgate run` (one worker) is started under `prlimit --nofile=N:N`: the supervisor raises
the soft limit to the hard one (`raise_nofile_limit`), so N is what the worker really gets. Idle
connections are opened until the worker cannot accept another (EMFILE). Then:
(a) the worker is still alive, (b) it burns almost no CPU while saturated (a spinning accept loop
takes ~100% of a core; the check is a third of the elapsed time, a behaviour check, not a timing),
(c) once idle connections go away, new clients are served again.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import IN_CI
from tests.harness import free_port

NOFILE = 96  # the worker's hard (and so soft) limit of open files
CONFIG = """
limits: {max_connections: %d, header_timeout: 30, keepalive_timeout: 60}
routes:
  - {name: hello, paths: [/hello], mock: {body: "hello"}}
"""


def _prlimit() -> str:
    path = shutil.which("prlimit")
    if path is None:
        msg = "prlimit is missing: install with apt-get install util-linux"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def get(port: int, timeout: float) -> bytes:
    """One GET /hello on a fresh connection; b"" when nothing (or a close) came back in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data
    except OSError:
        return b""


class Gateway:
    def __init__(self, tmp_path, max_connections: int, nofile: int, loop: str = "uvloop"):
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(CONFIG % max_connections)
        self.port = free_port()
        self.log = tmp_path / "gw.log"
        self.proc = subprocess.Popen(
            [_prlimit(), f"--nofile={nofile}:{nofile}", sys.executable, "-m", "fastgate", "run", "-c", str(cfg),
             "--workers", "1", "--listen", f"127.0.0.1:{self.port}", "--pid-file", str(tmp_path / "gw.pid")]
            + (["--asyncio"] if loop == "asyncio" else []),
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if get(self.port, 0.5).startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text())
        self.worker = children(self.proc.pid)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def saturate(port: int, n: int) -> list[socket.socket]:
    """Open n idle connections (the kernel completes them; the worker accepts what it can)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            break
        socks.append(s)
    return socks


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_worker_out_of_fds_neither_spins_nor_dies(tmp_path, loop, max_connections=16384):
    """The default limits.max_connections (16384) is far above what NOFILE descriptors hold, so the
    worker meets EMFILE in accept(). uvloop (libuv's reserve-fd trick) accepts and closes what it
    cannot keep; on stock asyncio (`fastgate run --asyncio`, whose own accept loop spins: CPython
    gh-151615) the worker's accept loop (server/accept.py) stops watching the socket for a moment.
    Both serve again once descriptors are free."""
    gw = Gateway(tmp_path, max_connections, NOFILE, loop)
    idle = []
    try:
        idle = saturate(gw.port, NOFILE + 40)
        time.sleep(0.5)  # let the worker accept what it can and hit EMFILE
        # saturated: a new client is not served
        assert not get(gw.port, 1.0).startswith(b"HTTP/1.1 200"), "served while out of fds?"
        # (a) alive and (b) not spinning
        before, t0 = cpu_seconds(gw.worker), time.monotonic()
        time.sleep(2.0)
        used, elapsed = cpu_seconds(gw.worker) - before, time.monotonic() - t0
        assert gw.proc.poll() is None and os.path.exists(f"/proc/{gw.worker}"), gw.log.read_text()[-3000:]
        assert children(gw.proc.pid) == [gw.worker], "the worker was replaced: it died"
        assert used < elapsed / 3, f"the worker used {used:.2f} s of CPU in {elapsed:.2f} s while saturated"
        # (c) idle connections go away: new clients are served again
        for s in idle:
            s.close()
        idle = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if get(gw.port, 1.0).startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("not served again after the idle connections closed:\n" + gw.log.read_text()[-3000:])
        assert children(gw.proc.pid) == [gw.worker]
    finally:
        for s in idle:
            s.close()
        gw.stop()
