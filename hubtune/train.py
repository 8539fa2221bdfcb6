"""One training run, top to bottom: pull, load data, apply the method, train, evaluate, write.

The loop is our own Accelerate loop (no Trainer), so ``hubtune run RECIPE`` and
``accelerate launch [--num_processes N] -m hubtune run RECIPE`` run the same code. Only the
main process writes files; every write is atomic; a checkpoint after each epoch makes
``--resume`` continue exactly where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from hubtune import __version__
from hubtune.audit.runner import MEMBERSHIP_FILE  # per-example losses: local only, never pushed
from hubtune.data import PreparedData, load_data
from hubtune.hub import ResolvedModel, resolve_model
from hubtune.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from hubtune.launch import resolve_mixed_precision, use_cpu
from hubtune.methods import MethodError, MethodPlan, apply_method, head_inputs
from hubtune.model import (
    GROUPNORM_FILE,
    load_classifier,
    load_image_classifier,
    save_processor,
)
from hubtune.prefix import (
    PrefixCached,
    PrefixCut,
    PrefixExamples,
    PrefixUnusable,
    compute_prefix,
    example_lengths,
    find_prefix_cut,
    inference_loader,
    prefix_collate,
    probe_prefix,
)
from hubtune.privacy import (
    VOID_REASON,
    PrivacyError,
    PrivacyRun,
    SpentBudget,
    add_position_ids,
    batchnorm_in_train_mode,
    check_per_sample_gradients,
    compute_epsilons,
    forward_takes_position_ids,
    guarantee_is_void,
    prepare_private,
    refuse_trainable_batchnorm,
)
from hubtune.recipe import Recipe, recipe_to_yaml
from hubtune.rundir import PRIVACY_FILE

__all__ = ["RunError", "RunResult", "run_recipe", "feature_cache_dir"]

logger = logging.getLogger("hubtune")

RUN_SCHEMA_VERSION = 1
# Test hook: called on the main process after each epoch's checkpoint (simulates a crash).
_after_checkpoint: Callable[[int], None] | None = None


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    resumed_from_epoch: int | None = None
    audit: dict[str, Any] | None = None
    push: dict[str, Any] | None = None


# --------------------------------------------------------------------------- data sets


class _Encoded(Dataset):
    """Tokenised examples; padding happens per batch in the collator."""

    def __init__(self, encodings: dict[str, list[Any]], labels: np.ndarray):
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {key: values[i] for key, values in self.encodings.items()}
        item["labels"] = int(self.labels[i])
        item["idx"] = i
        return item


class _Features(Dataset):
    """Cached backbone features (the head's input) with labels."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray):
        self.features = features
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "labels": self.labels[i], "idx": i}


