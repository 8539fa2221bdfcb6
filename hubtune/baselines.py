"""What a user would get without the pretrained model: the baselines every run is compared with.

- **majority**: always predict the training split's most common label;
- **classical**: a model without pretraining, fitted on the same training rows and tested on the
  same test rows as the run's model. Text: TF-IDF of word 1-2-grams and character 2-5-grams
  (within word boundaries), then logistic regression. Images: logistic regression on the pixels,
  downscaled to 16 x 16 RGB and standardised. The regularisation strength C is chosen on the
  run's validation split (the rows the run already holds out for its own choices), from
  :data:`C_GRID`; without a usable validation split C = 1 and the record says so.

:func:`compare` then tests the run's model against the classical baseline on the same test rows
(a paired bootstrap of the accuracy difference). When the model does not beat it beyond the
interval, the run is flagged: with a pretrained model that is worse than, or no better than, a
model without pretraining, transfer did not pay (negative transfer when it is worse).

A classical baseline is trained on the training rows without differential privacy: in a DP run
its accuracy is one more figure the (ε, δ) guarantee does not cover (the card says so).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hubtune.data import PreparedData

__all__ = [
    "C_GRID",
    "IMAGE_SIDE",
    "MAX_IMAGE_ROWS",
    "classical_image",
    "classical_text",
    "compare",
    "summary",
    "verdict_text",
]

C_GRID = (0.3, 1.0, 3.0, 10.0)
IMAGE_SIDE = 16  # pixels per side of the downscaled images
MAX_IMAGE_ROWS = 20_000  # training images the pixel baseline reads at most (a stratified sample)


def _fit_logistic(
    x_train: Any, y_train: np.ndarray, x_val: Any, y_val: np.ndarray
) -> tuple[Any, dict[str, Any]]:
    """Logistic regression with C chosen on the validation rows (C = 1 without them)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def fit(c: float) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=1000).fit(x_train, y_train)

    if len(np.unique(y_train)) < 2:  # hubtune refuses such data; stay defined all the same
        from sklearn.dummy import DummyClassifier

        return DummyClassifier().fit(x_train, y_train), {"C": None, "C_chosen_on": "one class"}
    if len(y_val) == 0:
        return fit(1.0), {"C": 1.0, "C_chosen_on": "none (no validation rows): C = 1"}
    scores = {}
    best = None
    for c in C_GRID:
        model = fit(c)
        scores[c] = float((model.predict(x_val) == y_val).mean())
        if best is None or scores[c] > scores[best[0]]:  # ties: the stronger regularisation
            best = (c, model)
    assert best is not None
    return best[1], {
        "C": best[0],
        "C_chosen_on": "validation split",
        "validation_accuracy": {str(c): s for c, s in scores.items()},
    }


def _labels(data: PreparedData, split: str) -> np.ndarray:
    return data.splits[split]["label"].to_numpy().astype(np.int64)


