"""The run directory's typed records: what the card, push and Space read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubtune.rundir import (
    AUDIT_FILE,
    METRICS_FILE,
    Metrics,
    RunDirError,
    read_audit,
    read_metrics,
    write_metrics,
)


def _audit(run_dir: Path, payload: object) -> None:
    (run_dir / AUDIT_FILE).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / AUDIT_FILE).write_text(json.dumps(payload))


def test_metrics_round_trip_keeps_types_and_extra_keys(tmp_path: Path) -> None:
    metrics = Metrics.model_validate(
        {
            "test": {"accuracy": 0.75, "rows": 4},
            "majority_baseline": {"label": "neg", "accuracy": 0.5},
            "history": [{"epoch": 1, "train_loss": 0.69}],
            "note": "kept",
        }
    )
    write_metrics(tmp_path, metrics)
    back = read_metrics(tmp_path)
    assert back == metrics
    raw = json.loads((tmp_path / METRICS_FILE).read_text())
    assert raw["test"]["rows"] == 4 and isinstance(raw["test"]["rows"], int)
    assert raw["note"] == "kept"
    assert read_metrics(tmp_path / "missing") is None


def test_audit_record_reads_the_parts_the_card_shows(tmp_path: Path) -> None:
    _audit(
        tmp_path,
        {
            "verdict": {"status": "fail", "passed": False, "failed": ["tpr gap"], "checks": []},
            "policy": {"name": "default", "digest": "abc"},
            "fairness": {
                "metrics": ["accuracy"],
                "slices": [
                    {
                        "name": "group",
                        "reportable_groups": ["a", "b"],
                        "disparities": {
                            "demographic_parity_difference": {"value": 0.2, "ci": [0.1, 0.3]},
                            "equalized_odds_difference": None,
                            "largest_gap": {"accuracy": {"value": 0, "highest": "a"}},
                        },
                    }
                ],
            },
            "membership": {"auc": {"value": 0.5, "ci": [0.4, 0.6]}, "members": 10, "loss": 1},
            "canaries": {"canaries": 8, "dataset_size": 100},
        },
    )
    audit = read_audit(tmp_path)
    assert audit is not None and audit.verdict is not None
    assert audit.verdict.failed == ["tpr gap"] and audit.policy.digest == "abc"
    assert audit.fairness is not None
    disparities = audit.fairness.slices[0].disparities
    assert list(disparities.named()) == ["demographic_parity_difference"]
    gap = disparities.largest_gap["accuracy"]
    assert gap is not None and gap.value == 0 and isinstance(gap.value, int)  # printed as written
    assert audit.membership is not None and audit.membership.ran
    # The public copy drops what the guarantee does not cover (see hubtune.audit.public).
    public = read_audit(tmp_path, public=True)
    assert public is not None and public.membership is not None and public.canaries is not None
    assert public.membership.withheld and public.canaries.withheld
    assert "loss" not in (public.membership.model_extra or {})
    assert "dataset_size" not in (public.canaries.model_extra or {})
    assert public.publication["membership_details"] == "withheld"


def test_an_unreadable_audit_is_an_error_that_says_how_to_fix_it(tmp_path: Path) -> None:
    assert read_audit(tmp_path) is None  # not audited
    _audit(tmp_path, "")
    (tmp_path / AUDIT_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match=r"audit\.json: cannot be read .*hubtune audit"):
        read_audit(tmp_path)
    _audit(tmp_path, [1, 2])
    with pytest.raises(RunDirError, match="not a JSON object"):
        read_audit(tmp_path)


def test_the_space_reports_an_unreadable_audit_instead_of_calling_it_unaudited(
    tmp_path: Path,
) -> None:
    from hubtune.space import SpaceError, _audit_statement

    assert _audit_statement(tmp_path) == ("not audited", None)
    _audit(tmp_path, {"verdict": {"status": "pass", "failed": []}, "policy": {"name": "p"}})
    assert _audit_statement(tmp_path) == ("**PASS** under the `p` policy", "pass")
    (tmp_path / AUDIT_FILE).write_text("{broken")
    with pytest.raises(SpaceError, match="cannot be read"):
        _audit_statement(tmp_path)


def test_predictions_follow_the_schema_the_audit_reads(tmp_path: Path) -> None:
    import pandas as pd

    from hubtune.rundir import (
        PREDICTIONS_FILE,
        Predictions,
        read_predictions,
        write_parquet,
        write_predictions,
    )

    frame = pd.DataFrame(
        {
            "row_id": [0, 1],
            "label": ["neg", "pos"],
            "prediction": ["neg", "neg"],
            "label_id": [0, 1],
            "prediction_id": [0, 0],
            "prob_neg": [0.9, 0.6],
            "prob_pos": [0.1, 0.4],
            "group": ["a", "b"],
        }
    )
    written = Predictions(frame, label_names=["neg", "pos"], sensitive_columns=["group"])
    write_predictions(tmp_path, written)
    back = read_predictions(tmp_path)
    assert back is not None
    assert back.label_names == ["neg", "pos"] and back.sensitive_columns == ["group"]
    pd.testing.assert_frame_equal(back.frame, frame)

    with pytest.raises(ValueError, match=r"lacks the columns \['group'\]"):
        write_predictions(
            tmp_path, Predictions(frame.drop(columns="group"), ["neg", "pos"], ["group"])
        )
    # A file written without the schema (by hand, or by an older hubtune) is named, with the fix.
    write_parquet(tmp_path / PREDICTIONS_FILE, frame.drop(columns="prediction_id"), {})
    with pytest.raises(
        RunDirError, match=r"lacks the columns \['prediction_id'\].*re-run the training"
    ):
        read_predictions(tmp_path, label_names=["neg", "pos"])
    assert read_predictions(tmp_path / "none") is None
