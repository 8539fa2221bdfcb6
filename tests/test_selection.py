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
    spec = recipe_dict(tiny_bert, csv, out, name="freeze", head_fit="sgd")
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
    from hubtune.card import build_card

    card = build_card(run_dir).text
    assert "**Weights:** epoch 5 of 6 (best validation accuracy 0.7917)" in card
    assert "| `train.epochs` | 6 |" in card
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


def test_lbfgs_fits_the_head_to_convergence_and_keeps_the_best_weight_decay(
    best_run, tmp_path: Path
) -> None:
    """head_fit auto, no privacy: every weight decay fitted to convergence, the best one kept."""

    from hubtune.headfit import WEIGHT_DECAYS

    recipe, _ = best_run
    spec = recipe.model_dump(mode="json")
    spec.update(name="lbfgs", output_dir=str(tmp_path))
    spec["method"]["head_fit"] = "auto"
    result = run_recipe(Recipe.model_validate(spec))
    history = result.metrics["history"]
    assert [h["weight_decay"] for h in history] == list(WEIGHT_DECAYS)
    assert all(h["solver"] == "lbfgs" and h["converged"] for h in history)
    accuracies = [h["val_accuracy"] for h in history]
    selected = result.metrics["selected_epoch"]
    assert selected["epoch"] == accuracies.index(max(accuracies)) + 1
    assert "weight decay" in format_summary(result)
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["method"]["head_fit"] == "lbfgs"
    kept = history[selected["epoch"] - 1]
    assert run_info["selected_epoch"]["weight_decay"] == kept["weight_decay"]
    # The card names the fit, not the epochs and learning rate that did not apply.
    from hubtune.card import build_card

    card = build_card(result.run_dir).text
    assert f"L-BFGS to convergence, weight decay {kept['weight_decay']}" in card
    assert "**Weights:** head fitted to convergence (L-BFGS)" in card
    assert "`train.epochs`" not in card and "`train.lr`" not in card


def test_the_lbfgs_head_is_the_solution_of_the_convex_problem() -> None:
    """Checked against scikit-learn's logistic regression on the same features and penalty."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from hubtune.headfit import fit_head
    from hubtune.tasks.classification import loss, metrics

    class Split:
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.randint(0, 2, (n,), generator=g)
            self.features = torch.randn(n, 8, generator=g) + self.labels[:, None] * 0.7

    train, validation = Split(300, 0), Split(100, 1)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 2)
    kept = []
    history = fit_head(
        head,
        train,
        validation,
        loss_fn=loss,
        metrics=lambda logits, y: metrics(logits, y, 2),
        observe=kept.append,
        weight_decays=(0.01,),
    )
    assert history[0]["converged"] and kept == history
    # Two-class softmax with (λ/2)(‖w0‖² + ‖w1‖²) has w0 = -w1 at the optimum, so for d = w1 - w0
    # the objective is mean CE + (λ/4)‖d‖²: scikit-learn's with C = 2 / (n λ) (intercept free).
    reference = LogisticRegression(C=2 / (300 * 0.01), tol=1e-12, max_iter=10_000)
    reference.fit(train.features.numpy().astype(np.float64), train.labels.numpy())
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    np.testing.assert_allclose(w[1] - w[0], reference.coef_[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b[1] - b[0], reference.intercept_[0], rtol=1e-3, atol=1e-4)
