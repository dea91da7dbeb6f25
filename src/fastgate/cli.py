"""The `fastgate` command: run | check | reload | stop | version | demo-upstream | tune | import, and the
admin API's wrappers: consumers | keys | apis | usage | oauth."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__
from .errors import ConfigError
from .tune import add_parser as add_tune_parser

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


# --- import ----------------------------------------------------------------------------------------
def cmd_import(args) -> int:
    """`fastgate import SPEC`: openapi_import.py builds; this reads and writes files and prints."""
    import yaml

    from .config.load import _format_of, parse_document
    from .errors import OpenApiImportError
    from .openapi_import import build, check_result, merge

    upstream, target = args.upstream, None
    if upstream is not None and "=" in upstream:
        upstream, target = upstream.split("=", 1)
    try:
        imported = build(args.spec, name=args.name, version=args.api_version, base_path=args.base_path,
                         upstream=upstream, upstream_target=target, mock=args.mock, validate=args.validate)
        base = None
        if args.admin:
            _, base = _admin_call(args, "GET", "/config")
            if (base.get("admin") or {}).get("token") == "<redacted>":
                if not args.admin_token:
                    raise SystemExit("fastgate: the running config has an admin token: give --admin-token")
                base["admin"]["token"] = args.admin_token  # the one the API just accepted
        elif args.into:
            try:
                with open(args.into, "rb") as f:
                    base = parse_document(f.read(), _format_of(args.into))
            except OSError as exc:
                raise SystemExit(f"fastgate: cannot read {args.into}: {exc.strerror}") from None
        result = merge(base, imported.config) if base is not None else imported.config
        check_result(result, upstream)
    except OpenApiImportError as exc:
        print(f"{exc.source or args.spec}: {len(exc.issues)} problem(s), nothing written", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # --into: the file itself does not parse
        _print_issues(exc)
        return 1
    for w in imported.warnings:
        print(f"warning: {w}", file=sys.stderr)
    n = len(imported.routes)
    how = f"proxied to `{upstream}`" if "upstream" in (imported.routes[0] if n else {}) else \
        f"mocks ({imported.no_example} without an example answer 501)"
    api = imported.api
    summary = (f"API `{api['name']}` version `{api['versions'][0]['version']}` at "
               f"`{api.get('base_path') or '/'}`: {n} route(s), {how}; {imported.validated} validated")
    if args.admin:
        status, doc = _admin_call(args, "POST", "/config", result)
        print(f"{summary}; POST /config: {status} {(doc or {}).get('status', '')}", file=sys.stderr)
        return 0
    text = yaml.safe_dump(result, sort_keys=False, allow_unicode=True)
    out = args.output
    if out is None and args.into:
        out = args.into
        fmt = _format_of(out)
        if fmt == "toml":
            raise SystemExit(f"fastgate: {out} is TOML, which cannot be written back: give -o FILE.yaml")
        if fmt == "json":
            import json

            text = json.dumps(result, indent=2) + "\n"
        _replace_file(out, text, backup=True)
        print(f"{summary}; merged into {out} (the previous file is {out}.bak; comments are not kept)",
              file=sys.stderr)
        return 0
    if out is None:
        sys.stdout.write(text)
    else:
        _replace_file(out, text, backup=False)
    print(summary + (f"; written to {out}" if out else ""), file=sys.stderr)
    return 0


def _replace_file(path: str, text: str, backup: bool) -> None:
    import shutil

    from .control.admin import _write_atomically

    if backup and os.path.exists(path):
        shutil.copy2(path, path + ".bak")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    _write_atomically(path, text.encode())


def _add_import_parser(sub) -> None:
    i = sub.add_parser("import", help="create an API with its routes from an OpenAPI 3.0/3.1 document",
                       description="Create an API from an OpenAPI 3.0/3.1 document (YAML or JSON): a route per "
                       "operation, mocks from its examples (or proxied to --upstream), request validation. "
                       "Prints the config fragment (YAML) unless -o, --into or --admin say otherwise.")
    i.add_argument("spec", help="the OpenAPI document")
    i.add_argument("--name", help="the API's name (default: from info.title)")
    i.add_argument("--version", dest="api_version", help="the API version (default: info.version)")
    i.add_argument("--base-path", help="the API's base path (default: the path of servers[0].url)")
    how = i.add_mutually_exclusive_group()
    how.add_argument("--upstream", metavar="NAME[=HOST:PORT]",
                     help="routes proxy to this upstream (defined here with =HOST:PORT, else it must exist)")
    how.add_argument("--mock", action="store_true", help="routes answer with the document's examples (the "
                     "default without --upstream)")
    i.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="add openapi-validation to operations with parameters or a body (default: on)")
    i.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (with --into: the merged config)")
    where = i.add_mutually_exclusive_group()
    where.add_argument("--into", metavar="CONFIG", help="merge into this config file (rewritten unless -o; "
                       "name clashes are refused)")
    where.add_argument("--admin", dest="admin_url", nargs="?", const=os.environ.get("FASTGATE_ADMIN_URL",
                       DEFAULT_ADMIN_URL), default=None, metavar="URL",
                       help="merge into the running config and POST it to the admin API (default URL: "
                       f"$FASTGATE_ADMIN_URL or {DEFAULT_ADMIN_URL})")
    i.add_argument("--admin-token", default=os.environ.get("FASTGATE_ADMIN_TOKEN"),
                   help="the admin API's bearer token (env FASTGATE_ADMIN_TOKEN)")
    i.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    i.set_defaults(func=lambda a: cmd_import(_with_admin_flag(a)))


def _with_admin_flag(args):
    args.admin = args.admin_url is not None
    return args


# --- admin API wrappers ------------------------------------------------------------------------------
DEFAULT_ADMIN_URL = "http://127.0.0.1:8001"


def _admin_call(args, method: str, path: str, body=None):
    """One admin API call: (status, decoded JSON or None). Exits 1 with the server's reason on errors."""
    import json
    import urllib.error
    import urllib.request

    url = args.admin_url.rstrip("/") + path
    headers = {"Accept": "application/json", "X-Fastgate-Actor": f"cli:{os.environ.get('USER', '?')}"}
    if args.admin_token:
        headers["Authorization"] = f"Bearer {args.admin_token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            doc = json.loads(raw)
            reason = doc.get("error", "") + (f": {doc['detail']}" if doc.get("detail") else "")
        except ValueError:
            reason = raw.decode(errors="replace")[:200]
        raise SystemExit(f"fastgate: {method} {path}: {exc.code} {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"fastgate: cannot reach the admin API at {args.admin_url}: "
                         f"{getattr(exc, 'reason', exc)}") from None


