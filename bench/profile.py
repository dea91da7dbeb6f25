"""Instructions per proxied request, and where they go: one worker under callgrind.

Wall-clock figures on a shared 2-core VM move by several percent between runs; the number of
instructions a request costs does not (±2%). This runs one fastgate worker in this process's child
(no supervisor fork, so callgrind can be driven), or bench/lean_proxy.py, under
`valgrind --tool=callgrind`; warms it up with wrk, zeroes the counters, sends `--seconds` of wrk
load (-t1 -c16), dumps, and prints the instructions per request and the functions that cost most
(their own instructions, not their callees').

    .venv/bin/python bench/profile.py [--scenario NAME] [--seconds 10] [--top 25]

Scenarios (SCENARIOS below; `--help` lists them): proxy, gateway, observability, ratelimit,
lease, exact — the configurations of compare.py's plain route, gateway job (analytics off, on) and
rate-limit subjects, without the metrics listener — and lean, the uvloop + httptools yardstick.
lease and exact start a redis-server of their own. Needs valgrind (`apt-get install valgrind`)
and wrk. Figures in bench/RESULTS.md's profile notes came from this.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare as C  # noqa: E402

KEYS = 1000


def gateway_config(up_port: int, extra: str = "") -> str:
    consumers = "".join(f"  - {{username: c{i}, keys: [\"sha256:{hashlib.sha256(b'key%d' % i).hexdigest()}\"]}}\n"
                        for i in range(KEYS))
    return (f"limits: {{keepalive_requests: 100000}}\n"
            f"upstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
            f"consumers:\n{consumers}"
            "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: [{type: key-auth}, "
            f"{{type: rate-limit, rate: {C.RATE}, per: 1, burst: 1000, key: consumer}}, "
            "{type: response-headers, add: {X-Gateway: bench}}]}\n" + extra)


def ratelimit_config(up_port: int, redis: str = "") -> str:
    """compare.py's rate-limiting subjects: one route, a limit keyed by client IP that refuses
    nothing, on the local counters or (with a Redis URL) in lease or exact mode."""
    counters, backend = "", ""
    if redis:
        url, mode = redis.rsplit(" ", 1)
        counters = f"counters: {{redis: {{url: \"{url}\", mode: {mode}, lease_size: {C.LEASE_SIZE}}}}}\n"
        backend = ", backend: redis"
    return (f"limits: {{keepalive_requests: 100000}}\n{counters}"
            f"upstreams:\n  - {{name: u, targets: [{{address: \"127.0.0.1:{up_port}\"}}]}}\n"
            "routes:\n  - {name: r, paths: [\"/*\"], upstream: u, policies: "
            f"[{{type: rate-limit, rate: {C.RATE}, per: 1, burst: 1000, key: ip{backend}}}]}}\n")


SCENARIOS = {
    "proxy": "one plain proxied route (compare.py's plain proxied route)",
    "gateway": "key-auth over 1,000 keys, a local rate limit, an added response header (the gateway job)",
    "observability": "the gateway job with the access log on (compare.py's 'on' without the admin listener, so "
                     "without the usage ledger: under valgrind its once-a-second write would fall on 30x fewer "
                     "requests than in the bench)",
    "ratelimit": "one route with a rate limit by client IP on the local counters",
    "lease": "the same limit on Redis in lease mode (a redis-server of its own)",
    "exact": "the same limit on Redis in exact mode",
    "lean": "the uvloop + httptools yardstick (bench/lean_proxy.py)",
}


def config_text(scenario: str, up: int, tmp: Path, redis_port: int) -> str:
    if scenario == "proxy":
        return C.route_config(1, up)
    if scenario == "gateway":
        return gateway_config(up)
    if scenario == "observability":
        return gateway_config(up, f"access_log: {tmp / 'access.log'}\nstore: {{path: {tmp / 'obs.db'}}}\n")
    if scenario == "ratelimit":
        return ratelimit_config(up)
    return ratelimit_config(up, f"redis://127.0.0.1:{redis_port}/0 {scenario}")


def run_worker(config: str, listen: str) -> None:
    """The child: one worker serving `config` on `listen`, with the supervisor's shared tables."""
    from fastgate.cli import _override_listen
    from fastgate.config import load_file
    from fastgate.server.worker import run_worker as serve
    from fastgate.supervisor import HostMetrics, SharedTable, bind_listener

    cfg = _override_listen(load_file(config), listen)
    socks = [(bind_listener(li.address, li.port, li.backlog), li) for li in cfg.listeners
             if li.kind in ("proxy", "metrics")]
    serve(cfg, socks, table=SharedTable(cfg.counters.capacity), metrics_table=HostMetrics(cfg))


