"""The supervisor: owns the listening sockets and the worker processes, and runs no event loop.

Signals only enqueue (uvicorn's approach); the main loop waits on a self-pipe (`set_wakeup_fd`)
and dispatches to `handle_<name>`:
  TERM/INT  graceful drain with a deadline, then exit; a second one kills the workers at once
  HUP       reload: validate the file; invalid → log every error, keep serving; valid → start a new
            generation of workers, wait until they are ready, then drain the old ones
  CHLD      reap; replace a crashed worker (backing off when it crash-loops)
  TTIN/TTOU add / remove a worker
Workers are forked, not spawned: they inherit the sockets (and the shared memory, later).
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time

from .config.load import load_file_isolated
from .config.schema import Config
from .errors import ConfigError

log = logging.getLogger("fastgate.supervisor")

SIGNALS = {
    signal.SIGINT: "int", signal.SIGTERM: "term", signal.SIGHUP: "hup", signal.SIGCHLD: "chld",
    signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1",
}
READY_TIMEOUT = 30.0


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
        self._drain_deadline = None

    # --- sockets ----------------------------------------------------------------------------------
    def _proxy_sockets(self, cfg: Config):
        out = []
        for li in cfg.listeners:
            if li.kind != "proxy":
                continue
            key = (li.address, li.port)
            if key not in self.sockets:
                self.sockets[key] = bind_listener(li.address, li.port, li.backlog)
            out.append((self.sockets[key], li))
        return out

    # --- children ---------------------------------------------------------------------------------
    def spawn(self) -> Child:
        sockets = self._proxy_sockets(self.cfg)
        ready_r, ready_w = os.pipe()
        # Block our signals across fork: one sent to the new child before it has reset the
        # supervisor's handlers would otherwise land in the child's copy of our queue and be lost.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(self._wake_r)
                os.close(self._wake_w)
                signal.set_wakeup_fd(-1)
                for sig in SIGNALS:  # HUP, USR1, TTIN and TTOU would kill or stop a worker by default
                    keep_default = sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
                    signal.signal(sig, signal.SIG_DFL if keep_default else signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                from .server.worker import run_worker

                drop_privileges(self.cfg.user, self.cfg.group)

                code = run_worker(self.cfg, sockets, ready_w, self.generation, self.use_uvloop)
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
        self._proxy_sockets(self.cfg)
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        for _ in range(self.workers):
            self.spawn()
        try:
            while not (self._should_exit and not self.children):
                self._wait(0.5)
                self._dispatch()
                self._reap()
                self._keep_alive()
        finally:
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
                now = time.monotonic()
                if now - child.started < 2.0:
                    self._crashes = [t for t in self._crashes if now - t < 60] + [now]
                    delay = min(30.0, 0.5 * 2 ** (len(self._crashes) - 1)) if len(self._crashes) > 1 else 0
                    if delay:
                        log.error("workers crash-looping (%d quick deaths in 60s): next start in %.1fs",
                                  len(self._crashes), delay)
                    self._respawn_at = now + delay

    def _keep_alive(self) -> None:
        if self._should_exit:
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                for c in list(self.children.values()):
                    self._stop_child(c, signal.SIGKILL)
                self._drain_deadline = None
            return
        if time.monotonic() < self._respawn_at:
            return
        while len(self._current()) < self.workers:
            self.spawn()

    # --- signal handlers --------------------------------------------------------------------------
    def handle_term(self) -> None:
        if self._should_exit:
            log.warning("second stop signal: killing workers")
            for c in list(self.children.values()):
                self._stop_child(c, signal.SIGKILL)
            return
        log.info("stopping: draining workers (up to %.0fs)", self.cfg.limits.drain_timeout)
        self._should_exit = True
        self._drain_deadline = time.monotonic() + self.cfg.limits.drain_timeout + 5
        for c in list(self.children.values()):
            self._stop_child(c)
        for sock in self.sockets.values():
            sock.close()

    handle_int = handle_term

    def handle_chld(self) -> None:
        pass  # reaped every turn of the loop

    def handle_usr1(self) -> None:
        reopen_logs()
        log.info("log files reopened")
        for c in self.children.values():
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
            return
        old = [c for c in self.children.values() if not c.stopping]
        self.cfg = cfg
        self.generation += 1
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
        keys = {(li.address, li.port) for li in cfg.listeners if li.kind == "proxy"}
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
