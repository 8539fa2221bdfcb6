"""Image examples for training: decode, augment (training only), preprocess.

Images stay encoded (PNG/JPEG bytes) in memory and are decoded one at a time, so a data set
of any size costs its file size, not its pixel count. Each training image's augmentation is
drawn from a generator seeded by ``(seed, epoch, row)``: the same run sees the same augmented
images whether or not it was interrupted and resumed, and no two epochs see the same ones.
Validation and test images are never augmented.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hubtune.data import decode_image, digest_bytes
from hubtune.recipe import AugmentSection

__all__ = ["ImageExamples", "augment_image", "image_collate", "processor_digest", "images_digest"]


def augment_image(image: Any, section: AugmentSection, rng: np.random.Generator) -> Any:
    """One random draw of the recipe's augmentations on an RGB PIL image.

    The order is fixed (crop, flips, rotation, brightness, contrast) and every parameter is
    drawn whether or not it is used, so changing one setting does not shift the others' draws.
    """
    from PIL import Image, ImageEnhance

    draws = rng.random(9)
    if section.crop_scale is not None:
        lo, hi = section.crop_scale
        area = lo + (hi - lo) * draws[0]
        side = float(np.sqrt(area))
        width, height = image.size
        w, h = max(1, round(width * side)), max(1, round(height * side))
        left = int(draws[1] * (width - w + 1))
        top = int(draws[2] * (height - h + 1))
        image = image.crop((left, top, left + w, top + h)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
    if draws[3] < section.horizontal_flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if draws[4] < section.vertical_flip:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if section.rotation:
        angle = (2 * draws[5] - 1) * section.rotation
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if section.brightness:
        image = ImageEnhance.Brightness(image).enhance(1 + (2 * draws[6] - 1) * section.brightness)
    if section.contrast:
        image = ImageEnhance.Contrast(image).enhance(1 + (2 * draws[7] - 1) * section.contrast)
    return image


class ImageExamples(Dataset):
    """Encoded images + labels -> ``{"pixel_values", "labels", "idx"}`` through the processor."""

    def __init__(
        self,
        images: pd.Series | list[bytes],
        labels: np.ndarray,
        processor: Any,
        *,
        augment: AugmentSection | None = None,
        seed: int = 0,
    ):
        self.images = list(images)
        self.labels = np.asarray(labels)
        self.processor = processor
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, i: int) -> torch.Tensor:
        image = decode_image(self.images[i])
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, 0xA06, self.epoch, i])
            image = augment_image(image, self.augment, rng)
        out = self.processor(images=image, return_tensors="pt")
        return out["pixel_values"][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels(i), "labels": int(self.labels[i]), "idx": i}


def image_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
        "idx": torch.tensor([item["idx"] for item in items], dtype=torch.long),
    }


def processor_digest(processor: Any) -> str:
    """What the processor does to an image (its saved configuration), as a digest."""
    config = processor.to_dict() if hasattr(processor, "to_dict") else {}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def images_digest(frame: pd.DataFrame) -> str:
    """A digest of a split's images, in order."""
    return hashlib.sha256("".join(digest_bytes(frame["image"])).encode()).hexdigest()
