"""What a public model repository may carry of a run's audit and privacy ledger.

The (ε, δ) guarantee covers the trained weights, nothing else. Every other figure a run
publishes is computed exactly, without noise: on the held-out rows (test metrics, the fairness
audit), on the training rows themselves (the membership audit, the canaries, the non-private
twin) or on the data's size (the ledger's sampling rate). hubtune therefore publishes:

- the verdict and *aggregate* audit figures (AUC, empirical ε lower bounds and the attacks'
  power), always;
- the membership audit's details (loss means, TPR/FPR at each level, canary hits and
  memorisation counts) and the non-private twin's per-group figures only when the recipe says
  ``push.include_membership_audit: true``;
- a public ledger without the exact training-set size or observed batch sizes;

and states in the card and the report which published figures the guarantee does not cover.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["not_covered_by_dp", "public_audit", "public_ledger", "WITHHELD_NOTE"]

WITHHELD_NOTE = (
    "withheld from the public copy: computed on the training rows without differential privacy "
    "(publish with push.include_membership_audit: true)"
)

# Ledger keys that are exact statistics of the private training set, not part of the mechanism.
_PRIVATE_LEDGER_KEYS = ("dataset_size", "expected_batch_size", "observed_batch_sizes")
_PUBLIC_MEMBERSHIP_KEYS = (
    "attack",
    "members",
    "nonmembers",
    "auc",
    "epsilon_lower_bound",
    "max_provable_epsilon",
    "dp_epsilon",
    "dp_delta",
    "can_refute_dp_epsilon",
    "beats_dp_bound",
    "confidence",
    "interpretation",
    "skipped",
)
_PUBLIC_CANARY_KEYS = (
    "canaries",
    "guesses",
    "epsilon_lower_bound",
    "max_provable_epsilon",
    "confidence",
    "delta",
    "exceeds_dp_epsilon",
    "method",
)


def public_ledger(ledger: dict[str, Any]) -> dict[str, Any]:
    """The privacy ledger without exact statistics of the training set.

    What stays is the mechanism (σ per segment, C, q, steps, δ, accountant) that anyone needs
    to recompute ε. q = 1/ceil(n/L) still tells the training-set size to within the expected
    batch size L; :func:`not_covered_by_dp` says so.
    """
    out = {k: v for k, v in ledger.items() if k not in _PRIVATE_LEDGER_KEYS}
    out["withheld"] = list(_PRIVATE_LEDGER_KEYS)
    return out


def public_audit(audit: dict[str, Any], *, include_membership: bool) -> dict[str, Any]:
    """The audit as a public repository carries it (see the module docstring)."""
    out = copy.deepcopy(audit)
    if not include_membership:
        membership = out.get("membership")
        if membership and "auc" in membership:
            out["membership"] = {
                k: membership[k] for k in _PUBLIC_MEMBERSHIP_KEYS if k in membership
            }
            out["membership"]["withheld"] = WITHHELD_NOTE
        canaries = out.get("canaries")
        if canaries:
            out["canaries"] = {k: canaries[k] for k in _PUBLIC_CANARY_KEYS if k in canaries}
            out["canaries"]["withheld"] = WITHHELD_NOTE
        if out.get("comparison"):
            out["comparison"] = None
            out["comparison_withheld"] = (
                "the non-private twin's per-group figures are "
                + WITHHELD_NOTE.replace("computed on", "from a model trained on")
            )
    out["publication"] = {
        "membership_details": "included" if include_membership else "withheld",
        "not_covered_by_dp": not_covered_by_dp(out),
    }
    return out


def not_covered_by_dp(audit: dict[str, Any]) -> list[str]:
    """Plain statements of which published figures the (ε, δ) guarantee does not cover."""
    privacy = audit.get("privacy") or {}
    if not privacy.get("dp"):
        return [
            "This model was trained without differential privacy: no published figure is covered."
        ]
    if privacy.get("guarantee_void"):
        return ["This run's DP noise was fixed for testing: no published figure is covered."]
    lines = [
        "The (ε, δ) guarantee covers the trained weights and anything computed from them alone "
        "(predictions on new inputs).",
        "Test metrics and the fairness audit's per-group figures are exact statistics of the "
        "held-out rows; those rows were never trained on, and the guarantee says nothing about them.",
        "The ledger's sampling rate q and step count reveal the training-set size to within the "
        "expected batch size; the data summary in the card gives row counts exactly.",
    ]
    lines.append(
        "Which epoch's weights were kept was decided on the validation rows (held out, not "
        "covered); the guarantee covers the weights of every epoch, so that choice spends no budget."
    )
    membership = audit.get("membership") or {}
    if "auc" in membership:
        detail = (
            "with its per-threshold rates and loss means"
            if not membership.get("withheld")
            else "aggregates only"
        )
        lines.append(f"The membership audit ({detail}) is computed on training rows without noise.")
    canaries = audit.get("canaries") or {}
    if canaries:
        lines.append(
            "The canary audit's figures are computed on the inserted random canaries (no real "
            "data) without noise."
        )
    if (audit.get("run") or {}).get("scratch_baseline"):
        lines.append(
            "The from-scratch baseline's accuracy comes from a second model trained on the same "
            "rows (its own DP guarantee, not this model's; published figures of both compose)."
        )
    if (audit.get("run") or {}).get("classical_baseline"):
        lines.append(
            "The classical baseline's accuracy comes from a model (without pretraining) trained "
            "on the same rows without differential privacy."
        )
    if audit.get("comparison"):
        lines.append(
            "The non-private twin's figures come from a model trained on the same rows without "
            "differential privacy."
        )
    return lines
