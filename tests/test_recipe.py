"""Recipe validation: every shipped recipe validates; errors come all at once, located, with hints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hubtune.cli import app
from hubtune.recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_to_yaml

RECIPES_DIR = Path(__file__).parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {
        "quickstart.yaml",
        "quickstart-lora.yaml",
        "sentiment-rotten-tomatoes.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # Shipped recipes say what they do and how to run them in a header comment.
    head = path.read_text().splitlines()[:3]
    assert all(line.startswith("#") for line in head)
    assert f"hubtune run recipes/{path.name}" in path.read_text()


BAD = """\
name: bad
model:
  id: org/model
data:
  source: data.csv
  columns:
    txt: comment
method:
  name: lora
  r: many
train:
  bach_size: 16
  epochs: three
"""


def test_all_errors_reported_with_paths_lines_and_hints(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    issues = {issue.path: issue for issue in info.value.issues}
    assert set(issues) == {"data.columns.txt", "method.r", "train.bach_size", "train.epochs"}
    assert issues["train.bach_size"].line == 12
    assert "did you mean `batch_size`" in (issues["train.bach_size"].hint or "")
    assert issues["data.columns.txt"].line == 7
    assert "did you mean `text`" in (issues["data.columns.txt"].hint or "")
    assert issues["method.r"].line == 10
    assert issues["train.epochs"].line == 13
    assert "integer" in issues["train.epochs"].message
    text = str(info.value)
    assert "4 problems" in text and f"{path}:12: train.bach_size" in text


def test_missing_field_and_unknown_method(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndata:\n  source: d.csv\nmethod:\n  name: finetune\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    issues = {issue.path: issue for issue in info.value.issues}
    assert "model" in issues and "add `model`" in (issues["model"].hint or "")
    assert issues["method"].line == 4
    assert "'freeze', 'lora', 'full'" in (issues["method"].hint or "")


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel:\n  id: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (
        info.value.issues[0].line is not None and "not valid YAML" in info.value.issues[0].message
    )


def test_overrides_parse_yaml_values_and_nest(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: {id: org/m}\ndata: {source: d.csv}\nmethod: {name: lora}\n")
    recipe = load_recipe(
        path,
        overrides=[
            "train.epochs=7",
            "method.r=16",
            "method.target_modules=[query,key]",
            "data.limit.train=100",
            "train.lr=1e-4",
        ],
    )
    assert recipe.train.epochs == 7 and recipe.method.r == 16  # type: ignore[union-attr]
    assert recipe.method.target_modules == ["query", "key"]  # type: ignore[union-attr]
    assert recipe.data.limit == {"train": 100} and recipe.train.lr == 1e-4
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides=["train.epochs=0"])
    assert (
        info.value.issues[0].path == "train.epochs"
        and "command line" in info.value.issues[0].message
    )
    with pytest.raises(
        RecipeError, match=r"no-equals-sign: override is not of the form key\.sub=value"
    ):
        apply_overrides({}, ["no-equals-sign"])


def test_trust_remote_code_needs_a_pinned_sha() -> None:
    base = {"name": "x", "data": {"source": "d.csv"}, "method": {"name": "full"}}
    with pytest.raises(ValidationError, match="40-character commit SHA"):
        Recipe.model_validate(
            {**base, "model": {"id": "org/m", "trust_remote_code": True, "revision": "main"}}
        )
    ok = Recipe.model_validate(
        {**base, "model": {"id": "org/m", "trust_remote_code": True, "revision": "a" * 40}}
    )
    assert ok.model.trust_remote_code


def test_privacy_section_cross_checks() -> None:
    base = {
        "name": "x",
        "model": {"id": "org/m"},
        "data": {"source": "d.csv"},
        "method": {"name": "full"},
    }
    assert not Recipe.model_validate({**base, "privacy": {"enabled": False}}).dp
    with pytest.raises(ValidationError, match="exactly one of privacy.target_epsilon"):
        Recipe.model_validate({**base, "privacy": {"enabled": True}})
    with pytest.raises(ValidationError, match="exactly one of privacy.target_epsilon"):
        Recipe.model_validate(
            {**base, "privacy": {"enabled": True, "target_epsilon": 8, "noise_multiplier": 1.0}}
        )
    with pytest.raises(ValidationError, match="fp16 GradScaler"):
        Recipe.model_validate(
            {
                **base,
                "privacy": {"enabled": True, "target_epsilon": 8},
                "train": {"mixed_precision": "fp16"},
            }
        )
    ok = Recipe.model_validate(
        {
            **base,
            "privacy": {"enabled": True, "target_epsilon": 8},
            "train": {"mixed_precision": "bf16"},
        }
    )
    assert ok.dp and ok.privacy is not None and ok.privacy.accountant == "prv"


def test_sensitive_columns_cannot_be_model_input() -> None:
    with pytest.raises(ValidationError, match="sensitive"):
        Recipe.model_validate(
            {
                "name": "x",
                "model": {"id": "o/m"},
                "method": {"name": "full"},
                "data": {"source": "d.csv", "columns": {"text": "t", "sensitive": ["t"]}},
            }
        )


def test_method_defaults_and_resolved_yaml_round_trip(tmp_path: Path) -> None:
    recipe = Recipe.model_validate(
        {
            "name": "x",
            "model": {"id": "o/m"},
            "data": {"source": "d.csv"},
            "method": {"name": "full"},
        }
    )
    assert recipe.lr == 2e-5
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe


def test_cli_validate_reports_and_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "train.bach_size" in result.output and "did you mean" in result.output
    good = CliRunner().invoke(app, ["validate", str(RECIPES[0]), "train.epochs=1"])
    assert good.exit_code == 0, good.output
    assert ": ok" in good.output


def test_shipped_recipes_found_by_name_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_recipe("quickstart").name == "quickstart"
    with pytest.raises(FileNotFoundError, match="quickstart-lora"):
        load_recipe("no-such-recipe")


def test_switching_method_on_the_command_line_drops_the_old_methods_options() -> None:
    recipe = load_recipe(
        RECIPES_DIR / "quickstart.yaml", overrides=["method.name=lora", "method.r=4"]
    )
    assert recipe.method.name == "lora" and recipe.method.r == 4  # type: ignore[union-attr]
    same = load_recipe(
        "recipes/quickstart.yaml", overrides=["method.name=freeze", "method.unfreeze_top_k=1"]
    )
    assert same.method.feature_cache is True  # type: ignore[union-attr]  # kept: same method
