"""``full``: fine-tune every parameter (use a small learning rate)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from hubtune.schema import StrictModel

if TYPE_CHECKING:
    from torch import nn

    from hubtune.methods.common import MethodPlan


class FullMethod(StrictModel):
    """Fine-tune every parameter (use a small learning rate)."""

    name: Literal["full"]
    default_lr: ClassVar[float] = 2e-5
    batchnorm: Literal["train", "frozen", "groupnorm"] = Field(
        "train",
        description="BatchNorm layers: train (refused under DP), frozen (eval mode, pretrained statistics kept) or groupnorm (replaced by trainable GroupNorm).",
    )


def apply(
    model: nn.Module,
    method: FullMethod,
    *,
    head: str,
    lr: float,
    weight_decay: float,
    newly_initialized: list[str],
    base_model_name_or_path: str | None,
    base_model_revision: str | None,
) -> MethodPlan:
    """Every tensor trains (BatchNorm as ``method.batchnorm`` says)."""
    from hubtune.methods.common import (
        batchnorm_modules,
        frozen_batchnorms,
        make_plan,
        param_group,
        tied_output_embedding,
        to_groupnorm,
    )

    swapped = (
        to_groupnorm(model, batchnorm_modules(model)) if method.batchnorm == "groupnorm" else []
    )
    for param in model.parameters():
        param.requires_grad_(True)
    if method.batchnorm == "frozen":
        for name in batchnorm_modules(model):
            model.get_submodule(name).requires_grad_(False)
    groups = param_group(
        "all", [p for p in model.parameters() if p.requires_grad], lr, weight_decay
    )
    plan = make_plan("full", model, groups, head)
    plan.eval_modules = frozen_batchnorms(model)
    plan.groupnorm_replaced = swapped
    tied = tied_output_embedding(model)
    if tied is not None:
        plan.tied_embeddings = (
            f"lm_head shares {tied}.weight (tied); trained as one tensor used twice (input and "
            "output), its gradient the sum of both uses"
        )
    return plan
