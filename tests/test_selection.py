"""The kept weights: the best validation epoch's (train.select_epoch), through checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubtune import checkpoint as checkpoint_module
from hubtune.pipeline import format_summary, run_recipe
from hubtune.recipe import Recipe
from hubtune.selection import Selection

from .conftest import recipe_dict

# On the tiny model and the synthetic reviews, this head's validation accuracy peaks at epoch 5 of
# 6 (0.583, 0.708, 0.667, 0.708, 0.792, 0.708): the best epoch is not the last one.
SETTINGS = {"epochs": 6, "lr": 0.05, "keep_checkpoints": 6}
BEST = 5


def _recipe(tiny_bert: Path, csv: Path, out: Path, **train: object) -> Recipe:
    spec = recipe_dict(tiny_bert, csv, out)
    spec["train"].update(SETTINGS, **train)
    spec["audit"] = {"enabled": False}
    return Recipe.model_validate(spec)


def _head(folder: Path) -> dict[str, torch.Tensor]:
    """The head's tensors, from a saved model or from a checkpoint of the cached-feature head."""
    saved = load_file(folder / "model.safetensors")
    return {
        k.removeprefix("classifier."): v
        for k, v in saved.items()
        if "." not in k or "classifier." in k
    }


def _variant(recipe: Recipe, name: str, out: Path, **train: object) -> Recipe:
    spec = recipe.model_dump(mode="json")
    spec.update(name=name, output_dir=str(out))
    spec["train"].update(train)
    return Recipe.model_validate(spec)


def _checkpoint_head(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return _head(run_dir / "checkpoints" / f"epoch-{epoch}")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def best_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, object]:
    from .conftest import make_sentiment_frame

    folder = tmp_path_factory.mktemp("selection")
    csv = folder / "reviews.csv"
    make_sentiment_frame().to_csv(csv, index=False)
    recipe = _recipe(tiny_bert, csv, folder / "runs")
    return recipe, run_recipe(recipe)


def test_the_best_validation_epoch_is_the_one_tested_saved_and_recorded(best_run) -> None:
    recipe, result = best_run
    history = result.metrics["history"]
    accuracies = [h["val_accuracy"] for h in history]
    assert accuracies.index(max(accuracies)) + 1 == BEST != len(history), accuracies
    selected = result.metrics["selected_epoch"]
    assert selected == {
        "epoch": BEST,
        "rule": "best",
        "metric": "val_accuracy",
        "value": max(accuracies),
        "of": 6,
    }
    run_dir = result.run_dir
    saved = _head(run_dir / "model")
    assert _same(saved, _checkpoint_head(run_dir, BEST))
    assert not _same(saved, _checkpoint_head(run_dir, 6))
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["selected_epoch"] == selected
    assert "weights:   epoch 5 of 6 (best validation accuracy 0.7917)" in format_summary(result)


def test_select_epoch_last_keeps_the_last_epoch(best_run, tmp_path: Path) -> None:
    recipe, _ = best_run
    result = run_recipe(_variant(recipe, "last", tmp_path, select_epoch="last"))
    assert result.metrics["selected_epoch"]["epoch"] == 6
    assert result.metrics["selected_epoch"]["rule"] == "last"
    assert _same(_head(result.run_dir / "model"), _checkpoint_head(result.run_dir, 6))


def test_a_resumed_run_keeps_the_epoch_chosen_before_the_crash(
    best_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash after the best epoch: only the checkpoint's copy can bring its weights back."""
    recipe, whole = best_run
    broken = _variant(recipe, "broken", tmp_path)

    class Crash(Exception):
        pass

    def crash(epoch: int) -> None:
        if epoch == BEST - 1:
            raise Crash

    monkeypatch.setattr(checkpoint_module, "after_checkpoint", crash)
    with pytest.raises(Crash):
        run_recipe(broken)
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", None)
    resumed = run_recipe(broken, resume=True)
    assert resumed.resumed_from_epoch == BEST
    assert resumed.metrics["selected_epoch"] == whole.metrics["selected_epoch"]
    assert _same(_head(resumed.run_dir / "model"), _head(whole.run_dir / "model"))


def test_selection_rules() -> None:
    model = torch.nn.Linear(2, 1)
    best = Selection("best", "accuracy")
    for epoch, value in [(1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6)]:
        best.observe(model, {"epoch": epoch, "val_accuracy": value})
    assert (best.epoch, best.value) == (2, 0.7)  # the earliest of a tie
    low = Selection("best", "loss")
    for epoch, value in [(1, 0.5), (2, 0.3), (3, 0.4)]:
        low.observe(model, {"epoch": epoch, "val_loss": value})
    assert low.epoch == 2  # loss: the lowest
    last = Selection("last", "accuracy")
    for epoch, value in [(1, 0.9), (2, 0.1)]:
        last.observe(model, {"epoch": epoch, "val_accuracy": value})
    assert last.epoch == 2 and last.tensors is None
