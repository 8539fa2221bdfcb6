"""One training run, top to bottom: pull, load data, apply the method, train, evaluate, write.

:func:`train` reads like a recipe, one setup step after another (torchtune style):

1. :func:`_start`: the Accelerator, the run folder, a checkpoint to resume from;
2. :func:`_load`: the pinned model, the data, the task's model and the method's plan;
3. :func:`_inputs`: each split encoded by the task, the frozen part cached when it can be;
4. :func:`_setup`: loaders, optimizer, differential privacy, schedule, resumed state;
5. :func:`_epochs`: the loop (the DP epoch is :func:`hubtune.privacy.loop.dp_epoch`);
6. :func:`_finish`: test metrics, membership scores, and the run directory's files.

The loop is our own Accelerate loop (no Trainer), so ``hubtune run RECIPE`` and
``accelerate launch [--num_processes N] -m hubtune run RECIPE`` run the same code. Only the
main process writes files; every write is atomic; a checkpoint after each epoch makes
``--resume`` continue exactly where an interrupted run stopped. This module only trains: the
audit, the card and the push are later stages (:mod:`hubtune.pipeline`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hubtune import __version__, checkpoint
from hubtune.cache import TrainingInputs, cache_key, training_inputs
from hubtune.data import PreparedData, load_data
from hubtune.errors import RunError
from hubtune.hub import ResolvedModel, resolve_model
from hubtune.io import atomic_dir, atomic_write_json, atomic_write_text
from hubtune.launch import resolve_mixed_precision, use_cpu
from hubtune.loop import LengthGroupedBatches, plain_epoch, predict
from hubtune.methods import MethodPlan, apply_method
from hubtune.model import GROUPNORM_FILE, POOLING_ATTR, save_processor
from hubtune.prefix import example_lengths
from hubtune.privacy import PrivacyError, compute_epsilons, prior_history
from hubtune.privacy.engine import (
    PrivacyRun,
    batchnorm_in_train_mode,
    forward_takes_position_ids,
    prepare_private,
    refuse_trainable_batchnorm,
)
from hubtune.privacy.loop import check_restored_budget, dp_epoch, dp_preflight, sum_over_processes
from hubtune.progress import OnStep, StepInfo
from hubtune.recipe import Recipe, recipe_to_yaml
from hubtune.rundir import (
    EXPOSURE_FILE,
    FORGETTING_FILE,
    MEMBERSHIP_FILE,
    PRIVACY_FILE,
    PRIVACY_LEDGER,
    RECIPE_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    STEREOTYPES_FILE,
    VALIDATION_PREDICTIONS_FILE,
    Metrics,
    Predictions,
    privacy_summary,
    write_metrics,
    write_parquet,
    write_predictions,
)
from hubtune.selection import Selection
from hubtune.selection import describe as describe_selection
from hubtune.tasks import Task, get_task

__all__ = ["RunError", "StepInfo", "TrainResult", "train"]

logger = logging.getLogger("hubtune")

RUN_SCHEMA_VERSION = 1


@dataclass
class TrainResult:
    """Where the run's files are, its metrics, and where it resumed from."""

    run_dir: Path
    metrics: dict[str, Any]
    resumed_from_epoch: int | None = None


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    recipe_source: str | None = None,
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train ``recipe`` and write ``<output_dir>/<name>/`` (weights, metrics, predictions, run.json).

    Args:
        recipe: A validated recipe.
        resume: Continue from the latest checkpoint of an interrupted run.
        overwrite: Delete an existing run directory of the same name first.
        recipe_source: Where the recipe came from (recorded in run.json).
        on_step: Called on every process after each optimizer step (benchmarks time steps
            with it); it must not touch the model or the optimizer.

    Raises:
        RunError: the run cannot start or stopped (also DataError, MethodError).
    """
    t_start = time.perf_counter()
    run = _start(recipe, resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    loaded = _load(run)
    run.timings["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = _inputs(run, loaded)
    run.timings["features_s"] = time.perf_counter() - t0
    setup = _setup(run, loaded, inputs)
    t0 = time.perf_counter()
    _epochs(run, loaded, inputs, setup, on_step)
    run.timings["train_s"] = time.perf_counter() - t0
    result = _finish(run, loaded, inputs, setup, recipe_source, t_start)
    # Trackers close here; the process group stays for the pipeline's later stages.
    for tracker in run.accelerator.trackers:
        tracker.finish()
    return result


# --------------------------------------------------------------------------- 1. start


@dataclass
class _Run:
    """The run as it is being set up: settings, the Accelerator, where it resumes from."""

    recipe: Recipe
    accelerator: Any
    checkpoint: Path | None
    state: dict[str, Any]  # the checkpoint's trainer state ({} when starting afresh)
    spent: Any  # the DP budget the checkpoint spent (SpentBudget), or None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir


def _start(recipe: Recipe, *, resume: bool, overwrite: bool) -> _Run:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed

    # The precision actually used is recorded in the resolved recipe (and so in the card).
    recipe.train.mixed_precision = _mixed_precision(recipe)  # type: ignore[assignment]
    run_dir = recipe.run_dir
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
    if accelerator.is_main_process:
        checkpoint.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    latest = checkpoint.latest_checkpoint(run_dir) if resume else None
    if resume and (run_dir / RUN_FILE).exists():
        done_epochs = int(latest.name.split("-")[1]) if latest is not None else None
        if done_epochs is None or done_epochs >= recipe.train.epochs:
            raise RunError(
                f"{run_dir} is already complete; nothing to resume (raise train.epochs to train on from its "
                "last checkpoint, or use --overwrite to train again)"
            )
    if resume and latest is None and accelerator.is_main_process:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    state, spent = checkpoint.checkpoint_state(latest, recipe) if latest else ({}, None)
    set_seed(recipe.seed)
    return _Run(recipe, accelerator, latest, state, spent)


def _mixed_precision(recipe: Recipe) -> str:
    try:
        return resolve_mixed_precision(recipe.train.mixed_precision, dp=recipe.dp)
    except ValueError as exc:
        raise RunError(str(exc)) from None


# --------------------------------------------------------------------------- 2. load


@dataclass
class _Loaded:
    """The pinned model, the data, and what the method made of the model."""

    task: Task
    resolved: ResolvedModel
    data: PreparedData
    processor: Any  # the tokenizer or image processor
    plan: MethodPlan
    newly: list[str]


def _load(run: _Run) -> _Loaded:
    recipe, accelerator = run.recipe, run.accelerator
    task = get_task(recipe.model.task)
    with accelerator.main_process_first():
        resolved = resolve_model(
            recipe.model.id, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle
        )
    if run.main:
        logger.info("model: %s @ %s (%s)", recipe.model.id, resolved.sha, resolved.local_dir)
    with accelerator.main_process_first():
        data = load_data(
            recipe.data,
            seed=recipe.seed,
            canaries=recipe.audit.canaries if recipe.audit.enabled else 0,
            task=recipe.model.task,
        )
    exposure = recipe.audit.exposure if recipe.audit.enabled else None
    if exposure is not None:
        from hubtune.audit.exposure import make_exposure_canaries

        data.exposure_canaries, rows = make_exposure_canaries(
            per_repetition=exposure.per_repetition,
            repetitions=exposure.repetitions,
            digits=exposure.digits,
            prefix=exposure.prefix,
            seed=recipe.seed,
            columns=data.text_columns,
            sensitive=data.sensitive_columns,
            shape=exposure.shape,
        )
        rows = data.scrub_added(rows)  # data.anonymize acts on the canaries as on the data
        data.splits["train"] = pd.concat([data.splits["train"], rows], ignore_index=True)
    if run.main:
        logger.info(
            "data: %s rows kept %s, dropped %s", data.fingerprint[:12], data.rows_kept, data.dropped
        )
    processor, model, newly = task.load(
        resolved, recipe.model, label_names=data.label_names, method_name=recipe.method.name
    )
    plan = apply_method(
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
    if recipe.dp:
        # Refusals that need only the model come before any expensive work (feature caches).
        try:
            refuse_trainable_batchnorm(plan.model)
        except PrivacyError as exc:
            raise RunError(f"privacy: {exc}") from None
    if run.main:
        counts = plan.counts
        logger.info(
            "method: %s, %s of %s parameters trainable (%.2f%%)",
            plan.name,
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
            100 * counts["trainable"] / counts["total"],
        )
    return _Loaded(task, resolved, data, processor, plan, newly)


# --------------------------------------------------------------------------- 3. inputs


def _frames(data: PreparedData) -> dict[str, pd.DataFrame]:
    frames = dict(data.splits)
    if data.canaries is not None:
        frames["canaries"] = data.canaries
    return frames


def _inputs(run: _Run, loaded: _Loaded) -> TrainingInputs:
    recipe, task = run.recipe, loaded.task
    frames = _frames(loaded.data)
    encoded: dict[str, Dataset] = {
        split: task.encode(loaded.processor, frame, recipe, train=split == "train")
        for split, frame in frames.items()
    }

    # What the head reads also depends on how token states are pooled (model.pooling), which
    # the weights and inputs do not say: two runs of one model with another pooling must not
    # share a cache.
    pooling = getattr(loaded.plan.model, POOLING_ATTR, None)
    if not task.caches_features and (loaded.plan.cache_features or loaded.plan.cache_prefix):
        loaded.plan.cache_features = loaded.plan.cache_prefix = False
        if run.main:
            logger.info("feature cache: off (not implemented for %s)", task.name)

    def key(split: str, cut: str) -> str:
        frame = frames[split]
        return cache_key(
            model_sha=loaded.resolved.sha,
            inputs={
                **task.cache_inputs(frame, recipe, loaded.processor),
                **({"pooling": pooling["mode"]} if pooling else {}),
            },
            rows=len(frame),
            cut=cut,
        )

    return training_inputs(
        accelerator=run.accelerator,
        plan=loaded.plan,
        encoded=encoded,
        labels={
            split: frame["label"].to_numpy() for split, frame in frames.items() if "label" in frame
        },
        keys=key,
        collate=task.collate(loaded.processor),
        batch_size=recipe.train.eval_batch_size,
        augmenting=recipe.data.augment is not None and recipe.data.augment.active,
    )


# --------------------------------------------------------------------------- 4. setup


@dataclass
class _Setup:
    """Everything the loop steps: loaders, optimizer, privacy, schedule, where it starts."""

    module: Any  # the trained module, as prepared (DP: wrapped by Opacus)
    optimizer: Any
    train_loader: Any  # non-DP: the Accelerate-prepared loader (DP: the Poisson loader is run's)
    val_loader: Any
    test_loader: Any
    scheduler: Any
    steps_per_epoch: int
    dp: PrivacyRun | None = None
    lengths: list[int] | None = None  # DP: example lengths, to sort each Poisson batch
    needs_position_ids: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    selection: Selection | None = None  # which epoch's weights are kept (train.select_epoch)


def _setup(run: _Run, loaded: _Loaded, inputs: TrainingInputs) -> _Setup:
    recipe, accelerator = run.recipe, run.accelerator
    loaders = _loaders(recipe, inputs)
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(loaded.plan.param_groups, momentum=recipe.train.momentum)
        if recipe.train.optimizer == "sgd"
        else torch.optim.AdamW(loaded.plan.param_groups)
    )
    if recipe.dp:
        setup = _private_setup(run, loaded, inputs, optimizer, loaders)
    else:
        module, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            inputs.module, optimizer, loaders["train"], loaders["validation"], loaders["test"]
        )
        setup = _Setup(
            module, optimizer, train_loader, val_loader, test_loader, None, len(train_loader)
        )
    setup.scheduler = _scheduler(setup.optimizer, recipe, setup.steps_per_epoch)
    setup.selection = Selection(recipe.train.select_epoch, recipe.train.select_metric)
    accelerator.register_for_checkpointing(setup.scheduler)
    if run.checkpoint is not None:
        accelerator.load_state(str(run.checkpoint))
        setup.selection.load(run.checkpoint, run.state.get("selection"))
        if setup.dp is not None:
            checkpoint.load_dp_rng(setup.dp, run.checkpoint, accelerator.process_index)
            check_restored_budget(setup.dp, run.spent)
        setup.history = run.state["history"]
        setup.start_epoch = run.state["epoch"] + 1
        if run.main:
            logger.info("resumed from %s (epoch %d done)", run.checkpoint, setup.start_epoch)
    if recipe.train.log_with:
        accelerator.init_trackers(recipe.name, config=_flat_config(recipe))
    return setup


def _loaders(recipe: Recipe, inputs: TrainingInputs) -> dict[str, DataLoader]:
    loaders = {
        split: DataLoader(
            inputs.datasets[split],
            batch_size=recipe.train.eval_batch_size,
            collate_fn=inputs.collate,
        )
        for split in ("validation", "test")
    }
    lengths = example_lengths(inputs.datasets["train"]) if recipe.train.group_by_length else None
    if lengths is not None:
        loaders["train"] = DataLoader(
            inputs.datasets["train"],
            batch_sampler=LengthGroupedBatches(lengths, recipe.train.batch_size, recipe.seed),
            collate_fn=inputs.collate,
        )
        return loaders
    loaders["train"] = DataLoader(
        inputs.datasets["train"],
        batch_size=recipe.train.batch_size,
        shuffle=True,
        collate_fn=inputs.collate,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    return loaders


def _private_setup(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    optimizer: torch.optim.Optimizer,
    loaders: dict[str, DataLoader],
) -> _Setup:
    recipe, accelerator = run.recipe, run.accelerator
    assert recipe.privacy is not None
    # The DP loader must not go through accelerator.prepare: it would re-batch and reshard
    # the Poisson sampler. Only the (non-private) evaluation loaders are prepared.
    val_loader, test_loader = accelerator.prepare(loaders["validation"], loaders["test"])
    try:
        dp = prepare_private(
            section=recipe.privacy,
            model=inputs.module,
            optimizer=optimizer,
            dataset=inputs.datasets["train"],
            collate=inputs.collate,
            epochs=recipe.train.epochs,
            num_processes=accelerator.num_processes,
            device=accelerator.device,
            prior_history=prior_history(loaded.resolved.local_dir),
            spent=run.spent,
            criterion=loaded.task.criterion() if loaded.task.criterion else None,
            loss_fn=loaded.task.loss,
        )
    except PrivacyError as exc:
        raise RunError(f"privacy: {exc}") from None
    accelerator.register_for_checkpointing(dp.model, dp.optimizer, dp.engine.accountant)
    plan = loaded.plan
    needs_position_ids = not plan.cache_features and forward_takes_position_ids(plan.model)
    if not plan.cache_features:
        # Frozen parts (BatchNorm above all) run in eval mode in the preflight too: its one
        # forward pass must neither mix examples nor move pretrained statistics.
        plan.train_mode(plan.model)
    dp_preflight(
        dp,
        inputs.datasets["train"],
        inputs.collate,
        inputs.forward,
        accelerator.device,
        needs_position_ids,
    )
    steps_per_epoch = round(1 / dp.q)
    if run.main:
        logger.info(
            "privacy: n=%d q=%.5f (expected batch %.1f) sigma=%.4f C=%g delta=%.3g, %d steps planned, budget "
            "allows %d",
            dp.n,
            dp.q,
            dp.q * dp.n,
            dp.sigma,
            dp.max_grad_norm,
            dp.delta,
            recipe.train.epochs * steps_per_epoch,
            dp.max_steps,
        )
    return _Setup(
        module=dp.model,
        optimizer=dp.optimizer,
        train_loader=None,
        val_loader=val_loader,
        test_loader=test_loader,
        scheduler=None,
        steps_per_epoch=steps_per_epoch,
        dp=dp,
        lengths=example_lengths(inputs.datasets["train"]),
        needs_position_ids=needs_position_ids,
    )


def _scheduler(optimizer: Any, recipe: Recipe, steps_per_epoch: int) -> Any:
    """Linear warm-up, then linear decay to 0 over the planned steps."""
    total_steps = recipe.train.epochs * steps_per_epoch
    warmup = int(recipe.train.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat ``section.key`` scalars, for the trackers' hyperparameter tables."""
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


