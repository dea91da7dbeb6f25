"""A worker process: one uvloop loop serving the proxy listeners it inherited from the supervisor."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time

import uvloop

from .._core.proxy import GatewayProtocol, WorkerState
from .._core.shm import SharedTable
from ..accesslog import AccessLog
from ..config.schema import Config
from ..config.schema import RedisCounters as RedisCfg
from ..control.analytics import UsageRecorder
from ..counters.local import Counters, LocalCounters
from ..counters.redis import RedisCounters
from ..metrics import HostMetrics, WorkerMetrics
from ..metrics import render as render_metrics
from .accept import AcceptServer
from .generation import Generation
from .metrics_http import MetricsProtocol
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
                 install_signals: bool = True, table=None, metrics_table=None):
        self.cfg = cfg
        self.table = table  # the supervisor's shared-memory counters table (None: make one here)
        self.host_metrics = metrics_table if metrics_table is not None else HostMetrics(cfg)
        self._redis_seen = (0, 0, 0)
        self.redis = None
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
        self._down: set[bytes] = set()  # health keys this worker added (_publish_health)
        self._lifecycle_failed = None  # API version states that could not be applied (_apply_lifecycle)

    async def serve(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        counters = await self._counters()
        gen = Generation(self.cfg, self.number, counters, shared=self.host_metrics.table)
        gen.start(loop)
        if gen.directory is not None:
            await gen.directory.wait_loaded(2.0)  # store.backend redis: the snapshot comes through Redis
            self._apply_lifecycle(gen)  # the stored API version states, before the first request
        self.state = state = WorkerState(loop, gen, date_line(), os.urandom(8).hex().encode())
        state.metrics = WorkerMetrics(self.host_metrics)
        if self.cfg.store.backend == "redis":  # every node's time series go through Redis too
            from ..control.directory import store_redis_url
            from ..control.usage_redis import RedisSeriesRecorder

            state.metrics.remote = RedisSeriesRecorder(store_redis_url(self.cfg), self.cfg.store.key_prefix)
        state.usage = UsageRecorder.for_config(self.cfg)
        if self.cfg.tracing.otlp is not None:
            from ..otel import SpanExporter

            state.spans = SpanExporter(self.cfg.tracing.otlp, self.number)
        al = self.cfg.access_log
        if al is not None:
            state.access_log = AccessLog(al, 1.0) if isinstance(al, str) else AccessLog(al.path, al.sample)
        for sock, listener in self.sockets:
            if listener.kind == "metrics":
                server = await loop.create_server(lambda: MetricsProtocol(self.render_metrics), sock=sock,
                                                  backlog=listener.backlog)
                self.servers.append(server)
                continue
            ctx = ssl_context(listener.tls) if listener.tls is not None else None
            scheme = b"https" if ctx is not None else b"http"
            if isinstance(loop, uvloop.Loop):
                server = await loop.create_server(lambda s=scheme: GatewayProtocol(state, s), sock=sock, ssl=ctx,
                                                  backlog=listener.backlog)
            else:  # stock asyncio spins on EMFILE in its own accept loop (server/accept.py)
                server = AcceptServer(loop, sock, lambda s=scheme: GatewayProtocol(state, s), ctx, listener.backlog)
            self.servers.append(server)
        self._stopping = loop.create_future()
        if self.install_signals:

            loop.add_signal_handler(signal.SIGTERM, self.drain)
            loop.add_signal_handler(signal.SIGINT, self.drain)
            loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        self._tick()
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"R")
            os.close(self.ready_fd)
            self.ready_fd = None
        await self._stopping
        self._publish_health(None)  # this worker's view of the targets leaves the shared table
        self._flush_metrics()
        if state.metrics.remote is not None:
            await state.metrics.remote.aclose()
        if state.usage is not None:  # drained: what this worker counted reaches the ledger before it exits
            if hasattr(state.usage, "aclose"):
                await state.usage.aclose()
            else:
                state.usage.close()
        if state.access_log is not None:
            state.access_log.close()
        if state.spans is not None:
            state.spans.close()
        if self.redis is not None:  # resolve pending calls, stop the reconnect task
            await self.redis.close()

    async def _counters(self):
        """Local counters over the shared table, plus the Redis backend when configured."""
        cc = self.cfg.counters
        if self.table is None:
            self.table = SharedTable(cc.capacity)
        local = LocalCounters(self.table)
        if cc.redis is not None or cc.backend == "redis":
            rc = cc.redis or RedisCfg()
            self.redis = RedisCounters(url=rc.url, mode=rc.mode, lease_size=rc.lease_size, timeout=rc.timeout,
                                       on_failure=rc.on_failure, key_prefix=rc.key_prefix, fallback=local,
                                       workers=self.cfg.workers if isinstance(self.cfg.workers, int) else 1)
            await self.redis.start()
        return Counters(local, self.redis, cc.backend)

    def render_metrics(self) -> bytes:
        self._flush_metrics()
        gauges = {}
        table = self.table
        if table is not None:
            gauges["fastgate_counters_table_slots_used"] = [({}, table.used)]
            gauges["fastgate_counters_table_slots"] = [({}, table.capacity)]
            gauges["table_full"] = [({}, table.full_events)]
        canaries = self.state.gen.canaries
        if canaries:
            gauges["fastgate_canary_weight_percent"] = [({"route": c.route}, 0 if c.rolled_back else c.share / 100)
                                                        for c in canaries]
            gauges["fastgate_canary_rolled_back"] = [({"route": c.route}, 1 if c.rolled_back else 0)
                                                     for c in canaries]
        if self.redis is not None:
            r = self.redis
            gauges["fastgate_counters_redis_up"] = [({"worker": os.getpid()}, 1 if r.state == "up" else 0)]
            gauges["fastgate_counters_redis_lease_max_overshoot"] = [({}, getattr(r, "max_overshoot", 0))]
        gen = self.state.gen
        consumers = ()
        if gen.consumer_label:  # the names to look up: the config's and the store's consumers
            consumers = set(gen.consumers)
            if gen.directory is not None:
                consumers.update(gen.directory.names)
        return render_metrics(self.host_metrics, gen.cfg, gauges, consumers)

    def reopen_logs(self) -> None:
        from ..supervisor import reopen_logs

        reopen_logs()
        if self.state.access_log is not None:
            self.state.access_log.flush()
            self.state.access_log.reopen()

    def _flush_metrics(self) -> None:
        m = self.state.metrics
        if m is None:
            return
        r = self.redis
        if r is not None:  # the Redis client's own counters, as deltas into the host's table
            now = (r.errors, r.fallbacks, r.reconnects)
            for name, new, old in zip((b"redis|errors", b"redis|fallbacks", b"redis|reconnects"), now,
                                      self._redis_seen, strict=True):
                if new > old:
                    m.inc(name, new - old)
            self._redis_seen = now
        m.flush()

    def _publish_health(self, now: float | None) -> None:
        """Targets this worker sees unavailable, as b"hl|<upstream>|<address>" += 1 (-1 when back,
        or `now` None: exiting) in the host's table, for the admin API's analytics."""
        down = set() if now is None else {b"hl|%s|%s" % (g.name.encode(), t.address.encode())
                                          for g in self.state.gen.groups.values() for t in g.targets
                                          if not t.health.available(now)}
        for key in down ^ self._down:
            self.state.metrics.inc(key, 1 if key in down else -1)
        self._down = down

    def _tick(self) -> None:
        state = self.state
        self._flush_metrics()
        if state.metrics.remote is not None:
            state.metrics.remote.send_soon(self.loop.time())
        if state.access_log is not None:
            state.access_log.flush()
        if state.spans is not None:
            state.spans.flush()
        state.now = now = self.loop.time()
        wall = int(time.time())
        if state.usage is not None:
            state.usage.tick(now, wall)
        self._publish_health(now)
        if wall != self._last_date:
            self._last_date = wall
            state.date = date_line(wall)
        for conn in list(state.connections):
            conn.check(now)
        gen = state.gen
        gen.sweep(now)
        directory = gen.directory
        if directory is not None:
            directory.poll(now)
            if directory.lifecycle is not gen.lifecycle and directory.lifecycle is not self._lifecycle_failed \
                    and self._apply_lifecycle(gen):
                state.use_router(gen.router)  # an API version changed state (admin API, store)
        for canary in state.gen.canaries:
            canary.refresh()
        self._tick_handle = self.loop.call_later(state.gen.tick, self._tick)

    def _apply_lifecycle(self, gen) -> bool:
        """The directory's API version states into `gen`; whether its router changed. A failure
        (a route that cannot be compiled) is logged, and the generation serves on as it was; the
        same states are not tried again, the next change is."""
        lifecycle = gen.directory.lifecycle
        try:
            changed = gen.set_lifecycle(lifecycle)
        except Exception:
            self._lifecycle_failed = lifecycle
            log.exception("API lifecycle: the states set in the store cannot be applied; serving the previous ones")
            return False
        if changed:
            log.info("API lifecycle: %d version state(s) set in the store", len(lifecycle))
        return changed

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


def run_worker(cfg: Config, sockets, ready_fd: int | None = None, number: int = 1, use_uvloop: bool = True,
               table=None, metrics_table=None) -> int:
    """Entry point of a forked worker (or of `fastgate run` in the foreground)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    worker = Worker(cfg, sockets, ready_fd, number, table=table, metrics_table=metrics_table)
    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(worker.serve())
    else:
        asyncio.run(worker.serve())
    return 0
