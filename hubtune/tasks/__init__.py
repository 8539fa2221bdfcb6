"""Tasks: one module per ``model.task``, one entry in :data:`TASKS`.

A task owns what depends on the kind of model and data: loading the model and its
preprocessor, encoding a split and collating batches, what feeds the model (for cache keys),
the loss, the metrics, the predictions schema (the contract with the audit), the model card's
load snippet and the Space's input widget. Everything else (methods, privacy, the loop, the
run directory, the audit) is shared. Adding a task is one module defining a :class:`Task` and
one entry below; ``model.task`` accepts exactly the names registered here.

Task modules import torch and transformers only inside their functions, so the registry (and
the recipe, which validates ``model.task`` against it) loads without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TASKS", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    """The task-specific parts of a run, as plain functions (see each task module)."""

    name: str
    input_kind: str  # "text" or "image": which data columns feed the model
    title: str  # the Hub's task name, e.g. "Text Classification"
    space_widget: str  # the Space app's input: "textbox" or "image"
    # (resolved model, model section, *, label_names, method_name) -> (preprocessor, model,
    # newly initialised)
    load: Callable[..., tuple[Any, Any, list[str]]]
    # (preprocessor, frame, recipe, *, train) -> a Dataset of {"...inputs", "labels", "idx"}
    encode: Callable[..., Any]
    # (preprocessor) -> collate function (padding, stacking)
    collate: Callable[[Any], Callable[[list[dict[str, Any]]], dict[str, Any]]]
    # (frame, recipe, preprocessor) -> what of a split feeds the model, for cache keys
    cache_inputs: Callable[..., dict[str, Any]]
    # (logits, labels) -> mean loss; the DP engine clips this loss per example
    loss: Callable[[Any, Any], Any]
    # (logits, labels) -> per-example losses (the membership audit's scores)
    example_losses: Callable[[Any, Any], Any]
    # (logits, labels, num_labels) -> {"loss", "accuracy", "macro_f1", ...}
    metrics: Callable[[Any, Any, int], dict[str, float]]
    # (prepared data, logits, labels) -> the predictions frame the audit reads
    predictions: Callable[..., Any]
    # (*, run_dir, repo_id, revision, lora, base, label_names, max_length) -> Python code that
    # loads the model and predicts, for the model card
    load_snippet: Callable[..., str]
    # (*, repo_id, label_names) -> a transformers.pipeline() call for a pushed LoRA adapter, if
    # the pipeline of this task can take the labels that way
    pipeline_snippet: Callable[..., str] | None = None
    # (prepared data, seed) -> (each test row's predicted label id, record): a model without
    # pretraining on the same split (hubtune.baselines); None: the task has none
    classical_baseline: Callable[..., tuple[Any, dict[str, Any]]] | None = None
    # Whether examples have a class label (classifiers) or are their own target (generation).
    has_labels: bool = True
    # (logits, labels) -> (per-example figures, per-example labels) for one evaluation batch, so
    # that a whole split's outputs stay small (a language model's logits are [B, T, vocab]);
    # None: the logits and labels themselves. metrics, example_losses and predictions take what
    # this returns.
    reduce: Callable[[Any, Any], tuple[Any, Any]] | None = None
    # () -> the loss as a module with a ``reduction`` attribute, for Opacus' ghost clipping;
    # None: cross-entropy over class labels.
    criterion: Callable[[], Any] | None = None
    # Whether a frozen part's outputs may be cached (feature or prefix cache).
    caches_features: bool = True


def _registry() -> dict[str, Task]:
    from hubtune.tasks.image_classification import TASK as IMAGE_CLASSIFICATION
    from hubtune.tasks.text_classification import TASK as TEXT_CLASSIFICATION
    from hubtune.tasks.text_generation import TASK as TEXT_GENERATION

    return {
        task.name: task for task in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TEXT_GENERATION)
    }


TASKS: dict[str, Task] = _registry()


def get_task(name: str) -> Task:
    """The registered task ``name``; a KeyError names the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
