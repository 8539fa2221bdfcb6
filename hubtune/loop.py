"""The non-private epoch and evaluation, through Accelerate-prepared loaders.

The DP epoch lives beside the privacy engine (:mod:`hubtune.privacy.loop`): every line of it
is part of what the guarantee depends on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from hubtune.errors import RunError
from hubtune.progress import OnStep, StepInfo, progress

__all__ = ["LengthGroupedBatches", "plain_epoch", "predict"]

GROUP = 50  # batches per length-sorted group


class LengthGroupedBatches(Sampler[list[int]]):
    """Training batches of similar lengths (``train.group_by_length``), less padding per step.

    Each epoch: a seeded permutation of the rows, cut into groups of ``GROUP`` batches; each
    group sorted by token count and cut into batches; then the batches shuffled. The order is a
    function of (seed, epoch) only, so a resumed run sees the batches an uninterrupted one would.
    Every batch but the last is full, as with an ordinary shuffled loader.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.sampler = self  # Accelerate hands set_epoch to a wrapped batch sampler's ``sampler``

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size, span = self.batch_size, self.batch_size * GROUP
        batches = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        last = len(batches) - 1  # the one short batch (if any) stays last, like drop_last=False
        shuffled = torch.randperm(last, generator=generator).tolist()
        yield from (batches[i] for i in [*shuffled, last])


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
    accelerator: Any,
    model: Any,
    loader: DataLoader,
    forward: Callable[..., torch.Tensor],
    *,
    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for a whole split, gathered from every process, in row order.

    With ``reduce`` (the task's), each batch's logits and labels are first reduced to
    per-example figures (a language model's logits are too large to keep for a split).
    """
    model.eval()
    all_logits, all_labels, all_idx = [], [], []
    for batch in loader:
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        logits = forward(model, batch)
        if reduce is not None:
            logits, labels = reduce(logits, labels)
        logits, labels, idx = accelerator.gather_for_metrics((logits.float(), labels, idx))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
    order = torch.cat(all_idx).argsort()
    return torch.cat(all_logits)[order], torch.cat(all_labels)[order]
