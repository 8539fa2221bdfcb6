"""Transfer-learning methods: which parameters train, at which learning rate.

- ``freeze`` (feature extraction): the pretrained backbone is frozen and only the new head
  (plus any weights the checkpoint did not have) trains. ``unfreeze_top_k`` also trains the top
  K blocks and whatever the backbone applies after them (final norm, pooler, head conv), at a
  lower learning rate. A "block" is defined per architecture (:func:`find_blocks`):
  transformer layers for text models and ViT, stages for ResNet / ConvNeXt / EfficientNet.
- ``lora``: peft LoRA adapters on the attention projections (or named conv layers), and the head.
- ``full``: every parameter.

BatchNorm is handled explicitly because it is the one layer whose behaviour depends on the
other examples of a batch: a frozen BatchNorm always runs in eval mode (its pretrained
statistics stay put, and it mixes nothing between examples), and ``batchnorm: frozen`` or
``batchnorm: groupnorm`` choose what happens to the BatchNorm layers a method would train.
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
    "batchnorm_modules",
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
    # Cache the frozen bottom blocks' output when only the top blocks train (hubtune.prefix).
    cache_prefix: bool = False
    unfrozen_blocks: list[str] = field(default_factory=list)
    lora_target_modules: list[str] | None = None
    # BatchNorm layers replaced by GroupNorm (method.batchnorm: groupnorm).
    groupnorm_replaced: list[str] = field(default_factory=list)
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
            "prefix_cache": self.cache_prefix,
            "unfrozen_blocks": self.unfrozen_blocks,
            "lora_target_modules": self.lora_target_modules,
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


def _after_blocks(model: nn.Module, last_block: str, head: str) -> list[str]:
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


def _frozen_batchnorms(model: nn.Module) -> list[str]:
    return [
        n
        for n in batchnorm_modules(model)
        if not any(p.requires_grad for p in model.get_submodule(n).parameters())
    ]


class _Fresh(nn.Module):
    """Identity that returns a new tensor (safe to modify in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _to_groupnorm(model: nn.Module, names: list[str]) -> list[str]:
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
        swapped = (
            _to_groupnorm(model, batchnorm_modules(model))
            if method.batchnorm == "groupnorm"
            else []
        )
        for param in model.parameters():
            param.requires_grad_(True)
        if method.batchnorm == "frozen":
            for name in batchnorm_modules(model):
                model.get_submodule(name).requires_grad_(False)
        groups = _group("all", [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
        plan = _plan("full", model, groups, head)
        plan.eval_modules = _frozen_batchnorms(model)
        plan.groupnorm_replaced = swapped
        return plan

    if isinstance(method, LoraMethod):
        from peft import LoraConfig, TaskType, get_peft_model

        layers: dict[str, Any] = {}
        if method.adapt_top_k:
            blocks_name, blocks = find_blocks(model)
            container = blocks[0].rsplit(".", 1)[0]
            if method.adapt_top_k > len(blocks) or blocks != [
                f"{container}.{i}" for i in range(len(blocks))
            ]:
                raise MethodError(
                    f"method.adapt_top_k is {method.adapt_top_k} but {type(model).__name__} has "
                    f"{len(blocks)} blocks in {blocks_name}"
                    + (
                        f"; use at most {len(blocks)}"
                        if method.adapt_top_k > len(blocks)
                        else " outside one numbered container; remove adapt_top_k"
                    )
                )
            layers = {
                "layers_to_transform": list(range(len(blocks) - method.adapt_top_k, len(blocks))),
                "layers_pattern": container.rsplit(".", 1)[-1],
            }
        config = LoraConfig(
            task_type=None if _is_image_model(model) else TaskType.SEQ_CLS,
            r=method.r,
            lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=method.dropout,
            target_modules=method.target_modules or _default_lora_targets(model),
            modules_to_save=[head],
            base_model_name_or_path=base_model_name_or_path,
            revision=base_model_revision,
            **layers,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise MethodError(
                f"LoRA could not be applied: {exc}. Name the modules to adapt under method.target_modules "
                "(e.g. [query, value] for BERT or ViT, [c_attn] for GPT-2, [qkv] for timm ViTs, "
                "[conv_pw, conv_pwl] for EfficientNet)."
            ) from None
        targets = sorted(getattr(peft_model.peft_config["default"], "target_modules", None) or [])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        plan = _plan("lora", peft_model, _group("lora+head", params, lr, weight_decay), head)
        plan.lora_target_modules = targets
        plan.cache_prefix = method.feature_cache
        # BatchNorm stays frozen under LoRA, and a frozen BatchNorm runs in eval mode.
        plan.eval_modules = _frozen_batchnorms(peft_model)
        if layers:
            # The blocks below the adapted ones (and the embeddings) are frozen whole: a fixed
            # function, as in feature extraction, with or without the prefix cache.
            adapted = [f"base_model.model.{b}" for b in blocks[layers["layers_to_transform"][0] :]]
            plan.eval_modules += [
                n
                for n in frozen_subtrees(peft_model)
                if not any(under(n, a) for a in adapted) and n not in plan.eval_modules
            ]
        return plan

    # freeze
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
        unfrozen = blocks[first:] + _after_blocks(model, blocks[-1], head)
        in_unfrozen = [n for n in batchnorm_modules(model) if any(under(n, u) for u in unfrozen)]
        if (
            method.batchnorm == "groupnorm"
        ):  # before freezing, so the new layers freeze/unfreeze too
            replaced = _to_groupnorm(model, in_unfrozen)
    for param in model.parameters():
        param.requires_grad_(False)
    head_params = []
    for name, param in model.named_parameters():
        if under(name, head) or name in new:
            param.requires_grad_(True)
            head_params.append(param)
    groups = _group("head", head_params, lr, weight_decay)
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
        groups += _group("backbone", backbone_params, backbone_lr, weight_decay)
    # Features can be cached when nothing below the head trains: the head's input is then a
    # fixed function of the example.
    head_only = all(under(n, head) for n, p in model.named_parameters() if p.requires_grad)
    plan = _plan("freeze", model, groups, head)
    plan.groupnorm_replaced = replaced
    covered = frozen_subtrees(model)
    plan.eval_modules = covered + [
        n for n in _frozen_batchnorms(model) if not any(under(n, c) for c in covered)
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
    return plan


def _is_image_model(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


# LoRA targets for image models peft has no defaults for: timm models by class, transformers'
# vision models by model_type. Text models keep peft's own defaults (attention query/value).
_TIMM_LORA_TARGETS = {
    "VisionTransformer": ["qkv"],
    "EfficientNet": ["conv_pw", "conv_pwl"],  # the 1x1 expansion and projection convs
    "MobileNetV3": ["conv_pw", "conv_pwl"],
    "ResNet": ["conv1", "conv2", "conv3"],
    "ConvNeXt": ["fc1", "fc2"],
}
# transformers renamed attention projections between versions (ViT: query/value -> q_proj/v_proj),
# so the first candidate whose modules the model really has is used.
_HF_IMAGE_LORA_CANDIDATES = (
    ["q_proj", "v_proj"],
    ["query", "value"],
    ["pwconv1", "pwconv2"],  # ConvNeXt
    ["convolution"],  # ResNet
)


def _default_lora_targets(model: nn.Module) -> list[str] | None:
    """Our defaults for image models (None: peft's defaults, or its request to name them)."""
    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module):
        return _TIMM_LORA_TARGETS.get(type(timm_model).__name__)
    if _is_image_model(model):
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        for candidate in _HF_IMAGE_LORA_CANDIDATES:
            if set(candidate) <= leaves:
                return candidate
    return None


def _plan(name: str, model: nn.Module, groups: list[dict[str, Any]], head: str) -> MethodPlan:
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

    handle = model.get_submodule(head).register_forward_pre_hook(hook)
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
