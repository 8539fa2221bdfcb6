"""Text classification (``model.task: text-classification``): a tokenizer and a sequence classifier.

Examples are tokenised once (truncated to ``model.max_length``) and padded per batch; a text
pair column, when the recipe names one, goes in as the tokenizer's second sequence.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hubtune import baselines
from hubtune.tasks import classification
from hubtune.tasks.snippets import lora_base_lines, model_location

__all__ = ["TASK", "Encoded", "collator", "encode", "load_snippet", "pipeline_snippet"]


def _load(
    resolved: Any, section: Any, *, label_names: list[str], method_name: str
) -> tuple[Any, Any, list[str]]:
    from hubtune.model import load_classifier

    return load_classifier(resolved, section, label_names=label_names, method_name=method_name)


class Encoded:
    """Tokenised examples (a map-style data set); padding happens per batch in the collator."""

    def __init__(self, encodings: dict[str, list[Any]], labels: Any):
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {key: values[i] for key, values in self.encodings.items()}
        item["labels"] = int(self.labels[i])
        item["idx"] = i
        return item


def encode(tokenizer: Any, frame: Any, max_length: int) -> Encoded:
    """Tokenise a split (``text``, optional ``text_pair``) with its labels."""
    pair = frame["text_pair"].tolist() if "text_pair" in frame else None
    encodings = tokenizer(frame["text"].tolist(), pair, truncation=True, max_length=max_length)
    return Encoded(dict(encodings), frame["label"].to_numpy())


def _encode_split(tokenizer: Any, frame: Any, recipe: Any, *, train: bool) -> Encoded:
    return encode(tokenizer, frame, recipe.model.max_length)


def collator(tokenizer: Any) -> Any:
    """Pad a list of encoded examples to one batch of tensors (``idx`` kept aside)."""
    import torch
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        idx = torch.tensor([item.pop("idx") for item in items])
        batch = dict(pad(items))
        batch["idx"] = idx
        return batch

    return collate


def _cache_inputs(frame: Any, recipe: Any, processor: Any = None) -> dict[str, Any]:
    """The texts of a split, in order, and the truncation: what the model's input depends on."""
    import pandas as pd

    columns = ["text"] + (["text_pair"] if "text_pair" in frame else [])
    texts = hashlib.sha256(
        pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes()
    )
    return {"texts": texts.hexdigest(), "max_length": recipe.model.max_length}


def load_snippet(
    *,
    run_dir: Path,
    repo_id: str | None,
    revision: str | None,
    lora: bool,
    base: dict[str, Any],
    label_names: list[str],
    max_length: int = 128,
) -> str:
    """A Python snippet that loads the model and classifies a text."""
    from hubtune.model import is_pooled_model

    where, kw = model_location(run_dir=run_dir, repo_id=repo_id, revision=revision, lora=lora)
    lines = [
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
    ]
    if lora:
        lines.append("from peft import PeftModel")
        if base.get("kind") == "package":
            lines.append("from importlib.resources import files")
    lines += ["", *where.rstrip("\n").split("\n")]
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained(model_id{kw})")
    if lora:
        lines += lora_base_lines(base, label_names, "AutoModelForSequenceClassification", kw)
    elif is_pooled_model(run_dir / "model"):
        # hubtune's pooled classifier: its code (modeling_pooled.py) is in the model folder.
        lines.append(
            "model = AutoModelForSequenceClassification.from_pretrained("
            f"model_id{kw}, trust_remote_code=True).eval()"
        )
    else:
        lines.append(
            f"model = AutoModelForSequenceClassification.from_pretrained(model_id{kw}).eval()"
        )
    lines += [
        "",
        'texts = ["Replace this with the text to classify."]',
        f"inputs = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, "
        'return_tensors="pt")',
        "with torch.no_grad():",
        "    probabilities = model(**inputs).logits.softmax(-1)",
        "for row in probabilities:",
        "    print({model.config.id2label[i]: round(float(p), 3) for i, p in enumerate(row)})",
    ]
    return "\n".join(lines) + "\n"


def pipeline_snippet(*, repo_id: str, label_names: list[str]) -> str:
    """A ``transformers.pipeline`` call for a pushed LoRA adapter that names the labels.

    The pipeline takes an adapter repo's configuration from its base model, which has no
    labels of this run (it would answer ``LABEL_1``, or fail to fit a head of another size):
    ``model_kwargs`` gives them to the base model's configuration.
    """
    id2label = "{" + ", ".join(f"{i}: {json.dumps(n)}" for i, n in enumerate(label_names)) + "}"
    return (
        "\n".join(
            [
                "from transformers import pipeline",
                "",
                f"id2label = {id2label}",
                "classifier = pipeline(",
                '    "text-classification",',
                f"    model={json.dumps(repo_id)},",
                "    model_kwargs={",
                '        "id2label": id2label,',
                '        "label2id": {name: i for i, name in id2label.items()},',
                "    },",
                ")",
                'print(classifier("Replace this with the text to classify."))',
            ]
        )
        + "\n"
    )


TASK = classification.task(
    name="text-classification",
    input_kind="text",
    title="Text Classification",
    space_widget="textbox",
    load=_load,
    encode=_encode_split,
    collate=collator,
    cache_inputs=_cache_inputs,
    load_snippet=load_snippet,
    pipeline_snippet=pipeline_snippet,
    classical_baseline=baselines.classical_text,
)
