"""Fit a new head to convergence on cached features (``method.head_fit: lbfgs``).

With a frozen backbone the head's input is a fixed feature vector per example, and training a
linear head is a convex problem: minimise the mean cross-entropy plus (λ/2)·‖W‖². A few hundred
full-batch L-BFGS iterations solve it to convergence in seconds, where twenty epochs of mini-batch
AdamW at a fixed learning rate stop short (on the quickstart the epoch-trained head under-fits).

λ (``weight decay``: the penalty on weight matrices, never on biases) is chosen on the validation
split from :data:`WEIGHT_DECAYS`, each fitted from the same initial head. Every candidate is one
entry of the run's history, and the kept weights are the best candidate's by
``train.select_metric`` (:mod:`hubtune.selection`), so ``selected_epoch`` names the λ chosen.

Not differentially private (full-batch, no clipping, no noise): under DP the head trains with
DP-SGD, and a recipe that asks for ``lbfgs`` with privacy is refused when it is validated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MAX_ITER", "WEIGHT_DECAYS", "fit_head"]

logger = logging.getLogger("hubtune")

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MAX_ITER = 1000


def _split(dataset: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.features.to(device), dataset.labels.to(device)


def _penalty(params: list[nn.Parameter]) -> torch.Tensor:
    return sum(((p**2).sum() for p in params if p.ndim > 1), torch.zeros(()))


def _fit_one(
    head: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    decay: float,
    max_iter: int,
) -> int:
    """Minimise loss + (decay/2)·‖W‖² over ``params`` with full-batch L-BFGS; returns its iterations."""
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        objective = loss_fn(head(x), y) + 0.5 * decay * _penalty(params).to(x.device)
        objective.backward()
        return objective

    optimizer.step(closure)
    return int(optimizer.state[params[0]]["n_iter"])


def fit_head(
    head: nn.Module,
    train: Any,
    validation: Any,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    observe: Callable[[dict[str, Any]], Any],
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    max_iter: int = MAX_ITER,
) -> list[dict[str, Any]]:
    """Fit ``head`` once per weight decay; returns the history (one record per candidate).

    Args:
        head: The head module (trained in place; dropout off: the objective is deterministic).
        train, validation: Cached-feature data sets (``features``, ``labels`` tensors).
        loss_fn: The task's loss, ``(logits, labels) -> mean loss``.
        metrics: ``(logits, labels) -> {"loss", "accuracy", "macro_f1", ...}`` on validation.
        observe: Called with each candidate's record after its fit (the epoch selection keeps
            the best candidate's weights).
    """
    device = next(head.parameters()).device
    x, y = _split(train, device)
    vx, vy = _split(validation, device)
    params = [p for p in head.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    head.eval()
    history = []
    for i, decay in enumerate(weight_decays):
        start = time.perf_counter()
        with torch.no_grad():
            for p, p0 in zip(params, initial, strict=True):
                p.copy_(p0)
        iterations = _fit_one(head, params, x, y, loss_fn=loss_fn, decay=decay, max_iter=max_iter)
        with torch.no_grad():
            train_loss = float(loss_fn(head(x), y))
            val = metrics(head(vx).float().cpu(), vy.cpu())
        record = {
            "epoch": i + 1,
            "step": iterations,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in val.items()},
            "solver": "lbfgs",
            "weight_decay": decay,
            "iterations": iterations,
            "converged": iterations < max_iter,
            "train_epoch_s": time.perf_counter() - start,
        }
        history.append(record)
        observe(record)
        logger.info(
            "head fit (L-BFGS) weight decay %g: %d iterations%s, train_loss %.4f val_loss %.4f "
            "val_accuracy %.4f",
            decay,
            iterations,
            "" if record["converged"] else " (iteration limit, not converged)",
            train_loss,
            val["loss"],
            val["accuracy"],
        )
    return history
