"""`fastgate tune`: measure the gateway at 1..N workers with wrk and recommend a worker count.

For each n the tuner starts `fastgate run -c FILE --workers n` on a free loopback port as a
subprocess, waits until it answers, runs a short bounded wrk load against one path, reads the
workers' CPU time from /proc, then stops the gateway (SIGTERM, wait). When the CPUs allow it the
gateway and wrk are pinned to disjoint cores with `taskset`; otherwise the output says that the load
generator shares cores with the workers (and the figures are pessimistic for the larger n).

Figures per n: requests/s, p99 latency (wrk --latency), CPU µs per request (utime+stime of the
supervisor's children / requests) and scaling efficiency, rps(n) / (n * rps(1)). The recommendation is
the smallest n whose throughput is within 5% of the best one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

WITHIN = 0.05  # the recommendation: the smallest n within this fraction of the best req/s
LOW_EFFICIENCY = 0.6  # scaling efficiency below this is called out
MIN_SOMAXCONN = 1024
NOFILE_PER_CONNECTION = 4
START_TIMEOUT = 30.0
WRK_HINT = "wrk not found: install it with `apt-get install wrk`"
PLOT_HINT = "matplotlib is not installed, so no plot: install it with `pip install 'fastgate[tune]'`"


# --- host facts ------------------------------------------------------------------------------------
def cgroup_quota() -> tuple[float | None, str]:
    """The CPU quota of this process's cgroup in CPUs (None: no quota) and where it was read.

    Reads the same files as `supervisor.cpu_count` (which `--workers auto` uses)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()
        if q == "max":
            return None, "cgroup v2 cpu.max: max"
        return int(q) / int(period), f"cgroup v2 cpu.max: {q} {period}"
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None, "no cgroup CPU quota found"
    if q <= 0:
        return None, f"cgroup v1 cfs quota: {q} (none)"
    return q / period, f"cgroup v1 cfs quota: {q}/{period}"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5' (taskset's list syntax)."""
    parts, start, prev = [], None, None
    for c in sorted(cpus) + [None]:
        if start is None:
            start = prev = c
        elif c is not None and c == prev + 1:
            prev = c
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = c
    return ",".join(parts)


def host_facts(cfg) -> dict:
    import resource

    from .supervisor import cpu_count

    affinity = sorted(os.sched_getaffinity(0))
    quota, quota_source = cgroup_quota()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    backlogs = [li.backlog for li in cfg.listeners if li.kind == "proxy"]
    return {
        "usable_cpus": cpu_count(),
        "affinity": affinity,
        "cgroup_quota_cpus": quota,
        "cgroup_quota_source": quota_source,
        "nofile_soft": soft,
        "nofile_hard": hard,
        "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
        "config_backlog": max(backlogs) if backlogs else None,
        "max_connections_per_worker": cfg.limits.max_connections,
    }


def _limit(v) -> str:
    import resource

    return "unlimited" if v == resource.RLIM_INFINITY else str(v)


def describe_host(h: dict) -> list[str]:
    quota = h["cgroup_quota_cpus"]
    lines = [
        f"usable CPUs:      {h['usable_cpus']} (affinity {_cpu_list(h['affinity'])} = {len(h['affinity'])} CPU(s); "
        f"{h['cgroup_quota_source']}" + (f" = {quota:.2f} CPU(s)" if quota else "") + ")",
        f"ulimit -n:        soft {_limit(h['nofile_soft'])}, hard {_limit(h['nofile_hard'])} "
        "(the gateway raises its soft limit to the hard one)",
        f"somaxconn:        {h['somaxconn'] if h['somaxconn'] is not None else 'unknown'}",
    ]
    if h["config_backlog"] is not None:
        from .config.schema import Listener

        default = Listener(port=1).backlog
        extra = "" if h["config_backlog"] == default else f"; the measured gateway's --listen socket uses {default}"
        lines.append(f"listen backlog:   {h['config_backlog']} (config's proxy listener; the kernel caps it at "
                     f"somaxconn{extra})")
    return lines


# --- choosing what to load -------------------------------------------------------------------------
def _reachable(address: str, timeout: float = 0.3) -> bool:
    from .config.load import split_address

    hp = split_address(address)
    if hp is None:
        return False
    try:
        with socket.create_connection((hp[0].strip("[]"), hp[1]), timeout):
            return True
    except OSError:
        return False


def _concrete(pattern: str) -> str:
    """A request path matching a pattern: {param} → 1, a catch-all → tune."""
    out = []
    for seg in pattern.split("/"):
        if seg == "*" or (seg.startswith("{") and seg.endswith("*}")):
            out.append("tune")
        elif seg.startswith("{") and seg.endswith("}"):
            out.append("1")
        else:
            out.append(seg)
    return "/".join(out)


def choose_path(cfg) -> tuple[str | None, str, list[str]]:
    """(path, why, notes): the first plain GET path of a mock route or of a route whose upstream
    answers; a proxied route whose upstream is down only as a last resort."""
    from .config.load import all_routes

    upstreams = {u.name: u for u in cfg.upstreams}
    plain, patterned = [], []
    for _where, r, api, ver in all_routes(cfg):
        if ver is not None and ver.state in ("draft", "retired"):
            continue
        if r.hosts or (r.methods and "GET" not in r.methods):
            continue
        base = api.base_path if api is not None else ""
        for pat in r.paths:
            full = base + pat
            (patterned if ("{" in full or "*" in full) else plain).append((full, r))
    candidates = plain + [(_concrete(p), r) for p, r in patterned]
    if not candidates:
        return None, "", []
    notes = []
    up_state: dict[str, bool] = {}

    def usable(route) -> bool:
        if route.mock is not None:
            return True
        if route.upstream not in up_state:
            up = upstreams.get(route.upstream)
            up_state[route.upstream] = bool(up) and any(_reachable(t.address) for t in up.targets)
        return up_state[route.upstream]

    first_path, first = candidates[0]
    for path, r in candidates:
        if usable(r):
            kind = "mock" if r.mock is not None else f"proxied to upstream `{r.upstream}`"
            if r is not first and first.mock is None:
                notes.append(f"route `{first.name}` ({first_path}) proxies to `{first.upstream}`, which is not "
                             "answering: using another route instead (or start the upstream, or give --path)")
            return path, f"route `{r.name}` ({kind})", notes
    notes.append(f"upstream `{first.upstream}` of route `{first.name}` is not answering: the gateway will answer "
                 "502 and the figures measure error responses (start the upstream, or give --path)")
    return first_path, f"route `{first.name}` (proxied to `{first.upstream}`, not answering)", notes


# --- one measurement -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cpu_ticks(pids) -> dict[int, int]:
    """utime+stime in clock ticks per pid (pids that are gone are left out)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return out


