"""Methods on tiny models: blocks, heads, parameter counts, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from hubtune.methods import MethodError, apply_method, count_parameters, find_blocks, find_head
from hubtune.recipe import FreezeMethod, FullMethod, LoraMethod


def _model(folder: Path):
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)


def test_blocks_and_heads(tiny_bert: Path, tiny_gpt2: Path) -> None:
    bert, gpt2 = _model(tiny_bert), _model(tiny_gpt2)
    assert find_head(bert) == "classifier" and find_head(gpt2) == "score"
    assert find_blocks(bert)[0] == "bert.encoder.layer" and len(find_blocks(bert)[1]) == 2
    assert find_blocks(gpt2)[0] == "transformer.h"


def test_counts_match_independent_arithmetic(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    total = sum(p.numel() for p in model.parameters())
    plan = apply_method(model, FreezeMethod(name="freeze"), lr=1e-3)
    assert plan.counts == {"trainable": 32 * 3 + 3, "total": total}
    assert plan.cache_features and "bert" in plan.eval_modules and "dropout" in plan.eval_modules
    assert set(plan.trainable_names) == {"classifier.weight", "classifier.bias"}

    model = _model(tiny_bert)
    plan = apply_method(model, FullMethod(name="full"), lr=1e-3)
    assert plan.counts == {"trainable": total, "total": total} and not plan.cache_features

    model = _model(tiny_bert)
    plan = apply_method(
        model, LoraMethod(name="lora", r=2, target_modules=["query", "key", "value"]), lr=1e-3
    )
    lora = 3 * 2 * 2 * (32 + 32)  # 3 matrices x 2 layers x r(in + out)
    head_copy = 32 * 3 + 3
    assert plan.counts["trainable"] == lora + head_copy
    # total = base + adapters + the trainable copy of the head peft keeps beside the original
    assert plan.counts["total"] == total + lora + head_copy
    assert plan.lora_target_modules == ["key", "query", "value"]


def test_unfreeze_too_many_blocks_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(MethodError, match="only 2 blocks"):
        apply_method(_model(tiny_bert), FreezeMethod(name="freeze", unfreeze_top_k=3), lr=1e-3)


def test_lora_on_unknown_modules_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(MethodError, match="target_modules"):
        apply_method(_model(tiny_bert), LoraMethod(name="lora", target_modules=["nope"]), lr=1e-3)


def test_tied_parameters_counted_once() -> None:
    import torch

    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, shared)
    assert count_parameters(model) == {"trainable": 20, "total": 20}
