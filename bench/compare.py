"""Measure fastgate beside nginx in one run, as ratios.

Layout on a 2-core machine: the subject (nginx proxy or fastgate, 1 worker) is pinned to core 0;
wrk and the upstream (an nginx returning a small body) share core 1. Rounds interleave the
subjects so drift hits all alike; each figure is the median over rounds. CPU per request is the
subject's user and system time (from /proc/PID/stat of its worker processes) divided by the
requests wrk completed — the steadiest figure here.

Scenarios:
  proxy   plain proxied route (the core target)
  routes  fastgate with 10 routes vs 10,000 routes, requests spread over them
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK = os.sysconf("SC_CLK_TCK")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    u = s = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        u += int(fields[11])
        s += int(fields[12])
    return u, s


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Subject:
    def __init__(self, name, port, proc, workers_fn):
        self.name, self.port, self.proc, self.workers = name, port, proc, workers_fn


def nginx_conf(tmp: Path, port: int, body: str = "", upstream_port: int | None = None, extra_http: str = "",
               location: str = "") -> Path:
    conf = tmp / f"nginx-{port}.conf"
    if upstream_port is None:
        loc = location or "location / { return 200 'hello from upstream\\n'; }"
        up = ""
    else:
        up = f"upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        loc = location or ("location / { proxy_pass http://backend; proxy_http_version 1.1; "
                           "proxy_set_header Connection \"\"; proxy_set_header Host $host; "
                           "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }")
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-{port}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body-{port};
  proxy_temp_path {tmp}/proxy-{port};
  keepalive_requests 100000;
  {up}
  {extra_http}
  server {{ listen 127.0.0.1:{port} reuseport backlog=4096; {loc} }}
}}
""")
    return conf


