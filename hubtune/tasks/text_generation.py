"""Text generation (``model.task: text-generation``): a causal language model and its tokenizer.

**Examples.** One row is one example and one privacy unit. A row is either plain text
(``data.columns.text``: the loss covers every token) or a prompt and its completion
(``data.columns.prompt`` + ``data.columns.completion``: the loss covers the completion tokens
only, the prompt is context) or a chat conversation (``data.columns.messages``: rendered by the
chat template, the loss covers the assistant's turns; see :mod:`hubtune.tasks.chat`).
``data.loss_on: all`` puts the prompt (every turn) in the loss too. Each plain or prompt +
completion example is ``[bos] tokens [eos]`` (``bos`` only where the tokenizer has one; a chat
template writes its own markers), truncated to ``model.max_length``; a prompt that leaves no
room for its completion is cut from the left, so the completion keeps at least one token, and a
conversation too long to keep its first answer is cut from the left likewise.

**No packing.** Examples are never concatenated into shared chunks: each row of a batch is one
example, padded on the right, with an attention mask, so an example's loss never sees another
example's tokens and, under DP, per-example clipping clips one example (never a chunk of
several). Batches of similar lengths (``train.group_by_length``; DP: every Poisson batch is
length-sorted) keep the padding small instead.

**Loss.** The mean token cross-entropy of each example (its labelled tokens), averaged over the
batch: one example weighs the same whatever its length, which is what per-example clipping
assumes. :class:`SequenceLoss` is that loss as an ``nn.Module`` with a ``reduction``
attribute, so Opacus' ghost clipping can ask it for one loss per example.

**Outputs.** Evaluation never gathers ``[batch, length, vocabulary]`` logits: :func:`reduce`
turns each batch into per-example figures (summed token loss, labelled tokens, correct greedy
next tokens, whether every labelled token is the greedy one), from which the metrics (token
loss, perplexity, next-token accuracy, exact match) and the per-example losses of the
membership audit come. Exact match is the share of examples whose labelled tokens are all the
model's greedy choice under teacher forcing, which is exactly the share whose greedy
continuation of the prompt reproduces the completion (and its end-of-text token).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.tasks.snippets import model_location

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from hubtune.data import PreparedData

__all__ = [
    "IGNORE",
    "TASK",
    "Examples",
    "criterion",
    "collator",
    "encode",
    "example_losses",
    "loss",
    "metrics",
    "predictions",
    "reduce",
]

IGNORE = -100  # label of a token the loss does not cover (prompt, padding)
# Columns of reduce()'s per-example figures.
LOSS_SUM, TOKENS, CORRECT, EXACT, EXTRACTED = range(5)
# The extraction test (Carlini et al. 2021): prompted with an example's first EXTRACTION_PREFIX
# tokens, does the model's greedy continuation reproduce its next EXTRACTION_SUFFIX tokens? Under
# teacher forcing that is exactly "every one of those tokens is the greedy next token", so one
# forward pass answers it. 1: reproduced, 0: not, -1: the example is too short (or its tokens
# there are not all labelled: prompt + completion data).
EXTRACTION_PREFIX = 8
EXTRACTION_SUFFIX = 8


def _load(
    resolved: Any, section: Any, *, label_names: list[str], method_name: str
) -> tuple[Any, Any, list[str]]:
    from hubtune.model import load_causal_lm

    return load_causal_lm(resolved, section)


class Examples:
    """Tokenised examples (a map-style data set): ``input_ids`` and the loss's ``labels``."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.encodings = {"input_ids": input_ids}
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.encodings["input_ids"][i], "labels": self.labels[i], "idx": i}


