"""Real pretrained weights (packaged all-MiniLM-L6-v2) on real RedditBias rows, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hubtune.pipeline import run_recipe
from hubtune.prepare import prepare
from hubtune.recipe import load_recipe

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def redditbias(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("redditbias")
    prepare("redditbias", output_dir=folder)
    return folder / "data.csv"


@pytest.mark.slow
def test_quickstart_pulls_from_and_pushes_to_the_local_hub(
    redditbias: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quickstart end to end, offline: seeded repos at the pinned SHAs, train, audit, push.

    Then what a user does: download the pushed model with transformers and get the run's
    test predictions back.
    """
    import yaml
    from huggingface_hub import HfApi
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hubtune.data import load_data
    from hubtune.hub import hub_endpoint
    from hubtune.seed import QUICKSTART_DATA_REPO, QUICKSTART_MODEL_REPO, seed_quickstart

    root = tmp_path / "hub"
    shas = seed_quickstart(root=root, data_dir=redditbias.parent)
    pinned = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    # Content-addressed commits: the same files give the SHAs the recipe pins, on any machine.
    assert shas[QUICKSTART_MODEL_REPO] == pinned["model"]["revision"]
    assert shas[QUICKSTART_DATA_REPO] == pinned["data"]["revision"]
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"hub.local_root={root}",
            f"output_dir={tmp_path / 'runs'}",
            "data.limit.train=600",
            "data.limit.validation=150",
            "data.limit.test=300",
            "train.log_with=[]",
        ],
    )
    result = run_recipe(recipe)
    run = json.loads((result.run_dir / "run.json").read_text())
    # The top 2 of 6 blocks (1,774,464 each), the pooler (147,840) and the new head (770).
    assert run["method"]["trainable_parameters"] == 2 * 1_774_464 + 147_840 + 770
    assert run["feature_cache"]["kind"] == "prefix"
    assert run["method"]["total_parameters"] == 22_713_986
    assert (
        run["base_model"]["kind"] == "hub"
        and run["base_model"]["sha"] == shas[QUICKSTART_MODEL_REPO]
    )
    assert (
        result.metrics["test"]["accuracy"] > result.metrics["majority_baseline"]["accuracy"] + 0.03
    )
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert set(predictions["target_group"]) == {"female", "black", "lgbtq", "jewish", "muslim"}
    assert (result.run_dir / "audit" / "report.html").exists()
    assert result.push is not None
    commit = result.push["commit"]
    with hub_endpoint("local", local_root=root) as url:
        assert HfApi(endpoint=url).model_info("local-user/quickstart").sha == commit
        cache = tmp_path / "download"
        model = AutoModelForSequenceClassification.from_pretrained(
            "local-user/quickstart", revision=commit, cache_dir=cache
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            "local-user/quickstart", revision=commit, cache_dir=cache
        )
        test = load_data(recipe.data, seed=recipe.seed).splits["test"]
    assert list(test["row_id"]) == list(predictions["row_id"])
    with torch.no_grad():
        batch = tokenizer(
            list(test["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    assert abs(probs[:, 1] - predictions["prob_biased"].to_numpy()).max() < 1e-4
    assert (probs.argmax(-1) == predictions["prediction_id"].to_numpy()).all()


@pytest.mark.slow
def test_lora_on_minilm_reloads_with_peft_and_reproduces_predictions(
    redditbias: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart-lora.yaml",
        overrides=[
            f"data.source={redditbias}",
            f"output_dir={tmp_path}",
            "data.limit.train=96",
            "data.limit.validation=32",
            "data.limit.test=48",
            "train.epochs=1",
            "model.max_length=48",
            "train.log_with=[]",
        ],
    )
    result = run_recipe(recipe)
    adapter = result.run_dir / "adapter"
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    data = pd.read_csv(redditbias)
    texts = [data.loc[int(row.split(":")[1]), "text"] for row in predictions["row_id"]]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
        probs = torch.softmax(model(**batch).logits, -1)[:, 1].numpy()
    assert abs(probs - predictions["prob_biased"].to_numpy()).max() < 1e-4
