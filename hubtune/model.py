"""Loading a pinned model folder as a sequence classifier with the recipe's labels."""

from __future__ import annotations

import logging
from typing import Any

from hubtune.hub import ResolvedModel
from hubtune.recipe import ModelSection

__all__ = ["load_classifier"]

logger = logging.getLogger(__name__)


def load_classifier(
    resolved: ResolvedModel, section: ModelSection, *, label_names: list[str]
) -> tuple[Any, Any, list[str]]:
    """Load tokenizer and ``AutoModelForSequenceClassification`` from a resolved folder.

    Returns:
        ``(tokenizer, model, newly_initialized)``: the names of parameters the checkpoint did
        not have (the new head), which the method must train.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    trust = section.trust_remote_code
    config = AutoConfig.from_pretrained(
        resolved.local_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        trust_remote_code=trust,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolved.local_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        # Decoder models (GPT-2) have no pad token; reuse end-of-text so batches can be padded.
        tokenizer.pad_token = tokenizer.eos_token
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    model, info = AutoModelForSequenceClassification.from_pretrained(
        resolved.local_dir,
        config=config,
        trust_remote_code=trust,
        use_safetensors=None if section.allow_pickle else True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    newly = sorted(
        set(info.get("missing_keys", []))
        | {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])}
    )
    logger.info("model: %s newly initialised tensors: %s", len(newly), newly)
    return tokenizer, model, newly
