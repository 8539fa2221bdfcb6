"""Run the frozen part of a model once and train on its output: the feature and prefix caches.

A method that freezes the bottom of a network makes that part a fixed function of the example.
Its output is then computed once per split, stored in ``$HUBTUNE_CACHE_DIR/features`` (default
``~/.cache/hubtune/features``) under a key of everything it depends on, and every training step
runs only what is trained. There is one mechanism with two cuts (:func:`hubtune.prefix.capture_input`):

- **at the head** (feature extraction: ``freeze`` without ``unfreeze_top_k``): the head's input
  features; each step runs the head alone;
- **at the first trained block** (``freeze`` with ``unfreeze_top_k``, ``lora`` with
  ``adapt_top_k``): the hidden states entering it (text without padding, re-padded per batch);
  each step runs the trained blocks and what follows them (:class:`hubtune.prefix.PrefixCached`).

Both are exact (tests compare logits, gradients and whole runs with and without the cache),
and a cache hit gives a bit-identical run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hubtune.errors import RunError
from hubtune.io import atomic_write_bytes
from hubtune.methods import MethodError
from hubtune.prefix import (
    PrefixCached,
    PrefixCut,
    PrefixExamples,
    PrefixUnusable,
    capture_input,
    compute_prefix,
    find_prefix_cut,
    inference_loader,
    prefix_collate,
    probe_prefix,
)
from hubtune.progress import progress

__all__ = [
    "CachedFeatures",
    "TrainingInputs",
    "cache_dir",
    "cache_key",
    "cached_tensors",
    "head_features",
    "head_inputs",
    "training_inputs",
]

logger = logging.getLogger("hubtune")


def cache_dir() -> Path:
    """Where cached features live: ``$HUBTUNE_CACHE_DIR/features`` or ``~/.cache/hubtune/features``."""
    root = os.environ.get("HUBTUNE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hubtune"
    )
    return Path(root) / "features"


def cache_key(*, model_sha: str, inputs: dict[str, Any], rows: int, cut: str) -> str:
    """Everything that changes a split's cached output: the weights, its inputs in order, the cut.

    ``inputs`` is what the task says feeds the model (texts and truncation, or images and the
    processor). Labels and the other splits do not enter, so a new training subset or a
    relabelled data set reuses what it can.
    """
    import transformers

    key = {
        **inputs,
        "version": 3,
        "model_sha": model_sha,
        "rows": rows,
        "head": cut,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cached_tensors(
    *, accelerator: Any, path: Path, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors at ``path``, computing and writing them (main process) if absent."""
    from safetensors.torch import load_file, save

    hit = path.exists()
    with accelerator.main_process_first():
        if not path.exists() and accelerator.is_main_process:
            atomic_write_bytes(path, save(compute()))
    return load_file(path), hit


def head_inputs(model: torch.nn.Module, head: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the backbone and return what it feeds the head (the features to cache)."""
    return capture_input(model, head, batch)


@torch.no_grad()
def head_features(
    model: Any,
    head: str,
    dataset: Dataset,
    collate: Any,
    batch_size: int,
    accelerator: Any,
    desc: str,
) -> dict[str, torch.Tensor]:
    """The backbone's output for every example (what the head sees), in row order."""
    model.eval()
    loader = inference_loader(dataset, batch_size, collate)
    chunks = []
    for batch in progress(loader, accelerator, f"features {desc}"):
        batch.pop("idx")
        batch.pop("labels")
        chunks.append(head_inputs(model, head, batch).float().cpu())
    width = max(c.shape[1] for c in chunks) if chunks[0].ndim == 3 else None
    if width is not None:  # token-level head inputs: pad to one length
        chunks = [F.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks]
    return {"features": torch.cat(chunks)}


class CachedFeatures(Dataset):
    """Cached backbone features (the head's input) with labels."""

    def __init__(self, features: torch.Tensor, labels: Any):
        self.features = features
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "labels": self.labels[i], "idx": i}


def prefix_cut(
    plan: Any, augmenting: bool, train: Dataset, collate: Any, main: bool
) -> tuple[PrefixCut, bool] | None:
    """Where to cut the frozen prefix off (and whether it is token-level), or None for no cache."""
    if not plan.cache_prefix:
        return None
    cut = find_prefix_cut(plan.model)
    if cut is None:
        return None
    if augmenting:
        if main:
            logger.info("prefix cache: off (data.augment makes every epoch's inputs different)")
        return None
    encodings = getattr(train, "encodings", None)
    tokens = sum(len(ids) for ids in encodings["input_ids"]) if encodings else None
    try:
        token_level = probe_prefix(plan.model, cut, train, collate, tokens=tokens)
    except PrefixUnusable as exc:
        if main:
            logger.warning("prefix cache: off, %s", exc)
        return None
    except MethodError as exc:
        raise RunError(f"method: {exc}") from None
    if main:
        logger.info("prefix cache: %s computed once; each step runs the rest", cut.describe())
    return cut, token_level


