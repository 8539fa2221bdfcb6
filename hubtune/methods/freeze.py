"""``freeze`` (feature extraction): the pretrained backbone is frozen and a new head trains.

Also trainable: any weight the checkpoint did not have. ``unfreeze_top_k`` trains the top K
blocks and whatever the backbone applies after them (final norm, pooler, head conv), at a lower
learning rate. With a fully frozen backbone the head's input is a fixed function of the example
(the feature cache); with ``unfreeze_top_k`` the blocks below are (the frozen-prefix cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from hubtune.schema import StrictModel

if TYPE_CHECKING:
    from torch import nn

    from hubtune.methods.common import MethodPlan


class FreezeMethod(StrictModel):
    """Feature extraction: freeze the pretrained backbone and train a new head."""

    name: Literal["freeze"]
    default_lr: ClassVar[float] = 1e-3
    unfreeze_top_k: int = Field(
        0, ge=0, description="Also train the top K transformer blocks (and the final norm/pooler)."
    )
    backbone_lr: float | None = Field(
        None, gt=0, description="Learning rate of unfrozen blocks; default train.lr / 10."
    )
    feature_cache: bool = Field(
        True,
        description=(
            "Compute what the frozen part of the backbone produces once and train on the cache (not with "
            "data.augment): with a fully frozen backbone, the head's input features; with "
            "unfreeze_top_k, the hidden states entering the lowest unfrozen block, so each step runs "
            "only the top blocks."
        ),
    )
    head_fit: Literal["auto", "lbfgs", "sgd"] = Field(
        "auto",
        description=(
            "How the head trains on cached features: lbfgs fits it to convergence (full-batch L-BFGS, "
            "weight decay chosen on the validation split; train.epochs, lr and batch_size do not "
            "apply), sgd trains it for train.epochs with the optimizer. auto: lbfgs when the "
            "features are cached and there is no privacy, else sgd (DP-SGD under privacy)."
        ),
    )
    batchnorm: Literal["train", "frozen", "groupnorm"] = Field(
        "train",
        description=(
            "BatchNorm layers in unfrozen blocks: train (usual fine-tuning; refused under DP), frozen "
            "(pretrained scale, shift and statistics kept, run in eval mode), or groupnorm (replaced by "
            "trainable GroupNorm: DP-compatible, but the pretrained statistics are lost)."
        ),
    )


def apply(
    model: nn.Module,
    method: FreezeMethod,
    *,
    head: str,
    lr: float,
    weight_decay: float,
    newly_initialized: list[str],
    base_model_name_or_path: str | None,
    base_model_revision: str | None,
) -> MethodPlan:
    """Freeze everything but the head (and the top ``unfreeze_top_k`` blocks)."""
    from hubtune.methods import MethodError
    from hubtune.methods.common import (
        after_blocks,
        batchnorm_modules,
        find_blocks,
        frozen_batchnorms,
        frozen_subtrees,
        make_plan,
        param_group,
        tied_output_embedding,
        to_groupnorm,
        under,
    )

    new = set(newly_initialized)
    unfrozen: list[str] = []
    replaced: list[str] = []
    in_unfrozen: list[str] = []
    if method.unfreeze_top_k:
        blocks_name, blocks = find_blocks(model)
        if method.unfreeze_top_k > len(blocks):
            raise MethodError(
                f"method.unfreeze_top_k is {method.unfreeze_top_k} but {type(model).__name__} has only "
                f"{len(blocks)} blocks in {blocks_name}; use at most {len(blocks)} (or method.name: full)"
            )
        first = len(blocks) - method.unfreeze_top_k
        unfrozen = blocks[first:] + after_blocks(model, blocks[-1], head)
        in_unfrozen = [n for n in batchnorm_modules(model) if any(under(n, u) for u in unfrozen)]
        if (
            method.batchnorm == "groupnorm"
        ):  # before freezing, so the new layers freeze/unfreeze too
            replaced = to_groupnorm(model, in_unfrozen)
    for param in model.parameters():
        param.requires_grad_(False)
    head_params = []
    for name, param in model.named_parameters():
        if under(name, head) or name in new:
            param.requires_grad_(True)
            head_params.append(param)
    groups = param_group("head", head_params, lr, weight_decay)
    if unfrozen:
        backbone_params = []
        for module_name in unfrozen:
            for name, param in model.get_submodule(module_name).named_parameters():
                full = f"{module_name}.{name}"
                if method.batchnorm == "frozen" and any(under(full, b) for b in in_unfrozen):
                    continue
                if not param.requires_grad:
                    param.requires_grad_(True)
                    backbone_params.append(param)
        backbone_lr = method.backbone_lr if method.backbone_lr is not None else lr / 10
        groups += param_group("backbone", backbone_params, backbone_lr, weight_decay)
    # Features can be cached when nothing below the head trains: the head's input is then a
    # fixed function of the example.
    head_only = all(under(n, head) for n, p in model.named_parameters() if p.requires_grad)
    plan = make_plan("freeze", model, groups, head)
    plan.groupnorm_replaced = replaced
    covered = frozen_subtrees(model)
    plan.eval_modules = covered + [
        n for n in frozen_batchnorms(model) if not any(under(n, c) for c in covered)
    ]
    if head_only:
        # Pure feature extraction: the head's input is a fixed function of the example, with or
        # without the cache, so the dropout applied to it outside the head is off as well.
        plan.eval_modules += [
            n
            for n, m in model.named_children()
            if not under(head, n) and not any(True for _ in m.parameters())
        ]
    plan.cache_features = bool(method.feature_cache and not method.unfreeze_top_k and head_only)
    plan.cache_prefix = bool(method.feature_cache and method.unfreeze_top_k)
    plan.unfrozen_blocks = unfrozen
    tied = tied_output_embedding(model)
    if tied is not None:
        plan.tied_embeddings = (
            f"lm_head shares {tied}.weight (tied); frozen, since training it would also change "
            "the input embeddings below the frozen blocks"
        )
    return plan
