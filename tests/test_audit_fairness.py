"""Fairness audit: exact group metrics, Fairlearn agreement, honest intervals, safe suppression."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from hubtune.audit import fairness
from hubtune.audit.fairness import (
    SliceSpec,
    _bootstrap,
    _interval,
    audit_fairness,
    class_rates,
    compare_fairness,
    group_metrics,
    suppress,
)

ALL_METRICS = ["accuracy", "selection_rate", "tpr", "fpr", "fnr", "precision", "f1", "count"]
BINARY = ["neg", "pos"]
EXACT = 1e-12


# --------------------------------------------------------------------------- helpers


def _binary_frame(counts: dict[str, tuple[int, int, int, int]], *, seed: int = 0) -> pd.DataFrame:
    """Rows with exact (TP, FN, FP, TN) per group (positive label id 1), in shuffled order."""
    rows = []
    for group, (tp, fn, fp, tn) in counts.items():
        for (label, pred), k in zip(
            [(1, 1), (1, 0), (0, 1), (0, 0)], (tp, fn, fp, tn), strict=True
        ):
            rows += [{"label_id": label, "prediction_id": pred, "group": group}] * k
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _frame_from_confusion(cms: dict[str, np.ndarray], *, seed: int = 0) -> pd.DataFrame:
    """Rows with exact confusion counts ``cm[true, pred]`` per group, in shuffled order."""
    rows = []
    for group, cm in cms.items():
        for t, p in itertools.product(range(cm.shape[0]), repeat=2):
            rows += [{"label_id": t, "prediction_id": p, "group": group}] * int(cm[t, p])
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _frame_from_cells(
    cells: dict[tuple[str, ...], int], columns: list[str], *, seed: int = 0
) -> pd.DataFrame:
    """Rows per finest cell of the sensitive columns, with random labels and predictions."""
    rng = np.random.default_rng(seed)
    rows = []
    for cell, k in cells.items():
        rows += [dict(zip(columns, cell, strict=True))] * k
    frame = pd.DataFrame(rows)
    frame["label_id"] = rng.integers(0, 2, len(frame))
    frame["prediction_id"] = rng.integers(0, 2, len(frame))
    return frame


def _groups(result: dict, slice_index: int = 0) -> dict[str, dict]:
    return {g["name"]: g for g in result["slices"][slice_index]["groups"]}


def _values(entry: dict) -> dict[str, float | None]:
    return {k: v["value"] for k, v in entry["metrics"].items()}


def _published_system(
    result: dict, frame: pd.DataFrame, columns: list[str]
) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
    """The linear system an attacker sees: rows = published group indicators over finest cells.

    Unknowns are the counts of the finest cells (combinations of all sensitive columns); the
    overall count and every published group's count are known. Returns the published matrix
    and the indicator vector of every suppressed group.
    """
    cells = sorted({tuple(str(v) for v in row) for row in frame[columns].itertuples(index=False)})
    counts = np.array(
        [int((frame[columns].astype(str) == list(cell)).all(axis=1).sum()) for cell in cells]
    )

    def indicator(group: dict[str, str]) -> np.ndarray:
        return np.array(
            [all(cell[columns.index(c)] == v for c, v in group.items()) for cell in cells],
            dtype=float,
        )

    published = [np.ones(len(cells))]
    assert result["rows"] == counts.sum()
    hidden = {}
    for spec in result["slices"]:
        for group in spec["groups"]:
            v = indicator(group["group"])
            if group["suppressed"]:
                hidden[(spec["name"], group["name"])] = v
            else:
                assert group["count"] == int(v @ counts)  # what is published is the truth
                published.append(v)
    return np.stack(published), hidden


def _recoverable(matrix: np.ndarray, hidden: dict) -> list:
    """Hidden groups whose count is a linear combination of published counts."""
    rank = np.linalg.matrix_rank(matrix)
    out = []
    for name, v in hidden.items():
        by_rank = np.linalg.matrix_rank(np.vstack([matrix, v])) == rank
        solution, *_ = np.linalg.lstsq(matrix.T, v, rcond=None)
        by_lstsq = bool(np.allclose(matrix.T @ solution, v, atol=1e-8))
        assert by_rank == by_lstsq
        if by_rank:
            out.append(name)
    return out


def _slice_groups(
    cells: list[tuple[str, ...]], spec: SliceSpec, all_columns: tuple[str, ...]
) -> dict[tuple[str, tuple[str, ...]], np.ndarray]:
    positions = [all_columns.index(c) for c in spec.columns]
    keys = sorted({tuple(cell[p] for p in positions) for cell in cells})
    return {
        (spec.name, key): np.array(
            [tuple(cell[p] for p in positions) == key for cell in cells], dtype=float
        )
        for key in keys
    }


# --------------------------------------------------------------------------- binary metrics

COUNTS = {"a": (30, 10, 5, 55), "b": (20, 20, 10, 50), "c": (45, 5, 15, 35)}


def _expected(tp: int, fn: int, fp: int, tn: int) -> dict[str, float]:
    n = tp + fn + fp + tn
    return {
        "accuracy": (tp + tn) / n,
        "selection_rate": (tp + fp) / n,
        "tpr": tp / (tp + fn),
        "fpr": fp / (fp + tn),
        "fnr": fn / (tp + fn),
        "precision": tp / (tp + fp),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "count": n,
    }


def test_binary_group_metrics_are_exact() -> None:
    """Per-group and overall metrics equal the hand-computed fractions of known counts."""
    frame = _binary_frame(COUNTS)
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    assert result["task"] == "binary"
    assert result["positive_label"] == "pos"
    assert result["rows"] == 300
    assert result["metrics"] == ALL_METRICS
    groups = _groups(result)
    assert sorted(groups) == ["a", "b", "c"]
    for name, counts in COUNTS.items():
        entry = groups[name]
        assert entry["suppressed"] is False
        assert entry["group"] == {"group": name}
        assert entry["count"] == 100
        assert _values(entry) == pytest.approx(_expected(*counts), abs=EXACT)
        assert all(m["ci"] is None for m in entry["metrics"].values())
    total = tuple(sum(c[i] for c in COUNTS.values()) for i in range(4))
    overall = {k: v["value"] for k, v in result["overall"].items()}
    assert overall == pytest.approx(_expected(*total), abs=EXACT)
    per_class = {c["label"]: c for c in result["per_class"]}
    assert per_class["pos"]["support"] == 95 + 35  # TP + FN over all groups
    assert per_class["neg"]["support"] == 30 + 140
    assert per_class["pos"]["recall"]["value"] == pytest.approx(95 / 130, abs=EXACT)
    assert per_class["pos"]["precision"]["value"] == pytest.approx(95 / 125, abs=EXACT)
    assert per_class["neg"]["recall"]["value"] == pytest.approx(140 / 170, abs=EXACT)

    spec = result["slices"][0]
    assert spec["name"] == "group"
    assert spec["reportable_groups"] == 3
    assert spec["suppressed_groups"] == 0
    gaps = spec["disparities"]["largest_gap"]
    assert gaps["accuracy"]["value"] == pytest.approx(0.85 - 0.70, abs=EXACT)
    assert (gaps["accuracy"]["highest"], gaps["accuracy"]["lowest"]) == ("a", "b")
    assert gaps["tpr"]["value"] == pytest.approx(0.9 - 0.5, abs=EXACT)
    assert (gaps["tpr"]["highest"], gaps["tpr"]["lowest"]) == ("c", "b")
    assert "count" not in gaps
    disparities = spec["disparities"]
    assert disparities["demographic_parity_difference"]["value"] == pytest.approx(
        0.60 - 0.30, abs=EXACT
    )
    assert disparities["demographic_parity_ratio"]["value"] == pytest.approx(0.5, abs=EXACT)
    # TPR gap 0.9 - 0.5 (c vs b) beats the FPR gap 15/50 - 5/60 (c vs a).
    assert disparities["equalized_odds_difference"]["value"] == pytest.approx(0.4, abs=EXACT)


def test_binary_metrics_match_fairlearn_and_sklearn() -> None:
    """Point estimates and disparities agree with Fairlearn and scikit-learn (pos_label=1)."""
    frame = _binary_frame(COUNTS, seed=3)
    y, p, g = frame["label_id"], frame["prediction_id"], frame["group"]
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    reference = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "fnr": false_negative_rate,
            "precision": lambda t, q: precision_score(t, q, pos_label=1),
            "f1": lambda t, q: f1_score(t, q, pos_label=1),
        },
        y_true=y,
        y_pred=p,
        sensitive_features=g,
    )
    groups = _groups(result)
    for name, row in reference.by_group.iterrows():
        assert _values(groups[name]) == pytest.approx({**row.to_dict(), "count": 100}, abs=1e-12)
    for metric, value in reference.overall.items():
        assert result["overall"][metric]["value"] == pytest.approx(value, abs=1e-12)
    disparities = result["slices"][0]["disparities"]
    assert disparities["demographic_parity_difference"]["value"] == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=g), abs=1e-12
    )
    assert disparities["demographic_parity_ratio"]["value"] == pytest.approx(
        demographic_parity_ratio(y, p, sensitive_features=g), abs=1e-12
    )
    assert disparities["equalized_odds_difference"]["value"] == pytest.approx(
        equalized_odds_difference(y, p, sensitive_features=g), abs=1e-12
    )


# --------------------------------------------------------------------------- multi-class

LABELS3 = ["low", "mid", "high"]
CMS3 = {
    "g1": np.array([[20, 3, 2], [4, 15, 1], [2, 3, 10]]),
    "g2": np.array([[10, 5, 5], [2, 25, 3], [1, 1, 18]]),
    "g3": np.array([[30, 2, 0], [5, 10, 5], [0, 4, 14]]),
}


def _one_vs_rest(cm: np.ndarray) -> dict[str, list[float]]:
    """Hand computation, class by class, with plain Python arithmetic."""
    n = int(cm.sum())
    out: dict[str, list[float]] = {k: [] for k in ("sr", "tpr", "fpr", "fnr", "prec", "f1")}
    for k in range(cm.shape[0]):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = n - tp - fn - fp
        out["sr"].append((tp + fp) / n)
        out["tpr"].append(tp / (tp + fn))
        out["fpr"].append(fp / (fp + tn))
        out["fnr"].append(fn / (tp + fn))
        out["prec"].append(tp / (tp + fp))
        out["f1"].append(2 * tp / (2 * tp + fp + fn))
    return out


def test_multiclass_macro_rates_and_per_class_selection() -> None:
    """Three labels: one-vs-rest rates are macro-averaged; selection rate is per class."""
    frame = _frame_from_confusion(CMS3)
    result = audit_fairness(
        frame, label_names=LABELS3, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    assert result["task"] == "multiclass"
    assert result["positive_label"] is None
    assert result["metrics"] == [
        "accuracy",
        "selection_rate[low]",
        "selection_rate[mid]",
        "selection_rate[high]",
        "tpr",
        "fpr",
        "fnr",
        "precision",
        "f1",
        "count",
    ]
    groups = _groups(result)
    hand = {name: _one_vs_rest(cm) for name, cm in CMS3.items()}
    for name, cm in CMS3.items():
        h = hand[name]
        got = _values(groups[name])
        expected = {
            "accuracy": np.trace(cm) / cm.sum(),
            "tpr": sum(h["tpr"]) / 3,
            "fpr": sum(h["fpr"]) / 3,
            "fnr": sum(h["fnr"]) / 3,
            "precision": sum(h["prec"]) / 3,
            "f1": sum(h["f1"]) / 3,
            "count": int(cm.sum()),
            **{f"selection_rate[{lab}]": h["sr"][k] for k, lab in enumerate(LABELS3)},
        }
        assert got == pytest.approx(expected, abs=EXACT)
        # Every class is supported and predicted here, so sklearn's macro averages agree.
        rows = frame[frame["group"] == name]
        y, p = rows["label_id"], rows["prediction_id"]
        assert got["tpr"] == pytest.approx(recall_score(y, p, average="macro"), abs=EXACT)
        assert got["precision"] == pytest.approx(precision_score(y, p, average="macro"), abs=EXACT)
        assert got["f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=EXACT)

    # Disparities take the worst class.
    names = list(CMS3)
    dp = max(
        max(hand[g]["sr"][k] for g in names) - min(hand[g]["sr"][k] for g in names)
        for k in range(3)
    )
    ratio = min(
        min(hand[g]["sr"][k] for g in names) / max(hand[g]["sr"][k] for g in names)
        for k in range(3)
    )
    eo = max(
        max(
            max(hand[g][rate][k] for g in names) - min(hand[g][rate][k] for g in names)
            for rate in ("tpr", "fpr")
        )
        for k in range(3)
    )
    disparities = result["slices"][0]["disparities"]
    assert disparities["demographic_parity_difference"]["value"] == pytest.approx(dp, abs=EXACT)
    assert disparities["demographic_parity_ratio"]["value"] == pytest.approx(ratio, abs=EXACT)
    assert disparities["equalized_odds_difference"]["value"] == pytest.approx(eo, abs=EXACT)
    # Hand-checked numbers for the worst class, so the test does not only agree with itself.
    assert dp == pytest.approx(35 / 70 - 13 / 70)  # class 'low': g3 vs g2
    gap = disparities["largest_gap"]["selection_rate[mid]"]
    assert gap["value"] == pytest.approx(31 / 70 - 16 / 70, abs=EXACT)
    assert (gap["highest"], gap["lowest"]) == ("g2", "g3")

    with pytest.raises(
        ValueError,
        match=re.escape(
            "positive_label applies to binary tasks only; this task has 3 labels "
            "['low', 'mid', 'high']: remove positive_label from the audit policy"
        ),
    ):
        audit_fairness(
            frame,
            label_names=LABELS3,
            sensitive=["group"],
            metrics=ALL_METRICS,
            positive_label="mid",
            n_boot=0,
        )


def test_multiclass_macro_skips_classes_without_support() -> None:
    """A class absent from a group (no rows, never predicted) does not drag its macro rates."""
    cm = np.array([[5, 1, 0], [2, 6, 0], [0, 0, 0]])
    out = group_metrics(cm, positive=None, label_names=LABELS3)
    assert float(out["tpr"]) == pytest.approx((5 / 6 + 6 / 8) / 2, abs=EXACT)
    assert float(out["precision"]) == pytest.approx((5 / 7 + 6 / 7) / 2, abs=EXACT)
    # FPR of the absent class is defined (0 of 14 negatives) and counts.
    assert float(out["fpr"]) == pytest.approx((2 / 8 + 1 / 6 + 0) / 3, abs=EXACT)
    assert float(out["selection_rate[high]"]) == 0.0
    rates = class_rates(cm)
    assert np.isnan(rates["tpr"][2]) and np.isnan(rates["precision"][2])
    assert rates["tpr"][:2] == pytest.approx([5 / 6, 6 / 8], abs=EXACT)


# --------------------------------------------------------------------------- positive label


def test_positive_label_choice_flips_the_positive_class() -> None:
    """positive_label='not_biased' makes that class the positive one instead of label_names[1]."""
    labels = ["not_biased", "biased"]
    frame = _binary_frame(COUNTS)
    default = audit_fairness(
        frame, label_names=labels, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    flipped = audit_fairness(
        frame,
        label_names=labels,
        sensitive=["group"],
        metrics=ALL_METRICS,
        positive_label="not_biased",
        n_boot=0,
    )
    assert default["positive_label"] == "biased"
    assert flipped["positive_label"] == "not_biased"
    d, f = _groups(default), _groups(flipped)
    for name, (tp, fn, fp, tn) in COUNTS.items():
        dv, fv = _values(d[name]), _values(f[name])
        assert dv["selection_rate"] == pytest.approx((tp + fp) / 100, abs=EXACT)
        assert fv["selection_rate"] == pytest.approx((fn + tn) / 100, abs=EXACT)
        assert fv["tpr"] == pytest.approx(tn / (tn + fp), abs=EXACT)  # old specificity
        assert fv["fpr"] == pytest.approx(fn / (fn + tp), abs=EXACT)  # old FNR
        assert fv["precision"] == pytest.approx(tn / (tn + fn), abs=EXACT)
        assert fv["accuracy"] == pytest.approx(dv["accuracy"], abs=EXACT)
    # Binary parity gaps are symmetric in the choice; the ratio is not.
    dd, fd = (r["slices"][0]["disparities"] for r in (default, flipped))
    for name in ("demographic_parity_difference", "equalized_odds_difference"):
        assert fd[name]["value"] == pytest.approx(dd[name]["value"], abs=EXACT)
    assert dd["demographic_parity_ratio"]["value"] == pytest.approx(0.30 / 0.60, abs=EXACT)
    assert fd["demographic_parity_ratio"]["value"] == pytest.approx(0.40 / 0.70, abs=EXACT)

    with pytest.raises(
        ValueError,
        match=re.escape(
            "positive_label 'unknown' is not one of the run's labels ['not_biased', 'biased']; "
            "set the audit policy's positive_label to one of them, or remove it to use 'biased'"
        ),
    ):
        audit_fairness(
            frame,
            label_names=labels,
            sensitive=["group"],
            metrics=ALL_METRICS,
            positive_label="unknown",
            n_boot=0,
        )
    with pytest.raises(ValueError, match=re.escape("positive_label 'unknown' is not one of")):
        runs = frame.assign(row_id=np.arange(len(frame)))
        compare_fairness(
            runs,
            runs,
            label_names=labels,
            sensitive=["group"],
            metrics=ALL_METRICS,
            positive_label="unknown",
            n_boot=0,
        )


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_coverage() -> None:
    """95% percentile intervals for per-group accuracy cover the true rate about 95% of the time."""
    true = np.array([0.70, 0.85])
    draws, n = 150, 600
    hits = np.zeros(2)
    for draw in range(draws):
        rng = np.random.default_rng(10_000 + draw)
        group = rng.integers(0, 2, n)  # group sizes vary around 300
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < true[group], y, 1 - y)
        codes = (group * 2 + y) * 2 + pred
        boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=300, seed=draw)
        assert boot.shape == (300, 2, 2, 2)
        assert (boot.sum((1, 2, 3)) == n).all()  # whole rows resampled, n per resample
        accuracy = group_metrics(boot, positive=1, label_names=BINARY)["accuracy"]
        lo, hi = _interval(accuracy, 0.95)
        hits += (lo <= true) & (true <= hi)
    coverage = hits / draws
    assert ((coverage >= 0.88) & (coverage <= 0.99)).all(), coverage


def test_resamples_draw_every_row_uniformly_with_replacement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resampler draws n of the n rows, uniformly with replacement (as pandas' sample in
    Fairlearn does), and _bootstrap counts exactly the rows it drew."""
    n, n_boot = 50, 2_000
    rows = np.concatenate(list(fairness._resampled_rows(n, n_boot=n_boot, seed=3)))
    assert rows.shape == (n_boot, n)
    assert rows.min() >= 0 and rows.max() < n
    again = np.concatenate(list(fairness._resampled_rows(n, n_boot=n_boot, seed=3)))
    assert (again == rows).all()  # the seed fixes the resamples
    assert not (
        np.concatenate(list(fairness._resampled_rows(n, n_boot=n_boot, seed=4))) == rows
    ).all()
    # Each row is drawn n_boot times on average; Pearson's χ² over the 50 rows has 49 degrees
    # of freedom if the draws are uniform. A seeded draw, so no flakiness; the 99.9% quantile
    # (85.4) leaves a uniform resampler a 1-in-1000 chance of failing for an unlucky seed,
    # while "never draw the last row" gives χ² ≥ 2000.
    frequency = np.bincount(rows.ravel(), minlength=n)
    chi2 = float(np.sum((frequency - n_boot) ** 2 / n_boot))
    assert chi2 < stats.chi2.ppf(0.999, n - 1), chi2
    # Repeats within one resample: a draw without replacement would have none.
    assert np.mean([len(np.unique(r)) for r in rows]) == pytest.approx(
        n * (1 - (1 - 1 / n) ** n), rel=0.01
    )

    codes = np.random.default_rng(0).integers(0, 8, n)
    drawn: list[np.ndarray] = []
    real = fairness._resampled_rows

    def recording(size: int, *, n_boot: int, seed: int) -> Iterator[np.ndarray]:
        for chunk in real(size, n_boot=n_boot, seed=seed):
            drawn.append(chunk)
            yield chunk

    monkeypatch.setattr(fairness, "_resampled_rows", recording)
    boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=250, seed=5)
    assert [len(c) for c in drawn] == [100, 100, 50]
    for b, r in enumerate(np.concatenate(drawn)):
        assert (boot[b].ravel() == np.bincount(codes[r], minlength=8)).all()