def _print_json(doc) -> None:
    import json

    print(json.dumps(doc, indent=2))


def _table(rows: list[dict], cols: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cmd_consumers(args) -> int:
    from urllib.parse import quote

    if args.action == "list":
        _, doc = _admin_call(args, "GET", "/consumers")
        if args.json:
            _print_json(doc)
        else:
            _table(doc, ["username", "plan", "groups", "source", "created_at"])
    elif args.action == "create":
        body = {"username": args.name, **({"plan": args.plan} if args.plan else {})}
        _, doc = _admin_call(args, "POST", "/consumers", body)
        _print_json(doc) if args.json else print(f"consumer {doc['username']} created")
    else:
        _admin_call(args, "DELETE", f"/consumers/{quote(args.name, safe='')}")
        print(f"consumer {args.name} deleted")
    return 0


def cmd_keys(args) -> int:
    from urllib.parse import quote

    if args.action == "list":
        path = "/credentials" + (f"?consumer={quote(args.target)}" if args.target else "")
        _, doc = _admin_call(args, "GET", path)
        _print_json(doc) if args.json else _table(doc, ["id", "consumer", "identifier", "state", "created_at"])
        return 0
    if args.target is None:
        raise SystemExit(f"fastgate: keys {args.action} needs " + ("CONSUMER" if args.action == "create" else "ID"))
    if args.action == "create":
        _, doc = _admin_call(args, "POST", f"/consumers/{quote(args.target, safe='')}/credentials", {})
    elif not args.target.isdigit():
        raise SystemExit(f"fastgate: keys {args.action} wants a credential id (a number), got {args.target!r}")
    elif args.action == "rotate":
        _, doc = _admin_call(args, "POST", f"/credentials/{args.target}/rotate")
    else:
        _, doc = _admin_call(args, "DELETE", f"/credentials/{args.target}")
        _print_json(doc) if args.json else print(f"key {doc['id']} ({doc['identifier']}) of {doc['consumer']} revoked")
        return 0
    if args.json:
        _print_json(doc)
    else:
        print(f"key {doc['id']} for {doc['consumer']} ({doc['identifier']}) — shown this once, store it now:")
        print(doc["key"])
    return 0


def cmd_oauth(args) -> int:
    """`fastgate oauth keys` lists the OAuth signing keys; `fastgate oauth rotate-key` rotates them."""
    import datetime

    def when(t):
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t else None

    if args.action == "keys":
        _, doc = _admin_call(args, "GET", "/oauth-keys")
        if args.json:
            _print_json(doc)
        else:
            _table([{**k, "created_at": when(k["created_at"]), "drop_after": when(k["drop_after"]),
                     "signs_from": when(k.get("signs_from"))} for k in doc],
                   ["kid", "alg", "state", "created_at", "signs_from", "drop_after"])
        return 0
    _, doc = _admin_call(args, "POST", "/oauth-keys/rotate")
    if args.json:
        _print_json(doc)
        return 0
    if doc["state"] == "next":
        print(f"signing key {doc['kid']} ({doc['alg']}) is published; it signs from {when(doc['signs_from'])} "
              "(oauth.publish_ahead), the current key until then")
        return 0
    print(f"signing key {doc['kid']} ({doc['alg']}) is now active")
    prev = doc.get("previous")
    if prev:
        print(f"{prev['kid']} stays in the JWKS until {when(prev['drop_after'])} (its last token's expiry + margin)")
    return 0


def cmd_apis(args) -> int:
    """`fastgate apis list`, and `fastgate apis state API VERSION [STATE | --reset]`: show, set or drop
    the lifecycle state set at run time over the config's."""
    if args.action == "list":
        if args.target:
            raise SystemExit("fastgate: apis list takes no arguments")
        _, doc = _admin_call(args, "GET", "/apis")
        if args.json:
            _print_json(doc)
            return 0
        rows = [{"name": a["name"], "base_path": a.get("base_path"),
                 "versions": ", ".join(f"{v['version']} ({v['state']}{', set here' if v.get('state_source') == 'store' else ''})"
                                       for v in a.get("versions", []))} for a in doc]
        _table(rows, ["name", "base_path", "versions"])
        return 0
    from urllib.parse import quote

    if len(args.target) not in (2, 3) or (args.reset and len(args.target) == 3):
        raise SystemExit("fastgate: apis state API VERSION [draft|published|deprecated|retired] [--sunset DATE] "
                         "[--successor VERSION] | apis state API VERSION --reset")
    api, version = args.target[:2]
    path = f"/apis/{quote(api, safe='')}/versions/{quote(version, safe='')}/state"
    if args.reset:
        _, doc = _admin_call(args, "DELETE", path)
    elif len(args.target) == 3:
        body = {"state": args.target[2], **({"sunset": args.sunset} if args.sunset else {}),
                **({"successor": args.successor} if args.successor else {})}
        _, doc = _admin_call(args, "PUT", path, body)
    else:
        _, doc = _admin_call(args, "GET", path)
    if args.json:
        _print_json(doc)
        return 0
    extra = "".join(f", {k} {doc[k]}" for k in ("sunset", "successor") if doc.get(k))
    source = "set here" if doc["source"] == "store" else "the config's"
    print(f"{doc['api']} {doc['version']}: {doc['state']} ({source}{extra})")
    return 0


def cmd_usage(args) -> int:
    """`fastgate usage export`: the usage ledger (GET /usage), as CSV or JSON on stdout."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode

    query = {k: v for k, v in (("consumer", args.consumer), ("from", args.since), ("to", args.until),
                               ("granularity", args.granularity), ("format", args.format)) if v}
    if args.format == "json":
        _, doc = _admin_call(args, "GET", "/usage?" + urlencode(query))
        _print_json(doc)
        return 0
    req = urllib.request.Request(args.admin_url.rstrip("/") + "/usage?" + urlencode(query), headers={
        "Accept": "text/csv", **({"Authorization": f"Bearer {args.admin_token}"} if args.admin_token else {})})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            sys.stdout.write(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"fastgate: GET /usage: {exc.code} {exc.read().decode(errors='replace')[:200]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"fastgate: cannot reach the admin API at {args.admin_url}: "
                         f"{getattr(exc, 'reason', exc)}") from None
    return 0


def _add_admin_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", default=os.environ.get("FASTGATE_ADMIN_URL", DEFAULT_ADMIN_URL),
                        help="the admin API (env FASTGATE_ADMIN_URL; default %(default)s)")
    common.add_argument("--admin-token", default=os.environ.get("FASTGATE_ADMIN_TOKEN"),
                        help="its bearer token (env FASTGATE_ADMIN_TOKEN)")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    c = sub.add_parser("consumers", parents=[common], help="list, create or delete consumers (admin API)")
    c.add_argument("action", choices=["list", "create", "delete"])
    c.add_argument("name", nargs="?")
    c.add_argument("--plan", help="create: the consumer's plan")
    c.set_defaults(func=_needs_name(cmd_consumers))
    k = sub.add_parser("keys", parents=[common], help="API keys: create CONSUMER | revoke ID | rotate ID | list "
                       "[CONSUMER] (admin API)")
    k.add_argument("action", choices=["create", "revoke", "rotate", "list"])
    k.add_argument("target", nargs="?", help="CONSUMER for create and list, the key's ID for revoke and rotate")
    k.set_defaults(func=cmd_keys)
    o = sub.add_parser("oauth", parents=[common], help="OAuth signing keys: keys | rotate-key (admin API)")
    o.add_argument("action", choices=["keys", "rotate-key"])
    o.set_defaults(func=cmd_oauth)
    a = sub.add_parser("apis", parents=[common], help="list the running config's APIs | state API VERSION "
                       "[STATE | --reset]: an API version's lifecycle state (admin API)")
    a.add_argument("action", choices=["list", "state"])
    a.add_argument("target", nargs="*", help="state: API VERSION [draft|published|deprecated|retired]")
    a.add_argument("--sunset", help="state: the Sunset header's HTTP-date while deprecated")
    a.add_argument("--successor", help="state: the version that replaces this one")
    a.add_argument("--reset", action="store_true", help="state: drop the state set here (the config's again)")
    a.set_defaults(func=cmd_apis)
    u = sub.add_parser("usage", parents=[common], help="export the usage ledger (admin API)")
    u.add_argument("action", choices=["export"])
    u.add_argument("--format", choices=["csv", "json"], default="csv")
    u.add_argument("--consumer", help="one consumer only")
    u.add_argument("--from", dest="since", help="start: unix seconds or ISO 8601 (UTC), rounded down to the hour")
    u.add_argument("--to", dest="until", help="end (exclusive): unix seconds or ISO 8601")
    u.add_argument("--granularity", choices=["hour", "day"], default="hour")
    u.set_defaults(func=cmd_usage)


def _needs_name(func):
    def run(args) -> int:
        if args.action != "list" and not args.name:
            raise SystemExit(f"fastgate: consumers {args.action} needs NAME")
        return func(args)

    return run


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
    add_tune_parser(sub, DEFAULT_CONFIG)
    _add_import_parser(sub)
    _add_admin_parsers(sub)
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
