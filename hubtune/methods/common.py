"""What every method shares: the plan it returns, and how blocks, heads and BatchNorm are found.

A "block" is defined per architecture (:func:`find_blocks`): transformer layers for text models
and ViT, stages for ResNet / ConvNeXt / EfficientNet. BatchNorm is handled explicitly because
it is the one layer whose behaviour depends on the other examples of a batch: a frozen
BatchNorm always runs in eval mode (its pretrained statistics stay put, and it mixes nothing
between examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hubtune.methods import MethodError

__all__ = [
    "HEAD_NAMES",
    "MethodPlan",
    "after_blocks",
    "batchnorm_modules",
    "count_parameters",
    "find_blocks",
    "find_head",
    "frozen_batchnorms",
    "frozen_subtrees",
    "is_image_model",
    "make_plan",
    "param_group",
    "to_groupnorm",
    "under",
]

# Names transformers uses for the classification head of *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score", "classification_head", "logits_proj", "head", "fc", "lm_head")


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
    # Cache the frozen bottom blocks' output when only the top blocks train (hubtune.prefix).
    cache_prefix: bool = False
    unfrozen_blocks: list[str] = field(default_factory=list)
    lora_target_modules: list[str] | None = None
    # BatchNorm layers replaced by GroupNorm (method.batchnorm: groupnorm).
    groupnorm_replaced: list[str] = field(default_factory=list)
    # Frozen sub-modules run in eval mode while the rest trains (feature extraction: the frozen
    # part is a fixed function, so no dropout there, and BatchNorm statistics stay put).
    eval_modules: list[str] = field(default_factory=list)
    # Where the run saves what trained: "model" (the whole model) or "adapter" (peft adapters).
    output_dir: str = "model"
    # A language model whose output layer is its input embedding (one tensor used twice): what
    # the method did with it, for run.json and the card (None: not a tied language model).
    tied_embeddings: str | None = None

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
            "prefix_cache": self.cache_prefix,
            "unfrozen_blocks": self.unfrozen_blocks,
            "lora_target_modules": self.lora_target_modules,
            "tied_embeddings": self.tied_embeddings,
            "batchnorm_in_eval_mode": len(
                [
                    n
                    for n in self.eval_modules
                    if isinstance(self.model.get_submodule(n), nn.modules.batchnorm._BatchNorm)
                ]
            ),
            "groupnorm_replaced": self.groupnorm_replaced,
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


def under(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def find_head(model: nn.Module) -> str:
    """The (dotted) name of the classification head of a *For{Sequence,Image}Classification model.

    transformers' own models keep it at the top (``classifier``, ``score``...); a timm model
    wrapped by ``TimmWrapperForImageClassification`` keeps it inside ``timm_model`` under the
    name its ``pretrained_cfg`` gives (``classifier``, ``fc``, ``head.fc``).
    """
    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module):
        cfg = getattr(timm_model, "pretrained_cfg", None) or {}
        candidates = [str(cfg["classifier"])] if cfg.get("classifier") else []
        candidates += ["classifier", "fc", "head.fc", "head"]
        for name in candidates:
            try:
                module = timm_model.get_submodule(name)
            except AttributeError:
                continue
            if any(True for _ in module.parameters()):
                return f"timm_model.{name}"
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise MethodError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)})"
    )


def find_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """The backbone's blocks, bottom to top: ``(what they are, their module names)``.

    Per architecture:

    - timm models (TimmWrapper): ``blocks`` (EfficientNet / MobileNet stages, ViT blocks),
      ``stages`` (ConvNeXt, RegNet...), or ``layer1``..``layer4`` (ResNet stages);
    - transformers' CNNs (ResNet, ConvNeXt...): ``encoder.stages``;
    - transformers' transformers: the longest ``nn.ModuleList`` of same-typed blocks (BERT
      ``encoder.layer``, GPT-2 ``h``, DistilBERT ``transformer.layer``, Llama ``layers``, ViT
      ``encoder.layer``).
    """
    head = find_head(model)
    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module):
        for attr in ("blocks", "stages"):
            container = getattr(timm_model, attr, None)
            if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
                return f"timm_model.{attr}", [
                    f"timm_model.{attr}.{i}" for i in range(len(container))
                ]
        layers = [
            n for n, _ in timm_model.named_children() if n.startswith("layer") and n[5:].isdigit()
        ]
        if layers:
            return "timm_model.layer1..", [
                f"timm_model.{n}" for n in sorted(layers, key=lambda n: int(n[5:]))
            ]
        raise MethodError(
            f"cannot find the blocks of timm model {type(timm_model).__name__}; use method.name: lora or full"
        )
    for name, module in model.named_modules():
        if name.endswith("encoder.stages") and isinstance(module, nn.ModuleList) and len(module):
            return name, [f"{name}.{i}" for i in range(len(module))]
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if under(name, head) or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise MethodError(
            f"cannot find the blocks of {type(model).__name__}; use method.name: lora or full"
        )
    return best[0], [f"{best[0]}.{i}" for i in range(len(best[1]))]


def after_blocks(model: nn.Module, last_block: str, head: str) -> list[str]:
    """Modules the backbone applies after its last block (final norm, pooler, head conv).

    Walks up from the last block and takes the later siblings with parameters at each level,
    by registration order, up to (not including) the model's own top-level children.
    """
    parts = last_block.split(".")
    names: list[str] = []
    for depth in range(len(parts) - 1, 0, -1):
        parent_name = ".".join(parts[:depth])
        child = parts[depth]
        parent = model.get_submodule(parent_name)
        children = [n for n, _ in parent.named_children()]
        if child in children:
            for later in children[children.index(child) + 1 :]:
                full = f"{parent_name}.{later}"
                module = parent.get_submodule(later)
                if not under(full, head) and any(True for _ in module.parameters()):
                    names.append(full)
    return names


def batchnorm_modules(model: nn.Module) -> list[str]:
    """Names of every BatchNorm layer (1d/2d/3d, also timm's BatchNormAct2d)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def frozen_batchnorms(model: nn.Module) -> list[str]:
    return [
        n
        for n in batchnorm_modules(model)
        if not any(p.requires_grad for p in model.get_submodule(n).parameters())
    ]


class _Fresh(nn.Module):
    """Identity that returns a new tensor (safe to modify in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def to_groupnorm(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the named BatchNorm layers by GroupNorm (trainable), keeping their scale and shift.

    GroupNorm normalises each example on its own, so it is compatible with per-example
    gradients; the pretrained running statistics have no counterpart and are lost. The affine
    weights are copied as the starting point. timm's fused BatchNormAct2d keeps its activation.
    """
    import math

    replaced = []
    for name in names:
        bn: Any = model.get_submodule(name)
        channels = int(bn.num_features)
        groups = math.gcd(32, channels)
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=True)
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
        act = getattr(bn, "act", None)
        drop = getattr(bn, "drop", None)
        after = [m for m in (drop, act) if isinstance(m, nn.Module)]
        # The last module returns a new tensor: models that add a residual to a norm's output in
        # place (timm's ResNet: `x += shortcut`) would otherwise modify the output that Opacus'
        # backward hook holds, which autograd refuses.
        replacement: nn.Module = nn.Sequential(gn, *after, _Fresh())
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacement)
        replaced.append(name)
    return replaced


def param_group(
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


def is_image_model(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal language model (``*ForCausalLM``, GPT-2's ``*LMHeadModel``)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def tied_output_embedding(model: nn.Module) -> str | None:
    """The name of the input embedding that a language model's output layer shares, or None."""
    head = getattr(model, "lm_head", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not isinstance(head, nn.Module) or not callable(get_embeddings):
        return None
    embedding = get_embeddings()
    if not isinstance(embedding, nn.Module) or head.weight is not embedding.weight:
        return None
    for name, module in model.named_modules():
        if module is embedding:
            return name
    return None


def make_plan(name: str, model: nn.Module, groups: list[dict[str, Any]], head: str) -> MethodPlan:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not trainable:
        raise MethodError("the method leaves no trainable parameters")
    # Invariant: what trains is exactly what the optimizer steps (a trainable tensor outside the
    # optimizer would silently not learn, and under DP would still be charged for).
    in_groups = {id(p) for g in groups for p in g["params"]}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_groups]
    if outside:
        raise MethodError(f"internal error: trainable tensors outside the optimizer: {outside[:5]}")
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