def test_audit_intervals_match_the_bootstrap_helpers() -> None:
    """audit_fairness reports the intervals the helpers give on the same seed, exactly.

    The overall row is resampled with the audit's seed, slice k with seed + 1 + k.
    """
    rng = np.random.default_rng(5)
    n = 800
    group = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(group == 0, 0.7, 0.9), y, 1 - y)
    frame = pd.DataFrame(
        {"label_id": y, "prediction_id": pred, "group": np.where(group == 0, "a", "b")}
    )
    seed = 41
    result = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["group"],
        metrics=["accuracy"],
        n_boot=2000,
        seed=seed,
    )
    boot = _bootstrap((group * 2 + y) * 2 + pred, cells=2, num_labels=2, n_boot=2000, seed=seed + 1)
    lo, hi = _interval(group_metrics(boot, positive=1, label_names=BINARY)["accuracy"], 0.95)
    groups = _groups(result)
    for i, name in enumerate(["a", "b"]):
        ci = groups[name]["metrics"]["accuracy"]["ci"]
        assert ci == [float(lo[i]), float(hi[i])]
        assert ci[0] < groups[name]["metrics"]["accuracy"]["value"] < ci[1]
    overall = _bootstrap(y * 2 + pred, cells=1, num_labels=2, n_boot=2000, seed=seed)[:, 0]
    expected = _interval(group_metrics(overall, positive=1, label_names=BINARY)["accuracy"], 0.95)
    assert result["overall"]["accuracy"]["ci"] == [float(expected[0]), float(expected[1])]
    assert result["ci_level"] == 0.95
    assert result["n_boot"] == 2000


