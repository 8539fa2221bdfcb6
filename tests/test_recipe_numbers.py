"""Every float in a recipe must be finite: inf and nan are refused, located, in YAML and overrides."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from hubtune.recipe import FreezeMethod, FullMethod, LoraMethod, Recipe, RecipeError, load_recipe

BASE = """\
name: numbers
model:
  id: org/model
data:
  source: data.csv
method:
  name: {method}
privacy:
  enabled: true
  target_epsilon: 8
"""

NON_FINITE = ["inf", ".inf", "-inf", "-.inf", "nan", ".nan", "Infinity"]


def _float_paths(annotation: object, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Key paths of the floats below ``path`` (a tuple's items get their index)."""
    if annotation is float:
        return [path]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [
            found
            for name, field in annotation.model_fields.items()
            for found in _float_paths(field.annotation, (*path, name))
        ]
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return [found for i, arg in enumerate(args) for found in _float_paths(arg, (*path, str(i)))]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _float_paths(arg, path)]
    return []


def _every_float_field() -> list[tuple[str, str]]:
    """(method name, dotted path) for each float field of the recipe, each method's included."""
    fields = []
    for name, field in Recipe.model_fields.items():
        if name == "method":
            continue
        fields += [("freeze", ".".join(p)) for p in _float_paths(field.annotation, (name,))]
    for method in (FreezeMethod, FullMethod, LoraMethod):
        tag = typing.get_args(method.model_fields["name"].annotation)[0]
        fields += [(tag, ".".join(p)) for p in _float_paths(method, ("method",))]
    return fields


FLOAT_FIELDS = _every_float_field()


def test_the_walk_finds_the_float_fields() -> None:
    paths = {path for _, path in FLOAT_FIELDS}
    assert {
        "privacy.target_epsilon",
        "privacy.max_grad_norm",
        "privacy.noise_multiplier",
        "privacy.delta",
        "train.lr",
        "train.max_grad_norm",
        "data.split.test",
        "data.augment.crop_scale.1",
        "method.alpha",
        "method.backbone_lr",
    } <= paths
    assert len(paths) >= 20


def _override(path: str, spelling: str) -> str:
    """``key=value`` setting the float at ``path`` (a tuple item: the whole tuple) to ``spelling``."""
    head, _, last = path.rpartition(".")
    if last.isdigit():  # crop_scale.1: valid items around the non-finite one
        items = ["0.5"] * 2
        items[int(last)] = spelling
        return f"{head}=[{', '.join(items)}]"
    return f"{path}={spelling}"


@pytest.mark.parametrize(("method", "path"), FLOAT_FIELDS, ids=[p for _, p in FLOAT_FIELDS])
@pytest.mark.parametrize("spelling", ["inf", "nan", "-inf"])
def test_every_float_field_refuses_non_finite_overrides(
    method: str, path: str, spelling: str, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.format(method=method))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides=[_override(path, spelling)])
    issues = {issue.path: issue for issue in info.value.issues}
    assert list(issues) == [path], str(info.value)
    issue = issues[path]
    assert "finite number" in issue.message and "(set on the command line)" in issue.message
    assert issue.hint is not None and "inf" in issue.hint and "nan" in issue.hint


@pytest.mark.parametrize("spelling", NON_FINITE)
@pytest.mark.parametrize("key", ["target_epsilon", "max_grad_norm"])
def test_non_finite_privacy_values_in_yaml_are_located(
    key: str, spelling: str, tmp_path: Path
) -> None:
    """The two reported holes: ε = inf ran at σ = 0.3; C = inf failed later, misleadingly."""
    text = BASE.format(method="freeze")
    if key == "target_epsilon":
        text = text.replace("target_epsilon: 8", f"target_epsilon: {spelling}")
    else:
        text += f"  {key}: {spelling}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    (issue,) = info.value.issues
    assert issue.path == f"privacy.{key}"
    assert issue.line == (10 if key == "target_epsilon" else 11)
    assert "finite number" in issue.message
    text = str(info.value)
    assert f"{recipe}:{issue.line}: privacy.{key}: " in text and "hint:" in text


def test_finite_values_still_pass(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.format(method="lora"))
    loaded = load_recipe(
        recipe,
        overrides=["privacy.target_epsilon=1e3", "privacy.max_grad_norm=0.5", "method.alpha=1e-2"],
    )
    assert loaded.privacy is not None and loaded.privacy.target_epsilon == 1000.0
