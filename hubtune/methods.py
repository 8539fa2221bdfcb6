"""Transfer-learning methods: which parameters train, at which learning rate.

- ``freeze`` (feature extraction): the pretrained backbone is frozen and only the new head
  (plus any weights the checkpoint did not have) trains. ``unfreeze_top_k`` also trains the top
  K transformer blocks and whatever the backbone applies after them (final norm, pooler), at a
  lower learning rate.
- ``lora``: peft LoRA adapters on the attention projections, and the head.
- ``full``: every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hubtune.recipe import FreezeMethod, FullMethod, LoraMethod

__all__ = [
    "MethodPlan",
    "apply_method",
    "find_head",
    "find_blocks",
    "count_parameters",
    "MethodError",
]

# Names transformers uses for the classification head of *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score", "classification_head", "logits_proj", "head", "fc")


class MethodError(ValueError):
    """The method cannot be applied to this model; the message says why and what to do."""


@dataclass
class MethodPlan:
    """What trains and how, ready for the optimizer."""

    name: str
    model: nn.Module
    param_groups: list[dict[str, Any]]
    head_name: str
    trainable_names: list[str]
    frozen_names: list[str]
    cache_features: bool = False
    unfrozen_blocks: list[str] = field(default_factory=list)
    lora_target_modules: list[str] | None = None
    # Frozen sub-modules run in eval mode while the rest trains (feature extraction: the frozen
    # part is a fixed function, so no dropout there, and BatchNorm statistics stay put).
    eval_modules: list[str] = field(default_factory=list)

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode, except the frozen parts listed in ``eval_modules``."""
        model.train()
        for name in self.eval_modules:
            model.get_submodule(name).eval()

    @property
    def counts(self) -> dict[str, int]:
        return count_parameters(self.model)

    def summary(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "method": self.name,
            "head": self.head_name,
            "trainable_parameters": counts["trainable"],
            "total_parameters": counts["total"],
            "trainable_fraction": counts["trainable"] / max(1, counts["total"]),
            "trainable_tensors": len(self.trainable_names),
            "feature_cache": self.cache_features,
            "unfrozen_blocks": self.unfrozen_blocks,
            "lora_target_modules": self.lora_target_modules,
            "param_groups": [
                {"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])}
                for g in self.param_groups
            ],
        }


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts; shared (tied) tensors are counted once."""
    seen: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def find_head(model: nn.Module) -> str:
    """The attribute name of the classification head of a *ForSequenceClassification model."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise MethodError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)})"
    )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks of the backbone (e.g. ``bert.encoder.layer``).

    The longest ``nn.ModuleList`` of same-typed blocks in the backbone is the block stack for
    every architecture transformers ships (BERT ``encoder.layer``, GPT-2 ``h``, DistilBERT
    ``transformer.layer``, Llama ``layers``, ViT ``encoder.layer``).
    """
    head = find_head(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if name.split(".")[0] == head or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise MethodError(
            f"cannot find the transformer blocks of {type(model).__name__}; use method.name: lora or full"
        )
    return best


def _after_blocks(model: nn.Module, blocks_name: str) -> list[str]:
    """Modules the backbone applies after its blocks (final norm, pooler), by registration order."""
    parts = blocks_name.split(".")
    names: list[str] = []
    for depth in range(len(parts) - 1, 0, -1):
        parent_name = ".".join(parts[:depth])
        child = parts[depth]
        parent = model.get_submodule(parent_name)
        children = [n for n, _ in parent.named_children()]
        if child in children:
            for later in children[children.index(child) + 1 :]:
                module = parent.get_submodule(later)
                if any(True for _ in module.parameters()):
                    names.append(f"{parent_name}.{later}")
        if depth == 1:
            break
    return names


def _group(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    # No weight decay on biases and norms: standard practice, and it keeps LayerNorm gains at 1.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append(
            {"name": f"{name}/no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
        )
    return groups


def apply_method(
    model: nn.Module,
    method: FreezeMethod | LoraMethod | FullMethod,
    *,
    lr: float,
    weight_decay: float = 0.0,
    newly_initialized: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
) -> MethodPlan:
    """Set ``requires_grad`` per the method and build optimizer parameter groups.

    Args:
        model: A *ForSequenceClassification model.
        method: The recipe's method section.
        lr: Learning rate of the head (and adapters / all weights for lora / full).
        weight_decay: AdamW weight decay for matrices.
        newly_initialized: Parameter names the checkpoint did not have (they must train).
        base_model_name_or_path: Recorded in the LoRA adapter config so peft can reload it.
        base_model_revision: Commit SHA of the base model, recorded likewise.
    """
    head = find_head(model)
    new = set(newly_initialized or [])
    if isinstance(method, FullMethod):
        for param in model.parameters():
            param.requires_grad_(True)
        groups = _group("all", [p for p in model.parameters()], lr, weight_decay)
        return _plan("full", model, groups, head)

    if isinstance(method, LoraMethod):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=method.r,
            lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            modules_to_save=[head],
            base_model_name_or_path=base_model_name_or_path,
            revision=base_model_revision,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise MethodError(
                f"LoRA could not be applied: {exc}. Name the modules to adapt under method.target_modules "
                "(e.g. [query, value] for BERT, [c_attn] for GPT-2)."
            ) from None
        targets = sorted(getattr(peft_model.peft_config["default"], "target_modules", None) or [])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        plan = _plan("lora", peft_model, _group("lora+head", params, lr, weight_decay), head)
        plan.lora_target_modules = targets
        return plan

    # freeze
    for param in model.parameters():
        param.requires_grad_(False)
    head_params = []
    for name, param in model.named_parameters():
        if name.split(".")[0] == head or name in new:
            param.requires_grad_(True)
            head_params.append(param)
    groups = _group("head", head_params, lr, weight_decay)
    unfrozen: list[str] = []
    if method.unfreeze_top_k:
        blocks_name, blocks = find_blocks(model)
        if method.unfreeze_top_k > len(blocks):
            raise MethodError(
                f"method.unfreeze_top_k is {method.unfreeze_top_k} but {type(model).__name__} has only "
                f"{len(blocks)} blocks in {blocks_name}; use at most {len(blocks)} (or method.name: full)"
            )
        first = len(blocks) - method.unfreeze_top_k
        unfrozen = [f"{blocks_name}.{i}" for i in range(first, len(blocks))] + _after_blocks(
            model, blocks_name
        )
        backbone_params = []
        for module_name in unfrozen:
            for param in model.get_submodule(module_name).parameters():
                if not param.requires_grad:
                    param.requires_grad_(True)
                    backbone_params.append(param)
        backbone_lr = method.backbone_lr if method.backbone_lr is not None else lr / 10
        groups += _group("backbone", backbone_params, backbone_lr, weight_decay)
    # Features can be cached when nothing below the head trains: the head's input is then a
    # fixed function of the example.
    head_only = all(n.split(".")[0] == head for n, p in model.named_parameters() if p.requires_grad)
    plan = _plan("freeze", model, groups, head)
    plan.eval_modules = frozen_subtrees(model)
    if head_only:
        # Pure feature extraction: the head's input is a fixed function of the example, with or
        # without the cache, so the dropout applied to it outside the head is off as well.
        plan.eval_modules += [
            n
            for n, m in model.named_children()
            if n != head and not any(True for _ in m.parameters())
        ]
    plan.cache_features = bool(method.feature_cache and not method.unfreeze_top_k and head_only)
    plan.unfrozen_blocks = unfrozen
    return plan


def _plan(name: str, model: nn.Module, groups: list[dict[str, Any]], head: str) -> MethodPlan:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not trainable:
        raise MethodError("the method leaves no trainable parameters")
    return MethodPlan(
        name=name,
        model=model,
        param_groups=groups,
        head_name=head,
        trainable_names=trainable,
        frozen_names=frozen,
    )


def frozen_subtrees(model: nn.Module, prefix: str = "") -> list[str]:
    """The largest sub-modules whose parameters are all frozen."""
    names = []
    for name, child in model.named_children():
        params = list(child.parameters())
        full = f"{prefix}{name}"
        if params and not any(p.requires_grad for p in params):
            names.append(full)
        elif params:
            names += frozen_subtrees(child, prefix=f"{full}.")
    return names


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the backbone and return what it feeds the head (the features to cache).

    The forward pass is cut short at the head with an exception, so the head and the loss are
    never computed.
    """
    captured: list[torch.Tensor] = []

    class _Captured(Exception):
        pass

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        raise _Captured

    handle = getattr(model, head).register_forward_pre_hook(hook)
    try:
        model(**batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise MethodError(
            f"the model never called its head {head!r}; feature caching cannot be used"
        )
    return captured[0]