def test_bootstrap_agrees_with_fairlearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the rows Fairlearn's MetricFrame(n_boot=...) resampled, the vectorised bootstrap gives
    Fairlearn's intervals, per group and overall, to floating point.

    The two draw rows from different random streams (Fairlearn: pandas' ``sample`` seeded per
    resample; hubtune: one numpy Generator), so with their own draws they agree only up to
    Monte Carlo error. Here hubtune is handed the very rows Fairlearn drew (read back through
    a sample parameter), so any difference is in the counting, the metrics or the quantiles.
    The only tolerance is rounding: both divide the same integers, possibly in another order.
    """
    rng = np.random.default_rng(0)
    n, n_boot = 1000, 100
    group = rng.choice(["a", "b"], size=n)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < np.where(group == "a", 0.7, 0.85), y, 1 - y)
    frame = pd.DataFrame({"label_id": y, "prediction_id": pred, "group": group})
    seen: list[np.ndarray] = []

    def rows(y_true: object, y_pred: object, row_id: object) -> float:
        seen.append(np.asarray(row_id))
        return 0.0

    reference = MetricFrame(
        metrics={"accuracy": accuracy_score, "tpr": true_positive_rate, "rows": rows},
        y_true=y,
        y_pred=pred,
        sensitive_features=frame["group"],
        sample_params={"rows": {"row_id": np.arange(n)}},
        n_boot=n_boot,
        ci_quantiles=[0.025, 0.975],
        random_state=0,
    )
    # One call on all n rows per evaluation: the data as given, then each resample.
    whole = [r for r in seen if len(r) == n]
    assert len(whole) == 1 + n_boot
    assert (whole[0] == np.arange(n)).all()
    resamples = np.stack(whole[1:])
    assert len({r.tobytes() for r in resamples}) == n_boot

    def fairlearn_rows(size: int, *, n_boot: int, seed: int) -> Iterator[np.ndarray]:
        assert (n_boot, size) == resamples.shape
        for start in range(0, n_boot, 30):  # any chunking gives the same counts
            yield resamples[start : start + 30]

    monkeypatch.setattr(fairness, "_resampled_rows", fairlearn_rows)
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy", "tpr"], n_boot=n_boot
    )
    groups = _groups(result)
    low, high = reference.by_group_ci
    for name in ("a", "b"):
        for metric in ("accuracy", "tpr"):
            ci = groups[name]["metrics"][metric]["ci"]
            assert ci == pytest.approx([low.loc[name, metric], high.loc[name, metric]], abs=EXACT)
    overall_low, overall_high = reference.overall_ci
    for metric in ("accuracy", "tpr"):
        assert result["overall"][metric]["ci"] == pytest.approx(
            [overall_low[metric], overall_high[metric]], abs=EXACT
        )


# Interval ends at the declared level, checked exactly. The resamples 0, 1, ..., 10000 (in
# random order) have the q-quantile 10000·q under linear interpolation (numpy's default, and
# Fairlearn's), so each end of an interval names the level it was taken at: a 93% interval
# labelled 95% is off by 0.01·10000 = 100 units, not by sampling noise.
LEVELS = [0.8, 0.9, 0.95, 0.99]
KNOWN_B = 10_001


@pytest.mark.parametrize("ci_level", LEVELS)
def test_interval_ends_are_the_declared_quantiles(ci_level: float) -> None:
    alpha = (1 - ci_level) / 2
    scale = KNOWN_B - 1
    rng = np.random.default_rng(0)
    values = rng.permutation(KNOWN_B).astype(float)
    expected = [scale * alpha, scale * (1 - alpha)]
    assert _interval(values, ci_level) == pytest.approx(expected, abs=1e-9)
    # Over axis 0, column by column.
    bounds = _interval(np.stack([values, 3 * values[::-1] - 7], axis=1), ci_level)
    assert bounds.shape == (2, 2)
    assert bounds[:, 0] == pytest.approx(expected, abs=1e-9)
    assert bounds[:, 1] == pytest.approx([3 * e - 7 for e in expected], abs=1e-9)
    # Resamples in which the metric is undefined (NaN) are left out, not counted, while they
    # are fewer than 10%; beyond that there is no interval.
    few = rng.permutation(np.concatenate([values, np.full(1_000, np.nan)]))  # 9.1%
    assert _interval(few, ci_level) == pytest.approx(expected, abs=1e-9)
    many = rng.permutation(np.concatenate([values, np.full(1_200, np.nan)]))  # 10.7%
    assert np.isnan(_interval(many, ci_level)).all()


def _known_bootstrap(
    codes: np.ndarray, *, cells: int, num_labels: int, n_boot: int, seed: int
) -> np.ndarray:
    """A stand-in for ``_bootstrap`` with a known distribution in every resample.

    A cell with at least one correct prediction gets accuracy v_b = 0, 1/10000, ..., 1 over
    the resamples (in random order): all its rows are truly positive, v_b of them predicted
    so. Its accuracy, TPR and selection rate are v_b, its FNR 1 - v_b, its precision 1. A
    cell whose predictions are all wrong gets accuracy 0 in every resample, so its gap to a
    v_b cell is v_b.
    """
    assert (num_labels, n_boot) == (2, KNOWN_B)
    label, pred = (codes // 2) % 2, codes % 2
    cell = codes // 4
    learns = np.bincount(cell[label == pred], minlength=cells) > 0
    right = np.random.default_rng(seed).permutation(KNOWN_B)
    out = np.zeros((KNOWN_B, cells, 2, 2), dtype=np.int64)
    out[:, :, 1, 0] = KNOWN_B - 1
    out[:, learns, 1, 1] = right[:, None]
    out[:, learns, 1, 0] = KNOWN_B - 1 - right[:, None]
    return out


@pytest.mark.parametrize("ci_level", LEVELS)
def test_reported_intervals_are_the_declared_quantiles(
    monkeypatch: pytest.MonkeyPatch, ci_level: float
) -> None:
    """Every interval audit_fairness and compare_fairness report (group, overall, per class,
    disparities, gaps, changes) is the pair of (1 ∓ ci_level)/2 quantiles of its resamples."""
    monkeypatch.setattr(fairness, "_bootstrap", _known_bootstrap)
    alpha = (1 - ci_level) / 2
    expected = [alpha, 1 - alpha]
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (0, 20, 30, 0)})  # b: all wrong
    result = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["group"],
        metrics=ALL_METRICS,
        n_boot=KNOWN_B,
        ci_level=ci_level,
    )
    assert result["ci_level"] == ci_level
    groups = _groups(result)
    for metrics in (result["overall"], groups["a"]["metrics"]):
        for k in ("accuracy", "selection_rate", "tpr", "fnr"):
            assert metrics[k]["ci"] == pytest.approx(expected, abs=EXACT), k
        assert metrics["precision"]["ci"] == [1.0, 1.0]
        assert metrics["fpr"]["ci"] is None  # no true negatives in any resample
    assert groups["b"]["metrics"]["accuracy"]["ci"] == [0.0, 0.0]
    per_class = {c["label"]: c for c in result["per_class"]}
    assert per_class["pos"]["recall"]["ci"] == pytest.approx(expected, abs=EXACT)
    disparities = result["slices"][0]["disparities"]
    for k in ("demographic_parity_difference", "equalized_odds_difference"):
        assert disparities[k]["ci"] == pytest.approx(expected, abs=EXACT), k
    for k in ("accuracy", "selection_rate", "tpr", "fnr"):
        assert disparities["largest_gap"][k]["ci"] == pytest.approx(expected, abs=EXACT), k

    # compare_fairness: the change from a run that is always wrong is v_b in group a.
    this = frame.assign(row_id=np.arange(len(frame)))
    other = this.assign(prediction_id=1 - this["label_id"])
    compared = compare_fairness(
        this,
        other,
        label_names=BINARY,
        sensitive=["group"],
        metrics=["accuracy", "tpr"],
        n_boot=KNOWN_B,
        ci_level=ci_level,
    )
    assert compared["ci_level"] == ci_level
    changes = {g["name"]: g["metrics"] for g in compared["slices"][0]["groups"]}
    for k in ("accuracy", "tpr"):
        assert changes["a"][k]["ci"] == pytest.approx(expected, abs=EXACT), k
        assert changes["b"][k]["ci"] == [0.0, 0.0]


def test_interval_coverage_is_the_declared_level() -> None:
    """95% intervals cover the true per-group accuracy 95% of the time, to within ±0.8 points.

    Tight enough to tell a 93% interval labelled 95% (the coarse test above cannot). 5,000
    seeded test sets of 100,000 rows, two groups each (10,000 intervals), 400 resamples each.
    Resampling n rows with replacement gives cell counts Multinomial(n, counts / n), which is
    drawn directly here (what _bootstrap computes row by row, 5,000 times too slow); the
    intervals are the audit's own (_interval).

    The expected coverage is not exactly 0.95 with B resamples: for a continuous statistic
    whose bootstrap spread matches its sampling spread (with 50,000 rows per group accuracy is
    that, to well under 0.1 point), the linearly interpolated α-quantile of B draws misses a
    fresh draw with probability (α·(B - 1) + 1) / (B + 1) per side, so coverage is
    1 - 2·(α·(B - 1) + 1) / (B + 1): 0.9453 at 95% with B = 400, 0.9254 at 93%, 0.8955 at 90%
    (a simulation of 80,000 intervals gave 0.9449, 0.9252, 0.8953).

    The band: 10,000 intervals have a binomial standard error of √(0.945·0.055 / 10,000) =
    0.0023 at the right coverage and √(0.925·0.075 / 10,000) = 0.0026 at 93%. ±0.008 is 3.5
    standard errors for the right level (a correct interval fails for fewer than 1 seed in
    2,000), and the 93% interval's expected coverage is 0.012 = 4.6 of its standard errors
    below the band (it passes for fewer than 1 seed in 200,000). The seed is fixed, so the
    outcome is deterministic either way.
    """
    true = np.array([0.70, 0.85])
    sets, n_boot, n = 5_000, 400, 100_000
    # Cells (group, correct): a row is in either group with probability 1/2.
    cell_p = np.stack([0.5 * (1 - true), 0.5 * true], axis=1).ravel()
    rng = np.random.default_rng(2024)
    data = rng.multinomial(n, cell_p, size=sets)
    boot = rng.multinomial(n, data[:, None, :] / n, size=(sets, n_boot))
    boot = boot.reshape(sets, n_boot, 2, 2)
    accuracy = np.moveaxis(boot[..., 1] / boot.sum(-1), 1, 0)  # [n_boot, sets, groups]

    def coverage(ci_level: float) -> float:
        lo, hi = _interval(accuracy, ci_level)
        return float(np.mean((lo <= true) & (true <= hi)))

    def expected(ci_level: float) -> float:
        alpha = (1 - ci_level) / 2
        return 1 - 2 * (alpha * (n_boot - 1) + 1) / (n_boot + 1)

    assert expected(0.95) == pytest.approx(0.94526, abs=1e-5)
    assert expected(0.93) == pytest.approx(0.92536, abs=1e-5)
    band = 0.008
    covered = coverage(0.95)
    assert abs(covered - expected(0.95)) <= band, covered
    # The band has teeth: intervals really at 93% fall below it.
    assert coverage(0.93) < expected(0.95) - band


def test_no_interval_when_metric_is_mostly_undefined() -> None:
    """A group with a single positive row gets no TPR interval, rather than a meaningless one."""
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (1, 0, 10, 39)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=300
    )
    groups = _groups(result)
    assert groups["b"]["metrics"]["tpr"]["value"] == 1.0
    assert groups["b"]["metrics"]["tpr"]["ci"] is None
    lo, hi = groups["b"]["metrics"]["accuracy"]["ci"]
    assert 0.0 <= lo < 40 / 50 < hi <= 1.0
    assert groups["a"]["metrics"]["tpr"]["ci"] is not None
    assert groups["a"]["metrics"]["count"]["ci"] is None


# --------------------------------------------------------------------------- suppression


def test_small_group_suppressed_with_complementary() -> None:
    """One tiny group: it is hidden, and so is a second one, so it cannot be got by subtraction."""
    frame = _binary_frame(
        {
            "a": (30, 10, 5, 55),  # 100
            "b": (20, 20, 10, 30),  # 80
            "c": (40, 20, 20, 40),  # 120
            "d": (5, 0, 0, 0),  # 5, all predicted positive
        }
    )
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    groups = _groups(result)
    for name, reason in (("d", "small"), ("b", "complementary")):
        assert groups[name]["suppressed"] is True
        assert groups[name]["suppression"] == reason
        assert groups[name]["count"] is None
        assert groups[name]["metrics"] is None
    assert [groups[g]["suppressed"] for g in ("a", "c")] == [False, False]
    assert [groups[g]["count"] for g in ("a", "c")] == [100, 120]
    spec = result["slices"][0]
    assert (spec["reportable_groups"], spec["suppressed_groups"]) == (2, 2)

    matrix, hidden = _published_system(result, frame, ["group"])
    assert set(hidden) == {("group", "d"), ("group", "b")}
    assert _recoverable(matrix, hidden) == []
    # The check has teeth: publishing the complementary group would expose the small one.
    exposed = _recoverable(np.vstack([matrix, hidden[("group", "b")]]), hidden)
    assert set(exposed) == {("group", "d"), ("group", "b")}

    # Disparities use the reportable groups only: d's selection rate of 1.0 does not count.
    shown = frame[frame["group"].isin(["a", "c"])]
    dp = spec["disparities"]["demographic_parity_difference"]["value"]
    assert dp == pytest.approx(60 / 120 - 35 / 100, abs=EXACT)
    assert dp == pytest.approx(
        demographic_parity_difference(
            shown["label_id"], shown["prediction_id"], sensitive_features=shown["group"]
        ),
        abs=EXACT,
    )
    for gap in spec["disparities"]["largest_gap"].values():
        assert {gap["highest"], gap["lowest"]} <= {"a", "c"}


def test_no_disparities_with_fewer_than_two_reportable_groups() -> None:
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (2, 1, 1, 1)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    spec = result["slices"][0]
    assert [g["suppression"] for g in spec["groups"]] == ["complementary", "small"]
    assert spec["reportable_groups"] == 0
    assert spec["disparities"] == {}
    assert "fewer than two reportable groups" in spec["disparities_note"]
    assert result["overall"]["count"]["value"] == 105  # the overall row is still published


def test_intersection_cell_cannot_be_recovered_across_slices() -> None:
    """A tiny cell of A × B is protected against subtraction from the A and B marginals too."""
    cells: dict[tuple[str, ...], int] = {
        ("x", "u"): 60,
        ("x", "v"): 50,
        ("x", "w"): 3,
        ("y", "u"): 55,
        ("y", "v"): 45,
        ("y", "w"): 40,
    }
    frame = _frame_from_cells(cells, ["A", "B"], seed=1)
    result = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["A", "B"],
        metrics=ALL_METRICS,
        intersections=True,
        n_boot=0,
    )
    assert [s["name"] for s in result["slices"]] == ["A", "B", "A × B"]
    # Every marginal group is large and published.
    for index in (0, 1):
        assert all(not g["suppressed"] for g in result["slices"][index]["groups"])
    cross = _groups(result, 2)
    assert cross["x & w"]["suppression"] == "small"
    assert cross["x & w"]["group"] == {"A": "x", "B": "w"}
    hidden_cross = {name for name, g in cross.items() if g["suppressed"]}
    # Fewer than a 2 × 2 rectangle of hidden cells would leak one cell of a 2 × 3 table.
    # (The current heuristic hides the whole table here; a rectangle would be enough.)
    assert len(hidden_cross) >= 4
    assert {"x & w", "y & w"} <= hidden_cross
    assert all(cross[name]["suppression"] == "complementary" for name in hidden_cross - {"x & w"})

    matrix, hidden = _published_system(result, frame, ["A", "B"])
    assert {name for (_, name) in hidden} == hidden_cross
    assert _recoverable(matrix, hidden) == []
    # Hiding the small cell alone would leak it through the marginals.
    naive = np.vstack(
        [matrix]
        + [v for (spec, name), v in hidden.items() if cross[name]["suppression"] != "small"]
    )
    assert ("A × B", "x & w") in _recoverable(naive, hidden)


def test_random_tables_never_leak_suppressed_counts() -> None:
    """Many random tables with several tiny cells: no hidden group is a linear combination."""
    all_columns = ("A", "B", "C")
    levels = {"A": ["a0", "a1", "a2"], "B": ["b0", "b1", "b2"], "C": ["c0", "c1"]}
    slices = [SliceSpec((c,)) for c in all_columns] + [
        SliceSpec(("A", "B")),
        SliceSpec(all_columns),
    ]
    min_size = 20
    for seed in range(12):
        rng = np.random.default_rng(seed)
        cell_counts = {}
        for cell in itertools.product(*levels.values()):
            u = rng.random()
            if u < 0.1:
                continue  # an empty cell: no rows, not a group
            cell_counts[cell] = int(rng.integers(1, 6) if u < 0.35 else rng.integers(20, 80))
        cells = sorted(cell_counts)
        counts = np.array([cell_counts[c] for c in cells])
        hidden = suppress(
            cell_counts=cell_counts, slices=slices, all_columns=all_columns, min_group_size=min_size
        )
        groups: dict = {}
        for spec in slices:
            groups.update(_slice_groups(cells, spec, all_columns))
        assert set(hidden) <= set(groups)
        small = {g for g, v in groups.items() if v @ counts < min_size}
        assert small, "the random table should have tiny groups"
        assert {g for g, r in hidden.items() if r == "small"} == small
        assert all(r in ("small", "complementary") for r in hidden.values())
        matrix = np.stack([np.ones(len(cells))] + [v for g, v in groups.items() if g not in hidden])
        assert _recoverable(matrix, {g: groups[g] for g in hidden}) == [], seed


def test_random_frame_audit_never_leaks() -> None:
    """End to end: a random two-column data set with several tiny cells, checked from the output."""
    rng = np.random.default_rng(7)
    cells: dict[tuple[str, ...], int] = {}
    for a, b in itertools.product(["p", "q", "r", "s"], ["k", "l", "m"]):
        cells[(a, b)] = int(rng.integers(1, 8) if rng.random() < 0.3 else rng.integers(30, 70))
    frame = _frame_from_cells(cells, ["A", "B"], seed=7)
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["A", "B"], metrics=ALL_METRICS, n_boot=0
    )
    matrix, hidden = _published_system(result, frame, ["A", "B"])
    tiny = {f"{a} & {b}" for (a, b), k in cells.items() if k < 30}
    assert len(tiny) >= 2
    assert {name for (spec, name) in hidden if spec == "A × B"} >= tiny
    assert _recoverable(matrix, hidden) == []
    for spec in result["slices"]:
        for g in spec["groups"]:
            assert g["suppressed"] or g["count"] >= 30


# --------------------------------------------------------------------------- missing values


def test_missing_sensitive_values_form_their_own_group() -> None:
    """None, NaN, '' and blanks are counted as missing and reported as the '(missing)' group."""
    rng = np.random.default_rng(0)
    group = ["a"] * 40 + [None] * 5 + [np.nan] * 4 + [""] * 3 + ["  "] * 2 + ["b"] * 30
    region: list[object] = list((["north", "south"] * 42)[: len(group)])
    region[:3] = [None, "", np.nan]
    n = len(group)
    frame = pd.DataFrame(
        {
            "label_id": rng.integers(0, 2, n),
            "prediction_id": rng.integers(0, 2, n),
            "group": group,
            "region": region,
        }
    )
    result = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["group", "region"],
        metrics=ALL_METRICS,
        min_group_size=1,
        n_boot=0,
    )
    assert result["missing"] == {"group": 14, "region": 3}
    assert result["rows"] == n
    assert result["overall"]["count"]["value"] == n
    by_group = _groups(result, 0)
    assert {k: g["count"] for k, g in by_group.items()} == {"(missing)": 14, "a": 40, "b": 30}
    assert _groups(result, 1)["(missing)"]["count"] == 3
    for spec in result["slices"]:
        assert not any(g["suppressed"] for g in spec["groups"])
        assert sum(g["count"] for g in spec["groups"]) == n
    assert _groups(result, 2)["a & (missing)"]["count"] == 3  # the first three rows

    custom = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["group"],
        metrics=["count"],
        min_group_size=1,
        missing_label="unknown",
        n_boot=0,
    )
    assert _groups(custom)["unknown"]["count"] == 14


def test_fewer_rows_than_min_group_size_publishes_no_groups() -> None:
    frame = _binary_frame({"a": (5, 2, 1, 4), "b": (3, 1, 2, 2)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=50
    )
    assert result["slices"] == []
    assert "20 rows" in result["note"]
    assert "min_group_size=30" in result["note"]
    assert result["overall"]["count"]["value"] == 20
    assert result["overall"]["accuracy"]["value"] == pytest.approx(14 / 20, abs=EXACT)


def test_unknown_sensitive_column_is_a_clear_error() -> None:
    frame = _binary_frame(COUNTS)
    with pytest.raises(ValueError, match="data.columns.sensitive"):
        audit_fairness(frame, label_names=BINARY, sensitive=["age"], metrics=ALL_METRICS)


def test_slice_spec_name() -> None:
    assert SliceSpec(("sex", "age")).name == "sex × age"
    assert math.isnan(float(class_rates(np.zeros((2, 2)))["tpr"][1]))


# --------------------------------------------------------------------------- compare_fairness

# Two runs' predictions on the same rows, per group: {(label, this run's, other run's): rows}.
# Binary (positive label id 1). Group a has exactly 30 rows (the default min_group_size).
#   a: this TP 8, FN 2, FP 4, TN 16; other TP 5, FN 5, FP 2, TN 18.
#   b: this TP 10, FN 10, FP 0, TN 20; other TP 20, FN 0, FP 10, TN 10.
PAIRED = {
    "a": {(1, 1, 1): 5, (1, 1, 0): 3, (1, 0, 0): 2, (0, 1, 1): 2, (0, 1, 0): 2, (0, 0, 0): 16},
    "b": {(1, 1, 1): 10, (1, 0, 1): 10, (0, 0, 1): 10, (0, 0, 0): 10},
}
# (this, other) per group and metric, by hand from the counts above.
PAIRED_EXPECTED = {
    "a": {
        "accuracy": (24 / 30, 23 / 30),
        "selection_rate": (12 / 30, 7 / 30),
        "tpr": (8 / 10, 5 / 10),
        "fpr": (4 / 20, 2 / 20),
        "fnr": (2 / 10, 5 / 10),
        "precision": (8 / 12, 5 / 7),
        "f1": (16 / 22, 10 / 17),
    },
    "b": {
        "accuracy": (30 / 40, 30 / 40),
        "selection_rate": (10 / 40, 30 / 40),
        "tpr": (10 / 20, 20 / 20),
        "fpr": (0 / 20, 10 / 20),
        "fnr": (10 / 20, 0 / 20),
        "precision": (10 / 10, 20 / 30),
        "f1": (20 / 30, 40 / 50),
    },
}


def _paired_runs(
    cells: dict[str, dict[tuple[int, int, int], int]], *, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs' predictions frames on the same rows (``row_id``), the second in another order."""
    records = []
    for group, counts in cells.items():
        for (label, mine, theirs), k in counts.items():
            records += [{"group": group, "label_id": label, "this": mine, "other": theirs}] * k
    frame = pd.DataFrame(records).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    frame["row_id"] = np.arange(len(frame))
    this = frame.drop(columns="other").rename(columns={"this": "prediction_id"})
    other = frame.drop(columns="this").rename(columns={"other": "prediction_id"})
    other = other.sample(frac=1.0, random_state=seed + 1).reset_index(drop=True)
    return this, other


