"""The `fastgate` command: run | check | reload | stop | version | demo-upstream."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__
from .errors import ConfigError

DEFAULT_CONFIG = "config/fastgate.yaml"
DEFAULT_PID = "fastgate.pid"


def _load(path: str):
    from .config import load_file

    return load_file(path)


def _load_isolated(path: str):
    from .config.load import load_file_isolated

    return load_file_isolated(path)


def _print_issues(exc: ConfigError) -> None:
    print(f"{exc.source or 'config'}: {len(exc.issues)} error(s)", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def cmd_check(args) -> int:
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _print_issues(exc)
        return 1
    routes = len(cfg.routes) + sum(len(v.routes) for a in cfg.apis for v in a.versions)
    print(f"{args.config}: OK ({len(cfg.upstreams)} upstreams, {routes} routes)")
    return 0


def _override_listen(cfg, listen: str):
    import msgspec

    from .config.load import split_address
    from .config.schema import Listener

    hp = split_address(listen)
    if hp is None:
        raise SystemExit(f"fastgate: --listen wants HOST:PORT, got {listen!r}")
    others = [li for li in cfg.listeners if li.kind != "proxy"]
    return msgspec.structs.replace(cfg, listeners=[Listener(kind="proxy", address=hp[0], port=hp[1])] + others)


def cmd_run(args) -> int:
    from .supervisor import Supervisor, cpu_count

    try:
        cfg = _load_isolated(args.config)
    except ConfigError as exc:
        _print_issues(exc)
        return 1

    def overrides(c):
        import msgspec

        if args.user:
            c = msgspec.structs.replace(c, user=args.user)
        return _override_listen(c, args.listen) if args.listen else c

    cfg = overrides(cfg)
    workers = args.workers or cfg.workers
    workers = cpu_count() if workers == "auto" else int(workers)
    for li in cfg.listeners:
        if li.kind == "proxy":
            scheme = "https" if li.tls else "http"
            logging.getLogger("fastgate").info("proxy listening on %s://%s:%d", scheme, li.address, li.port)
    logging.getLogger("fastgate").info("fastgate %s: %d worker(s), config %s", __version__, workers, args.config)
    sup = Supervisor(os.path.abspath(args.config), cfg, workers, args.pid_file, use_uvloop=not args.asyncio,
                     overrides=overrides)
    try:
        return sup.run()
    except OSError as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return 1


def cmd_signal(sig):
    def run(args) -> int:
        from .supervisor import send_signal

        return send_signal(args.pid_file, sig)

    return run


def cmd_version(args) -> int:
    print(f"fastgate {__version__}")
    return 0


def cmd_demo_upstream(args) -> int:
    from .demo import run_demo_upstream

    run_demo_upstream(args.host, args.port)
    return 0


def _workers(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("N or auto") from None
    if n < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgate", description="API gateway with a compiled hot path")
    p.add_argument("--log-level", default=os.environ.get("FASTGATE_LOG_LEVEL", "info"))
    p.add_argument("--log-file", help="log here instead of stderr; SIGUSR1 reopens it")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="start the gateway")
    r.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    r.add_argument("--workers", type=_workers, default=None, help="N or auto (default: the config's)")
    r.add_argument("--listen", help="HOST:PORT for the proxy listener (replaces the config's)")
    r.add_argument("--pid-file", default=DEFAULT_PID)
    r.add_argument("--asyncio", action="store_true", help="use the stock asyncio loop instead of uvloop")
    r.add_argument("--user", help="started as root: run workers as this user (overrides the config's)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check", help="validate a config file; print every error with its path")
    c.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check)
    for name, sig, text in (("reload", signal.SIGHUP, "reload the config (validated first)"),
                            ("stop", signal.SIGTERM, "drain and stop")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--pid-file", default=DEFAULT_PID)
        s.set_defaults(func=cmd_signal(sig))
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=cmd_version)
    d = sub.add_parser("demo-upstream", help="a small HTTP upstream for trying fastgate out")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=9001)
    d.set_defaults(func=cmd_demo_upstream)
    return p


LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = None
    if args.log_file:
        from .supervisor import ReopenableFileHandler

        handlers = [ReopenableFileHandler(args.log_file)]
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, handlers=handlers)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
