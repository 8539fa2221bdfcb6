"""Turn an audit (audit.json) into a reviewer's report: self-contained HTML and Markdown.

Both reports are rendered from the audit dictionary alone, with the same Jinja context, so
they always say the same thing. Charts are drawn with matplotlib: embedded as base64 PNG
in the HTML (no network fetches: no fonts, scripts or styles from elsewhere), and written to
``audit/charts/`` for the Markdown. No example text, row id or other row-level data appears in
either report; suppressed groups appear by name only.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

from hubtune.io import atomic_write_bytes

__all__ = ["GLOSSARY", "metric_label", "render_reports"]

GLOSSARY: list[tuple[str, str]] = [
    (
        "Group",
        "Test examples that share a value of a sensitive column (e.g. target_group = muslim), or a combination of values.",
    ),
    ("Accuracy", "Share of examples whose predicted label is the true label."),
    (
        "Selection rate",
        "Share of examples the model assigns to the positive label (e.g. flags as biased). Multi-class: reported per label.",
    ),
    (
        "TPR (true-positive rate, recall)",
        "Of the examples that truly are positive, the share the model catches. Multi-class: the average over labels of each label's recall.",
    ),
    (
        "FPR (false-positive rate)",
        "Of the examples that truly are negative, the share the model wrongly flags.",
    ),
    (
        "FNR (false-negative rate)",
        "Of the truly positive examples, the share the model misses (1 - TPR).",
    ),
    ("Precision", "Of the examples the model flags, the share that truly are positive."),
    ("F1", "The balance of precision and recall: 2·TP / (2·TP + FP + FN)."),
    (
        "Demographic parity difference",
        "The largest gap in selection rate between two groups. 0 means every group is flagged equally often.",
    ),
    (
        "Demographic parity ratio",
        "The smallest group selection rate divided by the largest. 1 means equal; 0.8 is the 'four-fifths rule' often used in hiring.",
    ),
    (
        "Equalized odds difference",
        "The larger of the TPR gap and the FPR gap between groups: whether the model makes more mistakes of either kind for some groups.",
    ),
    (
        "Confidence interval",
        "The range the metric would likely fall in on another test set of the same size (bootstrap over test examples). Wide intervals mean few examples: do not read much into the point value.",
    ),
    (
        "Judged value",
        "The number a check's rule is applied to: the point estimate, or, when the policy judges on confidence intervals, the end of the interval least favourable to the model.",
    ),
    (
        "Margin",
        "How far the judged value is from the rule's limit: positive means the check passed with that much room to spare, negative means it failed by that much (e.g. −0.204 for an equalized odds difference of 0.304 against a limit of 0.1).",
    ),
    (
        "Suppressed group",
        "A group too small to report without risking re-identification and without being misleading. When one group is hidden, another may be hidden too, so that the first cannot be worked out by subtracting the others from the total.",
    ),
    (
        "Differential privacy (ε, δ)",
        "A mathematical limit on how much the trained model can depend on any one training example. Smaller ε is more private; ε ≤ 1 is strong, ε ≈ 8 is common in practice and still meaningfully limits an attacker.",
    ),
    (
        "Membership inference",
        "An attack that tries to tell whether an example was in the training data. AUC 0.5 means the attacker does no better than a coin toss.",
    ),
    (
        "TPR at FPR",
        "How many training examples the attacker finds while falsely accusing only that share of non-training examples (e.g. 1%).",
    ),
    (
        "DP bound",
        "Under (ε, δ)-differential privacy no attacker can reach TPR above e^ε·FPR + δ. An attack above the bound means the privacy guarantee is broken.",
    ),
    (
        "Empirical ε lower bound",
        "The privacy loss that this particular attack proves at 95% confidence. It is a lower bound for bug detection, not a privacy guarantee.",
    ),
    (
        "Canaries",
        "Random made-up examples, each put into training by a coin flip. If the model can tell which ones it saw, it memorises individual examples.",
    ),
]

_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "selection_rate": "Selection rate",
    "tpr": "TPR",
    "fpr": "FPR",
    "fnr": "FNR",
    "precision": "Precision",
    "f1": "F1",
    "count": "Rows",
    "demographic_parity_difference": "Demographic parity difference",
    "demographic_parity_ratio": "Demographic parity ratio",
    "equalized_odds_difference": "Equalized odds difference",
    # language models
    "loss": "Loss",
    "perplexity": "Perplexity",
    "sequence_loss": "Sequence loss",
    "exact_match": "Exact match",
}


def metric_label(metric: str) -> str:
    """The display name of an audit metric (``selection_rate[pos]`` -> ``Selection rate (pos)``).

    The one source of metric names: the reports use it, and :mod:`hubtune.space` writes its
    names into ``space_config.json`` for the Space, which runs without hubtune.
    """
    if metric.startswith("selection_rate["):
        return f"Selection rate ({metric[len('selection_rate[') : -1]})"
    return _METRIC_LABELS.get(metric, metric)


# The short name this module's code uses.
_label = metric_label


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return f"{_fmt(ci[0])}–{_fmt(ci[1])}" if ci else ""


def _cell_parts(entry: dict[str, Any] | None, metric: str) -> tuple[str, str]:
    """(value, confidence interval or "") of one table cell."""
    if not entry:
        return "n/a", ""
    if metric == "count":
        return (_fmt(int(entry["value"])) if entry["value"] is not None else "n/a"), ""
    return _fmt(entry["value"]), _fmt_ci(entry.get("ci"))


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    value, ci = _cell_parts(entry, metric)
    return f"{value} ({ci})" if ci else value


# --------------------------------------------------------------------------- charts


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _slice_chart(sl: dict[str, Any], metrics: list[str]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [g for g in sl["groups"] if not g["suppressed"]]
    shown = [m for m in metrics if m != "count"][:5]
    if not groups or not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * len(shown) / 2 + 2), 3.6))
    width = 0.8 / len(groups)
    x = np.arange(len(shown))
    colors = plt.get_cmap("tab10")
    for i, group in enumerate(groups):
        values, lows, highs = [], [], []
        for m in shown:
            entry = group["metrics"].get(m) or {}
            v = entry.get("value")
            ci = entry.get("ci")
            values.append(np.nan if v is None else v)
            lows.append(0 if (v is None or not ci) else v - ci[0])
            highs.append(0 if (v is None or not ci) else ci[1] - v)
        ax.bar(
            x + (i - (len(groups) - 1) / 2) * width,
            values,
            width,
            yerr=[lows, highs],
            capsize=3,
            label=group["name"],
            color=colors(i % 10),
            error_kw={"elinewidth": 1, "ecolor": "#222"},
        )
    ax.set_xticks(x, [_label(m) for m in shown])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value (bars: 95% CI)" if groups[0]["metrics"] else "value")
    ax.set_title(f"Per-group metrics by {sl['name']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        fontsize=8,
        ncol=min(4, len(groups)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        frameon=False,
    )
    return _figure_png(fig)


# The membership chart's lowest rate (0.01%). A log axis cannot show 0, so a rate below this
# (often exactly 0, e.g. no false positive at a 0.1% target) is drawn as a marker on this floor.
_LOG_FLOOR = 1e-4
_FLOOR_MARKER = "v"


def _drawable(values: list[float]) -> list[float]:
    """Bar heights for a log axis: values under the floor become gaps (they get a marker)."""
    return [v if v >= _LOG_FLOOR else math.nan for v in values]


def _mark_floor(ax: Any, x: list[float], values: list[float], color: str) -> bool:
    """Put a marker on the axis floor for each value below it; whether there was any."""
    low = [xi for xi, v in zip(x, values, strict=True) if v < _LOG_FLOOR]
    if low:
        ax.scatter(
            low,
            [_LOG_FLOOR] * len(low),
            marker=_FLOOR_MARKER,
            s=110,
            color=color,
            edgecolors="#222",
            linewidths=0.8,
            zorder=4,
        )
    return bool(low)


def _below_log_floor(membership: dict[str, Any]) -> bool:
    """Whether the membership chart draws any rate (or DP bound) on its floor marker."""
    return any(
        value is not None and value < _LOG_FLOOR
        for lv in membership.get("at_fpr") or []
        for value in (lv.get("tpr"), lv.get("fpr"), lv.get("dp_bound_tpr"))
    )


def _membership_chart(membership: dict[str, Any]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    levels = membership.get("at_fpr") or []
    if not levels:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    left = [i - 0.2 for i in range(len(levels))]
    right = [i + 0.2 for i in range(len(levels))]
    tpr = [lv["tpr"] for lv in levels]
    fpr = [lv["fpr"] for lv in levels]
    shown_tpr = [max(v, _LOG_FLOOR) for v in tpr]
    ax.bar(left, _drawable(tpr), 0.4, color="#d62728", label="attack TPR (95% CI)")
    ax.errorbar(
        left,
        shown_tpr,
        yerr=[
            [y - lv["tpr_ci"][0] for y, lv in zip(shown_tpr, levels, strict=True)],
            [max(0.0, lv["tpr_ci"][1] - y) for y, lv in zip(shown_tpr, levels, strict=True)],
        ],
        fmt="none",
        capsize=3,
        ecolor="#222",
        elinewidth=1,
    )
    ax.bar(
        right,
        _drawable(fpr),
        0.4,
        color="#7f7f7f",
        label="measured FPR (what a coin-toss attacker would reach)",
    )
    floored = _mark_floor(ax, left, tpr, "#d62728")
    floored = _mark_floor(ax, right, fpr, "#7f7f7f") or floored
    bounds = [lv.get("dp_bound_tpr") for lv in levels]
    if all(b is not None for b in bounds):
        drawn = [(xi, b) for xi, b in zip(left, bounds, strict=True) if b >= _LOG_FLOOR]
        ax.scatter(
            [xi for xi, _ in drawn],
            [b for _, b in drawn],
            marker="_",
            s=600,
            color="#2ca02c",
            linewidths=3,
            label="DP bound on TPR",
            zorder=3,
        )
        floored = _mark_floor(ax, left, bounds, "#2ca02c") or floored
    if floored:
        ax.axhline(_LOG_FLOOR, color="#222", linewidth=0.7, linestyle=":")
        ax.scatter(
            [],
            [],
            marker=_FLOOR_MARKER,
            s=60,
            color="white",
            edgecolors="#222",
            label=f"0 or below {_LOG_FLOOR:g}: drawn on the dotted floor",
        )
    ax.set_xticks(range(len(levels)), [f"target FPR {lv['target_fpr']:g}" for lv in levels])
    ax.set_yscale("log")  # the interesting rates are small: 0.1% and 1% false positives
    ax.set_ylim(_LOG_FLOOR / 3, 1.5)  # room under the floor for its markers
    ax.set_title("Membership inference: attack vs what the DP guarantee allows")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _figure_png(fig)


def _comparison_chart(sl: dict[str, Any], metric: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [g for g in sl["groups"] if not g["suppressed"] and g["metrics"].get(metric)]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    x = np.arange(len(groups))
    change = [g["metrics"][metric]["change"] or 0.0 for g in groups]
    cis = [g["metrics"][metric]["ci"] for g in groups]
    err = [
        [c - ci[0] if ci else 0 for c, ci in zip(change, cis, strict=True)],
        [ci[1] - c if ci else 0 for c, ci in zip(change, cis, strict=True)],
    ]
    ax.bar(
        x,
        change,
        0.6,
        yerr=err,
        capsize=3,
        color=["#d62728" if c < 0 else "#1f77b4" for c in change],
    )
    ax.axhline(0, color="#222", linewidth=0.8)
    ax.set_xticks(x, [g["name"] for g in groups], rotation=20)
    ax.set_ylabel(f"{_label(metric)}: this run - other")
    ax.set_title(f"Change in {_label(metric)} per {sl['name']} group (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    return _figure_png(fig)


# --------------------------------------------------------------------------- context


def _beats_cell(level: dict[str, Any]) -> str:
    """The "Beats the bound?" cell of one FPR level: never blank, a blank reads as "no"."""
    beats = level.get("beats_dp_bound")
    if beats is None:
        return "n/a: not computed" if "dp_bound_tpr" in level else "n/a: trained without DP"
    return "YES: guarantee broken" if beats else "no"


def anonymization_context(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """data.anonymize for the report: how, by what, and per entity the values found before and
    still found after scrubbing ("not detected" where the detector could not look)."""
    if record is None:
        return None
    before, after = record["before"], record["after"]

    def count(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "-"
        return "not detected" if entry.get("count") is None else f"{entry['count']:,}"

    how = {
        "mask": "masked (every character replaced by *)",
        "drop_row": "rows with any detected value dropped",
    }.get(record["action"]) or (
        "replaced by a type tag (<PERSON>, <EMAIL>, ...)"
        if record["replace_with"] == "type_tag"
        else "replaced by realistic synthetic values"
        + (" (the same original, the same fake)" if record.get("consistent") else "")
    )
    ner = record.get("ner") or {}
    return {
        "how": how,
        "ner": ner.get("model") if ner.get("available") else None,
        "ner_problem": None if ner.get("available") else ner.get("problem"),
        "min_score": record.get("min_score"),
        "rows": before["rows"],
        "rows_affected": before["rows_affected"],
        "rows_changed": record["rows_changed"],
        "rows_dropped": record["rows_dropped"],
        "residual_rows": record["residual_rows"],
        "residual_rate": f"{100 * record['residual_rate']:.2f}%",
        "not_detected": record.get("not_detected") or [],
        "entities": [
            {"entity": e, "before": count(entry), "after": count(after["entities"].get(e))}
            for e, entry in before["entities"].items()
        ],
    }


def _context(audit: dict[str, Any]) -> dict[str, Any]:
    """Everything both report templates show, from audit.json, formatted.

    Long on purpose: one flat mapping from audit.json to every value both report templates
    show, kept together so the HTML and Markdown reports show the same figures.
    """
    fairness = audit["fairness"]
    metrics = fairness["metrics"]
    verdict = audit["verdict"]
    checks = [
        {
            "check": c["check"],
            "scope": c["scope"],
            "value": _fmt(c["value"]) + (f" ({_fmt_ci(c['ci'])})" if c.get("ci") else ""),
            "judged": _fmt(c["judged_value"]),
            "rule": c["rule"] + (f" ({c['note']})" if c.get("note") else ""),
            "result": "not informative"
            if c.get("informative") is False
            else {True: "pass", False: "FAIL", None: "not evaluable"}[c["passed"]],
            "margin": "" if c["margin"] is None else f"{c['margin']:+.3f}",
            "passed": c["passed"],
        }
        for c in verdict["checks"]
    ]
    slices: list[dict[str, Any]] = []
    for sl in fairness["slices"]:
        rows = []
        for g in sl["groups"]:
            if g["suppressed"]:
                why = (
                    f"suppressed: fewer than {fairness['min_group_size']} test rows"
                    if g.get("suppression") == "small"
                    else "suppressed: hidden so that a smaller group cannot be derived by subtraction"
                )
                rows.append({"name": g["name"], "suppressed": True, "why": why, "cells": []})
            else:
                rows.append(
                    {
                        "name": g["name"],
                        "suppressed": False,
                        "why": "",
                        "cells": [_cell(g["metrics"].get(m), m) for m in metrics],
                        # The HTML puts each interval under its value, so the table fits a page.
                        "parts": [_cell_parts(g["metrics"].get(m), m) for m in metrics],
                    }
                )
        disparities = []
        for name in (
            "demographic_parity_difference",
            "demographic_parity_ratio",
            "equalized_odds_difference",
        ):
            if name in sl["disparities"]:
                disparities.append(
                    {
                        "name": _label(name),
                        "value": _cell(sl["disparities"][name], name),
                        "detail": "",
                    }
                )
        for m, gap in sl["disparities"].get("largest_gap", {}).items():
            disparities.append(
                {
                    "name": f"Largest {_label(m)} gap",
                    "value": _cell(gap, m),
                    "detail": f"highest: {gap['highest']}, lowest: {gap['lowest']}",
                }
            )
        slices.append(
            {
                "name": sl["name"],
                "chart": f"groups_{len(slices)}",
                "rows": rows,
                "suppressed": sl["suppressed_groups"],
                "reportable": sl["reportable_groups"],
                "disparities": disparities,
                "note": sl.get("disparities_note"),
            }
        )
    privacy = audit["privacy"]
    if privacy["dp"] and privacy.get("guarantee_void"):
        privacy_plain = (
            f"This model claims differential privacy, but it has NONE: {privacy['statement'].split(': ', 1)[-1]}. "
            f"The accounting would have given ε = {_fmt(privacy['epsilon'])}; that number does not hold. "
            "Do not publish this model as private."
        )
    elif privacy["dp"]:
        eps = privacy["epsilon"]
        factor = math.exp(eps) if eps is not None and eps < 50 else None
        privacy_plain = (
            f"This model was trained with differential privacy: {privacy['statement']}. In plain words: "
            f"adding or removing any one training example changes the probability of any outcome of training "
            f"by at most a factor of {_fmt(factor, 1) if factor else 'e^ε'}, except with probability "
            f"δ = {privacy['delta']:.1g}. Noise multiplier {privacy.get('noise') or 'σ ' + _fmt(privacy['noise_multiplier'])}, clipping "
            f"bound C = {_fmt(privacy['max_grad_norm'])}, {privacy['sampling']} sampling with rate "
            f"q = {_fmt(privacy['sample_rate'], 4)}, {_fmt(privacy['steps'])} steps."
        )
    else:
        privacy_plain = (
            "This model was trained without differential privacy: there is no formal limit on what it can "
            "reveal about individual training examples. The empirical audit below only shows what one attack finds."
        )
    membership = audit.get("membership") or {}
    mia = None
    if "auc" in membership:
        mia = {
            "auc": _cell(membership["auc"], "auc"),
            "members": _fmt(membership["members"]),
            "nonmembers": _fmt(membership["nonmembers"]),
            "eps_lb": _fmt(membership["epsilon_lower_bound"]),
            "max_provable": _fmt(membership.get("max_provable_epsilon")),
            "underpowered": membership.get("can_refute_dp_epsilon") is False,
            "beats": membership.get("beats_dp_bound"),
            "dp": "dp_epsilon" in membership,
            "withheld": membership.get("withheld"),
            "below_floor": _below_log_floor(membership),
            "floor": f"{_LOG_FLOOR:g}",
            "levels": [
                {
                    "target": f"{lv['target_fpr']:g}",
                    "fpr": f"{_fmt(lv['fpr'], 4)} ({_fmt_ci(lv['fpr_ci'])})",
                    "tpr": f"{_fmt(lv['tpr'], 4)} ({_fmt_ci(lv['tpr_ci'])})",
                    "bound": _fmt(lv.get("dp_bound_tpr"), 4)
                    if "dp_bound_tpr" in lv
                    else "no DP: no bound",
                    "beats": _beats_cell(lv),
                }
                for lv in membership.get("at_fpr", [])
            ],
        }
    comparison = None
    if audit.get("comparison"):
        comp = audit["comparison"]
        comp_slices = []
        for i, sl in enumerate(comp["slices"]):
            rows = []
            for g in sl["groups"]:
                if g["suppressed"]:
                    rows.append({"name": g["name"], "suppressed": True, "cells": []})
                    continue
                rows.append(
                    {
                        "name": g["name"],
                        "suppressed": False,
                        "cells": [
                            f"{_fmt(v['this'])} vs {_fmt(v['other'])}: {v['change']:+.3f}"
                            + (f" ({_fmt_ci(v['ci'])})" if v.get("ci") else "")
                            if v["change"] is not None
                            else "n/a"
                            for v in g["metrics"].values()
                        ],
                    }
                )
            keys = next((list(g["metrics"]) for g in sl["groups"] if not g["suppressed"]), [])
            comp_slices.append(
                {
                    "name": sl["name"],
                    "chart": f"change_{i}",
                    "metrics": [_label(k) for k in keys],
                    "rows": rows,
                }
            )
        comparison = {
            "other": comp["other_run"],
            "other_dp": comp["other_privacy"]["statement"],
            "slices": comp_slices,
            "note": comp.get("note"),
        }
    canaries = audit.get("canaries")
    return {
        "audit": audit,
        "run": audit["run"],
        "policy": audit["policy"],
        "verdict": verdict,
        "status": verdict["status"],
        "checks": checks,
        "metric_labels": [_label(m) for m in metrics],
        "slices": slices,
        "fairness": fairness,
        "overall": [
            {
                "name": _label(m),
                "value": _cell(fairness["overall"].get(m), m),
                "parts": _cell_parts(fairness["overall"].get(m), m),
            }
            for m in metrics
        ],
        "per_class": [
            {
                "label": pc["label"],
                "support": _fmt(pc["support"]),
                "recall": _cell(pc["recall"], "recall"),
                "precision": _cell(pc["precision"], "precision"),
            }
            for pc in fairness["per_class"]
        ],
        "privacy": privacy,
        "privacy_plain": privacy_plain,
        "mia": mia,
        "mia_skipped": membership.get("skipped"),
        "canaries": canaries,
        "exposure": audit.get("exposure"),
        "anonymization": anonymization_context(audit.get("anonymization")),
        "extraction": audit.get("extraction"),
        "stereotypes": audit.get("stereotypes"),
        "comparison": comparison,
        "glossary": GENERATION_GLOSSARY if fairness.get("task") == "generation" else GLOSSARY,
        "fmt": _fmt,
    }


# A language model's audit: its own metrics first, then the shared privacy terms (no classifier
# rates, which it does not report).
_CLASSIFIER_TERMS = {
    "Accuracy",
    "Selection rate",
    "TPR (true-positive rate, recall)",
    "FPR (false-positive rate)",
    "FNR (false-negative rate)",
    "Precision",
    "F1",
    "Demographic parity difference",
    "Demographic parity ratio",
    "Equalized odds difference",
}
GENERATION_GLOSSARY: list[tuple[str, str]] = [
    GLOSSARY[0],
    (
        "Loss (mean token loss)",
        "How surprised the model is by the next token of a group's text, in nats, averaged over all "
        "of that group's tokens. Lower is better.",
    ),
    (
        "Perplexity",
        "e to the loss: roughly how many equally likely tokens the model hesitates between at each "
        "step. A group with higher perplexity is served worse (its text is less probable to the model).",
    ),
    ("Sequence loss", "The mean over examples of each example's own mean token loss."),
    (
        "Exact match",
        "Share of examples whose every labelled token is the model's greedy choice: its greedy "
        "continuation reproduces the example (for prompt + completion data, the completion).",
    ),
    (
        "Loss gap",
        "The largest difference in mean token loss between two reportable groups; e to the gap is "
        "the ratio of their perplexities.",
    ),
    *[entry for entry in GLOSSARY[1:] if entry[0] not in _CLASSIFIER_TERMS],
]


def render_reports(audit: dict[str, Any], *, charts_dir: Path) -> tuple[str, str]:
    """Render (report.html, report.md) for an audit, writing the charts to ``charts_dir``."""
    import jinja2

    charts: dict[str, bytes] = {}
    metrics = audit["fairness"]["metrics"]
    for i, sl in enumerate(audit["fairness"]["slices"]):
        png = _slice_chart(sl, metrics)
        if png:
            charts[f"groups_{i}"] = png
    if audit.get("membership") and "at_fpr" in audit["membership"]:
        png = _membership_chart(audit["membership"])
        if png:
            charts["membership"] = png
    if audit.get("comparison"):
        headline = "accuracy" if "accuracy" in metrics else metrics[0]
        for i, sl in enumerate(audit["comparison"]["slices"]):
            png = _comparison_chart(sl, headline)
            if png:
                charts[f"change_{i}"] = png
    charts_dir.mkdir(parents=True, exist_ok=True)
    for name, png in charts.items():
        atomic_write_bytes(charts_dir / f"{name}.png", png)
    context = _context(audit)
    loader = jinja2.PackageLoader("hubtune.audit", "templates")
    html_env = jinja2.Environment(
        loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True
    )
    md_env = jinja2.Environment(
        loader=loader, autoescape=False, trim_blocks=True, lstrip_blocks=True
    )
    html = html_env.get_template("report.html.j2").render(
        **context,
        images={
            k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in charts.items()
        },
    )
    markdown = md_env.get_template("report.md.j2").render(
        **context, images={k: f"charts/{k}.png" for k in charts}
    )
    return html, markdown
