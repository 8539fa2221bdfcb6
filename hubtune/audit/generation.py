"""Per-group quality of a language model: token loss, perplexity and exact match by group.

A language model serves a group worse when its text is less probable under the model: a higher
loss per token, a higher perplexity. For each sensitive column (and their intersection) this
reports every group's figures on the test split with percentile-bootstrap intervals (whole
test examples resampled within the split), and the largest gap between reportable groups with
its interval. Groups smaller than ``min_group_size`` are hidden, with the same complementary
suppression as the classifier audit (:func:`hubtune.audit.fairness.suppress`), so no hidden
group can be recovered from what is shown.

The result has the shape of :func:`hubtune.audit.fairness.audit_fairness`'s (``overall``,
``slices`` with ``groups`` and ``disparities.largest_gap``), so the verdict judges a policy's
``max_metric_gap`` / ``min_group_metric`` on these metrics the same way, and the reports show
them in the same tables.

Metrics (per group):

- ``loss``: the mean token loss (nats) over all labelled tokens of the group's examples;
- ``perplexity``: ``exp(loss)``;
- ``sequence_loss``: the mean of the examples' own mean token losses;
- ``exact_match``: the share of examples whose labelled tokens are all the greedy next token;
- ``count``: examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hubtune.audit.fairness import _ci, _group_features, _interval, _num

__all__ = ["GENERATION_METRICS", "audit_generation_groups", "extraction_rates", "wilson"]

GENERATION_METRICS = ("loss", "perplexity", "sequence_loss", "exact_match", "count")


def _figures(
    loss_sum: np.ndarray, tokens: np.ndarray, seq: np.ndarray, exact: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics from per-cell sums (the last axis is the cell); arrays of any leading shape."""
    with np.errstate(divide="ignore", invalid="ignore"):
        count = exact[..., 1]
        token_loss = np.where(tokens > 0, loss_sum / np.maximum(tokens, 1), np.nan)
        return {
            "loss": token_loss,
            "perplexity": np.exp(np.minimum(token_loss, 700.0)),
            "sequence_loss": np.where(count > 0, seq / np.maximum(count, 1), np.nan),
            "exact_match": np.where(count > 0, exact[..., 0] / np.maximum(count, 1), np.nan),
            "count": count.astype(float),
        }


def _sums(
    weights: np.ndarray, cells: np.ndarray, n_cells: int, rows: dict[str, np.ndarray]
) -> tuple:
    """Per-cell sums of each row quantity, for every resample (``weights``: [R, n] counts)."""
    onehot = np.zeros((len(cells), n_cells))
    onehot[np.arange(len(cells)), cells] = 1.0
    w = weights[..., :, None] * onehot  # [R, n, cells]
    loss_sum = np.einsum("rnc,n->rc", w, rows["loss"] * rows["tokens"])
    tokens = np.einsum("rnc,n->rc", w, rows["tokens"])
    seq = np.einsum("rnc,n->rc", w, rows["loss"])
    exact = np.stack(
        [np.einsum("rnc,n->rc", w, rows["exact"]), np.einsum("rnc,n->rc", w, np.ones(len(cells)))],
        axis=-1,
    )
    return loss_sum, tokens, seq, exact


