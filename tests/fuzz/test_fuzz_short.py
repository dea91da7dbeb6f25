"""A short, bounded atheris run of tests/fuzz/fuzz_core.py (the long run is in README "## Hardening")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_core.py")
SECONDS = int(os.environ.get("FASTGATE_FUZZ_SECONDS", "10"))


def test_atheris_short_run(tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        msg = "atheris is missing: .venv/bin/pip install atheris (it is in the test extra)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run([sys.executable, str(HARNESS), f"-max_total_time={SECONDS}", "-rss_limit_mb=1024",
                           "-seed=1", "-print_final_stats=1", str(corpus)],
                          capture_output=True, text=True, timeout=SECONDS + 60, cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "stat::number_of_executed_units" in tail, tail
    assert not list(tmp_path.glob("crash-*")), tail
