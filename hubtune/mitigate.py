"""A fix path for a failed fairness audit: post-processing with Fairlearn's ``ThresholdOptimizer``.

``hubtune mitigate RUN_DIR --method threshold`` keeps the trained model as it is and learns, on
the run's **validation** split, one decision rule per group: a threshold on the model's score for
the positive class (for equalized odds, a random mix of two thresholds), chosen by Fairlearn's
``ThresholdOptimizer`` to maximise accuracy subject to the policy's constraint (equalized odds
when the policy bounds the equalized-odds difference, demographic parity when it bounds the
demographic-parity difference or ratio). The rule is applied to the **test** split, the result is
audited again with the same policy and compared group by group with the original run, and
everything is written to a new run folder (``RUN_DIR-threshold`` by default), whose card states
the post-processing and what it cost in accuracy per group.

What it cannot do, and says so:

* The rule needs each input's group at prediction time. Where the sensitive attribute is not
  known when the model is used (it is usually not: RedditBias' ``target_group`` is an
  annotation), the mitigated behaviour cannot be deployed, and the Space and the pushed model
  behave like the original. ``postprocess.json`` holds the rule for deployments that do know the
  group; the card says this at the top.
* Binary tasks only (Fairlearn's post-processing is defined for two classes).
* The rule is randomised for equalized odds (two inputs with the same score and group can get
  different answers); test predictions are drawn with the recipe's seed and recorded.
* The validation rows used to fit it are not covered by a DP guarantee of the training run.

Registry: :data:`METHODS` maps a method name to its function (one entry per method).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin

from hubtune.io import atomic_dir, atomic_write_json
from hubtune.rundir import (
    METRICS_FILE,
    POSTPROCESS_FILE,
    RECIPE_FILE,
    RUN_FILE,
    VALIDATION_PREDICTIONS_FILE,
    Predictions,
    read_json,
    read_predictions,
    write_predictions,
)

__all__ = ["CONSTRAINTS", "METHODS", "MitigationError", "apply_rule", "mitigate"]

logger = logging.getLogger(__name__)

CONSTRAINTS = ("equalized_odds", "demographic_parity")
# Files of the original run that the mitigated run keeps as they are: the weights are unchanged,
# so are the per-example losses (membership audit), the ledger and the validation predictions.
_KEPT = (
    "recipe.resolved.yaml",
    "privacy.json",
    "membership_scores.parquet",
    VALIDATION_PREDICTIONS_FILE,
)
_NOT_DEPLOYABLE = (
    "the rule needs each input's {columns} when the model is used; where that is not known at "
    "prediction time this post-processing cannot be deployed (the pushed model and its Space "
    "behave like the original run). Methods that need no group at prediction time: re-weighting "
    "the training (Fairlearn's ExponentiatedGradient on the head of a feature-extraction run) or "
    "collecting more data for the worst groups."
)


class MitigationError(ValueError):
    """The run cannot be post-processed; the message says why and what to do."""


def _recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECIPE_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _load_policy(run_dir: Path, policy: str | None) -> tuple[Any, str]:
    from hubtune.audit.policy import load_policy

    chosen = policy or (_recipe(run_dir).get("audit") or {}).get("policy") or "default"
    loaded, _ = load_policy(chosen)
    return loaded, str(chosen)


def _constraint_from_policy(policy: Any) -> str:
    thresholds = policy.thresholds
    if thresholds.max_equalized_odds_difference is not None:
        return "equalized_odds"
    if (
        thresholds.max_demographic_parity_difference is not None
        or thresholds.min_demographic_parity_ratio is not None
    ):
        return "demographic_parity"
    raise MitigationError(
        f"the audit policy {policy.name!r} bounds neither the equalized-odds nor the "
        "demographic-parity difference, so there is no constraint to post-process for; pass "
        f"--constraint ({' or '.join(CONSTRAINTS)})"
    )


def _groups(frame: pd.DataFrame, columns: list[str], missing_label: str) -> pd.Series:
    """Each row's group: the joint value of every sensitive column (missing values named)."""
    parts = []
    for column in columns:
        values = frame[column]
        is_missing = values.isna() | (values.astype(str).str.strip() == "")
        parts.append(
            pd.Series(np.where(is_missing, missing_label, values.astype(str)), index=frame.index)
        )
    joint = parts[0]
    for part in parts[1:]:
        joint = joint + " × " + part
    return joint.rename("group")