# --------------------------------------------------------------------------- 5. the loop


def _epochs(
    run: _Run, loaded: _Loaded, inputs: TrainingInputs, setup: _Setup, on_step: OnStep | None
) -> None:
    recipe, plan = run.recipe, loaded.plan
    step = setup.start_epoch * setup.steps_per_epoch
    initial = None
    if setup.dp is not None and run.checkpoint is None:
        # Opacus + peft has shipped LoRA weights that never move while ε grows (opacus #820).
        initial = {
            n: p.detach().clone() for n, p in setup.module.named_parameters() if p.requires_grad
        }
    total_steps = recipe.train.epochs * setup.steps_per_epoch
    if _head_fit(recipe, loaded.plan) == "lbfgs":
        _fit_head(run, loaded, inputs, setup)
        return
    for epoch in range(setup.start_epoch, recipe.train.epochs):
        epoch_start = time.perf_counter()
        if plan.cache_features:
            setup.module.train()
        else:
            plan.train_mode(plan.model)
        if hasattr(inputs.datasets["train"], "set_epoch"):
            inputs.datasets["train"].set_epoch(epoch)  # the epoch's augmentation draws
        extra: dict[str, Any] = {}
        if setup.dp is not None:
            dp = setup.dp
            mixing = batchnorm_in_train_mode(setup.module)
            if mixing:
                raise RunError(
                    f"privacy: BatchNorm layer(s) in training mode ({', '.join(mixing[:3])}) would mix the "
                    "examples of a batch and void the DP guarantee; this is a bug in hubtune's method "
                    "plan, please report it"
                )
            if dp.steps_taken >= dp.max_steps:
                dp.stopped_by_budget = dp.max_steps < total_steps
                break
            running, seen, step, sizes = dp_epoch(
                accelerator=run.accelerator,
                run=dp,
                forward=inputs.forward,
                scheduler=setup.scheduler,
                epoch=epoch,
                epochs=recipe.train.epochs,
                step=step,
                initial=initial,
                needs_position_ids=setup.needs_position_ids,
                lengths=setup.lengths,
                loss_fn=loaded.task.loss,
                on_step=on_step,
            )
            initial = None
            extra["dp_logical_batch_sizes"] = sum_over_processes(run.accelerator, sizes)
        else:
            running, seen, step = plain_epoch(
                accelerator=run.accelerator,
                model=setup.module,
                optimizer=setup.optimizer,
                scheduler=setup.scheduler,
                loader=setup.train_loader,
                forward=inputs.forward,
                loss_fn=loaded.task.loss,
                epoch=epoch,
                epochs=recipe.train.epochs,
                step=step,
                max_grad_norm=recipe.train.max_grad_norm,
                on_step=on_step,
            )
        extra = {"train_epoch_s": time.perf_counter() - epoch_start, **extra}
        _end_epoch(run, loaded, inputs, setup, epoch, step, running, seen, extra)


