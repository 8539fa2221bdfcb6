"""Canary exposure of a language model (Carlini et al. 2019, "The Secret Sharer").

**Canaries.** Before training, random secrets of a fixed format ("my account number is
7 3 9 1 5 0") are put into the training split, some once, some several times (default 1, 4
and 16 copies, each copy its own example). The secret space ``R`` is every string of the
format: ``digits`` spaced digits (``|R| = 10**digits``), or, shaped like personal data so that
scrubbing (``data.anonymize``) acts on them as on real values, a phone number
``(212) NXX-XXXX`` (``shape: phone``, ``|R| = 8 * 10**6``) or an e-mail address of ``digits``
random lower-case letters at example.com (``shape: email``, ``|R| = 26**digits``).

**Exposure.** After training, each canary's secret is ranked among the candidates of ``R`` by
the model's log-perplexity of the secret after the prefix (the sum of its digits' token
losses): ``exposure = log2 |R| - log2 rank``. An unmemorised canary ranks in the middle
(exposure about 1 bit); a memorised one first (exposure ``log2 |R|``, 19.9 bits for 6 digits).
Where ``|R|`` is small enough, every candidate is scored and the rank is exact; otherwise the
rank is estimated from ``samples`` uniformly drawn candidates (the paper's sampling estimate),
with a Clopper-Pearson interval on the share of candidates the canary beats, so exposure has
an interval too (and only a lower bound when no sampled candidate scores better).

**What DP bounds.** Under (ε, δ)-DP for one example, the ``k`` copies of a canary are a group
of ``k`` examples: (kε, k·e^{(k-1)ε}·δ)-DP. A canary the model never saw has a uniformly random
rank, so ``P(exposure ≥ x) = 2^-x``; the group guarantee then gives
``P(exposure ≥ x) ≤ e^{kε}·2^-x + δ_k`` for the trained one. :func:`dp_exposure_bound` reports
the exposure that DP allows with 95% probability: ``x* = log2(e^{kε} / (0.05 − δ_k))`` (capped
at ``log2 |R|``). Exposure above it is evidence that the guarantee does not hold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "dp_exposure_bound",
    "make_exposure_canaries",
    "measure_exposure",
    "summarise_exposure",
]

# Exact ranks up to this many candidates; above it, the sampling estimate.
EXACT_LIMIT = 20_000


SHAPES = ("digits", "phone", "email")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _alphabets(shape: str, length: int) -> list[str]:
    """The symbols each position of a secret draws from."""
    if shape == "digits":
        return ["0123456789"] * length
    if shape == "phone":  # a North American exchange starts 2-9
        if length != 7:
            raise ValueError("a phone-shaped canary has 7 random digits ((212) NXX-XXXX)")
        return ["23456789"] + ["0123456789"] * 6
    if shape == "email":
        return [_LETTERS] * length
    raise ValueError(f"unknown canary shape {shape!r}; known: {SHAPES}")


def secret_space(shape: str, length: int) -> int:
    """``|R|``: how many secrets the format has."""
    return math.prod(len(a) for a in _alphabets(shape, length))


def _render(shape: str, symbols: str) -> str:
    if shape == "digits":
        return " ".join(symbols)
    if shape == "phone":
        return f"(212) {symbols[:3]}-{symbols[3:]}"
    return f"{symbols}@example.com"


def _draw(rng: np.random.Generator, shape: str, length: int) -> str:
    return _render(
        shape, "".join(a[int(rng.integers(0, len(a)))] for a in _alphabets(shape, length))
    )


def _every_secret(shape: str, length: int) -> list[str]:
    alphabets = _alphabets(shape, length)
    return [
        _render(shape, "".join(a[i] for a, i in zip(alphabets, index, strict=True)))
        for index in np.ndindex(*(len(a) for a in alphabets))
    ]


def describe_shape(shape: str, length: int) -> str:
    """The canaries' format in words, for reports."""
    if shape == "phone":
        return "phone numbers, (212) NXX-XXXX"
    if shape == "email":
        return f"e-mail addresses, {length} random letters @example.com"
    return f'"account numbers" of {length} digits'