@dataclass
class TrainingInputs:
    """What the loop trains on: a data set per split, the module that runs, how it is called."""

    datasets: dict[str, Dataset]
    module: Any  # the trained module: the head, the model on cached prefixes, or the model
    collate: Any  # the loaders' collate function (None: the default one, for cached features)
    forward: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]  # (module, batch) -> logits
    info: dict[str, Any] = field(default_factory=dict)  # run.json's feature_cache record


def training_inputs(
    *,
    accelerator: Any,
    plan: Any,
    encoded: dict[str, Dataset],
    labels: dict[str, Any],
    keys: Callable[[str, str], str],
    collate: Any,
    batch_size: int,
    augmenting: bool,
) -> TrainingInputs:
    """The training inputs, with the frozen part computed once when the method allows it.

    Args:
        accelerator: The run's Accelerator (the main process writes cache files).
        plan: The method's plan (``cache_features``: cut at the head; ``cache_prefix``: cut
            at the first trained block).
        encoded: Each split, encoded by the task.
        labels: Each split's label ids (for cached features).
        keys: ``(split, cut) -> cache key`` (see :func:`cache_key`).
        collate: The task's collate function.
        batch_size: Batch size for computing the cache.
        augmenting: Whether training images are augmented (then nothing is fixed).
    """
    main = accelerator.is_main_process
    if plan.cache_features and augmenting:
        plan.cache_features = False  # augmented images differ every epoch
        if main:
            logger.info("feature cache: off (data.augment makes every epoch's images different)")
    if plan.cache_features:
        return _head_cache(accelerator, plan, encoded, labels, keys, collate, batch_size)
    cut = prefix_cut(plan, augmenting, encoded["train"], collate, main)
    if cut is not None:
        return _prefix_cache(accelerator, plan, encoded, keys, collate, batch_size, *cut)

    def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**batch).logits

    return TrainingInputs(dict(encoded), plan.model, collate, forward, {"used": False})


def _cache_splits(
    accelerator: Any,
    encoded: dict[str, Dataset],
    keys: Callable[[str, str], str],
    cut: str,
    compute: Callable[[str, Dataset], dict[str, torch.Tensor]],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bool]]:
    """Every split's cached tensors (computed on a miss) and whether each was a hit."""
    tensors, hits = {}, {}
    for split, dataset in encoded.items():
        tensors[split], hits[split] = cached_tensors(
            accelerator=accelerator,
            path=cache_dir() / f"{keys(split, cut)}.safetensors",
            compute=functools.partial(compute, split, dataset),
        )
    return tensors, hits


def _head_cache(
    accelerator: Any,
    plan: Any,
    encoded: dict[str, Dataset],
    labels: dict[str, Any],
    keys: Callable[[str, str], str],
    collate: Any,
    batch_size: int,
) -> TrainingInputs:
    def compute(split: str, dataset: Dataset) -> dict[str, torch.Tensor]:
        return head_features(
            plan.model, plan.head_name, dataset, collate, batch_size, accelerator, split
        )

    tensors, hits = _cache_splits(accelerator, encoded, keys, plan.head_name, compute)
    datasets: dict[str, Dataset] = {
        split: CachedFeatures(t["features"], labels[split]) for split, t in tensors.items()
    }

    def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["features"])

    info = {"used": True, "dir": str(cache_dir()), "hits": hits}
    return TrainingInputs(datasets, plan.model.get_submodule(plan.head_name), None, forward, info)


def _split_progress(accelerator: Any, split: str, iterable: Any, desc: str) -> Any:
    return progress(iterable, accelerator, f"{desc} {split}")


def _prefix_cache(
    accelerator: Any,
    plan: Any,
    encoded: dict[str, Dataset],
    keys: Callable[[str, str], str],
    collate: Any,
    batch_size: int,
    cut: PrefixCut,
    token_level: bool,
) -> TrainingInputs:
    # Only the trained top blocks run each step; the frozen ones ran once, here.
    def compute(split: str, dataset: Dataset) -> dict[str, torch.Tensor]:
        return compute_prefix(
            plan.model,
            cut,
            dataset,
            collate,
            batch_size,
            token_level,
            progress=functools.partial(_split_progress, accelerator, split),
        )

    tensors, hits = _cache_splits(accelerator, encoded, keys, cut.key(), compute)
    datasets: dict[str, Dataset] = {
        split: PrefixExamples(encoded[split], t["hidden"], t.get("lengths"))
        for split, t in tensors.items()
    }

    def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**batch).logits

    info = {
        "used": True,
        "kind": "prefix",
        "cached": cut.describe(),
        "dir": str(cache_dir()),
        "hits": hits,
    }
    return TrainingInputs(
        datasets, PrefixCached(plan.model, cut), prefix_collate(collate, token_level), forward, info
    )
