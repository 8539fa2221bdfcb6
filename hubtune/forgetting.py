"""The forgetting check: how much of a text encoder's general behaviour survives fine-tuning.

Catastrophic forgetting is fine-tuning erasing what the pretrained model knew (a learning rate
too high for a small data set is the usual cause). hubtune measures it on text that is not the
task's: the reference set shipped in ``hubtune/assets/reference_sentences.json`` (120 plain
sentences on 12 everyday topics). The pretrained encoder (loaded afresh from its pinned files)
and the fine-tuned one each embed every sentence (the mean of the last hidden layer over its
tokens), and the check reports:

* ``similarity_preserved``: Spearman's rank correlation between the two encoders' cosine
  similarities of all 7,140 sentence pairs. 1 means the fine-tuned encoder orders every pair as
  the pretrained one did; values well below 1 mean its geometry of general language changed.
* ``topic_neighbours``: the share of sentences whose nearest other sentence is on the same topic,
  before and after (a plain-words reading of the same thing: does the encoder still group
  general sentences by what they are about?).

A frozen backbone gives exactly 1 and unchanged neighbours (tested), so the check cannot report
forgetting where no weight moved.

Language models (``text-generation``): the perplexity of the same sentences (each encoded as
training encodes text, ``[bos] tokens [eos]``) under the pretrained and the fine-tuned model,
and their ratio: how much worse the fine-tuned model predicts general English. Image models
(agreement with the base model's ImageNet predictions) are not measured yet.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "REFERENCE_FILE",
    "encoder_of",
    "measure_forgetting",
    "measure_lm_forgetting",
    "reference_sentences",
]

REFERENCE_FILE = Path(__file__).parent / "assets" / "reference_sentences.json"


@cache
def reference_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sentences, their topics), in file order."""
    topics = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))["topics"]
    pairs = [(s, topic) for topic, sentences in topics.items() for s in sentences]
    return tuple(s for s, _ in pairs), tuple(t for _, t in pairs)


def encoder_of(model: Any) -> Any:
    """The transformer body of a classifier (peft-wrapped or not), adapters active."""
    if hasattr(model, "get_base_model"):  # a peft model: the transformers model, LoRA injected
        model = model.get_base_model()
    return getattr(model, "base_model", model)


@torch.no_grad()
def embed(
    encoder: Any,
    tokenizer: Any,
    sentences: tuple[str, ...] | list[str],
    *,
    device: Any,
    batch_size: int = 32,
    max_length: int = 64,
) -> np.ndarray:
    """Mean of the last hidden layer over each sentence's tokens (float64, one row per sentence)."""
    was_training = encoder.training
    encoder.eval()
    rows = []
    try:
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).double().cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(rows)


def _cosine(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return unit @ unit.T


def _topic_neighbours(similarity: np.ndarray, topics: np.ndarray) -> float:
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    return float((topics[masked.argmax(1)] == topics).mean())


def compare(before: np.ndarray, after: np.ndarray, topics: tuple[str, ...]) -> dict[str, Any]:
    """The check's figures from the two encoders' embeddings of the reference sentences."""
    from scipy.stats import spearmanr

    sim_before, sim_after = _cosine(before), _cosine(after)
    upper = np.triu_indices(len(before), k=1)
    a, b = sim_before[upper], sim_after[upper]
    rho = 1.0 if np.array_equal(a, b) else float(spearmanr(a, b).statistic)
    labels = np.asarray(topics)
    return {
        "similarity_preserved": rho,
        "topic_neighbours": {
            "before": _topic_neighbours(sim_before, labels),
            "after": _topic_neighbours(sim_after, labels),
        },
        "pairs": int(len(a)),
        "sentences": int(len(before)),
    }


def measure_forgetting(
    *, base: Any, fine_tuned: Any, tokenizer: Any, device: Any, max_length: int = 64
) -> dict[str, Any]:
    """Compare a pretrained encoder with the fine-tuned classifier on the reference sentences.

    Args:
        base: The pretrained encoder (``AutoModel``), on ``device``.
        fine_tuned: The trained classifier (transformers or peft), on ``device``.
        tokenizer: The run's tokenizer.
        device: Where both models are.
        max_length: Truncation length (the reference sentences are shorter than 32 tokens).

    Returns:
        ``{"measure", "reference", "similarity_preserved", "topic_neighbours", ...}``.
    """
    sentences, topics = reference_sentences()
    before = embed(base, tokenizer, sentences, device=device, max_length=max_length)
    after = embed(
        encoder_of(fine_tuned), tokenizer, sentences, device=device, max_length=max_length
    )
    return {
        "measure": "rank correlation of pairwise cosine similarities of general sentences, "
        "pretrained vs fine-tuned encoder (mean-pooled last layer)",
        "reference": f"hubtune/assets/{REFERENCE_FILE.name} ({len(set(topics))} topics)",
        **compare(before, after, topics),
    }


@torch.no_grad()
def perplexity(
    model: Any, tokenizer: Any, sentences: tuple[str, ...] | list[str], *, device: Any
) -> float:
    """exp(mean next-token loss) over every token of the sentences, each ``[bos] tokens [eos]``."""
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    total, count = 0.0, 0
    try:
        for sentence in sentences:
            ids = bos + tokenizer(sentence, add_special_tokens=False)["input_ids"] + eos
            batch = torch.tensor([ids], device=device)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
            total += float(loss)
            count += len(ids) - 1
    finally:
        model.train(was_training)
    return float(np.exp(total / count))


def measure_lm_forgetting(
    *, base: Any, fine_tuned: Any, tokenizer: Any, device: Any
) -> dict[str, Any]:
    """Perplexity of the reference sentences under the pretrained and the fine-tuned language
    model (peft-wrapped or not): ``{"perplexity": {"before", "after"}, "ratio", ...}``."""
    sentences, topics = reference_sentences()
    before = perplexity(base, tokenizer, sentences, device=device)
    after = perplexity(fine_tuned, tokenizer, sentences, device=device)
    return {
        "measure": "perplexity of general sentences, pretrained vs fine-tuned language model",
        "reference": f"hubtune/assets/{REFERENCE_FILE.name} ({len(set(topics))} topics)",
        "perplexity": {"before": before, "after": after},
        "ratio": after / before,
        "sentences": len(sentences),
    }
