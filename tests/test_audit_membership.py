"""Membership audit: the attack's statistics are right, and it tells leaky models from safe ones."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from torch import nn

from hubtune.audit import membership
from hubtune.audit.membership import (
    _p_value_dp_audit,
    auc,
    canary_audit,
    clopper_pearson,
    epsilon_lower_bound_one_run,
    loss_threshold_attack,
)

FEATURES = 32


# --------------------------------------------------------------------------- statistics


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for m, n in ((50, 70), (200, 120), (3, 4)):
        members = np.round(rng.normal(0.3, 1.0, m), 1)  # rounding creates many ties
        nonmembers = np.round(rng.normal(0.0, 1.0, n), 1)
        assert len(np.unique(np.concatenate([members, nonmembers]))) < m + n
        expected = roc_auc_score(
            np.r_[np.ones(m), np.zeros(n)], np.concatenate([members, nonmembers])
        )
        assert auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0, 1.0])) == 0.5


@pytest.mark.parametrize(
    ("successes", "trials", "alpha"),
    [
        (0, 10, 0.05),
        (3, 10, 0.05),
        (10, 10, 0.05),
        (47, 200, 0.05),
        (199, 200, 0.01),
        (5, 1000, 0.1),
    ],
)
def test_clopper_pearson_matches_scipy(successes: int, trials: int, alpha: float) -> None:
    expected = binomtest(successes, trials).proportion_ci(
        confidence_level=1 - alpha, method="exact"
    )
    lo, hi = clopper_pearson(successes, trials, alpha)
    assert lo == pytest.approx(expected.low, abs=1e-10)
    assert hi == pytest.approx(expected.high, abs=1e-10)


def test_clopper_pearson_without_trials_is_uninformative() -> None:
    assert clopper_pearson(0, 0, 0.05) == (0.0, 1.0)


# --------------------------------------------------------------------------- attacks on models


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The models are tiny: one thread is as fast and does not stall on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features with random labels: nothing to learn, only to memorise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, classes, (n,), generator=g)


def _train(
    x: torch.Tensor, y: torch.Tensor, *, classes: int, hidden: int, epochs: int
) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):  # full batch
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none").numpy()


def test_attack_at_chance_for_data_the_model_never_saw() -> None:
    """Two fresh samples the model never saw are indistinguishable: AUC ~ 0.5, no DP alarm."""
    x_a, y_a = _data(500, 2, seed=1)
    model = _train(x_a, y_a, classes=2, hidden=64, epochs=50)
    x_b, y_b = _data(1000, 2, seed=2)  # labelled "members", but never trained on
    x_c, y_c = _data(1000, 2, seed=3)
    result = loss_threshold_attack(
        _losses(model, x_b, y_b),
        _losses(model, x_c, y_c),
        fpr_levels=[0.01, 0.1],
        epsilon=1.0,
        delta=1e-5,
        n_boot=200,
    )
    assert 0.45 < result["auc"]["value"] < 0.55
    lo, hi = result["auc"]["ci"]
    assert lo < result["auc"]["value"] < hi
    assert result["beats_dp_bound"] is False
    assert [e["beats_dp_bound"] for e in result["at_fpr"]] == [False, False]
    assert result["epsilon_lower_bound"] < 1.0
    assert (result["members"], result["nonmembers"]) == (1000, 1000)
    assert result["dp_epsilon"] == 1.0
    for entry in result["at_fpr"]:
        assert (entry["members_evaluated"], entry["nonmembers_evaluated"]) == (1000, 500)
        assert entry["dp_bound_tpr"] == pytest.approx(min(1.0, math.exp(1.0) * entry["fpr"] + 1e-5))
        assert entry["fpr_ci"][0] <= entry["fpr"] <= entry["fpr_ci"][1]
        assert entry["tpr_ci"][0] <= entry["tpr"] <= entry["tpr_ci"][1]


def test_attack_flags_an_overfitted_model() -> None:
    """A model that memorised its training rows is caught, and a claimed ε = 0.1 is refuted."""
    x_in, y_in = _data(200, 4, seed=1)
    model = _train(x_in, y_in, classes=4, hidden=256, epochs=300)
    member_losses = _losses(model, x_in, y_in)
    assert member_losses.mean() < 0.01  # memorised
    x_out, y_out = _data(200, 4, seed=2)
    result = loss_threshold_attack(
        member_losses,
        _losses(model, x_out, y_out),
        fpr_levels=[0.01, 0.1],
        epsilon=0.1,
        delta=1e-5,
        n_boot=200,
    )
    assert result["auc"]["value"] > 0.8
    assert result["auc"]["ci"][0] > 0.5
    assert result["mean_loss"]["members"] < result["mean_loss"]["nonmembers"]
    assert result["epsilon_lower_bound"] > 0.1
    assert result["beats_dp_bound"] is True
    assert any(e["beats_dp_bound"] for e in result["at_fpr"])

    without_dp = loss_threshold_attack(
        member_losses,
        _losses(model, x_out, y_out),
        fpr_levels=[0.1],
        epsilon=None,
        delta=None,
        n_boot=0,
    )
    assert without_dp["auc"]["ci"] is None
    assert without_dp["auc"]["value"] == result["auc"]["value"]
    assert "beats_dp_bound" not in without_dp and "dp_bound_tpr" not in without_dp["at_fpr"][0]
    assert without_dp["epsilon_lower_bound"] > 0


def test_epsilon_lower_bound_uses_the_reported_confidence() -> None:
    """With one FPR level, the ε lower bound comes from the same 95% intervals the report shows.

    The bound needs the TPR lower end and the FPR upper end to hold together, so each one-sided
    bound gets half the error budget; it then agrees with that level's beats_dp_bound flag.
    """
    rng = np.random.default_rng(4)
    members = rng.normal(0.0, 1.0, 400)
    nonmembers = rng.normal(1.5, 1.0, 400)  # members have lower loss
    delta = 1e-5
    for epsilon in (0.5, 1.0, 1.5, 1.8, 2.0, 3.0):
        result = loss_threshold_attack(
            members, nonmembers, fpr_levels=[0.1], epsilon=epsilon, delta=delta, n_boot=0
        )
        (entry,) = result["at_fpr"]
        assert entry["tpr_ci"] == list(clopper_pearson(round(entry["tpr"] * 400), 400, 0.05))
        expected = math.log((entry["tpr_ci"][0] - delta) / entry["fpr_ci"][1])
        assert result["epsilon_lower_bound"] == pytest.approx(expected, abs=1e-12)
        assert (result["epsilon_lower_bound"] > epsilon) == entry["beats_dp_bound"]
        assert result["beats_dp_bound"] == entry["beats_dp_bound"]
    assert result["epsilon_lower_bound"] > 0.5


def test_attack_needs_two_of_each() -> None:
    with pytest.raises(
        ValueError, match="^the membership audit needs at least 2 members and 2 non-members$"
    ):
        loss_threshold_attack(
            np.array([0.1]), np.array([1.0, 2.0]), fpr_levels=[0.1], epsilon=None, delta=None
        )


# --------------------------------------------------------------------------- Bonferroni


def _one_sided(tp: int, m: int, fp: int, n: int, tail: float) -> tuple[float, float]:
    """TPR lower and FPR upper Clopper-Pearson bounds, each missing with probability ``tail``."""
    return float(stats.beta.ppf(tail, tp, m - tp + 1)), float(stats.beta.isf(tail, fp + 1, n - fp))


# Members: 240 of 300 at loss 0.1, 60 at loss 5; non-members: 400 at loss 1. Whatever half of
# the non-members sets the threshold, it is at loss 1, so at every FPR level the attack has
# TP = 240 of 300 members and FP = 0 of the 200 held-out non-members.
TIED_MEMBERS = np.r_[np.full(240, 0.1), np.full(60, 5.0)]
TIED_NONMEMBERS = np.full(400, 1.0)


@pytest.mark.parametrize(
    ("fpr_levels", "ci_level"),
    [([0.1], 0.95), ([0.05, 0.1], 0.95), ([0.01, 0.05, 0.1], 0.95), ([0.05, 0.1], 0.9)],
)
def test_epsilon_bounds_are_bonferroni_corrected(fpr_levels: list[float], ci_level: float) -> None:
    """With L FPR levels, the TPR lower and FPR upper ends behind the ε lower bound, the
    beats-the-bound flags and max_provable_epsilon are one-sided Clopper-Pearson bounds at
    (1 - ci_level) / (2·L) each, so all 2·L of them hold together at ci_level."""
    delta = 1e-5
    levels = len(fpr_levels)
    tail = (1 - ci_level) / (2 * levels)
    tpr_low, fpr_high = _one_sided(240, 300, 0, 200, tail)
    assert fpr_high == pytest.approx(1 - tail ** (1 / 200), rel=1e-12)  # no false positive
    epsilon_lower = math.log((tpr_low - delta) / fpr_high)
    # A perfect attack (300 of 300, 0 of 200): closed-form Clopper-Pearson ends.
    max_provable = math.log((tail ** (1 / 300) - delta) / (1 - tail ** (1 / 200)))
    # Without the correction (each end at (1 - ci_level) / 2) both would be larger.
    uncorrected_low, uncorrected_high = _one_sided(240, 300, 0, 200, (1 - ci_level) / 2)
    uncorrected = math.log((uncorrected_low - delta) / uncorrected_high)

    result = loss_threshold_attack(
        TIED_MEMBERS,
        TIED_NONMEMBERS,
        fpr_levels=fpr_levels,
        epsilon=None,
        delta=delta,
        n_boot=0,
        ci_level=ci_level,
    )
    for entry in result["at_fpr"]:
        assert (entry["tpr"], entry["fpr"]) == (0.8, 0.0)
        assert (entry["members_evaluated"], entry["nonmembers_evaluated"]) == (300, 200)
        # The intervals shown are the uncorrected two-sided ones, at ci_level.
        assert entry["tpr_ci"][0] == pytest.approx(uncorrected_low, rel=1e-12)
        assert entry["fpr_ci"][1] == pytest.approx(uncorrected_high, rel=1e-12)
    assert result["epsilon_lower_bound"] == pytest.approx(epsilon_lower, rel=1e-12)
    assert result["max_provable_epsilon"] == pytest.approx(max_provable, rel=1e-12)
    if levels == 1:  # one level: the bound is the one the reported interval ends give
        assert epsilon_lower == pytest.approx(uncorrected, rel=1e-12)
    else:
        assert epsilon_lower < uncorrected - 0.05

    # The flags use the same corrected ends: a claimed ε just under the corrected ε lower
    # bound is refuted, one just over it is not; likewise for the audit's power.
    for claimed, beats in ((epsilon_lower - 1e-6, True), (epsilon_lower + 1e-6, False)):
        flagged = loss_threshold_attack(
            TIED_MEMBERS,
            TIED_NONMEMBERS,
            fpr_levels=fpr_levels,
            epsilon=claimed,
            delta=delta,
            n_boot=0,
            ci_level=ci_level,
        )
        assert [e["beats_dp_bound"] for e in flagged["at_fpr"]] == [beats] * levels
        assert flagged["beats_dp_bound"] is beats
    for claimed, can in ((max_provable - 1e-6, True), (max_provable + 1e-6, False)):
        powered = loss_threshold_attack(
            TIED_MEMBERS,
            TIED_NONMEMBERS,
            fpr_levels=fpr_levels,
            epsilon=claimed,
            delta=delta,
            n_boot=0,
            ci_level=ci_level,
        )
        assert powered["can_refute_dp_epsilon"] is can


def test_epsilon_lower_bound_is_corrected_at_every_level() -> None:
    """Overlapping losses, so each level has its own TP and FP (false positives included): the
    ε lower bound is the best level's, from ends at alpha / (2·levels), and a claimed ε
    between the corrected and the uncorrected bound is not refuted."""
    rng = np.random.default_rng(4)
    members = rng.normal(0.0, 1.0, 400)
    nonmembers = rng.normal(1.5, 1.0, 400)
    delta, fpr_levels = 1e-5, [0.05, 0.2]

    def attack(epsilon: float | None) -> dict:
        return loss_threshold_attack(
            members, nonmembers, fpr_levels=fpr_levels, epsilon=epsilon, delta=delta, n_boot=0
        )

    def bound(entry: dict, tail: float) -> float:
        tp = round(entry["tpr"] * entry["members_evaluated"])
        fp = round(entry["fpr"] * entry["nonmembers_evaluated"])
        low, high = _one_sided(
            tp, entry["members_evaluated"], fp, entry["nonmembers_evaluated"], tail
        )
        return math.log((low - delta) / high)

    result = attack(None)
    entries = result["at_fpr"]
    counts = [(round(e["tpr"] * 400), round(e["fpr"] * 200)) for e in entries]
    assert counts[0] != counts[1] and all(fp > 0 for _, fp in counts)
    corrected = max(bound(e, 0.05 / 4) for e in entries)
    uncorrected = max(bound(e, 0.05 / 2) for e in entries)
    assert result["epsilon_lower_bound"] == pytest.approx(corrected, rel=1e-12)
    assert corrected < uncorrected - 0.05
    between = attack((corrected + uncorrected) / 2)
    assert between["beats_dp_bound"] is False
    assert [e["beats_dp_bound"] for e in between["at_fpr"]] == [False, False]
    below = attack(corrected - 1e-6)
    assert below["beats_dp_bound"] is True


def test_auc_interval_ends_are_the_declared_quantiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AUC interval is the (1 ∓ ci_level)/2 quantile pair of the bootstrap AUCs.

    The stand-in bootstrap gives 0, 1/10000, ..., 1 in random order, whose q-quantile is q.
    """
    known = np.random.default_rng(0).permutation(10_001) / 10_000

    def bootstrap_auc(
        members: np.ndarray, nonmembers: np.ndarray, *, n_boot: int, seed: int
    ) -> np.ndarray:
        assert n_boot == len(known)
        return known

    monkeypatch.setattr(membership, "_bootstrap_auc", bootstrap_auc)
    rng = np.random.default_rng(1)
    for ci_level in (0.8, 0.9, 0.95, 0.99):
        result = loss_threshold_attack(
            rng.normal(0, 1, 50),
            rng.normal(1, 1, 50),
            fpr_levels=[0.1],
            epsilon=None,
            delta=None,
            n_boot=len(known),
            ci_level=ci_level,
        )
        alpha = (1 - ci_level) / 2
        assert result["auc"]["ci"] == pytest.approx([alpha, 1 - alpha], abs=1e-12)
        assert result["confidence"] == ci_level


