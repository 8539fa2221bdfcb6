"""Text generation (model.task: text-generation): encoding, loss, per-example gradients, runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hubtune.recipe import LoraMethod, Recipe
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
        "Secret-Sharer canaries of audit.exposure": {"audit": {"canaries": 8}},
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
    # samples.json: greedy continuations of the fixed prompts, as the saved model gives them
    samples = json.loads((result.run_dir / "samples.json").read_text())["samples"]
    assert [x["prompt"] for x in samples] == list(tg.SAMPLE_PROMPTS)
    folder = result.run_dir / ("adapter" if (result.run_dir / "adapter").exists() else "model")
    if folder.name == "adapter":
        from peft import AutoPeftModelForCausalLM

        saved = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    else:
        saved = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    again = tg.generate_samples(saved, tok, ["I think that"], device="cpu")
    assert again[0] == samples[1]
    # The forgetting check: general sentences' perplexity under the base and the saved model.
    from hubtune.forgetting import perplexity, reference_sentences

    forgetting = json.loads((result.run_dir / "forgetting.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sentences, _ = reference_sentences()
    assert forgetting["perplexity"]["before"] == pytest.approx(
        perplexity(base, tok, sentences, device="cpu"), rel=1e-6
    )
    assert forgetting["perplexity"]["after"] == pytest.approx(
        perplexity(saved, tok, sentences, device="cpu"), rel=1e-4
    )
    assert result.metrics["forgetting"]["ratio"] == pytest.approx(forgetting["ratio"])
    assert "forgetting: perplexity of general sentences" in summary


def tg_vocab(model_dir: Path) -> int:
    return transformers.AutoConfig.from_pretrained(model_dir).vocab_size


# --------------------------------------------------------------------------- DP gradients

LM_TEXTS = ["the movie was good", "bad", "it is so really awful quite", "my number is 4 2"]


def _lm_model(folder: Path, method: object, *, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A float64 causal LM with ``method`` applied, dropout off, in training mode."""
    from hubtune.methods import apply_method

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    plan = apply_method(model, method, lr=0.1)
    model = plan.model.double()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at 0, which would make every lora_A gradient 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    model.train()
    return model, plan