def _http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Gateway:
    """`fastgate run` as a subprocess on a loopback port, stopped by its PID."""

    def __init__(self, config: str, workers: int, tmp: str, cpus: str | None):
        self.port = free_port()
        self.workers = workers
        self.log_path = os.path.join(tmp, f"gateway-{workers}.log")
        cmd = [sys.executable, "-m", "fastgate", "run", "-c", config, "--workers", str(workers),
               "--listen", f"127.0.0.1:{self.port}", "--pid-file", os.path.join(tmp, f"gateway-{workers}.pid")]
        if cpus is not None:
            cmd = [shutil.which("taskset"), "-c", cpus] + cmd  # taskset execs: the PID is the supervisor's
        env = dict(os.environ, FASTGATE_LOG_LEVEL="warning")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def wait_ready(self, path: str) -> int:
        """Wait for all n workers and a first HTTP answer on `path`; returns its status."""
        deadline = time.monotonic() + START_TIMEOUT
        status = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc.returncode}):\n{self.log_tail()}")
            if len(children(self.proc.pid)) >= self.workers:
                status = _http_status(self.port, path)
                if status is not None:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"the gateway did not answer within {START_TIMEOUT:.0f}s:\n{self.log_tail()}")
        # workers report ready to the supervisor only; wait until their start-up CPU burst is over
        last = None
        settle_until = time.monotonic() + 3.0
        while time.monotonic() < settle_until:
            now = sum(cpu_ticks(children(self.proc.pid)).values())
            if now == last:
                break
            last = now
            time.sleep(0.15)
        return status

    def workers_pids(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)  # a second one kills the workers at once
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict:
    def num(pattern, cast=float, default=None):
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else default

    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\b", out)
        lat[pct] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": num(r"Requests/sec:\s+([\d.]+)", default=0.0),
            "requests": num(r"(\d+) requests in", int, 0),
            "p50_ms": lat["50"], "p99_ms": lat["99"],
            "non2xx": num(r"Non-2xx or 3xx responses: (\d+)", int, 0),
            "socket_errors": sum(map(int, sock.groups())) if sock else 0}


