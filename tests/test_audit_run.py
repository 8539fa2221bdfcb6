"""The audit as users meet it: after `hubtune run`, alone, as a gate, and in its reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hubtune.audit import audit_gate, run_audit
from hubtune.cli import app
from hubtune.pipeline import run_recipe
from hubtune.recipe import Recipe, RecipeError, load_recipe

from .conftest import make_fake_run, make_sentiment_frame, recipe_dict, synthetic_predictions


@pytest.fixture()
def reviews_900(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_sentiment_frame(900).to_csv(path, index=False)
    return path


def _policy(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}")
    return path


def test_run_writes_audit_canaries_and_scores(
    tiny_bert: Path, reviews_900: Path, tmp_path: Path
) -> None:
    """A run audits itself: reports, scores for every split and the canaries, verdict in run.json."""
    spec = recipe_dict(tiny_bert, reviews_900, tmp_path / "runs")
    spec["train"].update(epochs=3, lr=0.01)
    spec["audit"] = {"canaries": 12}
    result = run_recipe(Recipe.model_validate(spec))
    run_dir = result.run_dir
    for name in ("audit.json", "report.html", "report.md", "charts/groups_0.png"):
        assert (run_dir / "audit" / name).stat().st_size > 0, name
    scores = pd.read_parquet(run_dir / "membership_scores.parquet")
    counts = scores["split"].value_counts().to_dict()
    assert counts["canaries"] == 12
    assert counts["validation"] == 90 and counts["test"] == 180
    real_train = scores[scores["split"] == "train"]
    assert real_train["member"].all() and not real_train["row_id"].str.startswith("canary:").any()
    assert not scores.loc[scores["split"].isin(["validation", "test"]), "member"].any()
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["data"]["canaries"]["count"] == 12
    # The included canaries really were in the training split.
    included = int(scores.loc[scores["split"] == "canaries", "member"].sum())
    assert run_info["data"]["canaries"]["in_training"] == included
    assert run_info["data"]["rows_kept"]["train"] == 630 + included
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert audit["schema_version"] == 1
    assert (
        run_info["audit"]["status"]
        == audit["verdict"]["status"]
        == result.audit["verdict"]["status"]
    )
    assert audit["canaries"]["canaries"] == 12 and audit["canaries"]["included"] == included
    assert audit["membership"]["members"] == len(real_train)
    assert audit["membership"]["nonmembers"] == 270


def test_group_metrics_match_fairlearn_recomputed_from_predictions(
    tiny_bert: Path, reviews_900: Path, tmp_path: Path
) -> None:
    """What a reviewer would do: recompute from predictions.parquet with Fairlearn and compare."""
    from fairlearn.metrics import (
        MetricFrame,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    spec = recipe_dict(tiny_bert, reviews_900, tmp_path / "runs")
    spec["audit"] = {"policy": str(_policy(tmp_path, "small", "min_group_size: 5\nn_boot: 50\n"))}
    run_dir = run_recipe(Recipe.model_validate(spec)).run_dir
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    y = (predictions["label"] == "pos").astype(int)
    p = (predictions["prediction"] == "pos").astype(int)
    frame = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
        },
        y_true=y,
        y_pred=p,
        sensitive_features=predictions["group"],
    )
    (group_slice,) = audit["fairness"]["slices"]
    assert {g["name"] for g in group_slice["groups"]} == {"a", "b", "c"}
    for group in group_slice["groups"]:
        for metric in ("accuracy", "selection_rate", "tpr", "fpr"):
            assert group["metrics"][metric]["value"] == pytest.approx(
                frame.by_group.loc[group["name"], metric], abs=1e-12
            )
        assert group["count"] == int((predictions["group"] == group["name"]).sum())
    assert group_slice["disparities"]["equalized_odds_difference"]["value"] == pytest.approx(
        equalized_odds_difference(y, p, sensitive_features=predictions["group"]), abs=1e-12
    )


def test_thresholds_pass_fail_and_inconclusive(tmp_path: Path) -> None:
    predictions = synthetic_predictions(
        {"a": 400, "b": 400}, {"a": 0.9, "b": 0.6}
    )  # a real accuracy gap of about 0.3
    run_dir = make_fake_run(
        tmp_path / "runs" / "gap", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    lenient = _policy(
        tmp_path, "lenient", "n_boot: 200\nthresholds: {max_metric_gap: {accuracy: 0.5}}\n"
    )
    audit = run_audit(run_dir, policy=lenient)
    (check,) = audit["verdict"]["checks"]
    assert audit["verdict"]["status"] == "pass" and check["passed"] is True
    assert check["margin"] == pytest.approx(0.5 - check["value"])

    strict = _policy(
        tmp_path, "tight", "n_boot: 200\nthresholds: {max_metric_gap: {accuracy: 0.1}}\n"
    )
    audit = run_audit(run_dir, policy=strict)
    assert audit["verdict"]["status"] == "fail"
    assert audit["verdict"]["failed"] == ["accuracy gap (group)"]
    assert audit["verdict"]["checks"][0]["margin"] < -0.1
    assert json.loads((run_dir / "run.json").read_text())["audit"]["passed"] is False

    # Judged on the upper confidence bound, a gap whose estimate passes can still fail.
    value = audit["verdict"]["checks"][0]["value"]
    ci_upper = audit["verdict"]["checks"][0]["ci"][1]
    between = (value + ci_upper) / 2
    on_bound = _policy(
        tmp_path,
        "bound",
        f"n_boot: 200\njudge_on: ci_bound\nthresholds: {{max_metric_gap: {{accuracy: {between}}}}}\n",
    )
    audit = run_audit(run_dir, policy=on_bound)
    assert audit["verdict"]["status"] == "fail"
    assert audit["verdict"]["checks"][0]["judged_value"] == pytest.approx(ci_upper)

    # Every group too small to show: nothing can be judged, and that is not a pass.
    hidden = _policy(
        tmp_path,
        "hidden",
        "min_group_size: 1000\nthresholds: {max_equalized_odds_difference: 0.1}\n",
    )
    audit = run_audit(run_dir, policy=hidden)
    assert audit["verdict"]["status"] == "inconclusive"
    assert audit["verdict"]["not_evaluable"] == ["equalized odds difference (group)"]

    # A per-group floor with every group hidden is not evaluable either (never a silent pass),
    # also when the slice exists but all its groups are suppressed.
    for size in (1000, 500):
        floor = _policy(
            tmp_path,
            f"floor{size}",
            f"min_group_size: {size}\nthresholds: {{min_group_metric: {{accuracy: 0.5}}}}\n",
        )
        audit = run_audit(run_dir, policy=floor)
        assert audit["verdict"]["status"] == "inconclusive", size
        assert audit["verdict"]["not_evaluable"] == ["accuracy (group = (no reportable group))"]


def test_gate_blocks_a_failing_audit_unless_overridden_and_records_it(tmp_path: Path) -> None:
    predictions = synthetic_predictions({"a": 300, "b": 300}, {"a": 0.95, "b": 0.55})
    run_dir = make_fake_run(
        tmp_path / "runs" / "unfair", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    assert audit_gate(run_dir)["allowed"] is False  # no audit yet
    run_audit(run_dir, policy="default")
    gate = audit_gate(run_dir)
    assert gate == {
        "allowed": False,
        "status": "fail",
        "overridden": False,
        "reason": "audit fail: equalized odds difference (group)",
    }
    gate = audit_gate(run_dir, allow_failing=True)
    assert gate["allowed"] is True and gate["overridden"] is True
    override = json.loads((run_dir / "run.json").read_text())["audit"]["override"]
    assert override["allowed_failing_audit"] is True and "equalized odds" in override["reason"]

    fair = make_fake_run(
        tmp_path / "runs" / "fair",
        synthetic_predictions({"a": 300, "b": 300}, {"a": 0.8, "b": 0.8}, seed=3),
        label_names=["neg", "pos"],
        sensitive=["group"],
    )
    lenient = _policy(tmp_path, "eo", "thresholds: {max_equalized_odds_difference: 0.25}\n")
    run_audit(fair, policy=lenient)
    assert audit_gate(fair)["allowed"] is True


def test_tiny_group_is_suppressed_in_every_output(tmp_path: Path) -> None:
    predictions = synthetic_predictions(
        {"large": 300, "medium": 120, "tiny": 7}, {"large": 0.8, "medium": 0.7, "tiny": 0.0}
    )
    run_dir = make_fake_run(
        tmp_path / "runs" / "tiny-group",
        predictions,
        label_names=["neg", "pos"],
        sensitive=["group"],
    )
    audit = run_audit(run_dir, policy="default")
    groups = {g["name"]: g for g in audit["fairness"]["slices"][0]["groups"]}
    assert groups["tiny"]["suppressed"] and groups["tiny"]["suppression"] == "small"
    assert groups["tiny"]["count"] is None and groups["tiny"]["metrics"] is None
    # One hidden group could be recovered as overall minus the others: a second one is hidden.
    assert groups["medium"]["suppressed"] and groups["medium"]["suppression"] == "complementary"
    assert not groups["large"]["suppressed"] and groups["large"]["count"] == 300
    md = (run_dir / "audit" / "report.md").read_text()
    html = (run_dir / "audit" / "report.html").read_text()
    for text in (md, html):
        assert "suppressed: fewer than 30 test rows" in text
        assert "hidden so that a smaller group cannot be derived by subtraction" in text
    # The hidden rows carry no numbers but the policy's minimum, in any output.
    assert re.search(r"\| tiny \| _suppressed: fewer than 30 test rows_ \|( \|)+\n", md)
    row = re.search(
        r'<tr class="suppressed"><td>tiny</td><td colspan="\d+">([^<]*)</td></tr>', html
    )
    assert row and row.group(1) == "suppressed: fewer than 30 test rows"
    raw = (run_dir / "audit" / "audit.json").read_text()
    assert '"count": 7' not in raw and '"count": 120' not in raw


def test_cli_audit_exit_codes_and_summary(tmp_path: Path) -> None:
    predictions = synthetic_predictions({"a": 300, "b": 300}, {"a": 0.95, "b": 0.55})
    run_dir = make_fake_run(
        tmp_path / "runs" / "cli", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    runner = CliRunner()
    failing = runner.invoke(app, ["audit", str(run_dir)])
    assert failing.exit_code == 3, failing.output
    assert "verdict:   FAIL (policy default)" in failing.output
    assert "FAIL  equalized odds difference [group]" in failing.output
    lenient = _policy(tmp_path, "ok", "thresholds: {max_equalized_odds_difference: 0.9}\n")
    passing = runner.invoke(app, ["audit", str(run_dir), "--policy", str(lenient)])
    assert passing.exit_code == 0, passing.output
    missing = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a complete run" in missing.output
    unknown = runner.invoke(app, ["audit", str(run_dir), "--policy", "nonexistent"])
    assert unknown.exit_code == 2 and "shipped names ['default', 'qc', 'strict']" in unknown.output


def test_recipe_audit_section_is_validated(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path)
    spec["audit"] = {"policy": "nonexistent", "canaries": 2, "compare_nonprivate": True}
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "audit.policy" in message and "shipped names" in message
    assert "audit.canaries" in message and "at least 4" in message
    spec["audit"] = {"compare_nonprivate": True}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError, match="compare_nonprivate compares a private run"):
        load_recipe(path)


@pytest.mark.slow
def test_dp_run_audits_against_its_bound_and_its_nonprivate_twin(
    tiny_bert: Path, reviews_900: Path, tmp_path: Path
) -> None:
    """DP run: attack numbers beside the DP bound; the twin trains and each group's change is shown."""
    spec = recipe_dict(tiny_bert, reviews_900, tmp_path / "runs")
    spec["train"].update(epochs=2, lr=0.01)
    spec["privacy"] = {
        "enabled": True,
        "target_epsilon": 3.0,
        "logical_batch_size": 64,
        "physical_batch_size": 32,
    }
    spec["audit"] = {
        "compare_nonprivate": True,
        "policy": str(_policy(tmp_path, "small", "min_group_size: 5\nn_boot: 100\n")),
    }
    result = run_recipe(Recipe.model_validate(spec))
    audit = result.audit
    assert audit is not None
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert audit["privacy"]["epsilon"] == ledger["epsilon"] <= 3.0
    for level in audit["membership"]["at_fpr"]:
        expected = min(1.0, np.exp(ledger["epsilon"]) * level["fpr"] + ledger["delta"])
        assert level["dp_bound_tpr"] == pytest.approx(expected)
        assert level["beats_dp_bound"] is False
    twin = tmp_path / "runs" / "tiny-nonprivate"
    twin_run = json.loads((twin / "run.json").read_text())
    assert twin_run["privacy"] == {"enabled": False}
    # The same solver as the private run (epochs of SGD), not the L-BFGS fit of head_fit: auto.
    assert twin_run["method"]["head_fit"] == "sgd"
    twin_history = json.loads((twin / "metrics.json").read_text())["history"]
    assert len(twin_history) == 2 and "solver" not in twin_history[0]
    assert not (twin / "privacy.json").exists() and not (twin / "audit").exists()
    comparison = audit["comparison"]
    assert comparison["other_run"] == twin.name and comparison["other_privacy"]["dp"] is False
    twin_predictions = pd.read_parquet(twin / "predictions.parquet")
    group_a = next(g for g in comparison["slices"][0]["groups"] if g["name"] == "a")
    in_a = twin_predictions["group"] == "a"
    twin_accuracy = float(
        (twin_predictions["label"] == twin_predictions["prediction"])[in_a].mean()
    )
    assert group_a["metrics"]["accuracy"]["other"] == pytest.approx(twin_accuracy)
    html = (result.run_dir / "audit" / "report.html").read_text()
    assert "The cost of privacy per group" in html and "Largest TPR the DP guarantee allows" in html