def make_exposure_canaries(
    *,
    per_repetition: int,
    repetitions: list[int],
    digits: int,
    prefix: str,
    seed: int,
    columns: list[str],
    sensitive: list[str],
    shape: str = "digits",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The canaries (one row each) and the training rows that carry them (one per copy).

    Args:
        columns: The run's text columns: ``["text"]``, ``["prompt", "completion"]`` (then the
            prefix is the prompt and the secret the completion) or ``["messages"]`` (a user
            message, the prefix, answered by the assistant with the secret).
    """
    rng = np.random.default_rng([seed, 0x5EC2E7])
    canaries, rows = [], []
    for copies in repetitions:
        for i in range(per_repetition):
            secret = _draw(rng, shape, digits)
            # "canary:" rows are never scored as members by the membership audit
            canary_id = f"canary:exposure:{copies}x:{i}"
            canaries.append({"canary_id": canary_id, "repetitions": copies, "secret": secret})
            for copy in range(copies):
                row: dict[str, Any] = {"row_id": f"{canary_id}:{copy}"}
                if columns == ["prompt", "completion"]:
                    row.update(prompt=prefix, completion=" " + secret)
                elif columns == ["messages"]:
                    from hubtune.tasks.chat import canonical

                    row["messages"] = canonical(
                        [
                            {"role": "user", "content": prefix},
                            {"role": "assistant", "content": secret},
                        ]
                    )
                else:
                    row["text"] = f"{prefix} {secret}"
                row.update({c: None for c in sensitive})
                rows.append(row)
    return pd.DataFrame(canaries), pd.DataFrame(rows)


def _secret_losses(
    model: Any,
    tokenizer: Any,
    prefix: str,
    secrets: list[str],
    *,
    device: Any,
    batch_size: int,
    chat: bool = False,
) -> np.ndarray:
    """Each secret's log-perplexity after the prefix: the summed loss of its tokens (nats).

    ``chat``: the prefix is a user message and the secret the assistant's answer, rendered by
    the tokenizer's chat template as in training (hubtune.tasks.chat)."""
    import torch
    import torch.nn.functional as F

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if chat:
        from hubtune.tasks.chat import generation_prefix

        head = tokenizer(generation_prefix(tokenizer, prefix), add_special_tokens=False)[
            "input_ids"
        ]
    else:
        head = bos + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = np.empty(len(secrets))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(secrets), batch_size):
        chunk = secrets[start : start + batch_size]
        if chat:  # the answer is its own piece of the rendering, tokenised on its own in training
            answers = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            ids = [list(head) + list(a) for a in answers]
        else:
            encoded = tokenizer([f"{prefix} {s}" for s in chunk], add_special_tokens=False)[
                "input_ids"
            ]
            ids = [bos + list(e) for e in encoded]
        for row in ids:
            if row[: len(head)] != head:  # the prefix must tokenise the same inside the text
                raise ValueError(
                    f"the tokenizer splits the canary prefix {prefix!r} differently inside the "
                    "canary text; choose a prefix that ends at a word boundary"
                )
        width = max(len(r) for r in ids)
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, row in enumerate(ids):
            x[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        with torch.no_grad():
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        target = x[:, 1:].to(device)
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(target.shape)
        keep = mask[:, 1:].to(device).clone()
        keep[:, : len(head) - 1] = 0  # the prefix's own tokens are context, not the secret
        out[start : start + len(chunk)] = (losses * keep).sum(1).cpu().numpy()
    return out


def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    from scipy.stats import beta

    alpha = 1 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def measure_exposure(
    model: Any,
    tokenizer: Any,
    canaries: pd.DataFrame,
    *,
    prefix: str,
    digits: int,
    samples: int,
    seed: int,
    device: Any = "cpu",
    batch_size: int = 256,
    ci_level: float = 0.95,
    chat: bool = False,
    shape: str = "digits",
) -> list[dict[str, Any]]:
    """Each canary's rank among the candidate secrets and its exposure (with an interval).

    Every canary is compared with the same candidates: all of ``R`` when
    ``|R| <= EXACT_LIMIT`` (exact ranks), else ``samples`` uniform draws from ``R``.
    """
    model.eval()
    space = secret_space(shape, digits)
    exact = space <= EXACT_LIMIT
    if exact:
        candidates = _every_secret(shape, digits)
    else:
        rng = np.random.default_rng([seed, 0xE8905])
        candidates = [_draw(rng, shape, digits) for _ in range(samples)]
    scores = _secret_losses(
        model, tokenizer, prefix, candidates, device=device, batch_size=batch_size, chat=chat
    )
    secrets = canaries["secret"].tolist()
    own = _secret_losses(
        model, tokenizer, prefix, secrets, device=device, batch_size=batch_size, chat=chat
    )
    bits = math.log2(space)
    results = []
    for (_, canary), loss in zip(canaries.iterrows(), own, strict=True):
        is_self = np.array([c == canary["secret"] for c in candidates])
        better = int(np.sum((scores < loss) & ~is_self))
        entry: dict[str, Any] = {
            "canary_id": canary["canary_id"],
            "repetitions": int(canary["repetitions"]),
            "log_perplexity": float(loss),
            "method": "exact" if exact else "sampled",
        }
        if exact:
            rank = 1 + better
            entry.update(rank=rank, exposure=bits - math.log2(rank), exposure_ci=None)
        else:
            m = len(candidates) - int(is_self.sum())
            low, high = _clopper_pearson(better, m, ci_level)
            estimated = 1 + better / m * (space - 1)
            entry.update(
                rank=estimated,
                exposure=bits - math.log2(estimated),
                # a higher share of better candidates means a worse rank: the interval flips
                exposure_ci=[
                    bits - math.log2(1 + high * (space - 1)),
                    bits - math.log2(1 + low * (space - 1)),
                ],
                candidates_beaten_by=better,
                candidates_sampled=m,
            )
        results.append(entry)
    return results


def dp_exposure_bound(
    *, epsilon: float, delta: float, repetitions: int, space: int, probability: float = 0.05
) -> float | None:
    """The exposure a k-times-repeated canary reaches with probability at most ``probability``
    under (ε, δ)-DP for one example (group privacy for k copies); None when δ_k is too large."""
    k = repetitions
    group_delta = k * math.exp((k - 1) * epsilon) * delta
    if group_delta >= probability:
        return None
    bound = k * epsilon / math.log(2) + math.log2(1 / (probability - group_delta))
    return min(bound, math.log2(space))


def summarise_exposure(
    per_canary: list[dict[str, Any]],
    *,
    digits: int,
    epsilon: float | None,
    delta: float | None,
    shape: str = "digits",
) -> dict[str, Any]:
    """Exposure per repetition count (mean, min, max over canaries) beside what DP allows."""
    levels = []
    for k in sorted({c["repetitions"] for c in per_canary}):
        values = np.array([c["exposure"] for c in per_canary if c["repetitions"] == k])
        # Bonferroni over the level's canaries: any one above the bound is a 5% event under DP.
        bound = (
            dp_exposure_bound(
                epsilon=epsilon,
                delta=delta or 0.0,
                repetitions=k,
                space=secret_space(shape, digits),
                probability=0.05 / len(values),
            )
            if epsilon is not None
            else None
        )
        levels.append(
            {
                "repetitions": k,
                "canaries": len(values),
                "mean_exposure": float(values.mean()),
                "min_exposure": float(values.min()),
                "max_exposure": float(values.max()),
                "dp_bound": bound,
                "beats_dp_bound": None if bound is None else bool(values.max() > bound),
            }
        )
    return {
        "digits": digits,
        "shape": shape,
        "description": describe_shape(shape, digits),
        "space": secret_space(shape, digits),
        "max_exposure": math.log2(secret_space(shape, digits)),
        "chance_exposure": 1 / math.log(2),  # E[-log2 U], U uniform: an unseen canary
        "method": per_canary[0]["method"] if per_canary else None,
        "levels": levels,
        "per_canary": [{k: v for k, v in c.items() if k != "secret"} for c in per_canary],
    }
