"""The baselines every run is compared with: a model without pretraining on the same split."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hubtune.baselines import C_GRID, classical_image, classical_text, compare, verdict_text
from hubtune.data import PreparedData
from hubtune.pipeline import format_summary, run_recipe
from hubtune.recipe import Recipe

from .conftest import make_sentiment_frame, recipe_dict


def _prepared(splits: dict[str, pd.DataFrame], columns: list[str]) -> PreparedData:
    return PreparedData(
        splits=splits,
        label_names=["neg", "pos"],
        text_columns=columns,
        sensitive_columns=[],
        rows_read={k: len(v) for k, v in splits.items()},
    )


def _text_splits(n: int = 400) -> dict[str, pd.DataFrame]:
    frame = make_sentiment_frame(n, seed=1)
    frame["label"] = (frame["label"] == "pos").astype("int64")
    return {"train": frame[:240], "validation": frame[240:320], "test": frame[320:]}


def test_compare_is_a_paired_bootstrap_with_three_outcomes() -> None:
    labels = np.array([0, 1] * 200)
    truth_copy = labels.copy()
    half_wrong = np.where(np.arange(400) % 2 == 0, labels, 1 - labels)  # right on half the rows
    better = compare(truth_copy, half_wrong, labels, seed=0, n_boot=500)
    assert better["accuracy"] == 0.5 and better["model_minus_baseline"]["value"] == 0.5
    low, high = better["model_minus_baseline"]["ci"]
    assert 0.4 < low < 0.5 < high < 0.6
    assert better["outcome"] == "better" and better["negative_transfer"] is False
    worse = compare(half_wrong, truth_copy, labels, seed=0, n_boot=500)
    assert worse["outcome"] == "worse" and worse["negative_transfer"] is True
    assert worse["accuracy"] == 1.0 and worse["ci"] == [1.0, 1.0]
    same = compare(half_wrong, half_wrong, labels, seed=0, n_boot=500)
    assert same["model_minus_baseline"]["ci"] == [0.0, 0.0]
    assert same["outcome"] == "not distinguishable" and same["negative_transfer"] is True
    # Paired: the same resampled rows for both models (two models wrong on different rows).
    other_half = np.where(np.arange(400) % 2 == 1, labels, 1 - labels)
    paired = compare(half_wrong, other_half, labels, seed=0, n_boot=500)
    assert paired["outcome"] == "not distinguishable"
    assert verdict_text(0.5, {**worse, "name": "TF-IDF + logistic regression"}).endswith(
        "WORSE than a model without pretraining (negative transfer)"
    )


def test_classical_text_learns_and_chooses_c_on_the_validation_rows() -> None:
    predicted, record = classical_text(_prepared(_text_splits(), ["text"]), seed=0)
    test = _text_splits()["test"]
    assert predicted.shape == (len(test),)
    assert (predicted == test["label"].to_numpy()).mean() > 0.9  # the sentiment words decide
    assert record["name"] == "TF-IDF + logistic regression"
    assert record["C"] in C_GRID and record["C_chosen_on"] == "validation split"
    assert set(record["validation_accuracy"]) == {str(c) for c in C_GRID}
    assert record["train_rows"] == 240 and record["feature_count"] > 0
    # No validation rows: C = 1, and the record says so.
    splits = _text_splits()
    splits["validation"] = splits["validation"][:0]
    _, record = classical_text(_prepared(splits, ["text"]), seed=0)
    assert record["C"] == 1.0 and record["C_chosen_on"].startswith("none")


def test_classical_image_reads_downscaled_pixels() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(label: int) -> bytes:
        pixels = rng.integers(0, 80, size=(24, 24, 3), dtype=np.uint8)
        if label:
            pixels[:12, :12] = 255  # a bright patch marks the positive class
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    def split(n: int) -> pd.DataFrame:
        labels = [i % 2 for i in range(n)]
        return pd.DataFrame({"image": [image(y) for y in labels], "label": labels})

    data = _prepared({"train": split(60), "validation": split(20), "test": split(40)}, ["image"])
    predicted, record = classical_image(data, seed=0)
    assert (predicted == data.splits["test"]["label"].to_numpy()).mean() == 1.0
    assert record["features"] == "16x16 RGB pixels, standardised" and record["C"] in C_GRID


def test_every_run_reports_the_classical_baseline_unless_turned_off(
    tiny_bert: Path, tmp_path: Path
) -> None:
    data = tmp_path / "reviews.csv"
    make_sentiment_frame(300).to_csv(data, index=False)
    spec = recipe_dict(tiny_bert, data, tmp_path / "runs")
    spec["train"]["epochs"] = 1
    result = run_recipe(Recipe.model_validate(spec))
    classical = result.metrics["classical_baseline"]
    assert classical["name"] == "TF-IDF + logistic regression"
    assert classical["outcome"] in {"better", "worse", "not distinguishable"}
    assert classical["negative_transfer"] is (classical["outcome"] != "better")
    written = json.loads((result.run_dir / "metrics.json").read_text())["classical_baseline"]
    assert written == json.loads(json.dumps(classical))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["classical_baseline"]["accuracy"] == classical["accuracy"]
    assert run["timings"]["classical_baseline_s"] > 0
    summary = format_summary(result)
    assert f"classical: accuracy {classical['accuracy']:.4f}" in summary
    assert "transfer:  this model" in summary and "a model without pretraining" in summary
    # The audit report and the card state it too.
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert "**Transfer:** this model" in report
    from hubtune.card import build_card

    card = str(build_card(result.run_dir))
    assert "| Classical baseline accuracy (TF-IDF + logistic regression" in card
    assert "**Transfer:** this model" in card

    spec["name"], spec["train"]["baselines"] = "majority-only", ["majority"]
    result = run_recipe(Recipe.model_validate(spec))
    assert "classical_baseline" not in result.metrics
    assert "classical:" not in format_summary(result)
    assert "Classical baseline" not in str(build_card(result.run_dir))


def test_the_baselines_field_is_validated(tmp_path: Path) -> None:
    from hubtune.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\nmodel: {id: org/m}\ndata: {source: d.csv, labels: [a, b]}\n"
        "method: {name: freeze}\ntrain: {baselines: [tfidf]}\n"
    )
    with pytest.raises(RecipeError, match=r"train\.baselines\.0") as caught:
        load_recipe(path)
    assert "'majority' or 'classical'" in str(caught.value)
