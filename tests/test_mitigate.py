"""hubtune mitigate: per-group thresholds fitted on validation, applied to test, re-audited.

The runs here are written directly (no training): scores whose false-positive rate differs by
group, so the default policy's equalized-odds check fails before and the post-processing has
something to fix. The end-to-end path (a trained run's validation predictions) is covered in
test_train.py and by the quickstart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hubtune.cli import app
from hubtune.mitigate import MitigationError, apply_rule, mitigate
from hubtune.rundir import (
    POSTPROCESS_FILE,
    VALIDATION_PREDICTIONS_FILE,
    Predictions,
    write_predictions,
)

from .conftest import make_fake_run

LABELS = ["neg", "pos"]


def _scored(n_per_group: int, seed: int) -> pd.DataFrame:
    """Binary rows whose scores are shifted up for negatives of group "a" (more false positives)."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, shift in (("a", 0.25), ("b", 0.0)):
        labels = rng.integers(0, 2, n_per_group)
        score = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.15, n_per_group), 0.001, 0.999)
        score = np.where(labels == 0, np.clip(score + shift, 0.001, 0.999), score)
        for y, s in zip(labels, score, strict=True):
            rows.append({"label_id": int(y), "prob_pos": float(s), "group": group})
    frame = pd.DataFrame(rows)
    frame["prob_neg"] = 1.0 - frame["prob_pos"]
    frame["prediction_id"] = (frame["prob_pos"] > 0.5).astype("int64")
    frame["label"] = np.array(LABELS, dtype=object)[frame["label_id"]]
    frame["prediction"] = np.array(LABELS, dtype=object)[frame["prediction_id"]]
    return frame


def _biased_run(root: Path, *, validation: bool = True) -> Path:
    run_dir = make_fake_run(
        root / "biased", _scored(400, seed=1), label_names=LABELS, sensitive=["group"]
    )
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.0}}))
    if validation:
        frame = _scored(300, seed=2)
        frame.insert(0, "row_id", [f"validation:{i}" for i in range(len(frame))])
        write_predictions(
            run_dir,
            Predictions(frame, label_names=LABELS, sensitive_columns=["group"]),
            name=VALIDATION_PREDICTIONS_FILE,
        )
    return run_dir


def _eo_difference(frame: pd.DataFrame) -> float:
    from fairlearn.metrics import equalized_odds_difference

    return float(
        equalized_odds_difference(
            frame["label_id"], frame["prediction_id"], sensitive_features=frame["group"]
        )
    )


def test_thresholds_fix_the_failed_audit_and_record_what_they_cost(tmp_path: Path) -> None:
    from hubtune.audit import run_audit

    run_dir = _biased_run(tmp_path)
    before = run_audit(run_dir)
    assert before["verdict"]["status"] == "fail"
    original = pd.read_parquet(run_dir / "predictions.parquet")
    assert _eo_difference(original) > 0.2

    result = mitigate(run_dir)
    out = Path(result["run_dir"])
    assert out == tmp_path / "biased-threshold"
    assert result["audit"]["verdict"]["status"] == "pass", result["audit"]["verdict"]
    after = pd.read_parquet(out / "predictions.parquet")
    assert after["row_id"].tolist() == original["row_id"].tolist()
    assert after["label_id"].tolist() == original["label_id"].tolist()
    assert _eo_difference(after) < 0.1

    # The recorded costs are the accuracies of the written predictions, per group and overall.
    record = json.loads((out / "run.json").read_text())["postprocessing"]
    assert record["constraint"] == "equalized_odds"  # the default policy bounds equalized odds
    assert record["fitted_on"] == {
        "split": "validation",
        "rows": 600,
        "rows_per_group": {"a": 300, "b": 300},
    }
    for group, row in record["test"]["accuracy_by_group"].items():
        o, a = original[original["group"] == group], after[after["group"] == group]
        assert row["rows"] == len(o) == 400
        assert row["before"] == pytest.approx((o["label_id"] == o["prediction_id"]).mean())
        assert row["after"] == pytest.approx((a["label_id"] == a["prediction_id"]).mean())
    assert record["test"]["after"]["accuracy"] == pytest.approx(
        (after["label_id"] == after["prediction_id"]).mean()
    )
    assert record["requires_sensitive_at_prediction"] is True
    # Fitted exactly on validation (expected rates equal); on test, the gap the audit measures
    # up to the randomised draw.
    assert record["expected_gap"]["validation"] < 1e-9
    assert abs(record["expected_gap"]["test"] - _eo_difference(after)) < 0.08
    # The weights are the original's, byte for byte; the audit compares with the original run.
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights"
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["comparison"]["other_run"] == "biased"
    card = (out / "card" / "README.md").read_text()
    assert "Post-processed for fairness" in card and "## Post-processing" in card
    assert "| a | 400 |" in card
    # The original run is untouched.
    assert json.loads((run_dir / "run.json").read_text())["audit"]["status"] == "fail"


