"""`fastgate tune` end to end: real gateway processes, real wrk, real matplotlib. No timings asserted."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, need_binary

MOCK_CONFIG = """
upstreams:
  - {name: down, targets: [{address: "127.0.0.1:9"}]}
routes:
  - {name: proxied, paths: [/api/ping], upstream: down}
  - {name: hello, paths: [/hello], methods: [GET], mock: {json: {ok: true}}}
"""

BAD_CONFIG = """
workers: zero
routes:
  - {name: a, paths: [nope], upstream: missing}
"""


def tune(args: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgate", "tune", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_short_run_table_recommendation_plot_and_json(tmp_path: Path):
    need_binary("wrk", "wrk")
    if importlib.util.find_spec("matplotlib") is None:
        msg = "matplotlib is missing: install it with `pip install 'fastgate[tune]'`"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(MOCK_CONFIG)
    png = tmp_path / "tune.png"
    res = tune(["-c", str(cfg), "--max-workers", "2", "--duration", "1", "--connections", "16",
                "--output", str(png), "--json"], timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    report = res.stderr  # with --json the human report goes to stderr

    # the host facts and the load
    assert "usable CPUs:" in report and "ulimit -n:" in report and "somaxconn:" in report
    assert "listen backlog:" in report
    # the proxied route's upstream is down, so the mock route is loaded instead (and that is said)
    assert "/hello" in report and "not answering" in report
    # the table, the recommendation with its reason
    assert "req/s" in report and "p99 ms" in report and "CPU µs/req" in report and "efficiency" in report
    assert "recommended: --workers" in report and "why:" in report

    data = json.loads(res.stdout)
    assert data["path"] == "/hello"
    assert [r["workers"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["rps"] > 0 and row["requests"] > 0
        assert row["non2xx"] == 0 and row["first_status"] == 200
        assert row["p99_ms"] is not None and row["p99_ms"] > 0
        assert row["cpu_us_per_req"] is None or row["cpu_us_per_req"] >= 0
    assert data["rows"][0]["efficiency"] == pytest.approx(1.0)
    assert data["recommended_workers"] in (1, 2)
    assert f"recommended: --workers {data['recommended_workers']}" in report
    assert data["reason"]
    assert data["host"]["usable_cpus"] >= 1 and data["host"]["nofile_soft"] > 0

    assert data["plot"] == str(png)
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(blob) > 5000


def test_missing_wrk_exits_2_with_the_install_hint(tmp_path: Path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(MOCK_CONFIG)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "wrk"))]
    env = dict(os.environ, PATH=os.pathsep.join(path))
    res = tune(["-c", str(cfg), "--max-workers", "1", "--duration", "1", "--output", str(tmp_path / "x.png")], env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "wrk not found: install it with `apt-get install wrk`" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_invalid_config_exits_1_listing_every_error(tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD_CONFIG)
    res = tune(["-c", str(cfg), "--output", str(tmp_path / "x.png")])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "error(s)" in res.stderr
    for where in ("$.workers", "$.routes[0]"):
        assert where in res.stderr
    check = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 1 and check.stderr == res.stderr  # the same loader, the same report