def run_wrk(wrk: str, port: int, path: str, duration: int, connections: int, cpu: int | None) -> dict:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s",
           f"http://127.0.0.1:{port}{path}"]
    if cpu is not None:
        cmd = [shutil.which("taskset"), "-c", str(cpu)] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    if res.returncode != 0 or "Requests/sec" not in res.stdout:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return parse_wrk(res.stdout)


def placement(n: int, cpus: list[int], taskset: bool) -> tuple[str | None, int | None, bool]:
    """(gateway CPU list, wrk CPU, shared): wrk gets a core of its own when n workers fit on the rest."""
    if taskset and len(cpus) >= n + 1:
        return _cpu_list(cpus[:-1]), cpus[-1], False
    return None, None, True


def measure(config: str, n: int, path: str, args, wrk: str, cpus: list[int], taskset: bool, tmp: str) -> dict:
    gw_cpus, wrk_cpu, shared = placement(n, cpus, taskset)
    gw = Gateway(config, n, tmp, gw_cpus)
    try:
        status = gw.wait_ready(path)
        pids = gw.workers_pids()
        before = cpu_ticks(pids)
        row = run_wrk(wrk, gw.port, path, args.duration, args.connections, wrk_cpu)
        after = cpu_ticks(pids)
    finally:
        gw.stop()
    ticks = sum(after[p] - before[p] for p in after if p in before)
    clk = os.sysconf("SC_CLK_TCK")
    row.update(workers=n, first_status=status, wrk_shares_cores=shared, gateway_cpus=gw_cpus, wrk_cpu=wrk_cpu,
               cpu_us_per_req=(ticks / clk * 1e6 / row["requests"]) if row["requests"] else None)
    return row


# --- analysis --------------------------------------------------------------------------------------
def recommend(rows: list[dict], usable_cpus: int) -> tuple[int, str]:
    base = rows[0]["rps"]
    for r in rows:
        r["efficiency"] = r["rps"] / (r["workers"] * base) if base else None
    best = max(rows, key=lambda r: r["rps"])
    if best["rps"] <= 0:
        return 1, "no request completed at any worker count; 1 worker until the cause is fixed"
    pick = next(r for r in rows if r["rps"] >= (1 - WITHIN) * best["rps"])
    n = pick["workers"]
    if pick is best:
        reason = f"{n} worker(s) gave the best throughput ({best['rps']:,.0f} req/s)"
    else:
        reason = (f"{n} worker(s) reach {pick['rps']:,.0f} req/s, within {WITHIN:.0%} of the best "
                  f"({best['rps']:,.0f} req/s at {best['workers']} workers); more workers add little")
    if n > 1 and pick["efficiency"] is not None and pick["efficiency"] < LOW_EFFICIENCY:
        reason += (f"; its scaling efficiency is only {pick['efficiency']:.0%}"
                   + (" (wrk shared its cores)" if pick["wrk_shares_cores"] else "")
                   + f": it gains {pick['rps'] / rows[0]['rps'] - 1:.0%} over 1 worker; use fewer if CPU for other work matters more")
    nxt = next((r for r in rows if r["workers"] == n + 1), None)
    if nxt is not None and nxt["efficiency"] is not None and nxt["efficiency"] < LOW_EFFICIENCY:
        reason += f"; at {n + 1} workers scaling efficiency falls to {nxt['efficiency']:.0%}"
    if n == rows[-1]["workers"] and len(rows) > 1 and n < usable_cpus:
        reason += f"; it is the largest count measured: try --max-workers {usable_cpus} (the usable CPUs)"
    return n, reason


