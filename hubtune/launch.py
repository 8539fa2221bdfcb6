"""Several CPU processes under ``accelerate launch --num_processes N --cpu``.

Accelerate's launcher runs a ``--cpu`` job as ONE process whatever ``--num_processes`` says
(multi-CPU needs mpirun there), and the job cannot tell. hubtune notices this from the
launcher's command line (or its config file) and starts the N processes itself with
``torch.distributed.run`` on the gloo backend, so the command users type does what it says.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["requested_cpu_processes", "relaunch_on_cpu", "resolve_mixed_precision", "use_cpu"]

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def use_cpu() -> bool:
    """Whether this process was asked to run on the CPU (by accelerate launch --cpu or no GPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _config_processes(path: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    value = config.get("num_processes")
    return int(value) if isinstance(value, int) else None


def requested_cpu_processes() -> int:
    """How many processes ``accelerate launch --cpu`` was asked for, when it ran only one (else 1)."""
    if not use_cpu() or "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return 1
    try:
        import psutil

        argv = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, or the parent is gone: nothing to detect
        return 1
    if not any("accelerate" in Path(arg).name for arg in argv[:3]) or "launch" not in argv[:4]:
        return 1
    value = _flag(argv, "--num_processes")
    if value is not None:
        return max(1, int(value))
    config = _flag(argv, "--config_file")
    default = (
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        / "accelerate"
        / "default_config.yaml"
    )
    path = Path(config) if config else default
    return (_config_processes(path) or 1) if path.exists() else 1


def relaunch_on_cpu(num_processes: int, argv: list[str]) -> int:
    """Run ``python -m hubtune ARGV`` as ``num_processes`` gloo processes; returns the exit code."""
    logger.info(
        "accelerate launch --cpu runs one process; starting %d CPU processes (gloo) instead",
        num_processes,
    )
    env = dict(os.environ)
    env["ACCELERATE_USE_CPU"] = "true"
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        "-m",
        "hubtune",
        *argv,
    ]
    return subprocess.call(command, env=env)


def resolve_mixed_precision(recipe_value: str | None, *, dp: bool) -> str:
    """The precision a run uses: the recipe's, else the launcher's, else "no".

    ``accelerate launch --mixed_precision X`` tells the job through ``ACCELERATE_MIXED_PRECISION``.
    The launcher writes "no" also when nothing was asked, so only a launcher value other than
    "no" counts as a choice; a recipe that sets a different one is a conflict, not a silent
    override.

    Raises:
        ValueError: the recipe and the launcher disagree, or fp16 was asked for under DP.
    """
    launcher = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "").lower() or None
    if launcher == "no":
        launcher = None
    if recipe_value is not None and launcher is not None and recipe_value != launcher:
        raise ValueError(
            f"train.mixed_precision is {recipe_value!r} in the recipe but the launcher asked for "
            f"{launcher!r} (accelerate launch --mixed_precision / ACCELERATE_MIXED_PRECISION). Remove one, "
            "or make them agree."
        )
    chosen = recipe_value or launcher or "no"
    if dp and chosen == "fp16":
        raise ValueError(
            "privacy with fp16 (from accelerate launch --mixed_precision fp16) is refused: the fp16 "
            "GradScaler rescales and skips steps behind the DP optimizer's back. Use bf16 or no."
        )
    return chosen
