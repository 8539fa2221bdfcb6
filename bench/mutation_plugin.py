"""pytest plugin for bench/mutation.py's mutmut runs (loaded with ``-p mutation_plugin``).

- Refuses to run unless ``hubtune`` is imported from the mutated copy (the folder pytest runs
  in, ``mutants/``): an editable install or a ``PYTHONPATH`` pointing at the checkout would
  otherwise test the original code and report every mutant as surviving.
- Orders the selected tests fastest first, by the durations mutmut measured in its clean
  run, so that a mutant that some cheap test catches is killed (``-x``) before the slow ones run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    import hubtune

    here = Path.cwd().resolve()
    where = Path(hubtune.__file__).resolve()
    if here not in where.parents:
        raise pytest.UsageError(
            f"mutation run: hubtune is imported from {where}, not from the mutated copy in {here}"
        )


def pytest_collection_modifyitems(items: list[Any]) -> None:
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