def start_nginx(tmp, port, cpu, **kw) -> subprocess.Popen:
    conf = nginx_conf(tmp, port, **kw)
    p = subprocess.Popen(["taskset", "-c", cpu, NGINX, "-c", str(conf), "-p", str(tmp)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


def start_fastgate(tmp: Path, port: int, cfg_text: str, cpu: str) -> subprocess.Popen:
    cfg = tmp / f"fastgate-{port}.yaml"
    cfg.write_text(cfg_text)
    env = dict(os.environ, FASTGATE_LOG_LEVEL="warning")
    p = subprocess.Popen(["taskset", "-c", cpu, str(ROOT / ".venv/bin/fastgate"), "run", "-c", str(cfg),
                          "--workers", "1", "--listen", f"127.0.0.1:{port}", "--pid-file", str(tmp / f"fg-{port}.pid")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.5)
    return p


def wrk(port: int, duration: float, conns: int, cpu: str, script: Path | None = None, path: str = "/") -> dict:
    cmd = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        lat[pct] = v * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": rps, "requests": reqs, "p50": lat["50"], "p99": lat["99"],
            "non2xx": int(errors.group(1)) if errors else 0,
            "sockerr": sum(map(int, sock_err.groups())) if sock_err else 0}


def measure(subject: Subject, duration, conns, cpu, script=None) -> dict:
    pids = subject.workers()
    u0, s0 = cpu_ticks(pids)
    r = wrk(subject.port, duration, conns, cpu, script)
    u1, s1 = cpu_ticks(pids)
    r["user_us"] = (u1 - u0) / CLK * 1e6 / max(1, r["requests"])
    r["sys_us"] = (s1 - s0) / CLK * 1e6 / max(1, r["requests"])
    return r


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def table(results: dict, ref: str | None) -> str:
    lines = ["| subject | req/s | p50 ms | p99 ms | user µs/req | sys µs/req | req/s ratio | p99 ratio | user-CPU ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = results.get(ref) if ref else None
    for name, rows in results.items():
        rps, p50, p99, us, sy = (med(rows, k) for k in ("rps", "p50", "p99", "user_us", "sys_us"))
        if base:
            ratios = (f"{rps / med(base, 'rps'):.2f}", f"{p99 / med(base, 'p99'):.2f}",
                      f"{us / med(base, 'user_us'):.2f}")
        else:
            ratios = ("", "", "")
        lines.append(f"| {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {us:.1f} | {sy:.1f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def route_config(n: int, upstream_port: int) -> str:
    lines = ["limits: {keepalive_requests: 100000}",
             "upstreams:", f"  - {{name: u, targets: [{{address: \"127.0.0.1:{upstream_port}\"}}]}}", "routes:"]
    for i in range(n):
        lines.append(f"  - {{name: r{i}, paths: [\"/api/r{i}/items/{{id}}\"], upstream: u}}")
    lines.append("  - {name: root, paths: [\"/*\"], upstream: u}")
    return "\n".join(lines) + "\n"


def spread_script(tmp: Path, n: int) -> Path:
    p = tmp / f"spread-{n}.lua"
    p.write_text(f"counter = 0\nrequest = function()\n  counter = counter + 1\n"
                 f"  return wrk.format(nil, \"/api/r\" .. (counter % {n}) .. \"/items/\" .. counter)\nend\n")
    return p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=["proxy", "routes", "memory", "ratelimit", "gateway", "jwt",
                                           "observability", "all"],
                    default="all")
    ap.add_argument("--idle-clients", type=int, default=10000)
    ap.add_argument("--million", type=int, default=1_000_000, help="requests for the RSS check")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--subject-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("bench needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    command = "bash bench/run.sh " + " ".join(sys.argv[1:])
    sections = []
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="fastgate-bench-"))
    try:
        up_port = free_port()
        procs.append(start_nginx(tmp, up_port, args.load_cpu))
        if args.scenario in ("proxy", "all"):
            ng_port, fg_port = free_port(), free_port()
            ng = start_nginx(tmp, ng_port, args.subject_cpu, upstream_port=up_port)
            procs.append(ng)
            fg = start_fastgate(tmp, fg_port, route_config(1, up_port), args.subject_cpu)
            procs.append(fg)
            # the yardstick: the least a Python proxy on uvloop + httptools can do (bench/lean_proxy.py)
            lean_port = free_port()
            lean = subprocess.Popen(["taskset", "-c", args.subject_cpu, sys.executable, str(HERE / "lean_proxy.py"),
                                     str(lean_port), str(up_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(lean)
            wait_port(lean_port)
            subjects = [
                Subject("upstream direct (no proxy)", up_port, None, lambda: []),
                Subject("nginx proxy (1 worker)", ng_port, ng, lambda: children(ng.pid)),
                Subject("lean Python proxy (uvloop + httptools, no gateway work)", lean_port, lean,
                        lambda: [lean.pid]),
                Subject("fastgate (1 worker)", fg_port, fg, lambda: children(fg.pid)),
            ]
            results = {s.name: [] for s in subjects}
            for rnd in range(args.rounds):
                for s in subjects:
                    r = measure(s, args.duration, args.connections, args.load_cpu)
                    results[s.name].append(r)
                    print(f"round {rnd + 1} {s.name}: {r['rps']:,.0f} req/s p99 {r['p99']:.2f} ms "
                          f"user {r['user_us']:.1f} µs sys {r['sys_us']:.1f} µs errors {r['non2xx'] + r['sockerr']}",
                          flush=True)
            fg_rss = rss_kb(children(fg.pid)[0]) // 1024
            sections.append(("Plain proxied route", table(results, "nginx proxy (1 worker)"),
                             f"fastgate worker RSS after the run: {fg_rss} MB"))
            for p in (ng, fg, lean):
                p.send_signal(signal.SIGTERM)
                p.wait(30)
                procs.remove(p)
        if args.scenario in ("routes", "all"):
            p10, p10k = free_port(), free_port()
            f10 = start_fastgate(tmp, p10, route_config(10, up_port), args.subject_cpu)
            procs.append(f10)
            f10k = start_fastgate(tmp, p10k, route_config(10000, up_port), args.subject_cpu)
            procs.append(f10k)
            subjects = [Subject("fastgate, 10 routes", p10, f10, lambda: children(f10.pid)),
                        Subject("fastgate, 10,000 routes", p10k, f10k, lambda: children(f10k.pid))]
            scripts = {p10: spread_script(tmp, 10), p10k: spread_script(tmp, 10000)}
            results = {s.name: [] for s in subjects}
            for rnd in range(args.rounds):
                for s in subjects:
                    r = measure(s, args.duration, args.connections, args.load_cpu, scripts[s.port])
                    results[s.name].append(r)
                    print(f"round {rnd + 1} {s.name}: {r['rps']:,.0f} req/s user {r['user_us']:.1f} µs", flush=True)
            rss = {s.name: rss_kb(children(s.proc.pid)[0]) // 1024 for s in subjects}
            sections.append(("Route table size (requests spread over every route)",
                             table(results, "fastgate, 10 routes"),
                             "worker RSS after the run: " + ", ".join(f"{k}: {v} MB" for k, v in rss.items())))
        if args.scenario in ("ratelimit", "all"):
            sections.append(ratelimit_section(tmp, up_port, args, procs))
        if args.scenario in ("gateway", "all"):
            sections.append(gateway_section(tmp, up_port, args, procs))
        if args.scenario in ("jwt", "all"):
            sections.append(jwt_section(tmp, up_port, args, procs))
        if args.scenario in ("observability", "all"):
            sections.append(observability_section(tmp, up_port, args, procs))
        if args.scenario in ("memory", "all"):
            sections.append(memory_section(tmp, up_port, args, procs))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(Path(args.results), command, args, sections)
    return 0


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("the ratelimit scenario needs redis-server: apt-get install redis-server")
    p = subprocess.Popen(["taskset", "-c", "1", exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    wait_port(port)
    return p, port


RATE = 10_000_000  # high enough that nothing is refused: the bench measures what the check costs
# Redis lease mode: sized as README's "Counters across hosts" says, at least twice the requests a
# worker serves per Redis round trip (here up to the 64 connections' worth per loop iteration).
# Its overshoot bound is 500 requests per window over a limit of 10,000,000/s. With 100, about one
# request in six found the lease empty and waited on Redis (0.75x nginx limit_req, 2026-11-26).
LEASE_SIZE = 500


def ratelimit_section(tmp: Path, up_port: int, args, procs) -> tuple[str, str, str]:
    """nginx limit_req vs fastgate with no limit, local counters, and Redis lease mode."""
    redis, redis_port = start_redis(tmp)
    procs.append(redis)
    ng_port = free_port()
    ng = start_nginx(tmp, ng_port, args.subject_cpu, upstream_port=up_port,
                     extra_http=f"limit_req_zone $binary_remote_addr zone=rl:10m rate={RATE}r/s;",
                     location="location / { limit_req zone=rl burst=1000 nodelay; proxy_pass http://backend; "
                              "proxy_http_version 1.1; proxy_set_header Connection \"\"; }")
    procs.append(ng)
    base = f"limits: {{keepalive_requests: 100000}}\nupstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
    policy = f"[{{type: rate-limit, rate: {RATE}, per: 1, burst: 1000, key: ip%s}}]"
    configs = {
        "fastgate, no limit": base + "routes:\n  - {name: r, paths: [\"/*\"], upstream: u}\n",
        "fastgate, local counters": base + "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: "
        + policy % "" + "}\n",
        "fastgate, Redis lease mode": base + f"counters: {{redis: {{url: \"redis://127.0.0.1:{redis_port}/0\", "
        f"mode: lease, lease_size: {LEASE_SIZE}}}}}\n" "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: "
        + policy % ", backend: redis" + "}\n",
        "fastgate, Redis exact mode": base + f"counters: {{redis: {{url: \"redis://127.0.0.1:{redis_port}/0\", "
        "mode: exact}}\nroutes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: "
        + policy % ", backend: redis" + "}\n",
    }
    subjects = [Subject("nginx proxy + limit_req", ng_port, ng, lambda: children(ng.pid))]
    for name, text in configs.items():
        port = free_port()
        p = start_fastgate(tmp, port, text, args.subject_cpu)
        procs.append(p)
        subjects.append(Subject(name, port, p, lambda p=p: children(p.pid)))
    results = {s.name: [] for s in subjects}
    for rnd in range(args.rounds):
        for s in subjects:
            r = measure(s, args.duration, args.connections, args.load_cpu)
            results[s.name].append(r)
            print(f"round {rnd + 1} {s.name}: {r['rps']:,.0f} req/s user {r['user_us']:.1f} µs "
                  f"errors {r['non2xx'] + r['sockerr']}", flush=True)
    rps = {k: med(v, "rps") for k, v in results.items()}
    local = rps["fastgate, local counters"] / rps["fastgate, no limit"]
    lease = rps["fastgate, Redis lease mode"] / rps["nginx proxy + limit_req"]
    exact = rps["fastgate, Redis exact mode"] / rps["nginx proxy + limit_req"]
    return ("Rate limiting (nothing refused: the cost of the check)", table(results, "nginx proxy + limit_req"),
            f"local counters vs the same route without a limit: {local:.3f}× throughput (target ≥ 0.95). "
            f"Redis lease mode vs nginx limit_req: {lease:.3f}× (target ≥ 0.85). "
            f"Redis exact mode (one Lua call per request) vs nginx limit_req: {exact:.3f}×. "
            "redis-server runs on the load generator's core.")


def interleave(subjects, args, script=None) -> dict:
    results = {s.name: [] for s in subjects}
    for rnd in range(args.rounds):
        for s in subjects:
            r = measure(s, args.duration, args.connections, args.load_cpu, script)
            results[s.name].append(r)
            print(f"round {rnd + 1} {s.name}: {r['rps']:,.0f} req/s user {r['user_us']:.1f} µs "
                  f"errors {r['non2xx'] + r['sockerr']}", flush=True)
    return results


KEYS = 1000


def gateway_section(tmp: Path, up_port: int, args, procs) -> tuple[str, str, str]:
    """The API-gateway job: key auth over 1,000 consumers + a rate limit + an added response header
    (+ analytics on for fastgate: its metrics listener), beside nginx doing the same with a `map`
    of 1,000 keys, `limit_req` and `add_header`. Every request passes (the limits are high)."""
    import hashlib

    script = tmp / "keys.lua"
    script.write_text(f"counter = 0\nrequest = function()\n  counter = counter + 1\n"
                      f"  wrk.headers[\"apikey\"] = \"key\" .. (counter % {KEYS})\n"
                      f"  return wrk.format(nil, \"/\")\nend\n")
    entries = "".join(f'    "key{i}" c{i};\n' for i in range(KEYS))
    ng_port = free_port()
    ng = start_nginx(tmp, ng_port, args.subject_cpu, upstream_port=up_port,
                     extra_http=(f"map $http_apikey $consumer {{\n    default \"\";\n{entries}  }}\n"
                                 f"  limit_req_zone $consumer zone=gw:10m rate={RATE}r/s;"),
                     location=("location / { if ($consumer = \"\") { return 401; } "
                               "limit_req zone=gw burst=1000 nodelay; add_header X-Gateway bench always; "
                               "proxy_set_header X-Consumer-Username $consumer; proxy_pass http://backend; "
                               "proxy_http_version 1.1; proxy_set_header Connection \"\"; }"))
    procs.append(ng)
    consumers = "".join(f"  - {{username: c{i}, keys: [\"sha256:{hashlib.sha256(b'key%d' % i).hexdigest()}\"]}}\n"
                        for i in range(KEYS))
    mport = free_port()
    text = (f"limits: {{keepalive_requests: 100000}}\nlisteners:\n  - {{kind: proxy, port: 8000}}\n"
            f"  - {{kind: metrics, port: {mport}}}\n"
            f"upstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
            f"consumers:\n{consumers}"
            "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: [{type: key-auth}, "
            f"{{type: rate-limit, rate: {RATE}, per: 1, burst: 1000, key: consumer}}, "
            "{type: response-headers, add: {X-Gateway: bench}}]}\n")
    fg_port = free_port()
    fg = start_fastgate(tmp, fg_port, text, args.subject_cpu)
    procs.append(fg)
    subjects = [Subject("nginx: map + limit_req + add_header", ng_port, ng, lambda: children(ng.pid)),
                Subject("fastgate: key-auth + rate-limit + header + metrics", fg_port, fg,
                        lambda: children(fg.pid))]
    results = interleave(subjects, args, script)
    rps = {k: med(v, "rps") for k, v in results.items()}
    user = {k: med(v, "user_us") for k, v in results.items()}
    names = list(rps)
    return ("API gateway job (1,000 API keys, a rate limit, a response header)",
            table(results, names[0]),
            f"fastgate vs nginx: {rps[names[1]] / rps[names[0]]:.3f}× requests/s (target ≥ 0.9), "
            f"{user[names[1]] / user[names[0]]:.2f}× user CPU per request (target ≤ 1.5).")


def observability_section(tmp: Path, up_port: int, args, procs) -> tuple[str, str, str]:
    """The gateway job (1,000 keys, a rate limit, a header) with analytics and access logging off,
    then on: a JSON access log line per request, the usage ledger (admin listener, SQLite store),
    the control process's 10 s snapshots and a metrics listener. (The per-route counters in shared
    memory are always on: they are the metrics' source.)"""
    import hashlib

    script = tmp / "obs-keys.lua"
    script.write_text(f"counter = 0\nrequest = function()\n  counter = counter + 1\n"
                      f"  wrk.headers[\"apikey\"] = \"key\" .. (counter % {KEYS})\n"
                      f"  return wrk.format(nil, \"/\")\nend\n")
    consumers = "".join(f"  - {{username: c{i}, keys: [\"sha256:{hashlib.sha256(b'key%d' % i).hexdigest()}\"]}}\n"
                        for i in range(KEYS))
    base = (f"upstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
            f"consumers:\n{consumers}"
            "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: [{type: key-auth}, "
            f"{{type: rate-limit, rate: {RATE}, per: 1, burst: 1000, key: consumer}}, "
            "{type: response-headers, add: {X-Gateway: bench}}]}\n"
            "limits: {keepalive_requests: 100000}\n")
    off_port, on_port = free_port(), free_port()
    off = start_fastgate(tmp, off_port, base + "listeners:\n  - {kind: proxy, port: 8000}\n", args.subject_cpu)
    procs.append(off)
    on_text = (base + f"access_log: {tmp / 'access.log'}\nstore: {{path: {tmp / 'obs.db'}}}\n"
               "admin: {token: bench-admin-token-0123456789}\n"
               f"listeners:\n  - {{kind: proxy, port: 8000}}\n  - {{kind: metrics, port: {free_port()}}}\n"
               f"  - {{kind: admin, port: {free_port()}}}\n")
    on = start_fastgate(tmp, on_port, on_text, args.subject_cpu)
    procs.append(on)

    def workers(p):
        # the proxy worker(s) and the control process: every CPU the subject spends
        return children(p.pid)

    subjects = [Subject("fastgate gateway job, analytics and access log off", off_port, off, lambda: workers(off)),
                Subject("fastgate gateway job, analytics and access log on", on_port, on, lambda: workers(on))]
    results = interleave(subjects, args, script)
    rps = {k: med(v, "rps") for k, v in results.items()}
    names = list(rps)
    lines = sum(1 for _ in open(tmp / "access.log", "rb"))
    return ("Analytics and access log cost (the gateway job)", table(results, names[0]),
            f"on vs off: {rps[names[1]] / rps[names[0]]:.3f}× requests/s (target ≥ 0.95, i.e. ≤ 5% cost); "
            f"{lines:,} access-log lines written.")


def jwt_section(tmp: Path, up_port: int, args, procs) -> tuple[str, str, str]:
    """JWT RS256 verification with the verified-token cache, beside nginx's plain proxy."""
    import time as _time

    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    tokens = [pyjwt.encode({"sub": f"u{i}", "exp": int(_time.time()) + 3600}, key, algorithm="RS256")
              for i in range(100)]
    script = tmp / "jwt.lua"
    script.write_text("tokens = {" + ",".join(f'"{t}"' for t in tokens) + "}\ncounter = 0\n"
                      "request = function()\n  counter = counter + 1\n"
                      "  wrk.headers[\"Authorization\"] = \"Bearer \" .. tokens[(counter % 100) + 1]\n"
                      "  return wrk.format(nil, \"/\")\nend\n")
    ng_port, fg_port = free_port(), free_port()
    ng = start_nginx(tmp, ng_port, args.subject_cpu, upstream_port=up_port)
    procs.append(ng)
    pem_yaml = pem.replace("\n", "\\n")
    text = (f"limits: {{keepalive_requests: 100000}}\n"
            f"upstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
            "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: [{type: jwt, keys: "
            f"[{{algorithm: RS256, key: \"{pem_yaml}\"}}]}}]}}\n")
    fg = start_fastgate(tmp, fg_port, text, args.subject_cpu)
    procs.append(fg)
    subjects = [Subject("nginx proxy (no auth)", ng_port, ng, lambda: children(ng.pid)),
                Subject("fastgate: JWT RS256 (100 tokens, verified-token cache)", fg_port, fg,
                        lambda: children(fg.pid))]
    results = interleave(subjects, args, script)
    rps = {k: med(v, "rps") for k, v in results.items()}
    names = list(rps)
    return ("JWT RS256 with the verified-token cache", table(results, names[0]),
            f"fastgate vs nginx's plain proxy: {rps[names[1]] / rps[names[0]]:.3f}× requests/s (target ≥ 0.85).")


def memory_section(tmp: Path, up_port: int, args, procs) -> tuple[str, str, str]:
    """RSS of one worker with 10,000 routes: at start, after `args.million` requests spread over every
    route, and with `args.idle_clients` idle keep-alive clients held open."""
    port = free_port()
    fg = start_fastgate(tmp, port, route_config(10000, up_port), args.subject_cpu)
    procs.append(fg)
    worker = children(fg.pid)[0]
    start = rss_kb(worker)
    script = spread_script(tmp, 10000)
    done = 0
    while done < args.million:
        left = args.million - done
        secs = max(2, min(30, int(left / 40000) + 1))
        r = wrk(port, secs, args.connections, args.load_cpu, script)
        done += r["requests"]
    after = rss_kb(worker)
    holder = subprocess.Popen([sys.executable, str(HERE / "idle_clients.py"), str(port), str(args.idle_clients), "20"],
                              stdout=subprocess.PIPE, text=True)
    held = int(holder.stdout.readline().strip() or 0)
    time.sleep(1.0)
    with_idle = rss_kb(worker)
    holder.terminate()
    holder.wait(30)
    rows = ["| measurement | worker RSS MB |", "|---|---|",
            f"| at start, 10,000 routes | {start / 1024:.1f} |",
            f"| after {done:,} requests spread over the 10,000 routes | {after / 1024:.1f} |",
            f"| with {held:,} idle keep-alive clients held | {with_idle / 1024:.1f} "
            f"(+{(with_idle - after) / 1024:.1f}) |"]
    return ("Memory (one worker)", "\n".join(rows),
            "Targets: RSS ≤ 60 MB after a million requests; 10,000 idle clients ≤ 100 MB more.")


def write_results(path: Path, command: str, args, sections) -> None:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx_v = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    out = [f"## {time.strftime('%Y-%m-%d')} — `{command}`", "",
           f"Machine: {os.cpu_count()} CPUs ({cpu}); {nginx_v}; wrk -t1 -c{args.connections}, "
           f"{args.rounds} interleaved rounds of {args.duration:g} s, medians. Subject pinned to CPU "
           f"{args.subject_cpu}, wrk and the upstream nginx to CPU {args.load_cpu}.", ""]
    for title, tbl, note in sections:
        out += [f"### {title}", "", tbl, "", note, ""]
    block = "\n".join(out)
    header = "# Bench results\n\nNewest first. Each block says the command that produced it.\n\n"
    old = path.read_text().split("\n", 4)[-1] if path.exists() and path.read_text().startswith("# Bench") else ""
    path.write_text(header + block + "\n" + old)
    print(block)


if __name__ == "__main__":
    sys.exit(main())