def _change(this: float, other: float) -> dict[str, object]:
    return {
        "this": pytest.approx(this, abs=EXACT),
        "other": pytest.approx(other, abs=EXACT),
        "change": pytest.approx(this - other, abs=EXACT),
        "ci": None,
    }


def test_compare_fairness_binary_values_are_exact() -> None:
    """Each group's metrics under both runs and their difference, from hand-counted rows."""
    this, other = _paired_runs(PAIRED)
    result = compare_fairness(
        this, other, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    assert result["rows"] == 70
    assert result["ci_level"] is None  # no resamples, no interval level
    assert list(result) == ["rows", "ci_level", "slices"]
    assert len(result["slices"]) == 1
    spec = result["slices"][0]
    assert list(spec) == ["name", "groups"]
    assert spec["name"] == "group"
    assert [g["name"] for g in spec["groups"]] == ["a", "b"]
    keys = ["accuracy", "selection_rate", "tpr", "fpr", "fnr", "precision", "f1"]  # no count
    for entry in spec["groups"]:
        name = entry["name"]
        # Group a has exactly min_group_size (30) rows: it is shown.
        assert list(entry) == ["name", "suppressed", "count", "metrics"]
        assert entry["suppressed"] is False
        assert entry["count"] == {"a": 30, "b": 40}[name]
        assert list(entry["metrics"]) == keys
        for k in keys:
            assert entry["metrics"][k] == _change(*PAIRED_EXPECTED[name][k]), (name, k)
    assert spec["groups"][1]["metrics"]["selection_rate"]["change"] == pytest.approx(-0.5)

    # positive_label='neg': TPR becomes the true negative rate, selection the share of 'neg'.
    flipped = compare_fairness(
        this,
        other,
        label_names=BINARY,
        sensitive=["group"],
        metrics=["selection_rate", "tpr"],
        positive_label="neg",
        n_boot=0,
    )
    groups = _groups(flipped)
    assert groups["a"]["metrics"] == {
        "selection_rate": _change(18 / 30, 23 / 30),
        "tpr": _change(16 / 20, 18 / 20),
    }
    assert groups["b"]["metrics"] == {
        "selection_rate": _change(30 / 40, 10 / 40),
        "tpr": _change(20 / 20, 10 / 20),
    }


def test_compare_fairness_min_group_size_boundary() -> None:
    """A group of exactly min_group_size rows is shown; one row more in the threshold hides it."""
    this, other = _paired_runs(PAIRED)
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ["accuracy"], "n_boot": 0}
    shown = compare_fairness(this, other, **kwargs)  # default min_group_size=30
    assert [(g["name"], g["suppressed"]) for g in shown["slices"][0]["groups"]] == [
        ("a", False),
        ("b", False),
    ]
    hidden = compare_fairness(this, other, min_group_size=31, **kwargs)
    # a is small (30 < 31); b would give it away by subtraction from the 70 rows.
    assert hidden["slices"][0]["groups"] == [
        {"name": "a", "suppressed": True, "metrics": None},
        {"name": "b", "suppressed": True, "metrics": None},
    ]
    assert hidden["rows"] == 70


