"""Checkpoints and resume: ``checkpoints/epoch-N`` written atomically after each epoch.

A checkpoint holds what Accelerate saves (model, optimizer, scheduler, sampler and RNG state of
every process), each process's secret DP generators (local only, never published), and
``trainer_state.json``: the epoch, the metrics history, the kept epoch (its weights beside it in
``selection.safetensors``, :mod:`hubtune.selection`), a digest of the recipe (only
``train.epochs`` may change on resume) and, under DP, the budget the run has spent and the plan
it ran under, so a resume plans the rest of the budget from what was spent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hubtune.errors import RunError
from hubtune.io import atomic_write_json
from hubtune.privacy.accounting import SpentBudget
from hubtune.privacy.engine import PrivacyRun
from hubtune.recipe import Recipe
from hubtune.rundir import RUN_FILE
from hubtune.selection import Selection

__all__ = [
    "check_run_dir",
    "checkpoint_state",
    "latest_checkpoint",
    "load_dp_rng",
    "recipe_digest",
    "save_checkpoint",
]

# Test hook: called on the main process after each epoch's checkpoint (simulates a crash).
after_checkpoint: Callable[[int], None] | None = None


def recipe_digest(recipe: Recipe) -> str:
    # train.epochs may grow on resume; everything else must match the checkpoint.
    payload = recipe.model_dump(mode="json")
    payload["train"].pop("epochs")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    done = (
        [p for p in folder.glob("epoch-*") if (p / "trainer_state.json").exists()]
        if folder.exists()
        else []
    )
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        return
    if resume or not run_dir.exists():
        return
    if (run_dir / RUN_FILE).exists():
        raise RunError(
            f"{run_dir} already holds a finished run. Use --overwrite to replace it, or change `name`."
        )
    if latest_checkpoint(run_dir) is not None:
        raise RunError(
            f"{run_dir} holds an interrupted run. Use --resume to continue it, or --overwrite to start over."
        )


def checkpoint_state(checkpoint: Path, recipe: Recipe) -> tuple[dict[str, Any], SpentBudget | None]:
    """The checkpoint's trainer state and, under DP, the budget it spent; checked against the recipe.

    Read before anything is planned: a resumed DP run plans its remaining noise from what the
    checkpoint spent, never from the plan of the first run.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["recipe_digest"] != recipe_digest(recipe):
        raise RunError(
            f"--resume: the recipe differs from the one {checkpoint} was trained with (only train.epochs may "
            "change). Resume with the same recipe, or use --overwrite to start over."
        )
    if not recipe.dp:
        return state, None
    if "dp" not in state:
        raise RunError(
            f"--resume: {checkpoint} was written by an older hubtune that did not record the DP budget it "
            "spent, so the rest of the budget cannot be planned safely. Use --overwrite to train again."
        )
    return state, SpentBudget.from_json(state["dp"])


def load_dp_rng(run: PrivacyRun, checkpoint: Path, rank: int) -> None:
    path = checkpoint / f"dp_rng_{rank}.pt"
    if run.generator_state is not None and path.exists():
        run.generator_state.load_state_dict(torch.load(path, weights_only=True))


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    epoch: int,
    history: list[dict[str, Any]],
    recipe: Recipe,
    dp_run: PrivacyRun | None = None,
    selection: Selection | None = None,
) -> None:
    """Write checkpoints/epoch-N atomically: complete with trainer_state.json, or not at all."""
    folder = run_dir / "checkpoints"
    tmp = folder / f".epoch-{epoch + 1}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if dp_run is not None and dp_run.generator_state is not None:
        # Each process's secret sampling/noise generator: local resumability, never published.
        torch.save(
            dp_run.generator_state.state_dict(), tmp / f"dp_rng_{accelerator.process_index}.pt"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state: dict[str, Any] = {
            "epoch": epoch,
            "history": history,
            "recipe_digest": recipe_digest(recipe),
        }
        if selection is not None and selection.epoch is not None:  # the kept epoch's weights
            state["selection"] = selection.save(tmp)
        if dp_run is not None:  # a resume plans the rest of the budget from what was spent
            state["dp"] = dp_run.spent_budget().to_json()
        atomic_write_json(tmp / "trainer_state.json", state)
        final = folder / f"epoch-{epoch + 1}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in folder.glob("epoch-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        if after_checkpoint is not None:
            after_checkpoint(epoch)
    accelerator.wait_for_everyone()
