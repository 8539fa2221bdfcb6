"""Run the audit on a finished run directory and write ``RUN_DIR/audit/``.

Inputs (all written by ``hubtune run``): ``run.json`` (a complete run), ``predictions.parquet``
(test rows: labels, predictions, sensitive columns), ``membership_scores.parquet`` (per-example
losses, never published), ``privacy.json`` (the DP ledger, when trained with DP) and
``recipe.resolved.yaml`` (its ``audit`` section names the default policy).

Outputs: ``audit/audit.json`` (machine-readable, schema-versioned), ``audit/report.md``,
``audit/report.html`` (self-contained) and ``audit/charts/*.png``; the verdict is also
written into ``run.json`` under ``audit``, where ``hubtune push`` reads it as its gate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from hubtune import __version__, baselines
from hubtune.audit.fairness import audit_fairness, compare_fairness
from hubtune.audit.membership import canary_audit, loss_threshold_attack
from hubtune.audit.policy import PUBLISHABLE, AuditPolicy, load_policy
from hubtune.io import atomic_dir, atomic_write_json, atomic_write_text
from hubtune.privacy import VOID_REASON, guarantee_is_void
from hubtune.rundir import (
    AUDIT_DIR,
    AUDIT_JSON,
    EXPOSURE_FILE,
    MEMBERSHIP_FILE,
    PREDICTIONS_FILE,
    PRIVACY_LEDGER,
    RECIPE_FILE,
    RUN_FILE,
    STEREOTYPES_FILE,
    Predictions,
    RunDirError,
    read_json,
    read_predictions,
)

__all__ = ["AUDIT_SCHEMA_VERSION", "AuditError", "audit_gate", "run_audit"]

logger = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = 1


class AuditError(RuntimeError):
    """The run directory cannot be audited; the message says why and what to do."""


def _read_predictions(run_dir: Path, label_names: list[str] | None = None) -> Predictions:
    try:
        predictions = read_predictions(run_dir, label_names=label_names)
    except RunDirError as exc:
        raise AuditError(str(exc)) from exc
    if predictions is None:
        path = run_dir / PREDICTIONS_FILE
        raise AuditError(f"{path} is missing; audit a complete run directory (one with run.json)")
    return predictions


def _privacy_section(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PRIVACY_LEDGER
    if not path.exists():
        return {"dp": False, "statement": "trained without differential privacy"}
    ledger = json.loads(path.read_text())
    keep = (
        "epsilon",
        "delta",
        "accountant",
        "epsilon_by_accountant",
        "target_epsilon",
        "noise_multiplier",
        "noise",
        "noise_segments",
        "max_grad_norm",
        "sample_rate",
        "sampling",
        "steps",
        "unit",
        "secure_mode",
        "num_processes",
        "stopped_by_budget",
        "trained_parameter_count",
    )
    section = {"dp": True, **{k: ledger.get(k) for k in keep}}
    section["guarantee_void"] = guarantee_is_void(ledger.get("noise_source"))
    if section["guarantee_void"]:
        section["statement"] = f"NO privacy guarantee: {VOID_REASON}"
        return section
    section["statement"] = (
        f"({ledger['epsilon']:.3g}, {ledger['delta']:.2g})-differentially private at the "
        f"{ledger.get('unit', 'example')} level ({str(ledger['accountant']).upper()} accountant; "
        f"RDP gives ε = {ledger['epsilon_by_accountant']['rdp']:.3g})"
    )
    return section


def _judge(
    name: str,
    *,
    value: float | None,
    ci: list[float] | None,
    threshold: float,
    kind: str,
    policy: AuditPolicy,
    scope: str,
) -> dict[str, Any]:
    """One verdict line. ``kind`` is "max" (value must not exceed) or "min"."""
    judged = value
    if policy.judge_on == "ci_bound" and value is not None:
        judged = None if ci is None else (ci[1] if kind == "max" else ci[0])
    check: dict[str, Any] = {
        "check": name,
        "scope": scope,
        "value": value,
        "ci": ci,
        "judged_on": policy.judge_on,
        "judged_value": judged,
        "threshold": threshold,
        "rule": f"{'≤' if kind == 'max' else '≥'} {threshold:g}",
    }
    if judged is None or (isinstance(judged, float) and math.isnan(judged)):
        check.update(passed=None, margin=None, note="not evaluable (too few rows or groups)")
    else:
        margin = threshold - judged if kind == "max" else judged - threshold
        check.update(passed=bool(margin >= 0), margin=margin)
    return check


def _verdict(
    policy: AuditPolicy,
    fairness: dict[str, Any],
    membership: dict[str, Any] | None,
    canaries: dict[str, Any] | None,
    privacy: dict[str, Any] | None = None,
    exposure: dict[str, Any] | None = None,
    stereotypes: dict[str, Any] | None = None,
    anonymization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Judge every check the policy sets: pass, fail, not evaluable or not informative.

    A language model's run (``fairness["task"] == "generation"``) is judged on the policy's
    ``generation`` limits; the classifier thresholds do not apply to it (a note says so).

    Long on purpose: every check a policy can set is judged here, in the order the report
    lists them, so the verdict's rules can be read in one place.
    """
    t = policy.thresholds
    checks: list[dict[str, Any]] = []
    notes: list[str] = []
    if privacy is not None and privacy.get("guarantee_void"):
        # Whatever else passes, a model that claims DP with a public noise seed must not.
        checks.append(
            {
                "check": "DP guarantee in force",
                "scope": "privacy ledger",
                "value": None,
                "ci": None,
                "judged_on": "ledger",
                "judged_value": None,
                "threshold": None,
                "rule": "DP sampling and noise drawn from a secret seed",
                "passed": False,
                "margin": None,
                "note": VOID_REASON,
            }
        )
    declared = list(fairness["missing"])  # the sensitive columns that were audited
    slices = fairness["slices"]
    if not slices:
        notes.append(fairness.get("note") or "no sensitive columns declared: no fairness checks")
        if declared:  # groups exist but none can be shown: every limit is judged "not evaluable"
            slices = [{"name": " × ".join(declared), "disparities": {}, "groups": []}]
    generation = fairness.get("task") == "generation"
    if generation:
        checks += _generation_checks(policy, slices)
        if _classifier_limits(t):
            notes.append(
                "the policy's classifier thresholds (parity, equalized odds, per-class rates, "
                "metric gaps) do not apply to a language model; its generation limits do"
            )
        slices = []  # the classifier loops below have nothing to judge
    for sl in slices:
        d = sl["disparities"]
        scope = sl["name"]
        for name, kind, limit in (
            ("demographic_parity_difference", "max", t.max_demographic_parity_difference),
            ("demographic_parity_ratio", "min", t.min_demographic_parity_ratio),
            ("equalized_odds_difference", "max", t.max_equalized_odds_difference),
        ):
            if limit is None:
                continue
            entry = d.get(name) or {}
            checks.append(
                _judge(
                    name.replace("_", " "),
                    value=entry.get("value"),
                    ci=entry.get("ci"),
                    threshold=limit,
                    kind=kind,
                    policy=policy,
                    scope=scope,
                )
            )
        for metric, limit in t.max_metric_gap.items():
            entry = d.get("largest_gap", {}).get(metric) or {}
            checks.append(
                _judge(
                    f"{metric} gap",
                    value=entry.get("value"),
                    ci=entry.get("ci"),
                    threshold=limit,
                    kind="max",
                    policy=policy,
                    scope=scope,
                )
            )
        shown = [g for g in sl["groups"] if not g["suppressed"]]
        for metric, limit in t.min_group_metric.items():
            # No reportable group at all must not pass silently: judge it as not evaluable.
            for group in shown or [{"name": "(no reportable group)", "metrics": {}}]:
                entry = group["metrics"].get(metric) or {}
                checks.append(
                    _judge(
                        metric,
                        value=entry.get("value"),
                        ci=entry.get("ci"),
                        threshold=limit,
                        kind="min",
                        policy=policy,
                        scope=f"{scope} = {group['name']}",
                    )
                )
    if t.require_fairness_check and not any(c["scope"] != "privacy ledger" for c in checks):
        checks.append(
            {
                "check": "fairness check required",
                "scope": "policy",
                "value": None,
                "ci": None,
                "judged_on": "policy",
                "judged_value": None,
                "threshold": None,
                "rule": "at least one fairness limit applies",
                "passed": False,
                "margin": None,
                "note": "no sensitive column was declared, or the policy sets no limit for them",
            }
        )
    class_floors: list[tuple[str, float | None]] = [
        ("recall", t.min_class_recall),
        ("precision", t.min_class_precision),
    ]
    for rate, limit in class_floors:
        if limit is None or generation:
            continue
        for entry in fairness.get("per_class") or []:
            checks.append(
                _judge(
                    f"class {rate}",
                    value=entry[rate]["value"],
                    ci=entry[rate]["ci"],
                    threshold=limit,
                    kind="min",
                    policy=policy,
                    scope=f"class = {entry['label']}",
                )
            )
    if t.max_residual_pii_rate is not None:
        checks.append(_residual_pii_check(policy, anonymization))
    if exposure is not None:
        checks += _exposure_checks(policy, exposure)
    if stereotypes is not None and policy.generation.max_stereotype_increase is not None:
        for row in stereotypes["rows"]:
            checks.append(
                _judge(
                    "stereotype preference increase",
                    value=row["change"]["value"],
                    ci=row["change"]["ci"],
                    threshold=policy.generation.max_stereotype_increase,
                    kind="max",
                    policy=policy,
                    scope=f"CrowS-Pairs: {row['bias_type']}",
                )
            )
    if membership is not None and "auc" in membership:
        if t.max_membership_auc is not None:
            checks.append(
                _judge(
                    "membership-inference AUC",
                    value=membership["auc"]["value"],
                    ci=membership["auc"]["ci"],
                    threshold=t.max_membership_auc,
                    kind="max",
                    policy=policy,
                    scope="training rows vs held-out rows",
                )
            )
        if t.fail_if_attack_beats_dp_bound and "beats_dp_bound" in membership:
            checks.append(_dp_bound_check(membership, canaries))
    failed = [c for c in checks if c["passed"] is False]
    # A check too weak to fail (its attack could not prove the claimed ε) is reported, never
    # counted as a pass, and does not make the verdict inconclusive either.
    uninformative = [c for c in checks if c.get("informative") is False and c["passed"] is None]
    unknown = [c for c in checks if c["passed"] is None and c not in uninformative]
    status = "fail" if failed else ("inconclusive" if unknown else "pass")
    if status == "pass" and len(checks) == len(uninformative):
        # Nothing was verified: that is not a pass (set require_fairness_check to fail it).
        status = "not_applicable"
        notes.append("the policy sets no threshold that applies to this run")
    for c in uninformative:
        notes.append(f"{c['check']}: not informative ({c['note']})")
    return {
        "status": status,
        "passed": status == "pass",
        "checks": checks,
        "failed": [f"{c['check']} ({c['scope']})" for c in failed],
        "not_evaluable": [f"{c['check']} ({c['scope']})" for c in unknown],
        "not_informative": [f"{c['check']} ({c['scope']})" for c in uninformative],
        "notes": notes,
    }