# Multi-class (LABELS3) paired rows, small enough to count by hand. In g2, run 'this' never
# predicts 'high' for a true 'high' row (the last confusion cell of the last group is empty).
PAIRED3 = {
    "g1": {
        (0, 0, 0): 4,
        (0, 1, 0): 1,
        (1, 1, 1): 3,
        (1, 1, 2): 1,
        (2, 2, 2): 2,
        (2, 0, 1): 1,
    },
    "g2": {(0, 0, 0): 3, (0, 0, 1): 1, (1, 1, 1): 2, (1, 0, 1): 1, (2, 1, 2): 2},
}
PAIRED3_EXPECTED = {
    "g1": {
        "accuracy": (10 / 12, 10 / 12),
        "selection_rate[low]": (5 / 12, 5 / 12),
        "selection_rate[mid]": (5 / 12, 4 / 12),
        "selection_rate[high]": (2 / 12, 3 / 12),
        "tpr": ((4 / 5 + 4 / 4 + 2 / 3) / 3, (5 / 5 + 3 / 4 + 2 / 3) / 3),
    },
    "g2": {
        "accuracy": (6 / 9, 8 / 9),
        "selection_rate[low]": (5 / 9, 3 / 9),
        "selection_rate[mid]": (4 / 9, 4 / 9),
        "selection_rate[high]": (0 / 9, 2 / 9),
        "tpr": ((4 / 4 + 2 / 3 + 0 / 2) / 3, (3 / 4 + 3 / 3 + 2 / 2) / 3),
    },
}


