"""``lora``: peft LoRA adapters on the attention projections (or named conv layers), and the head.

The adapters and the new head train; the pretrained weights stay frozen. ``adapt_top_k`` puts
adapters in the top K blocks only (peft ``layers_to_transform``); the blocks below and the
embeddings then run in eval mode, and with ``feature_cache`` they are computed once (the
frozen-prefix cache). The run saves the adapter (``adapter/``), not the whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from hubtune.schema import StrictModel

if TYPE_CHECKING:
    from torch import nn

    from hubtune.methods.common import MethodPlan


class LoraMethod(StrictModel):
    """Fine-tuning with LoRA adapters (peft); the classification head is trained too."""

    name: Literal["lora"]
    default_lr: ClassVar[float] = 5e-4
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt; default: the architecture's attention query/value (ViT too); conv models need them named (e.g. [conv_pw, conv_pwl]).",
    )
    adapt_top_k: int | None = Field(
        None,
        ge=1,
        description="Adapt only the top K blocks (default: every block). The blocks below are then frozen and, with feature_cache, computed once.",
    )
    feature_cache: bool = Field(
        True,
        description="With adapt_top_k (and no data.augment): compute the hidden states entering the lowest adapted block once, cache them, and run only the top blocks each step.",
    )
    batchnorm: Literal["train", "frozen", "groupnorm"] = Field(
        "frozen",
        description="BatchNorm layers: frozen (default: pretrained statistics kept, eval mode), train (as modules_to_save; refused under DP) or groupnorm (replaced by trainable GroupNorm).",
    )


def apply(
    model: nn.Module,
    method: LoraMethod,
    *,
    head: str,
    lr: float,
    weight_decay: float,
    newly_initialized: list[str],
    base_model_name_or_path: str | None,
    base_model_revision: str | None,
) -> MethodPlan:
    """Adapters (and the head, as ``modules_to_save``) train; everything else is frozen."""
    from peft import LoraConfig, TaskType, get_peft_model

    from hubtune.methods import MethodError
    from hubtune.methods.common import (
        find_blocks,
        frozen_batchnorms,
        frozen_subtrees,
        is_causal_lm,
        is_image_model,
        make_plan,
        param_group,
        under,
    )

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
    causal = is_causal_lm(model)
    task_type = TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS
    config = LoraConfig(
        task_type=None if is_image_model(model) else task_type,
        r=method.r,
        lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=method.dropout,
        target_modules=method.target_modules or default_lora_targets(model),
        # A language model keeps its own output layer (often the input embedding itself):
        # only the adapters train, and only they are saved.
        modules_to_save=None if causal else [head],
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
    plan = make_plan("lora", peft_model, param_group("lora+head", params, lr, weight_decay), head)
    plan.lora_target_modules = targets
    if causal:
        plan.tied_embeddings = _tied_note(model, "frozen, as LoRA keeps every pretrained tensor")
    plan.cache_prefix = method.feature_cache
    plan.output_dir = "adapter"  # the run saves the adapter, not the whole model
    # BatchNorm stays frozen under LoRA, and a frozen BatchNorm runs in eval mode.
    plan.eval_modules = frozen_batchnorms(peft_model)
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


def _tied_note(model: nn.Module, what: str) -> str | None:
    from hubtune.methods.common import tied_output_embedding

    name = tied_output_embedding(model)
    return None if name is None else f"lm_head shares {name}.weight (tied); {what}"


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


def default_lora_targets(model: nn.Module) -> list[str] | None:
    """Our defaults for image models (None: peft's defaults, or its request to name them)."""
    from torch import nn

    from hubtune.methods.common import is_image_model

    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module):
        return _TIMM_LORA_TARGETS.get(type(timm_model).__name__)
    if is_image_model(model):
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        for candidate in _HF_IMAGE_LORA_CANDIDATES:
            if set(candidate) <= leaves:
                return candidate
    return None
