"""Audit policies: which groups to compare, how, and what passes.

A policy is a YAML file. The shipped ones live in ``audits/`` (``default``, ``strict``) and
are found by name; any other file is given by path. Policies are validated like recipes:
unknown keys are errors, and every problem is reported with its field path.

Example:
    >>> policy = load_policy("default")
    >>> policy.thresholds.max_equalized_odds_difference
    0.1
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["METRICS", "PUBLISHABLE", "AuditPolicy", "PolicyError", "load_policy", "policy_dir"]

# Per-group metrics a policy may ask for. Definitions (binary and multi-class) are in
# hubtune/audit/fairness.py and in the report's glossary.
MetricName = Literal["accuracy", "selection_rate", "tpr", "fpr", "fnr", "precision", "f1", "count"]
METRICS: tuple[str, ...] = (
    "accuracy",
    "selection_rate",
    "tpr",
    "fpr",
    "fnr",
    "precision",
    "f1",
    "count",
)


# Verdicts that let `hubtune push` publish without an override. "not_applicable" (no check of
# the policy applied) publishes too, and the card, report and Space say that nothing was checked;
# a policy with thresholds.require_fairness_check turns it into a failure.
PUBLISHABLE = ("pass", "not_applicable")


class PolicyError(ValueError):
    """A policy file is missing or invalid; the message says which field and how to fix it."""


class _Strict(BaseModel):
    # inf or nan as a limit would make a check that can never fail (or never pass).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Thresholds(_Strict):
    """Pass/fail limits. A limit left out is not checked."""

    max_demographic_parity_difference: float | None = Field(
        None, ge=0, le=1, description="Largest gap in selection rate between reportable groups."
    )
    min_demographic_parity_ratio: float | None = Field(
        None, ge=0, le=1, description="Smallest ratio of group selection rates (min / max)."
    )
    max_equalized_odds_difference: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest of the TPR gap and the FPR gap between reportable groups.",
    )
    max_metric_gap: dict[MetricName, float] = Field(
        default_factory=dict,
        description="Per metric: largest allowed gap (max - min) between reportable groups.",
    )
    min_group_metric: dict[MetricName, float] = Field(
        default_factory=dict,
        description="Per metric: the value every reportable group must reach (e.g. accuracy: 0.6).",
    )
    min_class_recall: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Every class's recall (share of its test rows predicted as it) must reach this: the defects a quality-control model misses.",
    )
    min_class_precision: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Every class's precision (share of its predictions that are right) must reach this.",
    )
    max_membership_auc: float | None = Field(
        None, ge=0.5, le=1, description="Ceiling on the loss-threshold membership-inference AUC."
    )
    fail_if_attack_beats_dp_bound: bool = Field(
        True,
        description="Fail when the membership attack is significantly stronger than the run's (ε, δ) allows.",
    )
    max_residual_pii_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Ceiling on the share of training rows in which a second scan of the scrubbed "
        "text still finds personal data (data.anonymize); a run without data.anonymize fails it.",
    )
    require_fairness_check: bool = Field(
        False,
        description="Fail when no fairness limit applies to the run (no sensitive column declared, or no limit set for them); otherwise such an audit is 'not applicable', never 'pass'.",
    )


class GenerationThresholds(_Strict):
    """Limits for language models (model.task: text-generation); classifiers ignore them."""

    max_loss_gap: float | None = Field(
        None,
        gt=0,
        description="Ceiling on the largest gap in mean token loss (nats) between reportable groups "
        "of a sensitive column; exp(gap) is the ratio of their perplexities (0.25: at most 28% higher).",
    )
    max_perplexity: float | None = Field(
        None,
        gt=1,
        description="Ceiling on every reportable group's test perplexity.",
    )
    max_stereotype_increase: float | None = Field(
        None,
        ge=0,
        description="Ceiling on how much fine-tuning raised the share of CrowS-Pairs pairs where "
        "the model prefers the stereotyping sentence (overall and per bias type).",
    )
    max_canary_exposure: float | None = Field(
        None,
        gt=0,
        description="Ceiling (bits) on the highest exposure of any Secret-Sharer canary "
        "(audit.exposure); an unseen canary's expected exposure is 1.44 bits.",
    )


class MembershipPolicy(_Strict):
    """The empirical privacy audit (loss-threshold membership inference)."""

    enabled: bool = True
    fpr_levels: list[float] = Field(
        default_factory=lambda: [0.001, 0.01],
        description="False-positive rates at which the attack's true-positive rate is reported.",
    )

    @field_validator("fpr_levels")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        if not levels or any(not 0 < x < 0.5 for x in levels):
            raise ValueError("fpr_levels must be a non-empty list of rates in (0, 0.5)")
        return sorted(levels)


class AuditPolicy(_Strict):
    """An audit policy; see audits/README.md for how a reviewer reads its report."""

    name: str
    description: str | None = None
    sensitive: list[str] | None = Field(
        None,
        description="Sensitive columns to audit; default: the recipe's data.columns.sensitive.",
    )
    intersections: bool = Field(
        True, description="Also audit the combination of all sensitive columns."
    )
    metrics: list[MetricName] = Field(default_factory=lambda: list(METRICS))  # type: ignore[arg-type]
    positive_label: str | None = Field(
        None,
        description="Binary tasks: the label counted as 'selected'/positive; default the second of the recipe's labels.",
    )
    n_boot: int = Field(
        1000, ge=0, le=100_000, description="Bootstrap resamples for confidence intervals; 0: none."
    )
    ci_level: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0
    min_group_size: int = Field(
        30, ge=1, description="Groups with fewer test rows are suppressed (not shown, not judged)."
    )
    missing_label: str = Field(
        "(missing)", description="The group name given to rows whose sensitive value is missing."
    )
    judge_on: Literal["estimate", "ci_bound"] = Field(
        "estimate",
        description="estimate: judge point estimates; ci_bound: judge the pessimistic end of each interval.",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    generation: GenerationThresholds = Field(
        default_factory=GenerationThresholds,
        description="Language models: per-group loss and perplexity limits (the classifier "
        "thresholds above do not apply to them).",
    )
    membership: MembershipPolicy = Field(default_factory=MembershipPolicy)

    @field_validator("metrics")
    @classmethod
    def _count_always(cls, metrics: list[str]) -> list[str]:
        # Counts are how a reviewer judges how much a group's numbers can be trusted.
        return list(dict.fromkeys([*metrics, "count"]))


def policy_dir() -> Path:
    """The folder of shipped policies (``audits/`` in a checkout, package data when installed)."""
    return Path(__file__).resolve().parent.parent / "audits"


def load_policy(name_or_path: str | Path) -> tuple[AuditPolicy, str]:
    """Load a policy by shipped name (``default``, ``strict``) or by path.

    Returns:
        The validated policy and a short digest of its file (recorded in audit.json).

    Raises:
        PolicyError: the file is missing or invalid (every problem, with its field path).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = policy_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in policy_dir().glob("*.yaml"))
        raise PolicyError(
            f"audit policy {str(name_or_path)!r} not found; give a path to a policy YAML file or one of "
            f"the shipped names {shipped}"
        )
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: a policy is a mapping of settings, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        policy = AuditPolicy.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise PolicyError(f"{path}: invalid audit policy\n" + "\n".join(lines)) from None
    return policy, hashlib.sha256(text.encode()).hexdigest()[:16]
