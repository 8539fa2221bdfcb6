"""Image classification (``model.task: image-classification``): an image processor and a classifier.

transformers' own vision models (ViT, ResNet, ConvNeXt) and timm models through its
TimmWrapper. Images are decoded and processed per example (train-only augmentation, seeded per
(seed, epoch, image), through :mod:`hubtune.images`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hubtune import baselines
from hubtune.tasks import classification
from hubtune.tasks.snippets import lora_base_lines, model_location

__all__ = ["TASK", "load_snippet"]


def _load(
    resolved: Any, section: Any, *, label_names: list[str], method_name: str
) -> tuple[Any, Any, list[str]]:
    from hubtune.model import load_image_classifier

    return load_image_classifier(resolved, section, label_names=label_names)


def _encode_split(processor: Any, frame: Any, recipe: Any, *, train: bool) -> Any:
    from hubtune.images import ImageExamples

    return ImageExamples(
        frame["image"],
        frame["label"].to_numpy(),
        processor,
        augment=recipe.data.augment if train else None,
        seed=recipe.seed,
    )


def _collator(processor: Any) -> Any:
    from hubtune.images import image_collate

    return image_collate


def _cache_inputs(frame: Any, recipe: Any, processor: Any = None) -> dict[str, Any]:
    """The images of a split, in order, and what the processor does to them."""
    from hubtune.images import images_digest, processor_digest

    return {"images": images_digest(frame), "processor": processor_digest(processor)}


def _is_timm(folder: Path) -> bool:
    """Whether a saved model (or adapter) folder holds a timm model's preprocessing."""
    for name in ("preprocessor_config.json", "config.json"):
        path = folder / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        if (
            data.get("image_processor_type") == "TimmWrapperImageProcessor"
            or data.get("model_type") == "timm_wrapper"
            or ("architecture" in data and "pretrained_cfg" in data)
        ):
            return True
    return False


def load_snippet(
    *,
    run_dir: Path,
    repo_id: str | None,
    revision: str | None,
    lora: bool,
    base: dict[str, Any],
    label_names: list[str],
    max_length: int = 0,
) -> str:
    """A Python snippet that loads the model and classifies an image (``max_length``: unused)."""
    from hubtune.model import GROUPNORM_FILE

    timm = _is_timm(run_dir / ("adapter" if lora else "model"))
    groupnorm = (run_dir / "model" / GROUPNORM_FILE).exists()
    where, kw = model_location(run_dir=run_dir, repo_id=repo_id, revision=revision, lora=lora)
    lines = ["import torch", "from PIL import Image"]
    if groupnorm:
        lines += [
            "from huggingface_hub import snapshot_download",
            "from hubtune.model import load_saved_image_model  # BatchNorm was replaced by GroupNorm",
            "",
            *where.rstrip("\n").split("\n"),
            f"processor, model = load_saved_image_model(snapshot_download(model_id{kw}))"
            if repo_id is not None
            else "processor, model = load_saved_image_model(model_id)",
        ]
    else:
        lines.append("from transformers import AutoImageProcessor, AutoModelForImageClassification")
        if lora:
            lines.append("from peft import PeftModel")
            if timm:
                lines.append(
                    "from transformers.models.timm_wrapper import TimmWrapperImageProcessor"
                )
            if base.get("kind") == "package":
                lines.append("from importlib.resources import files")
        lines += ["", *where.rstrip("\n").split("\n")]
        if lora:
            if timm:  # timm keeps preprocessing in config.json; the adapter folder has its own copy
                lines.append(
                    f"processor = TimmWrapperImageProcessor.from_pretrained(model_id{kw}, "
                    'image_processor_filename="preprocessor_config.json")'
                )
            else:
                lines.append(f"processor = AutoImageProcessor.from_pretrained(model_id{kw})")
            lines += lora_base_lines(base, label_names, "AutoModelForImageClassification", kw)
        else:
            lines += [
                f"processor = AutoImageProcessor.from_pretrained(model_id{kw})",
                f"model = AutoModelForImageClassification.from_pretrained(model_id{kw}).eval()",
            ]
    lines += [
        "",
        'images = [Image.open("replace-with-your-image.png").convert("RGB")]',
        'inputs = processor(images=images, return_tensors="pt")',
        "with torch.no_grad():",
        "    probabilities = model(**inputs).logits.softmax(-1)",
        "for row in probabilities:",
        "    print({model.config.id2label[i]: round(float(p), 3) for i, p in enumerate(row)})",
    ]
    return "\n".join(lines) + "\n"


TASK = classification.task(
    name="image-classification",
    input_kind="image",
    title="Image Classification",
    space_widget="image",
    load=_load,
    encode=_encode_split,
    collate=_collator,
    cache_inputs=_cache_inputs,
    load_snippet=load_snippet,
    classical_baseline=baselines.classical_image,
)