def self_costs(path: Path) -> collections.Counter:
    """Each function's own instructions in a callgrind output file (name compression aware)."""
    names: dict[str, str] = {}
    costs: collections.Counter = collections.Counter()
    fn, in_call = None, False

    def name(ref: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", ref)
        if not m:
            return ref
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), ref)

    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                fn = name(line[3:].strip())
            elif line.startswith(("cfn=", "cfi=", "cfl=")):
                if line.startswith("cfn="):
                    name(line[4:].strip())
            elif line.startswith("calls="):
                in_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2 and not in_call and fn is not None:
                    costs[fn] += int(parts[1])
                in_call = False
    return costs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=list(SCENARIOS), default="proxy",
                    help="; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "LISTEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(*args.worker)
        return 0
    missing = [t for t in ("valgrind", "callgrind_control", "wrk") if shutil.which(t) is None]
    if missing:
        print(f"profile needs {', '.join(missing)}: apt-get install valgrind wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="fastgate-profile-"))
    up, port = C.free_port(), C.free_port()
    upstream = C.start_nginx(tmp, up, "1")
    script, redis = None, None
    if args.scenario == "lean":
        cmd = [str(HERE / "lean_proxy.py"), str(port), str(up)]
    else:
        if args.scenario in ("lease", "exact"):
            redis, redis_port = C.start_redis(tmp)
        cfg = tmp / "fastgate.yaml"
        cfg.write_text(config_text(args.scenario, up, tmp, redis_port if redis else 0))
        cmd = [str(Path(__file__).resolve()), "--worker", str(cfg), f"127.0.0.1:{port}"]
        if args.scenario in ("gateway", "observability"):
            script = tmp / "keys.lua"
            script.write_text(f"counter = 0\nrequest = function()\n  counter = counter + 1\n"
                              f"  wrk.headers[\"apikey\"] = \"key\" .. (counter % {KEYS})\n"
                              f"  return wrk.format(nil, \"/\")\nend\n")
    out = tmp / "callgrind.out"
    env = dict(os.environ, FASTGATE_LOG_LEVEL="warning")
    subject = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *cmd],
                               env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "valgrind.log", "w"))
    try:
        C.wait_port(port, 300)
        time.sleep(3)
        C.wrk(port, 3, 16, "1", script)  # warm-up: imports, first connections, caches
        subprocess.run(["callgrind_control", "--zero", str(subject.pid)], capture_output=True, check=True)
        r = C.wrk(port, args.seconds, 16, "1", script)
        subprocess.run(["callgrind_control", "--dump", str(subject.pid)], capture_output=True, check=True)
        deadline = time.monotonic() + 30
        while not (dump := tmp / "callgrind.out.1").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        subject.send_signal(signal.SIGTERM)
        upstream.send_signal(signal.SIGTERM)
        try:
            subject.wait(60)
        except subprocess.TimeoutExpired:
            subject.kill()
        upstream.wait(10)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    n = max(1, r["requests"])
    costs = self_costs(dump)
    m = re.search(r"^(?:summary|totals):\s+(\d+)", dump.read_text(), re.M)
    total = int(m.group(1)) if m else sum(costs.values())
    print(f"{args.scenario}: {r['requests']:,} requests ({r['non2xx']} not 2xx/3xx), "
          f"{total // n:,} instructions per request")
    for fn, c in costs.most_common(args.top):
        print(f"{c // n:8,}  {fn[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
