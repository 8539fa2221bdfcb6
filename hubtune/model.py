"""Loading a pinned model folder as a sequence classifier with the recipe's labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hubtune.hub import ResolvedModel
from hubtune.recipe import ModelSection

__all__ = [
    "GROUPNORM_FILE",
    "load_classifier",
    "load_image_classifier",
    "load_saved_image_model",
    "resize_processor",
]

# Written beside the weights of a model whose BatchNorm layers hubtune replaced by GroupNorm
# (method.batchnorm: groupnorm): the architecture in config.json no longer says it all.
GROUPNORM_FILE = "hubtune_groupnorm.json"

logger = logging.getLogger(__name__)


def load_classifier(
    resolved: ResolvedModel, section: ModelSection, *, label_names: list[str]
) -> tuple[Any, Any, list[str]]:
    """Load tokenizer and ``AutoModelForSequenceClassification`` from a resolved folder.

    Returns:
        ``(tokenizer, model, newly_initialized)``: the names of parameters the checkpoint did
        not have (the new head), which the method must train.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trust = section.trust_remote_code
    config = _labelled_config(resolved, label_names, trust)
    tokenizer = AutoTokenizer.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        # Decoder models (GPT-2) have no pad token; reuse end-of-text so batches can be padded.
        tokenizer.pad_token = tokenizer.eos_token
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    model, newly = _from_pretrained(AutoModelForSequenceClassification, resolved, config, section)
    return tokenizer, model, newly


def _labelled_config(resolved: ResolvedModel, label_names: list[str], trust: bool) -> Any:
    """The model's config with the recipe's labels as its classes."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolved.local_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        trust_remote_code=trust,
    )


def _from_pretrained(
    auto_class: Any, resolved: ResolvedModel, config: Any, section: ModelSection
) -> tuple[Any, list[str]]:
    """The model with the recipe's labels, and the tensors the checkpoint did not have."""
    model, info = auto_class.from_pretrained(
        resolved.local_dir,
        config=config,
        trust_remote_code=section.trust_remote_code,
        use_safetensors=None if section.allow_pickle else True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    newly = sorted(
        set(info.get("missing_keys", []))
        | {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])}
    )
    logger.info("model: %s newly initialised tensors: %s", len(newly), newly)
    return model, newly


def load_image_classifier(
    resolved: ResolvedModel, section: ModelSection, *, label_names: list[str]
) -> tuple[Any, Any, list[str]]:
    """Load the image processor and ``AutoModelForImageClassification`` from a resolved folder.

    ``section.image_size`` replaces the processor's resize/crop size; the returned processor
    carries it, so the saved model is evaluated the way it was trained.

    Returns:
        ``(processor, model, newly_initialized)``.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    trust = section.trust_remote_code
    config = AutoConfig.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if getattr(config, "model_type", None) == "timm_wrapper":
        _require_timm()
    config = _labelled_config(resolved, label_names, trust)
    processor = AutoImageProcessor.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if section.image_size is not None:
        processor = resize_processor(processor, section.image_size)
    if (resolved.local_dir / GROUPNORM_FILE).exists():
        return processor, *_load_with_groupnorm(resolved.local_dir, config)
    model, newly = _from_pretrained(AutoModelForImageClassification, resolved, config, section)
    return processor, model, newly


def _require_timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ImportError(
            "this model is a timm model (transformers' TimmWrapper), which needs the timm package and a "
            "torchvision built for your torch: pip install 'hubtune[vision]' (scripts/setup.sh installs a "
            "matching torch/torchvision pair)"
        ) from None


def resize_processor(processor: Any, size: int) -> Any:
    """A copy of ``processor`` that resizes and crops images to ``size`` x ``size``."""
    import copy

    if type(processor).__name__ == "TimmWrapperImageProcessor":
        cfg = dict(processor.data_config)
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        pretrained_cfg = {**cfg, "input_size": (3, size, size), "crop_pct": crop_pct}
        return type(processor)(pretrained_cfg=pretrained_cfg, architecture=processor.architecture)
    processor = copy.deepcopy(processor)
    old = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in old and getattr(processor, "crop_pct", None):
        # ConvNeXt-style: resize the short side to size / crop_pct, then centre-crop size.
        processor.size = {"shortest_edge": size}
    elif "shortest_edge" in old:
        processor.size = {"shortest_edge": size}
        processor.crop_size = {"height": size, "width": size}
        processor.do_center_crop = True
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None and "shortest_edge" not in old:
        processor.crop_size = {"height": size, "width": size}
    return processor


def _load_with_groupnorm(folder: Path, config: Any) -> tuple[Any, list[str]]:
    """Rebuild the model, swap the recorded BatchNorm layers for GroupNorm, load the weights."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from hubtune.methods.common import to_groupnorm

    names = json.loads((folder / GROUPNORM_FILE).read_text())["replaced"]
    model = AutoModelForImageClassification.from_config(config)
    to_groupnorm(model, names)
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    own = model.state_dict()
    newly = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict(
        {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False
    )
    model.eval()
    return model, newly


def load_saved_image_model(folder: str | Path) -> tuple[Any, Any]:
    """``(processor, model)`` of an image model hubtune saved (also with GroupNorm swapped in)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    folder = Path(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    if (folder / GROUPNORM_FILE).exists():
        model, newly = _load_with_groupnorm(folder, AutoConfig.from_pretrained(folder))
        if newly:
            raise ValueError(f"{folder}: weights missing for {newly[:5]}")
        return processor, model
    return processor, AutoModelForImageClassification.from_pretrained(folder).eval()


def save_processor(processor: Any, folder: Path, model: Any | None = None) -> None:
    """Save the preprocessor beside the weights so the saved model sees images as in training.

    transformers keeps a timm model's preprocessing in ``config.json`` (``pretrained_cfg``)
    and refuses to save its processor on its own; hubtune updates that config (when the
    recipe resized the images) and, for LoRA adapters, which have no config.json, writes
    ``preprocessor_config.json`` that ``TimmWrapperImageProcessor.from_pretrained(folder,
    image_processor_filename="preprocessor_config.json")`` reads.
    """
    import json

    if type(processor).__name__ != "TimmWrapperImageProcessor":
        processor.save_pretrained(folder)
        return
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in processor.data_config.items()}
    payload = {
        "image_processor_type": "TimmWrapperImageProcessor",
        "architecture": processor.architecture,
        "pretrained_cfg": cfg,
    }
    (Path(folder) / "preprocessor_config.json").write_text(
        json.dumps(payload, indent=2, sort_keys=True) + "\n"
    )
    config = getattr(model, "config", None)
    if config is not None and (Path(folder) / "config.json").exists():
        data = json.loads((Path(folder) / "config.json").read_text())
        data["pretrained_cfg"] = {**data.get("pretrained_cfg", {}), **cfg}
        (Path(folder) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
