"""model.pooling: the head reads token states pooled the way the base model was trained."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from hubtune.model import POOLING_ATTR, choose_pooling, sentence_transformers_pooling
from hubtune.modeling_pooled import HubtunePooledForSequenceClassification, pool
from hubtune.recipe import Recipe

from .conftest import make_sentiment_frame, recipe_dict


def _with_pooling_config(src: Path, dst: Path, **modes: bool) -> Path:
    """A copy of a model folder that ships a sentence-transformers pooling config."""
    shutil.copytree(src, dst)
    (dst / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (dst / "1_Pooling").mkdir()
    flags = {
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    for mode, on in modes.items():
        flags["pooling_mode_cls_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"] = on
    (dst / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **flags})
    )
    return dst


@pytest.fixture(scope="module")
def mean_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_pooling_config(tiny_bert, tmp_path_factory.mktemp("st") / "model", mean=True)


def test_the_pooling_config_a_sentence_transformers_model_ships_is_read(
    tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert sentence_transformers_pooling(tiny_bert) is None  # no modules.json
    for mode in ("mean", "cls", "max", "mean_sqrt_len"):
        folder = _with_pooling_config(tiny_bert, tmp_path / mode, **{mode: True})
        found = sentence_transformers_pooling(folder)
        assert found is not None and found[0] == mode and "1_Pooling/config.json" in found[1]
    # Two modes at once (their concatenation) is not one hubtune reproduces: native, and said.
    both = _with_pooling_config(tiny_bert, tmp_path / "both", mean=True, max=True)
    with caplog.at_level(logging.WARNING):
        assert sentence_transformers_pooling(both) is None
    assert "2 pooling modes" in caplog.text


def test_auto_takes_the_shipped_pooling_except_for_lora(mean_bert: Path, tiny_bert: Path) -> None:
    assert choose_pooling(mean_bert, "auto", method_name="freeze")["mode"] == "mean"
    assert choose_pooling(mean_bert, "auto", method_name="full")["mode"] == "mean"
    lora = choose_pooling(mean_bert, "auto", method_name="lora")
    assert lora["mode"] == "native" and "LoRA" in lora["source"]
    assert choose_pooling(tiny_bert, "auto", method_name="freeze")["mode"] == "native"
    assert choose_pooling(mean_bert, "cls", method_name="freeze") == {
        "mode": "cls",
        "source": "model.pooling in the recipe",
    }


def test_pool_matches_sentence_transformers_arithmetic() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean")[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    assert torch.equal(pool(hidden, mask, "max")[0], hidden[0, 1])  # the padded token is larger
    assert torch.allclose(pool(hidden, mask, "mean_sqrt_len")[1], hidden[1].sum(0) / 3**0.5)
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def _load(folder: Path, pooling: str, method: str = "freeze"):  # type: ignore[no-untyped-def]
    from hubtune.hub import resolve_model
    from hubtune.model import load_classifier
    from hubtune.recipe import ModelSection

    section = ModelSection(id=str(folder), pooling=pooling)
    return load_classifier(
        resolve_model(section.id, revision=section.revision),
        section,
        label_names=["neg", "pos"],
        method_name=method,
    )


def test_the_pooled_classifier_ignores_padding_and_keeps_the_encoder_weights(
    mean_bert: Path,
) -> None:
    from transformers import AutoModel

    tokenizer, model, newly = _load(mean_bert, "auto")
    assert isinstance(model, HubtunePooledForSequenceClassification)
    assert getattr(model, POOLING_ATTR)["mode"] == "mean"
    assert sorted(newly) == ["classifier.bias", "classifier.weight"]  # only the head is new
    encoder = AutoModel.from_pretrained(mean_bert).eval()
    for name, tensor in encoder.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(model.encoder.state_dict()[name], tensor), name
    assert model.encoder.pooler is None
    model.eval()
    short = tokenizer(["good great day"], return_tensors="pt")
    padded = tokenizer(["good great day"], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        a = model(**short).logits
        b = model(**padded).logits
        states = encoder(**short).last_hidden_state
        expected = model.classifier(states.mean(dim=1))
    assert torch.allclose(a, b, atol=1e-5)  # padding does not move the mean
    assert torch.allclose(a, expected, atol=1e-5)


def test_a_saved_pooled_model_loads_only_with_its_code_and_predicts_the_same(
    mean_bert: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    tokenizer, model, _ = _load(mean_bert, "max")
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "hubtune_pooled" and config["pooling"] == "max"
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_pooled.")
    assert (tmp_path / "saved" / "modeling_pooled.py").read_text() == Path(
        "hubtune/modeling_pooled.py"
    ).read_text()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "saved", trust_remote_code=False
        )
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "saved", trust_remote_code=True
    ).eval()
    batch = tokenizer(["bad awful day", "good"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_pooling_that_lora_or_an_image_task_cannot_ship_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    spec = recipe_dict(tiny_bert, tmp_path / "x.csv", tmp_path, name="lora")
    spec["model"]["pooling"] = "mean"
    with pytest.raises(ValueError, match="model.pooling: mean with method.name: lora is refused"):
        Recipe.model_validate(spec)
    spec["model"]["pooling"] = "native"
    Recipe.model_validate(spec)
    image = {"id": str(tiny_bert), "task": "image-classification", "pooling": "mean"}
    with pytest.raises(ValueError, match="model.pooling applies to text tasks"):
        Recipe.model_validate({**spec, "method": {"name": "freeze"}, "model": image})


def test_a_run_with_mean_pooling_records_it_and_its_card_space_and_saved_model_agree(
    mean_bert: Path, tmp_path: Path
) -> None:
    """Top-block fine-tuning on the prefix cache with mean pooling, end to end."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hubtune.card import build_card
    from hubtune.pipeline import run_recipe
    from hubtune.space import load_app, local_space_config

    csv = tmp_path / "reviews.csv"
    make_sentiment_frame().to_csv(csv, index=False)
    spec = recipe_dict(mean_bert, csv, tmp_path / "runs", name="freeze", unfreeze_top_k=1)
    spec["audit"] = {"enabled": False}
    result = run_recipe(Recipe.model_validate(spec))
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["pooling"]["mode"] == "mean"
    assert "1_Pooling/config.json" in run_info["pooling"]["source"]
    assert run_info["feature_cache"]["kind"] == "prefix"
    card = build_card(result.run_dir).text
    assert "**Pooling:** the head reads the mean of the encoder's token states" in card
    assert "trust_remote_code=True).eval()" in card
    # The saved model, loaded as the card says, predicts what the run predicted.
    folder = result.run_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=True
    ).eval()
    text = "good great lovely day"
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
    classifier = load_app().load_classifier(
        local_space_config(run_dir=result.run_dir), base_dir=result.run_dir
    )
    assert list(classifier.probabilities(text).values()) == pytest.approx(expected, abs=1e-6)


