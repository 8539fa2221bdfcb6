"""The forgetting check: exact figures on known embeddings, 1 where no weight moved, less where one did."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hubtune.forgetting import compare, embed, encoder_of, measure_forgetting, reference_sentences


def test_reference_set_is_twelve_topics_of_ten_distinct_sentences() -> None:
    sentences, topics = reference_sentences()
    assert len(sentences) == 120 and len(set(sentences)) == 120
    assert {t: topics.count(t) for t in set(topics)} == dict.fromkeys(set(topics), 10)
    assert len(set(topics)) == 12


def test_compare_on_known_embeddings() -> None:
    topics = ("a", "a", "b", "b")
    before = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    same = compare(before, before.copy(), topics)
    assert same["similarity_preserved"] == 1.0
    assert same["topic_neighbours"] == {"before": 1.0, "after": 1.0}
    assert same["pairs"] == 6 and same["sentences"] == 4
    # Swap two sentences' embeddings across topics: each lands next to the other topic.
    after = before[[2, 1, 0, 3]]
    changed = compare(before, after, topics)
    assert changed["topic_neighbours"] == {"before": 1.0, "after": 0.0}
    unit_b = before / np.linalg.norm(before, axis=1, keepdims=True)
    unit_a = after / np.linalg.norm(after, axis=1, keepdims=True)
    upper = np.triu_indices(4, k=1)
    expected = spearmanr((unit_b @ unit_b.T)[upper], (unit_a @ unit_a.T)[upper]).statistic
    assert changed["similarity_preserved"] == pytest.approx(expected, abs=1e-12)
    assert changed["similarity_preserved"] < 0.5


def test_more_change_to_the_encoder_means_lower_preservation(tiny_bert: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    base = AutoModel.from_pretrained(tiny_bert)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    classifier.train()  # as training leaves it: dropout must be off while measuring, then back
    untouched = measure_forgetting(
        base=base, fine_tuned=classifier, tokenizer=tokenizer, device="cpu"
    )
    assert untouched["similarity_preserved"] == 1.0
    assert untouched["topic_neighbours"]["before"] == untouched["topic_neighbours"]["after"]
    figures = []
    for scale in (0.02, 0.2, 2.0):
        moved = copy.deepcopy(classifier)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in encoder_of(moved).parameters():
                p.add_(scale * p.std().nan_to_num(0) * torch.randn(p.shape, generator=generator))
        figures.append(
            measure_forgetting(base=base, fine_tuned=moved, tokenizer=tokenizer, device="cpu")[
                "similarity_preserved"
            ]
        )
    assert 1.0 > figures[0] > figures[1] > figures[2], figures
    assert encoder_of(classifier).training  # measuring leaves the model's mode as it was


def test_lora_adapters_are_part_of_the_measured_encoder(tiny_bert: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = embed(encoder_of(model), tokenizer, ["a short sentence"], device="cpu")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    )
    adapted = embed(encoder_of(peft_model), tokenizer, ["a short sentence"], device="cpu")
    assert not np.allclose(plain, adapted)
    with peft_model.disable_adapter():
        np.testing.assert_allclose(
            embed(encoder_of(peft_model), tokenizer, ["a short sentence"], device="cpu"), plain
        )


def test_a_run_records_it_and_a_frozen_backbone_forgets_nothing(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    from hubtune.pipeline import run_recipe
    from hubtune.recipe import Recipe

    from .conftest import recipe_dict

    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs")
    spec["train"]["epochs"] = 1
    spec["audit"] = {"enabled": False}
    result = run_recipe(Recipe.model_validate(spec))
    run_dir = result.run_dir
    written = json.loads((run_dir / "forgetting.json").read_text())
    assert written["similarity_preserved"] == 1.0  # frozen features: no encoder weight moved
    assert written["topic_neighbours"]["before"] == written["topic_neighbours"]["after"]
    assert written["sentences"] == 120 and written["pairs"] == 7140
    run = json.loads((run_dir / "run.json").read_text())
    assert run["forgetting"]["similarity_preserved"] == 1.0
    from hubtune.card import write_card

    assert "**Forgetting:** on 120 general sentences" in write_card(run_dir).read_text()
    off = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs2")
    off["train"]["epochs"] = 1
    off["audit"] = {"enabled": False}
    off["checks"] = {"forgetting": False}
    quiet = run_recipe(Recipe.model_validate(off))
    assert not (quiet.run_dir / "forgetting.json").exists()


def test_negative_transfer_check_trains_the_architecture_from_scratch(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    """checks.negative_transfer: `<name>-scratch` is the same architecture from random weights,
    tested on the same rows, and the recorded comparison is the paired bootstrap of the two
    prediction files."""
    import pandas as pd
    from safetensors.torch import load_file

    from hubtune.baselines import compare
    from hubtune.pipeline import run_recipe
    from hubtune.recipe import Recipe

    from .conftest import recipe_dict

    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs")
    spec["train"]["epochs"] = 1
    spec["checks"] = {"negative_transfer": True, "scratch_lr": 0.001, "scratch_epochs": 2}
    result = run_recipe(Recipe.model_validate(spec))
    scratch = tmp_path / "runs" / "tiny-scratch"
    scratch_run = json.loads((scratch / "run.json").read_text())
    assert scratch_run["method"]["method"] == "full"
    assert len(json.loads((scratch / "metrics.json").read_text())["history"]) == 2
    # Random weights: no backbone tensor equals the pretrained checkpoint's.
    pretrained = {
        k if k.startswith("bert.") else f"bert.{k}": v
        for k, v in load_file(tiny_bert / "model.safetensors").items()
    }
    trained = load_file(scratch / "model" / "model.safetensors")
    shared = [k for k in trained if k in pretrained and trained[k].shape == pretrained[k].shape]
    assert shared and not any(torch.equal(trained[k], pretrained[k]) for k in shared)
    ours = pd.read_parquet(result.run_dir / "predictions.parquet")
    theirs = pd.read_parquet(scratch / "predictions.parquet")
    assert ours["row_id"].tolist() == theirs["row_id"].tolist()
    expected = compare(
        ours["prediction_id"].to_numpy(),
        theirs["prediction_id"].to_numpy(),
        ours["label_id"].to_numpy(),
        seed=0,
    )
    for where in ("run.json", "metrics.json"):
        recorded = json.loads((result.run_dir / where).read_text())["scratch_baseline"]
        assert recorded["accuracy"] == pytest.approx(expected["accuracy"])
        assert recorded["model_minus_baseline"] == expected["model_minus_baseline"]
        assert recorded["negative_transfer"] == expected["negative_transfer"]
        assert recorded["name"].startswith("same architecture from random initialisation")
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert "**Negative-transfer check:**" in report
    from hubtune.card import write_card

    card = write_card(result.run_dir).read_text()
    assert "**Negative-transfer check** (same architecture from random initialisation" in card
    assert "| Same architecture trained from scratch, same split |" in card


def test_random_init_is_refused_with_a_method_that_keeps_pretrained_weights(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from hubtune.recipe import Recipe

    from .conftest import recipe_dict

    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs")
    spec["model"]["init"] = "random"
    with pytest.raises(
        ValidationError, match="model.init: random starts every weight from scratch"
    ):
        Recipe.model_validate(spec)


def test_random_init_reads_only_the_architecture(tiny_bert: Path) -> None:
    from hubtune.hub import resolve_model
    from hubtune.model import load_classifier
    from hubtune.recipe import ModelSection

    resolved = resolve_model(str(tiny_bert), revision="main", allow_pickle=False)
    section = ModelSection(id=str(tiny_bert), pooling="native")
    _, pretrained, newly_pretrained = load_classifier(resolved, section, label_names=["a", "b"])
    random_section = section.model_copy(update={"init": "random"})
    torch.manual_seed(1)
    _, first, newly = load_classifier(resolved, random_section, label_names=["a", "b"])
    torch.manual_seed(1)
    _, second, _ = load_classifier(resolved, random_section, label_names=["a", "b"])
    assert newly_pretrained == ["classifier.bias", "classifier.weight"]
    assert newly == sorted(n for n, _ in first.named_parameters())  # every tensor is new
    matrices = {n: p for n, p in pretrained.named_parameters() if p.ndim > 1}
    for name, tensor in first.named_parameters():
        assert torch.equal(tensor, dict(second.named_parameters())[name])  # seeded
        if name in matrices and not name.startswith("classifier"):
            assert not torch.equal(tensor, matrices[name]), name


def test_language_model_perplexity_is_transformers_own_loss(tiny_gpt2_lm: Path) -> None:
    """perplexity(): exp of the token-weighted mean of transformers' own next-token loss over
    [bos] tokens [eos] encodings; identical models give a ratio of exactly 1."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubtune.forgetting import measure_lm_forgetting, perplexity

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).eval()
    sentences = ["The cat slept in the sun.", "Rain is expected tomorrow afternoon."]
    total, count = 0.0, 0
    for sentence in sentences:
        ids = [tokenizer.bos_token_id, *tokenizer(sentence)["input_ids"], tokenizer.eos_token_id]
        batch = torch.tensor([ids])
        with torch.no_grad():
            total += float(model(input_ids=batch, labels=batch).loss) * (len(ids) - 1)
        count += len(ids) - 1
    assert perplexity(model, tokenizer, sentences, device="cpu") == pytest.approx(
        math.exp(total / count), rel=1e-6
    )
    same = measure_lm_forgetting(base=model, fine_tuned=model, tokenizer=tokenizer, device="cpu")
    assert same["ratio"] == 1.0 and same["sentences"] == 120
