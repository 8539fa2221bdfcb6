"""The frozen-prefix cache: training on cached hidden states is training the model itself.

Checked against the uncached model, in float64 with dropout off:
- logits and gradients through ``PrefixCached`` on cached hidden states equal the full model's,
  for BERT and GPT-2, LoRA on the top block and an unfrozen top block, with the cache computed
  in batches padded differently from the training batch;
- a prefix whose output depends on the padding (GPT-2 padded on the left counts positions from
  the first pad) is not cached;
- Opacus' per-example gradients (hooks) and ghost norms through the cache equal each example's
  own gradient through the full model, one unpadded example at a time;
- a cut with a trainable module below it is refused; a cache over the size limit is skipped;
- whole runs with and without the cache give the same weights and predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hubtune.methods import MethodError
from hubtune.pipeline import run_recipe
from hubtune.prefix import (
    PrefixCached,
    PrefixExamples,
    PrefixTooLarge,
    PrefixUnusable,
    capture_prefix,
    compute_prefix,
    find_prefix_cut,
    prefix_collate,
    probe_prefix,
)
from hubtune.recipe import FreezeMethod, LoraMethod, Recipe
from hubtune.tasks.text_classification import collator as _collator
from hubtune.tasks.text_classification import encode as _encode

from .conftest import recipe_dict
from .test_privacy_grads import (
    LABELS,
    TEXTS,
    _check_ghost,
    _close,
    _forward,
    _model,
    _reference,
    _scale,
    _trainable,
)

opacus = pytest.importorskip("opacus")
transformers = pytest.importorskip("transformers")

CASES = {
    "lora-top1-bert": (
        "tiny_bert",
        "bert",
        LoraMethod(name="lora", r=4, dropout=0.0, adapt_top_k=1),
    ),
    "freeze-top1-bert": ("tiny_bert", "bert", FreezeMethod(name="freeze", unfreeze_top_k=1)),
    "lora-top1-gpt2": (
        "tiny_gpt2",
        "gpt2",
        LoraMethod(name="lora", r=4, dropout=0.0, target_modules=["c_attn"], adapt_top_k=1),
    ),
    "freeze-top1-gpt2": ("tiny_gpt2", "gpt2", FreezeMethod(name="freeze", unfreeze_top_k=1)),
}


def _setup(request: pytest.FixtureRequest, case: str):  # type: ignore[no-untyped-def]
    """(model, cut, plain batch, batch built from the cache) for ``case``."""
    fixture, arch, method = CASES[case]
    folder = request.getfixturevalue(fixture)
    model, plan = _model(folder, arch, method)
    assert plan.cache_prefix
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoded = _encode(
        tokenizer, pd.DataFrame({"text": TEXTS, "label": LABELS.numpy()}), max_length=32
    )
    collate = _collator(tokenizer)
    cut = find_prefix_cut(model)
    assert cut is not None and cut.first == 1 and cut.total == 2
    assert probe_prefix(model, cut, encoded, collate) is True  # token-level
    # Cached in batches of 3 + 1: paddings differ from the training batch of 4.
    stored = compute_prefix(model, cut, encoded, collate, 3, token_level=True)
    model.train()
    lengths = stored["lengths"].tolist()
    assert len(set(lengths)) == len(TEXTS) and stored["hidden"].shape[0] == sum(lengths)
    assert stored["hidden"].dtype == torch.float64  # stored at the model's precision
    examples = PrefixExamples(encoded, stored["hidden"], stored["lengths"])
    cached = prefix_collate(collate, token_level=True)([examples[i] for i in range(len(TEXTS))])
    plain = collate([encoded[i] for i in range(len(TEXTS))])
    for batch in (cached, plain):
        batch.pop("idx")
        batch.pop("labels")
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    return model, cut, plain, cached


@pytest.mark.parametrize("case", list(CASES))
def test_cached_prefix_gives_the_full_models_logits_and_gradients(
    request: pytest.FixtureRequest, case: str
) -> None:
    model, cut, plain, cached = _setup(request, case)
    wrapper = PrefixCached(model, cut)
    assert {n.removeprefix("model.") for n, _ in wrapper.named_parameters()} == {
        n for n, _ in model.named_parameters()
    }
    calls: list[str] = []
    handles = [
        model.get_submodule(f"{cut.container}.{i}").register_forward_pre_hook(
            lambda _m, _a, i=i: calls.append(i)
        )
        for i in range(cut.total)
    ]
    logits = _forward(wrapper, cached)
    assert calls == [1]  # the frozen block 0 did not run
    calls.clear()
    expected = _forward(model, plain)
    assert calls == [0, 1]
    for handle in handles:
        handle.remove()
    assert len(model.get_submodule(cut.container)) == 2  # the container is restored
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-10)
    named = _trainable(model)
    grads = torch.autograd.grad(F.cross_entropy(logits, LABELS), [p for _, p in named])
    reference = torch.autograd.grad(F.cross_entropy(expected, LABELS), [p for _, p in named])
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    for (name, _), got, want in zip(named, grads, reference, strict=True):
        _close(got, want, name, scale)


@pytest.mark.parametrize("case", ["lora-top1-bert", "freeze-top1-bert", "lora-top1-gpt2"])
def test_dp_per_example_gradients_through_the_cache(
    request: pytest.FixtureRequest, case: str
) -> None:
    model, cut, plain, cached = _setup(request, case)
    reference = _reference(model, plain)  # each example alone, through the whole model
    scale = _scale(reference)
    wrapper = PrefixCached(model, cut)
    gsm = opacus.GradSampleModule(wrapper)
    F.cross_entropy(_forward(gsm, cached), LABELS).backward()
    named = _trainable(model)
    assert len(named) == len(reference)
    for name, param in named:
        assert param.grad_sample is not None and param.grad_sample.shape[0] == len(TEXTS), name
        _close(param.grad_sample, reference[name], name, scale)
    gsm._close()


def test_ghost_clipping_through_the_cache(request: pytest.FixtureRequest) -> None:
    model, cut, plain, cached = _setup(request, "lora-top1-bert")
    reference = {f"model.{n}": g for n, g in _reference(model, plain).items()}
    _check_ghost(PrefixCached(model, cut), cached, reference, _forward)


def test_a_trainable_module_below_the_cut_is_refused(tiny_bert: Path) -> None:
    model, _ = _model(tiny_bert, "bert", FreezeMethod(name="freeze", unfreeze_top_k=1))
    cut = find_prefix_cut(model)
    assert cut is not None
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with pytest.raises(
        MethodError, match=r"bert\.embeddings\.LayerNorm run before bert\.encoder\.layer\.1"
    ):
        capture_prefix(model, cut, batch, check=True)
    # Block 0 trainable: nothing below the lowest trained block is left to cache.
    model.bert.encoder.layer[0].output.dense.weight.requires_grad_(True)
    assert find_prefix_cut(model) is None


def test_padding_dependent_prefix_is_not_cached(tiny_gpt2: Path) -> None:
    model, _ = _model(tiny_gpt2, "gpt2", FreezeMethod(name="freeze", unfreeze_top_k=1))
    cut = find_prefix_cut(model)
    assert cut is not None
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    encoded = _encode(tokenizer, pd.DataFrame({"text": TEXTS, "label": [1, 1, 0, 0]}), 32)
    assert probe_prefix(model, cut, encoded, _collator(tokenizer)) is True  # right padding: fine
    tokenizer.padding_side = "left"
    with pytest.raises(PrefixUnusable, match="depends on how an example is padded"):
        probe_prefix(model, cut, encoded, _collator(tokenizer))


def test_no_cut_when_every_block_trains(tiny_bert: Path) -> None:
    model, plan = _model(tiny_bert, "bert", LoraMethod(name="lora", r=4))
    assert plan.cache_prefix and find_prefix_cut(model) is None


def test_lora_adapt_top_k_adapts_only_the_top_blocks(tiny_bert: Path, tiny_gpt2: Path) -> None:
    model, plan = _model(tiny_bert, "bert", LoraMethod(name="lora", adapt_top_k=1))
    lora = [n for n in plan.trainable_names if "lora_" in n]
    assert lora and all(".layer.1." in n for n in lora)
    # The frozen bottom (and the embeddings) run in eval mode with or without the cache.
    assert {"base_model.model.bert.embeddings", "base_model.model.bert.encoder.layer.0"} <= set(
        plan.eval_modules
    )
    assert not any(n.startswith("base_model.model.bert.encoder.layer.1") for n in plan.eval_modules)
    with pytest.raises(MethodError, match="adapt_top_k is 3 .* use at most 2"):
        _model(tiny_gpt2, "gpt2", LoraMethod(name="lora", target_modules=["c_attn"], adapt_top_k=3))


def test_cache_over_the_size_limit_is_skipped(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = _model(tiny_bert, "bert", FreezeMethod(name="freeze", unfreeze_top_k=1))
    cut = find_prefix_cut(model)
    assert cut is not None
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    encoded = _encode(tokenizer, pd.DataFrame({"text": TEXTS, "label": [1, 1, 0, 0]}), 32)
    tokens = sum(len(ids) for ids in encoded.encodings["input_ids"])
    size = tokens * 32 * 4  # tokens x hidden 32 x 4 bytes
    monkeypatch.setenv("HUBTUNE_PREFIX_CACHE_MAX_GIB", str((size - 1) / 2**30))
    with pytest.raises(PrefixTooLarge, match="would take"):
        probe_prefix(model, cut, encoded, _collator(tokenizer), tokens=tokens)
    monkeypatch.setenv("HUBTUNE_PREFIX_CACHE_MAX_GIB", str(size / 2**30))
    assert probe_prefix(model, cut, encoded, _collator(tokenizer), tokens=tokens)


def _run(tiny_bert: Path, csv: Path, out: Path, cache: bool, **method: object):  # type: ignore[no-untyped-def]
    spec = recipe_dict(tiny_bert, csv, out, **method)
    spec["method"]["feature_cache"] = cache
    # SGD: AdamW turns float rounding in near-zero gradients into lr-sized steps.
    spec["train"].update({"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05})
    return run_recipe(Recipe.model_validate(spec))


@pytest.mark.parametrize(
    "method",
    [
        {"name": "freeze", "unfreeze_top_k": 1},
        {"name": "lora", "r": 4, "adapt_top_k": 1},
    ],
)
def test_runs_with_and_without_the_cache_agree(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path, method: dict
) -> None:
    cached = _run(tiny_bert, sentiment_csv, tmp_path / "cached", True, **method)
    plain = _run(tiny_bert, sentiment_csv, tmp_path / "plain", False, **method)
    info = json.loads((cached.run_dir / "run.json").read_text())["feature_cache"]
    assert info["used"] is True and info["kind"] == "prefix"
    assert info["cached"] == "blocks 0-0 of 2 in " + (
        "bert.encoder.layer"
        if method["name"] == "freeze"
        else "base_model.model.bert.encoder.layer"
    )
    assert set(info["hits"]) == {"train", "validation", "test"}
    assert json.loads((plain.run_dir / "run.json").read_text())["feature_cache"]["used"] is False
    folder = "model" if method["name"] == "freeze" else "adapter"
    name = "model.safetensors" if method["name"] == "freeze" else "adapter_model.safetensors"
    a = load_file(cached.run_dir / folder / name)
    b = load_file(plain.run_dir / folder / name)
    assert a.keys() == b.keys()
    # Training moved the weights (the comparison is not vacuous) ...
    base = _model(tiny_bert, "bert", FreezeMethod(name="freeze"))[0].state_dict()
    if method["name"] == "freeze":
        key = "bert.encoder.layer.1.output.dense.weight"
        assert not torch.allclose(a[key], base[key].float(), atol=1e-3)
    # ... and the cached run ends where the uncached one does (rounding from other paddings).
    for key in a:
        diff = float((a[key] - b[key]).abs().max())
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (key, diff)
    assert cached.metrics["test"]["accuracy"] == plain.metrics["test"]["accuracy"]
    pa = pd.read_parquet(cached.run_dir / "predictions.parquet")
    pb = pd.read_parquet(plain.run_dir / "predictions.parquet")
    assert (pa["prediction"] == pb["prediction"]).all()
    # A second run reads the cache instead of computing it.
    again = _run(tiny_bert, sentiment_csv, tmp_path / "again", True, **method)
    hits = json.loads((again.run_dir / "run.json").read_text())["feature_cache"]["hits"]
    assert all(hits.values())
    # and lands on the very same weights: computing the cache drew nothing from the global RNG
    # (the top block's dropout masks would differ otherwise).
    c = load_file(again.run_dir / folder / name)
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_length_sorted_poisson_batches_keep_their_examples() -> None:
    from hubtune.privacy.loop import LengthSorted as _LengthSorted

    batches = [[5, 1, 3, 0], [], [2, 4]]
    lengths = [7, 3, 9, 3, 1, 5]
    out = list(_LengthSorted(batches, lengths))
    assert len(_LengthSorted(batches, lengths)) == 3
    assert [sorted(b) for b in out] == [sorted(b) for b in batches]  # same examples per step
    assert out == [[1, 3, 5, 0], [], [4, 2]]  # by length, ties in sampled order


def test_dp_lora_on_the_cache_spends_what_the_ledger_says_and_the_adapter_reproduces_it(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from .conftest import make_sentiment_frame
    from .test_privacy import _independent_epsilons, assert_adapter_reproduces_predictions

    csv = tmp_path / "reviews.csv"
    make_sentiment_frame(900).to_csv(csv, index=False)
    spec = recipe_dict(tiny_bert, csv, tmp_path, name="lora", r=4, adapt_top_k=1)
    spec["train"].update(epochs=2, lr=0.5, optimizer="sgd")
    spec["privacy"] = {
        "enabled": True,
        "target_epsilon": 4.0,
        "logical_batch_size": 64,
        "physical_batch_size": 16,
    }
    result = run_recipe(Recipe.model_validate(spec))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["feature_cache"]["kind"] == "prefix"
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert ledger["epsilon"] <= 4.0
    independent = _independent_epsilons(ledger["history"], ledger["delta"])
    assert ledger["epsilon_by_accountant"]["rdp"] == pytest.approx(independent["rdp"], rel=0.01)
    assert ledger["steps"] == 2 * round(1 / ledger["sample_rate"])
    observed = ledger["observed_batch_sizes"]
    assert observed["steps"] == ledger["steps"] and observed["min"] < observed["max"]
    trained = ledger["trained_parameters"]
    assert trained and all(".layer.1." in n or "classifier" in n for n in trained)
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at 0
    # The adapter, reloaded by plain peft (no cache), gives the probabilities of the run.
    assert_adapter_reproduces_predictions(result.run_dir, csv)
    # The model card says what ran: SGD, adapters in the top block, the cached frozen blocks.
    from hubtune.card import build_card

    text = " ".join(build_card(result.run_dir).text.split())
    assert "with SGD (momentum 0.9) under DP-SGD (Opacus)" in text
    assert "in the top 1 block(s) only" in text
    assert (
        "the frozen blocks below the adapters (blocks 0-0 of 2 in "
        "base_model.model.bert.encoder.layer) were run once" in text
    )
