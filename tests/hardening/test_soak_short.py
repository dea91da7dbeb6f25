"""A 30-second version of bench/soak.py: mixed traffic with errors, timeouts and resets against
`fastgate run --workers 2`; the workers' memory plateaus and their fds return to the baseline.
No timing or throughput assertions (the machine may be shared)."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("fastgate_bench_soak", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_soak_30_seconds_plateaus_and_releases_fds():
    soak = load_soak()
    result = asyncio.run(soak.soak(minutes=0.5, concurrency=12, interval=2.0, log=lambda *_: None))
    summary = {k: v for k, v in result.items() if k != "samples"}
    assert result["requests"] > 0, summary
    assert set(result["outcomes"]) >= {"200", "404", "502", "504"}, summary  # the mix really happened
    # plateau: < 10% RSS growth after warm-up (a fixed 30 s run: warm-up is the first 10 s)
    assert result["plateau"], summary
    assert result["fds_back_to_baseline"], summary
