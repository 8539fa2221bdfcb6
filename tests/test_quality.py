"""House rules that CI enforces: ruff (lint + format) and mypy with the pydantic plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PATHS = ["hubtune", "tests", "bench"]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint() -> None:
    out = _tool("ruff", "check", *PATHS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = _tool("ruff", "format", "--check", *PATHS)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy() -> None:
    out = _tool("mypy", "hubtune")
    assert out.returncode == 0, out.stdout + out.stderr