class _Scores(ClassifierMixin, BaseEstimator):
    """A fitted "estimator" whose score is the model's own probability of the positive class.

    ``ThresholdOptimizer(prefit=True)`` reads scores through ``predict_proba``; the scores are
    already in the predictions, so nothing is recomputed.
    """

    classes_ = np.array([0, 1])

    def __sklearn_is_fitted__(self) -> bool:  # scikit-learn's check_is_fitted asks this
        return True

    def fit(self, X: Any, y: Any) -> _Scores:  # noqa: N803 (scikit-learn's names)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:  # noqa: N803
        score = np.asarray(X, dtype=float).reshape(-1)
        return np.stack([1.0 - score, score], axis=1)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        return (np.asarray(X, dtype=float).reshape(-1) > 0.5).astype(int)


def _number(value: float) -> float | str:
    return value if np.isfinite(value) else ("+inf" if value > 0 else "-inf")


def _parse(value: float | str) -> float:
    if isinstance(value, str):  # JSON has no infinities: written as "+inf" / "-inf"
        return {"+inf": np.inf, "-inf": -np.inf}[value]
    return float(value)


def _rule(interpolation: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    """Fairlearn's fitted per-group interpolation as JSON: ``p0·[s op0 t0] + p1·[s op1 t1]``."""
    rule = {}
    for group, entry in interpolation.items():
        item = {
            "p0": float(entry.p0),
            "operator0": entry.operation0.operator,
            "threshold0": _number(float(entry.operation0.threshold)),
            "p1": float(entry.p1),
            "operator1": entry.operation1.operator,
            "threshold1": _number(float(entry.operation1.threshold)),
        }
        if "p_ignore" in entry:
            item["p_ignore"] = float(entry.p_ignore)
            item["prediction_constant"] = float(entry.prediction_constant)
        rule[str(group)] = item
    return rule


def apply_rule(
    rule: dict[str, dict[str, Any]], *, scores: np.ndarray, groups: np.ndarray
) -> np.ndarray:
    """The probability that each row is predicted positive under ``postprocess.json``'s rule.

    Example:
        >>> rule = {"a": {"p0": 1.0, "operator0": ">", "threshold0": 0.3,
        ...               "p1": 0.0, "operator1": ">", "threshold1": 0.9}}
        >>> apply_rule(rule, scores=np.array([0.2, 0.5]), groups=np.array(["a", "a"]))
        array([0., 1.])
    """
    scores = np.asarray(scores, dtype=float)
    groups = np.asarray(groups).astype(str)
    out = np.full(len(scores), np.nan)
    for group, item in rule.items():
        rows = groups == group
        s = scores[rows]

        def test(operator: str, threshold: float | str, s: np.ndarray = s) -> np.ndarray:
            t = _parse(threshold)
            return (s > t) if operator == ">" else (s < t)

        p = item["p0"] * test(item["operator0"], item["threshold0"]) + item["p1"] * test(
            item["operator1"], item["threshold1"]
        )
        if "p_ignore" in item:
            p = item["p_ignore"] * item["prediction_constant"] + (1 - item["p_ignore"]) * p
        out[rows] = p
    unknown = sorted(set(groups[np.isnan(out)]))
    if unknown:
        raise MitigationError(f"the rule has no thresholds for the group(s) {unknown}")
    return out


def _accuracy_by_group(frame: pd.DataFrame, groups: pd.Series) -> dict[str, dict[str, Any]]:
    right = frame["label_id"].to_numpy() == frame["prediction_id"].to_numpy()
    table = pd.DataFrame({"group": groups.to_numpy(), "right": right})
    return {
        str(g): {"rows": int(len(part)), "accuracy": float(part["right"].mean())}
        for g, part in table.groupby("group", sort=True)
    }


def _expected_gap(
    positive_prob: np.ndarray, positive: np.ndarray, groups: np.ndarray, constraint: str
) -> float:
    """The constraint's disparity under the (randomised) rule, from each row's expected answer:
    equalized odds = max(TPR gap, FPR gap); demographic parity = selection-rate gap."""
    frame = pd.DataFrame({"p": positive_prob, "y": positive, "g": groups})
    if constraint == "demographic_parity":
        rates = frame.groupby("g")["p"].mean()
        return float(rates.max() - rates.min())
    gaps = []
    for y in (1, 0):  # TPR, then FPR
        rates = frame[frame["y"] == y].groupby("g")["p"].mean()
        gaps.append(float(rates.max() - rates.min()))
    return max(gaps)


def _copy_weights(source: Path, target: Path) -> None:
    """Hard links where the file system allows (the weights are unchanged), else copies."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def _write_mitigated_run(
    run_dir: Path,
    out: Path,
    *,
    run_info: dict[str, Any],
    predictions: Predictions,
    postprocess: dict[str, Any],
    record: dict[str, Any],
) -> None:
    """The new run folder, atomically: the original's weights (hard links) and kept files, the
    post-processed predictions, the rule, metrics and run.json (last: a complete run)."""
    after_summary = record["test"]["after"]
    with atomic_dir(out) as tmp:
        for name in _KEPT:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, tmp / name)
        for weights in ("model", "adapter"):
            if (run_dir / weights).is_dir():
                _copy_weights(run_dir / weights, tmp / weights)
        write_predictions(tmp, predictions)
        atomic_write_json(tmp / POSTPROCESS_FILE, postprocess)
        metrics = read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else {}
        metrics["before_postprocessing"] = {"test": dict(metrics.get("test") or {})}
        metrics["test"] = {**(metrics.get("test") or {}), **after_summary}
        atomic_write_json(tmp / METRICS_FILE, metrics)
        info = dict(run_info)
        info.pop("audit", None)
        info["name"] = out.name
        info["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info["test"] = {**(info.get("test") or {}), **after_summary}
        info["postprocessing"] = record
        atomic_write_json(tmp / RUN_FILE, info)  # last: a complete run


def mitigate_threshold(
    *,
    run_dir: Path,
    out: Path,
    policy: str | None,
    constraint: str | None,
) -> dict[str, Any]:
    """Fit per-group thresholds on validation, apply them to test, and write the new run."""
    from fairlearn.postprocessing import ThresholdOptimizer

    from hubtune.audit.fairness import _positive_index

    run_info = read_json(run_dir / RUN_FILE)
    label_names = [str(n) for n in (run_info.get("data") or {}).get("label_names") or []]
    test = read_predictions(run_dir, label_names=label_names)
    if test is None or test.kind != "classification":
        raise MitigationError(
            f"{run_dir}: threshold post-processing applies to classifiers; this run has no "
            "classification predictions"
        )
    if len(test.label_names) != 2:
        raise MitigationError(
            f"{run_dir}: threshold post-processing is defined for two classes (Fairlearn's "
            f"ThresholdOptimizer); this run has {len(test.label_names)} ({test.label_names})"
        )
    validation = read_predictions(run_dir, name=VALIDATION_PREDICTIONS_FILE)
    if validation is None:
        raise MitigationError(
            f"{run_dir} has no {VALIDATION_PREDICTIONS_FILE}: the thresholds are fitted on the "
            "validation split's scores, which hubtune writes since this version; re-run the "
            "training (`hubtune run RECIPE --overwrite`)"
        )
    loaded, chosen = _load_policy(run_dir, policy)
    constraint = constraint or _constraint_from_policy(loaded)
    sensitive = list(loaded.sensitive if loaded.sensitive is not None else test.sensitive_columns)
    if not sensitive:
        raise MitigationError(
            f"{run_dir}: the run declares no sensitive column (data.columns.sensitive), so there "
            "are no groups to post-process for"
        )
    for frame, split in ((validation.frame, "validation"), (test.frame, "test")):
        absent = [c for c in sensitive if c not in frame.columns]
        if absent:
            raise MitigationError(
                f"{run_dir}: the {split} predictions lack the sensitive column(s) {absent}"
            )
    positive = _positive_index(test.label_names, loaded.positive_label)
    assert positive is not None  # two labels
    score_column = f"prob_{test.label_names[positive]}"
    groups_valid = _groups(validation.frame, sensitive, loaded.missing_label)
    groups_test = _groups(test.frame, sensitive, loaded.missing_label)
    unseen = sorted(set(groups_test) - set(groups_valid))
    if unseen:
        raise MitigationError(
            f"the test split has group(s) {unseen} with no validation rows, so no threshold can be "
            "fitted for them; use a larger validation split (data.split.validation) or stratify"
        )
    counts_valid = groups_valid.value_counts().sort_index()
    y_valid = (validation.frame["label_id"].to_numpy() == positive).astype(int)
    for group, part in pd.Series(y_valid).groupby(groups_valid.to_numpy()):
        if part.nunique() < 2:
            raise MitigationError(
                f"group {group!r} has validation rows of one class only ({len(part)} rows), so its "
                "true- and false-positive rates cannot be estimated; use a larger validation split"
            )
    optimizer = ThresholdOptimizer(
        estimator=_Scores(),
        constraints=constraint,
        objective="accuracy_score",
        prefit=True,
        predict_method="predict_proba",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        optimizer.fit(
            validation.frame[[score_column]].to_numpy(),
            y_valid,
            sensitive_features=groups_valid.to_numpy(),
        )
    rule = _rule(optimizer.interpolated_thresholder_.interpolation_dict)
    positive_prob = apply_rule(
        rule, scores=test.frame[score_column].to_numpy(), groups=groups_test.to_numpy()
    )
    seed = int(_recipe(run_dir).get("seed", 0))
    draw = np.random.default_rng([seed, 0x7E5]).random(len(positive_prob)) < positive_prob
    names = np.array(test.label_names, dtype=object)
    predicted = np.where(draw, positive, 1 - positive).astype("int64")
    after = test.frame.copy()
    after["prediction_id"] = predicted
    after["prediction"] = names[predicted]
    after[score_column] = positive_prob
    after[f"prob_{test.label_names[1 - positive]}"] = 1.0 - positive_prob

    labels = test.frame["label_id"].to_numpy()
    before_by_group = _accuracy_by_group(test.frame, groups_test)
    after_by_group = _accuracy_by_group(after, groups_test)
    from sklearn.metrics import f1_score

    def summary(frame: pd.DataFrame) -> dict[str, float]:
        pred = frame["prediction_id"].to_numpy()
        return {
            "accuracy": float((pred == labels).mean()),
            "macro_f1": float(
                f1_score(labels, pred, labels=[0, 1], average="macro", zero_division=0)
            ),
        }

    before, after_summary = summary(test.frame), summary(after)
    expected_accuracy = float(
        np.mean(np.where(labels == positive, positive_prob, 1.0 - positive_prob))
    )
    gap: dict[str, Any] = {
        "measure": constraint.replace("_", " ") + " difference, from each row's expected answer",
        "validation": _expected_gap(
            apply_rule(
                rule,
                scores=validation.frame[score_column].to_numpy(),
                groups=groups_valid.to_numpy(),
            ),
            y_valid,
            groups_valid.to_numpy(),
            constraint,
        ),
        "test": _expected_gap(
            positive_prob, (labels == positive).astype(int), groups_test.to_numpy(), constraint
        ),
    }
    deployable_note = _NOT_DEPLOYABLE.format(columns=" and ".join(f"`{c}`" for c in sensitive))
    record: dict[str, Any] = {
        "method": "threshold",
        "library": "fairlearn.postprocessing.ThresholdOptimizer",
        "constraint": constraint,
        "objective": "accuracy_score",
        "policy": chosen,
        "sensitive": sensitive,
        "positive_label": test.label_names[positive],
        "fitted_on": {
            "split": "validation",
            "rows": int(len(groups_valid)),
            "rows_per_group": {str(k): int(v) for k, v in counts_valid.items()},
        },
        "randomized": any(
            item["p0"] not in (0.0, 1.0) or "p_ignore" in item for item in rule.values()
        ),
        "expected_gap": gap,
        "test_draw_seed": [seed, 0x7E5],
        "original_run": run_dir.name,
        "test": {
            "before": before,
            "after": after_summary,
            "expected_accuracy_after": expected_accuracy,
            "accuracy_by_group": {
                g: {
                    "rows": before_by_group[g]["rows"],
                    "before": before_by_group[g]["accuracy"],
                    "after": after_by_group[g]["accuracy"],
                }
                for g in before_by_group
            },
        },
        "requires_sensitive_at_prediction": True,
        "deployment": deployable_note,
        "notes": [],
    }
    small = [str(g) for g, v in counts_valid.items() if v < loaded.min_group_size]
    if small:
        record["notes"].append(
            f"group(s) {small} have fewer than {loaded.min_group_size} validation rows: their "
            "thresholds are noisy"
        )
    if gap["test"] > gap["validation"] + 0.05:
        smallest = int(pd.Series(y_valid).groupby(groups_valid.to_numpy()).value_counts().min())
        record["notes"].append(
            f"the rule equalises the validation rows it was fitted on ({gap['measure']} "
            f"{gap['validation']:.3f}) but carries over only in part to the test rows "
            f"({gap['test']:.3f}): the smallest group has {smallest} validation rows of one "
            "class, too few to pin its error rates down; a larger validation split "
            "(data.split.validation) gives thresholds that generalise better"
        )
    if (run_dir / "privacy.json").exists():
        record["notes"].append(
            "the thresholds were fitted on the validation split, which the training run's DP "
            "guarantee does not cover (as for the choice of the kept epoch)"
        )

    _write_mitigated_run(
        run_dir,
        out,
        run_info=run_info,
        predictions=Predictions(
            after, label_names=test.label_names, sensitive_columns=test.sensitive_columns
        ),
        postprocess={
            "format": "hubtune.postprocess/1",
            "how": "P(predict positive_label) = p0*[score op0 threshold0] + p1*[score op1 "
            "threshold1] for the input's group, score = the model's probability of "
            "positive_label; draw the prediction from that probability",
            "positive_label": test.label_names[positive],
            "sensitive": sensitive,
            "group_separator": " × ",
            "missing_label": loaded.missing_label,
            "constraint": constraint,
            "rule": rule,
        },
        record=record,
    )
    return record


MITIGATION = Callable[..., dict[str, Any]]
METHODS: dict[str, MITIGATION] = {"threshold": mitigate_threshold}


def mitigate(
    run_dir: str | Path,
    *,
    method: str = "threshold",
    constraint: str | None = None,
    policy: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Post-process a finished run for fairness, re-audit it, and write it as a new run.

    Args:
        run_dir: A complete run directory of a binary classifier.
        method: A key of :data:`METHODS` (``threshold``).
        constraint: ``equalized_odds`` or ``demographic_parity``; default: the one the audit
            policy bounds.
        policy: Audit policy name or path; default: the run's ``audit.policy``.
        out: The new run directory; default ``RUN_DIR-<method>`` beside it.
        overwrite: Replace ``out`` if it exists.

    Returns:
        ``{"run_dir", "postprocessing", "audit"}``: where it was written, the record in its
        run.json, and the new audit.
    """
    from hubtune.audit import run_audit
    from hubtune.card import write_card

    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise MitigationError(f"{run_dir} is not a complete run (no {RUN_FILE})")
    if method not in METHODS:
        raise MitigationError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if constraint is not None and constraint not in CONSTRAINTS:
        raise MitigationError(
            f"--constraint must be one of {list(CONSTRAINTS)}, not {constraint!r}"
        )
    if (run_dir / POSTPROCESS_FILE).exists():
        raise MitigationError(
            f"{run_dir} is already post-processed; mitigate its original run "
            f"({read_json(run_dir / RUN_FILE).get('postprocessing', {}).get('original_run')})"
        )
    target = Path(out) if out is not None else run_dir.parent / f"{run_dir.name}-{method}"
    if target.resolve() == run_dir.resolve():
        raise MitigationError("--out must differ from the run being mitigated")
    if target.exists() and not overwrite:
        raise MitigationError(
            f"{target} exists; pass --overwrite to replace it, or --out elsewhere"
        )
    record = METHODS[method](run_dir=run_dir, out=target, policy=policy, constraint=constraint)
    audit = run_audit(target, policy=policy, compare=run_dir)
    write_card(target)
    return {"run_dir": str(target), "postprocessing": record, "audit": audit}
