"""Real pretrained weights (packaged all-MiniLM-L6-v2) on real RedditBias rows, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hubtune.prepare import prepare
from hubtune.recipe import load_recipe
from hubtune.train import run_recipe

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def redditbias(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("redditbias")
    prepare("redditbias", output_dir=folder)
    return folder / "data.csv"


@pytest.mark.slow
def test_quickstart_recipe_on_a_subset_beats_the_majority_baseline(
    redditbias: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"data.source={redditbias}",
            f"output_dir={tmp_path}",
            "data.limit.train=600",
            "data.limit.validation=150",
            "data.limit.test=300",
            "train.epochs=15",
            "train.log_with=[]",
        ],
    )
    result = run_recipe(recipe)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["method"]["trainable_parameters"] == 384 * 2 + 2
    assert run["method"]["total_parameters"] == 22_713_986
    assert run["base_model"]["kind"] == "package"
    assert (
        result.metrics["test"]["accuracy"] > result.metrics["majority_baseline"]["accuracy"] + 0.03
    )
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert set(predictions["target_group"]) == {"female", "black", "lgbtq", "jewish", "muslim"}


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
