"""Loading a pinned model folder as a sequence classifier with the recipe's labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hubtune.hub import ResolvedModel
from hubtune.recipe import ModelSection

__all__ = [
    "GROUPNORM_FILE",
    "POOLING_ATTR",
    "choose_pooling",
    "is_pooled_model",
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
    resolved: ResolvedModel,
    section: ModelSection,
    *,
    label_names: list[str],
    method_name: str = "freeze",
) -> tuple[Any, Any, list[str]]:
    """Load tokenizer and sequence classifier from a resolved folder.

    The classifier is transformers' ``AutoModelForSequenceClassification`` (``native``
    pooling), or :class:`hubtune.modeling_pooled.HubtunePooledForSequenceClassification` when
    :func:`choose_pooling` picks another pooling. Which one, and why, is in
    :data:`POOLING_ATTR` on the returned model (run.json's ``pooling``).

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
    choice = choose_pooling(resolved.local_dir, section.pooling, method_name=method_name)
    if choice["mode"] == "native":
        auto_class: Any = AutoModelForSequenceClassification
    else:
        from hubtune.modeling_pooled import (
            HubtunePooledConfig,
            HubtunePooledForSequenceClassification,
        )

        encoder = {k: v for k, v in config.to_dict().items() if k not in _LABEL_KEYS}
        config = HubtunePooledConfig(
            encoder=encoder,
            pooling=choice["mode"],
            classifier_dropout=_dropout_of(config),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            pad_token_id=config.pad_token_id,
        )
        auto_class = HubtunePooledForSequenceClassification
    model, newly = _from_pretrained(auto_class, resolved, config, section)
    setattr(model, POOLING_ATTR, choice)
    logger.info("model: pooling %s (%s)", choice["mode"], choice["source"])
    return tokenizer, model, newly


# On a loaded classifier: {"mode", "source"}, how its head pools the token states and why.
POOLING_ATTR = "hubtune_pooling"
# What the encoder's configuration must not carry into HubtunePooledConfig.encoder: the labels
# and transformers' own bookkeeping belong to the outer configuration.
_LABEL_KEYS = {
    "num_labels",
    "id2label",
    "label2id",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "auto_map",
    "problem_type",
}
SENTENCE_TRANSFORMERS_POOLING = "sentence_transformers.models.Pooling"


POOLED_MODEL_TYPE = "hubtune_pooled"


def is_pooled_model(folder: str | Path) -> bool:
    """Whether the saved model in ``folder`` is hubtune's pooled classifier (loads with
    ``trust_remote_code=True``, its code beside the weights)."""
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == POOLED_MODEL_TYPE


def _dropout_of(config: Any) -> float:
    """The dropout the architecture's own head would use (BERT: classifier_dropout or hidden)."""
    for name in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout", "dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.1


def sentence_transformers_pooling(folder: Path) -> tuple[str, str] | None:
    """``(mode, source)`` from a sentence-transformers model's own pooling config, or None.

    ``modules.json`` names the ``Pooling`` module's folder (usually ``1_Pooling``); its
    ``config.json`` says which pooling the model was trained with. A config that turns on
    several modes at once (their concatenation) or none is not one hubtune reproduces: None,
    with a warning.
    """
    import json

    modules_file = Path(folder) / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        entry = next(m for m in modules if m.get("type") == SENTENCE_TRANSFORMERS_POOLING)
        relative = f"{entry.get('path') or ''}/config.json".lstrip("/")
        config = json.loads((Path(folder) / relative).read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError) as exc:
        logger.warning("%s: no usable sentence-transformers pooling config (%s)", folder, exc)
        return None
    modes = [
        mode
        for mode in ("cls", "mean", "max", "mean_sqrt_len")
        if config.get(
            f"pooling_mode_{mode}_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"
        )
    ]
    if len(modes) != 1:
        logger.warning(
            "%s: %s turns on %s pooling modes %s; hubtune reproduces exactly one: using native pooling",
            folder,
            relative,
            len(modes),
            modes,
        )
        return None
    return modes[0], f"{relative} of the base model (sentence-transformers)"


def choose_pooling(folder: Path, requested: str, *, method_name: str) -> dict[str, str]:
    """How the classifier pools, and why: ``{"mode", "source"}`` (run.json's ``pooling``).

    ``auto`` takes the model's own sentence-transformers pooling, except under LoRA, whose
    adapter is loaded onto the base model's stock classifier (native pooling) wherever it goes.
    """
    if requested != "auto":
        return {"mode": requested, "source": "model.pooling in the recipe"}
    shipped = sentence_transformers_pooling(folder)
    if shipped is None:
        return {
            "mode": "native",
            "source": "the model ships no sentence-transformers pooling config",
        }
    mode, source = shipped
    if method_name == "lora":
        return {
            "mode": "native",
            "source": f"LoRA adapters load onto the stock classifier, so not the {mode} pooling of {source}",
        }
    return {"mode": mode, "source": source}


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
    """The model with the recipe's labels, and the tensors the checkpoint did not have (all of
    them with ``model.init: random``: the architecture alone, initialised afresh)."""
    if section.init == "random":
        model = auto_class.from_config(config, trust_remote_code=section.trust_remote_code)
        logger.info("model: random initialisation (model.init: random); no pretrained weights")
        return model, sorted(name for name, _ in model.named_parameters())
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


def load_causal_lm(resolved: ResolvedModel, section: ModelSection) -> tuple[Any, Any, list[str]]:
    """Load the tokenizer and ``AutoModelForCausalLM`` from a resolved folder.

    A tokenizer without a pad token (GPT-2) pads with its end-of-text token; padded positions
    are masked out of attention and loss, so which id fills them does not matter.

    Returns:
        ``(tokenizer, model, newly_initialized)``: a language model keeps its own head, so a
        checkpoint that lacks a tensor is refused rather than trained from random values.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hubtune.errors import InputError

    trust = section.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if section.chat_template is not None:  # saved with the tokenizer, so the pushed model has it
        from hubtune.tasks.chat import CHATML

        tokenizer.chat_template = (
            CHATML if section.chat_template == "chatml" else section.chat_template
        )
    config = AutoConfig.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if section.init == "random":
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        return tokenizer, model, sorted(name for name, _ in model.named_parameters())
    model, info = AutoModelForCausalLM.from_pretrained(
        resolved.local_dir,
        config=config,
        trust_remote_code=trust,
        use_safetensors=None if section.allow_pickle else True,
        output_loading_info=True,
    )
    missing = sorted(set(info.get("missing_keys", [])))
    if missing:
        raise InputError(
            f"the checkpoint in {resolved.local_dir} lacks {len(missing)} tensor(s) of "
            f"{type(model).__name__} ({', '.join(missing[:5])}); a language model is fine-tuned from "
            "complete pretrained weights. Check model.id (is it a causal language model?)."
        )
    return tokenizer, model, []


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