def test_class_recall_and_precision_floors_for_quality_control(tmp_path: Path) -> None:
    """The qc policy fails a model that misses one class, judged on the pessimistic CI end."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 300)
    predicted = labels.copy()
    missed = rng.random(len(labels)) < np.where(labels == 2, 0.5, 0.05)  # class 2: recall ~0.5
    predicted[missed] = (labels[missed] + 1) % 3
    names = ["good", "scratch", "dent"]
    predictions = pd.DataFrame(
        {
            "row_id": [f"test:{i}" for i in range(len(labels))],
            "label": np.array(names)[labels],
            "prediction": np.array(names)[predicted],
            "label_id": labels,
            "prediction_id": predicted,
        }
    )
    run_dir = make_fake_run(tmp_path / "runs" / "qc", predictions, label_names=names, sensitive=[])
    audit = run_audit(run_dir, policy="qc")
    recall = {c["scope"]: c for c in audit["verdict"]["checks"] if c["check"] == "class recall"}
    assert set(recall) == {"class = good", "class = scratch", "class = dent"}
    dent = recall["class = dent"]
    assert dent["passed"] is False and dent["judged_value"] == pytest.approx(dent["ci"][0])
    truth = (labels == 2).sum()
    assert dent["value"] == pytest.approx(((predicted == 2) & (labels == 2)).sum() / truth)
    assert recall["class = good"]["passed"] is True
    assert audit["verdict"]["status"] == "fail"
    assert "class recall (class = dent)" in audit["verdict"]["failed"]
    # precision of "good" suffers from the dents predicted as good: (2 + 1) % 3 == 0
    precision = {
        c["scope"]: c for c in audit["verdict"]["checks"] if c["check"] == "class precision"
    }
    good_predicted = predicted == 0
    assert precision["class = good"]["value"] == pytest.approx(
        (good_predicted & (labels == 0)).sum() / good_predicted.sum()
    )


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_policy_limit_must_be_a_finite_number(tmp_path: Path, value: str) -> None:
    """`.inf` as a limit would make a check that can never fail: refused with its field path."""
    from hubtune.audit.policy import PolicyError, load_policy

    path = _policy(tmp_path, "bad", f"thresholds: {{max_equalized_odds_difference: {value}}}\n")
    with pytest.raises(PolicyError, match=r"thresholds\.max_equalized_odds_difference: .*finite"):
        load_policy(path)


def test_an_audit_that_checked_nothing_is_not_applicable_never_pass(tmp_path: Path) -> None:
    """No sensitive column declared: no fairness check applies, and the verdict says so."""
    from hubtune.audit.report import render_reports
    from hubtune.card import build_card
    from hubtune.space_template.app import verdict_markdown

    predictions = synthetic_predictions({"a": 300, "b": 300}, {"a": 0.95, "b": 0.55})
    run_dir = make_fake_run(
        tmp_path / "runs" / "blind", predictions, label_names=["neg", "pos"], sensitive=[]
    )
    audit = run_audit(run_dir, policy="default")
    verdict = audit["verdict"]
    assert verdict["status"] == "not_applicable" and verdict["passed"] is False
    assert verdict["checks"] == [] and verdict["failed"] == []
    assert "the policy sets no threshold that applies to this run" in verdict["notes"]
    # Publishable without an override (nothing failed), and every reader is told.
    gate = audit_gate(run_dir)
    assert gate["allowed"] is True and gate["overridden"] is False
    assert gate["reason"] == "audit not applicable: no check of the policy applies to this run"
    html, markdown = render_reports(audit, charts_dir=tmp_path / "charts")
    assert "## Verdict: NOT APPLICABLE" in markdown and "**nothing was verified**" in markdown
    assert (
        '<div class="big">NOT APPLICABLE</div>' in html
        and "PASS" not in html.split("</section>")[0]
    )
    card = str(build_card(run_dir))
    assert "**The audit checked nothing.**" in card and "did not pass" not in card
    assert verdict_markdown(audit).startswith("### ℹ️ Fairness audit: NOT APPLICABLE")
    result = CliRunner().invoke(app, ["audit", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "verdict:   NOT APPLICABLE (policy default)" in result.output

    # A policy can require a fairness check: then the same run fails, and push is refused.
    strict = _policy(tmp_path, "needs", "thresholds: {require_fairness_check: true}\n")
    audit = run_audit(run_dir, policy=strict)
    assert audit["verdict"]["status"] == "fail"
    assert audit["verdict"]["failed"] == ["fairness check required (policy)"]
    assert audit_gate(run_dir)["allowed"] is False
    assert CliRunner().invoke(app, ["audit", str(run_dir), "--policy", str(strict)]).exit_code == 3
    # With a sensitive column and a limit, the requirement is met and the check is judged.
    fair = make_fake_run(
        tmp_path / "runs" / "seen", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    both = _policy(
        tmp_path,
        "both",
        "thresholds: {require_fairness_check: true, max_metric_gap: {accuracy: 0.9}}\n",
    )
    assert run_audit(fair, policy=both)["verdict"]["status"] == "pass"


def test_a_comparison_on_too_few_rows_shows_no_group_and_says_why(tmp_path: Path) -> None:
    """A twin comparison on fewer test rows than the policy's group minimum publishes no group
    (each would describe fewer people than the minimum), and both reports say why."""
    from hubtune.audit.report import render_reports

    predictions = synthetic_predictions({"a": 10, "b": 10}, {"a": 0.9, "b": 0.6})
    this = make_fake_run(
        tmp_path / "runs" / "this", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    twin = make_fake_run(
        tmp_path / "runs" / "twin", predictions, label_names=["neg", "pos"], sensitive=["group"]
    )
    audit = run_audit(this, policy="default", compare=twin)
    comparison = audit["comparison"]
    assert comparison["slices"] == [] and comparison["rows"] == 20
    note = "the test split has 20 rows, fewer than min_group_size=30: no group-level comparison"
    assert comparison["note"] == note
    html, markdown = render_reports(audit, charts_dir=tmp_path / "charts")
    assert f"No per-group comparison: {note}." in markdown
    assert f"<p>No per-group comparison: {note}.</p>" in html
