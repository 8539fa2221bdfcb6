"""Chat data for text generation (data.columns.messages): rendering, loss tokens, runs, Space."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hubtune.recipe import DataSection, Recipe
from hubtune.tasks import chat
from hubtune.tasks import text_generation as tg

from .test_generation import lm_recipe

transformers = pytest.importorskip("transformers")

# Whitespace-separated, so the word-level test tokenizer splits it exactly (unknown role words
# become <unk>, which is fine: what matters is which tokens are labelled).
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <|endoftext|> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "the movie"},
    {"role": "user", "content": "a movie"},
    {"role": "assistant", "content": "good great"},
    {"role": "user", "content": "the"},
    {"role": "assistant", "content": "bad awful"},
]


@pytest.fixture()
def tok(tiny_gpt2_lm: Path):  # type: ignore[no-untyped-def]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _labelled_words(tokenizer, example_ids: list[int], labels: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    assert all(
        label in (tg.IGNORE, token) for token, label in zip(example_ids, labels, strict=True)
    )
    return tokenizer.convert_ids_to_tokens([t for t in labels if t != tg.IGNORE])


def test_only_the_assistants_turns_are_in_the_loss(tok) -> None:  # type: ignore[no-untyped-def]
    pieces = chat.segments(tok, CONVERSATION)
    assert "".join(text for text, _ in pieces) == tok.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    assert [text for text, labelled in pieces if labelled] == [
        "good great <|endoftext|> ",
        "bad awful <|endoftext|> ",
    ]
    raw = chat.canonical(CONVERSATION)
    examples = tg.encode(tok, conversations=[raw], max_length=64)
    ids, labels = examples.encodings["input_ids"][0], examples.labels[0]
    whole = tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)
    assert ids == whole["input_ids"]  # the pieces tokenise as the whole rendering does
    eos = tok.eos_token
    assert _labelled_words(tok, ids, labels) == ["good", "great", eos, "bad", "awful", eos]
    every = tg.encode(tok, conversations=[raw], max_length=64, loss_on="all")
    assert every.labels[0] == every.encodings["input_ids"][0] == ids


def test_a_long_conversation_keeps_the_first_answer(tok) -> None:  # type: ignore[no-untyped-def]
    long = [{"role": "user", "content": " ".join(["the"] * 30)}, *CONVERSATION[2:]]
    examples = tg.encode(tok, conversations=[chat.canonical(long)], max_length=12)
    ids, labels = examples.encodings["input_ids"][0], examples.labels[0]
    assert len(ids) == 12
    words = _labelled_words(tok, ids, labels)
    assert words[:3] == ["good", "great", tok.eos_token]  # the answer survives, context cut
    assert tok.convert_ids_to_tokens(ids[:3]) == ["the", "the", "the"]
    short = tg.encode(tok, conversations=[chat.canonical(CONVERSATION)], max_length=10)
    assert len(short.encodings["input_ids"][0]) == 10  # fits with an answer: cut on the right
    assert _labelled_words(tok, short.encodings["input_ids"][0], short.labels[0])


def test_templates_that_cannot_be_split_by_turn_are_refused(tok) -> None:  # type: ignore[no-untyped-def]
    # Numbers every message by how many follow it: adding a turn rewrites the earlier ones.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ messages|length - loop.index }} "
        "{{ m['content'] }} {% endfor %}"
    )
    with pytest.raises(
        chat.ConversationError, match="does not render this conversation turn by turn"
    ):
        chat.segments(tok, CONVERSATION)
    tok.chat_template = None
    with pytest.raises(chat.ConversationError, match="needs a chat template.*model.chat_template"):
        chat.segments(tok, CONVERSATION)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "non-empty list of messages"),
        ('[{"role": "user"}]', "message 0 is not a"),
        ('[{"role": "bot", "content": "x"}]', "role 'bot'"),
        ('[{"role": "user", "content": 3}]', "int content"),
        ('[{"role": "user", "content": "hi"}]', "no assistant message"),
    ],
)
def test_a_malformed_conversation_says_what_is_wrong(value: str, problem: str) -> None:
    with pytest.raises(chat.ConversationError, match=problem):
        chat.parse_conversation(value)


def test_conversations_load_from_jsonl_lists_and_csv_json_text(tmp_path: Path) -> None:
    from hubtune.data import DataError, load_data

    rows = [{"messages": CONVERSATION, "group": "a" if i % 2 else "b"} for i in range(30)]
    pd.DataFrame(rows).to_json(tmp_path / "chat.jsonl", orient="records", lines=True)
    csv = pd.DataFrame([{"messages": json.dumps(r["messages"]), "group": r["group"]} for r in rows])
    csv.to_csv(tmp_path / "chat.csv", index=False)
    section = {"columns": {"messages": "messages", "sensitive": ["group"]}}
    loaded = {}
    for name in ("chat.jsonl", "chat.csv"):
        data = DataSection.model_validate({"source": str(tmp_path / name), **section})
        prepared = load_data(data, seed=0, task="text-generation")
        assert prepared.text_columns == ["messages"]
        loaded[name] = prepared.splits["train"]["messages"].tolist()
        assert all(json.loads(m) == CONVERSATION for m in loaded[name])
    assert loaded["chat.jsonl"] == loaded["chat.csv"]  # one canonical text, whatever the file

    csv.loc[7, "messages"] = '[{"role": "user", "content": "hi"}]'
    csv.to_csv(tmp_path / "chat.csv", index=False)
    with pytest.raises(DataError, match=r"row 7: .*no assistant message"):
        load_data(data, seed=0, task="text-generation")


def test_chat_recipes_refuse_what_does_not_apply(tiny_gpt2_lm: Path, tmp_path: Path) -> None:
    base = lm_recipe(tiny_gpt2_lm, tmp_path / "x.csv", tmp_path / "runs")
    chat_data = {**base["data"], "columns": {"messages": "m"}}
    Recipe.model_validate(
        {**base, "data": chat_data, "model": {**base["model"], "chat_template": "chatml"}}
    )
    with pytest.raises(ValueError, match="model.chat_template renders data.columns.messages"):
        Recipe.model_validate({**base, "model": {**base["model"], "chat_template": "chatml"}})
    classifier = {
        "name": "classifier",
        "model": {"id": str(tiny_gpt2_lm)},
        "data": {"source": "x.csv", "columns": {"messages": "m"}},
        "method": {"name": "freeze"},
    }
    with pytest.raises(
        ValueError, match="data.columns.messages are for model.task: text-generation"
    ):
        Recipe.model_validate(classifier)
    classifier["data"] = {"source": "x.csv", "loss_on": "all"}
    with pytest.raises(ValueError, match="data.loss_on chooses a language model's loss tokens"):
        Recipe.model_validate(classifier)


def _chat_csv(path: Path, n: int = 80) -> Path:
    rows = []
    for i in range(n):
        answer = "good great very good" if i % 2 else "bad awful very bad"
        rows.append(
            {
                "conversation": json.dumps(
                    [
                        {"role": "user", "content": "the movie"},
                        {"role": "assistant", "content": answer},
                    ]
                ),
                "group": "a" if i % 3 else "b",
            }
        )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_chat_run_trains_audits_and_serves_like_it_was_trained(
    tiny_gpt2_lm: Path, tmp_path: Path
) -> None:
    """model.chat_template travels with the saved tokenizer; canaries are planted as
    conversations and ranked under the template; samples and the Space render prompts as a
    user turn, exactly as training did."""
    from hubtune.pipeline import run_recipe

    spec = lm_recipe(tiny_gpt2_lm, _chat_csv(tmp_path / "chat.csv"), tmp_path / "runs")
    spec["model"]["chat_template"] = TEMPLATE
    spec["data"]["columns"] = {"messages": "conversation", "sensitive": ["group"]}
    spec["train"].update(epochs=3, lr=0.02)
    spec["audit"] = {
        "enabled": True,
        "stereotypes": False,
        "exposure": {
            "per_repetition": 2,
            "repetitions": [1, 8],
            "digits": 2,
            "prefix": "my number",
        },
    }
    result = run_recipe(Recipe.model_validate(spec))
    run_dir = result.run_dir
    folder = run_dir / "adapter"
    saved_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert saved_tok.chat_template == TEMPLATE
    samples = json.loads((run_dir / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples][-1] == "my number"
    exposure = json.loads((run_dir / "exposure.json").read_text())["per_canary"]
    assert len(exposure) == 4 and all(c["method"] == "exact" for c in exposure)

    # Independently: a canary's log-perplexity is the summed loss of the answer's tokens after
    # the rendered user turn (transformers' own loss on the two renderings).
    from peft import AutoPeftModelForCausalLM

    from hubtune.audit.exposure import make_exposure_canaries

    model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    canaries, rows = make_exposure_canaries(
        per_repetition=2, repetitions=[1, 8], digits=2, prefix="my number", seed=0,
        columns=["messages"], sensitive=["group"],
    )  # fmt: skip
    assert json.loads(rows["messages"][0])[0] == {"role": "user", "content": "my number"}
    head = saved_tok("user : my number <|endoftext|> assistant : ", return_tensors="pt")[
        "input_ids"
    ]
    first = canaries.iloc[0]
    full = saved_tok(
        f"user : my number <|endoftext|> assistant : {first['secret']}", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        a = model(input_ids=full, labels=full).loss.item() * (full.shape[1] - 1)
        b = model(input_ids=head, labels=head).loss.item() * (head.shape[1] - 1)
    ours = next(c for c in exposure if c["canary_id"] == first["canary_id"])
    assert ours["log_perplexity"] == pytest.approx(a - b, abs=1e-3)

    # The Space's generator builds the prompt as training did, and says the same as samples.json.
    from hubtune.rundir import read_run_info
    from hubtune.space import _common_config, _recipe, load_app

    app = load_app()
    info = read_run_info(run_dir)
    assert info is not None
    config = _common_config(run_dir, info, _recipe(run_dir))
    assert config["prompt_format"] == "chat"
    generator = app.Generator(model, saved_tok, 64, 30, config["prompt_format"])
    assert generator.prompt_ids("the movie") == tg.prompt_ids(saved_tok, "the movie", chat=True)
    assert generator.generate(samples[0]["prompt"]) == samples[0]["continuation"]
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        saved_tok.chat_template = None
        app.Generator(model, saved_tok, 64, 30, "chat")