def _head_fit(recipe: Recipe, plan: Any) -> str:
    """The head's solver: lbfgs on cached features without privacy (method.head_fit: auto), else sgd."""
    chosen = getattr(recipe.method, "head_fit", "sgd")
    if chosen == "auto":
        return "lbfgs" if plan.cache_features and not recipe.dp else "sgd"
    if chosen == "lbfgs" and not plan.cache_features:  # data.augment turned the cache off
        raise RunError(
            "method.head_fit: lbfgs needs the feature cache, which is off for this run (data.augment "
            "makes every epoch's images different). Use head_fit: auto or sgd."
        )
    return str(chosen)


def _fit_head(run: _Run, loaded: _Loaded, inputs: TrainingInputs, setup: _Setup) -> None:
    """Fit the head to convergence on the cached features (hubtune.headfit), every process alike."""
    from accelerate.utils import broadcast

    from hubtune.headfit import fit_head

    assert setup.selection is not None
    selection, plan, task = setup.selection, loaded.plan, loaded.task
    head = plan.model.get_submodule(plan.head_name)
    labels = len(loaded.data.label_names)
    if run.main:
        logger.info(
            "head: fitted to convergence with L-BFGS on the cached features (method.head_fit: %s); "
            "train.epochs, train.lr and train.batch_size do not apply",
            getattr(run.recipe.method, "head_fit", "auto"),
        )
    setup.history = fit_head(
        head,
        inputs.datasets["train"],
        inputs.datasets["validation"],
        loss_fn=task.loss,
        metrics=lambda logits, y: task.metrics(logits, y, labels),
        observe=lambda record: selection.observe(plan.model, record),
    )
    if run.accelerator.num_processes > 1:  # one head for all: the main process's
        selection.restore(plan.model)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(broadcast(p.detach().contiguous(), from_process=0))
        selection.keep_current(plan.model)