def classical_text(data: PreparedData, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """TF-IDF (word 1-2-grams + character 2-5-grams) + logistic regression.

    Returns:
        The predicted label id of each test row (in the test split's order), and the record.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    def texts(split: str) -> list[str]:
        frame = data.splits[split]
        if "text_pair" in frame:
            return (frame["text"].astype(str) + " \n " + frame["text_pair"].astype(str)).tolist()
        return frame["text"].astype(str).tolist()

    t0 = time.perf_counter()
    vectorizer = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32),
        TfidfVectorizer(
            analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, dtype=np.float32
        ),
    )
    train = texts("train")
    try:
        x_train = vectorizer.fit_transform(train)
    except ValueError:  # every n-gram occurs once (tiny data): keep them all
        for _, part in vectorizer.transformer_list:
            part.set_params(min_df=1)
        x_train = vectorizer.fit_transform(train)
    has_val = "validation" in data.splits and len(data.splits["validation"]) > 0
    model, chosen = _fit_logistic(
        x_train,
        _labels(data, "train"),
        vectorizer.transform(texts("validation")) if has_val else None,
        _labels(data, "validation") if has_val else np.zeros(0, np.int64),
    )
    predicted = model.predict(vectorizer.transform(texts("test"))).astype(np.int64)
    return predicted, {
        "name": "TF-IDF + logistic regression",
        "features": "word 1-2-grams + character 2-5-grams (TF-IDF, sublinear tf, min_df 2)",
        "train_rows": len(train),
        "feature_count": int(x_train.shape[1]),
        **chosen,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def classical_image(data: PreparedData, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Logistic regression on downscaled (16 x 16 RGB), standardised pixels."""
    from PIL import Image

    from hubtune.data import decode_image

    def pixels(frame: Any) -> np.ndarray:
        rows = [
            np.asarray(
                decode_image(b).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR),
                dtype=np.float32,
            ).reshape(-1)
            for b in frame["image"]
        ]
        return np.stack(rows) / 255.0 if rows else np.zeros((0, 3 * IMAGE_SIDE**2), np.float32)

    t0 = time.perf_counter()
    train = data.splits["train"]
    sampled = len(train) > MAX_IMAGE_ROWS
    if sampled:
        train = train.groupby("label", group_keys=False).sample(
            frac=MAX_IMAGE_ROWS / len(train), random_state=seed
        )
    x_train = pixels(train)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    val = data.splits.get("validation")
    if val is not None and len(val):
        x_val, y_val = (pixels(val) - mean) / std, _labels(data, "validation")
    else:
        x_val, y_val = np.zeros((0, x_train.shape[1]), np.float32), np.zeros(0, np.int64)
    model, chosen = _fit_logistic(
        (x_train - mean) / std,
        train["label"].to_numpy().astype(np.int64),
        x_val,
        y_val,
    )
    predicted = model.predict((pixels(data.splits["test"]) - mean) / std).astype(np.int64)
    return predicted, {
        "name": "logistic regression on pixels",
        "features": f"{IMAGE_SIDE}x{IMAGE_SIDE} RGB pixels, standardised",
        "train_rows": len(train),
        "train_rows_note": f"a stratified sample of {MAX_IMAGE_ROWS} training images"
        if sampled
        else None,
        **chosen,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _interval(values: np.ndarray, level: float) -> list[float]:
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def compare(
    model_predicted: np.ndarray,
    baseline_predicted: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    n_boot: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """The baseline's accuracy and the model's accuracy minus it, with percentile intervals.

    The same bootstrap resamples of the test rows serve both (a paired comparison), so the
    difference's interval reflects how the two models differ on the same rows.

    Returns:
        ``accuracy`` and its ``ci``, ``macro_f1``, ``model_minus_baseline`` with ``ci``, and
        ``outcome``: "better" (the difference's interval lies above 0), "worse" (below 0) or
        "not distinguishable"; ``negative_transfer`` is true unless the outcome is "better".
    """
    from sklearn.metrics import f1_score

    right_model = (model_predicted == labels).astype(np.float64)
    right_base = (baseline_predicted == labels).astype(np.float64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((0, 0), np.int64)
    base_acc = right_base[rows].mean(axis=1) if n else np.zeros(0)
    diff = (right_model[rows] - right_base[rows]).mean(axis=1) if n else np.zeros(0)
    difference = float(right_model.mean() - right_base.mean()) if n else 0.0
    ci = _interval(diff, level) if n_boot and n else [difference, difference]
    outcome = "better" if ci[0] > 0 else ("worse" if ci[1] < 0 else "not distinguishable")
    return {
        "accuracy": float(right_base.mean()) if n else None,
        "ci": _interval(base_acc, level) if n_boot and n else None,
        "macro_f1": float(f1_score(labels, baseline_predicted, average="macro", zero_division=0))
        if n
        else None,
        "model_minus_baseline": {"value": difference, "ci": ci, "ci_level": level},
        "outcome": outcome,
        "negative_transfer": outcome != "better",
    }


def summary(
    classical: dict[str, Any] | None, model_accuracy: float | None
) -> dict[str, Any] | None:
    """What reports state of a run's classical baseline (None when the run has none)."""
    if not classical or classical.get("accuracy") is None or model_accuracy is None:
        return None
    keep = ("name", "accuracy", "ci", "model_minus_baseline", "outcome", "negative_transfer")
    return {
        **{k: classical.get(k) for k in keep},
        "text": verdict_text(float(model_accuracy), classical),
    }


def verdict_text(model_accuracy: float, classical: dict[str, Any]) -> str:
    """One line for the run summary and the card: the model against the classical baseline."""
    diff = classical["model_minus_baseline"]
    low, high = diff["ci"]
    head = (
        f"this model {model_accuracy:.3f}; {classical['name']} {classical['accuracy']:.3f} "
        f"(difference {diff['value']:+.3f} [{low:+.3f}, {high:+.3f}])"
    )
    if classical["outcome"] == "better":
        return f"{head}: the pretrained model beats a model without pretraining"
    if classical["outcome"] == "worse":
        return (
            f"{head}: the pretrained model is WORSE than a model without pretraining "
            "(negative transfer)"
        )
    return (
        f"{head}: the pretrained model is no better than a model without pretraining "
        "(within the interval)"
    )
