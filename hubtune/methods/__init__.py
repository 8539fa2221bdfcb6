"""Transfer-learning methods: one module per ``method.name``, one entry in :data:`METHODS`.

A method is a configuration class (its recipe section, with the learning rate it defaults to)
and one function that sets ``requires_grad`` on a model and returns a :class:`MethodPlan`:
what trains, at which learning rate, which frozen parts run in eval mode, what can be cached.
The recipe's ``method`` section accepts exactly the configurations registered here (a
discriminated union on ``name``), so adding a method is one module plus one entry.

- ``freeze`` (feature extraction, optionally ``unfreeze_top_k``): :mod:`.freeze`
- ``lora`` (peft LoRA adapters + head): :mod:`.lora`
- ``full`` (every parameter): :mod:`.full`

The registry and the configurations load without torch; :func:`apply_method` and the shared
helpers (:mod:`.common`) import it when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hubtune.methods import freeze, full, lora

if TYPE_CHECKING:
    from torch import nn

    from hubtune.methods.common import MethodPlan
    from hubtune.schema import StrictModel

__all__ = ["METHODS", "Method", "MethodError", "MethodPlan", "apply_method", "default_lr"]


class MethodError(ValueError):
    """The method cannot be applied to this model; the message says why and what to do."""


@dataclass(frozen=True)
class Method:
    """A registered method: its recipe configuration and the function that applies it."""

    config: type[StrictModel]
    apply: Callable[..., MethodPlan]

    @property
    def name(self) -> str:
        return str(self.config.model_fields["name"].annotation.__args__[0])  # type: ignore[union-attr]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(freeze.FreezeMethod, freeze.apply),
        Method(lora.LoraMethod, lora.apply),
        Method(full.FullMethod, full.apply),
    )
}


def default_lr(name: str) -> float:
    """The learning rate a method trains at when the recipe gives none."""
    return float(METHODS[name].config.default_lr)  # type: ignore[attr-defined]


def apply_method(
    model: nn.Module,
    method: Any,
    *,
    lr: float,
    weight_decay: float = 0.0,
    newly_initialized: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
) -> MethodPlan:
    """Set ``requires_grad`` per the method and build optimizer parameter groups.

    Args:
        model: A *ForSequenceClassification / *ForImageClassification model.
        method: The recipe's method section (a registered configuration).
        lr: Learning rate of the head (and adapters / all weights for lora / full).
        weight_decay: Weight decay for matrices (not biases and norms).
        newly_initialized: Parameter names the checkpoint did not have (they must train).
        base_model_name_or_path: Recorded in a LoRA adapter's config so peft can reload it.
        base_model_revision: Commit SHA of the base model, recorded likewise.
    """
    from hubtune.methods.common import find_head

    return METHODS[method.name].apply(
        model,
        method,
        head=find_head(model),
        lr=lr,
        weight_decay=weight_decay,
        newly_initialized=list(newly_initialized or []),
        base_model_name_or_path=base_model_name_or_path,
        base_model_revision=base_model_revision,
    )


_COMMON = {
    "MethodPlan",
    "batchnorm_modules",
    "count_parameters",
    "find_blocks",
    "find_head",
    "frozen_subtrees",
    "under",
}


def __getattr__(name: str) -> Any:  # the shared helpers, with torch, on first use
    if name in _COMMON:
        return getattr(importlib.import_module("hubtune.methods.common"), name)
    raise AttributeError(f"module 'hubtune.methods' has no attribute {name!r}")