def test_the_written_rule_is_fairlearns_and_reproduces_the_predictions(tmp_path: Path) -> None:
    from fairlearn.postprocessing import ThresholdOptimizer

    from hubtune.mitigate import _Scores

    run_dir = _biased_run(tmp_path)
    out = Path(mitigate(run_dir)["run_dir"])
    written = json.loads((out / POSTPROCESS_FILE).read_text())
    validation = pd.read_parquet(run_dir / VALIDATION_PREDICTIONS_FILE)
    test = pd.read_parquet(run_dir / "predictions.parquet")
    reference = ThresholdOptimizer(
        estimator=_Scores(),
        constraints="equalized_odds",
        prefit=True,
        predict_method="predict_proba",
    ).fit(
        validation[["prob_pos"]].to_numpy(),
        validation["label_id"].to_numpy(),
        sensitive_features=validation["group"].to_numpy(),
    )
    expected = reference._pmf_predict(
        test[["prob_pos"]].to_numpy(), sensitive_features=test["group"].to_numpy()
    )[:, 1]
    ours = apply_rule(
        written["rule"], scores=test["prob_pos"].to_numpy(), groups=test["group"].to_numpy()
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    after = pd.read_parquet(out / "predictions.parquet")
    np.testing.assert_allclose(after["prob_pos"].to_numpy(), ours, rtol=0, atol=1e-12)
    # A prediction is positive only where the rule gives it a chance.
    assert not ((after["prediction_id"] == 1) & (after["prob_pos"] == 0)).any()
    assert not ((after["prediction_id"] == 0) & (after["prob_pos"] == 1)).any()


def test_demographic_parity_on_request(tmp_path: Path) -> None:
    run_dir = _biased_run(tmp_path)
    result = mitigate(run_dir, constraint="demographic_parity", out=tmp_path / "dp")
    after = pd.read_parquet(tmp_path / "dp" / "predictions.parquet")
    rates = after.groupby("group")["prediction_id"].mean()
    original = pd.read_parquet(run_dir / "predictions.parquet").groupby("group")["prediction_id"]
    assert abs(rates["a"] - rates["b"]) < abs(original.mean()["a"] - original.mean()["b"]) / 2
    assert result["postprocessing"]["constraint"] == "demographic_parity"


def test_refusals_say_why(tmp_path: Path) -> None:
    no_validation = _biased_run(tmp_path / "old", validation=False)
    with pytest.raises(MitigationError, match="re-run the training"):
        mitigate(no_validation)
    run_dir = _biased_run(tmp_path)
    with pytest.raises(MitigationError, match="--constraint must be one of"):
        mitigate(run_dir, constraint="parity")
    with pytest.raises(MitigationError, match="unknown method"):
        mitigate(run_dir, method="reweigh")
    out = Path(mitigate(run_dir)["run_dir"])
    with pytest.raises(MitigationError, match="exists; pass --overwrite"):
        mitigate(run_dir)
    mitigate(run_dir, overwrite=True)
    with pytest.raises(MitigationError, match="already post-processed"):
        mitigate(out)
    # A test group that the validation split never saw has no threshold.
    frame = pd.read_parquet(run_dir / "predictions.parquet")
    frame.loc[:9, "group"] = "c"
    unseen = make_fake_run(tmp_path / "unseen", frame, label_names=LABELS, sensitive=["group"])
    (unseen / VALIDATION_PREDICTIONS_FILE).write_bytes(
        (run_dir / VALIDATION_PREDICTIONS_FILE).read_bytes()
    )
    with pytest.raises(MitigationError, match=r"group\(s\) \['c'\] with no validation rows"):
        mitigate(unseen)
    # Three classes: Fairlearn's post-processing is binary.
    three = _scored(50, seed=3)
    three["label_id"] = np.arange(len(three)) % 3
    multi = make_fake_run(
        tmp_path / "multi", three, label_names=["x", "y", "z"], sensitive=["group"]
    )
    with pytest.raises(MitigationError, match="two classes"):
        mitigate(multi)


def test_cli_exit_status_and_summary(tmp_path: Path) -> None:
    run_dir = _biased_run(tmp_path)
    result = CliRunner().invoke(app, ["mitigate", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "test accuracy:" in result.output and "PASS" in result.output
    assert "cannot be deployed" in result.output
    again = CliRunner().invoke(app, ["mitigate", str(run_dir)])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
