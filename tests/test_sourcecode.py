"""The build and the source tree: compiled modules really are compiled, and ruff is clean."""
from __future__ import annotations

import importlib
import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastgate._core

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", fastgate._core.MODULES)
def test_core_module_is_an_extension(name):
    mod = importlib.import_module(f"fastgate._core.{name}")
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__


@pytest.mark.parametrize("name", fastgate._core.MODULES)
def test_core_module_has_stub(name):
    assert (ROOT / "src/fastgate/_core" / f"{name}.pyi").is_file()


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is missing: pip install -e '.[test]'")
    r = subprocess.run([ruff, "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