def test_runs_that_pool_differently_never_share_cached_features(
    mean_bert: Path, tmp_path: Path
) -> None:
    """The head's cached inputs depend on the pooling: native then mean misses, mean again hits."""
    from hubtune.pipeline import run_recipe

    csv = tmp_path / "reviews.csv"
    make_sentiment_frame().to_csv(csv, index=False)

    def run(pooling: str, name: str) -> dict:
        spec = recipe_dict(mean_bert, csv, tmp_path / "runs", name="freeze")
        spec.update(name=name)
        spec["model"]["pooling"] = pooling
        spec["audit"] = {"enabled": False}
        result = run_recipe(Recipe.model_validate(spec))
        return json.loads((result.run_dir / "run.json").read_text())["feature_cache"]["hits"]

    assert not any(run("native", "a").values())
    assert not any(run("mean", "b").values())  # before the fix: every split a hit
    assert all(run("auto", "c").values())  # auto is mean here: the same features


def test_a_pushed_pooled_model_downloads_with_its_code_and_reproduces_the_run(
    mean_bert: Path, tmp_path: Path
) -> None:
    """Pushed to the local endpoint: the repo carries modeling_pooled.py, and the download,
    loaded as the card says, gives the run's test predictions."""
    import pandas as pd
    from huggingface_hub import HfApi
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hubtune.data import load_data
    from hubtune.hub import hub_endpoint
    from hubtune.pipeline import run_recipe

    from .test_push import _pushing_spec

    csv = tmp_path / "reviews.csv"
    make_sentiment_frame(300).to_csv(csv, index=False)
    root = tmp_path / "hub"
    spec = _pushing_spec(mean_bert, csv, tmp_path, root)
    spec["push"]["space_id"] = None
    recipe = Recipe.model_validate(spec)
    result = run_recipe(recipe)
    assert result.push is not None
    commit = result.push["commit"]
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    with hub_endpoint("local", local_root=root) as url:
        files = set(HfApi(endpoint=url).list_repo_files("local-user/tiny", revision=commit))
        assert {"config.json", "model.safetensors", "modeling_pooled.py"} <= files
        kwargs = {"revision": commit, "cache_dir": tmp_path / "dl"}
        model = AutoModelForSequenceClassification.from_pretrained(
            "local-user/tiny", trust_remote_code=True, **kwargs
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained("local-user/tiny", **kwargs)
    assert type(model).__name__ == "HubtunePooledForSequenceClassification"
    test = load_data(recipe.data, seed=recipe.seed).splits["test"]
    with torch.no_grad():
        batch = tokenizer(
            list(test["text"]), padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    assert abs(probs[:, 1] - predictions["prob_pos"].to_numpy()).max() < 1e-5
