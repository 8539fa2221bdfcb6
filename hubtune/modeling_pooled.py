"""A sequence classifier that pools a text encoder's token states the way the encoder was trained.

transformers' ``AutoModelForSequenceClassification`` classifies from the first token (BERT:
through its pooler, a dense layer trained for next-sentence prediction). Sentence-transformers
models were trained on the *mean* of their token states instead (their ``1_Pooling/config.json``
says so), and that is where their features are: a head on the mean-pooled states gets more out
of them than one on the CLS token or an untrained pooler.

This file is self-contained (torch and transformers only) because it travels with every model
hubtune saves with such pooling: ``save_pretrained`` copies it beside the weights and records it
in ``config.json``'s ``auto_map``, so the saved or pushed model loads anywhere with::

    AutoModelForSequenceClassification.from_pretrained(folder_or_repo, trust_remote_code=True)

Its ``model_type`` is ``hubtune_pooled``, which transformers does not know: loading it without
``trust_remote_code=True`` fails with an error instead of silently building a stock classifier
that pools differently (and would predict something else).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


class HubtunePooledConfig(PretrainedConfig):
    """The encoder's own configuration (``encoder``) plus how its token states are pooled.

    Args:
        encoder: The encoder's configuration as a dict (``model_type`` included).
        pooling: ``mean`` (over the tokens the attention mask keeps), ``cls`` (the first
            token's state, no pooler layer), ``max`` (per dimension, over kept tokens) or
            ``mean_sqrt_len`` (sum over kept tokens / sqrt(their number)).
        classifier_dropout: Dropout before the linear head (training only).
    """

    model_type = "hubtune_pooled"

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        **kwargs: Any,
    ):
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, not {pooling!r}")
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's configuration object."""
        values = dict(self.encoder)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("the encoder configuration names no model_type")
        return AutoConfig.for_model(model_type, **values)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.get("hidden_size") or self.encoder.get("dim") or 0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One vector per example from token states ``(batch, tokens, hidden)``; padding ignored.

    The same arithmetic as sentence-transformers' ``Pooling`` module (masked mean with the token
    count clamped at 1e-9; max over kept tokens with padding set to -1e9).
    """
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ValueError(f"unknown pooling {mode!r}; one of {POOLING_MODES}")


class HubtunePooledForSequenceClassification(PreTrainedModel):
    """Encoder -> pooling of its token states -> dropout -> linear head (``classifier``)."""

    config_class = HubtunePooledConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config: HubtunePooledConfig):
        super().__init__(config)
        encoder_config = config.encoder_config()
        self.encoder = AutoModel.from_config(encoder_config)
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT-style pooler (dense + tanh on the first token): not used by this head; kept
            # out so no tensor sits in the model without a gradient.
            self.encoder.pooler = None
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self._encoder_inputs = set(inspect.signature(self.encoder.forward).parameters)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only the head is new; the encoder's tensors come from its checkpoint.
        if module is getattr(self, "classifier", None):
            std = float(getattr(self.config.encoder_config(), "initializer_range", 0.02))
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        # The inputs the encoder takes (DistilBERT has no token types); named, so that callers
        # that look for them in the signature (per-example position ids under DP) find them.
        given = {
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            **kwargs,
        }
        extra = {k: v for k, v in given.items() if k in self._encoder_inputs and v is not None}
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        pooled = pool(outputs[0], attention_mask, self.config.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


HubtunePooledConfig.register_for_auto_class()
HubtunePooledForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
