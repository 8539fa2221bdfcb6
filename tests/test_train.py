"""End-to-end runs on tiny models: what trains, what stays frozen, outputs, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hubtune import checkpoint as checkpoint_module
from hubtune.errors import RunError
from hubtune.pipeline import run_recipe
from hubtune.recipe import Recipe
from hubtune.rundir import read_metrics

from .conftest import recipe_dict

OUTPUTS = ("metrics.json", "predictions.parquet", "recipe.resolved.yaml", "run.json")


def _run(tiny_bert: Path, csv: Path, out: Path, overrides: dict | None = None, **method: object):
    spec = recipe_dict(tiny_bert, csv, out, **method)
    for key, value in (overrides or {}).items():
        section, field = key.split(".")
        spec[section][field] = value
    recipe = Recipe.model_validate(spec)
    return recipe, run_recipe(recipe)


def _base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {
        f"bert.{k}" if not k.startswith("bert.") else k: v
        for k, v in load_file(model_dir / "model.safetensors").items()
    }


def test_freeze_with_feature_cache(tiny_bert: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    recipe, result = _run(
        tiny_bert, sentiment_csv, tmp_path / "runs", {"train.epochs": 8, "train.lr": 0.05}
    )
    run_dir = result.run_dir
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["feature_cache"]["used"] is True
    assert run["feature_cache"]["hits"] == {"train": False, "validation": False, "test": False}
    # Trainable count is exactly the new head: hidden 32 -> 2 labels.
    assert run["method"]["trainable_parameters"] == 32 * 2 + 2
    saved = load_file(run_dir / "model" / "model.safetensors")
    base = _base_weights(tiny_bert)
    for name, tensor in base.items():
        assert torch.equal(saved[name], tensor), f"frozen tensor {name} changed"
    assert not torch.equal(saved["classifier.weight"], torch.zeros_like(saved["classifier.weight"]))
    # The frozen backbone learned nothing, but the head did: the synthetic task is learnable.
    assert result.metrics["test"]["accuracy"] > result.metrics["majority_baseline"]["accuracy"]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    assert list(predictions.columns) == [
        "row_id",
        "label",
        "prediction",
        "label_id",
        "prediction_id",
        "prob_neg",
        "prob_pos",
        "group",
    ]
    assert len(predictions) == run["data"]["rows_kept"]["test"]
    assert (predictions[["prob_neg", "prob_pos"]].sum(axis=1) - 1).abs().max() < 1e-5
    assert (
        predictions["prediction_id"] == predictions[["prob_neg", "prob_pos"]].to_numpy().argmax(1)
    ).all()
    # The kept weights' validation predictions (hubtune mitigate fits on them): every validation
    # row once, in the same schema, and as accurate as the kept epoch was on validation.
    validation = pd.read_parquet(run_dir / "validation_predictions.parquet")
    assert list(validation.columns) == list(predictions.columns)
    assert len(validation) == run["data"]["rows_kept"]["validation"]
    assert validation["row_id"].is_unique and validation["row_id"].str.startswith("train:").all()
    assert not set(validation["row_id"]) & set(predictions["row_id"])
    kept = result.metrics["selected_epoch"]["epoch"]
    val_accuracy = next(h for h in result.metrics["history"] if h["epoch"] == kept)["val_accuracy"]
    assert (validation["label_id"] == validation["prediction_id"]).mean() == pytest.approx(
        val_accuracy, abs=1e-9
    )
    # The saved model, loaded the ordinary way, reproduces the cached-feature predictions.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    data = pd.read_csv(sentiment_csv)
    texts = [data.loc[int(r.split(":")[1]), "text"] for r in predictions["row_id"][:20]]
    with torch.no_grad():
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        ).logits
    probs = torch.softmax(logits, -1)[:, 1].numpy()
    assert abs(probs - predictions["prob_pos"][:20].to_numpy()).max() < 1e-4

    # Second run: same model SHA, data and preprocessing -> features come from the cache.
    recipe2 = recipe.model_copy(update={"name": "tiny2"})
    run_recipe(recipe2)
    run2 = json.loads((tmp_path / "runs" / "tiny2" / "run.json").read_text())
    assert run2["feature_cache"]["hits"] == {"train": True, "validation": True, "test": True}


def test_cache_and_no_cache_give_the_same_features(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    _, cached = _run(
        tiny_bert,
        sentiment_csv,
        tmp_path / "a",
        {"train.epochs": 1},
        name="freeze",
        feature_cache=True,
        head_fit="sgd",  # the same solver both ways (auto: L-BFGS needs the cache)
    )
    _, plain = _run(
        tiny_bert,
        sentiment_csv,
        tmp_path / "b",
        {"train.epochs": 1},
        name="freeze",
        feature_cache=False,
    )
    assert json.loads((plain.run_dir / "run.json").read_text())["feature_cache"]["used"] is False
    # Same seed, same batches, same head init, frozen backbone in eval mode either way: the
    # head sees the same inputs, so both runs end with the same predictions.
    a = pd.read_parquet(cached.run_dir / "predictions.parquet")
    b = pd.read_parquet(plain.run_dir / "predictions.parquet")
    assert list(a["row_id"]) == list(b["row_id"])
    assert (a["prob_pos"] - b["prob_pos"]).abs().max() < 1e-4


def test_unfreeze_top_k(tiny_bert: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    _, result = _run(
        tiny_bert, sentiment_csv, tmp_path, {"train.epochs": 1}, name="freeze", unfreeze_top_k=1
    )
    run = json.loads((result.run_dir / "run.json").read_text())
    # The frozen block 0 ran once, into the prefix cache (tests/test_prefix.py checks it is exact).
    assert run["feature_cache"]["used"] is True and run["feature_cache"]["kind"] == "prefix"
    assert run["method"]["prefix_cache"] is True
    assert run["method"]["unfrozen_blocks"] == ["bert.encoder.layer.1", "bert.pooler"]
    groups = {g["name"]: g for g in run["method"]["param_groups"]}
    assert groups["backbone"]["lr"] == pytest.approx(groups["head"]["lr"] / 10)
    saved = load_file(result.run_dir / "model" / "model.safetensors")
    base = _base_weights(tiny_bert)
    layer1 = {k: v for k, v in base.items() if ".layer.1." in k or ".pooler." in k}
    frozen = {k: v for k, v in base.items() if k not in layer1}
    for name, tensor in frozen.items():
        assert torch.equal(saved[name], tensor), f"frozen tensor {name} changed"
    changed = [k for k, v in layer1.items() if not torch.equal(saved[k], v)]
    assert len(changed) == len(layer1), (
        f"unfrozen tensors that did not move: {set(layer1) - set(changed)}"
    )
    expected = sum(v.numel() for v in layer1.values()) + 32 * 2 + 2
    assert run["method"]["trainable_parameters"] == expected


def test_lora_adapter_loads_with_peft_and_reproduces_predictions(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    _, result = _run(
        tiny_bert,
        sentiment_csv,
        tmp_path,
        {"train.epochs": 2, "train.lr": 0.01},
        name="lora",
        r=4,
        alpha=8,
    )
    run_dir = result.run_dir
    run = json.loads((run_dir / "run.json").read_text())
    assert run["method"]["lora_target_modules"] == ["query", "value"]
    # r*(in+out) per adapted matrix, 2 matrices x 2 layers, plus the head copy.
    assert run["method"]["trainable_parameters"] == 2 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().sum() > 0 for k in lora_b), "LoRA B never moved off zero"
    assert (run_dir / "adapter" / "adapter_config.json").exists()

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(
        run_dir / "adapter", num_labels=2
    ).eval()
    base = _base_weights(tiny_bert)
    merged_state = model.base_model.model.state_dict()
    for name, tensor in base.items():  # the base weights are untouched by LoRA training
        key = name.replace(
            "attention.self.query.weight", "attention.self.query.base_layer.weight"
        ).replace("attention.self.value.weight", "attention.self.value.base_layer.weight")
        key = key.replace(
            "attention.self.query.bias", "attention.self.query.base_layer.bias"
        ).replace("attention.self.value.bias", "attention.self.value.base_layer.bias")
        assert torch.equal(merged_state[key], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    data = pd.read_csv(sentiment_csv)
    texts = [data.loc[int(r.split(":")[1]), "text"] for r in predictions["row_id"]]
    with torch.no_grad():
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        ).logits
    probs = torch.softmax(logits, -1).numpy()
    assert abs(probs[:, 1] - predictions["prob_pos"].to_numpy()).max() < 1e-4


def test_full_fine_tuning_moves_everything_used(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    _, result = _run(
        tiny_bert, sentiment_csv, tmp_path, {"train.epochs": 1, "train.lr": 1e-3}, name="full"
    )
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["method"]["trainable_parameters"] == run["method"]["total_parameters"]
    saved = load_file(result.run_dir / "model" / "model.safetensors")
    base = _base_weights(tiny_bert)
    unchanged = [k for k, v in base.items() if torch.equal(saved[k], v)]
    # Embedding rows of tokens that never occur have zero gradient but still decay; only
    # position ids (a buffer) can be identical.
    assert all("position_ids" in k for k in unchanged), unchanged


def test_resume_after_crash_equals_uninterrupted(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 3, "train.lr": 1e-3}
    _, whole = _run(
        tiny_bert, sentiment_csv, tmp_path / "whole", over, name="freeze", unfreeze_top_k=1
    )

    class Crash(Exception):
        pass

    def crash(epoch: int) -> None:
        if epoch == 0:
            raise Crash

    monkeypatch.setattr(checkpoint_module, "after_checkpoint", crash)
    spec = recipe_dict(
        tiny_bert, sentiment_csv, tmp_path / "broken", name="freeze", unfreeze_top_k=1
    )
    spec["train"].update(epochs=3, lr=1e-3)
    recipe = Recipe.model_validate(spec)
    with pytest.raises(Crash):
        run_recipe(recipe)
    run_dir = recipe.run_dir
    assert not (run_dir / "run.json").exists()
    assert (run_dir / "checkpoints" / "epoch-1" / "trainer_state.json").exists()
    with pytest.raises(RunError, match="--resume"):
        run_recipe(recipe)
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", None)
    resumed = run_recipe(recipe, resume=True)
    assert resumed.resumed_from_epoch == 1
    a = load_file(whole.run_dir / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["train_loss"] for h in whole.metrics["history"]] == [
        h["train_loss"] for h in resumed.metrics["history"]
    ]
    # A finished run has nothing left to resume (a changed recipe: the next test).
    with pytest.raises(RunError, match="already complete"):
        run_recipe(recipe, resume=True)


def test_resume_refuses_a_different_recipe(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(epoch: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "after_checkpoint", crash)
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path, name="freeze", head_fit="sgd")
    recipe = Recipe.model_validate(spec)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", None)
    spec["train"]["lr"] = 0.5
    with pytest.raises(RunError, match="recipe differs"):
        run_recipe(Recipe.model_validate(spec), resume=True)


def test_finished_run_is_not_overwritten_silently(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    recipe, _ = _run(tiny_bert, sentiment_csv, tmp_path, {"train.epochs": 1})
    with pytest.raises(RunError, match="--overwrite"):
        run_recipe(recipe)
    again = run_recipe(recipe, overwrite=True)
    assert (again.run_dir / "run.json").exists()


def test_gpt2_lora_and_unfreeze(tiny_gpt2: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    spec = recipe_dict(tiny_gpt2, sentiment_csv, tmp_path, name="lora", r=2)
    spec["train"]["epochs"] = 1
    result = run_recipe(Recipe.model_validate(spec))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["method"]["lora_target_modules"] == ["c_attn"]
    # GPT-2 c_attn is Conv1D 32 -> 96; head "score" has no bias: 32*2.
    assert run["method"]["trainable_parameters"] == 2 * 2 * (32 + 96) + 32 * 2
    spec = recipe_dict(tiny_gpt2, sentiment_csv, tmp_path / "u", name="freeze", unfreeze_top_k=1)
    spec["train"]["epochs"] = 1
    result = run_recipe(Recipe.model_validate(spec))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["method"]["unfrozen_blocks"] == ["transformer.h.1", "transformer.ln_f"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path, name="full")
    spec["train"]["epochs"] = 3
    recipe = Recipe.model_validate(spec)
    steps_per_epoch = -(-json_rows_train(recipe) // 16)

    def poisoned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, labels)
        # Training losses only (evaluation calls come between epochs); break in epoch 2.
        return loss * float("nan") if calls["n"] == steps_per_epoch + 2 + 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(RunError, match="non-finite loss at epoch 2"):
        run_recipe(recipe)
    checkpoints = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch-1"]
    assert not (recipe.run_dir / "run.json").exists()


def json_rows_train(recipe: Recipe) -> int:
    from hubtune.data import load_data

    return len(load_data(recipe.data, seed=recipe.seed).splits["train"])


def test_feature_cache_is_per_split(tiny_bert: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    """A new training subset recomputes only the training features."""
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path)
    spec["train"]["epochs"] = 1
    spec["data"]["limit"] = {"train": 100}
    run_recipe(Recipe.model_validate(spec))
    spec["name"], spec["data"]["limit"] = "tiny-b", {"train": 120}
    run_recipe(Recipe.model_validate(spec))
    run = json.loads((tmp_path / "tiny-b" / "run.json").read_text())
    assert run["feature_cache"]["hits"] == {"train": False, "validation": True, "test": True}
    metrics = read_metrics(tmp_path / "tiny-b")
    assert metrics is not None
    history = metrics.history
    assert history[0]["train_epoch_s"] > 0


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    ("recipe_value", "launcher", "dp", "expected"),
    [
        (None, None, False, "no"),
        (None, "no", False, "no"),
        (None, "bf16", False, "bf16"),  # accelerate launch --mixed_precision bf16 applies
        (None, "bf16", True, "bf16"),
        ("bf16", None, False, "bf16"),
        ("bf16", "no", False, "bf16"),  # the launcher writes "no" when nothing was asked
        ("bf16", "bf16", True, "bf16"),
        ("no", "bf16", False, "conflict"),
        ("fp16", "bf16", False, "conflict"),
        (None, "fp16", True, "fp16 .*is refused"),
    ],
)
def test_the_launchers_precision_applies_unless_the_recipe_conflicts(
    monkeypatch: pytest.MonkeyPatch,
    recipe_value: str | None,
    launcher: str | None,
    dp: bool,
    expected: str,
) -> None:
    from hubtune.launch import resolve_mixed_precision

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    if expected in ("no", "bf16"):
        assert resolve_mixed_precision(recipe_value, dp=dp) == expected
        return
    pattern = (
        f"train.mixed_precision is '{recipe_value}' in the recipe but the launcher asked for '{launcher}'"
        if expected == "conflict"
        else expected
    )
    with pytest.raises(ValueError, match=pattern):
        resolve_mixed_precision(recipe_value, dp=dp)


def test_a_run_under_accelerate_launch_bf16_trains_in_bf16(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _, result = _run(tiny_bert, sentiment_csv, tmp_path / "runs", {"train.epochs": 1})
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["hardware"]["mixed_precision"] == "bf16"
    resolved = (result.run_dir / "recipe.resolved.yaml").read_text()
    assert "mixed_precision: bf16" in resolved
    with pytest.raises(RunError, match="'no' in the recipe but the launcher asked for 'bf16'"):
        _run(tiny_bert, sentiment_csv, tmp_path / "b", {"train.mixed_precision": "no"})


def test_length_grouped_batches_cover_every_row_once_and_pad_less() -> None:
    from hubtune.loop import LengthGroupedBatches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 64, (1000,), generator=g).tolist()
    sampler = LengthGroupedBatches(lengths, 16, seed=7)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 63
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert [len(b) for b in batches[:-1]] == [16] * 62 and len(batches[-1]) == 1000 - 62 * 16
        epochs.append(batches)
    assert epochs[0] == epochs[2] != epochs[1]  # a function of (seed, epoch)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epochs[0])
    shuffled = torch.randperm(1000, generator=g).tolist()
    random = sum(
        len(shuffled[i : i + 16]) * max(lengths[j] for j in shuffled[i : i + 16])
        for i in range(0, 1000, 16)
    )
    assert padded < 0.7 * random  # far less padding than random batches
    assert LengthGroupedBatches(lengths, 16, seed=8).__iter__().__next__() != epochs[0][0]


def test_group_by_length_runs_resume_bit_identically(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 2, "train.lr": 1e-3, "train.group_by_length": True}
    _, whole = _run(
        tiny_bert, sentiment_csv, tmp_path / "whole", over, name="freeze", unfreeze_top_k=1
    )
    _, plain = _run(
        tiny_bert,
        sentiment_csv,
        tmp_path / "plain",
        {**over, "train.group_by_length": False},
        name="freeze",
        unfreeze_top_k=1,
    )
    loss = [h["train_loss"] for h in whole.metrics["history"]]
    assert loss != [h["train_loss"] for h in plain.metrics["history"]]  # other batches were used

    def crash(epoch: int) -> None:
        raise KeyboardInterrupt

    spec = recipe_dict(
        tiny_bert, sentiment_csv, tmp_path / "broken", name="freeze", unfreeze_top_k=1
    )
    spec["train"].update(epochs=2, lr=1e-3, group_by_length=True)
    recipe = Recipe.model_validate(spec)
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", None)
    resumed = run_recipe(recipe, resume=True)
    a = load_file(whole.run_dir / "model" / "model.safetensors")
    b = load_file(resumed.run_dir / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in whole.metrics["history"]] == [
        h["train_loss"] for h in resumed.metrics["history"]
    ]