def _end_epoch(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    setup: _Setup,
    epoch: int,
    step: int,
    running: float,
    seen: int,
    extra: dict[str, Any],
) -> None:
    """Evaluate on the validation split, log, and write the epoch's checkpoint."""
    accelerator, recipe = run.accelerator, run.recipe
    logits, labels = predict(
        accelerator, setup.module, setup.val_loader, inputs.forward, reduce=loaded.task.reduce
    )
    val = loaded.task.metrics(logits, labels, len(loaded.data.label_names))
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": running / max(1, seen),
        **{f"val_{k}": v for k, v in val.items()},
        **extra,
    }
    if setup.dp is not None:
        record["epsilon"] = compute_epsilons(setup.dp.full_history(), setup.dp.delta)[
            setup.dp.accountant
        ]
    setup.history.append(record)
    assert setup.selection is not None
    setup.selection.observe(loaded.plan.model, record)
    scalars = {k: v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
    accelerator.log(scalars, step=epoch + 1)
    if run.main:
        shown = ("loss", "accuracy", "macro_f1", "perplexity", "exact_match")
        logger.info(
            "epoch %d: train_loss %.4f %s%s",
            epoch + 1,
            record["train_loss"],
            " ".join(f"val_{k} {val[k]:.4f}" for k in shown if k in val),
            f" epsilon {record['epsilon']:.3f}" if "epsilon" in record else "",
        )
    if recipe.train.checkpoint:
        checkpoint.save_checkpoint(
            accelerator, run.run_dir, epoch, setup.history, recipe, setup.dp, setup.selection
        )


# --------------------------------------------------------------------------- 6. outputs


def _finish(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    setup: _Setup,
    recipe_source: str | None,
    t_start: float,
) -> TrainResult:
    recipe, accelerator, data, task = run.recipe, run.accelerator, loaded.data, loaded.task
    selection = setup.selection
    assert selection is not None
    selection.restore(loaded.plan.model)  # the kept epoch's weights are tested, audited and saved
    if run.main and selection.epoch is not None:
        logger.info(
            "weights: %s", describe_selection({**selection.to_json(), "of": len(setup.history)})
        )
    t0 = time.perf_counter()
    logits, labels = predict(
        accelerator, setup.module, setup.test_loader, inputs.forward, reduce=task.reduce
    )
    test = task.metrics(logits, labels, len(data.label_names))
    majority_baseline: dict[str, Any] = {}
    if task.has_labels:
        train_labels = data.splits["train"]["label"].to_numpy()
        majority = int(np.bincount(train_labels, minlength=len(data.label_names)).argmax())
        majority_baseline = {
            "label": data.label_names[majority],
            "accuracy": float((labels.numpy() == majority).mean()),
        }
    run.timings["test_s"] = time.perf_counter() - t0
    validation = None
    if task.has_labels:  # the kept weights' validation outputs: post-processing fits on them
        validation = predict(
            accelerator, setup.module, setup.val_loader, inputs.forward, reduce=task.reduce
        )
    membership = None
    if recipe.audit.enabled:
        t0 = time.perf_counter()
        computed = {"test": (logits, labels)}
        if validation is not None:
            computed["validation"] = validation
        membership = _membership_scores(run, loaded, inputs, setup.module, computed)
        run.timings["membership_s"] = time.perf_counter() - t0
    exposure = None
    if run.main and data.exposure_canaries is not None:
        t0 = time.perf_counter()
        exposure = _exposure(run, loaded)
        run.timings["exposure_s"] = time.perf_counter() - t0
    samples = None
    if run.main and not task.has_labels:
        from hubtune.tasks.text_generation import SAMPLE_PROMPTS, generate_samples

        prompts = list(SAMPLE_PROMPTS)
        if recipe.audit.exposure is not None and recipe.audit.exposure.prefix not in prompts:
            prompts.append(recipe.audit.exposure.prefix)
        samples = generate_samples(
            loaded.plan.model,
            loaded.processor,
            prompts,
            device=accelerator.device,
            chat=data.text_columns == ["messages"],
        )
    stereotypes = None
    if run.main and not task.has_labels and recipe.audit.enabled and recipe.audit.stereotypes:
        t0 = time.perf_counter()
        stereotypes = _stereotypes(run, loaded)
        run.timings["stereotypes_s"] = time.perf_counter() - t0
    forgetting = None
    if run.main and recipe.checks.forgetting and recipe.model.task in FORGETTING_TASKS:
        t0 = time.perf_counter()
        forgetting = _forgetting(run, loaded)
        run.timings["forgetting_s"] = time.perf_counter() - t0
    dp = setup.dp
    if dp is not None and dp.stopped_by_budget and run.main:
        logger.warning(
            "privacy: the budget guard stopped training after %d steps (epsilon target %s)",
            dp.steps_taken,
            dp.target_epsilon,
        )
    metrics = {
        "test": test,
        "majority_baseline": majority_baseline,
        "history": setup.history,
        "selected_epoch": {**selection.to_json(), "of": len(setup.history)}
        if selection.epoch is not None
        else None,
    }
    if run.main and "classical" in recipe.train.baselines and task.classical_baseline:
        t0 = time.perf_counter()
        classical = _classical_baseline(task, data, recipe.seed, logits, labels)
        run.timings["classical_baseline_s"] = time.perf_counter() - t0
        if classical is not None:
            metrics["classical_baseline"] = classical
    if forgetting is not None:
        keys = ("similarity_preserved", "topic_neighbours", "perplexity", "ratio")
        metrics["forgetting"] = {k: forgetting[k] for k in keys if k in forgetting}
    accelerator.wait_for_everyone()
    if run.main:
        ledger = _ledger(loaded, setup)
        _write_run_dir(
            run, loaded, inputs, setup, ledger, metrics, (logits, labels), validation, membership
        )
        if exposure is not None:
            atomic_write_json(run.run_dir / EXPOSURE_FILE, exposure)
        if stereotypes is not None:
            atomic_write_json(run.run_dir / STEREOTYPES_FILE, stereotypes)
        if forgetting is not None:
            atomic_write_json(run.run_dir / FORGETTING_FILE, forgetting)
        if samples is not None:
            atomic_write_json(
                run.run_dir / SAMPLES_FILE,
                {"decoding": "greedy", "max_new_tokens": 30, "samples": samples},
            )
        run.timings["total_s"] = time.perf_counter() - t_start
        _write_run_info(run, loaded, inputs, setup, ledger, metrics, recipe_source)
        if (run.run_dir / "checkpoints").exists() and not recipe.train.checkpoint:
            shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=run.run_dir,
        metrics=metrics,
        resumed_from_epoch=setup.start_epoch if run.checkpoint else None,
    )