def _estimate(
    cells: np.ndarray, n_cells: int, rows: dict[str, np.ndarray], *, n_boot: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Point figures per cell, and their bootstrap replicates ([n_boot, cells]) or None."""
    n = len(cells)
    point = _figures(*_sums(np.ones((1, n)), cells, n_cells, rows))
    point = {k: v[0] for k, v in point.items()}
    if not n_boot:
        return point, None
    rng = np.random.default_rng([seed, 0x6E4])
    replicates: dict[str, list[np.ndarray]] = {k: [] for k in GENERATION_METRICS}
    for start in range(0, n_boot, 100):  # chunks bound the [R, n, cells] weights in memory
        size = min(100, n_boot - start)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(size)])
        for k, v in _figures(*_sums(weights.astype(float), cells, n_cells, rows)).items():
            replicates[k].append(v)
    return point, {k: np.concatenate(v) for k, v in replicates.items()}


def audit_generation_groups(
    predictions: pd.DataFrame,
    *,
    sensitive: list[str],
    intersections: bool = True,
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_group_size: int = 30,
    missing_label: str = "(missing)",
) -> dict[str, Any]:
    """Per-group loss, perplexity and exact match of a language model's test examples.

    Args:
        predictions: hubtune's ``predictions.parquet`` of a text-generation run (``loss``,
            ``tokens``, ``exact_match`` and the sensitive columns).
        sensitive: Sensitive columns to audit.
        intersections: Also audit the combination of all sensitive columns.
        n_boot: Bootstrap resamples (0: no intervals).
        ci_level: Interval coverage.
        seed: Bootstrap seed.
        min_group_size: Smaller groups are hidden.
        missing_label: Group name for missing sensitive values.

    Returns:
        The ``fairness`` part of audit.json, with ``task: generation``.
    """
    rows = {
        "loss": predictions["loss"].to_numpy(dtype=float),
        "tokens": predictions["tokens"].to_numpy(dtype=float),
        "exact": predictions["exact_match"].to_numpy(dtype=float),
    }
    n = len(predictions)
    groups = _group_features(
        predictions,
        sensitive=sensitive,
        missing_label=missing_label,
        intersections=intersections,
        min_group_size=min_group_size,
    )
    keys = list(GENERATION_METRICS)
    result: dict[str, Any] = {
        "task": "generation",
        "positive_label": None,
        "label_names": [],
        "metrics": keys,
        "rows": n,
        "missing": groups.missing,
        "min_group_size": min_group_size,
        "ci_level": ci_level if n_boot else None,
        "n_boot": n_boot,
        "bootstrap": "percentile, whole test examples resampled with replacement"
        if n_boot
        else None,
        "per_class": [],
    }
    point, boot = _estimate(np.zeros(n, dtype=np.int64), 1, rows, n_boot=n_boot, seed=seed)
    result["overall"] = {
        k: {
            "value": _num(point[k][0]),
            "ci": _ci(_interval(boot[k], ci_level), 0) if boot and k != "count" else None,
        }
        for k in keys
    }
    result["slices"] = []
    if n < min_group_size and sensitive:
        result["note"] = (
            f"the test split has {n} rows, fewer than min_group_size={min_group_size}: no group-level results"
        )
        return result
    for index, spec in enumerate(groups.slices):
        columns = list(spec.columns)
        group_keys = [
            tuple(str(v) for v in r) for r in groups.features[columns].itertuples(index=False)
        ]
        ordered = sorted(set(group_keys))
        position = {key: i for i, key in enumerate(ordered)}
        cells = np.array([position[k] for k in group_keys], dtype=np.int64)
        point, boot = _estimate(cells, len(ordered), rows, n_boot=n_boot, seed=seed + 1 + index)
        bounds = {k: _interval(v, ci_level) for k, v in boot.items()} if boot else None
        shown = [i for i, key in enumerate(ordered) if (spec.name, key) not in groups.hidden]
        entries = []
        for i, key in enumerate(ordered):
            reason = groups.hidden.get((spec.name, key))
            entry: dict[str, Any] = {
                "group": dict(zip(columns, key, strict=True)),
                "name": " & ".join(key),
                "suppressed": reason is not None,
            }
            if reason is not None:
                entry.update(suppression=reason, count=None, metrics=None)
            else:
                entry["count"] = int(point["count"][i])
                entry["metrics"] = {
                    k: {
                        "value": _num(point[k][i]),
                        "ci": _ci(bounds[k], i) if bounds and k != "count" else None,
                    }
                    for k in keys
                }
            entries.append(entry)
        disparities: dict[str, Any] = {}
        if len(shown) >= 2:
            gaps = {}
            for k in keys:
                if k == "count":
                    continue
                values = point[k][shown]
                if np.sum(np.isfinite(values)) < 2:
                    continue
                hi, lo = shown[int(np.nanargmax(values))], shown[int(np.nanargmin(values))]
                gap_boot = (
                    np.nanmax(boot[k][:, shown], axis=1) - np.nanmin(boot[k][:, shown], axis=1)
                    if boot
                    else None
                )
                gaps[k] = {
                    "value": _num(np.nanmax(values) - np.nanmin(values)),
                    "ci": _ci(_interval(gap_boot, ci_level)) if gap_boot is not None else None,
                    "highest": " & ".join(ordered[hi]),
                    "lowest": " & ".join(ordered[lo]),
                }
            disparities["largest_gap"] = gaps
        result["slices"].append(
            {
                "name": spec.name,
                "columns": columns,
                "groups": entries,
                "reportable_groups": len(shown),
                "suppressed_groups": len(ordered) - len(shown),
                "disparities": disparities,
                "disparities_note": None
                if len(shown) >= 2
                else "fewer than two reportable groups: no disparities can be shown",
            }
        )
    return result


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float | None, list[float] | None]:
    """The share k/n and its Wilson score interval at ``level`` (None, None when n is 0)."""
    from scipy.stats import norm

    if n == 0:
        return None, None
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def extraction_rates(scores: pd.DataFrame, *, ci_level: float = 0.95) -> dict[str, Any] | None:
    """How often the greedy continuation of an example's first tokens reproduces the next ones,
    for training examples and held-out ones (Carlini et al. 2021), with Wilson intervals, and the
    difference with Newcombe's interval: memorisation is the excess of the first over the second.

    Args:
        scores: The membership scores (``member`` and ``extracted``: 1, 0, or NaN for an example
            too short for the test).
    """
    from hubtune.tasks.text_generation import EXTRACTION_PREFIX, EXTRACTION_SUFFIX

    if "extracted" not in scores:
        return None
    real = scores[~scores["row_id"].astype(str).str.startswith("canary:")]
    out: dict[str, Any] = {
        "prefix_tokens": EXTRACTION_PREFIX,
        "suffix_tokens": EXTRACTION_SUFFIX,
        "ci_level": ci_level,
    }
    for name, rows in (("training", real[real["member"]]), ("held_out", real[~real["member"]])):
        outcome = rows["extracted"].dropna()
        k, n = int(outcome.sum()), len(outcome)
        rate, ci = wilson(k, n, ci_level)
        out[name] = {
            "examples": n,
            "too_short": int(rows["extracted"].isna().sum()),
            "extracted": k,
            "rate": rate,
            "ci": ci,
        }
    train, held = out["training"], out["held_out"]
    if train["rate"] is None or held["rate"] is None:
        out["difference"] = None
        return out
    p1, (l1, u1) = train["rate"], train["ci"]
    p2, (l2, u2) = held["rate"], held["ci"]
    diff = p1 - p2
    out["difference"] = {
        "value": diff,
        "ci": [
            diff - float(np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
            diff + float(np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)),
        ],
    }
    return out