def test_compare_fairness_multiclass_values_and_paired_intervals() -> None:
    """Three labels: per-class selection rates and macro TPR under both runs, exactly; the
    intervals are those of the paired per-resample differences."""
    this, other = _paired_runs(PAIRED3)
    kwargs = {
        "label_names": LABELS3,
        "sensitive": ["group"],
        "metrics": ["accuracy", "selection_rate", "tpr"],
        "min_group_size": 1,
    }
    result = compare_fairness(this, other, n_boot=0, **kwargs)
    groups = _groups(result)
    assert list(groups) == ["g1", "g2"]
    assert [groups[g]["count"] for g in groups] == [12, 9]
    for name, expected in PAIRED3_EXPECTED.items():
        assert list(groups[name]["metrics"]) == list(expected)
        for k, (mine, theirs) in expected.items():
            assert groups[name]["metrics"][k] == _change(mine, theirs), (name, k)

    n_boot, seed = 40, 7
    boots = compare_fairness(this, other, n_boot=n_boot, seed=seed, ci_level=0.9, **kwargs)
    assert boots["ci_level"] == 0.9
    joined = this.merge(other, on="row_id", suffixes=("", "_other"))
    group = (joined["group"] == "g2").to_numpy().astype(np.int64)
    y = joined["label_id"].to_numpy()
    replicates = {}
    for which, column in (("this", "prediction_id"), ("other", "prediction_id_other")):
        codes = (group * 3 + y) * 3 + joined[column].to_numpy()
        boot = _bootstrap(codes, cells=2, num_labels=3, n_boot=n_boot, seed=seed + 1)
        replicates[which] = group_metrics(boot, positive=None, label_names=LABELS3)
    for i, name in enumerate(["g1", "g2"]):
        entry = _groups(boots)[name]["metrics"]
        for k in PAIRED3_EXPECTED[name]:
            assert entry[k]["change"] == groups[name]["metrics"][k]["change"]
            diff = replicates["this"][k][:, i] - replicates["other"][k][:, i]
            lo, hi = np.nanquantile(diff, [0.05, 0.95])
            if np.mean(~np.isnan(diff)) >= 0.9:
                assert entry[k]["ci"] == pytest.approx([lo, hi], abs=EXACT), (name, k)
            else:
                assert entry[k]["ci"] is None, (name, k)
    assert _groups(boots)["g1"]["metrics"]["accuracy"]["ci"] is not None

    with pytest.raises(
        ValueError,
        match=re.escape("positive_label applies to binary tasks only; this task has 3 labels"),
    ):
        compare_fairness(this, other, positive_label="mid", n_boot=0, **kwargs)


def test_compare_fairness_paired_bootstrap_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs are resampled with the same rows (slice k: seed + 1 + k), 1000 times at 95% by
    default, and each interval is that of the per-resample difference this - other."""
    this, other = _paired_runs(PAIRED)
    site = np.where(this["row_id"] % 3 == 0, "north", "south")
    this = this.assign(site=site)
    calls: list[tuple[int, int, int, np.ndarray]] = []
    real = fairness._bootstrap

    def recording(
        codes: np.ndarray, *, cells: int, num_labels: int, n_boot: int, seed: int
    ) -> np.ndarray:
        out = real(codes, cells=cells, num_labels=num_labels, n_boot=n_boot, seed=seed)
        calls.append((seed, n_boot, cells, out))
        return out

    monkeypatch.setattr(fairness, "_bootstrap", recording)
    metrics = ["accuracy", "selection_rate", "tpr"]
    result = compare_fairness(
        this,
        other,
        label_names=BINARY,
        sensitive=["group", "site"],
        metrics=metrics,
        intersections=False,
        min_group_size=1,
    )
    assert result["ci_level"] == 0.95
    assert [s["name"] for s in result["slices"]] == ["group", "site"]
    assert [c[:3] for c in calls] == [(1, 1000, 2), (1, 1000, 2), (2, 1000, 2), (2, 1000, 2)]
    checked = 0
    for index, spec in enumerate(result["slices"]):
        mine, theirs = (
            group_metrics(calls[2 * index + j][3], positive=1, label_names=BINARY) for j in (0, 1)
        )
        for i, entry in enumerate(spec["groups"]):
            for k in metrics:
                diff = mine[k][:, i] - theirs[k][:, i]
                lo, hi = np.quantile(diff, [0.025, 0.975])
                assert entry["metrics"][k]["ci"] == pytest.approx([lo, hi], abs=EXACT)
                assert lo <= entry["metrics"][k]["change"] <= hi
                checked += 1
    assert checked == 12
    # The change in group b's selection rate is -0.5 (10/40 vs 30/40): its interval is negative.
    assert _groups(result)["b"]["metrics"]["selection_rate"]["ci"][1] < 0


def test_compare_fairness_intersections_and_suppressed_groups() -> None:
    """Default intersections add A × B; suppressed groups are listed by name only, in order."""
    cells: dict[tuple[str, ...], int] = {
        ("x", "u"): 60,
        ("x", "v"): 50,
        ("x", "w"): 3,
        ("y", "u"): 55,
        ("y", "v"): 45,
        ("y", "w"): 40,
        ("z", "u"): 50,
        ("z", "v"): 50,
        ("z", "w"): 50,
    }
    frame = _frame_from_cells(cells, ["A", "B"], seed=2)
    this = frame.assign(row_id=np.arange(len(frame)))
    other = this.assign(prediction_id=1 - this["prediction_id"])  # always the opposite
    kwargs = {"label_names": BINARY, "sensitive": ["A", "B"], "metrics": ["accuracy"]}
    result = compare_fairness(this, other, n_boot=0, **kwargs)
    assert result["rows"] == 403
    assert [s["name"] for s in result["slices"]] == ["A", "B", "A × B"]
    assert [[g["name"] for g in s["groups"]] for s in result["slices"][:2]] == [
        ["x", "y", "z"],
        ["u", "v", "w"],
    ]
    cross = result["slices"][2]["groups"]
    shown = {"y & u", "z & v"}  # the x & w cell (3 rows) costs the rest of the table
    assert [g["name"] for g in cross] == [f"{a} & {b}" for a in "xyz" for b in "uvw"]
    for entry in cross:
        name = entry["name"]
        if name in shown:
            continue
        assert entry == {"name": name, "suppressed": True, "metrics": None}
    for entry in cross:
        if entry["name"] not in shown:
            continue
        a, b = entry["name"].split(" & ")
        rows = this[(this["A"] == a) & (this["B"] == b)]
        accuracy = float(np.mean(rows["label_id"] == rows["prediction_id"]))
        assert entry == {
            "name": entry["name"],
            "suppressed": False,
            "count": cells[(a, b)],
            "metrics": {"accuracy": _change(accuracy, 1 - accuracy)},
        }
    assert [[g["count"] for g in s["groups"]] for s in result["slices"][:2]] == [
        [113, 140, 150],
        [165, 145, 93],
    ]

    without = compare_fairness(this, other, n_boot=0, intersections=False, **kwargs)
    assert [s["name"] for s in without["slices"]] == ["A", "B"]


def test_compare_fairness_missing_values_group() -> None:
    """Missing sensitive values form the '(missing)' group, or the one named missing_label."""
    this, other = _paired_runs(PAIRED)
    lost = pd.concat(
        [
            this.index[this["group"] == "a"][:3].to_series(),
            this.index[this["group"] == "b"][:2].to_series(),
        ]
    )
    this.loc[lost.to_numpy(), "group"] = None  # 3 rows of a and 2 of b lose their group
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ["accuracy"], "n_boot": 0}
    result = compare_fairness(this, other, min_group_size=1, **kwargs)
    assert [(g["name"], g["count"]) for g in result["slices"][0]["groups"]] == [
        ("(missing)", 5),
        ("a", 27),
        ("b", 38),
    ]
    custom = compare_fairness(this, other, min_group_size=1, missing_label="unknown", **kwargs)
    assert [(g["name"], g["count"]) for g in custom["slices"][0]["groups"]] == [
        ("a", 27),
        ("b", 38),
        ("unknown", 5),
    ]


def test_compare_fairness_rejects_runs_on_different_rows() -> None:
    """Runs on different rows, duplicated row ids or different true labels are clear errors."""
    this, other = _paired_runs(PAIRED)
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ["accuracy"], "n_boot": 0}
    extra = pd.concat([other, other.iloc[:1].assign(row_id=70)], ignore_index=True)
    for mine, theirs, sizes in ((this, extra, "70 vs 71"), (extra, this, "71 vs 70")):
        message = (
            f"the two runs were tested on different rows ({sizes}, 70 shared); "
            "compare runs of the same data, split and seed"
        )
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            compare_fairness(mine, theirs, **kwargs)
    duplicated = this.assign(row_id=this["row_id"].where(this["row_id"] != 1, 0))
    with pytest.raises(pd.errors.MergeError, match="not a one-to-one merge"):
        compare_fairness(duplicated, other, **kwargs)
    relabelled = other.assign(
        label_id=np.where(other["row_id"] == 3, 1 - other["label_id"], other["label_id"])
    )
    message = "the two runs disagree on the true labels of the same rows"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        compare_fairness(this, relabelled, **kwargs)


def test_compare_fairness_accepts_float_ids_and_empty_runs() -> None:
    """Label and prediction ids stored as floats (a nullable parquet column) count as integers;
    runs with no rows give empty slices rather than an error."""
    this, other = _paired_runs(PAIRED)
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ["accuracy"], "n_boot": 0}
    as_float = {"label_id": float, "prediction_id": float}
    result = compare_fairness(this.astype(as_float), other.astype(as_float), **kwargs)
    assert result == compare_fairness(this, other, **kwargs)
    assert _groups(result)["a"]["metrics"]["accuracy"] == _change(24 / 30, 23 / 30)

    empty = this.iloc[:0]
    assert compare_fairness(empty, other.iloc[:0], **kwargs, min_group_size=0) == {
        "rows": 0,
        "ci_level": None,
        "slices": [{"name": "group", "groups": []}],
    }


def test_compare_fairness_of_a_test_split_below_the_group_minimum_shows_no_group() -> None:
    """With fewer test rows than min_group_size every group is smaller still: as audit_fairness
    does, the comparison publishes no group (it used to show each with its count and metrics)."""
    this, other = _paired_runs(PAIRED)
    small_this = this.iloc[::5]  # 14 rows, both groups in it
    small_other = other[other["row_id"].isin(small_this["row_id"])]
    assert set(small_this["group"]) == {"a", "b"}
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ["accuracy"], "n_boot": 0}
    assert compare_fairness(small_this, small_other, **kwargs) == {
        "rows": 14,
        "ci_level": None,
        "slices": [],
        "note": "the test split has 14 rows, fewer than min_group_size=30: no group-level comparison",
    }
    # at the minimum, groups are judged one by one again (both are below 14 here: suppressed)
    at_minimum = compare_fairness(small_this, small_other, **kwargs, min_group_size=14)
    assert "note" not in at_minimum
    assert [g["suppressed"] for g in at_minimum["slices"][0]["groups"]] == [True, True]
    # no sensitive column: nothing to hide, no note
    assert "note" not in compare_fairness(small_this, small_other, **{**kwargs, "sensitive": []})


def test_gap_and_ci_helpers_leave_undefined_values_out() -> None:
    """_gap is NaN for a row with fewer than two defined values (row by row, not overall);
    _ci gives no interval when either end is undefined."""
    values = np.array([[0.2, np.nan, 0.5], [np.nan, 0.3, np.nan], [np.nan] * 3])
    gap = fairness._gap(values)
    assert gap[0] == pytest.approx(0.3, abs=EXACT)
    assert np.isnan(gap[1]) and np.isnan(gap[2])
    assert fairness._ci(np.array([np.nan, 0.5])) is None
    assert fairness._ci(np.array([0.1, np.nan])) is None
    assert fairness._ci(np.array([[0.1, 0.2], [0.3, 0.4]]), 1) == [0.2, 0.4]
    assert fairness._ci(None, 0) is None


def test_gap_interval_needs_two_defined_groups_per_resample() -> None:
    """Group b has one positive row: in about a third of the resamples it has none, so its TPR
    and the TPR gap are undefined there and the gap gets no interval (accuracy's gap does)."""
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (1, 0, 10, 39)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy", "tpr"], n_boot=200
    )
    gaps = result["slices"][0]["disparities"]["largest_gap"]
    assert gaps["tpr"]["value"] == pytest.approx(1.0 - 0.75, abs=EXACT)
    assert gaps["tpr"]["ci"] is None
    group = (frame["group"] == "b").to_numpy().astype(np.int64)
    codes = (group * 2 + frame["label_id"].to_numpy()) * 2 + frame["prediction_id"].to_numpy()
    boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=200, seed=1)
    accuracy = group_metrics(boot, positive=1, label_names=BINARY)["accuracy"]
    expected = np.quantile(np.abs(accuracy[:, 0] - accuracy[:, 1]), [0.025, 0.975])
    assert gaps["accuracy"]["ci"] == pytest.approx(expected, abs=EXACT)


