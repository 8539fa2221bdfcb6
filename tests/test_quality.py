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


def test_every_hubtune_import_resolves() -> None:
    """Each ``from hubtune.x import y`` (in function bodies too) names something that exists.

    mypy cannot see these where a package's ``__getattr__`` answers lazily, and a function-level
    import only fails when that code path runs: a renamed helper broke the GroupNorm reload
    this way, caught only by a slow test.
    """
    import ast
    import importlib

    missing = []
    for folder in ("hubtune", "tests", "bench", "space", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                    continue
                if node.module.split(".")[0] != "hubtune":
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if alias.name == "*" or hasattr(module, alias.name):
                        continue
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        rel = path.relative_to(ROOT)
                        missing.append(f"{rel}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