def _special(tokenizer: Any) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _fit(pieces: list[tuple[list[int], bool]], max_length: int) -> tuple[list[int], list[int]]:
    """A conversation's tokens and labels, cut to ``max_length``: from the right when the first
    ``max_length`` tokens hold a labelled one, else from the left so the first labelled piece
    keeps as much of itself (and then of its context) as fits."""
    ids = [t for tokens, _ in pieces for t in tokens]
    labels = [t if labelled else IGNORE for tokens, labelled in pieces for t in tokens]
    if len(ids) <= max_length or any(x != IGNORE for x in labels[:max_length]):
        return ids[:max_length], labels[:max_length]
    first = next(i for i, x in enumerate(labels) if x != IGNORE)
    start = max(0, first - max(1, max_length // 2))
    return ids[start : start + max_length], labels[start : start + max_length]


def _encode_conversations(
    tokenizer: Any, conversations: list[str], *, max_length: int, loss_on: str
) -> Examples:
    from hubtune.tasks.chat import parse_conversation, segments

    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for raw in conversations:
        pieces = [
            (tokenizer(text, add_special_tokens=False)["input_ids"], labelled or loss_on == "all")
            for text, labelled in segments(tokenizer, parse_conversation(raw))
        ]
        row, target = _fit(pieces, max_length)
        ids.append(row)
        labels.append(target)
    return Examples(ids, labels)


def encode(
    tokenizer: Any,
    *,
    texts: list[str] | None = None,
    prompts: list[str] | None = None,
    completions: list[str] | None = None,
    conversations: list[str] | None = None,
    max_length: int,
    loss_on: str = "completion",
) -> Examples:
    """Tokenise plain texts, prompts with their completions, or chat conversations (see the
    module docstring). ``loss_on: all`` puts the prompt (the non-assistant turns) in the loss too."""
    bos, eos = _special(tokenizer)
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    if conversations is not None:
        return _encode_conversations(
            tokenizer, conversations, max_length=max_length, loss_on=loss_on
        )
    if texts is not None:
        for tokens in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            row = (bos + list(tokens) + eos)[:max_length]
            ids.append(row)
            labels.append(row[:])
        return Examples(ids, labels)
    assert prompts is not None and completions is not None
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        target = (list(completion) + eos)[: max_length - len(bos) - 1]  # room for 1 prompt token
        context = (bos + list(prompt))[-(max_length - len(target)) :]
        if bos and context[0] != bos[0]:  # cut from the left: keep the start marker
            context = bos + context[len(bos) :]
        ids.append(context + target)
        prompt_labels = [IGNORE] * len(context) if loss_on == "completion" else context
        labels.append(prompt_labels + target)
    return Examples(ids, labels)


def _encode_split(tokenizer: Any, frame: Any, recipe: Any, *, train: bool) -> Examples:
    if "messages" in frame:
        return encode(
            tokenizer,
            conversations=frame["messages"].tolist(),
            max_length=recipe.model.max_length,
            loss_on=recipe.data.loss_on,
        )
    if "prompt" in frame:
        return encode(
            tokenizer,
            prompts=frame["prompt"].tolist(),
            completions=frame["completion"].tolist(),
            max_length=recipe.model.max_length,
            loss_on=recipe.data.loss_on,
        )
    return encode(tokenizer, texts=frame["text"].tolist(), max_length=recipe.model.max_length)


def collator(tokenizer: Any) -> Any:
    """Pad a list of examples on the right: ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(item["labels"])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "idx": torch.tensor([item["idx"] for item in items]),
        }

    return collate


def _cache_inputs(frame: Any, recipe: Any, processor: Any = None) -> dict[str, Any]:
    import pandas as pd

    columns = [c for c in ("text", "prompt", "completion", "messages") if c in frame]
    texts = hashlib.sha256(
        pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes()
    )
    return {
        "texts": texts.hexdigest(),
        "max_length": recipe.model.max_length,
        "loss_on": recipe.data.loss_on,
        "chat_template": recipe.model.chat_template,
    }


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each next-token loss (float32, 0 where not labelled) and the labelled-token mask."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    losses = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    return losses, mask


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean token loss of each example (0 for an example with no labelled token)."""
    losses, mask = _token_losses(logits, labels)
    return losses.sum(1) / mask.sum(1).clamp(min=1)


def _sequence_loss_module() -> Any:
    from torch import nn

    class SequenceLoss(nn.Module):
        """Per-example mean token loss, reduced over the batch by ``reduction`` (``none``: one per
        example, which Opacus' ghost clipping asks for)."""

        def __init__(self, reduction: str = "mean"):
            super().__init__()
            self.reduction = reduction

        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            per_example = sequence_losses(logits, labels)
            if self.reduction == "none":
                return per_example
            return per_example.sum() if self.reduction == "sum" else per_example.mean()

    return SequenceLoss


def criterion() -> Any:
    """The training loss as a module with a ``reduction`` attribute (Opacus' ghost clipping)."""
    return _sequence_loss_module()()


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: each example's mean token loss, averaged over the batch."""
    return sequence_losses(logits, labels).mean()


def reduce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's per-example figures ``[B, 5]`` (summed loss, tokens, correct, all correct,
    extracted) and each example's labelled-token count, in place of its logits and labels."""
    import torch

    losses, mask = _token_losses(logits, labels)
    tokens = mask.sum(1)
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
    correct = hits.sum(1)
    # The suffix's tokens sit after bos + the prefix; position t of the shifted logits predicts
    # token t + 1, so the suffix is predicted at positions EXTRACTION_PREFIX ... + SUFFIX - 1.
    window = slice(EXTRACTION_PREFIX, EXTRACTION_PREFIX + EXTRACTION_SUFFIX)
    eligible = mask[:, window].sum(1) == EXTRACTION_SUFFIX
    extracted = torch.where(
        eligible,
        hits[:, window].all(1).float(),
        torch.full(tokens.shape, -1.0, device=tokens.device),
    )
    figures = torch.stack(
        [
            losses.sum(1),
            tokens.float(),
            correct.float(),
            ((correct == tokens) & (tokens > 0)).float(),
            extracted,
        ],
        dim=1,
    )
    return figures, tokens


def example_losses(figures: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The mean token loss of each example (the membership audit's scores)."""
    return figures[:, LOSS_SUM] / figures[:, TOKENS].clamp(min=1)


def metrics(figures: torch.Tensor, tokens: torch.Tensor, num_labels: int = 0) -> dict[str, float]:
    """Token loss, perplexity, next-token accuracy and exact match over a whole split.

    ``loss`` is per token (all labelled tokens of the split pooled), as perplexity is usually
    reported; ``sequence_loss`` is the mean of the examples' own mean losses (what training
    minimises); ``accuracy`` is the share of labelled tokens that are the greedy next token.
    """
    import math

    total = float(figures[:, TOKENS].sum())
    token_loss = float(figures[:, LOSS_SUM].sum()) / max(total, 1.0)
    return {
        "loss": token_loss,
        "perplexity": math.exp(min(token_loss, 700.0)),
        "sequence_loss": float(example_losses(figures, tokens).mean()) if len(tokens) else 0.0,
        "accuracy": float(figures[:, CORRECT].sum()) / max(total, 1.0),
        "exact_match": float(figures[:, EXACT].mean()) if len(tokens) else 0.0,
        "tokens": total,
    }


def predictions(data: PreparedData, figures: torch.Tensor, tokens: torch.Tensor) -> pd.DataFrame:
    """The test split, one row per example: ``row_id``, ``loss`` (mean token loss), ``tokens``,
    ``token_accuracy``, ``exact_match`` and every sensitive column (the audit's contract)."""
    import pandas as pd

    test = data.splits["test"]
    counts = figures[:, TOKENS].clamp(min=1)
    frame = pd.DataFrame(
        {
            "row_id": test["row_id"].to_numpy(),
            "loss": example_losses(figures, tokens).numpy().astype("float64"),
            "tokens": tokens.numpy().astype("int64"),
            "token_accuracy": (figures[:, CORRECT] / counts).numpy().astype("float64"),
            "exact_match": figures[:, EXACT].numpy().astype(bool),
        }
    )
    for column in data.sensitive_columns:
        frame[column] = test[column].to_numpy()
    return frame


# What every language-model run continues, so runs can be compared by reading: neutral openings,
# and the opening of the memorisation canaries (audit.exposure adds the recipe's own prefix).
SAMPLE_PROMPTS = ("The", "I think that", "In my opinion,", "My account number is")
SAMPLE_NEW_TOKENS = 30


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """The token ids a prompt is continued from, as in training: ``[bos] prompt`` for plain text
    and prompt + completion data, the chat template's rendering of one user message (with the
    generation prompt) for chat data."""
    if chat:
        from hubtune.tasks.chat import generation_prefix

        return list(
            tokenizer(generation_prefix(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    device: Any,
    max_new_tokens: int = SAMPLE_NEW_TOKENS,
    chat: bool = False,
) -> list[dict[str, str]]:
    """Greedy continuations of ``prompts`` (``{"prompt", "continuation"}``), one at a time;
    ``chat``: each prompt is a user message, and the continuation the assistant's answer."""
    import torch

    model.eval()
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt, chat=chat)], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        out.append({"prompt": prompt, "continuation": str(text)})
    return out


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
    """A Python snippet that loads the model and continues a prompt."""
    where, kw = model_location(run_dir=run_dir, repo_id=repo_id, revision=revision, lora=lora)
    auto = "AutoPeftModelForCausalLM" if lora else "AutoModelForCausalLM"
    lines = ["from transformers import AutoTokenizer"]
    lines.append(
        "from peft import AutoPeftModelForCausalLM"
        if lora
        else "from transformers import AutoModelForCausalLM"
    )
    lines += [
        "",
        *where.rstrip("\n").split("\n"),
        f"tokenizer = AutoTokenizer.from_pretrained(model_id{kw})",
        f"model = {auto}.from_pretrained(model_id{kw}).eval()",
        "",
        f'inputs = tokenizer("Replace this with a prompt", return_tensors="pt", truncation=True, '
        f"max_length={max_length})",
        "output = model.generate(**inputs, max_new_tokens=40, do_sample=False)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
    ]
    return "\n".join(lines) + "\n"


def pipeline_snippet(*, repo_id: str, label_names: list[str]) -> str:
    """A ``transformers.pipeline`` call for a pushed model or LoRA adapter."""
    return (
        "\n".join(
            [
                "from transformers import pipeline",
                "",
                f'generator = pipeline("text-generation", model={json.dumps(repo_id)})',
                'print(generator("Replace this with a prompt", max_new_tokens=40, do_sample=False))',
            ]
        )
        + "\n"
    )


def _task() -> Any:
    from hubtune.tasks import Task

    return Task(
        name="text-generation",
        input_kind="text",
        title="Text Generation",
        space_widget="textbox",
        load=_load,
        encode=_encode_split,
        collate=collator,
        cache_inputs=_cache_inputs,
        loss=loss,
        example_losses=example_losses,
        metrics=metrics,
        predictions=predictions,
        load_snippet=load_snippet,
        pipeline_snippet=pipeline_snippet,
        classical_baseline=None,
        has_labels=False,
        reduce=reduce,
        criterion=criterion,
        caches_features=False,
    )


TASK = _task()