def test_bootstrap_counts_are_integers() -> None:
    """Resampled confusion counts are integer counts of whole rows."""
    codes = np.array([0, 3, 5, 6, 7, 7])
    boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=5, seed=0)
    assert boot.dtype == np.int64
    assert boot.shape == (5, 2, 2, 2)
    assert (boot.sum((1, 2, 3)) == len(codes)).all()


def test_two_group_disparity_intervals_match_a_direct_computation() -> None:
    """Two groups where the FPR gap, not the TPR gap, sets equalized odds: the parity ratio is
    reported, and every disparity interval is that of the per-resample disparity computed
    directly from the resampled counts."""
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (20, 20, 40, 20)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=200
    )
    disparities = result["slices"][0]["disparities"]
    assert disparities["demographic_parity_ratio"]["value"] == pytest.approx(35 / 60, abs=EXACT)
    assert disparities["demographic_parity_difference"]["value"] == pytest.approx(
        60 / 100 - 35 / 100, abs=EXACT
    )
    assert disparities["equalized_odds_difference"]["value"] == pytest.approx(
        40 / 60 - 5 / 60, abs=EXACT
    )
    group = (frame["group"] == "b").to_numpy().astype(np.int64)
    codes = (group * 2 + frame["label_id"].to_numpy()) * 2 + frame["prediction_id"].to_numpy()
    boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=200, seed=1).astype(float)
    tp, fn, fp, tn = boot[..., 1, 1], boot[..., 1, 0], boot[..., 0, 1], boot[..., 0, 0]
    sr = (tp + fp) / (tp + fn + fp + tn)
    tpr, fpr = tp / (tp + fn), fp / (fp + tn)
    direct = {
        "demographic_parity_difference": np.abs(sr[:, 0] - sr[:, 1]),
        "demographic_parity_ratio": sr.min(1) / sr.max(1),
        "equalized_odds_difference": np.maximum(
            np.abs(tpr[:, 0] - tpr[:, 1]), np.abs(fpr[:, 0] - fpr[:, 1])
        ),
    }
    for name, replicates in direct.items():
        expected = np.quantile(replicates, [0.025, 0.975])
        assert disparities[name]["ci"] == pytest.approx(expected, abs=EXACT), name
    # The FPR gap sets equalized odds in the resamples too: its interval is well above the
    # TPR gap's (0.25).
    assert disparities["equalized_odds_difference"]["ci"][0] > 0.4


def test_multiclass_disparity_intervals_with_more_groups_than_classes() -> None:
    """Four groups, three classes: demographic parity's interval takes the worst class of each
    resample over all groups (the counts of groups and classes are not confused)."""
    cms = {**CMS3, "g4": np.array([[12, 5, 3], [6, 10, 4], [2, 2, 16]])}
    frame = _frame_from_confusion(cms)
    n_boot, seed = 60, 4
    result = audit_fairness(
        frame,
        label_names=LABELS3,
        sensitive=["group"],
        metrics=["accuracy"],
        n_boot=n_boot,
        seed=seed,
    )
    disparities = result["slices"][0]["disparities"]
    group = frame["group"].map({"g1": 0, "g2": 1, "g3": 2, "g4": 3}).to_numpy()
    codes = (group * 3 + frame["label_id"].to_numpy()) * 3 + frame["prediction_id"].to_numpy()
    boot = _bootstrap(codes, cells=4, num_labels=3, n_boot=n_boot, seed=seed + 1)
    sr = boot.sum(-2) / boot.sum((-1, -2))[..., None]  # [n_boot, group, class]
    worst = (sr.max(1) - sr.min(1)).max(-1)
    expected = np.quantile(worst, [0.025, 0.975])
    assert disparities["demographic_parity_difference"]["ci"] == pytest.approx(expected, abs=EXACT)


def test_undefined_metric_values_are_reported_as_none() -> None:
    """A group with no true positives has no TPR, FNR or precision: the value is None (JSON
    null), not NaN, in the audit and in the comparison."""
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (0, 0, 0, 40)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=ALL_METRICS, n_boot=0
    )
    values = _values(_groups(result)["b"])
    assert values == {
        "accuracy": 1.0,
        "selection_rate": 0.0,
        "tpr": None,
        "fpr": 0.0,
        "fnr": None,
        "precision": None,
        "f1": None,
        "count": 40,
    }
    runs = frame.assign(row_id=np.arange(len(frame)))
    compared = compare_fairness(
        runs, runs, label_names=BINARY, sensitive=["group"], metrics=["tpr", "fpr"], n_boot=0
    )
    assert _groups(compared)["b"]["metrics"] == {
        "tpr": {"this": None, "other": None, "change": None, "ci": None},
        "fpr": {"this": 0.0, "other": 0.0, "change": 0.0, "ci": None},
    }


def test_div_and_class_rates_edge_cases() -> None:
    """_div broadcasts and is NaN (without a warning) where the denominator is 0; class_rates
    does not overflow counts given as small integers."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fairness._div(np.array(3.0), np.array([0.0, 2.0, 4.0]))
        assert np.isnan(out[0]) and list(out[1:]) == [1.5, 0.75]
        assert np.isnan(fairness._div(np.array([1.0, 0.0]), np.array([0.0, 0.0]))).all()
        rates = class_rates(np.array([[3, 0], [0, 0]]))
        assert np.isnan(rates["tpr"][1]) and rates["tpr"][0] == 1.0
    cm = np.array([[150, 10], [20, 150]], dtype=np.uint8)
    f1 = class_rates(cm)["f1"]
    assert f1 == pytest.approx([300 / 330, 300 / 330], abs=EXACT)


def test_interval_at_exactly_ninety_percent_defined() -> None:
    """A metric defined in exactly 90% of the resamples still gets an interval."""
    replicates = np.append(np.arange(9.0), np.nan)  # 9 of 10 defined
    assert fairness._interval(replicates, 0.8) == pytest.approx([0.8, 7.2], abs=EXACT)


def test_suppression_with_long_group_names_and_at_the_row_threshold() -> None:
    """Group names longer than a character are matched whole; a split of exactly
    min_group_size rows is audited (and its small groups hidden); no sensitive column means no
    slices."""
    frame = _binary_frame(
        {
            "group_a": (30, 10, 5, 55),  # 100
            "group_b": (20, 20, 10, 30),  # 80
            "group_c": (40, 20, 20, 40),  # 120
            "group_d": (5, 0, 0, 0),  # 5
        }
    )
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=0
    )
    assert [(g["name"], g.get("suppression")) for g in result["slices"][0]["groups"]] == [
        ("group_a", None),
        ("group_b", "complementary"),
        ("group_c", None),
        ("group_d", "small"),
    ]
    runs = frame.assign(row_id=np.arange(len(frame)))
    compared = compare_fairness(
        runs, runs, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=0
    )
    assert [(g["name"], g["suppressed"]) for g in compared["slices"][0]["groups"]] == [
        ("group_a", False),
        ("group_b", True),
        ("group_c", False),
        ("group_d", True),
    ]

    # Exactly 30 rows with min_group_size=30: audited, and both groups (20 and 10) hidden as
    # small.
    exact = _binary_frame({"a": (10, 5, 2, 3), "b": (4, 2, 1, 3)})
    result = audit_fairness(
        exact, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=0
    )
    assert "note" not in result
    assert [(g["name"], g.get("suppression")) for g in result["slices"][0]["groups"]] == [
        ("a", "small"),
        ("b", "small"),
    ]

    alone = audit_fairness(frame, label_names=BINARY, sensitive=[], metrics=["accuracy"], n_boot=0)
    assert alone["slices"] == [] and alone["missing"] == {}
    assert alone["overall"]["accuracy"]["value"] == pytest.approx(
        (85 + 50 + 80 + 5) / 305, abs=EXACT
    )
    assert compare_fairness(
        runs, runs, label_names=BINARY, sensitive=[], metrics=["accuracy"], n_boot=0
    ) == {"rows": 305, "ci_level": None, "slices": []}


def test_complementary_cell_is_on_the_small_cells_line_in_three_columns() -> None:
    """In a 2 × 2 × 2 table the complementary cell is the smallest of those that differ from
    the small cell in one column (its line), not the smallest cell overall."""
    cell_counts = {
        ("a0", "b0", "c0"): 3,  # small
        ("a1", "b0", "c0"): 60,  # one column away
        ("a0", "b1", "c0"): 50,  # one column away, the smallest such
        ("a0", "b0", "c1"): 70,  # one column away
        ("a1", "b1", "c0"): 45,  # two columns away
        ("a1", "b0", "c1"): 40,  # two columns away, the smallest cell but the small one
        ("a0", "b1", "c1"): 55,  # two columns away
        ("a1", "b1", "c1"): 35,  # three columns away
    }
    spec = SliceSpec(("A", "B", "C"))
    hidden = suppress(
        cell_counts=cell_counts, slices=[spec], all_columns=("A", "B", "C"), min_group_size=30
    )
    assert hidden == {
        ("A × B × C", ("a0", "b0", "c0")): "small",
        ("A × B × C", ("a0", "b1", "c0")): "complementary",
    }


def test_parity_ratio_interval_uses_the_positive_class_only() -> None:
    """With high selection rates the ratio for the negative class would be far lower; the
    interval is that of the positive class's min / max selection rate per resample."""
    frame = _binary_frame({"a": (40, 0, 20, 40), "b": (50, 0, 40, 10)})  # sr 0.6 and 0.9
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=100
    )
    ratio = result["slices"][0]["disparities"]["demographic_parity_ratio"]
    assert ratio["value"] == pytest.approx(0.6 / 0.9, abs=EXACT)
    group = (frame["group"] == "b").to_numpy().astype(np.int64)
    codes = (group * 2 + frame["label_id"].to_numpy()) * 2 + frame["prediction_id"].to_numpy()
    boot = _bootstrap(codes, cells=2, num_labels=2, n_boot=100, seed=1)
    sr = boot[..., 1].sum(-1) / boot.sum((-1, -2))  # positive predictions / rows
    expected = np.quantile(sr.min(1) / sr.max(1), [0.025, 0.975])
    assert ratio["ci"] == pytest.approx(expected, abs=EXACT)


