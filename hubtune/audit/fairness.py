"""Group fairness metrics with Fairlearn, bootstrap intervals and small-cell suppression.

Definitions (the report's glossary repeats them in plain words):

* Binary tasks: one label is *positive* (the policy's ``positive_label``, default the second
  of the recipe's labels). selection rate = P(pred = pos); TPR = P(pred = pos | true = pos);
  FPR = P(pred = pos | true = neg); FNR = 1 - TPR; precision = P(true = pos | pred = pos);
  F1 = 2·TP / (2·TP + FP + FN). These match Fairlearn's and scikit-learn's with ``pos_label``.
* Multi-class tasks: each class against the rest. TPR, FPR, FNR, precision and F1 are the
  unweighted mean over classes (macro average); a class whose rate is undefined in a group
  (no true rows for TPR/FNR, never predicted for precision) is left out of that group's
  mean, not counted as 0 as scikit-learn's ``zero_division=0`` does; the
  selection rate is reported per class (``selection_rate[label]``). Demographic parity and
  equalized odds take the worst class.
* Disparities are computed over *reportable* groups only (suppressed groups would leak
  through them): demographic parity difference = max - min selection rate; ratio = min / max;
  equalized odds difference = max(TPR gap, FPR gap); largest gap per metric = max - min.

Point estimates come from Fairlearn's ``MetricFrame``. Confidence intervals are percentile
bootstrap intervals over test rows, resampled exactly as ``MetricFrame(n_boot=...)`` does
(whole rows with replacement, every metric recomputed per resample), but vectorised over
confusion-matrix counts: Fairlearn's own loop costs about 45 ms per resample here, so 1,000
resamples of one slice would take 45 s; this takes well under a second. A test checks both
give the same intervals from the same resampled rows (the two draw rows from different
random streams, so with their own draws they differ by Monte Carlo error).

Suppression: a group with fewer than ``min_group_size`` test rows is not shown. Because the
overall numbers and the other groups are shown, one hidden group could be recovered by
subtraction, so further groups are hidden until no hidden group's counts are a linear
combination of what is published (checked exactly, across all slices and intersections).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["SliceSpec", "audit_fairness", "class_rates", "group_metrics", "suppress"]

_RATES = ("selection_rate", "tpr", "fpr", "fnr", "precision", "f1")
_BOOT_CHUNK = 100


@dataclass(frozen=True)
class SliceSpec:
    """A way of splitting the test rows into groups: one sensitive column or several."""

    columns: tuple[str, ...]

    @property
    def name(self) -> str:
        return " × ".join(self.columns)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest rates per class from confusion counts ``cm[..., true, pred]``.

    Returns arrays of shape ``cm.shape[:-2] + (K,)``; NaN where a rate is undefined (no rows
    in its denominator).
    """
    cm = np.asarray(cm, dtype=float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    actual = cm.sum(-1)
    predicted = cm.sum(-2)
    n = cm.sum((-1, -2))[..., None]
    fn = actual - tp
    fp = predicted - tp
    tn = n - tp - fn - fp
    return {
        "selection_rate": _div(predicted, n),
        "tpr": _div(tp, tp + fn),
        "fpr": _div(fp, fp + tn),
        "fnr": _div(fn, tp + fn),
        "precision": _div(tp, tp + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def group_metrics(
    cm: np.ndarray, *, positive: int | None, label_names: list[str]
) -> dict[str, np.ndarray]:
    """Every reported metric from confusion counts ``cm[..., true, pred]`` (see module doc)."""
    cm = np.asarray(cm, dtype=float)
    n = cm.sum((-1, -2))
    out = {"count": n, "accuracy": _div(np.trace(cm, axis1=-2, axis2=-1), n)}
    rates = class_rates(cm)
    if positive is not None:
        out.update({name: rates[name][..., positive] for name in _RATES})
        return out
    for name in _RATES[1:]:
        out[name] = _nanmean(rates[name], axis=-1)
    for k, label in enumerate(label_names):
        out[f"selection_rate[{label}]"] = rates["selection_rate"][..., k]
    return out


def _expand(metrics: list[str], label_names: list[str], positive: int | None) -> list[str]:
    """Policy metric names -> reported metric keys (selection_rate is per class if multi-class)."""
    out: list[str] = []
    for m in metrics:
        if m == "selection_rate" and positive is None:
            out += [f"selection_rate[{label}]" for label in label_names]
        else:
            out.append(m)
    return out


def _gap(values: np.ndarray) -> np.ndarray:
    """max - min over the last axis, NaN-aware (NaN if fewer than two defined values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        defined = np.sum(~np.isnan(values), axis=-1)
        gap = np.nanmax(values, axis=-1) - np.nanmin(values, axis=-1)
    return np.where(defined >= 2, gap, np.nan)


def _disparities(cm: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """Demographic parity and equalized odds over groups (axis -3 of ``cm[..., G, K, K]``)."""
    rates = class_rates(cm)  # [..., G, K]
    classes = [positive] if positive is not None else list(range(cm.shape[-1]))
    sr = rates["selection_rate"][..., classes]
    tpr = rates["tpr"][..., classes]
    fpr = rates["fpr"][..., classes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dp_gap = _gap(np.moveaxis(sr, -1, -2))  # [..., C]
        ratio = _div(np.nanmin(sr, axis=-2), np.nanmax(sr, axis=-2))
        eo = np.fmax(_gap(np.moveaxis(tpr, -1, -2)), _gap(np.moveaxis(fpr, -1, -2)))
        return {
            "demographic_parity_difference": np.nanmax(dp_gap, axis=-1),
            "demographic_parity_ratio": np.where(
                sr.shape[-2] >= 2, np.nanmin(ratio, axis=-1), np.nan
            ),
            "equalized_odds_difference": np.nanmax(eo, axis=-1),
        }


# --------------------------------------------------------------------------- suppression


def suppress(
    *,
    cell_counts: dict[tuple[str, ...], int],
    slices: list[SliceSpec],
    all_columns: tuple[str, ...],
    min_group_size: int,
) -> dict[tuple[str, tuple[str, ...]], str]:
    """Decide which groups to hide so that none can be recovered from what is published.

    Args:
        cell_counts: Rows per finest cell (a value for every column in ``all_columns``).
        slices: The slices that will be published (besides the overall row).
        all_columns: The columns that define the finest cells.
        min_group_size: Groups with fewer rows are hidden ("primary" suppression).

    Returns:
        ``{(slice name, group key): reason}`` for every hidden group, reason ``"small"`` or
        ``"complementary"`` (hidden so that a small group cannot be derived by subtraction).
    """
    cells = sorted(cell_counts)
    index = {cell: i for i, cell in enumerate(cells)}

    def members(spec: SliceSpec, key: tuple[str, ...]) -> np.ndarray:
        positions = [all_columns.index(c) for c in spec.columns]
        v = np.zeros(len(cells))
        for cell in cells:
            if tuple(cell[p] for p in positions) == key:
                v[index[cell]] = 1.0
        return v

    groups: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, int]] = {}
    for spec in slices:
        positions = [all_columns.index(c) for c in spec.columns]
        keys = sorted({tuple(cell[p] for p in positions) for cell in cells})
        for key in keys:
            v = members(spec, key)
            groups[(spec.name, key)] = (v, int(v @ np.array([cell_counts[c] for c in cells])))
    hidden = {g: "small" for g, (_, n) in groups.items() if n < min_group_size}
    overall = np.ones(len(cells))
    while True:
        published = [overall] + [v for g, (v, _) in groups.items() if g not in hidden]
        matrix = np.stack(published)
        recoverable = [g for g in hidden if _in_row_space(matrix, groups[g][0])]
        if not recoverable:
            return hidden
        target = recoverable[0]
        candidates = [g for g in groups if g[0] == target[0] and g not in hidden]
        # Prefer a group that differs from the recoverable one in a single column (its
        # "line" in the intersection table), then the smallest, as statistical agencies do.
        near = [
            g for g in candidates if sum(a != b for a, b in zip(g[1], target[1], strict=True)) == 1
        ]
        pool = near or candidates
        if not pool:  # nothing left to hide in this slice: hide this slice's groups elsewhere
            pool = [g for g in groups if g not in hidden]
        if not pool:
            return hidden
        choice = min(pool, key=lambda g: (groups[g][1], g))
        hidden[choice] = "complementary"


def _in_row_space(matrix: np.ndarray, vector: np.ndarray) -> bool:
    solution, *_ = np.linalg.lstsq(matrix.T, vector, rcond=None)
    return bool(np.allclose(matrix.T @ solution, vector, atol=1e-8))


# --------------------------------------------------------------------------- the audit


def _fairlearn_point_estimates(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    features: pd.DataFrame,
    *,
    num_labels: int,
    positive: int | None,
    label_names: list[str],
) -> tuple[dict[tuple[str, ...], dict[str, float]], dict[str, float]]:
    """Per-group and overall metrics through Fairlearn's MetricFrame."""
    from fairlearn.metrics import MetricFrame

    def confusion(t: Any, p: Any) -> np.ndarray:
        return np.bincount(
            np.asarray(t) * num_labels + np.asarray(p), minlength=num_labels * num_labels
        ).reshape(num_labels, num_labels)

    names = list(
        group_metrics(
            np.zeros((num_labels, num_labels)), positive=positive, label_names=label_names
        )
    )

    def metric(name: str) -> Any:
        def compute(t: Any, p: Any) -> float:
            return float(
                group_metrics(confusion(t, p), positive=positive, label_names=label_names)[name]
            )

        compute.__name__ = name
        return compute

    frame = MetricFrame(
        metrics={name: metric(name) for name in names},
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=features,
    )
    by_group = {}
    for key, row in frame.by_group.iterrows():
        key_tuple = key if isinstance(key, tuple) else (key,)
        by_group[tuple(str(k) for k in key_tuple)] = {k: float(v) for k, v in row.items()}
    return by_group, {k: float(v) for k, v in frame.overall.items()}


def _resampled_rows(n: int, *, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of the bootstrap resamples, ``[chunk, n]`` at a time (``_BOOT_CHUNK`` rows).

    Each resample draws ``n`` of the ``n`` test rows uniformly with replacement.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BOOT_CHUNK):
        yield rng.integers(0, n, size=(min(_BOOT_CHUNK, n_boot - start), n))


def _bootstrap(
    codes: np.ndarray, *, cells: int, num_labels: int, n_boot: int, seed: int
) -> np.ndarray:
    """Confusion counts per bootstrap resample: ``[n_boot, cells, K, K]``.

    Rows are resampled with replacement from all test rows (group sizes vary between
    resamples), as Fairlearn's MetricFrame does.
    """
    n = len(codes)
    per = cells * num_labels * num_labels
    out = np.empty((n_boot, per), dtype=np.int64)
    start = 0
    for idx in _resampled_rows(n, n_boot=n_boot, seed=seed):
        chunk = len(idx)
        flat = codes[idx] + (np.arange(chunk) * per)[:, None]
        out[start : start + chunk] = np.bincount(flat.ravel(), minlength=chunk * per).reshape(
            chunk, per
        )
        start += chunk
    return out.reshape(n_boot, cells, num_labels, num_labels)


def _interval(replicates: np.ndarray, ci_level: float) -> np.ndarray:
    """Percentile interval over axis 0: ``[2, ...]``, NaN where too few resamples are defined."""
    alpha = (1 - ci_level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bounds = np.nanquantile(replicates, [alpha, 1 - alpha], axis=0)
        defined = np.mean(~np.isnan(replicates), axis=0)
    # A metric undefined in many resamples (e.g. TPR of a group with 1 positive) has no
    # meaningful interval.
    return np.where(defined >= 0.9, bounds, np.nan)


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _ci(bounds: np.ndarray | None, *index: Any) -> list[float] | None:
    if bounds is None:
        return None
    lo, hi = bounds[(0, *index)], bounds[(1, *index)]
    if np.isnan(lo) or np.isnan(hi):
        return None
    return [float(lo), float(hi)]


@dataclass
class _Groups:
    features: pd.DataFrame  # one column per sensitive column, missing values named
    slices: list[SliceSpec]
    hidden: dict[tuple[str, tuple[str, ...]], str]  # (slice, group) -> suppression reason
    missing: dict[str, int]  # rows with a missing value, per column


def _group_features(
    frame: pd.DataFrame,
    *,
    sensitive: list[str],
    missing_label: str,
    intersections: bool,
    min_group_size: int,
) -> _Groups:
    """The group of every row in every slice, and which groups must stay hidden."""
    features = pd.DataFrame(index=frame.index)
    missing: dict[str, int] = {}
    for column in sensitive:
        if column not in frame.columns:
            raise ValueError(
                f"sensitive column {column!r} is not in the predictions (it has {list(frame.columns)}); "
                "declare it under data.columns.sensitive in the recipe"
            )
        values = frame[column]
        is_missing = values.isna() | (values.astype(str).str.strip() == "")
        missing[column] = int(is_missing.sum())
        features[column] = np.where(is_missing, missing_label, values.astype(str))
    slices = [SliceSpec((c,)) for c in sensitive]
    if intersections and len(sensitive) > 1:
        slices.append(SliceSpec(tuple(sensitive)))
    cell_counts = {
        (k if isinstance(k, tuple) else (k,)): int(v)
        for k, v in (
            features.groupby(list(sensitive)).size().to_dict() if sensitive else {}
        ).items()
    }
    hidden = (
        suppress(
            cell_counts=cell_counts,
            slices=slices,
            all_columns=tuple(sensitive),
            min_group_size=min_group_size,
        )
        if sensitive and len(frame) >= min_group_size
        else {}
    )
    return _Groups(features=features, slices=slices, hidden=hidden, missing=missing)


def _positive_index(label_names: list[str], positive_label: str | None) -> int | None:
    """The positive class's id for a binary task (default the second label); None if multi-class."""
    if len(label_names) != 2:
        if positive_label:
            raise ValueError(
                f"positive_label applies to binary tasks only; this task has {len(label_names)} "
                f"labels {label_names}: remove positive_label from the audit policy"
            )
        return None
    if not positive_label:
        return 1
    if positive_label not in label_names:
        raise ValueError(
            f"positive_label {positive_label!r} is not one of the run's labels {label_names}; "
            "set the audit policy's positive_label to one of them, or remove it to use "
            f"{label_names[1]!r}"
        )
    return label_names.index(positive_label)


def audit_fairness(
    predictions: pd.DataFrame,
    *,
    label_names: list[str],
    sensitive: list[str],
    metrics: list[str],
    positive_label: str | None = None,
    intersections: bool = True,
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_group_size: int = 30,
    missing_label: str = "(missing)",
) -> dict[str, Any]:
    """Per-group metrics, disparities and their intervals for a predictions frame.

    Long on purpose: the statistics read top to bottom as the audit describes them (overall, per slice, per class, suppression); splitting them would scatter one seeded bootstrap across functions.

    Args:
        predictions: One row per test example with ``label_id``, ``prediction_id`` and the
            sensitive columns (hubtune's ``predictions.parquet``).
        label_names: Class names, in id order.
        sensitive: Sensitive columns to audit.
        metrics: Metric names from the policy.
        positive_label: Binary tasks: the positive class (default ``label_names[1]``).
        intersections: Also audit the combination of all sensitive columns.
        n_boot: Bootstrap resamples (0: no intervals).
        ci_level: Interval coverage, e.g. 0.95.
        seed: Bootstrap seed.
        min_group_size: Smaller groups are suppressed.
        missing_label: Group name for missing sensitive values.

    Returns:
        The ``fairness`` part of audit.json.
    """
    num_labels = len(label_names)
    positive = _positive_index(label_names, positive_label)
    y_true = predictions["label_id"].to_numpy(dtype=np.int64)
    y_pred = predictions["prediction_id"].to_numpy(dtype=np.int64)
    n = len(y_true)
    keys = _expand(metrics, label_names, positive)
    groups = _group_features(
        predictions,
        sensitive=sensitive,
        missing_label=missing_label,
        intersections=intersections,
        min_group_size=min_group_size,
    )
    features, slices, hidden, missing_counts = (
        groups.features,
        groups.slices,
        groups.hidden,
        groups.missing,
    )
    too_small = n < min_group_size

    result: dict[str, Any] = {
        "task": "binary" if positive is not None else "multiclass",
        "positive_label": label_names[positive] if positive is not None else None,
        "label_names": label_names,
        "metrics": keys,
        "rows": n,
        "missing": missing_counts,
        "min_group_size": min_group_size,
        "ci_level": ci_level if n_boot else None,
        "n_boot": n_boot,
        "bootstrap": "percentile, whole test rows resampled with replacement" if n_boot else None,
    }
    # Overall, with per-class slices (what quality-control users read first).
    overall_cm = np.bincount(y_true * num_labels + y_pred, minlength=num_labels**2).reshape(
        num_labels, num_labels
    )
    boot_overall = (
        _bootstrap(
            y_true * num_labels + y_pred, cells=1, num_labels=num_labels, n_boot=n_boot, seed=seed
        )[:, 0]
        if n_boot
        else None
    )
    overall_values = group_metrics(overall_cm, positive=positive, label_names=label_names)
    overall_bounds = (
        {
            k: _interval(v, ci_level)
            for k, v in group_metrics(
                boot_overall, positive=positive, label_names=label_names
            ).items()
        }
        if boot_overall is not None
        else None
    )
    result["overall"] = {
        k: {
            "value": _num(overall_values[k]),
            "ci": _ci(overall_bounds[k]) if overall_bounds and k != "count" else None,
        }
        for k in keys
    }
    rates = class_rates(overall_cm)
    boot_rates = class_rates(boot_overall) if boot_overall is not None else None
    result["per_class"] = [
        {
            "label": label,
            "support": int(overall_cm[k].sum()),
            "recall": {
                "value": _num(rates["tpr"][k]),
                "ci": _ci(_interval(boot_rates["tpr"], ci_level), k) if boot_rates else None,
            },
            "precision": {
                "value": _num(rates["precision"][k]),
                "ci": _ci(_interval(boot_rates["precision"], ci_level), k) if boot_rates else None,
            },
        }
        for k, label in enumerate(label_names)
    ]
    result["slices"] = []
    if too_small and sensitive:
        result["note"] = (
            f"the test split has {n} rows, fewer than min_group_size={min_group_size}: no group-level results"
        )
        return result
    for slice_index, spec in enumerate(slices):
        result["slices"].append(
            _audit_slice(
                spec,
                features=features,
                y_true=y_true,
                y_pred=y_pred,
                label_names=label_names,
                positive=positive,
                keys=keys,
                hidden=hidden,
                n_boot=n_boot,
                ci_level=ci_level,
                seed=seed + 1 + slice_index,
            )
        )
    return result


def _audit_slice(
    spec: SliceSpec,
    *,
    features: pd.DataFrame,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    label_names: list[str],
    positive: int | None,
    keys: list[str],
    hidden: dict[tuple[str, tuple[str, ...]], str],
    n_boot: int,
    ci_level: float,
    seed: int,
) -> dict[str, Any]:
    """One slice's groups with intervals, suppression and disparities.

    Long on purpose: one slice's groups, their intervals, suppression and disparities share
    the slice's resamples; kept in one place so they use the same draws.
    """
    num_labels = len(label_names)
    columns = list(spec.columns)
    group_keys = [tuple(str(v) for v in row) for row in features[columns].itertuples(index=False)]
    ordered = sorted(set(group_keys))
    position = {key: i for i, key in enumerate(ordered)}
    group_index = np.array([position[k] for k in group_keys], dtype=np.int64)
    point, _ = _fairlearn_point_estimates(
        y_true,
        y_pred,
        features[columns],
        num_labels=num_labels,
        positive=positive,
        label_names=label_names,
    )
    shown = [i for i, key in enumerate(ordered) if (spec.name, key) not in hidden]
    codes = (group_index * num_labels + y_true) * num_labels + y_pred
    cm = np.bincount(codes, minlength=len(ordered) * num_labels**2).reshape(
        len(ordered), num_labels, num_labels
    )
    boot = (
        _bootstrap(codes, cells=len(ordered), num_labels=num_labels, n_boot=n_boot, seed=seed)
        if n_boot
        else None
    )
    boot_metrics = (
        group_metrics(boot, positive=positive, label_names=label_names)
        if boot is not None
        else None
    )
    bounds = {k: _interval(v, ci_level) for k, v in boot_metrics.items()} if boot_metrics else None
    groups = []
    for i, key in enumerate(ordered):
        reason = hidden.get((spec.name, key))
        entry: dict[str, Any] = {
            "group": dict(zip(columns, key, strict=True)),
            "name": " & ".join(key),
            "suppressed": reason is not None,
        }
        if reason is not None:
            entry["suppression"] = reason
            entry["count"] = None
            entry["metrics"] = None
        else:
            entry["count"] = int(cm[i].sum())
            entry["metrics"] = {
                k: {
                    "value": _num(point[key][k]),
                    "ci": _ci(bounds[k], i) if bounds and k != "count" else None,
                }
                for k in keys
            }
        groups.append(entry)

    disparities: dict[str, Any] = {}
    if len(shown) >= 2:
        values = _disparities(cm[shown], positive)
        boot_values = _disparities(boot[:, shown], positive) if boot is not None else None
        for name, value in values.items():
            disparities[name] = {
                "value": _num(value),
                "ci": _ci(_interval(boot_values[name], ci_level)) if boot_values else None,
            }
        point_matrix = np.array([[point[ordered[i]][k] for i in shown] for k in keys], dtype=float)
        gaps = {}
        for row, k in enumerate(keys):
            if k == "count" or np.sum(~np.isnan(point_matrix[row])) < 2:
                continue
            hi = shown[int(np.nanargmax(point_matrix[row]))]
            lo = shown[int(np.nanargmin(point_matrix[row]))]
            gaps[k] = {
                "value": _num(_gap(point_matrix[row])),
                "ci": _ci(_interval(_gap(boot_metrics[k][:, shown]), ci_level))
                if boot_metrics
                else None,
                "highest": " & ".join(ordered[hi]),
                "lowest": " & ".join(ordered[lo]),
            }
        disparities["largest_gap"] = gaps
    return {
        "name": spec.name,
        "columns": columns,
        "groups": groups,
        "reportable_groups": len(shown),
        "suppressed_groups": len(ordered) - len(shown),
        "disparities": disparities,
        "disparities_note": None
        if len(shown) >= 2
        else "fewer than two reportable groups: no disparities can be shown",
    }


def compare_fairness(
    this: pd.DataFrame,
    other: pd.DataFrame,
    *,
    label_names: list[str],
    sensitive: list[str],
    metrics: list[str],
    positive_label: str | None = None,
    intersections: bool = True,
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_group_size: int = 30,
    missing_label: str = "(missing)",
) -> dict[str, Any]:
    """Each group's metric change between two runs' predictions on the same test rows.

    Long on purpose: the paired bootstrap of both runs must use the same resampled rows for every group and metric, which this one loop guarantees.

    The interval of each change is a *paired* bootstrap: the same resampled rows are scored
    under both models, so the noise of the test set cancels out of the difference.

    Returns:
        ``{"rows": n, "slices": [{"name", "groups": [{"name", "metrics": {m: {this, other,
        change, ci}}}]}]}``; suppressed groups are listed by name only.
    """
    joined = this.merge(other, on="row_id", suffixes=("", "_other"), validate="one_to_one")
    if len(joined) != len(this) or len(joined) != len(other):
        raise ValueError(
            f"the two runs were tested on different rows ({len(this)} vs {len(other)}, {len(joined)} shared); "
            "compare runs of the same data, split and seed"
        )
    if not (joined["label_id"] == joined["label_id_other"]).all():
        raise ValueError("the two runs disagree on the true labels of the same rows")
    num_labels = len(label_names)
    positive = _positive_index(label_names, positive_label)
    keys = [k for k in _expand(metrics, label_names, positive) if k != "count"]
    grouping = _group_features(
        joined,
        sensitive=sensitive,
        missing_label=missing_label,
        intersections=intersections,
        min_group_size=min_group_size,
    )
    features, slices, hidden = grouping.features, grouping.slices, grouping.hidden
    y_true = joined["label_id"].to_numpy(dtype=np.int64)
    preds = {
        "this": joined["prediction_id"].to_numpy(dtype=np.int64),
        "other": joined["prediction_id_other"].to_numpy(dtype=np.int64),
    }
    out: dict[str, Any] = {
        "rows": len(joined),
        "ci_level": ci_level if n_boot else None,
        "slices": [],
    }
    if sensitive and len(joined) < min_group_size:
        # As in audit_fairness: with fewer test rows than the smallest group allowed, every
        # group is smaller still, and its changes would describe a handful of people.
        out["note"] = (
            f"the test split has {len(joined)} rows, fewer than min_group_size={min_group_size}: "
            "no group-level comparison"
        )
        return out
    for slice_index, spec in enumerate(slices):
        columns = list(spec.columns)
        group_keys = [
            tuple(str(v) for v in row) for row in features[columns].itertuples(index=False)
        ]
        ordered = sorted(set(group_keys))
        position = {key: i for i, key in enumerate(ordered)}
        group_index = np.array([position[k] for k in group_keys], dtype=np.int64)
        values, boots = {}, {}
        for which, y_pred in preds.items():
            codes = (group_index * num_labels + y_true) * num_labels + y_pred
            cm = np.bincount(codes, minlength=len(ordered) * num_labels**2).reshape(
                len(ordered), num_labels, num_labels
            )
            values[which] = group_metrics(cm, positive=positive, label_names=label_names)
            if n_boot:  # same seed, same rows: a paired bootstrap
                boot = _bootstrap(
                    codes,
                    cells=len(ordered),
                    num_labels=num_labels,
                    n_boot=n_boot,
                    seed=seed + 1 + slice_index,
                )
                boots[which] = group_metrics(boot, positive=positive, label_names=label_names)
        groups = []
        for i, key in enumerate(ordered):
            if (spec.name, key) in hidden:
                groups.append({"name": " & ".join(key), "suppressed": True, "metrics": None})
                continue
            entry = {}
            for k in keys:
                bounds = (
                    _interval(boots["this"][k] - boots["other"][k], ci_level) if boots else None
                )
                entry[k] = {
                    "this": _num(values["this"][k][i]),
                    "other": _num(values["other"][k][i]),
                    "change": _num(values["this"][k][i] - values["other"][k][i]),
                    "ci": _ci(bounds, i),
                }
            groups.append(
                {
                    "name": " & ".join(key),
                    "suppressed": False,
                    "count": int(np.sum(group_index == i)),
                    "metrics": entry,
                }
            )
        out["slices"].append({"name": spec.name, "groups": groups})
    return out
