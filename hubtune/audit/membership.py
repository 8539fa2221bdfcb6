"""Empirical privacy audit: can an attacker tell training rows from held-out rows?

This is a *bug detector* that gives a lower bound, never a proof of privacy. A model that
passes may still leak to a stronger attacker; a model whose attack beats the bound its
(ε, δ) guarantee implies has a broken guarantee (or a broken accountant).

* **Loss-threshold attack** (Yeom et al. 2018): an example is called a member when the
  model's loss on it is below a threshold. Members are training rows, non-members the
  validation and test rows (never trained on). Reported: ROC AUC with a bootstrap interval,
  and the true-positive rate at fixed false-positive rates. To keep the numbers honest, the
  threshold for each FPR level is chosen on one random half of the non-members and the FPR is
  measured on the other half (the TPR on all members), with exact (Clopper-Pearson)
  intervals.
* **The DP bound**: any attack on an (ε, δ)-DP model satisfies TPR ≤ e^ε·FPR + δ. The
  attack *beats the bound* only when the lower end of its TPR interval is above the bound at
  the upper end of its FPR interval, both Bonferroni-corrected over the FPR levels; the
  empirical ε lower bound is log((TPR_low - δ) / FPR_high) with the same corrected ends.
* **Canaries** (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training
  run"): k random-text, random-label examples, each put into the training set with
  probability 1/2. The auditor guesses "in" for the lowest-loss quarter and "out" for the
  highest-loss quarter; the number of right guesses gives an ε lower bound at 95% confidence
  (their Theorem 3 p-value, δ included).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "auc",
    "canary_audit",
    "clopper_pearson",
    "epsilon_lower_bound_one_run",
    "loss_threshold_attack",
]


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half."""
    m, n = len(member_scores), len(nonmember_scores)
    ranks = stats.rankdata(np.concatenate([member_scores, nonmember_scores]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def _bootstrap_auc(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, *, n_boot: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m, n = len(member_scores), len(nonmember_scores)
    out = np.empty(n_boot)
    for b in range(n_boot):
        out[b] = auc(member_scores[rng.integers(0, m, m)], nonmember_scores[rng.integers(0, n, n)])
    return out


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval for a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    lo = (
        0.0
        if successes == 0
        else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    )
    hi = (
        1.0
        if successes == trials
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return lo, hi


def loss_threshold_attack(
    member_losses: np.ndarray,
    nonmember_losses: np.ndarray,
    *,
    fpr_levels: list[float],
    epsilon: float | None,
    delta: float | None,
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the loss-threshold membership-inference attack and compare it with the DP bound.

    Long on purpose: the threshold choice, the held-out FPR, the Bonferroni-corrected bounds and the attack's power share their sample splits; one function keeps them consistent.

    Args:
        member_losses: Per-example loss on training rows.
        nonmember_losses: Per-example loss on rows never trained on.
        fpr_levels: False-positive rates to report the attack at.
        epsilon: The run's ε (None without differential privacy).
        delta: The run's δ.
        n_boot: Bootstrap resamples for the AUC interval.
        ci_level: Interval coverage.
        seed: Seed for the half split and the bootstrap.

    Returns:
        The ``membership`` part of audit.json.
    """
    members = -np.asarray(member_losses, dtype=float)  # higher score = more likely a member
    nonmembers = -np.asarray(nonmember_losses, dtype=float)
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError("the membership audit needs at least 2 members and 2 non-members")
    alpha = 1 - ci_level
    point = auc(members, nonmembers)
    boot = _bootstrap_auc(members, nonmembers, n_boot=n_boot, seed=seed) if n_boot else None
    auc_ci = (
        [float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))]
        if boot is not None
        else None
    )
    # The threshold depends on non-member scores only: choose it on one half of the
    # non-members and measure the FPR on the other half (members are all used for the TPR).
    rng = np.random.default_rng(seed + 1)
    n_perm = rng.permutation(len(nonmembers))
    n_cal = nonmembers[n_perm[: len(nonmembers) // 2]]
    n_eval = nonmembers[n_perm[len(nonmembers) // 2 :]]
    m_eval = members
    bonferroni = alpha / len(fpr_levels)
    levels = []
    eps_lower = 0.0
    for level in fpr_levels:
        # Threshold from the calibration half: at most `level` of its non-members score above it.
        threshold = float(np.quantile(n_cal, 1 - level, method="higher"))
        tp = int(np.sum(m_eval > threshold))
        fp = int(np.sum(n_eval > threshold))
        tpr, fpr = tp / len(m_eval), fp / len(n_eval)
        tpr_ci = clopper_pearson(tp, len(m_eval), alpha)
        fpr_ci = clopper_pearson(fp, len(n_eval), alpha)
        entry: dict[str, Any] = {
            "target_fpr": level,
            "fpr": fpr,
            "fpr_ci": list(fpr_ci),
            "tpr": tpr,
            "tpr_ci": list(tpr_ci),
            "members_evaluated": len(m_eval),
            "nonmembers_evaluated": len(n_eval),
        }
        # Bonferroni-corrected one-sided bounds over all levels: the TPR lower and FPR upper
        # bound must hold together, so each gets alpha / (2 * levels) (one tail of a two-sided
        # alpha / levels interval). Both the ε lower bound and the "beats the bound" flag use
        # them, so a flag is a finding at the stated confidence over every level reported.
        tpr_low = clopper_pearson(tp, len(m_eval), bonferroni)[0]
        fpr_high = clopper_pearson(fp, len(n_eval), bonferroni)[1]
        d = delta or 0.0
        if tpr_low - d > 0 and fpr_high > 0:
            eps_lower = max(eps_lower, math.log((tpr_low - d) / fpr_high))
        if epsilon is not None and delta is not None:
            finite = math.isfinite(epsilon)
            entry["dp_bound_tpr"] = min(1.0, math.exp(epsilon) * fpr + delta) if finite else 1.0
            entry["beats_dp_bound"] = bool(
                finite and tpr_low > math.exp(epsilon) * fpr_high + delta
            )
        levels.append(entry)
    # The power of this audit: what a perfect attack (every member above the threshold, no
    # non-member) would prove with these sample sizes. A claimed ε above it cannot be refuted here.
    best_tpr_low = clopper_pearson(len(m_eval), len(m_eval), bonferroni)[0]
    best_fpr_high = clopper_pearson(0, len(n_eval), bonferroni)[1]
    max_provable = math.log(max(best_tpr_low - (delta or 0.0), 1e-300) / best_fpr_high)
    result: dict[str, Any] = {
        "attack": "loss threshold (Yeom et al. 2018)",
        "members": len(members),
        "nonmembers": len(nonmembers),
        "auc": {"value": point, "ci": auc_ci},
        "mean_loss": {
            "members": float(np.mean(member_losses)),
            "nonmembers": float(np.mean(nonmember_losses)),
        },
        "at_fpr": levels,
        "epsilon_lower_bound": eps_lower,
        "max_provable_epsilon": max(0.0, max_provable),
        "confidence": ci_level,
        "interpretation": "a lower bound from one attack: a model that passes may still leak to a stronger attacker",
    }
    if epsilon is not None:
        result["dp_epsilon"] = epsilon
        result["dp_delta"] = delta
        result["can_refute_dp_epsilon"] = bool(max_provable > epsilon)
        result["beats_dp_bound"] = bool(
            any(x.get("beats_dp_bound") for x in levels) or eps_lower > epsilon
        )
    return result


# --------------------------------------------------------------------------- canaries


def _p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v right guesses out of r] if the training were (ε, δ)-DP (Steinke et al. 2023, Thm 3)."""
    q = 1 / (1 + math.exp(-eps))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound_one_run(
    m: int, r: int, v: int, *, delta: float, confidence: float = 0.95
) -> float:
    """Largest ε rejected at ``confidence`` given v right guesses out of r among m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    p = 1 - confidence
    if r == 0 or _p_value_dp_audit(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value_dp_audit(m, r, v, hi, delta) < p:
        hi += 1.0
        if hi > 100:
            return float("inf")
    for _ in range(40):
        mid = (lo + hi) / 2
        if _p_value_dp_audit(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def canary_audit(
    losses: np.ndarray,
    included: np.ndarray,
    predicted_own_label: np.ndarray,
    *,
    num_labels: int,
    delta: float,
    epsilon: float | None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Score the inserted canaries and turn the guesses into an ε lower bound.

    Args:
        losses: Loss of each canary under its (random) label.
        included: Whether each canary was in the training set.
        predicted_own_label: Whether the model predicts each canary's random label.
        num_labels: Number of classes (chance of predicting a random label: 1/K).
        delta: δ for the bound (the run's δ, or 1e-5 without DP).
        epsilon: The run's ε (None without DP), for the comparison flag.
        confidence: Confidence of the lower bound.
    """
    losses = np.asarray(losses, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(losses)
    k = m // 4
    if k == 0:
        raise ValueError("the canary audit needs at least 4 canaries")
    order = np.argsort(losses, kind="stable")  # lowest loss first: guessed "in"
    guess_in, guess_out = order[:k], order[-k:]
    right = int(included[guess_in].sum() + (~included[guess_out]).sum())
    r = 2 * k
    eps_lb = epsilon_lower_bound_one_run(m, r, right, delta=delta, confidence=confidence)
    own = np.asarray(predicted_own_label, dtype=bool)
    max_provable = epsilon_lower_bound_one_run(m, r, r, delta=delta, confidence=confidence)
    result: dict[str, Any] = {
        "canaries": m,
        "included": int(included.sum()),
        "guesses": r,
        "right_guesses": right,
        "epsilon_lower_bound": eps_lb,
        "max_provable_epsilon": max_provable,
        "confidence": confidence,
        "delta": delta,
        "memorised": {
            "included_predicted_own_label": int(own[included].sum()),
            "included": int(included.sum()),
            "excluded_predicted_own_label": int(own[~included].sum()),
            "excluded": int((~included).sum()),
            "chance_rate": 1 / num_labels,
        },
        "method": "one-run auditing (Steinke, Nasr & Jagielski 2023), loss scores, top/bottom quarter guessed",
    }
    if epsilon is not None:
        result["exceeds_dp_epsilon"] = bool(eps_lb > epsilon)
    return result
