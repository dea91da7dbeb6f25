"""The control process: forked by the supervisor beside the workers when the config has a
`kind: admin` listener. It serves the admin API with uvicorn on the socket the supervisor bound,
owns the store's writes, and is restarted by the supervisor if it dies (the socket stays bound in
the supervisor meanwhile, so clients queue rather than being refused). With a `kind: portal`
listener too, it serves the developer portal (control/portal.py) on that socket, with a second
uvicorn server in the same event loop, over the same store.

With `oauth.enabled` it is also the OAuth 2.0 authorization server (control/oauth.py): the token,
revocation, JWKS and metadata endpoints are served on the portal listener — the one meant to face
the developers' apps — or, without a portal listener, on the admin listener, where those four
paths (and only they) need no admin token: a client authenticates with its own credentials.

Everything it will run is imported, and uvicorn's config loaded (protocol classes, loop, TLS
context), before it drops privileges: the user it switches to may not read this Python's files.
The store is opened after, so the file belongs to that user, as the workers who read it do."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import anyio._backends._asyncio  # noqa: F401 - starlette's, imported on first use otherwise
import uvicorn

from ..supervisor import reopen_logs
from .admin import create_app, resolve_token
from .analytics import Analytics
from .oauth import AuthServer, create_oauth_app, with_oauth
from .portal import create_portal
from .replica import ReplicaFollower
from .store import Store, StoreUnavailable

log = logging.getLogger("fastgate.control")


class _App:
    """The ASGI app, set once the store is open (uvicorn's config is loaded before that)."""

    app = None

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves the signals alone: with two of them in one loop, the control
    process hands SIGTERM/SIGINT to each itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _serve_both(servers, sockets, loop_factory) -> None:
    async def main():
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in zip(servers, sockets, strict=True)))

    def handle(sig, frame):
        for s in servers:
            s.handle_exit(sig, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    runner = asyncio.Runner(loop_factory=loop_factory) if loop_factory else asyncio.Runner()
    with runner:
        runner.run(main())


def run_control(cfg, sock, listener, config_path: str | None, supervisor_pid: int | None, drop=None,
                host_metrics=None, portal_sock=None, portal_listener=None, reload_fd: int | None = None) -> int:
    """Entry point of the forked control process; returns its exit code. `drop()` switches user;
    `host_metrics`: the supervisor's shared metrics (metrics.HostMetrics), for the analytics;
    `portal_sock`, `portal_listener`: the developer portal's, when the config has one; `reload_fd`: the
    supervisor's reload pipe (a byte written there is a SIGHUP, which this process, once it has
    dropped privileges, may not be allowed to send)."""
    signal.signal(signal.SIGUSR1, lambda *_: reopen_logs())
    # a stop asked for before uvicorn serves is remembered; afterwards it goes to uvicorn (whose own
    # handlers, when it restores ours, re-deliver the signal: to this one rather than SIG_DFL)
    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.append(s))
    try:
        token = resolve_token(cfg)
    except ValueError as exc:
        log.error("admin API not started: %s", exc)
        return 2
    if token is None:
        log.warning("admin API on %s:%d WITHOUT a token (admin.allow_no_token on loopback)", listener.address,
                    listener.port)
    app = _App()
    tls = listener.tls
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=10, backlog=listener.backlog,
                            ssl_certfile=tls.certificate if tls else None, ssl_keyfile=tls.key if tls else None)
    config.load()
    loop_factory = config.get_loop_factory()
    portal_app, portal_config = _App(), None
    if portal_sock is not None:
        ptls = portal_listener.tls
        portal_config = uvicorn.Config(portal_app, lifespan="off", log_config=None, access_log=False,
                                       server_header=False, proxy_headers=False, timeout_graceful_shutdown=10,
                                       backlog=portal_listener.backlog,
                                       ssl_certfile=ptls.certificate if ptls else None,
                                       ssl_keyfile=ptls.key if ptls else None)
        portal_config.load()
    if drop is not None:
        drop()
    try:
        store = _open_store(cfg)
    except Exception as exc:  # noqa: BLE001 - StoreError, sqlite3.Error, OSError: say which file
        log.error("admin API not started: store %s: %s", cfg.store.path, exc)
        return 2
    oauth = None
    if cfg.oauth.enabled:
        try:
            oauth = AuthServer(store, cfg.oauth)
            oauth.ensure_key()
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, a key that does not load: say so, serve the rest
            log.error("OAuth authorization server not started: %s", exc)
            oauth = None
    publisher = drainer = follower = None
    if cfg.store.backend == "redis":  # clustered nodes: every node's workers learn the keys through Redis
        from .directory import DirectoryPublisher, store_redis_url

        follower = ReplicaFollower(cfg.store.path, store_redis_url(cfg), cfg.store.key_prefix)
        follower.start()  # what the other nodes' control processes write, into this node's replica

        publisher = DirectoryPublisher(cfg.store.path, store_redis_url(cfg), cfg.store.key_prefix)
        publisher.start()
        from .usage_redis import UsageDrainer  # every node's usage counts, into this store

        drainer = UsageDrainer(cfg.store.path, store_redis_url(cfg), cfg.store.key_prefix)
        drainer.start()
    analytics = Analytics(cfg.store.path, host_metrics, cfg, supervisor_pid)
    app.app = create_app(store, cfg, token, config_path, supervisor_pid, analytics=analytics, oauth=oauth,
                         serve_oauth=portal_config is None, reload_fd=reload_fd)
    if oauth is not None and portal_config is None:
        log.info("OAuth endpoints on the admin listener (no portal listener), issuer %s", oauth.issuer)
    analytics.start()  # a snapshot of the host's metrics into the store every 10 s
    scheme = "https" if tls else "http"
    log.info("admin API on %s://%s:%d (store %s, schema v%d)", scheme, listener.address, listener.port,
             cfg.store.path, store.version)
    if portal_config is not None:
        portal_app.app = create_portal(store, cfg, token, config_path, tls=portal_listener.tls is not None,
                                       analytics=analytics, oauth=oauth)
        if oauth is not None:
            portal_app.app = with_oauth(portal_app.app, create_oauth_app(oauth))
            log.info("OAuth endpoints on the portal listener, issuer %s", oauth.issuer)
        log.info("developer portal on %s://%s:%d", "https" if portal_listener.tls else "http",
                 portal_listener.address, portal_listener.port)
    try:
        if stop:
            pass
        elif portal_config is not None:
            _serve_both([_Server(config), _Server(portal_config)], [sock, portal_sock], loop_factory)
        else:
            server = uvicorn.Server(config)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, server.handle_exit)
            server.run(sockets=[sock])
    finally:
        analytics.stop()
        if publisher is not None:
            publisher.stop()
        if drainer is not None:
            drainer.stop()
        if follower is not None:
            follower.stop()
        store.close()
    return 0


def _open_store(cfg) -> Store:
    """The store, with the config's consumers and plans copied in. With `store.backend: redis` this
    node's replica waits for Redis (the admin API cannot write without it), trying every second."""
    if cfg.store.backend != "redis":
        store = Store(cfg.store.path)
        store.sync_config(cfg)
        return store
    from .directory import store_redis_url

    warned = False
    while True:
        store = None
        try:
            store = Store(cfg.store.path, store_redis_url(cfg), cfg.store.key_prefix)
            store.sync_config(cfg)
            if warned:
                log.info("store: Redis reached, admin API starting")
            return store
        except StoreUnavailable as exc:
            if store is not None:
                store.close()
            if not warned:
                log.warning("store: waiting for Redis before the admin API starts (%s)", exc)
                warned = True
            time.sleep(1.0)