def _classifier_limits(t: Any) -> bool:
    return any(
        v is not None
        for v in (
            t.max_demographic_parity_difference,
            t.min_demographic_parity_ratio,
            t.max_equalized_odds_difference,
            t.min_class_recall,
            t.min_class_precision,
        )
    ) or bool(t.max_metric_gap or t.min_group_metric)


def _generation_checks(policy: AuditPolicy, slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A language model's per-group limits: the loss gap per slice, each group's perplexity."""
    g = policy.generation
    checks = []
    for sl in slices:
        if g.max_loss_gap is not None:
            entry = (sl["disparities"].get("largest_gap") or {}).get("loss") or {}
            checks.append(
                _judge(
                    "mean token loss gap",
                    value=entry.get("value"),
                    ci=entry.get("ci"),
                    threshold=g.max_loss_gap,
                    kind="max",
                    policy=policy,
                    scope=sl["name"],
                )
            )
        if g.max_perplexity is not None:
            shown = [x for x in sl["groups"] if not x["suppressed"]]
            for group in shown or [{"name": "(no reportable group)", "metrics": {}}]:
                entry = group["metrics"].get("perplexity") or {}
                checks.append(
                    _judge(
                        "perplexity",
                        value=entry.get("value"),
                        ci=entry.get("ci"),
                        threshold=g.max_perplexity,
                        kind="max",
                        policy=policy,
                        scope=f"{sl['name']} = {group['name']}",
                    )
                )
    return checks


def _residual_pii_check(
    policy: AuditPolicy, anonymization: dict[str, Any] | None
) -> dict[str, Any]:
    """The share of rows in which a second scan of the scrubbed text still finds personal data;
    a run that did not scrub fails (nothing measured the rate), and so does one whose detector
    could not see an entity it was asked to scrub (NER model missing)."""
    limit = policy.thresholds.max_residual_pii_rate
    assert limit is not None
    if anonymization is None:
        return {
            "check": "residual personal data",
            "scope": "training text",
            "value": None,
            "ci": None,
            "judged_on": "run.json",
            "judged_value": None,
            "threshold": limit,
            "rule": f"≤ {limit:.2%} of rows after data.anonymize",
            "passed": False,
            "margin": None,
            "note": "data.anonymize was not enabled, so the training text was neither scrubbed nor "
            "scanned; enable it in the recipe",
        }
    check = _judge(
        "residual personal data",
        value=anonymization["residual_rate"],
        ci=None,
        threshold=limit,
        kind="max",
        policy=policy,
        scope="training text (every split) after data.anonymize",
    )
    blind = anonymization.get("not_detected") or []
    if blind:
        check.update(
            passed=False,
            note=f"{', '.join(blind)} could not be detected (no NER model), so the rate is not "
            "measured for them",
        )
    return check


def _exposure_checks(policy: AuditPolicy, exposure: dict[str, Any]) -> list[dict[str, Any]]:
    """Secret-Sharer canaries: the highest exposure per repetition count, against the policy's
    ceiling and against what the run's DP guarantee allows."""
    checks = []
    for level in exposure["levels"]:
        scope = f"canaries repeated {level['repetitions']}x"
        if policy.generation.max_canary_exposure is not None:
            checks.append(
                _judge(
                    "canary exposure (bits)",
                    value=level["max_exposure"],
                    ci=None,
                    threshold=policy.generation.max_canary_exposure,
                    kind="max",
                    policy=policy,
                    scope=scope,
                )
            )
        if policy.thresholds.fail_if_attack_beats_dp_bound and level.get("dp_bound") is not None:
            check = _judge(
                "canary exposure within the DP bound",
                value=level["max_exposure"],
                ci=None,
                threshold=level["dp_bound"],
                kind="max",
                policy=policy,
                scope=scope,
            )
            check["rule"] = (
                f"≤ {level['dp_bound']:.1f} bits (what (ε, δ)-DP allows for {level['repetitions']} copies)"
            )
            checks.append(check)
    return checks


def _dp_bound_check(membership: dict[str, Any], canaries: dict[str, Any] | None) -> dict[str, Any]:
    """Did the attacks prove more privacy loss than the claimed ε, and could they have?

    An attack can refute a claimed ε only if it could prove an ε above it with these sample
    sizes (its power: what a perfect attack would prove). When neither the loss attack nor the
    canaries have that power, staying under the bound says nothing: the check is labelled
    "not informative" instead of "pass". A bound actually beaten fails whatever the power.
    """
    claimed = membership["dp_epsilon"]
    attacks = [("loss attack", membership)] + ([("canaries", canaries)] if canaries else [])
    beaten = membership["beats_dp_bound"] or bool(canaries and canaries.get("exceeds_dp_epsilon"))
    power = {name: float(a.get("max_provable_epsilon") or 0.0) for name, a in attacks}
    lower = max(float(a.get("epsilon_lower_bound") or 0.0) for _, a in attacks)
    informative = beaten or max(power.values()) > claimed
    power_text = ", ".join(
        f"{name} could prove at most ε ≥ {value:.3g}" for name, value in power.items()
    )
    check: dict[str, Any] = {
        "check": "attack within the DP bound",
        "scope": "membership inference" + (" and canaries" if canaries else ""),
        "value": lower,
        "ci": None,
        "judged_on": "estimate",
        "judged_value": lower,
        "threshold": claimed,
        "rule": f"empirical ε lower bound ≤ ε = {claimed:.3g} and TPR ≤ e^ε·FPR + δ",
        "power": power,
        "informative": informative,
        "note": f"{power_text} with these sample sizes; claimed ε = {claimed:.3g}",
        "margin": claimed - lower,
    }
    check["passed"] = (not beaten) if informative else None
    return check


def _stereotypes(run_dir: Path, policy: AuditPolicy) -> dict[str, Any] | None:
    """CrowS-Pairs preference of the base and fine-tuned language models, and the change."""
    from hubtune.audit.stereotypes import summarise_stereotypes

    measured = read_json(run_dir / STEREOTYPES_FILE)
    if measured is None:
        return None
    return summarise_stereotypes(
        measured, n_boot=policy.n_boot, seed=policy.seed, ci_level=policy.ci_level
    )


def _extraction(run_dir: Path, policy: AuditPolicy) -> dict[str, Any] | None:
    """A language model's extraction test on training vs held-out examples (membership scores)."""
    from hubtune.audit.generation import extraction_rates

    path = run_dir / MEMBERSHIP_FILE
    if not path.exists():
        return None
    return extraction_rates(pd.read_parquet(path), ci_level=policy.ci_level)


def _membership(
    run_dir: Path, policy: AuditPolicy, privacy: dict[str, Any], num_labels: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if not policy.membership.enabled:
        return {"skipped": "disabled by the policy"}, None
    path = run_dir / MEMBERSHIP_FILE
    if not path.exists():
        return {
            "skipped": f"{MEMBERSHIP_FILE} is missing (the run was trained with audit.enabled: false, or by a hubtune older than 0.2)"
        }, None
    scores = pd.read_parquet(path)
    real = scores[scores["split"] != "canaries"]
    epsilon = privacy.get("epsilon") if privacy["dp"] else None
    delta = privacy.get("delta") if privacy["dp"] else None
    membership = loss_threshold_attack(
        real.loc[real["member"], "loss"].to_numpy(),
        real.loc[~real["member"], "loss"].to_numpy(),
        fpr_levels=policy.membership.fpr_levels,
        epsilon=epsilon,
        delta=delta,
        n_boot=policy.n_boot,
        ci_level=policy.ci_level,
        seed=policy.seed,
    )
    canaries = None
    marked = scores[scores["split"] == "canaries"]
    if len(marked):
        canaries = canary_audit(
            marked["loss"].to_numpy(),
            marked["member"].to_numpy(dtype=bool),
            marked["predicts_label"].to_numpy(dtype=bool),
            num_labels=num_labels,
            delta=delta if delta is not None else 1e-5,
            epsilon=epsilon,
            confidence=policy.ci_level,
        )
    return membership, canaries


def _exposure(run_dir: Path, privacy: dict[str, Any]) -> dict[str, Any] | None:
    """The Secret-Sharer canaries' exposure per repetition count, beside what DP allows."""
    from hubtune.audit.exposure import summarise_exposure

    measured = read_json(run_dir / EXPOSURE_FILE)
    if measured is None:
        return None
    dp = bool(privacy.get("dp")) and not privacy.get("guarantee_void")
    return summarise_exposure(
        measured["per_canary"],
        digits=int(measured["digits"]),
        shape=str(measured.get("shape") or "digits"),
        epsilon=privacy.get("epsilon") if dp else None,
        delta=privacy.get("delta") if dp else None,
    )


def run_audit(
    run_dir: str | Path,
    *,
    policy: str | Path | None = None,
    compare: str | Path | None = None,
) -> dict[str, Any]:
    """Audit a finished run: fairness per group, membership inference, canaries, verdict.

    Long on purpose: the audit stage from its inputs (run.json, predictions, ledger, scores) to its atomic outputs, in the order a reviewer reads them.

    Args:
        run_dir: A complete run directory (it has run.json).
        policy: Policy name or path; default: the recipe's ``audit.policy``.
        compare: Another run of the same data and split (e.g. the non-private twin) whose
            per-group metrics are compared with this run's.

    Returns:
        The audit (also written to ``RUN_DIR/audit/audit.json``).
    """
    from hubtune.audit.report import render_reports

    run_dir = Path(run_dir)
    run_json = run_dir / RUN_FILE
    if not run_json.exists():
        raise AuditError(
            f"{run_dir} is not a complete run (no run.json); finish or resume the run first"
        )
    run_info = json.loads(run_json.read_text())
    recipe = (
        yaml.safe_load((run_dir / RECIPE_FILE).read_text())
        if (run_dir / RECIPE_FILE).exists()
        else {}
    )
    audit_section = (recipe or {}).get("audit") or {}
    chosen = policy or audit_section.get("policy") or "default"
    loaded, digest = load_policy(chosen)
    written = _read_predictions(run_dir, run_info["data"]["label_names"])
    predictions, label_names = written.frame, written.label_names
    sensitive = loaded.sensitive if loaded.sensitive is not None else written.sensitive_columns
    t0 = time.perf_counter()
    group_settings: dict[str, Any] = {
        "label_names": label_names,
        "sensitive": sensitive,
        "metrics": list(loaded.metrics),
        "positive_label": loaded.positive_label,
        "intersections": loaded.intersections,
        "n_boot": loaded.n_boot,
        "ci_level": loaded.ci_level,
        "seed": loaded.seed,
        "min_group_size": loaded.min_group_size,
        "missing_label": loaded.missing_label,
    }
    if written.kind == "generation":
        from hubtune.audit.generation import audit_generation_groups

        fairness = audit_generation_groups(
            predictions,
            sensitive=sensitive,
            intersections=loaded.intersections,
            n_boot=loaded.n_boot,
            ci_level=loaded.ci_level,
            seed=loaded.seed,
            min_group_size=loaded.min_group_size,
            missing_label=loaded.missing_label,
        )
    else:
        fairness = audit_fairness(predictions, **group_settings)
    privacy = _privacy_section(run_dir)
    membership, canaries = _membership(run_dir, loaded, privacy, len(label_names))
    exposure = _exposure(run_dir, privacy)
    extraction = _extraction(run_dir, loaded) if written.kind == "generation" else None
    stereotypes = _stereotypes(run_dir, loaded)
    comparison = None
    if compare is not None:
        other_dir = Path(compare)
        other = _read_predictions(other_dir).frame
        comparison = {
            # A run name, not a local path: audit.json is published with the model.
            "other_run": other_dir.name,
            "other_privacy": _privacy_section(other_dir),
            **compare_fairness(predictions, other, **group_settings),
        }
    anonymization = (run_info.get("data") or {}).get("anonymization")
    verdict = _verdict(
        loaded,
        fairness,
        membership if membership and "auc" in membership else None,
        canaries,
        privacy,
        exposure,
        stereotypes,
        anonymization,
    )
    audit: dict[str, Any] = {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hubtune_version": __version__,
        "run": {
            "name": run_info.get("name"),
            "description": (recipe or {}).get("description"),
            "base_model": (run_info.get("base_model") or {}).get("spec"),
            "base_model_sha": (run_info.get("base_model") or {}).get("sha"),
            "method": (run_info.get("method") or {}).get("method"),
            "test_rows": len(predictions),
            "test_accuracy": (run_info.get("test") or {}).get("accuracy"),
            "classical_baseline": baselines.summary(
                run_info.get("classical_baseline"), (run_info.get("test") or {}).get("accuracy")
            ),
            "scratch_baseline": baselines.summary(
                run_info.get("scratch_baseline"), (run_info.get("test") or {}).get("accuracy")
            ),
        },
        "policy": {"source": str(chosen), "digest": digest, **loaded.model_dump(mode="json")},
        "verdict": verdict,
        "privacy": privacy,
        "fairness": fairness,
        "membership": membership,
        "canaries": canaries,
        "exposure": exposure,
        "extraction": extraction,
        "stereotypes": stereotypes,
        "anonymization": anonymization,
        "comparison": comparison,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    audit = _finite(audit)
    with atomic_dir(run_dir / AUDIT_DIR) as tmp:
        atomic_write_json(tmp / AUDIT_JSON, audit)
        html, markdown = render_reports(audit, charts_dir=tmp / "charts")
        atomic_write_text(tmp / "report.md", markdown)
        atomic_write_text(tmp / "report.html", html)
    run_info["audit"] = {
        "status": verdict["status"],
        "passed": verdict["passed"],
        "policy": loaded.name,
        "failed": verdict["failed"],
        "report": "audit/report.html",
        "created": audit["created"],
    }
    atomic_write_json(run_json, run_info)
    return audit


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: undefined numbers become null (and inf the string "inf")."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def audit_gate(run_dir: str | Path, *, allow_failing: bool = False) -> dict[str, Any]:
    """Whether a run may be pushed: its audit passed, or the failure is explicitly overridden.

    Returns:
        ``{"allowed": bool, "status": ..., "overridden": bool, "reason": str}``; an override
        is recorded in run.json (``audit.override``) so the card can state it.
    """
    run_dir = Path(run_dir)
    run_info = json.loads((run_dir / RUN_FILE).read_text())
    audit = run_info.get("audit")
    if audit is None:
        status, reason = "missing", "the run has no audit; run `hubtune audit RUN_DIR` first"
    else:
        status = audit["status"]
        reason = (
            "audit passed"
            if audit["passed"]
            else f"audit {status}: " + "; ".join(audit["failed"] or ["see audit/report.html"])
        )
    if status in PUBLISHABLE:
        if status == "not_applicable":
            reason = "audit not applicable: no check of the policy applies to this run"
        return {"allowed": True, "status": status, "overridden": False, "reason": reason}
    if not allow_failing:
        return {"allowed": False, "status": status, "overridden": False, "reason": reason}
    run_info.setdefault("audit", {"status": status, "passed": False})["override"] = {
        "allowed_failing_audit": True,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason,
    }
    atomic_write_json(run_dir / RUN_FILE, run_info)
    return {"allowed": True, "status": status, "overridden": True, "reason": reason}
