"""Privacy accounting: ε from a step history, σ for a target, the plan of a (resumed) run.

Pure functions of the mechanism's parameters (σ, q, steps, δ); Opacus' accountants are
imported only when an ε is computed, so reading or checking a ledger needs no torch.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LEDGER_SCHEMA_VERSION",
    "MIN_SIGMA",
    "TEST_SEED_ENV",
    "VOID_REASON",
    "History",
    "NoisePlan",
    "PrivacyError",
    "SpentBudget",
    "compute_epsilons",
    "default_delta",
    "describe_noise",
    "guarantee_is_void",
    "max_steps_within",
    "noise_segments",
    "plan_noise",
    "prior_history",
    "sample_rate_for",
    "sigma_for_target",
]

logger = logging.getLogger(__name__)

LEDGER_SCHEMA_VERSION = 1
# Fixing the DP randomness makes runs reproducible for tests and voids the guarantee.
TEST_SEED_ENV = "HUBTUNE_UNSAFE_DP_SEED"


class PrivacyError(RuntimeError):
    """DP cannot be applied as asked; the message says why and how to fix it."""


def default_delta(n: int) -> float:
    """A δ well below 1/n: min(1e-5, 1/(10 n)) rounded down to a power of ten.

    The rounding keeps the published δ from stating the training-set size exactly.
    """
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10 * n))))


def sample_rate_for(n: int, logical_batch_size: int) -> float:
    """Poisson rate q with an integer number of steps per epoch (what Opacus samples with)."""
    return 1.0 / math.ceil(n / logical_batch_size)


def _memoize_rdp_orders() -> None:
    """Cache Opacus' RDP of the subsampled Gaussian at one order, a pure function of (q, σ, α).

    Every ε (RDP directly, and PRV through its domain bound) evaluates it for ~150 orders, and
    the fractional ones run a Python series (~2 ms each): a run's σ search, budget guard and
    per-epoch reports spent seconds recomputing the same values. The result at each (q, σ, α)
    is the library's own, unchanged; ``steps`` still multiplies outside the cache.
    """
    import functools

    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(rdp._compute_rdp)


def compute_epsilons(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """ε at ``delta`` under PRV and RDP for an accountant history [(σ, q, steps), ...]."""
    return {name: _epsilon(name, history, delta) for name in ("prv", "rdp")}


def _epsilon(accountant_name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return 0.0
    if min(float(h[0]) for h in history) < 0.3:
        # The PRV accountant's grid grows without bound as σ -> 0 (gigabytes at σ = 0.01); such
        # a run gives no meaningful guarantee, so report it as unbounded instead of computing it.
        return float("inf")
    _memoize_rdp_orders()
    accountant = PRVAccountant() if accountant_name == "prv" else RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def max_steps_within(
    *,
    accountant: str,
    prior: list[tuple[float, float, int]],
    sigma: float,
    q: float,
    delta: float,
    target: float,
    upper: int,
) -> int:
    """The most steps at (σ, q), after ``prior``, whose ε stays at or below ``target``."""

    def eps(steps: int) -> float:
        return _epsilon(accountant, [*prior, (sigma, q, steps)] if steps else list(prior), delta)

    if eps(upper) <= target:
        return upper
    lo, hi = 0, upper  # eps(lo) <= target < eps(hi)
    if eps(0) > target:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


History = list[tuple[float, float, int]]


def steps_in(history: History) -> int:
    """The DP steps an accountant history [(σ, q, steps), ...] records."""
    return sum(int(h[2]) for h in history)


@dataclass(frozen=True)
class SpentBudget:
    """What an interrupted DP run spent, as its checkpoint records it.

    ``history`` is the accountant's history of the run so far (not the base model's prior);
    ``sigma`` and ``planned_steps`` are the plan it was trained under, so a resume that plans
    the same total continues with exactly the same noise.
    """

    history: History
    sigma: float
    planned_steps: int
    max_steps: int

    @property
    def steps(self) -> int:
        return steps_in(self.history)

    def to_json(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "noise_multiplier": self.sigma,
            "planned_steps": self.planned_steps,
            "max_steps": self.max_steps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpentBudget:
        return cls(
            history=[(float(s), float(q), int(k)) for s, q, k in data["history"]],
            sigma=float(data["noise_multiplier"]),
            planned_steps=int(data["planned_steps"]),
            max_steps=int(data["max_steps"]),
        )


@dataclass(frozen=True)
class NoisePlan:
    """The noise of the steps still to take, and how many steps (in all) the budget allows."""

    sigma: float
    planned_steps: int  # this run's steps in all, spent ones included
    max_steps: int  # the most steps of this run, spent ones included, that fit in the target


def plan_noise(
    *,
    section: Any,
    prior: History,
    spent: SpentBudget | None,
    q: float,
    planned_steps: int,
    delta: float,
) -> NoisePlan:
    """Plan σ for the steps still to take, from the privacy already spent.

    ``prior`` is the base model's earlier DP training; ``spent`` what this run spent before it
    was interrupted. A resumed run whose plan is unchanged keeps its σ (it continues exactly);
    one whose ``train.epochs`` grew plans σ for the remaining steps given the history actually
    spent, so the final ε never exceeds the target.

    Raises:
        PrivacyError: the target is already spent, or cannot cover the remaining steps.
    """
    if spent is not None and spent.planned_steps == planned_steps:
        return NoisePlan(spent.sigma, spent.planned_steps, spent.max_steps)
    if spent is not None and any(abs(h[1] - q) > 1e-12 for h in spent.history):
        raise PrivacyError(
            f"the checkpoint's DP steps were sampled at rates {sorted({h[1] for h in spent.history})}, "
            f"this run samples at q = {q}: the data or batch size changed; use --overwrite"
        )
    done = spent.steps if spent is not None else 0
    before = [*prior, *(spent.history if spent is not None else [])]
    remaining = planned_steps - done
    if remaining <= 0:
        raise PrivacyError(
            f"this run already took {done} DP steps; {planned_steps} are planned. Raise train.epochs "
            "to train on, or use --overwrite to start over."
        )
    if section.noise_multiplier is not None:  # no target: ε is whatever these steps spend
        return NoisePlan(float(section.noise_multiplier), planned_steps, planned_steps)
    target = float(section.target_epsilon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spent_eps = _epsilon(section.accountant, before, delta) if before else 0.0
    if spent_eps >= target:
        raise PrivacyError(_spent_message(spent, spent_eps, target, section.accountant))
    try:
        sigma = sigma_for_target(
            accountant=section.accountant,
            prior=before,
            q=q,
            steps=remaining,
            delta=delta,
            target=target,
        )
    except PrivacyError:
        if spent is None:
            raise
        fits = max_steps_within(
            accountant=section.accountant,
            prior=before,
            sigma=spent.sigma,
            q=q,
            delta=delta,
            target=target,
            upper=remaining,
        )
        raise PrivacyError(
            f"{_spent_message(spent, spent_eps, target, section.accountant)}; no noise multiplier up "
            f"to 1e5 fits {remaining} more steps in the rest. At the σ used so far ({spent.sigma:.4g}) "
            f"{fits} more step(s) fit. Keep train.epochs at what the checkpoint planned, or start over "
            "with --overwrite so σ is planned for all epochs at once."
        ) from None
    fits = max_steps_within(
        accountant=section.accountant,
        prior=before,
        sigma=sigma,
        q=q,
        delta=delta,
        target=target,
        upper=remaining,
    )
    if fits == 0:
        raise PrivacyError(
            f"not even one step fits in target ε = {target} at σ = {sigma:g}; raise the target"
        )
    return NoisePlan(sigma, planned_steps, done + fits)


def _spent_message(
    spent: SpentBudget | None, spent_eps: float, target: float, accountant: str
) -> str:
    if spent is None:
        return (
            f"the base model's earlier DP training already spent ε = {spent_eps:.3g} ≥ target {target}; "
            "raise privacy.target_epsilon"
        )
    return (
        f"the resumed run (with any earlier training of its base model) has already spent ε = "
        f"{spent_eps:.4g} ({accountant.upper()}) of its target {target} in {spent.steps} steps"
    )


def noise_segments(history: History) -> list[dict[str, Any]]:
    """The accountant history as one record per stretch of steps at one (σ, q)."""
    return [
        {"noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps)}
        for sigma, q, steps in history
    ]


def describe_noise(history: History) -> str:
    """σ as it was spent: "σ 0.949" or "σ 0.949 for 20 steps, then 1.09 for 20 steps"."""
    segments = noise_segments(history)
    if len({s["noise_multiplier"] for s in segments}) <= 1:
        return f"σ {segments[0]['noise_multiplier']:.4g}" if segments else "no DP step"
    parts = [f"{s['noise_multiplier']:.4g} for {s['steps']} steps" for s in segments]
    return "σ " + ", then ".join(parts) + " (re-planned when the run was resumed)"


VOID_REASON = (
    f"{TEST_SEED_ENV} fixed the DP sampling and noise (testing only); anyone who knows the seed "
    "can remove the noise, so this model has no privacy guarantee"
)


def guarantee_is_void(noise_source: str | None) -> bool:
    """Whether a ledger's noise came from a fixed (public) seed: then no (ε, δ) holds."""
    return str(noise_source or "").startswith("fixed by")