def _classical_baseline(
    task: Task, data: Any, seed: int, logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any] | None:
    """A model without pretraining on the same split, compared with this one on the test rows."""
    from hubtune.baselines import compare

    truth = data.splits["test"]["label"].to_numpy().astype(np.int64)
    if not np.array_equal(truth, labels.numpy()):  # the test rows must be the same, in order
        logger.warning("classical baseline: skipped (test rows not in the split's order)")
        return None
    assert task.classical_baseline is not None
    predicted, record = task.classical_baseline(data, seed)
    return {**record, **compare(logits.argmax(-1).numpy(), predicted, truth, seed=seed)}


def _fresh_base(auto_class: Any, run: _Run, loaded: _Loaded) -> Any:
    """The pretrained model loaded afresh from its pinned files, on the run's device."""
    return auto_class.from_pretrained(
        loaded.resolved.local_dir,
        trust_remote_code=run.recipe.model.trust_remote_code,
        use_safetensors=None if run.recipe.model.allow_pickle else True,
    ).to(run.accelerator.device)


def _stereotypes(run: _Run, loaded: _Loaded) -> dict[str, Any]:
    """CrowS-Pairs choices of the base model (loaded afresh from its pinned files) and of the
    fine-tuned one (hubtune.audit.stereotypes)."""
    from transformers import AutoModelForCausalLM

    from hubtune.audit.stereotypes import measure_stereotypes

    device = run.accelerator.device
    base = _fresh_base(AutoModelForCausalLM, run, loaded)
    measured = measure_stereotypes(
        {"base": base, "fine_tuned": loaded.plan.model},
        loaded.processor,
        device=device,
        batch_size=max(32, run.recipe.train.eval_batch_size),
    )
    del base
    return measured


