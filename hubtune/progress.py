"""Progress: bars on the local main process (off with ``HUBTUNE_PROGRESS=0``), and step reports.

:class:`StepInfo` is what both training loops hand to ``train(on_step=...)`` after each
optimizer step: the public hook benchmarks time steps with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OnStep", "StepInfo", "progress"]


@dataclass(frozen=True)
class StepInfo:
    """What a training loop reports after each optimizer step."""

    epoch: int  # 0-based
    step: int  # optimizer steps so far in the run
    examples: int  # examples in this step (under DP: the Poisson batch, on this process)
    time: float  # time.perf_counter() when the step ended


OnStep = Callable[[StepInfo], None]


def progress(iterable: Any, accelerator: Any, desc: str) -> Any:
    """``iterable`` wrapped in a tqdm bar (a no-op bar when quiet or not the local main process)."""
    from tqdm.auto import tqdm

    quiet = os.environ.get("HUBTUNE_PROGRESS", "1").lower() in ("0", "false", "no", "off")
    return tqdm(
        iterable, desc=desc, leave=False, disable=quiet or not accelerator.is_local_main_process
    )
