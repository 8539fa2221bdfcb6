"""The non-private epoch and evaluation, through Accelerate-prepared loaders.

The DP epoch lives beside the privacy engine (:mod:`hubtune.privacy.loop`): every line of it
is part of what the guarantee depends on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from hubtune.errors import RunError
from hubtune.progress import OnStep, StepInfo, progress

__all__ = ["plain_epoch", "predict"]


def plain_epoch(
    *,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    forward: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epoch: int,
    epochs: int,
    step: int,
    max_grad_norm: float | None,
    on_step: OnStep | None = None,
) -> tuple[float, int, int]:
    """One non-private epoch: returns (summed loss, examples seen, optimizer steps so far)."""
    loader.set_epoch(epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    running, seen = 0.0, 0
    bar = progress(loader, accelerator, f"epoch {epoch + 1}/{epochs}")
    for batch in bar:
        batch.pop("idx")
        labels = batch.pop("labels")
        logits = forward(model, batch)
        loss = loss_fn(logits, labels)
        if not torch.isfinite(loss):
            raise RunError(
                f"non-finite loss at epoch {epoch + 1}, step {step}; stopped. The last good checkpoint is kept "
                "(lower train.lr, or check the data)."
            )
        accelerator.backward(loss)
        if max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item() * len(labels)
        seen += len(labels)
        step += 1
        if on_step is not None:
            on_step(
                StepInfo(epoch=epoch, step=step, examples=len(labels), time=time.perf_counter())
            )
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
    return running, seen, step


@torch.no_grad()
def predict(
    accelerator: Any, model: Any, loader: DataLoader, forward: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for a whole split, gathered from every process, in row order."""
    model.eval()
    all_logits, all_labels, all_idx = [], [], []
    for batch in loader:
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        logits = forward(model, batch)
        logits, labels, idx = accelerator.gather_for_metrics((logits.float(), labels, idx))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
    order = torch.cat(all_idx).argsort()
    return torch.cat(all_logits)[order], torch.cat(all_labels)[order]
