"""Which epoch's weights a run keeps: the best on the validation split, or the last.

``train.select_epoch: best`` (the default) keeps the trained tensors of the epoch with the best
``train.select_metric`` on the validation split (the earliest such epoch on a tie); ``last`` keeps
the final epoch's. The kept weights are the ones tested, audited, saved and pushed, and
``metrics.json``/``run.json`` say which epoch they are (``selected_epoch``).

What is copied: every trained parameter and every buffer of the model (BatchNorm statistics move
in training too), to CPU, only when an epoch improves on the best so far. A checkpoint carries the
copy (``selection.safetensors``), so a resumed run keeps the same epoch, bit for bit.

Under DP the selection is post-processing of the trained iterates using the validation split, which
is not training data: the ε of the whole run (every step taken) covers the kept weights, and the
validation rows are not covered by DP (as for the baselines; stated in the card and public report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SELECTION_FILE", "Selection", "describe", "trained_tensors"]

logger = logging.getLogger("hubtune")

SELECTION_FILE = "selection.safetensors"  # inside a checkpoint folder


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training can change: trainable parameters and every floating-point buffer."""
    found: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    found.update(
        {n: b for n, b in model.named_buffers() if b is not None and b.is_floating_point()}
    )
    return found


@dataclass
class Selection:
    """The kept epoch (1-based), its validation figure and a CPU copy of its trained tensors."""

    rule: str  # "best" | "last"
    metric: str  # "accuracy" | "macro_f1" | "loss"
    epoch: int | None = None
    value: float | None = None
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # the kept L-BFGS fit's weight decay

    EXTRA = ("solver", "weight_decay")

    @property
    def key(self) -> str:
        return f"val_{self.metric}"

    def improves(self, value: float) -> bool:
        if self.rule == "last" or self.value is None:
            return True
        return value < self.value if self.metric == "loss" else value > self.value

    def observe(self, model: torch.nn.Module, record: dict[str, Any]) -> bool:
        """Consider the epoch just validated (``record`` from the history); True if it is kept."""
        value = float(record[self.key])
        if not self.improves(value):
            return False
        self.epoch, self.value = int(record["epoch"]), value
        self.extra = {k: record[k] for k in self.EXTRA if k in record}
        if self.rule == "best":
            self.keep_current(model)
        return True

    def keep_current(self, model: torch.nn.Module) -> None:
        """Copy the model's trained tensors as the kept epoch's."""
        self.tensors = {
            n: t.detach().to("cpu", copy=True).contiguous()
            for n, t in trained_tensors(model).items()
        }

    def restore(self, model: torch.nn.Module) -> None:
        """Put the kept epoch's tensors back into ``model`` (a no-op for ``last``)."""
        if self.tensors is None:
            return
        current = trained_tensors(model)
        missing = sorted(set(self.tensors) - set(current))
        if missing:  # a bug, never a user error: the model changed shape during training
            raise RuntimeError(f"selected epoch: tensors not in the model: {missing[:3]}")
        with torch.no_grad():
            for name, saved in self.tensors.items():
                current[name].copy_(saved.to(current[name].device))

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rule": self.rule,
            "metric": self.key,
            "value": self.value,
            **self.extra,
        }

    # -- checkpoints

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the kept tensors into a checkpoint folder; returns trainer_state's record."""
        from safetensors.torch import save_file

        if self.tensors is not None:
            save_file(self.tensors, str(folder / SELECTION_FILE))
        return self.to_json()

    def load(self, folder: Path, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`save` wrote (a checkpoint without it keeps nothing from before)."""
        from safetensors.torch import load_file

        if not state or state.get("rule") != self.rule or state.get("metric") != self.key:
            logger.warning(
                "--resume: %s holds no epoch selection for %s/%s; choosing among the epochs from here on",
                folder,
                self.rule,
                self.key,
            )
            return
        self.epoch, self.value = state["epoch"], state["value"]
        self.extra = {k: state[k] for k in self.EXTRA if k in state}
        path = folder / SELECTION_FILE
        if self.rule == "best":
            self.tensors = load_file(str(path))


def describe(selected: dict[str, Any]) -> str:
    """One line on the kept weights, e.g. 'epoch 3 of 20 (best validation accuracy 0.7123)'."""
    metric = str(selected["metric"]).removeprefix("val_").replace("_", "-")
    if selected.get("solver") == "lbfgs":
        of = f" of {selected['of']} tried" if selected.get("of") else ""
        return (
            f"head fitted to convergence (L-BFGS), weight decay {selected['weight_decay']:g} "
            f"(best validation {metric} {selected['value']:.4f}{of})"
        )
    how = "best" if selected["rule"] == "best" else "last epoch;"
    of = f" of {selected['of']}" if selected.get("of") else ""
    return f"epoch {selected['epoch']}{of} ({how} validation {metric} {selected['value']:.4f})"
