"""A worker process: one uvloop loop serving the proxy listeners it inherited from the supervisor."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time

import uvloop

from ..config.schema import Config
from .generation import Generation
from .protocol import GatewayProtocol, WorkerState
from .responses import date_line

log = logging.getLogger("fastgate.worker")


def ssl_context(tls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.certificate, tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Worker:
    def __init__(self, cfg: Config, sockets, ready_fd: int | None = None, number: int = 1,
                 install_signals: bool = True):
        self.cfg = cfg
        self.install_signals = install_signals
        self.sockets = sockets  # [(socket, Listener)]
        self.ready_fd = ready_fd
        self.number = number
        self.loop = None
        self.state = None
        self.servers = []
        self._stopping = None
        self._tick_handle = None
        self._last_date = 0

    async def serve(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        gen = Generation(self.cfg, self.number)
        gen.start(loop)
        self.state = state = WorkerState(loop, gen, date_line(), os.urandom(8).hex().encode())
        for sock, listener in self.sockets:
            ctx = ssl_context(listener.tls) if listener.tls is not None else None
            scheme = b"https" if ctx is not None else b"http"
            server = await loop.create_server(lambda s=scheme: GatewayProtocol(state, s), sock=sock, ssl=ctx,
                                              backlog=listener.backlog)
            self.servers.append(server)
        self._stopping = loop.create_future()
        if self.install_signals:
            from ..supervisor import reopen_logs

            loop.add_signal_handler(signal.SIGTERM, self.drain)
            loop.add_signal_handler(signal.SIGINT, self.drain)
            loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
        self._tick()
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"R")
            os.close(self.ready_fd)
            self.ready_fd = None
        await self._stopping

    def _tick(self) -> None:
        state = self.state
        state.now = now = self.loop.time()
        wall = int(time.time())
        if wall != self._last_date:
            self._last_date = wall
            state.date = date_line(wall)
        for conn in list(state.connections):
            conn.check(now)
        state.gen.sweep(now)
        self._tick_handle = self.loop.call_later(state.gen.tick, self._tick)

    def drain(self) -> None:
        """Stop accepting, finish in-flight requests, close idle connections, abort after the deadline."""
        if self.state.draining:
            self._abort_all()
            return
        log.info("worker %d draining", os.getpid())
        self.state.draining = True
        for server in self.servers:
            server.close()
        now = self.loop.time()
        for conn in list(self.state.connections):
            conn.drain(now)
        self.loop.create_task(self._wait_drained(now + self.cfg.limits.drain_timeout))

    async def _wait_drained(self, deadline: float) -> None:
        while self.state.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._abort_all()

    def _abort_all(self) -> None:
        for conn in list(self.state.connections):
            conn.abort()
        self.state.gen.stop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)


def run_worker(cfg: Config, sockets, ready_fd: int | None = None, number: int = 1, use_uvloop: bool = True) -> int:
    """Entry point of a forked worker (or of `fastgate run` in the foreground)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    worker = Worker(cfg, sockets, ready_fd, number)
    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(worker.serve())
    else:
        asyncio.run(worker.serve())
    return 0
