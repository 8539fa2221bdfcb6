"""Shared parts of the model card's "how to load" snippets (the tasks write the rest)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from hubtune.rundir import public_path

__all__ = ["lora_base_lines", "model_location"]


def model_location(
    *, run_dir: Path, repo_id: str | None, revision: str | None, lora: bool
) -> tuple[str, str]:
    """(the snippet lines naming the model, the revision keyword to pass on loading)."""
    if repo_id is not None:
        where = f"model_id = {json.dumps(repo_id)}\nrevision = {json.dumps(revision or 'main')}\n"
        return where, ", revision=revision"
    folder = "adapter" if lora else "model"
    local = public_path(str(run_dir)) or run_dir.name
    where = f"model_id = {json.dumps(str(PurePosixPath(local) / folder))}  # this run's {folder}/ folder\n"
    return where, ""


def lora_base_lines(
    base: dict[str, Any], label_names: list[str], auto_class: str, kw: str
) -> list[str]:
    """Snippet lines that load the adapter's base model with this run's labels, then the adapter."""
    labels = "{" + ", ".join(f"{i}: {json.dumps(n)}" for i, n in enumerate(label_names)) + "}"
    comment = f"  # {base['comment']}" if base.get("comment") else ""
    lines = [
        f"base_dir = {base['load_expr']}{comment}",
        f"id2label = {labels}",
        f"base = {auto_class}.from_pretrained(",
        "    base_dir,",
    ]
    if base.get("load_revision"):
        lines.append(f"    revision={json.dumps(base['load_revision'])},")
    lines += [
        "    num_labels=len(id2label),",
        "    id2label=id2label,",
        "    label2id={name: i for i, name in id2label.items()},",
    ]
    if auto_class == "AutoModelForImageClassification":  # the base's head has its own classes
        lines.append("    ignore_mismatched_sizes=True,")
    return [*lines, ")", f"model = PeftModel.from_pretrained(base, model_id{kw}).eval()"]