MIN_SIGMA = 0.3  # below it hubtune reports ε as unbounded (see _epsilon)


def sigma_for_target(
    *,
    accountant: str,
    prior: list[tuple[float, float, int]],
    q: float,
    steps: int,
    delta: float,
    target: float,
    tolerance: float = 0.01,
) -> float:
    """The σ whose ε after ``prior`` + ``steps`` steps at rate ``q`` is in [target - tolerance, target].

    The same answer as Opacus' ``get_noise_multiplier`` (ε within ``tolerance`` below the
    target, never above), found in fewer accountant calls: ε falls smoothly with σ, nearly a
    power law, so a bracketed regula falsi on log ε against log σ (Illinois variant, bisection
    as a fallback) needs ~4-7 evaluations where bisection on σ needs ~15. Each evaluation is a
    full PRV computation. Returns ``MIN_SIGMA`` when even that much noise stays under target.
    """
    evaluations = 0

    def gap(sigma: float) -> float:  # log ε - log target: > 0 means too little noise
        nonlocal evaluations
        evaluations += 1
        eps = _epsilon(accountant, [*prior, (sigma, q, steps)], delta)
        return math.log(eps) - math.log(target) if eps > 0 else -math.inf

    # Bracket: lo gives ε above the target, hi at or below it. ε scales roughly as 1/σ, so step
    # by ε/target past the crossing instead of jumping to extreme σ (slow to account; below
    # MIN_SIGMA the PRV grid can exhaust memory).
    sigma, f = 1.0, gap(1.0)
    while True:
        ratio = min(max(math.exp(f), 1 / 16), 16)
        if f > 0:
            lo, f_lo = sigma, f
            sigma = sigma * ratio * 1.25
            if sigma > 1e5:
                raise PrivacyError(f"no noise multiplier up to 1e5 reaches target ε = {target}")
            f = gap(sigma)
            if f <= 0:
                hi, f_hi = sigma, f
                break
        else:
            hi, f_hi = sigma, f
            if sigma <= MIN_SIGMA:
                return MIN_SIGMA
            sigma = max(sigma * ratio * 0.8, MIN_SIGMA)
            f = gap(sigma)
            if f > 0:
                lo, f_lo = sigma, f
                break
    side, true_hi = 0, f_hi  # Illinois halves f_hi/f_lo; the stop test needs hi's real ε
    for _ in range(100):
        if target - target * math.exp(true_hi) <= tolerance or hi - lo <= 1e-6 * hi:
            break
        a, b = math.log(lo), math.log(hi)
        guess = b - f_hi * (b - a) / (f_hi - f_lo) if math.isfinite(f_hi) else (a + b) / 2
        if not a < guess < b:
            guess = (a + b) / 2
        sigma = math.exp(guess)
        f = gap(sigma)
        if f > 0:
            lo, f_lo = sigma, f
            if side == -1:
                f_hi /= 2  # Illinois: keep the stale end from pinning the secant
            side = -1
        else:
            hi, f_hi, true_hi = sigma, f, f
            if side == 1:
                f_lo /= 2
            side = 1
    logger.debug("privacy: σ = %.6g after %d accountant evaluations", hi, evaluations)
    return hi


def prior_history(model_dir: Path) -> History:
    """The DP history of a base model that hubtune trained with DP (its ε keeps counting).

    Read from the ledger saved beside its weights (:data:`hubtune.rundir.PRIVACY_FILE`); the
    public copy pushed to a Hub keeps the history, so a downloaded model counts as well.
    """
    from hubtune.rundir import PRIVACY_FILE

    ledger = model_dir / PRIVACY_FILE
    if not ledger.exists():
        return []
    data = json.loads(ledger.read_text())
    history = [
        (float(s), float(q), int(k))
        for s, q, k in data.get("prior_history", []) + data.get("history", [])
    ]
    logger.info(
        "privacy: base model was trained with DP (epsilon %.3g); its history is carried on",
        data.get("epsilon", float("nan")),
    )
    return history
