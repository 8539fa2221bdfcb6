"""Checking what a recipe names before anything runs: the model and the data source.

``hubtune validate --inputs`` runs these checks, and so does every run before it touches its
run folder, so a missing file or an unknown model neither starts a run nor (with
``--overwrite``) deletes the previous one. They are cheap: no weights are downloaded and no
data set is built; label values are left to loading (``hubtune.data.load_data``).

Example:
    >>> from hubtune.hub import hub_endpoint
    >>> with hub_endpoint(recipe.hub.endpoint, local_root=recipe.hub.local_root):
    ...     for line in check_inputs(recipe):
    ...         print(line)
"""

from __future__ import annotations

from collections.abc import Callable

from hubtune.data import check_source
from hubtune.errors import InputError
from hubtune.hub import check_model
from hubtune.recipe import Recipe

__all__ = ["check_inputs"]


def _model(recipe: Recipe) -> str:
    return check_model(
        recipe.model.id, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle
    )


def _data(recipe: Recipe) -> str:
    return check_source(recipe.data, task=recipe.model.task)


def check_inputs(recipe: Recipe) -> list[str]:
    """Check the recipe's model and data source; call it inside ``hub_endpoint`` for the recipe.

    Args:
        recipe: A validated recipe.

    Returns:
        One line per input, saying what was found.

    Raises:
        InputError: the one problem found (its own type, e.g. ``DataSourceError``), or every
            problem found, one per line, when both the model and the data have one.
    """
    checks: list[Callable[[Recipe], str]] = [_model, _data]
    found: list[str] = []
    problems: list[InputError] = []
    for check in checks:
        try:
            found.append(check(recipe))
        except InputError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InputError("\n".join(str(p) for p in problems))
    return found