FORGETTING_TASKS = ("text-classification", "text-generation")


def _forgetting(run: _Run, loaded: _Loaded) -> dict[str, Any]:
    """The fine-tuned model against the pretrained one (loaded afresh from its pinned files) on
    general sentences (hubtune.forgetting): encoders' similarities, or language models'
    perplexity."""
    from transformers import AutoModel, AutoModelForCausalLM

    from hubtune.forgetting import measure_forgetting, measure_lm_forgetting

    device = run.accelerator.device
    if not loaded.task.has_labels:
        base = _fresh_base(AutoModelForCausalLM, run, loaded)
        measured = measure_lm_forgetting(
            base=base, fine_tuned=loaded.plan.model, tokenizer=loaded.processor, device=device
        )
        del base
        return measured
    base = _fresh_base(AutoModel, run, loaded)
    measured = measure_forgetting(
        base=base,
        fine_tuned=loaded.plan.model,
        tokenizer=loaded.processor,
        device=device,
        max_length=run.recipe.model.max_length,
    )
    del base
    return measured


def _exposure(run: _Run, loaded: _Loaded) -> dict[str, Any]:
    """Each Secret-Sharer canary's rank and exposure under the kept weights (hubtune.audit.exposure)."""
    from hubtune.audit.exposure import measure_exposure

    section = run.recipe.audit.exposure
    assert section is not None and loaded.data.exposure_canaries is not None
    per_canary = measure_exposure(
        loaded.plan.model,
        loaded.processor,
        loaded.data.exposure_canaries,
        prefix=section.prefix,
        digits=section.digits,
        samples=section.samples,
        seed=run.recipe.seed,
        device=run.accelerator.device,
        batch_size=max(64, run.recipe.train.eval_batch_size),
        chat=loaded.data.text_columns == ["messages"],
        shape=section.shape,
    )
    logger.info(
        "exposure: %s",
        ", ".join(f"{c['repetitions']}x {c['exposure']:.1f} bits" for c in per_canary),
    )
    return {
        "digits": section.digits,
        "shape": section.shape,
        "prefix_words": len(section.prefix.split()),
        "per_canary": per_canary,
    }


