"""The supervisor: owns the listening sockets and the worker processes, and runs no event loop.

Signals only enqueue (uvicorn's approach); the main loop waits on a self-pipe (`set_wakeup_fd`)
and dispatches to `handle_<name>`:
  TERM/INT  graceful drain with a deadline, then exit; a second one kills the workers at once
  HUP       reload: validate the file; invalid → log every error, keep serving; valid → start a new
            generation of workers, wait until they are ready, then drain the old ones
A byte on the reload pipe is a HUP too: the control process (admin API, `POST /config`) writes one.
It may have dropped to `user:` and so cannot signal a root supervisor; the pipe, made before any
fork, needs no privilege.
  CHLD      reap; replace a crashed worker (backing off when it crash-loops)
  TTIN/TTOU add / remove a worker
Workers are forked, not spawned: they inherit the sockets (and the shared memory, later).
With a `kind: admin` listener the supervisor also forks the control process (control/process.py:
the admin API on uvicorn, over the socket bound here), restarts it when it dies, restarts it with
the new config after a reload, and stops it with the workers.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time

from ._core.shm import SharedTable
from .config.load import load_file_isolated
from .config.schema import Config
from .errors import ConfigError
from .metrics import HostMetrics

log = logging.getLogger("fastgate.supervisor")

SIGNALS = {
    signal.SIGINT: "int", signal.SIGTERM: "term", signal.SIGHUP: "hup", signal.SIGCHLD: "chld",
    signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1",
}
READY_TIMEOUT = 30.0


def _import_plugins(cfg) -> None:
    """Import the plugin modules a config names before workers fork and drop privileges (a
    module that fails here is reported by the worker that builds it)."""
    from .config.load import all_routes
    from .config.schema import Plugin
    from .policies.plugin import load_class

    policies = list(cfg.policies) + [p for a in cfg.apis for p in a.policies]
    policies += [p for _path, r, _a, _v in all_routes(cfg) for p in r.policies]
    for p in policies:
        if isinstance(p, Plugin):
            try:
                load_class(p.module)
            except Exception:  # noqa: BLE001
                pass


def cpu_count() -> int:
    """CPUs this process may really use: affinity, then a cgroup v2/v1 quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()
            if q != "max":
                quota = int(q) / int(period)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if q > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (nginx's worker_rlimit_nofile); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def drop_privileges(user: str | None, group: str | None) -> None:
    """In a worker started as root: switch to `user` (and `group`, default the user's own group).

    The supervisor keeps root so that a reload can bind a new privileged port; workers, which touch
    every request, never run as root when a user is configured (nginx's master/worker split)."""
    if os.getuid() != 0:
        return
    if user is None:
        log.warning("workers are running as root: set `user:` in the config (e.g. user: nobody)")
        return
    import grp
    import pwd

    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(pw.pw_uid)


def bind_listener(address: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address.strip("[]"), port))
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class ReopenableFileHandler(logging.FileHandler):
    """A log file that SIGUSR1 reopens (after logrotate moved it away)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def reopen_logs() -> None:
    for h in logging.getLogger().handlers:
        if isinstance(h, ReopenableFileHandler):
            h.reopen()


class Child:
    __slots__ = ("pid", "generation", "ready_r", "ready", "started", "stopping")

    def __init__(self, pid, generation, ready_r):
        self.pid = pid
        self.generation = generation
        self.ready_r = ready_r
        self.ready = False
        self.started = time.monotonic()
        self.stopping = False


class Supervisor:
    def __init__(self, config_path: str | None, cfg: Config, workers: int, pid_file: str | None = None,
                 use_uvloop: bool = True, overrides=None):
        self.config_path = config_path
        self.overrides = overrides or (lambda c: c)  # CLI flags (--listen) re-applied on every reload
        self.cfg = cfg
        self.workers = workers
        self.pid_file = pid_file
        self.use_uvloop = use_uvloop
        self.generation = 1
        self.children: dict[int, Child] = {}
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self._queue: list[int] = []
        self._should_exit = False
        self._force = False
        self._crashes: list[float] = []
        self._respawn_at = 0.0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # the control process keeps the write end: a byte asks for a reload (handle_hup)
        self._reload_r, self._reload_w = os.pipe()
        os.set_blocking(self._reload_r, False)
        os.set_blocking(self._reload_w, False)
        self._drain_deadline = None
        self.table = None
        self.metrics_table = None
        self.control: Child | None = None  # the control process (admin API), not counted as a worker
        self._control_at = 0.0
        self._control_quick_deaths = 0
        self.events = None  # store.backend redis: restarts and reloads also go to the cluster's series

    def _host_events(self, cfg: Config) -> None:
        """With store.backend redis, this host's worker restarts and reloads go to the cluster's
        time series through Redis (the control node's dashboard shows every node's)."""
        if getattr(cfg.store, "backend", "sqlite") != "redis":
            if self.events is not None:
                self.events.close()
            self.events = None
            return
        from .control.directory import store_redis_url
        from .control.usage_redis import HostEventSender

        where = (store_redis_url(cfg), cfg.store.key_prefix)
        if self.events is None or self.events.where != where:
            old = self.events
            self.events = HostEventSender(*where)
            if old is not None:  # what the old one still holds goes out through the new one
                old.background = False
                with old._lock:
                    self.events.unsent, self.events.pending = old.unsent, old.pending
                    old.unsent, old.pending = [], {}

    @contextlib.contextmanager
    def _forking(self):
        """Around os.fork: the host-event sender's thread (the supervisor's only one) is not in the
        middle of a send, so the child inherits none of the locks a send takes."""
        if self.events is None:
            yield
            return
        with self.events.quiet() as still:
            if not still:
                log.warning("host events: a send to Redis is taking long; forking anyway")
            yield

    # --- sockets ----------------------------------------------------------------------------------
    def _proxy_sockets(self, cfg: Config):
        out = []
        for li in cfg.listeners:
            if li.kind not in ("proxy", "metrics"):
                continue  # admin and portal belong to the control process
            key = (li.address, li.port)
            if key not in self.sockets:
                self.sockets[key] = bind_listener(li.address, li.port, li.backlog)
            out.append((self.sockets[key], li))
        return out

    @staticmethod
    def _admin_listener(cfg: Config):
        return next((li for li in cfg.listeners if li.kind == "admin"), None)

    @staticmethod
    def _portal_listener(cfg: Config):
        return next((li for li in cfg.listeners if li.kind == "portal"), None)

    def _admin_socket(self, li) -> socket.socket:
        key = (li.address, li.port)
        if key not in self.sockets:
            self.sockets[key] = bind_listener(li.address, li.port, li.backlog)
        return self.sockets[key]

    # --- children ---------------------------------------------------------------------------------
    def spawn_control(self) -> Child:
        """Fork the control process: the admin API over the admin socket bound here (and the developer
        portal over the portal socket, when the config has one)."""
        li = self._admin_listener(self.cfg)
        sock = self._admin_socket(li)
        pli = self._portal_listener(self.cfg)
        psock = self._admin_socket(pli) if pli is not None else None
        supervisor_pid = os.getpid()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        with self._forking():
            pid = os.fork()
        if pid == 0:  # the control process
            code = 1
            try:
                os.close(self._wake_r)
                os.close(self._wake_w)
                os.close(self._reload_r)
                signal.set_wakeup_fd(-1)
                for sig in SIGNALS:
                    keep_default = sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
                    signal.signal(sig, signal.SIG_DFL if keep_default else signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                for s in self.sockets.values():  # it serves the admin and portal sockets only
                    if s is not sock and s is not psock:
                        s.close()
                from .control.process import run_control  # before dropping privileges, like the workers

                code = run_control(self.cfg, sock, li, self.config_path, supervisor_pid,
                                   drop=lambda: drop_privileges(self.cfg.user, self.cfg.group),
                                   host_metrics=self.metrics_table, portal_sock=psock, portal_listener=pli,
                                   reload_fd=self._reload_w)
            except BaseException:  # noqa: BLE001 - never return into the supervisor
                logging.getLogger("fastgate.control").exception("control process crashed")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.control = Child(pid, 0, -1)
        log.info("control process %d started (admin API on %s:%d)", pid, li.address, li.port)
        return self.control

    def spawn(self) -> Child:
        sockets = self._proxy_sockets(self.cfg)
        ready_r, ready_w = os.pipe()
        # Block our signals across fork: one sent to the new child before it has reset the
        # supervisor's handlers would otherwise land in the child's copy of our queue and be lost.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        with self._forking():
            pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(self._wake_r)
                os.close(self._wake_w)
                os.close(self._reload_r)
                os.close(self._reload_w)
                signal.set_wakeup_fd(-1)
                for sig in SIGNALS:  # HUP, USR1, TTIN and TTOU would kill or stop a worker by default
                    keep_default = sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
                    signal.signal(sig, signal.SIG_DFL if keep_default else signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                from .server.worker import run_worker

                drop_privileges(self.cfg.user, self.cfg.group)

                code = run_worker(self.cfg, sockets, ready_w, self.generation, self.use_uvloop, self.table,
                                  self.metrics_table)
            except BaseException:  # noqa: BLE001 - a worker must never return into the supervisor
                logging.getLogger("fastgate.worker").exception("worker crashed")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        child = Child(pid, self.generation, ready_r)
        self.children[pid] = child
        self._sel.register(ready_r, selectors.EVENT_READ, child)
        log.info("worker %d started (generation %d)", pid, self.generation)
        return child

    def _on_ready(self, child: Child) -> None:
        try:
            data = os.read(child.ready_r, 16)
        except BlockingIOError:
            return
        if data:
            child.ready = True
        self._sel.unregister(child.ready_r)
        os.close(child.ready_r)
        child.ready_r = -1

    def _current(self) -> list[Child]:
        return [c for c in self.children.values() if c.generation == self.generation and not c.stopping]

    def _stop_child(self, child: Child, sig=signal.SIGTERM) -> None:
        child.stopping = True
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    # --- main loop --------------------------------------------------------------------------------
    def _on_signal(self, sig, frame) -> None:
        self._queue.append(sig)

    def run(self) -> int:
        soft, _hard = raise_nofile_limit()
        if soft < 4096:
            log.warning("open-files limit is %d: raise `ulimit -n` to serve many connections", soft)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._sel.register(self._reload_r, selectors.EVENT_READ, "reload")
        self._proxy_sockets(self.cfg)
        if self._admin_listener(self.cfg) is not None:
            self._admin_socket(self._admin_listener(self.cfg))
            if self._portal_listener(self.cfg) is not None:
                self._admin_socket(self._portal_listener(self.cfg))
        # one anonymous shared mapping, made before any fork: every worker (and every later
        # generation of workers) counts in the same table
        # import everything a worker runs now: after fork it may have dropped to a user who
        # cannot read this Python's files (a root-owned virtualenv, say)
        from .policies import load_builders
        from .server import worker  # noqa: F401

        load_builders(self.cfg)
        _import_plugins(self.cfg)
        self.table = SharedTable(self.cfg.counters.capacity)
        self.metrics_table = HostMetrics(self.cfg)
        self._host_events(self.cfg)
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        for _ in range(self.workers):
            self.spawn()
        try:
            while not (self._should_exit and not self.children and self.control is None):
                self._wait(0.5)
                self._dispatch()
                self._reap()
                self._keep_alive()
        finally:
            if self.events is not None:
                self.events.close()
            if self.pid_file:
                try:
                    os.unlink(self.pid_file)
                except OSError:
                    pass
        log.info("supervisor exiting")
        return 0

    def _wait(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif key.data == "reload":  # the control process asks (POST /config): exactly a SIGHUP
                try:
                    while os.read(self._reload_r, 512):
                        pass
                except BlockingIOError:
                    pass
                if signal.SIGHUP not in self._queue:  # several asks before we got to it: one reload
                    self._queue.append(signal.SIGHUP)
            else:
                self._on_ready(key.data)

    def _dispatch(self) -> None:
        while self._queue:
            sig = self._queue.pop(0)
            getattr(self, f"handle_{SIGNALS[sig]}")()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.control is not None and pid == self.control.pid:
                self._reaped_control(self.control, status)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.ready_r >= 0:
                self._sel.unregister(child.ready_r)
                os.close(child.ready_r)
            code = os.waitstatus_to_exitcode(status)
            if child.stopping or self._should_exit:
                log.info("worker %d exited (%d)", pid, code)
            else:
                log.error("worker %d died unexpectedly (%d)", pid, code)
                self.metrics_table.table.add(b"sup|restarts", 1)
                if self.events is not None:
                    self.events.add("restarts")
                now = time.monotonic()
                if now - child.started < 2.0:
                    self._crashes = [t for t in self._crashes if now - t < 60] + [now]
                    delay = min(30.0, 0.5 * 2 ** (len(self._crashes) - 1)) if len(self._crashes) > 1 else 0
                    if delay:
                        log.error("workers crash-looping (%d quick deaths in 60s): next start in %.1fs",
                                  len(self._crashes), delay)
                    self._respawn_at = now + delay

    def _reaped_control(self, c: Child, status: int) -> None:
        self.control = None
        code = os.waitstatus_to_exitcode(status)
        if c.stopping or self._should_exit:
            log.info("control process %d exited (%d)", c.pid, code)
            return
        now = time.monotonic()
        self._control_quick_deaths = self._control_quick_deaths + 1 if now - c.started < 2.0 else 0
        delay = min(30.0, 0.5 * 2 ** (self._control_quick_deaths - 1)) if self._control_quick_deaths else 0.0
        log.error("control process %d died unexpectedly (%d): restarting%s", c.pid, code,
                  f" in {delay:.1f}s" if delay else "")
        self._control_at = now + delay

    def _keep_alive(self) -> None:
        if self._should_exit:
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                for c in list(self.children.values()) + ([self.control] if self.control else []):
                    self._stop_child(c, signal.SIGKILL)
                self._drain_deadline = None
            return
        if self.control is None and time.monotonic() >= self._control_at \
                and self._admin_listener(self.cfg) is not None:
            try:
                self.spawn_control()
            except OSError as exc:  # the admin port of a new config taken, say
                log.error("control process not started: %s", exc)
                self._control_at = time.monotonic() + 5.0
        if time.monotonic() < self._respawn_at:
            return
        while len(self._current()) < self.workers:
            self.spawn()

    # --- signal handlers --------------------------------------------------------------------------
    def handle_term(self) -> None:
        if self._should_exit:
            log.warning("second stop signal: killing workers")
            for c in list(self.children.values()) + ([self.control] if self.control else []):
                self._stop_child(c, signal.SIGKILL)
            return
        log.info("stopping: draining workers (up to %.0fs)", self.cfg.limits.drain_timeout)
        self._should_exit = True
        self._drain_deadline = time.monotonic() + self.cfg.limits.drain_timeout + 5
        for c in list(self.children.values()) + ([self.control] if self.control else []):
            self._stop_child(c)
        for sock in self.sockets.values():
            sock.close()

    handle_int = handle_term

    def handle_chld(self) -> None:
        pass  # reaped every turn of the loop

    def handle_usr1(self) -> None:
        reopen_logs()
        log.info("log files reopened")
        for c in list(self.children.values()) + ([self.control] if self.control else []):
            try:
                os.kill(c.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def handle_ttin(self) -> None:
        self.workers += 1
        log.info("workers: %d", self.workers)

    def handle_ttou(self) -> None:
        if self.workers > 1:
            self.workers -= 1
            current = self._current()
            if len(current) > self.workers:
                self._stop_child(current[-1])
        log.info("workers: %d", self.workers)

    def handle_hup(self) -> None:
        if self.config_path is None:
            log.warning("reload: no config file to reload")
            return
        try:
            cfg = self.overrides(load_file_isolated(self.config_path))
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            self.metrics_table.table.add(b"sup|reload_failures", 1)
            return
        old = [c for c in self.children.values() if not c.stopping]
        if cfg.counters.capacity != self.cfg.counters.capacity:
            log.warning("counters.capacity changed: the shared table keeps %d slots until a restart",
                        self.table.capacity)
        self.cfg = cfg
        self.generation += 1
        self.metrics_table.table.add(b"sup|reloads", 1)
        self._host_events(cfg)
        if self.events is not None:
            self.events.add("reloads")
        from .policies import load_builders

        load_builders(cfg)  # a policy type new in this config: imported here, before the fork
        _import_plugins(cfg)
        full = self.metrics_table.register(cfg)  # number the new routes before the new workers fork
        if full:
            log.warning("no room for the metrics of %d new route(s) (e.g. %s) until a restart", len(full), full[0])
        try:
            new = [self.spawn() for _ in range(self.workers)]
        except OSError as exc:
            log.error("reload failed: %s", exc)
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not all(c.ready for c in new):
            if any(c.pid not in self.children for c in new):
                break
            self._wait(0.1)
        if not all(c.ready and c.pid in self.children for c in new):
            log.error("reload failed: new workers did not become ready; keeping the old ones")
            for c in new:
                if c.pid in self.children:
                    self._stop_child(c)
            self.generation -= 1
            return
        for c in old:
            self._stop_child(c)
        # the control process restarts on the new config (its admin socket stays bound here)
        if self.control is not None:
            self._stop_child(self.control)
            self.control = None  # reaped as a stranger; the new one starts on the next turn
        self._control_at = 0.0
        self._control_quick_deaths = 0
        # keep every socket a listener still names: closing a metrics or admin socket the running
        # processes hold would make the next respawn fail to bind its port
        keys = {(li.address, li.port) for li in cfg.listeners if li.kind != "portal"
                or self._admin_listener(cfg) is not None}  # a portal without admin: no control process
        for key in list(self.sockets):
            if key not in keys:
                self.sockets.pop(key).close()
        log.info("reloaded: generation %d serving", self.generation)


def send_signal(pid_file: str, sig: int) -> int:
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, sig)
    except (OSError, ValueError) as exc:
        print(f"fastgate: cannot signal the supervisor from {pid_file}: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Supervisor", "cpu_count", "bind_listener", "send_signal", "errno"]