# --------------------------------------------------------------------------- one-run bound


def test_epsilon_lower_bound_one_run() -> None:
    """Zero at chance, grows with right guesses, and δ > 0 can only lower it."""
    m, r = 1000, 500
    assert epsilon_lower_bound_one_run(m, r, r // 2, delta=0.0) == 0.0
    assert epsilon_lower_bound_one_run(m, r, r // 2, delta=1e-5) == 0.0
    assert epsilon_lower_bound_one_run(m, 0, 0, delta=1e-5) == 0.0
    bounds = [epsilon_lower_bound_one_run(m, r, v, delta=0.0) for v in (250, 300, 400, 450, 500)]
    assert bounds[0] == 0.0
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    # Perfect guesses with δ = 0: P[Bin(r, q) = r] = q^r = 0.05 has a closed form.
    q = 0.05 ** (1 / r)
    assert bounds[-1] > 3
    assert bounds[-1] == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    for v in (300, 500):
        with_delta = epsilon_lower_bound_one_run(m, r, v, delta=1e-5)
        assert with_delta <= epsilon_lower_bound_one_run(m, r, v, delta=0.0)
        assert with_delta > 0
        # It is the largest ε the guesses reject at 95% confidence.
        assert _p_value_dp_audit(m, r, v, with_delta, 1e-5) < 0.05
        assert _p_value_dp_audit(m, r, v, with_delta + 1e-3, 1e-5) >= 0.05
    with pytest.raises(ValueError, match=re.escape("need 0 <= v <= r <= m, got v=9 r=8 m=10")):
        epsilon_lower_bound_one_run(10, 8, 9, delta=0.0)


# --------------------------------------------------------------------------- canaries


def test_canary_audit_perfect_separation() -> None:
    """Included canaries with tiny loss and excluded ones with large loss: every guess right."""
    m = 200
    included = np.arange(m) % 2 == 0
    losses = np.where(included, 0.01, 5.0)
    result = canary_audit(losses, included, included, num_labels=4, delta=1e-5, epsilon=1.0)
    assert result["guesses"] == 2 * (m // 4) == 100
    assert result["right_guesses"] == result["guesses"]
    assert result["epsilon_lower_bound"] > 1.0
    assert result["exceeds_dp_epsilon"] is True
    assert result["memorised"] == {
        "included_predicted_own_label": 100,
        "included": 100,
        "excluded_predicted_own_label": 0,
        "excluded": 100,
        "chance_rate": 0.25,
    }
    generous = canary_audit(losses, included, included, num_labels=4, delta=1e-5, epsilon=50.0)
    assert generous["exceeds_dp_epsilon"] is False
    assert generous["epsilon_lower_bound"] == result["epsilon_lower_bound"]


def test_canary_audit_random_losses_give_no_bound() -> None:
    """Losses unrelated to inclusion: guesses at chance, no evidence of leakage."""
    rng = np.random.default_rng(0)
    m = 1000
    included = rng.random(m) < 0.5
    result = canary_audit(
        rng.exponential(1.0, m),
        included,
        rng.random(m) < 0.5,
        num_labels=2,
        delta=1e-5,
        epsilon=None,
    )
    assert result["guesses"] == 500
    assert abs(result["right_guesses"] - 250) < 40
    assert result["epsilon_lower_bound"] < 0.1
    assert "exceeds_dp_epsilon" not in result
    assert result["included"] == int(included.sum())


def test_canary_audit_needs_four_canaries() -> None:
    with pytest.raises(ValueError, match="^the canary audit needs at least 4 canaries$"):
        canary_audit(
            np.array([0.1, 0.2, 0.3]),
            np.array([True, False, True]),
            np.array([True, False, True]),
            num_labels=2,
            delta=1e-5,
            epsilon=1.0,
        )


def test_canary_audit_breaks_ties_by_canary_order_and_takes_plain_lists() -> None:
    """Equal losses keep the canaries' order (a stable sort): the same inputs always give the
    same guesses. Lists of 0/1 and floats are read as booleans and losses."""
    rng = np.random.default_rng(1)
    m = 40
    losses = rng.integers(0, 3, m).astype(float)  # many ties
    included = rng.random(m) < 0.5
    k = m // 4
    order = sorted(range(m), key=lambda i: losses[i])  # Python's sort is stable
    right = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
    assert right == 12
    result = canary_audit(losses, included, included, num_labels=3, delta=1e-5, epsilon=None)
    assert result["right_guesses"] == right
    as_lists = canary_audit(
        [int(x) for x in losses],
        [int(x) for x in included],
        [int(x) for x in included],
        num_labels=3,
        delta=1e-5,
        epsilon=None,
    )
    assert as_lists == result
    assert as_lists["memorised"]["included_predicted_own_label"] == int(included.sum())
    assert as_lists["memorised"]["excluded_predicted_own_label"] == 0


def test_canary_audit_reports_every_field_at_the_asked_confidence() -> None:
    m = 40
    included = np.arange(m) % 2 == 0
    losses = np.where(included, 0.01, 5.0)
    own = np.arange(m) % 4 == 0  # half of the included canaries, none of the others
    result = canary_audit(
        losses, included, own, num_labels=5, delta=1e-6, epsilon=2.0, confidence=0.9
    )
    bound = epsilon_lower_bound_one_run(m, 20, 20, delta=1e-6, confidence=0.9)
    assert bound != epsilon_lower_bound_one_run(m, 20, 20, delta=1e-6)  # the confidence matters
    assert result == {
        "canaries": 40,
        "included": 20,
        "guesses": 20,
        "right_guesses": 20,
        "epsilon_lower_bound": bound,
        "max_provable_epsilon": bound,
        "confidence": 0.9,
        "delta": 1e-6,
        "memorised": {
            "included_predicted_own_label": 10,
            "included": 20,
            "excluded_predicted_own_label": 0,
            "excluded": 20,
            "chance_rate": 0.2,
        },
        "method": "one-run auditing (Steinke, Nasr & Jagielski 2023), loss scores, top/bottom quarter guessed",
        "exceeds_dp_epsilon": bound > 2.0,
    }


# --------------------------------------------------------------------------- exact small cases


@pytest.mark.parametrize(
    ("member_losses", "nonmember_losses"),
    [([0.0, 5.0], [1.0, 1.0]), ([1.0, 1.0], [0.0, 5.0])],
)
def test_bootstrap_resamples_every_member_and_every_non_member(
    member_losses: list[float], nonmember_losses: list[float]
) -> None:
    """The smallest audit allowed (2 members, 2 non-members) runs, and the bootstrap draws every
    row: with one row of a pair above the other pair and one below, a resample's AUC is 0, 1/2
    or 1 (by how often the first row is drawn), so the 95% interval is exactly [0, 1]."""
    result = loss_threshold_attack(
        np.array(member_losses),
        np.array(nonmember_losses),
        fpr_levels=[0.5],
        epsilon=None,
        delta=None,
        n_boot=200,
    )
    assert (result["members"], result["nonmembers"]) == (2, 2)
    assert result["auc"] == {"value": 0.5, "ci": [0.0, 1.0]}
    (entry,) = result["at_fpr"]
    assert (entry["members_evaluated"], entry["nonmembers_evaluated"]) == (2, 1)


def test_attack_is_reproducible_from_its_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bootstrap is drawn from the attack's seed (0 and 1000 resamples by default): the same
    seed gives the same resamples, another seed other ones."""
    rng = np.random.default_rng(7)
    members, nonmembers = rng.normal(0.0, 1.0, 30), rng.normal(0.5, 1.0, 30)
    first = membership._bootstrap_auc(-members, -nonmembers, n_boot=100, seed=3)
    assert np.array_equal(
        first, membership._bootstrap_auc(-members, -nonmembers, n_boot=100, seed=3)
    )
    assert not np.array_equal(
        first, membership._bootstrap_auc(-members, -nonmembers, n_boot=100, seed=4)
    )

    calls: list[dict[str, int]] = []

    def spy(member_scores: np.ndarray, nonmember_scores: np.ndarray, **kwargs: int) -> np.ndarray:
        calls.append(kwargs)
        return np.linspace(0.0, 1.0, kwargs["n_boot"])

    monkeypatch.setattr(membership, "_bootstrap_auc", spy)
    default = loss_threshold_attack(members, nonmembers, fpr_levels=[0.1], epsilon=None, delta=None)
    explicit = loss_threshold_attack(
        members, nonmembers, fpr_levels=[0.1], epsilon=None, delta=None, n_boot=1000, seed=0
    )
    assert calls == [{"n_boot": 1000, "seed": 0}] * 2
    assert default == explicit  # the same half split of the non-members, too


def test_attack_reads_losses_as_floats() -> None:
    """Unsigned integer losses (which would wrap round if negated in their own type) give the
    same audit as the same losses as floats."""
    members, nonmembers = np.array([0, 2], dtype=np.uint8), np.array([1, 3], dtype=np.uint8)

    def attack(m: np.ndarray, n: np.ndarray) -> dict:
        return loss_threshold_attack(m, n, fpr_levels=[0.5], epsilon=1.0, delta=1e-5, n_boot=50)

    as_ints = attack(members, nonmembers)
    assert as_ints["auc"]["value"] == 0.75  # 3 of the 4 member/non-member pairs ordered right
    assert as_ints == attack(members.astype(float), nonmembers.astype(float))


def test_canary_audit_counts_unbalanced_inclusion_and_a_tied_epsilon_is_not_exceeded() -> None:
    """9 of 12 canaries included, every guess right; a claimed ε equal to the lower bound is
    not exceeded (the bound must be strictly above it), one just under it is."""
    included = np.arange(12) < 9
    losses = np.where(included, 0.1, 3.0)
    bound = epsilon_lower_bound_one_run(12, 6, 6, delta=1e-5)
    assert bound > 0.3

    def audit(epsilon: float) -> dict:
        return canary_audit(losses, included, included, num_labels=2, delta=1e-5, epsilon=epsilon)

    result = audit(bound)
    assert (result["included"], result["guesses"], result["right_guesses"]) == (9, 6, 6)
    assert result["epsilon_lower_bound"] == bound
    assert result["exceeds_dp_epsilon"] is False
    assert result["memorised"] == {
        "included_predicted_own_label": 9,
        "included": 9,
        "excluded_predicted_own_label": 0,
        "excluded": 3,
        "chance_rate": 0.5,
    }
    assert audit(bound - 1e-9)["exceeds_dp_epsilon"] is True


def test_canary_audit_reads_losses_as_numbers_and_flags_as_booleans() -> None:
    """Losses given as decimal text are ordered as numbers ("10" is the highest, not "9"), and
    any non-zero flag counts as one True."""
    as_text = canary_audit(
        ["10", "9", "0.5", "0.25"],
        np.array([0, 3, 1, 1]),
        np.array([0, 2, 0, 7]),
        num_labels=2,
        delta=1e-5,
        epsilon=None,
    )
    # Guessed in: the 0.25 canary (included); guessed out: the 10 canary (excluded).
    assert as_text["right_guesses"] == 2
    assert as_text["memorised"]["included_predicted_own_label"] == 2
    assert as_text == canary_audit(
        np.array([10.0, 9.0, 0.5, 0.25]),
        np.array([False, True, True, True]),
        np.array([False, True, False, True]),
        num_labels=2,
        delta=1e-5,
        epsilon=None,
    )


def test_clopper_pearson_with_one_trial() -> None:
    """One trial: the interval is [0, 1 - alpha/2] after a failure and [alpha/2, 1] after a
    success (Beta(1, 1) is uniform, so its quantiles are the tail probabilities)."""
    assert clopper_pearson(0, 1, 0.05) == pytest.approx((0.0, 0.975), abs=1e-15)
    assert clopper_pearson(1, 1, 0.1) == pytest.approx((0.05, 1.0), abs=1e-15)


def test_non_member_split_is_drawn_from_seed_plus_one() -> None:
    """The calibration half is the first half of a permutation drawn with seed + 1 (the
    bootstrap has the seed itself), so a seed's audit numbers stay reproducible.

    Non-member i has loss i and member i loss i + 0.5; at FPR levels 0.2 ... 0.8 the thresholds
    are the four lowest calibration losses c_0 < ... < c_3, so level j has TP = c_j and
    FP = c_j - j (the non-members below c_j, all held out)."""
    for seed, calibration in ((0, [0, 1, 4, 7, 8]), (1, [0, 2, 6, 7, 9])):
        assert sorted(np.random.default_rng(seed + 1).permutation(10)[:5]) == calibration
        result = loss_threshold_attack(
            np.arange(10) + 0.5,
            np.arange(10.0),
            fpr_levels=[0.2, 0.4, 0.6, 0.8],
            epsilon=None,
            delta=None,
            n_boot=0,
            seed=seed,
        )
        entries = result["at_fpr"]
        assert [e["tpr"] * 10 for e in entries] == pytest.approx(calibration[:4], abs=1e-12)
        expected_fp = [c - j for j, c in enumerate(calibration[:4])]
        assert [e["fpr"] * 5 for e in entries] == pytest.approx(expected_fp, abs=1e-12)


@pytest.mark.parametrize(
    ("r", "v", "eps", "delta", "expected"),
    [
        # q = 1/2, Bin(2, q) = [1, 2, 1]/4: beta = 1/4, alpha = max(P[1]/1, P[0..1]/2) = 1/2.
        (2, 2, 0.0, 0.01, 1 / 4 + 1 / 2 * 0.01 * 2 * 10),
        # Bin(4, 1/2) = [1, 4, 6, 4, 1]/16: beta = 1/16, alpha = P[2..3]/2 = 5/16 (i = 2 is
        # the largest of 4/16, 10/32, 14/48, 15/64).
        (4, 4, 0.0, 0.01, 1 / 16 + 5 / 16 * 0.01 * 2 * 10),
        # q = 1/(1 + e^-ln 3) = 3/4, Bin(2, q) = [1, 6, 9]/16: beta = 9/16, alpha = 6/16.
        (2, 2, math.log(3), 0.01, 9 / 16 + 6 / 16 * 0.01 * 2 * 10),
        (2, 1, math.log(3), 0.0, 15 / 16),  # without δ it is P[Bin(2, 3/4) >= 1]
        (2, 2, math.log(3), 0.1, 1.0),  # 9/16 + 6/16 * 0.1 * 20 = 1.3125, capped at 1
    ],
)
def test_p_value_of_the_one_run_audit_by_hand(
    r: int, v: int, eps: float, delta: float, expected: float
) -> None:
    """Theorem 3 of Steinke et al. (2023): P = beta + alpha·δ·2m with beta = P[Bin(r, q) >= v],
    q = e^ε/(1 + e^ε) and alpha = max over i = 1..v of P[v - i <= Bin(r, q) < v] / i; m = 10."""
    assert _p_value_dp_audit(10, r, v, eps, delta) == pytest.approx(expected, rel=1e-12)


def _assert_same(actual: object, expected: object) -> None:
    """Equal structure, keys, strings, flags and None; floats equal to 1e-12 (relative)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert sorted(actual) == sorted(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    elif isinstance(expected, float):
        assert type(actual) is float and actual == pytest.approx(expected, rel=1e-12, abs=1e-15)
    else:
        assert type(actual) is type(expected) and actual == expected


def test_attack_report_by_hand() -> None:
    """Every field of the report on a small case worked out by hand (ci_level 0.8, 3 levels).

    Non-members have losses 0 1 2 3 4 4 6 7 8 9; with seed 0 the calibration half is rows
    0 1 4 7 8 (losses 0 1 4 7 8) and the held-out half the losses 2 3 4 6 9. At FPR levels
    0.2, 0.4, 0.6 the thresholds are the calibration losses 0, 1 and 4 (the "higher" 0.8, 0.6,
    0.4 quantiles of their scores). 17 members have loss 0.5, then one each 3, 4 and 6: TP is
    0, 17, 18 of 20 and FP 0, 0, 2 of 5 (a loss equal to the threshold is not called a member).
    """
    members = np.r_[np.full(17, 0.5), 3.0, 4.0, 6.0]
    nonmembers = np.array([0, 1, 2, 3, 4, 4, 6, 7, 8, 9], dtype=float)
    delta, tail = 0.01, 0.2 / (2 * 3)  # each corrected end: alpha / (2 * levels)

    def shown(k: int, n: int) -> list[float]:  # the uncorrected 80% interval
        ci = binomtest(k, n).proportion_ci(confidence_level=0.8, method="exact")
        return [ci.low, ci.high]

    tpr_low = _one_sided(17, 20, 0, 5, tail)[0]  # the best level: TP 17 of 20, FP 0 of 5
    fpr_high = 1 - tail ** (1 / 5)
    best_tpr_low = tail ** (1 / 20)  # a perfect attack: 20 of 20 members, 0 of 5 non-members

    def attack(epsilon: float | None, delta: float | None) -> dict:
        return loss_threshold_attack(
            members,
            nonmembers,
            fpr_levels=[0.2, 0.4, 0.6],
            epsilon=epsilon,
            delta=delta,
            n_boot=0,
            ci_level=0.8,
            seed=0,
        )

    def entry(level: float, tp: int, fp: int, **dp: object) -> dict:
        return {
            "target_fpr": level,
            "fpr": fp / 5,
            "fpr_ci": shown(fp, 5),
            "tpr": tp / 20,
            "tpr_ci": shown(tp, 20),
            "members_evaluated": 20,
            "nonmembers_evaluated": 5,
            **dp,
        }

    # AUC: 17 members beat 9 non-members each; the members at 3, 4, 6 beat 6, 4, 3 and tie
    # 1, 2, 1: (153 + 6.5 + 5 + 3.5) / 200.
    without_dp = {
        "attack": "loss threshold (Yeom et al. 2018)",
        "members": 20,
        "nonmembers": 10,
        "auc": {"value": 0.84, "ci": None},
        "mean_loss": {"members": 1.075, "nonmembers": 4.4},
        "at_fpr": [entry(0.2, 0, 0), entry(0.4, 17, 0), entry(0.6, 18, 2)],
        "epsilon_lower_bound": math.log(tpr_low / fpr_high),
        "max_provable_epsilon": math.log(best_tpr_low / fpr_high),
        "confidence": 0.8,
        "interpretation": "a lower bound from one attack: a model that passes may still leak to a stronger attacker",
    }
    _assert_same(attack(None, None), without_dp)

    epsilon_lower = math.log((tpr_low - delta) / fpr_high)
    assert 0.2 < epsilon_lower < 0.3
    bound = math.exp(0.2) * 0.4 + delta
    with_dp = without_dp | {
        "at_fpr": [
            entry(0.2, 0, 0, dp_bound_tpr=delta, beats_dp_bound=False),
            entry(0.4, 17, 0, dp_bound_tpr=delta, beats_dp_bound=True),
            entry(0.6, 18, 2, dp_bound_tpr=bound, beats_dp_bound=False),
        ],
        "epsilon_lower_bound": epsilon_lower,
        "max_provable_epsilon": math.log((best_tpr_low - delta) / fpr_high),
        "dp_epsilon": 0.2,
        "dp_delta": delta,
        "can_refute_dp_epsilon": True,
        "beats_dp_bound": True,
    }
    _assert_same(attack(0.2, delta), with_dp)

    # ε = 1: e·0.4 + δ > 1 is capped at 1; nothing is refuted and nothing could be.
    generous = attack(1.0, delta)
    assert [e["dp_bound_tpr"] for e in generous["at_fpr"]] == [delta, delta, 1.0]
    assert [e["beats_dp_bound"] for e in generous["at_fpr"]] == [False, False, False]
    assert generous["beats_dp_bound"] is False
    assert generous["can_refute_dp_epsilon"] is False
    assert generous["epsilon_lower_bound"] == pytest.approx(epsilon_lower, rel=1e-12)


@pytest.mark.parametrize(
    ("m", "r", "confidence"),
    [
        (4, 4, 0.9),  # every canary guessed (r = m)
        (4, 4, 0.8),
        (40, 20, 0.95),  # a bound between 1 and 2
        (1, 1, 0.4),  # one guess: the bound is log(0.6 / 0.4)
        # The p-value at ε = 1 (q = 1/(1 + e^-1)) is exactly 1 - confidence: ε = 1 is not
        # rejected, and the bound is the largest representable step below it.
        (1, 1, 1 - 1 / (1 + math.exp(-1))),
    ],
)
def test_one_run_bound_with_every_guess_right_by_hand(m: int, r: int, confidence: float) -> None:
    """δ = 0 and all r guesses right: the p-value is P[Bin(r, q) = r] = q^r, so the bound is
    log(q / (1 - q)) at q = (1 - confidence)^(1/r). Forty bisection steps over [0, ⌈ε⌉] find
    it from below to within ⌈ε⌉·2^-40: that ε is rejected, ε plus one step is not."""
    p = 1 - confidence
    bound = epsilon_lower_bound_one_run(m, r, r, delta=0.0, confidence=confidence)
    q = p ** (1 / r)
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-11)
    step = 2.0**-40 * max(1, math.ceil(bound))
    assert _p_value_dp_audit(m, r, r, bound, 0.0) < p
    assert _p_value_dp_audit(m, r, r, bound + step, 0.0) >= p


def test_attack_flags_need_the_bound_strictly_beaten() -> None:
    """The data of test_attack_report_by_hand. A claimed (ε, δ) whose bound e^ε·FPR_high + δ
    equals the best level's TPR_low exactly is not beaten; an infinite ε is never beaten and
    bounds the TPR by 1."""
    members = np.r_[np.full(17, 0.5), 3.0, 4.0, 6.0]
    nonmembers = np.array([0, 1, 2, 3, 4, 4, 6, 7, 8, 9], dtype=float)
    bonferroni = (1 - 0.8) / 3
    tpr_low = clopper_pearson(17, 20, bonferroni)[0]  # level 0.4: TP 17 of 20, FP 0 of 5
    fpr_high = clopper_pearson(0, 5, bonferroni)[1]
    delta = tpr_low - math.exp(0.1) * fpr_high
    assert math.exp(0.1) * fpr_high + delta == tpr_low and 0.05 < delta < 0.1

    def attack(epsilon: float) -> dict:
        return loss_threshold_attack(
            members,
            nonmembers,
            fpr_levels=[0.2, 0.4, 0.6],
            epsilon=epsilon,
            delta=delta,
            n_boot=0,
            ci_level=0.8,
            seed=0,
        )

    assert [e["beats_dp_bound"] for e in attack(0.1)["at_fpr"]] == [False, False, False]
    assert [e["beats_dp_bound"] for e in attack(0.1 - 1e-9)["at_fpr"]] == [False, True, False]
    unbounded = attack(math.inf)
    assert [e["dp_bound_tpr"] for e in unbounded["at_fpr"]] == [1.0, 1.0, 1.0]
    assert [e["beats_dp_bound"] for e in unbounded["at_fpr"]] == [False, False, False]
    assert unbounded["beats_dp_bound"] is False
    assert unbounded["can_refute_dp_epsilon"] is False


def test_attack_compares_a_claimed_epsilon_without_delta_and_at_the_audit_power() -> None:
    """The data of test_attack_report_by_hand. With an ε but no δ the levels carry no flags,
    yet the ε lower bound (δ taken as 0) is still compared with the claim; a claimed ε equal
    to the audit's power (max_provable_epsilon) cannot be refuted, one just under it can."""
    members = np.r_[np.full(17, 0.5), 3.0, 4.0, 6.0]
    nonmembers = np.array([0, 1, 2, 3, 4, 4, 6, 7, 8, 9], dtype=float)

    def attack(epsilon: float, delta: float | None) -> dict:
        return loss_threshold_attack(
            members,
            nonmembers,
            fpr_levels=[0.2, 0.4, 0.6],
            epsilon=epsilon,
            delta=delta,
            n_boot=0,
            ci_level=0.8,
            seed=0,
        )

    pure = attack(0.1, None)
    tail = 0.2 / 6
    expected = math.log(_one_sided(17, 20, 0, 5, tail)[0] / (1 - tail ** (1 / 5)))
    assert pure["epsilon_lower_bound"] == pytest.approx(expected, rel=1e-12)
    assert 0.25 < expected < 0.3
    assert all("beats_dp_bound" not in e and "dp_bound_tpr" not in e for e in pure["at_fpr"])
    assert (pure["dp_epsilon"], pure["dp_delta"]) == (0.1, None)
    assert pure["beats_dp_bound"] is True
    assert attack(0.5, None)["beats_dp_bound"] is False
    assert attack(pure["epsilon_lower_bound"], None)["beats_dp_bound"] is False  # not beyond

    power = attack(0.1, 1e-3)["max_provable_epsilon"]
    assert power == pytest.approx(math.log((tail ** (1 / 20) - 1e-3) / (1 - tail ** (1 / 5))))
    assert attack(power, 1e-3)["can_refute_dp_epsilon"] is False
    assert attack(power - 1e-9, 1e-3)["can_refute_dp_epsilon"] is True
