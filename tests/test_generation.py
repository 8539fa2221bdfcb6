"""Text generation (model.task: text-generation): encoding, loss, per-example gradients, runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from hubtune.recipe import Recipe
from hubtune.tasks import text_generation as tg

from .conftest import WORDS_FILL, WORDS_NEG, WORDS_POS

transformers = pytest.importorskip("transformers")


def make_lm_frame(n: int = 160, *, seed: int = 0) -> pd.DataFrame:
    """Learnable text: sentences of the tiny vocabulary with a fixed pattern, a group column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = WORDS_POS if i % 2 else WORDS_NEG
        prompt = " ".join(rng.choice(WORDS_FILL) for _ in range(3))
        completion = " ".join([words[0], words[1 % len(words)], "very", "good" if i % 2 else "bad"])
        rows.append(
            {
                "text": f"{prompt} {completion}",
                "prompt": prompt,
                "completion": completion,
                "group": rng.choice(["a", "b"]),
            }
        )
    return pd.DataFrame(rows)


def lm_recipe(model_dir: Path, data: Path, out: Path, **method: object) -> dict:
    return {
        "name": "tiny-lm",
        "seed": 0,
        "output_dir": str(out),
        "model": {"id": str(model_dir), "task": "text-generation", "max_length": 32},
        "data": {"source": str(data), "columns": {"text": "text", "sensitive": ["group"]}},
        "method": method or {"name": "lora", "r": 4},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "eval_batch_size": 32,
            "lr": 0.01,
            "log_with": [],
            "select_metric": "loss",
        },
        "audit": {"enabled": False},
    }


@pytest.fixture()
def lm_csv(tmp_path: Path) -> Path:
    path = tmp_path / "lm.csv"
    make_lm_frame().to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- encoding


def test_prompt_tokens_are_context_and_completion_tokens_are_labels(tiny_gpt2_lm: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    eos = tok.eos_token_id
    examples = tg.encode(tok, prompts=["the movie"], completions=["was good"], max_length=32)
    ids, labels = examples.encodings["input_ids"][0], examples.labels[0]
    the, movie, was, good = tok.convert_tokens_to_ids(["the", "movie", "was", "good"])
    assert ids == [eos, the, movie, was, good, eos]
    assert labels == [tg.IGNORE, tg.IGNORE, tg.IGNORE, was, good, eos]
    plain = tg.encode(tok, texts=["the movie"], max_length=32)
    assert plain.labels[0] == plain.encodings["input_ids"][0] == [eos, the, movie, eos]


def test_a_long_prompt_is_cut_from_the_left_and_the_completion_kept(tiny_gpt2_lm: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    prompt = " ".join(["the"] * 20 + ["movie"])
    examples = tg.encode(tok, prompts=[prompt], completions=["was good"], max_length=8)
    ids, labels = examples.encodings["input_ids"][0], examples.labels[0]
    assert len(ids) == 8
    assert ids[0] == tok.eos_token_id  # the start marker stays
    assert tok.convert_ids_to_tokens(ids[-4:-1]) == ["movie", "was", "good"]
    assert labels[-3:] == ids[-3:] and all(x == tg.IGNORE for x in labels[:-3])


def test_padding_never_reaches_another_examples_loss(tiny_gpt2_lm: Path) -> None:
    """Each example's loss in a padded batch equals its loss alone (no packing, no leaks)."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).eval()
    examples = tg.encode(
        tok, texts=["the movie was good", "bad", "it is so really awful quite"], max_length=32
    )
    collate = tg.collator(tok)
    batch = collate([examples[i] for i in range(3)])
    labels = batch.pop("labels")
    batch.pop("idx")
    with torch.no_grad():
        together = tg.sequence_losses(model(**batch).logits, labels)
        for i in range(3):
            alone = collate([examples[i]])
            alone.pop("idx")
            y = alone.pop("labels")
            torch.testing.assert_close(
                tg.sequence_losses(model(**alone).logits, y)[0], together[i], rtol=1e-5, atol=1e-5
            )


def test_reduce_gives_the_metrics_of_the_full_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor(
        [[1, 2, 3, 4, 5], [1, 2, tg.IGNORE, tg.IGNORE, tg.IGNORE], [0, 6, 6, 1, 2]]
    )
    labels[2, :2] = tg.IGNORE
    figures, tokens = tg.reduce(logits, labels)
    assert tokens.tolist() == [4, 1, 3]
    flat = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=tg.IGNORE
    )
    got = tg.metrics(figures, tokens)
    assert got["loss"] == pytest.approx(flat.item(), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(flat.item()), rel=1e-6)
    torch.testing.assert_close(
        tg.example_losses(figures, tokens), tg.sequence_losses(logits, labels)
    )
    # exact match: every labelled token is the greedy one
    perfect = torch.full((1, 4, 7), -10.0)
    target = torch.tensor([[0, 3, 5, 1]])
    for t in range(3):
        perfect[0, t, target[0, t + 1]] = 10.0
    assert tg.metrics(*tg.reduce(perfect, target))["exact_match"] == 1.0
    perfect[0, 1, 5] = -20.0
    assert tg.metrics(*tg.reduce(perfect, target))["exact_match"] == 0.0


# --------------------------------------------------------------------------- recipes


def test_generation_recipes_refuse_what_does_not_apply(tiny_gpt2_lm: Path, tmp_path: Path) -> None:
    base = lm_recipe(tiny_gpt2_lm, tmp_path / "x.csv", tmp_path)
    cases = {
        "unfreeze_top_k >= 1": {"method": {"name": "freeze"}},
        "macro_f1 is a classifier's": {"train": {**base["train"], "select_metric": "macro_f1"}},
        "canary-exposure audit is not built yet": {"audit": {"canaries": 8}},
        "a language model has no classes": {"data": {**base["data"], "labels": ["a", "b"]}},
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            Recipe.model_validate({**base, **change})
    with pytest.raises(ValueError, match="columns.prompt is set without columns.completion"):
        Recipe.model_validate({**base, "data": {**base["data"], "columns": {"prompt": "prompt"}}})


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    ("arch", "method", "columns"),
    [
        ("gpt2", {"name": "lora", "r": 4}, {"text": "text"}),
        (
            "llama",
            {"name": "freeze", "unfreeze_top_k": 1},
            {"prompt": "prompt", "completion": "completion"},
        ),
    ],
)
def test_a_language_model_trains_and_writes_its_run(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    lm_csv: Path,
    arch: str,
    method: dict,
    columns: dict,
) -> None:
    from hubtune.pipeline import format_summary, run_recipe

    model_dir = request.getfixturevalue(f"tiny_{arch}_lm")
    spec = lm_recipe(model_dir, lm_csv, tmp_path / "runs", **method)
    spec["data"]["columns"] = {**columns, "sensitive": ["group"]}
    result = run_recipe(Recipe.model_validate(spec))
    test = result.metrics["test"]
    history = result.metrics["history"]
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert history[-1]["val_loss"] < math.log(tg_vocab(model_dir))  # learnt something
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert {"row_id", "loss", "tokens", "exact_match", "group"} <= set(predictions.columns)
    assert len(predictions) == int(
        json.loads((result.run_dir / "run.json").read_text())["data"]["rows_kept"]["test"]
    )
    summary = format_summary(result)
    assert "perplexity" in summary and "accuracy 0." in summary


def tg_vocab(model_dir: Path) -> int:
    return transformers.AutoConfig.from_pretrained(model_dir).vocab_size