def _lm_batch(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from hubtune.privacy import add_position_ids

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    examples = tg.encode(tok, texts=LM_TEXTS, max_length=32)
    batch = tg.collator(tok)([examples[i] for i in range(len(LM_TEXTS))])
    batch.pop("idx")
    labels = batch.pop("labels")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(LM_TEXTS)  # every example padded differently
    return add_position_ids(batch), labels


def _lm_reference(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each example alone, unpadded, its own loss differentiated by plain autograd."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for i in range(len(labels)):
        n = int(batch["attention_mask"][i].sum())
        single = {k: v[i : i + 1, :n] for k, v in batch.items()}
        loss = tg.sequence_losses(model(**single).logits, labels[i : i + 1, :n]).sum()
        grads.append(torch.autograd.grad(loss, [p for _, p in named]))
    out = {name: torch.stack([g[j] for g in grads]) for j, (name, _) in enumerate(named)}
    for name, g in out.items():
        assert g.abs().max() > 0, f"{name}: zero reference gradient (the check would be vacuous)"
    return out


LM_CASES = {
    "gpt2-lora": ("gpt2", {"name": "lora", "r": 4, "dropout": 0.0}),
    "gpt2-full": ("gpt2", {"name": "full"}),  # Conv1D, tied input/output embedding
    "llama-lora": ("llama", {"name": "lora", "r": 4, "dropout": 0.0}),
    "llama-full": ("llama", {"name": "full"}),  # RMSNorm, rotary embeddings, untied head
    "llama-top1": ("llama", {"name": "freeze", "unfreeze_top_k": 1}),
}


def _lm_case(request: pytest.FixtureRequest, case: str):  # type: ignore[no-untyped-def]
    from pydantic import TypeAdapter

    from hubtune.recipe import Method

    arch, spec = LM_CASES[case]
    folder = request.getfixturevalue(f"tiny_{arch}_lm")
    model, plan = _lm_model(folder, TypeAdapter(Method).validate_python(spec))
    return model, plan, *_lm_batch(folder)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_per_sequence_grad_sample_is_each_examples_gradient(
    request: pytest.FixtureRequest, case: str
) -> None:
    """Opacus (hooks) on a padded batch with hubtune's loss = each example's own gradient."""
    model, plan, batch, labels = _lm_case(request, case)
    if case.startswith("gpt2"):
        assert plan.tied_embeddings is not None and "transformer.wte" in plan.tied_embeddings
    reference = _lm_reference(model, batch, labels)
    scale = max(float(g.abs().max()) for g in reference.values())
    gsm = opacus.GradSampleModule(model, loss_reduction="mean")
    tg.loss(gsm(**batch).logits, labels).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        torch.testing.assert_close(
            param.grad_sample,
            reference[name],
            rtol=1e-7,
            atol=1e-9 * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def _ghost_norms(model: torch.nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Per-example gradient norms as ghost clipping computes them, with hubtune's criterion."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    trained = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=1e6, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(trained, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=len(labels),
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, optimizer, tg.criterion(), "mean")
    criterion(gsm(**batch).logits, labels).backward()
    return gsm.per_sample_gradient_norms


@pytest.mark.parametrize("case", ["gpt2-lora", "llama-lora", "llama-full"])
def test_ghost_clipping_norms_are_each_examples_gradient_norm(
    request: pytest.FixtureRequest, case: str
) -> None:
    model, _, batch, labels = _lm_case(request, case)
    reference = _lm_reference(model, batch, labels)
    squares = [g.reshape(g.shape[0], -1).pow(2).sum(1) for g in reference.values()]
    expected = torch.stack(squares).sum(0).sqrt()
    torch.testing.assert_close(_ghost_norms(model, batch, labels), expected, rtol=1e-6, atol=1e-9)


def test_ghost_clipping_of_a_tied_embedding_is_refused_by_name(tiny_gpt2_lm: Path) -> None:
    """GPT-2's output layer is its input embedding: ghost clipping cannot norm one tensor used
    twice, so the preflight refuses and names the way out (hooks, or LoRA)."""
    from hubtune.privacy import PrivacyError
    from hubtune.privacy.engine import refuse_shared_trained_tensors
    from hubtune.recipe import FullMethod

    model, _ = _lm_model(tiny_gpt2_lm, FullMethod(name="full"))
    batch, labels = _lm_batch(tiny_gpt2_lm)
    with pytest.raises(NotImplementedError, match="tying"):  # what Opacus would do
        _ghost_norms(model, batch, labels)
    with pytest.raises(
        PrivacyError, match=r"cannot clip transformer\.wte\.weight.*grad_sample_mode: hooks"
    ):
        refuse_shared_trained_tensors(model)
    model, _ = _lm_model(tiny_gpt2_lm, LoraMethod(name="lora", r=4, dropout=0.0))
    refuse_shared_trained_tensors(model)  # the tied embedding is frozen under LoRA: no refusal


opacus = pytest.importorskip("opacus")


@pytest.mark.parametrize(
    ("arch", "method", "mode"),
    [("gpt2", {"name": "lora", "r": 4}, "hooks"), ("llama", {"name": "full"}, "ghost")],
)
def test_dp_training_of_a_language_model_spends_what_it_reports(
    request: pytest.FixtureRequest, tmp_path: Path, lm_csv: Path, arch: str, method: dict, mode: str
) -> None:
    """DP-SGD end to end: Poisson batches of whole examples, per-sequence clipping, and a ledger
    whose ε the accountant recomputes from the recorded steps."""
    from hubtune.pipeline import run_recipe
    from hubtune.privacy import compute_epsilons

    model_dir = request.getfixturevalue(f"tiny_{arch}_lm")
    spec = lm_recipe(model_dir, lm_csv, tmp_path / "runs", **method)
    spec["privacy"] = {
        "enabled": True,
        "target_epsilon": 8.0,
        "logical_batch_size": 32,
        "physical_batch_size": 8,
        "grad_sample_mode": mode,
    }
    result = run_recipe(Recipe.model_validate(spec))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert ledger["epsilon"] <= 8.0 + 1e-9 and ledger["grad_sample_mode"] == mode
    history = [tuple(h) for h in ledger["history"]]
    assert compute_epsilons(history, ledger["delta"])["prv"] == pytest.approx(
        ledger["epsilon"], rel=1e-6
    )
    assert math.isfinite(result.metrics["test"]["perplexity"])


@pytest.fixture(scope="module")
def audited_lm_run(tiny_gpt2_lm: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One audited LoRA run of the tiny GPT-2 (shared by the audit, card and Space tests)."""
    from hubtune.pipeline import run_recipe

    tmp_path = tmp_path_factory.mktemp("audited-lm")
    frame = make_lm_frame(240)
    # group b's texts are longer and use rarer words: a real per-group quality gap
    frame.loc[frame["group"] == "b", "text"] += " quite nasty awful really"
    path = tmp_path / "lm.csv"
    frame.to_csv(path, index=False)
    spec = lm_recipe(tiny_gpt2_lm, path, tmp_path / "runs")
    spec["audit"] = {"enabled": True, "policy": "default"}
    spec["data"]["split"] = {"validation": 0.1, "test": 0.3}
    return run_recipe(Recipe.model_validate(spec))


def test_a_language_model_run_is_audited_per_group_and_for_membership(audited_lm_run) -> None:  # type: ignore[no-untyped-def]
    """The audit of a language model: per-group loss and perplexity with intervals, the loss gap
    judged against the policy, and membership inference on per-sequence losses."""
    from hubtune.pipeline import format_summary

    result = audited_lm_run
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    fairness = audit["fairness"]
    assert fairness["task"] == "generation"
    group_slice = next(s for s in fairness["slices"] if s["name"] == "group")
    shown = {g["name"]: g for g in group_slice["groups"] if not g["suppressed"]}
    assert set(shown) == {"a", "b"}
    for group in shown.values():
        loss = group["metrics"]["loss"]
        assert loss["ci"][0] <= loss["value"] <= loss["ci"][1]
        assert group["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(loss["value"]))
    gap = group_slice["disparities"]["largest_gap"]["loss"]
    values = [g["metrics"]["loss"]["value"] for g in shown.values()]
    assert gap["value"] == pytest.approx(max(values) - min(values))
    checks = [c for c in audit["verdict"]["checks"] if c["check"] == "mean token loss gap"]
    assert checks and checks[0]["threshold"] == 0.25
    assert checks[0]["passed"] is (gap["value"] <= 0.25)
    assert not any("equalized" in c["check"] for c in audit["verdict"]["checks"])
    assert "auc" in audit["membership"]
    report = (result.run_dir / "audit" / "report.html").read_text()
    assert "Perplexity" in report and "Per label" not in report
    assert "membership inference: AUC" in format_summary(result)
    extraction = audit["extraction"]
    tested = extraction["training"]["examples"] + extraction["training"]["too_short"]
    assert tested == audit["membership"]["members"] > 0  # every scored training example
    assert "Extraction of training text" in (result.run_dir / "audit" / "report.md").read_text()
    # CrowS-Pairs, base vs fine-tuned, on the same 1,508 pairs
    rows = {r["bias_type"]: r for r in audit["stereotypes"]["rows"]}
    assert rows["all"]["pairs"] == 1508 and len(rows) == 10  # overall + 9 bias types
    for row in rows.values():
        assert 0 <= row["base"]["value"] <= 1 and 0 <= row["fine_tuned"]["value"] <= 1
        assert row["change"]["value"] == pytest.approx(
            row["fine_tuned"]["value"] - row["base"]["value"]
        )
    assert "Stereotypes (CrowS-Pairs)" in (result.run_dir / "audit" / "report.md").read_text()


def test_a_language_models_card_has_its_metrics_and_a_load_snippet_that_runs(
    audited_lm_run,
) -> None:  # type: ignore[no-untyped-def]
    import contextlib
    import io
    import os

    from hubtune.card import write_card

    result = audited_lm_run
    card = write_card(result.run_dir).read_text()
    assert "pipeline_tag: text-generation" in card and "type: perplexity" in card
    assert "A causal language model" in card and "Tied embeddings:" in card
    assert (
        "classifier" not in card.split("---", 2)[2] and "Labels, in class-index order" not in card
    )
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "AutoPeftModelForCausalLM" in code
    here = os.getcwd()
    os.chdir(result.run_dir.parent)  # the snippet names the run's adapter/ folder relative to it
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "card-snippet", "exec"), {})
    finally:
        os.chdir(here)
    assert printed.getvalue().strip()  # it generated text


def test_the_space_generates_through_gradio_client_and_in_a_browser(audited_lm_run) -> None:  # type: ignore[no-untyped-def]
    """The Gradio demo of a language model: prompt -> greedy continuation (bounded), the same
    continuation the model gives directly, input limits enforced server-side, no foreign hosts."""
    import socket

    from gradio_client import Client

    from hubtune.space import build_space_demo, load_app

    from .conftest import chromium

    result = audited_lm_run
    app = load_app()
    demo = build_space_demo(source=result.run_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    url = f"http://127.0.0.1:{port}/"
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(result.run_dir / "adapter").eval()
    tok = transformers.AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    prompt = "the movie was"
    ids = torch.tensor([tg.prompt_ids(tok, prompt, chat=False)])  # [bos] prompt, as in training
    assert ids[0, 0] == tok.bos_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id
        )
    expected = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    foreign: list[str] = []
    try:
        client = Client(url, verbose=False)
        assert client.predict(prompt, api_name="/generate") == expected
        with pytest.raises(Exception, match="accepts at most 2000"):
            client.predict("x" * 2001, api_name="/generate")
        with chromium() as browser:
            page = browser.new_page()
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith((url, "data:", "blob:")) else foreign.append(r.url)
                ),
            )
            page.goto(url)
            page.locator("#input-text textarea").fill(prompt)
            page.locator("#generate-button").click()
            completion = page.locator("#completion textarea")
            page.wait_for_function(
                "el => el.value.length > 0", arg=completion.element_handle(), timeout=60_000
            )
            assert completion.input_value() == expected
            page.get_by_role("tab", name="Privacy & fairness").click()
            page.locator("#privacy-fairness").get_by_text("Perplexity").first.wait_for()
    finally:
        demo.close()
    assert not foreign, f"the page requested other hosts: {foreign}"


# --------------------------------------------------------------------------- canary exposure


def test_dp_exposure_bound_is_group_privacy_of_the_copies() -> None:
    from hubtune.audit.exposure import dp_exposure_bound

    one = dp_exposure_bound(epsilon=1.0, delta=1e-5, repetitions=1, space=10**12)
    assert one == pytest.approx(1 / math.log(2) + math.log2(1 / (0.05 - 1e-5)))
    four = dp_exposure_bound(epsilon=1.0, delta=1e-5, repetitions=4, space=10**12)
    assert four == pytest.approx(4 / math.log(2) + math.log2(1 / (0.05 - 4 * math.exp(3) * 1e-5)))
    # capped at the most any canary can reach; None when the group's δ is no longer small
    assert dp_exposure_bound(epsilon=8.0, delta=1e-5, repetitions=1, space=10**4) == pytest.approx(
        math.log2(1e4)
    )
    assert dp_exposure_bound(epsilon=8.0, delta=1e-5, repetitions=16, space=10**6) is None


def test_exposure_canaries_are_memorised_by_repetition_and_ranked_exactly(
    tiny_gpt2_lm: Path, tmp_path: Path
) -> None:
    """A canary trained on 16 times is exposed far more than one seen once, and its exact rank
    agrees with log-perplexities computed independently (transformers' own loss)."""
    from hubtune.pipeline import run_recipe

    lm_csv = tmp_path / "lm.csv"
    make_lm_frame(80).to_csv(lm_csv, index=False)
    spec = lm_recipe(tiny_gpt2_lm, lm_csv, tmp_path / "runs", name="full")
    spec["train"].update(epochs=10, lr=0.01, select_epoch="last")
    spec["audit"] = {
        "enabled": True,
        "exposure": {
            "per_repetition": 3,
            "repetitions": [1, 16],
            "digits": 3,
            "prefix": "my number is",
        },
    }
    result = run_recipe(Recipe.model_validate(spec))
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["data"]["exposure_canaries"] == {
        "canaries": 6,
        "training_rows": 51,
        "repetitions": [1, 16],
    }
    measured = json.loads((result.run_dir / "exposure.json").read_text())["per_canary"]
    assert all(c["method"] == "exact" and "secret" not in c for c in measured)
    by = {k: [c["exposure"] for c in measured if c["repetitions"] == k] for k in (1, 16)}
    assert min(by[16]) > max(by[1]) and sum(by[16]) / 3 > 6.0, by
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    levels = {lv["repetitions"]: lv for lv in audit["exposure"]["levels"]}
    assert levels[16]["max_exposure"] == pytest.approx(max(by[16]))
    assert levels[16]["dp_bound"] is None  # trained without DP: nothing bounds it
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert "Secret-Sharer canaries" in report

    # Independently: the rank of the best-exposed canary from transformers' own mean loss.
    from hubtune.audit.exposure import make_exposure_canaries

    canaries, _ = make_exposure_canaries(
        per_repetition=3,
        repetitions=[1, 16],
        digits=3,
        prefix="my number is",
        seed=0,
        columns=["text"],
        sensitive=["group"],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(result.run_dir / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(result.run_dir / "model")

    def secret_nats(secret: str) -> float:
        full = tok(f"<|endoftext|> my number is {secret}", return_tensors="pt")["input_ids"]
        head = tok("<|endoftext|> my number is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            a = model(input_ids=full, labels=full).loss.item() * (full.shape[1] - 1)
            b = model(input_ids=head, labels=head).loss.item() * (head.shape[1] - 1)
        return a - b

    best = max(measured, key=lambda c: c["exposure"])
    secret = canaries.set_index("canary_id").loc[best["canary_id"], "secret"]
    assert secret_nats(secret) == pytest.approx(best["log_perplexity"], abs=1e-3)
    others = [" ".join(f"{i:03d}") for i in range(1000)]
    beaten = sum(
        secret_nats(s) < best["log_perplexity"] - 1e-6 for s in others[:200] if s != secret
    )
    assert beaten <= best["rank"] - 1  # the first 200 candidates alone beat it no more often


# --------------------------------------------------------------------------- extraction


def test_extraction_is_greedy_reproduction_of_the_suffix_after_the_prefix() -> None:
    """reduce()'s extraction outcome: 1 when every suffix token after bos + the prefix is the
    greedy next token, 0 when one is not, -1 when the example is too short."""
    p, s = tg.EXTRACTION_PREFIX, tg.EXTRACTION_SUFFIX
    length = 1 + p + s + 2
    torch.manual_seed(0)
    ids = torch.randint(1, 9, (3, length))
    logits = torch.randn(3, length, 10)
    for t in range(p, p + s):  # positions P..P+S-1 predict the suffix tokens P+1..P+S
        logits[:, t, ids[:, t + 1]] = 0.0
        logits[torch.arange(3), t, ids[:, t + 1]] = 50.0
    labels = ids.clone()
    labels[1, p + 3] = (ids[1, p + 3] + 1) % 9 + 1  # one suffix token the model does not predict
    labels[2, p + s - 1 :] = tg.IGNORE  # too short: the suffix is cut
    figures, _ = tg.reduce(logits, labels)
    assert figures[:, tg.EXTRACTED].tolist() == [1.0, 0.0, -1.0]


def test_extraction_rates_compare_training_and_held_out_examples() -> None:
    from hubtune.audit.generation import extraction_rates

    scores = pd.DataFrame(
        {
            "row_id": [f"train:{i}" for i in range(100)]
            + [f"test:{i}" for i in range(100)]
            + ["canary:x:0"],
            "member": [True] * 100 + [False] * 100 + [True],
            "extracted": [1.0] * 30 + [0.0] * 60 + [np.nan] * 10 + [1.0] * 5 + [0.0] * 95 + [1.0],
        }
    )
    rates = extraction_rates(scores)
    assert rates["training"] == {
        "examples": 90,
        "too_short": 10,
        "extracted": 30,
        "rate": pytest.approx(1 / 3),
        "ci": rates["training"]["ci"],
    }
    assert rates["held_out"]["rate"] == 0.05 and rates["held_out"]["examples"] == 100
    low, high = rates["difference"]["ci"]
    assert rates["difference"]["value"] == pytest.approx(1 / 3 - 0.05)
    assert 0 < low < rates["difference"]["value"] < high


def test_stereotype_preference_is_the_higher_log_likelihood_and_its_change_is_paired() -> None:
    """A model that always prefers the stereotyping sentence scores 1; the change from a model
    that never does is +1 with a degenerate paired interval; the pairs are CrowS-Pairs'."""
    from hubtune.audit.stereotypes import load_crows_pairs, summarise_stereotypes

    pairs = load_crows_pairs()
    assert len(pairs) == 1508 and pairs["bias_type"].nunique() == 9
    types = pairs["bias_type"].tolist()
    rng = np.random.default_rng(0)
    base = (rng.random(len(types)) < 0.6).tolist()
    summary = summarise_stereotypes(
        {
            "source": "x",
            "bias_type": types,
            "prefers": {"base": base, "fine_tuned": [True] * len(types)},
        },
        n_boot=200,
    )
    overall = summary["rows"][0]
    assert overall["bias_type"] == "all" and overall["fine_tuned"]["value"] == 1.0
    assert overall["base"]["value"] == pytest.approx(np.mean(base))
    low, high = overall["change"]["ci"]
    assert low <= overall["change"]["value"] == pytest.approx(1 - np.mean(base))
    assert overall["change"]["value"] <= high


def test_log_likelihood_scoring_matches_transformers_own_loss(tiny_gpt2_lm: Path) -> None:
    from hubtune.audit.stereotypes import _log_likelihoods

    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_lm)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_lm).eval()
    texts = ["the movie was good", "it is so really awful quite nasty", "bad"]
    got = _log_likelihoods(model, tok, texts, device="cpu", batch_size=2)
    for text, value in zip(texts, got, strict=True):
        ids = tok("<|endoftext|> " + text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert value == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-4)
