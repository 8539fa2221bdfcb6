"""``hubtune data scan``: count the personal data in a data source or a recipe's data.

A recipe is read exactly as a run reads it (its columns, splits, cleaning; its own
``data.anonymize`` is not applied, since the scan is what tells whether it is needed), and every
model text input is scanned: ``text`` (and ``text_pair``), ``prompt`` and ``completion``, or
each message of ``messages``. A data source (a file, a folder of split files, or a Hub data set
id) is scanned in the columns ``--column`` names (default ``text``), all splits together.

Writes ``scan.json`` and ``scan.html`` (self-contained, values masked) into the output folder
atomically; the detection itself is :mod:`hubtune.pii`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hubtune.errors import InputError

__all__ = ["ScanError", "scan"]


class ScanError(InputError, ValueError):
    """A scan target that cannot be scanned as given."""


def _recipe_texts(target: str) -> tuple[str, dict[str, list[str]]] | None:
    from hubtune.data import _texts_of, load_data
    from hubtune.recipe import RecipeNotFoundError, load_recipe
    from hubtune.tasks import TASKS

    path = Path(target)
    if path.suffix.lower() in (".yaml", ".yml"):
        recipe = load_recipe(path)
    elif path.suffix or path.exists():  # a data file or folder
        return None
    else:  # a shipped recipe's name, or a Hub data set id
        try:
            recipe = load_recipe(target)
        except RecipeNotFoundError:
            return None
    if TASKS[recipe.model.task].input_kind == "image":
        raise ScanError(f"{target}: model.task {recipe.model.task} has no text to scan")
    from hubtune.hub import hub_endpoint

    section = recipe.data.model_copy(update={"anonymize": None})
    with hub_endpoint(recipe.hub.endpoint, local_root=recipe.hub.local_root):  # as a run reads it
        data = load_data(section, seed=recipe.seed, task=recipe.model.task)
    texts: dict[str, list[str]] = {}
    for column in data.text_columns:
        texts[column] = [t for split in data.splits.values() for t in _texts_of(split, column)]
    return f"recipe {recipe.name} ({recipe.data.source})", texts


def _source_texts(target: str, columns: list[str]) -> tuple[str, dict[str, list[str]]]:
    import pandas as pd

    from hubtune.data import _load_raw
    from hubtune.recipe import DataSection

    section = DataSection.model_validate({"source": target})
    frames = _load_raw(section, columns)
    texts: dict[str, list[str]] = {}
    for column in columns:
        missing = [name for name, frame in frames.items() if column not in frame.columns]
        if missing:
            have = sorted({c for f in frames.values() for c in f.columns})
            raise ScanError(
                f"{target}: no column {column!r} in split(s) {missing}; it has {have}. Name the "
                "text columns with --column"
            )
        values = pd.concat([frame[column] for frame in frames.values()], ignore_index=True)
        texts[column] = values.dropna().astype(str).tolist()
    return f"data source {target}", texts


def scan(
    target: str,
    *,
    columns: list[str] | None = None,
    min_score: float | None = None,
    ner: bool = True,
    examples: int = 3,
) -> dict[str, Any]:
    """Scan a recipe's data or a data source; the JSON-ready result (see ``pii.scan_texts``)."""
    from hubtune.pii import DEFAULT_MIN_SCORE, SPACY_MODEL, Detector, scan_texts

    start = time.perf_counter()
    found = _recipe_texts(target) if not columns else None
    what, texts = found if found is not None else _source_texts(target, columns or ["text"])
    if not texts or not any(texts.values()):
        raise ScanError(f"{target}: no text rows to scan")
    detector = Detector(
        min_score=DEFAULT_MIN_SCORE if min_score is None else min_score,
        spacy_model=SPACY_MODEL if ner else None,
    )
    if len({len(t) for t in texts.values()}) == 1:  # one row = the same index in every column
        result = scan_texts(detector, texts, examples=examples)
    else:  # source columns with different missing rows: each column on its own
        per_column = {c: scan_texts(detector, {c: t}, examples=examples) for c, t in texts.items()}
        result = next(iter(per_column.values()))
        result["by_column"] = {c: r["entities"] for c, r in per_column.items()}
    result.update(target=what, seconds=round(time.perf_counter() - start, 1))
    return result


def write_scan(result: dict[str, Any], out: Path) -> Path:
    """``scan.json`` and ``scan.html`` into ``out`` (replaced atomically)."""
    from hubtune.io import atomic_dir, atomic_write_json, atomic_write_text
    from hubtune.pii import scan_html

    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "scan.json", result)
        atomic_write_text(
            tmp / "scan.html", scan_html(result, title=f"PII scan: {result['target']}")
        )
    return out
