"""Differential privacy (Opacus DP-SGD) that cannot silently break.

An (ε, δ) guarantee holds only when sampling, clipping, noise and accounting match. hubtune
therefore owns the whole chain and checks it before and during training:

- :mod:`~hubtune.privacy.accounting`: ε from a step history (PRV and RDP), σ for a target, the
  noise plan of a run (a resumed run plans from what it spent), the void-guarantee rule. No
  torch: reading or checking a ledger is cheap.
- :mod:`~hubtune.privacy.engine`: Poisson sampling at the accounted rate, Opacus' optimizer and
  clipping, the secret generators, the preflight checks and the ledger.
- :mod:`~hubtune.privacy.loop`: the DP epoch and its guards (budget, non-finite values, tensors
  that never move).

The names below are importable from ``hubtune.privacy``; the engine's and the loop's load torch
and Opacus only when first used.
"""

from __future__ import annotations

from typing import Any

from hubtune.privacy import accounting as _accounting
from hubtune.privacy.accounting import *  # noqa: F403  (its __all__ is part of this package's)

_LAZY = {
    "PrivacyRun": "engine",
    "add_position_ids": "engine",
    "batchnorm_in_train_mode": "engine",
    "check_modules": "engine",
    "check_per_sample_gradients": "engine",
    "check_secure_mode": "engine",
    "forward_takes_position_ids": "engine",
    "out_of_place": "engine",
    "prepare_private": "engine",
    "refuse_trainable_batchnorm": "engine",
    "dp_epoch": "loop",
    "dp_preflight": "loop",
}

__all__ = [*_accounting.__all__, *_LAZY]  # noqa: PLE0604


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"hubtune.privacy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hubtune.privacy' has no attribute {name!r}")