def limit_warnings(h: dict, rows: list[dict], args, max_workers: int) -> list[str]:
    w = []
    need = NOFILE_PER_CONNECTION * args.connections
    if h["nofile_soft"] < need:
        w.append(f"ulimit -n (soft {h['nofile_soft']}) is below {NOFILE_PER_CONNECTION}x connections ({need}): "
                 "wrk and clients run out of file descriptors first; raise it (`ulimit -n`, LimitNOFILE=)")
    if h["nofile_hard"] < need:
        w.append(f"the hard open-files limit ({h['nofile_hard']}) is below {need}: the gateway cannot raise its "
                 "own limit high enough")
    smc = h["somaxconn"]
    if smc is not None and smc < MIN_SOMAXCONN:
        w.append(f"net.core.somaxconn is {smc} (< {MIN_SOMAXCONN}): every listen backlog is capped to it, so bursts "
                 "of new connections are dropped; raise it with `sysctl -w net.core.somaxconn=4096`")
    if smc is not None and h["config_backlog"] and h["config_backlog"] > smc:
        w.append(f"the config's listen backlog ({h['config_backlog']}) is above somaxconn ({smc}): the kernel uses {smc}")
    quota = h["cgroup_quota_cpus"]
    if quota is not None and quota < len(h["affinity"]):
        w.append(f"the cgroup CPU quota ({quota:.2f} CPUs) is below the {len(h['affinity'])} CPUs in the affinity "
                 f"mask: more than {h['usable_cpus']} worker(s) compete for the quota and get throttled")
    if max_workers > h["usable_cpus"]:
        w.append(f"--max-workers {max_workers} is above the {h['usable_cpus']} usable CPU(s): the larger counts "
                 "oversubscribe the CPUs")
    shared = [r["workers"] for r in rows if r["wrk_shares_cores"]]
    if shared:
        w.append(f"the load generator (wrk) shares cores with the gateway at {', '.join(map(str, shared))} "
                 "worker(s): those figures understate the gateway (run wrk from another host for exact numbers)")
    if h["max_connections_per_worker"] < args.connections:
        w.append(f"limits.max_connections ({h['max_connections_per_worker']} per worker) is below --connections "
                 f"({args.connections}): connections beyond it are closed at once")
    bad = [r for r in rows if r["non2xx"] or r["socket_errors"]]
    for r in bad:
        w.append(f"{r['workers']} worker(s): {r['non2xx']} non-2xx/3xx responses and {r['socket_errors']} socket "
                 f"errors (first answer: HTTP {r['first_status']}): the figures include failures")
    return w


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{'workers':>7}  {'req/s':>10}  {'p99 ms':>8}  {'CPU µs/req':>10}  {'efficiency':>10}  note",
             "-" * 62]
    for r in rows:
        note = "wrk shares cores" if r["wrk_shares_cores"] else f"wrk on CPU {r['wrk_cpu']}"
        lines.append(f"{r['workers']:>7}  {r['rps']:>10,.0f}  {f(r['p99_ms'], '.2f'):>8}  "
                     f"{f(r['cpu_us_per_req'], '.1f'):>10}  {f(r['efficiency'], '.0%'):>10}  {note}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str, recommended: int) -> str | None:
    """Save req/s and p99 against workers as a PNG; None (and a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font-cache chatter in the report
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [r["workers"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    l1 = ax.plot(xs, [r["rps"] for r in rows], "o-", color="tab:blue", label="req/s")
    vline = ax.axvline(recommended, color="tab:green", alpha=0.5, linestyle=":", label=f"recommended: {recommended}")
    ax.set_xlabel("workers")
    ax.set_ylabel("requests/s", color="tab:blue")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    l2 = ax2.plot(xs, [r["p99_ms"] or 0 for r in rows], "s--", color="tab:red", label="p99 ms")
    shared = [r for r in rows if r["wrk_shares_cores"]]
    extra = []
    if shared:
        extra = ax.plot([r["workers"] for r in shared], [r["rps"] for r in shared], "o", markersize=11,
                        markerfacecolor="none", color="tab:gray", label="wrk shares cores")
    handles = l1 + l2 + extra + [vline]
    ax.legend(handles, [x.get_label() for x in handles], loc="lower right", fontsize=8)
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return os.path.abspath(path)


# --- the command -----------------------------------------------------------------------------------
def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return n


def add_parser(sub, default_config: str) -> None:
    t = sub.add_parser("tune", help="measure req/s, p99 and CPU per request at 1..N workers with wrk; "
                                    "recommend a worker count")
    t.add_argument("-c", "--config", default=default_config)
    t.add_argument("--max-workers", type=_positive, help="largest worker count to try (default: usable CPUs)")
    t.add_argument("--duration", type=_positive, default=3, help="seconds of wrk load per worker count (default 3)")
    t.add_argument("--connections", type=_positive, default=64, help="wrk connections (default 64)")
    t.add_argument("--output", default="fastgate-tune.png", help="PNG plot (default fastgate-tune.png)")
    t.add_argument("--path", help="request path to load (default: the config's first plain GET route)")
    t.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the report goes to stderr)")
    t.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from .cli import _print_issues
    from .config import load_file
    from .errors import ConfigError

    out = sys.stderr if args.json else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    try:
        cfg = load_file(args.config)
    except ConfigError as exc:
        _print_issues(exc)
        return 1
    wrk = shutil.which("wrk")
    if wrk is None:
        print(f"fastgate tune: {WRK_HINT}", file=sys.stderr)
        return 2
    if args.path is not None and not args.path.startswith("/"):
        print(f"fastgate tune: --path must start with '/', got {args.path!r}", file=sys.stderr)
        return 2

    h = host_facts(cfg)
    say("host")
    for line in describe_host(h):
        say("  " + line)
    max_workers = args.max_workers or max(1, h["usable_cpus"])
    notes = []
    if args.path is not None:
        path, why = args.path, "--path"
    else:
        path, why, notes = choose_path(cfg)
        if path is None:
            print("fastgate tune: the config has no route a plain GET without a Host can reach: give --path",
                  file=sys.stderr)
            return 2
    taskset = shutil.which("taskset") is not None
    cpus = h["affinity"]
    say(f"load:   wrk -t1 -c{args.connections} -d{args.duration}s http://127.0.0.1:PORT{path}  ({why})")
    for note in notes:
        say(f"  note: {note}")
    if not taskset:
        say("  note: taskset not found (util-linux): nothing is pinned, wrk shares cores with the workers")
    elif len(cpus) < 2:
        say("  note: one CPU only: the load generator shares it with the gateway")
    say()

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastgate-tune-") as tmp:
        for n in range(1, max_workers + 1):
            gw_cpus, wrk_cpu, shared = placement(n, cpus, taskset)
            where = (f"gateway on CPU {gw_cpus}, wrk on CPU {wrk_cpu}" if not shared
                     else "load generator shares cores with the workers")
            say(f"  {n} worker(s): {where} ...")
            try:
                row = measure(os.path.abspath(args.config), n, path, args, wrk, cpus, taskset, tmp)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"fastgate tune: {n} worker(s): {exc}", file=sys.stderr)
                return 1
            rows.append(row)
            p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.2f}"
            say(f"    {row['rps']:,.0f} req/s, p99 {p99} ms, {row['requests']} requests")

    best_n, reason = recommend(rows, h["usable_cpus"])
    warnings = limit_warnings(h, rows, args, max_workers)
    say()
    say(table(rows))
    say()
    say(f"recommended: --workers {best_n}")
    say(f"  why: {reason}")
    for w in warnings:
        say(f"  warning: {w}")

    title = (f"fastgate tune: {path}, {args.connections} connections, {args.duration}s per point, "
             f"{h['usable_cpus']} usable CPU(s)")
    png = plot(rows, args.output, title, best_n)
    if png is None:
        say(PLOT_HINT)
    else:
        say(f"plot: {png}")
    if args.json:
        print(json.dumps({"host": h, "path": path, "target": why, "connections": args.connections,
                          "duration": args.duration, "rows": rows, "recommended_workers": best_n,
                          "reason": reason, "warnings": warnings + [f"note: {n}" for n in notes],
                          "plot": png}, indent=2))
    return 0