def test_multiclass_audit_when_the_last_cell_is_empty() -> None:
    """Three labels, and the last group never predicts the last class for its true rows: the
    confusion counts keep their full 3 × 3 shape."""
    this, _ = _paired_runs(PAIRED3)
    result = audit_fairness(
        this,
        label_names=LABELS3,
        sensitive=["group"],
        metrics=["accuracy", "tpr"],
        min_group_size=1,
        n_boot=0,
    )
    groups = _groups(result)
    assert list(groups) == ["g1", "g2"]
    for name in ("g1", "g2"):
        expected = {k: PAIRED3_EXPECTED[name][k][0] for k in ("accuracy", "tpr")}
        assert _values(groups[name]) == pytest.approx(expected, abs=EXACT), name


def test_largest_gap_names_intersection_groups_and_skips_count_first() -> None:
    """'count' listed first does not stop the gaps; an intersection's highest and lowest groups
    are named 'a & b'."""
    cells = {("x", "u"): 40, ("x", "v"): 35, ("y", "u"): 45, ("y", "v"): 50}
    frame = _frame_from_cells(cells, ["A", "B"], seed=3)
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["A", "B"], metrics=["count", "accuracy"], n_boot=0
    )
    assert [s["name"] for s in result["slices"]] == ["A", "B", "A × B"]
    for spec in result["slices"]:
        accuracy = {g["name"]: g["metrics"]["accuracy"]["value"] for g in spec["groups"]}
        gap = spec["disparities"]["largest_gap"]
        assert list(gap) == ["accuracy"]
        assert gap["accuracy"]["highest"] == max(accuracy, key=accuracy.__getitem__)
        assert gap["accuracy"]["lowest"] == min(accuracy, key=accuracy.__getitem__)
        assert gap["accuracy"]["value"] == pytest.approx(
            max(accuracy.values()) - min(accuracy.values()), abs=EXACT
        )
    assert set(_groups(result, 2)) == {"x & u", "x & v", "y & u", "y & v"}


# --------------------------------------------------------------------------- report fields

TWO_GROUPS = {"a": (30, 10, 5, 55), "b": (20, 20, 10, 50)}  # 100 rows each


def test_report_fields_without_bootstrap_and_with_two_reportable_groups() -> None:
    """n_boot=0: no interval level or method; exactly two reportable groups get disparities."""
    frame = _binary_frame(TWO_GROUPS)
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=0
    )
    assert result["label_names"] == ["neg", "pos"]
    assert result["min_group_size"] == 30
    assert result["n_boot"] == 0
    assert result["ci_level"] is None
    assert result["bootstrap"] is None
    spec = result["slices"][0]
    assert spec["columns"] == ["group"]
    assert spec["reportable_groups"] == 2
    assert spec["disparities_note"] is None
    assert spec["disparities"]["demographic_parity_difference"]["value"] == pytest.approx(
        0.35 - 0.30, abs=EXACT
    )


def test_report_fields_with_bootstrap_and_per_class_precision_interval() -> None:
    """With resamples: the method is named, 'count' has no interval, and each class's
    precision interval is the declared quantiles of its resampled precision."""
    frame = _binary_frame(TWO_GROUPS)
    result = audit_fairness(
        frame,
        label_names=BINARY,
        sensitive=["group"],
        metrics=["count", "accuracy"],
        n_boot=40,
        ci_level=0.9,
    )
    assert result["ci_level"] == 0.9
    assert result["bootstrap"] == "percentile, whole test rows resampled with replacement"
    assert result["overall"]["count"] == {"value": 200, "ci": None}
    codes = frame["label_id"].to_numpy() * 2 + frame["prediction_id"].to_numpy()
    boot = _bootstrap(codes, cells=1, num_labels=2, n_boot=40, seed=0)[:, 0]
    for k, entry in enumerate(result["per_class"]):
        precision = boot[:, k, k] / boot[:, :, k].sum(-1)
        assert set(entry["precision"]) == {"value", "ci"}
        assert entry["precision"]["ci"] == pytest.approx(
            np.quantile(precision, [0.05, 0.95]), abs=EXACT
        )


def test_fewer_than_two_reportable_groups_note_is_exact() -> None:
    frame = _binary_frame({"a": (30, 10, 5, 55), "b": (2, 1, 1, 1)})
    result = audit_fairness(
        frame, label_names=BINARY, sensitive=["group"], metrics=["accuracy"], n_boot=0
    )
    assert (
        result["slices"][0]["disparities_note"]
        == "fewer than two reportable groups: no disparities can be shown"
    )


def test_default_resample_count_is_one_thousand() -> None:
    frame = _binary_frame(TWO_GROUPS)
    result = audit_fairness(frame, label_names=BINARY, sensitive=[], metrics=["accuracy"])
    assert result["n_boot"] == 1000


def test_audit_accepts_float_ids() -> None:
    """Ids stored as floats (a nullable parquet column) give the same audit as integers."""
    frame = _binary_frame(TWO_GROUPS)
    kwargs = {"label_names": BINARY, "sensitive": ["group"], "metrics": ALL_METRICS, "n_boot": 20}
    as_float = frame.astype({"label_id": float, "prediction_id": float})
    assert audit_fairness(as_float, **kwargs) == audit_fairness(frame, **kwargs)


def test_each_slice_draws_with_its_own_seed() -> None:
    """Slice i resamples with seed + 1 + i: the second slice of a seed-0 audit is the first
    slice of a seed-1 audit of that column alone."""
    cells = {("x", "u"): 40, ("x", "v"): 35, ("y", "u"): 45, ("y", "v"): 50}
    frame = _frame_from_cells(cells, ["A", "B"], seed=3)
    kwargs = {"label_names": BINARY, "metrics": ["accuracy", "tpr"], "n_boot": 30}
    both = audit_fairness(frame, sensitive=["A", "B"], intersections=False, seed=0, **kwargs)
    alone = audit_fairness(frame, sensitive=["B"], seed=1, **kwargs)
    assert both["slices"][1] == alone["slices"][0]
    assert both["slices"][1]["groups"][0]["metrics"]["accuracy"]["ci"] is not None


def test_overall_counts_keep_their_shape_when_the_last_cells_are_empty() -> None:
    """No row in the last confusion cells: the overall counts are still K × K."""
    binary = audit_fairness(
        _binary_frame({"a": (0, 10, 0, 30)}),
        label_names=BINARY,
        sensitive=[],
        metrics=["accuracy", "precision"],
        n_boot=0,
    )
    assert binary["overall"]["accuracy"]["value"] == pytest.approx(0.75, abs=EXACT)
    assert binary["overall"]["precision"]["value"] is None
    cm = np.array([[5, 1, 0], [1, 5, 0], [2, 1, 0]])
    multi = audit_fairness(
        _frame_from_confusion({"g": cm}),
        label_names=["x", "y", "z"],
        sensitive=[],
        metrics=["accuracy"],
        n_boot=0,
    )
    assert multi["overall"]["accuracy"]["value"] == pytest.approx(10 / 15, abs=EXACT)
    assert [c["support"] for c in multi["per_class"]] == [6, 6, 3]


def test_suppression_threshold_counts_each_row_once() -> None:
    """A group of min_group_size rows is shown; one of fewer is hidden with a complementary
    group (the smallest other one)."""
    spec = SliceSpec(("G",))
    kwargs = {"slices": [spec], "all_columns": ("G",), "min_group_size": 30}
    assert suppress(cell_counts={("a",): 30, ("b",): 50, ("c",): 60}, **kwargs) == {}
    assert suppress(cell_counts={("a",): 20, ("b",): 50, ("c",): 60}, **kwargs) == {
        ("G", ("a",)): "small",
        ("G", ("b",)): "complementary",
    }


def test_complementary_group_from_another_slice_when_the_slice_is_exhausted() -> None:
    """A's only other group is hidden and a0 is still the overall minus a1's published cells:
    the next group hidden comes from another slice."""
    cell_counts = {("a0", "b0"): 10, ("a0", "b1"): 10, ("a1", "b0"): 40, ("a1", "b1"): 50}
    slices = [SliceSpec(("A",)), SliceSpec(("B",)), SliceSpec(("A", "B"))]
    hidden = suppress(
        cell_counts=cell_counts, slices=slices, all_columns=("A", "B"), min_group_size=30
    )
    assert hidden == {
        ("A", ("a0",)): "small",
        ("A × B", ("a0", "b0")): "small",
        ("A × B", ("a0", "b1")): "small",
        ("A", ("a1",)): "complementary",
        ("A × B", ("a1", "b0")): "complementary",
        ("A × B", ("a1", "b1")): "complementary",
    }