@torch.no_grad()
def _membership_scores(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    module: Any,
    computed: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> pd.DataFrame:
    """Per-example losses of training rows (members), held-out rows and canaries.

    Members are a seeded sample of at most ``audit.membership_rows`` real training rows
    (canaries are scored separately); non-members are every validation and test row.
    ``computed``: the (logits, labels) of splits already predicted (test, and validation for
    classifiers), which are not predicted again.
    """
    recipe, data, accelerator = run.recipe, loaded.data, run.accelerator
    train_rows = data.splits["train"]
    real = np.flatnonzero(~train_rows["row_id"].str.startswith("canary:").to_numpy())
    if len(real) > recipe.audit.membership_rows:
        rng = np.random.default_rng([recipe.seed, 0x3E3B])
        real = np.sort(rng.choice(real, recipe.audit.membership_rows, replace=False))
    sources: list[tuple[str, Dataset, pd.DataFrame]] = [
        ("train", Subset(inputs.datasets["train"], real.tolist()), train_rows.iloc[real]),
        ("validation", inputs.datasets["validation"], data.splits["validation"]),
        ("test", inputs.datasets["test"], data.splits["test"]),
    ]
    if data.canaries is not None:
        sources.append(("canaries", inputs.datasets["canaries"], data.canaries))
    parts = []
    for split, dataset, frame in sources:
        if split in computed:
            logits, labels = computed[split]
        else:
            loader = accelerator.prepare(
                DataLoader(
                    dataset, batch_size=recipe.train.eval_batch_size, collate_fn=inputs.collate
                )
            )
            logits, labels = predict(
                accelerator, module, loader, inputs.forward, reduce=loaded.task.reduce
            )
        losses = loaded.task.example_losses(logits, labels).numpy()
        if loaded.task.has_labels:
            right = (logits.argmax(-1) == labels).numpy()
        else:  # a language model "predicts" an example when it reproduces it greedily
            from hubtune.tasks.text_generation import EXACT

            right = logits[:, EXACT].numpy().astype(bool)
        part = pd.DataFrame(
            {
                "row_id": frame["row_id"].to_numpy(),
                "split": split,
                "member": split == "train",
                "loss": losses.astype("float64"),
                "predicts_label": right,
            }
        )
        if not loaded.task.has_labels:  # a language model: the extraction test's outcome
            from hubtune.tasks.text_generation import EXTRACTED

            outcome = logits[:, EXTRACTED].numpy()
            part["extracted"] = np.where(outcome < 0, np.nan, outcome)
        if split == "canaries":
            part["member"] = frame["included"].to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _write_run_dir(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    setup: _Setup,
    ledger: dict[str, Any] | None,
    metrics: dict[str, Any],
    test_outputs: tuple[torch.Tensor, torch.Tensor],
    validation_outputs: tuple[torch.Tensor, torch.Tensor] | None,
    membership: pd.DataFrame | None,
) -> None:
    """Weights (with the ledger beside them), metrics, predictions (test, and validation for
    classifiers), ledger, resolved recipe."""
    recipe, plan, data = run.recipe, loaded.plan, loaded.data
    run_dir = run.run_dir
    cached = plan.cache_features or inputs.info.get("kind") == "prefix" or setup.dp is not None
    model: Any = plan.model if cached else run.accelerator.unwrap_model(setup.module)
    with atomic_dir(run_dir / plan.output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(loaded.processor, tmp, model)
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
        atomic_write_json(run_dir / PRIVACY_LEDGER, ledger)
    write_metrics(run_dir, Metrics.model_validate(metrics))
    write_predictions(
        run_dir,
        Predictions(
            loaded.task.predictions(data, *test_outputs),
            label_names=list(data.label_names),
            sensitive_columns=list(data.sensitive_columns),
            kind="classification" if loaded.task.has_labels else "generation",
        ),
    )
    if validation_outputs is not None:
        write_predictions(
            run_dir,
            Predictions(
                loaded.task.predictions(data, *validation_outputs, split="validation"),
                label_names=list(data.label_names),
                sensitive_columns=list(data.sensitive_columns),
            ),
            name=VALIDATION_PREDICTIONS_FILE,
        )
    atomic_write_text(run_dir / RECIPE_FILE, recipe_to_yaml(recipe))
    if membership is not None:
        write_parquet(
            run_dir / MEMBERSHIP_FILE,
            membership,
            {
                "note": "per-example losses for the membership audit; never publish (see audits/README.md)"
            },
        )


def _ledger(loaded: _Loaded, setup: _Setup) -> dict[str, Any] | None:
    if setup.dp is None:
        return None
    return setup.dp.ledger(
        trained_names=loaded.plan.trainable_names,
        trained_count=loaded.plan.counts["trainable"],
        batch_sizes=[b for h in setup.history for b in h.get("dp_logical_batch_sizes", [])],
    )


def _write_run_info(
    run: _Run,
    loaded: _Loaded,
    inputs: TrainingInputs,
    setup: _Setup,
    ledger: dict[str, Any] | None,
    metrics: dict[str, Any],
    recipe_source: str | None,
) -> None:
    """run.json, written last: its presence marks a complete run."""
    recipe, plan = run.recipe, loaded.plan
    run_info = {
        "schema_version": RUN_SCHEMA_VERSION,
        "status": "completed",
        "name": recipe.name,
        "recipe_source": recipe_source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from_epoch": setup.start_epoch if run.checkpoint is not None else None,
        "versions": _versions(),
        "base_model": loaded.resolved.to_dict(),
        "data": loaded.data.summary(),
        "method": {
            **plan.summary(),
            **({"head_fit": _head_fit(recipe, plan)} if hasattr(recipe.method, "head_fit") else {}),
        },
        "newly_initialized": loaded.newly,
        "pooling": getattr(plan.model, POOLING_ATTR, None),
        "feature_cache": inputs.info,
        "outputs": {"model_dir": plan.output_dir},
        "timings": run.timings,
        "hardware": _hardware(run.accelerator),
        "test": metrics["test"],
        "majority_baseline": metrics["majority_baseline"],
        "classical_baseline": metrics.get("classical_baseline"),
        "selected_epoch": metrics.get("selected_epoch"),
        "forgetting": metrics.get("forgetting"),
        "privacy": privacy_summary(ledger) if ledger is not None else {"enabled": False},
    }
    atomic_write_json(run.run_dir / RUN_FILE, run_info)


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
