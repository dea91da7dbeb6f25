"""An accept loop for stock asyncio that neither spins nor dies when the process is out of file
descriptors.

uvloop (the default) handles EMFILE itself: libuv keeps a reserve descriptor, accepts and closes
the connection it cannot keep, and carries on. Stock asyncio's `create_server` on Python 3.11
keeps looping over its backlog on EMFILE, logging a traceback and scheduling a retry per
iteration (CPython gh-151615): half a core while saturated. So with `fastgate run --asyncio` the
worker accepts itself: on EMFILE/ENFILE/ENOBUFS/ENOMEM it stops watching the listening socket for
RETRY seconds (the kernel keeps new clients in the backlog meanwhile), logs once per episode, and
hands each accepted socket to `loop.connect_accepted_socket` — public API, so TLS and the
protocol's life are asyncio's own.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket

log = logging.getLogger("fastgate.worker")

RETRY = 0.1  # seconds without accepting after running out of descriptors
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_TRANSIENT = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR))


class AcceptServer:
    """The part of asyncio.Server the worker uses: `close()` and `wait_closed()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory, ssl=None,
                 backlog: int = 1024):
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.ssl = ssl
        self.batch = max(1, backlog)
        self.closed = False
        self.starved = 0  # episodes out of descriptors (tests, logs)
        self._timer = None
        self._tasks: set[asyncio.Task] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(self.batch):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue  # that client went away during the handshake: the next one
                if exc.errno in _OUT_OF_RESOURCES:
                    self._starve(exc)
                    return
                raise
            conn.setblocking(False)
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _starve(self, exc: OSError) -> None:
        self.starved += 1
        if self.starved == 1 or self.starved % 100 == 0:
            log.error("out of file descriptors (%s): not accepting for %.1f s at a time (%d times so far); "
                      "raise the open-files limit or lower limits.max_connections", exc.strerror, RETRY, self.starved)
        self.loop.remove_reader(self.sock.fileno())
        self._timer = self.loop.call_later(RETRY, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)
            self._ready()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl)
        except (TimeoutError, OSError):  # a TLS handshake that failed or timed out, a reset
            conn.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