def _encode(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> _Encoded:
    pair = frame["text_pair"].tolist() if "text_pair" in frame else None
    encodings = tokenizer(frame["text"].tolist(), pair, truncation=True, max_length=max_length)
    return _Encoded(dict(encodings), frame["label"].to_numpy())


def _collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        idx = torch.tensor([item.pop("idx") for item in items])
        batch = dict(pad(items))
        batch["idx"] = idx
        return batch

    return collate


def feature_cache_dir() -> Path:
    """Where cached backbone features live: ``$HUBTUNE_CACHE_DIR`` or ``~/.cache/hubtune``."""
    root = os.environ.get("HUBTUNE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hubtune"
    )
    return Path(root) / "features"


def _feature_cache_key(
    resolved: ResolvedModel, frame: pd.DataFrame, recipe: Recipe, head: str, processor: Any = None
) -> str:
    """Everything that changes a split's features: the weights, its inputs in order, the preprocessing.

    Labels and the other splits do not enter, so a new training subset or a relabelled data set
    reuses the features it can.
    """
    import transformers

    key: dict[str, Any]
    if "image" in frame:
        from hubtune.images import images_digest, processor_digest

        key = {"images": images_digest(frame), "processor": processor_digest(processor)}
    else:
        columns = ["text"] + (["text_pair"] if "text_pair" in frame else [])
        texts = hashlib.sha256(
            pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes()
        )
        key = {"texts": texts.hexdigest(), "max_length": recipe.model.max_length}
    key.update(
        {
            "version": 3,
            "model_sha": resolved.sha,
            "rows": len(frame),
            "head": head,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    )
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _cached_tensors(
    *, accelerator: Any, path: Path, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors at ``path``, computing and writing them (main process) if absent."""
    from safetensors.torch import load_file, save

    hit = path.exists()
    with accelerator.main_process_first():
        if not path.exists() and accelerator.is_main_process:
            atomic_write_bytes(path, save(compute()))
    return load_file(path), hit


def _head_features(
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
    for batch in _progress(loader, accelerator, f"features {desc}"):
        batch.pop("idx")
        batch.pop("labels")
        chunks.append(head_inputs(model, head, batch).float().cpu())
    width = max(c.shape[1] for c in chunks) if chunks[0].ndim == 3 else None
    if width is not None:  # token-level head inputs: pad to one length
        chunks = [F.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks]
    return {"features": torch.cat(chunks)}


def _prefix_cut(
    plan: MethodPlan, augmenting: bool, train: Dataset, collate: Any, main: bool
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


def _split_progress(accelerator: Any, split: str, iterable: Any, desc: str) -> Any:
    return _progress(iterable, accelerator, f"{desc} {split}")


def _progress(iterable: Any, accelerator: Any, desc: str) -> Any:
    from tqdm.auto import tqdm

    quiet = os.environ.get("HUBTUNE_PROGRESS", "1").lower() in ("0", "false", "no", "off")
    return tqdm(
        iterable, desc=desc, leave=False, disable=quiet or not accelerator.is_local_main_process
    )


# --------------------------------------------------------------------------- metrics


def _metrics(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    loss = F.cross_entropy(logits.float(), labels).item()
    predictions = logits.argmax(-1)
    return {
        "loss": loss,
        "accuracy": (predictions == labels).float().mean().item(),
        "macro_f1": float(
            f1_score(
                labels.numpy(),
                predictions.numpy(),
                labels=list(range(num_labels)),
                average="macro",
                zero_division=0,
            )
        ),
    }


@torch.no_grad()
def _predict(
    accelerator: Any, model: Any, loader: DataLoader, forward: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for a whole split, gathered from every process, in row order."""
    model.eval()
    all_logits, all_labels, all_idx = [], [], []
    for batch in loader:
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        logits = forward(model, batch)
        logits, labels, idx = accelerator.gather_for_metrics((logits.float(), labels, idx))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
    order = torch.cat(all_idx).argsort()
    return torch.cat(all_logits)[order], torch.cat(all_labels)[order]


# --------------------------------------------------------------------------- run directory


def _recipe_digest(recipe: Recipe) -> str:
    # train.epochs may grow on resume; everything else must match the checkpoint.
    payload = recipe.model_dump(mode="json")
    payload["train"].pop("epochs")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    done = (
        [p for p in folder.glob("epoch-*") if (p / "trainer_state.json").exists()]
        if folder.exists()
        else []
    )
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        return
    if resume or not run_dir.exists():
        return
    if (run_dir / "run.json").exists():
        raise RunError(
            f"{run_dir} already holds a finished run. Use --overwrite to replace it, or change `name`."
        )
    if _latest_checkpoint(run_dir) is not None:
        raise RunError(
            f"{run_dir} holds an interrupted run. Use --resume to continue it, or --overwrite to start over."
        )


def _hardware(accelerator: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"hubtune": __version__}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "huggingface_hub",
        "opacus",
        "safetensors",
        "timm",
        "torchvision",
        "pillow",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat


def _predictions_frame(
    data: PreparedData, logits: torch.Tensor, labels: torch.Tensor
) -> pd.DataFrame:
    test = data.splits["test"]
    probs = torch.softmax(logits.float(), dim=-1).numpy()
    predicted = probs.argmax(-1)
    names = np.array(data.label_names, dtype=object)
    frame = pd.DataFrame(
        {
            "row_id": test["row_id"].to_numpy(),
            "label": names[labels.numpy()],
            "prediction": names[predicted],
            "label_id": labels.numpy().astype("int64"),
            "prediction_id": predicted.astype("int64"),
        }
    )
    for k, name in enumerate(data.label_names):
        frame[f"prob_{name}"] = probs[:, k]
    for column in data.sensitive_columns:
        frame[column] = test[column].to_numpy()
    return frame


@torch.no_grad()
def _membership_scores(
    *,
    accelerator: Any,
    model: Any,
    forward: Callable[..., torch.Tensor],
    datasets: dict[str, Dataset],
    data: PreparedData,
    collate: Any,
    batch_size: int,
    max_members: int,
    seed: int,
    test_outputs: tuple[torch.Tensor, torch.Tensor],
) -> pd.DataFrame:
    """Per-example losses of training rows (members), held-out rows and canaries.

    Members are a seeded sample of at most ``max_members`` real training rows (canaries are
    scored separately); non-members are every validation and test row. ``test_outputs`` are
    the test split's (logits, labels), already computed for the test metrics.
    """
    train = data.splits["train"]
    real = np.flatnonzero(~train["row_id"].str.startswith("canary:").to_numpy())
    if len(real) > max_members:
        real = np.sort(
            np.random.default_rng([seed, 0x3E3B]).choice(real, max_members, replace=False)
        )
    parts = []
    sources: list[tuple[str, Dataset, pd.DataFrame]] = [
        ("train", Subset(datasets["train"], real.tolist()), train.iloc[real]),
        ("validation", datasets["validation"], data.splits["validation"]),
        ("test", datasets["test"], data.splits["test"]),
    ]
    if data.canaries is not None:
        sources.append(("canaries", datasets["canaries"], data.canaries))
    for split, dataset, frame in sources:
        if split == "test":
            logits, labels = test_outputs
        else:
            loader = accelerator.prepare(
                DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
            )
            logits, labels = _predict(accelerator, model, loader, forward)
        losses = F.cross_entropy(logits.float(), labels, reduction="none").numpy()
        part = pd.DataFrame(
            {
                "row_id": frame["row_id"].to_numpy(),
                "split": split,
                "member": split == "train",
                "loss": losses.astype("float64"),
                "predicts_label": (logits.argmax(-1) == labels).numpy(),
            }
        )
        if split == "canaries":
            part["member"] = frame["included"].to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _write_parquet(path: Path, frame: pd.DataFrame, metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"hubtune": json.dumps(metadata).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


# --------------------------------------------------------------------------- the run


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    recipe_source: str | None = None,
) -> RunResult:
    """Train, evaluate, audit and (if the recipe says so) push, into ``<output_dir>/<name>/``.

    Args:
        recipe: A validated recipe.
        resume: Continue from the latest checkpoint of an interrupted run.
        overwrite: Delete an existing run directory of the same name first.
        recipe_source: Where the recipe came from (recorded in run.json).

    Raises:
        InputError: the model or data source cannot be used as given (nothing was started).
        RunError: the run started and stopped; see also DataError and MethodError.
    """
    from hubtune.hub import hub_endpoint
    from hubtune.inputs import check_inputs

    with hub_endpoint(recipe.hub.endpoint, local_root=recipe.hub.local_root):
        # Before the run folder is touched: a missing file or unknown model neither starts a
        # run nor, with --overwrite, deletes the previous one.
        check_inputs(recipe)
        result = _train(recipe, resume=resume, overwrite=overwrite, recipe_source=recipe_source)
        if result.audit is not None and recipe.push.enabled:
            result.push = _push_after_run(recipe)
    return result


def _push_after_run(recipe: Recipe) -> dict[str, Any]:
    from hubtune.push import PushError, push_run

    assert recipe.push.repo_id is not None
    try:
        pushed = push_run(
            recipe.run_dir,
            repo_id=recipe.push.repo_id,
            private=recipe.push.private,
            space_id=recipe.push.space_id,
            allow_failing_audit=recipe.push.allow_failing_audit,
            include_membership_audit=recipe.push.include_membership_audit,
        )
    except PushError as exc:
        raise RunError(
            f"training and audit finished (outputs in {recipe.run_dir}), but the push was refused: {exc}"
        ) from None
    return asdict(pushed)


def _train(
    recipe: Recipe,
    *,
    resume: bool,
    overwrite: bool,
    recipe_source: str | None,
) -> RunResult:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    run_dir = recipe.run_dir
    # The precision actually used is recorded in the resolved recipe (and so in the card).
    recipe.train.mixed_precision = _mixed_precision(recipe)  # type: ignore[assignment]
    accelerator = Accelerator(
        # Several processes without a GPU: Accelerate only picks gloo/MULTI_CPU when told cpu=True.
        cpu=use_cpu()
        or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1),
        mixed_precision=recipe.train.mixed_precision,
        log_with=list(recipe.train.log_with) or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "logs")
        ),
        # A seedable sampler makes the shuffle order a function of (seed, epoch), so a resumed
        # run sees exactly the batches an uninterrupted one would.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process
    if main:
        _check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    checkpoint = _latest_checkpoint(run_dir) if resume else None
    if resume and (run_dir / "run.json").exists():
        done_epochs = int(checkpoint.name.split("-")[1]) if checkpoint is not None else None
        if done_epochs is None or done_epochs >= recipe.train.epochs:
            raise RunError(
                f"{run_dir} is already complete; nothing to resume (raise train.epochs to train on from its "
                "last checkpoint, or use --overwrite to train again)"
            )
    if resume and checkpoint is None and main:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    state, spent = _checkpoint_state(checkpoint, recipe) if checkpoint is not None else ({}, None)
    set_seed(recipe.seed)

    # 1. model files, pinned
    t0 = time.perf_counter()
    with accelerator.main_process_first():
        resolved = resolve_model(
            recipe.model.id, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle
        )
    if main:
        logger.info("model: %s @ %s (%s)", recipe.model.id, resolved.sha, resolved.local_dir)
    # 2. data
    with accelerator.main_process_first():
        data = load_data(
            recipe.data,
            seed=recipe.seed,
            canaries=recipe.audit.canaries if recipe.audit.enabled else 0,
            task=recipe.model.task,
        )
    if main:
        logger.info(
            "data: %s rows kept %s, dropped %s", data.fingerprint[:12], data.rows_kept, data.dropped
        )
    # 3. model + method
    images = recipe.model.task == "image-classification"
    loader_fn = load_image_classifier if images else load_classifier
    # ``tokenizer`` is the model's preprocessor: a tokenizer, or an image processor.
    tokenizer, model, newly = loader_fn(resolved, recipe.model, label_names=data.label_names)
    plan: MethodPlan = apply_method(
        model,
        recipe.method,
        lr=recipe.lr,
        weight_decay=recipe.train.weight_decay,
        newly_initialized=newly,
        base_model_name_or_path=recipe.model.id
        if resolved.kind == "hub"
        else str(resolved.local_dir),
        base_model_revision=resolved.sha if resolved.kind == "hub" else None,
    )
    counts = plan.counts
    if recipe.dp:
        # Refusals that need only the model come before any expensive work (feature caches).
        try:
            refuse_trainable_batchnorm(plan.model)
        except PrivacyError as exc:
            raise RunError(f"privacy: {exc}") from None
    if main:
        logger.info(
            "method: %s, %s of %s parameters trainable (%.2f%%)",
            plan.name,
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
            100 * counts["trainable"] / counts["total"],
        )
    timings["load_s"] = time.perf_counter() - t0

    # 4. data loaders (cached features when the backbone is frozen)
    t0 = time.perf_counter()
    frames = dict(data.splits)
    if data.canaries is not None:
        frames["canaries"] = data.canaries
    encoded: dict[str, Dataset]
    if images:
        from hubtune.images import ImageExamples, image_collate

        collate: Any = image_collate
        encoded = {
            split: ImageExamples(
                frame["image"],
                frame["label"].to_numpy(),
                tokenizer,
                augment=recipe.data.augment if split == "train" else None,
                seed=recipe.seed,
            )
            for split, frame in frames.items()
        }
    else:
        collate = _collator(tokenizer)
        encoded = {
            split: _encode(tokenizer, frame, recipe.model.max_length)
            for split, frame in frames.items()
        }
    augmenting = recipe.data.augment is not None and recipe.data.augment.active
    if plan.cache_features and augmenting:
        # Augmented images differ every epoch, so their features cannot be computed once.
        plan.cache_features = False
        if main:
            logger.info("feature cache: off (data.augment makes every epoch's images different)")
    cache_info: dict[str, Any] = {"used": plan.cache_features}
    cut = _prefix_cut(plan, augmenting, encoded["train"], collate, main)
    if plan.cache_features:
        datasets: dict[str, Dataset] = {}
        hits = {}
        for split, frame in frames.items():
            key = _feature_cache_key(resolved, frame, recipe, plan.head_name, tokenizer)
            tensors, hits[split] = _cached_tensors(
                accelerator=accelerator,
                path=feature_cache_dir() / f"{key}.safetensors",
                compute=functools.partial(
                    _head_features,
                    model,
                    plan.head_name,
                    encoded[split],
                    collate,
                    recipe.train.eval_batch_size,
                    accelerator,
                    split,
                ),
            )
            datasets[split] = _Features(tensors["features"], frame["label"].to_numpy())
        cache_info.update({"dir": str(feature_cache_dir()), "hits": hits})
        trained_module = model.get_submodule(plan.head_name)
        loader_collate = None

        def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return module(batch["features"])
    else:
        datasets = dict(encoded)
        trained_module = plan.model
        loader_collate = collate
        if cut is not None:
            # Only the trained top blocks run each step; the frozen ones ran once, here.
            prefix, token_level = cut
            datasets, hits = {}, {}
            for split, frame in frames.items():
                key = _feature_cache_key(resolved, frame, recipe, prefix.key(), tokenizer)
                tensors, hits[split] = _cached_tensors(
                    accelerator=accelerator,
                    path=feature_cache_dir() / f"{key}.safetensors",
                    compute=functools.partial(
                        compute_prefix,
                        plan.model,
                        prefix,
                        encoded[split],
                        collate,
                        recipe.train.eval_batch_size,
                        token_level,
                        progress=functools.partial(_split_progress, accelerator, split),
                    ),
                )
                datasets[split] = PrefixExamples(
                    encoded[split], tensors["hidden"], tensors.get("lengths")
                )
            cache_info = {
                "used": True,
                "kind": "prefix",
                "cached": prefix.describe(),
                "dir": str(feature_cache_dir()),
                "hits": hits,
            }
            trained_module = PrefixCached(plan.model, prefix)
            loader_collate = prefix_collate(collate, token_level)

        def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return module(**batch).logits

    timings["features_s"] = time.perf_counter() - t0

    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader: Any = DataLoader(
        datasets["train"],
        batch_size=recipe.train.batch_size,
        shuffle=True,
        collate_fn=loader_collate,
        generator=generator,
    )
    eval_loaders = {
        split: DataLoader(
            datasets[split], batch_size=recipe.train.eval_batch_size, collate_fn=loader_collate
        )
        for split in ("validation", "test")
    }
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(plan.param_groups, momentum=recipe.train.momentum)
        if recipe.train.optimizer == "sgd"
        else torch.optim.AdamW(plan.param_groups)
    )
    dp_run: PrivacyRun | None = None
    if recipe.dp:
        assert recipe.privacy is not None
        # The DP loader must not go through accelerator.prepare: it would re-batch and reshard
        # the Poisson sampler. Only the (non-private) evaluation loaders are prepared.
        val_loader, test_loader = accelerator.prepare(
            eval_loaders["validation"], eval_loaders["test"]
        )
        try:
            dp_run = prepare_private(
                section=recipe.privacy,
                model=trained_module,
                optimizer=optimizer,
                dataset=datasets["train"],
                collate=loader_collate,
                epochs=recipe.train.epochs,
                num_processes=accelerator.num_processes,
                device=accelerator.device,
                prior_history=_prior_privacy_history(resolved),
                spent=spent,
            )
        except PrivacyError as exc:
            raise RunError(f"privacy: {exc}") from None
        trained_module, optimizer = dp_run.model, dp_run.optimizer
        accelerator.register_for_checkpointing(
            dp_run.model, dp_run.optimizer, dp_run.engine.accountant
        )
        steps_per_epoch = round(1 / dp_run.q)
        lengths = example_lengths(datasets["train"])
        needs_position_ids = not plan.cache_features and forward_takes_position_ids(plan.model)
        if not plan.cache_features:
            # Frozen parts (BatchNorm above all) run in eval mode in the preflight too: its one
            # forward pass must neither mix examples nor move pretrained statistics.
            plan.train_mode(plan.model)
        _dp_preflight(
            dp_run,
            datasets["train"],
            loader_collate,
            forward,
            accelerator.device,
            needs_position_ids,
        )
        if main:
            logger.info(
                "privacy: n=%d q=%.5f (expected batch %.1f) sigma=%.4f C=%g delta=%.3g, %d steps planned, budget "
                "allows %d",
                dp_run.n,
                dp_run.q,
                dp_run.q * dp_run.n,
                dp_run.sigma,
                dp_run.max_grad_norm,
                dp_run.delta,
                recipe.train.epochs * steps_per_epoch,
                dp_run.max_steps,
            )
    else:
        trained_module, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            trained_module,
            optimizer,
            train_loader,
            eval_loaders["validation"],
            eval_loaders["test"],
        )
        steps_per_epoch = len(train_loader)
    total_steps = recipe.train.epochs * steps_per_epoch
    warmup = int(recipe.train.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    accelerator.register_for_checkpointing(scheduler)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if dp_run is not None:
            _load_dp_rng(dp_run, checkpoint, accelerator.process_index)
            _check_restored_budget(dp_run, spent)
        history = state["history"]
        start_epoch = state["epoch"] + 1
        if main:
            logger.info("resumed from %s (epoch %d done)", checkpoint, state["epoch"] + 1)
    if recipe.train.log_with:
        accelerator.init_trackers(recipe.name, config=_flat_config(recipe))

    # 5. train
    t0 = time.perf_counter()
    num_labels = len(data.label_names)
    step = start_epoch * steps_per_epoch
    initial = None
    if dp_run is not None and checkpoint is None:
        # Opacus + peft has shipped LoRA weights that never move while ε grows (opacus #820).
        initial = {
            n: p.detach().clone() for n, p in trained_module.named_parameters() if p.requires_grad
        }
    for epoch in range(start_epoch, recipe.train.epochs):
        epoch_start = time.perf_counter()
        if plan.cache_features:
            trained_module.train()
        else:
            plan.train_mode(plan.model)
        if hasattr(datasets["train"], "set_epoch"):
            datasets["train"].set_epoch(epoch)  # the epoch's augmentation draws
        if dp_run is not None:
            mixing = batchnorm_in_train_mode(trained_module)
            if mixing:
                raise RunError(
                    f"privacy: BatchNorm layer(s) in training mode ({', '.join(mixing[:3])}) would mix the "
                    "examples of a batch and void the DP guarantee; this is a bug in hubtune's method "
                    "plan, please report it"
                )
            if dp_run.steps_taken >= dp_run.max_steps:
                dp_run.stopped_by_budget = dp_run.max_steps < total_steps
                break
            running, seen, step, sizes = _dp_epoch(
                accelerator=accelerator,
                run=dp_run,
                forward=forward,
                scheduler=scheduler,
                epoch=epoch,
                epochs=recipe.train.epochs,
                step=step,
                initial=initial,
                needs_position_ids=needs_position_ids,
                lengths=lengths,
            )
            initial = None
            extra = {
                "train_epoch_s": time.perf_counter() - epoch_start,
                "dp_logical_batch_sizes": _sum_over_processes(accelerator, sizes),
            }
        else:
            running, seen, step = _plain_epoch(
                accelerator=accelerator,
                model=trained_module,
                optimizer=optimizer,
                scheduler=scheduler,
                loader=train_loader,
                forward=forward,
                epoch=epoch,
                epochs=recipe.train.epochs,
                step=step,
                max_grad_norm=recipe.train.max_grad_norm,
            )
            extra = {"train_epoch_s": time.perf_counter() - epoch_start}
        _finish_epoch(
            accelerator,
            trained_module,
            val_loader,
            forward,
            num_labels,
            epoch,
            step,
            running,
            seen,
            history,
            recipe,
            run_dir,
            dp_run,
            extra=extra,
        )
    timings["train_s"] = time.perf_counter() - t0

    # 6. test + outputs
    t0 = time.perf_counter()
    logits, labels = _predict(accelerator, trained_module, test_loader, forward)
    test = _metrics(logits, labels, num_labels)
    train_labels = data.splits["train"]["label"].to_numpy()
    majority = int(np.bincount(train_labels, minlength=num_labels).argmax())
    baseline = float((labels.numpy() == majority).mean())
    timings["test_s"] = time.perf_counter() - t0
    membership = None
    if recipe.audit.enabled:
        t0 = time.perf_counter()
        membership = _membership_scores(
            accelerator=accelerator,
            model=trained_module,
            forward=forward,
            datasets=datasets,
            data=data,
            collate=loader_collate,
            batch_size=recipe.train.eval_batch_size,
            max_members=recipe.audit.membership_rows,
            seed=recipe.seed,
            test_outputs=(logits, labels),
        )
        timings["membership_s"] = time.perf_counter() - t0
    if dp_run is not None and dp_run.stopped_by_budget and main:
        logger.warning(
            "privacy: the budget guard stopped training after %d steps (epsilon target %s)",
            dp_run.steps_taken,
            dp_run.target_epsilon,
        )
    metrics = {
        "test": test,
        "majority_baseline": {"label": data.label_names[majority], "accuracy": baseline},
        "history": history,
    }
    accelerator.wait_for_everyone()
    if main:
        unwrapped = accelerator.unwrap_model(trained_module)
        predictions = _predictions_frame(data, logits, labels)
        ledger = (
            dp_run.ledger(
                trained_names=plan.trainable_names,
                trained_count=counts["trainable"],
                batch_sizes=[b for h in history for b in h.get("dp_logical_batch_sizes", [])],
            )
            if dp_run is not None
            else None
        )
        _write_outputs(
            run_dir=run_dir,
            recipe=recipe,
            plan=plan,
            model=plan.model
            if (plan.cache_features or cut is not None or dp_run is not None)
            else unwrapped,
            tokenizer=tokenizer,
            predictions=predictions,
            metrics=metrics,
            data=data,
            ledger=ledger,
        )
        if membership is not None:
            _write_parquet(
                run_dir / MEMBERSHIP_FILE,
                membership,
                {
                    "note": "per-example losses for the membership audit; never publish (see audits/README.md)"
                },
            )
        timings["total_s"] = time.perf_counter() - t_start
        run_info = {
            "schema_version": RUN_SCHEMA_VERSION,
            "status": "completed",
            "name": recipe.name,
            "recipe_source": recipe_source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed_from_epoch": start_epoch if checkpoint is not None else None,
            "versions": _versions(),
            "base_model": resolved.to_dict(),
            "data": data.summary(),
            "method": plan.summary(),
            "newly_initialized": newly,
            "feature_cache": cache_info,
            "outputs": {"model_dir": "adapter" if plan.name == "lora" else "model"},
            "timings": timings,
            "hardware": _hardware(accelerator),
            "test": test,
            "majority_baseline": metrics["majority_baseline"],
            "privacy": _privacy_summary(ledger) if ledger is not None else {"enabled": False},
        }
        # run.json is written last: its presence marks a complete run.
        atomic_write_json(run_dir / "run.json", run_info)
        if (run_dir / "checkpoints").exists() and not recipe.train.checkpoint:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers (and the process group): nothing collective after this
    audit = _audit_after_run(recipe) if main and recipe.audit.enabled else None
    return RunResult(
        run_dir=run_dir,
        metrics=metrics,
        resumed_from_epoch=start_epoch if checkpoint else None,
        audit=audit,
    )


def _audit_after_run(recipe: Recipe) -> dict[str, Any]:
    """The recipe's audit, on the main process only, after the process group is gone."""
    from hubtune.audit import AuditError, run_audit, train_nonprivate_twin

    t0 = time.perf_counter()
    try:
        twin = train_nonprivate_twin(recipe.run_dir) if recipe.audit.compare_nonprivate else None
        audit = run_audit(recipe.run_dir, policy=recipe.audit.policy, compare=twin)
    except (AuditError, ValueError, OSError) as exc:
        raise RunError(
            f"training finished and its outputs are in {recipe.run_dir}, but the audit failed: {exc}. "
            f"Retry it with `hubtune audit {recipe.run_dir}`."
        ) from exc
    logger.info("audit: %s in %.1f s", audit["verdict"]["status"], time.perf_counter() - t0)
    return audit


def _finish_epoch(
    accelerator: Any,
    model: Any,
    val_loader: Any,
    forward: Any,
    num_labels: int,
    epoch: int,
    step: int,
    running: float,
    seen: int,
    history: list[dict[str, Any]],
    recipe: Recipe,
    run_dir: Path,
    dp_run: PrivacyRun | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Evaluate on the validation split, log, and write the epoch's checkpoint."""
    logits, labels = _predict(accelerator, model, val_loader, forward)
    val = _metrics(logits, labels, num_labels)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": running / max(1, seen),
        **{f"val_{k}": v for k, v in val.items()},
    }
    record.update(extra or {})
    if dp_run is not None:
        record["epsilon"] = compute_epsilons(dp_run.full_history(), dp_run.delta)[dp_run.accountant]
    history.append(record)
    scalars = {k: v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
    accelerator.log(scalars, step=epoch + 1)
    if accelerator.is_main_process:
        logger.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_accuracy %.4f val_macro_f1 %.4f%s",
            epoch + 1,
            record["train_loss"],
            val["loss"],
            val["accuracy"],
            val["macro_f1"],
            f" epsilon {record['epsilon']:.3f}" if "epsilon" in record else "",
        )
    if recipe.train.checkpoint:
        _save_checkpoint(accelerator, run_dir, epoch, history, recipe, dp_run)


def _plain_epoch(
    *,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    forward: Any,
    epoch: int,
    epochs: int,
    step: int,
    max_grad_norm: float | None,
) -> tuple[float, int, int]:
    """One non-private epoch through the Accelerate-prepared loader."""
    loader.set_epoch(epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    running, seen = 0.0, 0
    bar = _progress(loader, accelerator, f"epoch {epoch + 1}/{epochs}")
    for batch in bar:
        batch.pop("idx")
        labels = batch.pop("labels")
        logits = forward(model, batch)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise RunError(
                f"non-finite loss at epoch {epoch + 1}, step {step}; stopped. The last good checkpoint is kept "
                "(lower train.lr, or check the data)."
            )
        accelerator.backward(loss)
        if max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item() * len(labels)
        seen += len(labels)
        step += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
    return running, seen, step


def _dp_epoch(
    *,
    accelerator: Any,
    run: PrivacyRun,
    forward: Any,
    scheduler: Any,
    epoch: int,
    epochs: int,
    step: int,
    initial: dict[str, torch.Tensor] | None,
    needs_position_ids: bool,
    lengths: list[int] | None = None,
) -> tuple[float, int, int, list[int]]:
    """One DP-SGD epoch: Poisson logical batches, split into physical ones by BatchMemoryManager.

    With ``lengths`` (text), each logical batch is ordered by length before it is split, so the
    physical batches pad less. The logical batch (the examples the mechanism sampled) and its
    clipped-gradient sum, noise and accounting are unchanged.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    seen = 0
    sizes: list[int] = []  # examples in each logical (Poisson) batch, this process
    current = 0
    model, optimizer = run.model, run.optimizer
    # The loss sum and a non-finite-loss flag stay on the device: the host never waits for a
    # pass to finish (it used to read the loss twice per physical pass, draining a GPU's queue).
    running = torch.zeros((), device=accelerator.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    pending: tuple[Callable[[], list[bool]], int, int] | None = None  # the last step's checks
    source = run.loader
    if lengths is not None:
        source = DataLoader(
            source.dataset,
            batch_sampler=_LengthSorted(source.batch_sampler, lengths),
            collate_fn=source.collate_fn,
            generator=source.generator,
        )
    with BatchMemoryManager(
        data_loader=source, max_physical_batch_size=run.physical_batch_size, optimizer=optimizer
    ) as loader:
        for batch in _progress(loader, accelerator, f"epoch {epoch + 1}/{epochs} (DP)"):
            if run.steps_taken >= run.max_steps:
                # Budget guard: one more step would take ε past the target.
                run.stopped_by_budget = True
                break
            batch.pop("idx", None)
            # non_blocking: a blocking host-to-GPU copy waits for all queued work first.
            labels = batch.pop("labels").to(accelerator.device, non_blocking=True)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            if needs_position_ids:
                add_position_ids(batch)
            with accelerator.autocast():
                logits = forward(model, batch)
            if len(labels) == 0:
                # An empty Poisson batch is a real step of the mechanism: no example, zero
                # clipped gradient, the noise alone. A mean over no examples would be NaN.
                loss = logits.float().sum() * 0.0
            elif run.criterion is not None:
                loss = run.criterion(logits.float(), labels)
            else:
                loss = F.cross_entropy(logits.float(), labels)
            detached = loss.detach()
            nonfinite |= ~torch.isfinite(detached)
            running += detached.float() * len(labels)
            loss.backward()
            optimizer.step()
            current += len(labels)
            if not optimizer._is_last_step_skipped:  # a logical (Poisson) batch is complete
                sizes.append(current)
                current = 0
                scheduler.step()
                step += 1
                # The loss flag and every trained tensor's finiteness, copied to the host
                # without waiting; the copy is read at the next logical step (long done by
                # then), so the GPU queue never drains for it. A NaN reaches only weights that
                # are discarded: the run stops here or at the loop's end, before any save.
                flags = torch.stack([nonfinite, _any_nonfinite(trained, nonfinite.device)])
                previous, pending = pending, (_read_later(flags), epoch, step)
                if previous is not None:
                    _stop_if_nonfinite(model, *previous)
                if initial is not None:
                    _check_moved(model, initial)
                    initial = None
            optimizer.zero_grad(set_to_none=True)
            seen += len(labels)
    if pending is not None:
        _stop_if_nonfinite(model, *pending)
    return float(running), seen, step, sizes


def _read_later(flags: torch.Tensor) -> Callable[[], list[bool]]:
    """Start copying a small device tensor to the host; the returned function waits for it.

    On a GPU the copy goes to pinned memory behind a CUDA event, so neither starting it nor
    reading it a step later stalls the host on the work queued in between.
    """
    if flags.device.type == "cuda":
        host = flags.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read() -> list[bool]:
            done.synchronize()
            return host.tolist()

        return read
    return flags.tolist


def _stop_if_nonfinite(model: Any, read: Callable[[], list[bool]], epoch: int, step: int) -> None:
    loss_bad, weights_bad = read()
    if loss_bad:
        raise RunError(
            f"non-finite loss at epoch {epoch + 1}, step {step}; stopped. The last good "
            "checkpoint is kept (lower train.lr, or check the data)."
        )
    if weights_bad:
        bad = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(p).all()
        ]
        if bad:  # else a finite tensor's norm overflowed: nothing is wrong
            raise RunError(
                f"non-finite weights after step {step} ({', '.join(bad[:3])}); stopped. The "
                "last good checkpoint is kept."
            )


@torch.no_grad()
def _any_nonfinite(tensors: Sequence[torch.Tensor], device: Any = None) -> torch.Tensor:
    """A device-side flag: does any tensor hold a NaN or an infinity?

    One fused norm over all tensors (a single kernel launch per device and dtype on a GPU)
    instead of two reductions per tensor: a NaN or inf makes its tensor's norm non-finite. The
    converse can fail only when a finite tensor's norm overflows, so a caller that sees the flag
    names the culprits with an exact per-tensor check.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack(torch._foreach_norm(list(tensors))).isfinite().all().logical_not()


class _LengthSorted:
    """A Poisson batch sampler whose batches come out ordered by example length (same examples)."""

    def __init__(self, sampler: Any, lengths: list[int]):
        self.sampler = sampler
        self.lengths = lengths

    def __iter__(self) -> Any:
        for batch in self.sampler:
            yield sorted(batch, key=lambda i: self.lengths[i])  # stable: deterministic order

    def __len__(self) -> int:
        return len(self.sampler)


def _sum_over_processes(accelerator: Any, sizes: list[int]) -> list[int]:
    """Per-step batch sizes summed over processes (each process samples its own shard)."""
    if accelerator.num_processes == 1:
        return sizes
    tensor = torch.tensor(sizes, dtype=torch.long, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(tensor, reduction="sum").cpu()]


def _check_moved(model: Any, initial: dict[str, torch.Tensor]) -> None:
    unchanged = [
        n
        for n, p in model.named_parameters()
        if n in initial and torch.equal(p.detach(), initial[n])
    ]
    if unchanged:
        raise RunError(
            f"DP training left {len(unchanged)} trained tensor(s) unchanged after the first step "
            f"({', '.join(unchanged[:4])}): their gradients never reach the DP optimizer, so ε would grow "
            "while they do not learn (cf. opacus #820). Stopped."
        )


def _dp_preflight(
    run: PrivacyRun,
    dataset: Dataset,
    collate: Any,
    forward: Any,
    device: torch.device,
    needs_position_ids: bool,
) -> None:
    """On one real batch: every trainable tensor gets a per-example gradient of the batch's size."""
    size = min(4, len(dataset))  # type: ignore[arg-type]
    items = [dataset[i] for i in range(size)]
    batch = collate(items) if collate is not None else torch.utils.data.default_collate(items)
    batch.pop("idx", None)
    batch = {k: v.to(device) for k, v in batch.items()}
    if needs_position_ids:
        add_position_ids(batch)
    try:
        check_per_sample_gradients(run, batch, forward)
    except PrivacyError as exc:
        raise RunError(f"privacy: {exc}") from None


def _prior_privacy_history(resolved: ResolvedModel) -> list[tuple[float, float, int]]:
    """The DP history of a base model that hubtune trained with DP (its ε keeps counting)."""
    ledger = resolved.local_dir / PRIVACY_FILE
    if not ledger.exists():
        return []
    data = json.loads(ledger.read_text())
    history = [tuple(h) for h in data.get("prior_history", []) + data.get("history", [])]
    logger.info(
        "privacy: base model was trained with DP (epsilon %.3g); its history is carried on",
        data.get("epsilon", float("nan")),
    )
    return history  # type: ignore[return-value]


def _mixed_precision(recipe: Recipe) -> str:
    try:
        return resolve_mixed_precision(recipe.train.mixed_precision, dp=recipe.dp)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _checkpoint_state(
    checkpoint: Path, recipe: Recipe
) -> tuple[dict[str, Any], SpentBudget | None]:
    """The checkpoint's trainer state and, under DP, the budget it spent; checked against the recipe.

    Read before anything is planned: a resumed DP run plans its remaining noise from what the
    checkpoint spent, never from the plan of the first run.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["recipe_digest"] != _recipe_digest(recipe):
        raise RunError(
            f"--resume: the recipe differs from the one {checkpoint} was trained with (only train.epochs may "
            "change). Resume with the same recipe, or use --overwrite to start over."
        )
    if not recipe.dp:
        return state, None
    if "dp" not in state:
        raise RunError(
            f"--resume: {checkpoint} was written by an older hubtune that did not record the DP budget it "
            "spent, so the rest of the budget cannot be planned safely. Use --overwrite to train again."
        )
    return state, SpentBudget.from_json(state["dp"])


def _check_restored_budget(run: PrivacyRun, spent: SpentBudget | None) -> None:
    """The accountant and optimizer restored from the checkpoint agree with the budget planned from it."""
    restored = [(float(s), float(q), int(k)) for s, q, k in run.history]
    if spent is None or restored != spent.history:
        raise RunError(
            f"--resume: the restored accountant history {restored} differs from the checkpoint's record "
            f"{None if spent is None else spent.history}; refusing to train on a budget that cannot be "
            "trusted. Use --overwrite."
        )
    if run.optimizer.noise_multiplier != run.sigma:
        raise RunError(
            f"internal check failed: the DP optimizer adds noise σ = {run.optimizer.noise_multiplier} "
            f"but σ = {run.sigma} was planned"
        )


def _load_dp_rng(run: PrivacyRun, checkpoint: Path, rank: int) -> None:
    path = checkpoint / f"dp_rng_{rank}.pt"
    if run.generator_state is not None and path.exists():
        run.generator_state.load_state_dict(torch.load(path, weights_only=True))


def _save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    epoch: int,
    history: list[dict[str, Any]],
    recipe: Recipe,
    dp_run: PrivacyRun | None = None,
) -> None:
    """Write checkpoints/epoch-N atomically: complete with trainer_state.json, or not at all."""
    folder = run_dir / "checkpoints"
    tmp = folder / f".epoch-{epoch + 1}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if dp_run is not None and dp_run.generator_state is not None:
        # Each process's secret sampling/noise generator: local resumability, never published.
        torch.save(
            dp_run.generator_state.state_dict(), tmp / f"dp_rng_{accelerator.process_index}.pt"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"epoch": epoch, "history": history, "recipe_digest": _recipe_digest(recipe)}
        if dp_run is not None:  # a resume plans the rest of the budget from what was spent
            state["dp"] = dp_run.spent_budget().to_json()
        atomic_write_json(tmp / "trainer_state.json", state)
        final = folder / f"epoch-{epoch + 1}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in folder.glob("epoch-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        if _after_checkpoint is not None:
            _after_checkpoint(epoch)
    accelerator.wait_for_everyone()


def _write_outputs(
    *,
    run_dir: Path,
    recipe: Recipe,
    plan: MethodPlan,
    model: Any,
    tokenizer: Any,
    predictions: pd.DataFrame,
    metrics: dict[str, Any],
    data: PreparedData,
    ledger: dict[str, Any] | None = None,
) -> None:
    out_name = "adapter" if plan.name == "lora" else "model"
    with atomic_dir(run_dir / out_name) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(tokenizer, tmp, model)
        if ledger is not None:  # travels with the weights: further DP training adds to this ε
            atomic_write_json(tmp / PRIVACY_FILE, ledger)
        if plan.groupnorm_replaced:
            atomic_write_json(
                tmp / GROUPNORM_FILE,
                {
                    "replaced": plan.groupnorm_replaced,
                    "note": "BatchNorm layers replaced by GroupNorm (method.batchnorm: groupnorm); "
                    "load with hubtune.model.load_saved_image_model",
                },
            )
    if ledger is not None:
        atomic_write_json(run_dir / "privacy.json", ledger)
    atomic_write_json(run_dir / "metrics.json", metrics)
    _write_parquet(
        run_dir / "predictions.parquet",
        predictions,
        {"label_names": data.label_names, "sensitive_columns": data.sensitive_columns},
    )
    atomic_write_text(run_dir / "recipe.resolved.yaml", recipe_to_yaml(recipe))


def _privacy_summary(ledger: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "epsilon",
        "delta",
        "accountant",
        "epsilon_by_accountant",
        "noise_multiplier",
        "noise",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "stopped_by_budget",
        "guarantee",
        "guarantee_void",
    )
    return {"enabled": True, "ledger": "privacy.json", **{k: ledger.get(k) for k in keys}}


def _privacy_lines(run_dir: Path) -> list[str]:
    path = run_dir / "privacy.json"
    if not path.exists():
        return ["privacy:   trained without differential privacy"]
    ledger = json.loads(path.read_text())
    eps = ledger["epsilon_by_accountant"]
    mechanism = (
        f"{ledger.get('noise') or 'σ ' + format(ledger['noise_multiplier'], '.3f')}, C {ledger['max_grad_norm']:g}, "
        f"q {ledger['sample_rate']:.4g}, {ledger['steps']} steps; ledger {path}"
    )
    if guarantee_is_void(ledger.get("noise_source")):
        return [f"privacy:   NO GUARANTEE: {VOID_REASON}", f"           ({mechanism})"]
    return [
        f"privacy:   ({ledger['epsilon']:.3f}, {ledger['delta']:.2g})-DP ({ledger['accountant'].upper()}; "
        f"RDP epsilon {eps['rdp']:.3f}), {mechanism}"
    ]


def format_summary(result: RunResult) -> str:
    """The lines the CLI prints at the end of a run."""
    test = result.metrics["test"]
    base = result.metrics["majority_baseline"]
    return "\n".join(
        [
            f"outputs:   {result.run_dir.resolve()}",
            f"test:      accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  loss {test['loss']:.4f}",
            f"baseline:  accuracy {base['accuracy']:.4f}  (always predicting '{base['label']}')",
            f"gain:      {100 * (test['accuracy'] - base['accuracy']):+.1f} accuracy points over the baseline",
            *_privacy_lines(result.run_dir),
            *_audit_lines(result),
            *(
                [
                    f"pushed:    {result.push['repo_id']}@{result.push['commit']}"
                    + (f"; space {result.push['space_id']}" if result.push["space_id"] else "")
                ]
                if result.push
                else []
            ),
        ]
    )


def _audit_lines(result: RunResult) -> list[str]:
    if result.audit is None:
        return []
    verdict = result.audit["verdict"]
    detail = "; ".join(verdict["failed"] or verdict["not_evaluable"])
    if not verdict["checks"]:  # a pass with nothing checked must say so
        detail = "no check applied (" + "; ".join(verdict.get("notes") or []) + ")"
    membership = result.audit.get("membership") or {}
    lines = [
        f"audit:     {verdict['status'].upper()} (policy {result.audit['policy']['name']})"
        + (f": {detail}" if detail else "")
        + f"; report {result.run_dir.resolve() / 'audit' / 'report.html'}"
    ]
    if "auc" in membership:
        lines.append(
            f"membership inference: AUC {membership['auc']['value']:.3f}, empirical epsilon lower bound "
            f"{membership['epsilon_lower_bound']:.3f}"
            + (" -- BEATS THE DP BOUND" if membership.get("beats_dp_bound") else "")
        )
    return lines
