"""A throwaway redis-server for tests and benches: its own free port and tmp dir, no persistence.

    with RedisServer() as r:            # or the `redis_server` fixture
        r.url                           # redis://127.0.0.1:<port>/0
        r.command("SCRIPT", "FLUSH")    # one command over a raw socket
        r.pause(500)                    # CLIENT PAUSE 500 ALL
        r.stop(); r.start()             # SIGTERM, then again on the same port (or r.restart())
        r.kill()                        # SIGKILL

Only the process started here is ever signalled, by its PID. With no redis-server binary the test
skips, or fails when CI=true.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import hiredis
import pytest

MISSING = "redis-server not found: apt-get install redis-server"


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RedisServer:
    def __init__(self, port: int | None = None, binary: str | None = None, extra: tuple = (),
                 password: str | None = None):
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.password = password  # --requirepass; command() authenticates
        self.extra = tuple(extra) + (("--requirepass", password) if password else ())
        self.dir = tempfile.mkdtemp(prefix="fastgate-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log"),
             *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if self.command("PING", timeout=0.5) == b"PONG":
                    return self
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {self.log()[-2000:]}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def command(self, *args, timeout: float = 5.0):
        """Send one command on a fresh connection and return the reply (raises RuntimeError on an error reply)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            replies = [_pack(*args)]
            if self.password:
                replies.insert(0, _pack("AUTH", self.password))
            s.sendall(b"".join(replies))
            reader = hiredis.Reader()
            got = []
            while len(got) < len(replies):
                data = s.recv(65536)
                if not data:
                    raise OSError("redis closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(str(reply))
                    got.append(reply)
            return got[-1]

    def pause(self, ms: int) -> None:
        """CLIENT PAUSE `ms` ALL: every client's commands wait (this one's reply comes first)."""
        assert self.command("CLIENT", "PAUSE", ms, "ALL") == b"OK"

    def unpause(self) -> None:
        self.command("CLIENT", "UNPAUSE")

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test."""
    with RedisServer() as server:
        yield server


def cluster_ports(n: int) -> list[int]:
    """n free ports whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p > 55000 or p in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        ports.append(p)
    return ports


class RedisCluster:
    """Three masters, no replicas, made with `redis-cli --cluster create`; a node can be stopped and
    started again on its port (it keeps its nodes.conf, so it rejoins with its slots)."""

    def __init__(self, masters: int = 3):
        self.binary = find_redis_server()
        cli = shutil.which("redis-cli")
        if cli is None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("redis-cli not found: apt-get install redis-tools")
            pytest.skip("redis-cli not found: apt-get install redis-tools")
        self.cli = cli
        self.nodes = [RedisServer(port=p, binary=self.binary,
                                  extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                         "--cluster-node-timeout", "3000",
                                         "--cluster-require-full-coverage", "no"))
                      for p in cluster_ports(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for n in self.nodes:
            n.start()
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for n in self.nodes:
                if n.running:
                    try:
                        states.append(b"cluster_state:ok" in n.command("CLUSTER", "INFO"))
                    except (OSError, RuntimeError):
                        states.append(False)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def node_id(self, node: RedisServer) -> str:
        return node.command("CLUSTER", "MYID").decode()

    def owner(self, key: bytes) -> RedisServer:
        """The node that serves `key`'s slot."""
        slot = self.nodes[0].command("CLUSTER", "KEYSLOT", key)
        for entry in self.nodes[0].command("CLUSTER", "SLOTS"):
            if entry[0] <= slot <= entry[1]:
                return next(n for n in self.nodes if n.port == entry[2][1])
        raise LookupError(slot)

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
