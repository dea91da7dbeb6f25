"""The forking supervisor with real processes: workers, respawn, reloads under load, scaling."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import free_port

BASE = """
routes:
  - {name: hello, paths: [/hello], mock: {body: "%s"}}
"""


class Gateway:
    def __init__(self, tmp: Path, text: str, workers: int = 2):
        self.cfg = tmp / "gw.yaml"
        self.cfg.write_text(text)
        self.pid_file = tmp / "gw.pid"
        self.port = free_port()
        self.log = tmp / "gw.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "-c", str(self.cfg), "--workers", str(workers),
             "--listen", f"127.0.0.1:{self.port}", "--pid-file", str(self.pid_file)],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/hello"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url, timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.log.read_text())
        self.wait_workers(workers)

    def workers(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def wait_workers(self, n: int, exclude=(), timeout: float = 10) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == n and not set(pids) & set(exclude):
                return pids
            time.sleep(0.05)
        raise AssertionError(f"expected {n} workers, have {self.workers()}\n" + self.log.read_text()[-3000:])

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def gw(tmp_path):
    g = Gateway(tmp_path, BASE % "one")
    yield g
    g.stop()


def test_workers_serve_and_a_killed_worker_is_replaced(gw):
    pids = gw.wait_workers(2)
    os.kill(pids[0], signal.SIGKILL)
    new = gw.wait_workers(2, exclude=[pids[0]], timeout=3)  # reaped and replaced within a second or so
    assert pids[1] in new and len(new) == 2
    assert httpx.get(gw.url).text == "one"


def test_reload_swaps_config_and_invalid_reload_keeps_serving(gw):
    old = gw.wait_workers(2)
    gw.cfg.write_text(BASE % "two")
    subprocess.run([sys.executable, "-m", "fastgate", "reload", "--pid-file", str(gw.pid_file)], check=True)
    deadline = time.monotonic() + 15
    while httpx.get(gw.url).text != "two" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(gw.url).text == "two"
    gw.wait_workers(2, exclude=old, timeout=15)
    gw.cfg.write_text("routes: [{name: x, paths: [nope], upstream: missing}]\n")
    current = gw.workers()
    gw.signal(signal.SIGHUP)
    time.sleep(1.0)
    assert httpx.get(gw.url).text == "two"
    assert sorted(gw.workers()) == sorted(current)
    log = gw.log.read_text()
    assert "reload refused" in log and "$.routes[0].paths[0]" in log and "$.routes[0].upstream" in log


def test_ten_reloads_under_load_fail_no_request(gw):
    failures, done = [], [0]
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.get(gw.url)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    done[0] += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            before = gw.workers()
            gw.signal(signal.SIGHUP)
            gw.wait_workers(2, exclude=before, timeout=20)
            assert i >= 0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert done[0] > 100
    assert failures == []


def test_a_worker_killed_under_load_fails_only_its_in_flight_requests(gw):
    failures, done = [], [0]
    stop = threading.Event()
    clients = 4

    def load():
        with httpx.Client(timeout=10) as c:  # keep-alive: at most one request in flight per client
            while not stop.is_set():
                try:
                    r = c.get(gw.url)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    done[0] += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        while done[0] < 200:
            time.sleep(0.01)
        before = gw.workers()
        os.kill(before[0], signal.SIGKILL)
        gw.wait_workers(2, exclude=before[:1], timeout=10)
        after_kill = done[0]
        while done[0] < after_kill + 200:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # only requests the dead worker held can fail: one per client connection at most
    assert len(failures) <= clients, failures
    assert all(isinstance(f, str) for f in failures)  # transport errors, never a wrong status


def test_ttin_ttou_scale_workers(gw):
    gw.wait_workers(2)
    gw.signal(signal.SIGTTIN)
    gw.wait_workers(3)
    gw.signal(signal.SIGTTOU)
    gw.wait_workers(2)
    gw.signal(signal.SIGTTOU)  # (two identical signals sent at once would coalesce into one)
    gw.wait_workers(1)
    assert httpx.get(gw.url).status_code == 200


def test_stop_command_drains_and_removes_pid_file(gw):
    subprocess.run([sys.executable, "-m", "fastgate", "stop", "--pid-file", str(gw.pid_file)], check=True)
    assert gw.proc.wait(20) == 0
    assert not gw.pid_file.exists()


def test_crash_loop_backs_off_and_is_reported(tmp_path):
    from tests.integration.test_edge import make_cert

    cert, key = make_cert(tmp_path)
    port = free_port()
    text = BASE % "tls" + f"listeners:\n  - {{kind: proxy, port: {port}, tls: {{certificate: {cert}, key: {key}}}}}\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", str(cfg), "--workers", "1",
                             "--pid-file", str(tmp_path / "p")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        os.unlink(key)  # workers started from now on cannot load the key: they die at start
        for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(4)
        text = log.read_text()
        assert "crash-looping" in text
        assert 2 <= text.count("died unexpectedly") < 10  # backed off, not spinning
        assert proc.poll() is None  # the supervisor itself stays up
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def _uid(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.skipif(os.getuid() != 0, reason="privilege drop needs root")
def test_workers_drop_to_the_configured_user(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    g = Gateway(tmp_path, BASE % "dropped" + "user: nobody\n")
    try:
        workers = g.wait_workers(2)
        deadline = time.monotonic() + 10  # a worker switches user right after fork
        while time.monotonic() < deadline and not all(_uid(p) == nobody for p in workers):
            time.sleep(0.05)
        assert _uid(g.proc.pid) == 0  # the supervisor keeps root to bind ports on reload
        assert all(_uid(p) == nobody for p in workers)
        assert httpx.get(g.url).text == "dropped"
    finally:
        g.stop()


def test_sigusr1_reopens_the_log_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE % "x")
    log = tmp_path / "fastgate.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "--log-file", str(log), "run", "-c", str(cfg),
                             "--listen", f"127.0.0.1:{port}", "--pid-file", str(tmp_path / "p")])
    try:
        deadline = time.monotonic() + 20
        while "started" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        rotated = tmp_path / "fastgate.log.1"
        log.rename(rotated)  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        while not (log.exists() and "reopened" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "log files reopened" in log.read_text()
        assert "started" in rotated.read_text() and "started" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
