"""Per-example gradients under Opacus are the gradients of each example, computed one at a time.

Every test compares what Opacus computes for a padded batch of examples of different lengths
against an independent reference: each example alone (unpadded, batch of one), its loss
differentiated with plain ``torch.autograd.grad``. Everything runs in float64 with every dropout
probability set to 0, so the two paths must agree to rounding error. Models stay in training
mode: Opacus only captures activations of modules in training mode.

Loss reductions are exact: a batch loss ``mean_i loss_i`` gives backprops scaled by 1/B, which
Opacus (``loss_reduction="mean"``, hubtune's setting) multiplies back by B, so ``grad_sample[i]``
is the gradient of ``loss_i`` itself; with ``loss_reduction="sum"`` the batch loss is the sum.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hubtune.cache import head_inputs
from hubtune.methods import apply_method
from hubtune.privacy import PrivacyError, add_position_ids, check_per_sample_gradients
from hubtune.recipe import FreezeMethod, FullMethod, LoraMethod

from .conftest import make_sentiment_frame

opacus = pytest.importorskip("opacus")
transformers = pytest.importorskip("transformers")

# Token counts (with [CLS] and [SEP]): 3, 7, 4, 9 -> a padded batch of width 9.
TEXTS = ["good", "the movie was very good", "bad day", "it is so really awful quite nasty"]
LABELS = torch.tensor([1, 1, 0, 0])
B = len(TEXTS)

NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    # hubtune's pooled classifier (model.pooling: mean): the encoder's dropouts, and the head's
    "bert-mean": {"classifier_dropout": 0.0},
}


# --------------------------------------------------------------------------- helpers


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def _model(folder: Path, arch: str, method: Any, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """A float64 classifier with ``method`` applied, every dropout off, in training mode."""
    torch.manual_seed(seed)
    if arch == "bert-mean":
        from hubtune.modeling_pooled import (
            HubtunePooledConfig,
            HubtunePooledForSequenceClassification,
        )

        encoder = transformers.AutoConfig.from_pretrained(folder, **NO_DROPOUT["bert"]).to_dict()
        config = HubtunePooledConfig(encoder=encoder, num_labels=2, **NO_DROPOUT[arch])
        model = HubtunePooledForSequenceClassification.from_pretrained(folder, config=config)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, **NO_DROPOUT[arch]
        )
    plan = apply_method(model, method, lr=0.1)
    model = plan.model
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if isinstance(method, LoraMethod):
        # peft starts lora_B at 0, which makes every lora_A gradient 0: give it random values so
        # the test sees non-trivial gradients for both adapter matrices.
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.double().train()
    for name, module in model.named_modules():
        assert not isinstance(module, nn.Dropout) or module.p == 0.0, name
    for key, value in NO_DROPOUT[arch].items():
        assert getattr(model.config, key) == value
    return model, plan


def _batch(folder: Path, *, position_ids: bool = False) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == B and min(lengths) < batch["input_ids"].shape[1]
    return add_position_ids(batch) if position_ids else batch


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _reference(
    model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor = LABELS
) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, *shape], one unpadded example at a time with plain autograd."""
    named = _trainable(model)
    per_example: list[tuple[torch.Tensor, ...]] = []
    for i in range(len(labels)):
        if "attention_mask" in batch:
            length = int(batch["attention_mask"][i].sum())
            single = {k: v[i : i + 1, :length] for k, v in batch.items()}
            logits = _forward(model, single)
        else:  # a feature tensor for a bare head
            logits = model(batch["features"][i : i + 1])
        loss = F.cross_entropy(logits, labels[i : i + 1], reduction="sum")
        per_example.append(torch.autograd.grad(loss, [p for _, p in named]))
    out = {name: torch.stack([g[j] for g in per_example]) for j, (name, _) in enumerate(named)}
    scale = _scale(out)
    for name, grads in out.items():  # the comparison must not be vacuous
        if name.endswith("attention.self.key.bias"):
            # softmax ignores a shift shared by all keys: q . b_k is one, so this is 0
            assert grads.abs().max() < 1e-12 * scale, name
        else:
            assert grads.abs().max() > 1e-6 * scale, f"{name}: zero reference gradient"
    return out


def _scale(reference: dict[str, torch.Tensor]) -> float:
    """The largest per-example gradient entry: tolerances are relative to it."""
    return max(float(g.abs().max()) for g in reference.values())


def _norms(reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example gradient norms over all trainable tensors."""
    squares = [g.reshape(g.shape[0], -1).pow(2).sum(1) for g in reference.values()]
    return torch.stack(squares).sum(0).sqrt()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-7, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}"
    )


# The cases: (fixture, arch, method, explicit position ids).
CASES = {
    "lora-bert": ("tiny_bert", "bert", LoraMethod(name="lora", r=4, dropout=0.0), False),
    "lora-gpt2": (
        "tiny_gpt2",
        "gpt2",
        LoraMethod(name="lora", r=4, dropout=0.0, target_modules=["c_attn"]),
        False,
    ),
    "freeze-top1-bert": ("tiny_bert", "bert", FreezeMethod(name="freeze", unfreeze_top_k=1), False),
    "full-bert": ("tiny_bert", "bert", FullMethod(name="full"), True),
    # mean pooling over the kept tokens: padding must not leak into another example's gradient
    "full-bert-mean": ("tiny_bert", "bert-mean", FullMethod(name="full"), True),
    # trainable transformers Conv1D: no Opacus grad/norm sampler, so the functorch fallback
    "full-gpt2": ("tiny_gpt2", "gpt2", FullMethod(name="full"), True),
}


def _case(request: pytest.FixtureRequest, case: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    fixture, arch, method, position_ids = CASES[case]
    folder = request.getfixturevalue(fixture)
    model, plan = _model(folder, arch, method)
    if case.startswith("lora"):
        trained = {n for n, _ in _trainable(model)}
        assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
        assert any("modules_to_save" in n for n in trained)  # the head trains too
    if case == "freeze-top1-bert":
        assert plan.unfrozen_blocks == ["bert.encoder.layer.1", "bert.pooler"]
    return model, _batch(folder, position_ids=position_ids)


def _head_on_features(tiny_bert: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The head alone on backbone features, as hubtune trains it with ``feature_cache``."""
    model, plan = _model(tiny_bert, "bert", FreezeMethod(name="freeze"))
    assert plan.cache_features and plan.head_name == "classifier"
    features = head_inputs(model, plan.head_name, _batch(tiny_bert))
    assert features.shape == (B, 32) and features.dtype == torch.float64
    head = model.classifier
    assert isinstance(head, nn.Linear)
    return head, {"features": features}


# --------------------------------------------------------------------------- 1. hooks mode


@pytest.mark.parametrize(
    ("case", "reduction"), [*((case, "mean") for case in CASES), ("lora-bert", "sum")]
)
def test_hooks_grad_sample_is_each_examples_gradient(
    request: pytest.FixtureRequest, case: str, reduction: str
) -> None:
    model, batch = _case(request, case)
    reference = _reference(model, batch)
    scale = _scale(reference)
    gsm = opacus.GradSampleModule(model, loss_reduction=reduction)
    F.cross_entropy(_forward(gsm, batch), LABELS, reduction=reduction).backward()
    named = _trainable(model)
    assert len(named) == len(reference)
    for name, param in named:
        assert param.grad_sample is not None, name
        assert param.grad_sample.shape == (B, *param.shape), name
        _close(param.grad_sample, reference[name], name, scale)
        # and the ordinary gradient is the reduction of the per-example ones
        summed = reference[name].sum(0) / (B if reduction == "mean" else 1)
        _close(param.grad, summed, f"{name}.grad", scale)


def test_hooks_grad_sample_head_on_cached_features(tiny_bert: Path) -> None:
    head, batch = _head_on_features(tiny_bert)
    reference = _reference(head, batch)
    gsm = opacus.GradSampleModule(head)
    F.cross_entropy(gsm(batch["features"]), LABELS).backward()
    assert set(reference) == {"weight", "bias"}
    for name, param in head.named_parameters():
        assert param.grad_sample.shape == (B, *param.shape)
        _close(param.grad_sample, reference[name], name, _scale(reference))


def test_hooks_without_position_ids_position_grad_sample_is_the_batch_gradient(
    tiny_bert: Path,
) -> None:
    """Why hubtune adds explicit position ids (opacus #841).

    Without them BERT looks its positions up with a [1, T] tensor, and the [1, T, H] lookup is
    broadcast over the batch only later, in the sum with the token embeddings. Opacus sees a
    "batch" of 1 for ``position_embeddings``: the backprop of that [1, T, H] output is already
    summed over the examples, so its grad_sample has batch dim 1 and holds the gradient of the
    whole batch (sum_i g_i / B under the mean reduction, as Opacus rescales by the batch size it
    saw, 1), a mix of all examples that no per-example clipping can bound. Every other tensor
    is still right. The DP optimizer then fails (per-example norms of different sizes), and
    hubtune's preflight refuses, naming the tensor; ghost clipping fails in the backward pass.
    """
    model, _ = _model(tiny_bert, "bert", FullMethod(name="full"))
    batch = _batch(tiny_bert, position_ids=False)
    reference = _reference(model, batch)
    scale = _scale(reference)
    gsm = opacus.GradSampleModule(model)
    F.cross_entropy(_forward(gsm, batch), LABELS).backward()
    position = model.bert.embeddings.position_embeddings.weight
    assert position.grad_sample.shape == (1, *position.shape)
    name = "bert.embeddings.position_embeddings.weight"
    _close(position.grad_sample[0], reference[name].sum(0) / B, name, scale)
    _close(position.grad, reference[name].sum(0) / B, f"{name}.grad", scale)
    assert not torch.allclose(position.grad_sample[0], reference[name][0], atol=1e-3 * scale)
    wrong = [n for n, p in _trainable(model) if p.grad_sample.shape[0] != B]
    assert wrong == [name]
    for n, p in _trainable(model):
        if n != name:
            _close(p.grad_sample, reference[n], n, scale)

    # Downstream: Opacus' optimizer fails to clip, hubtune's preflight names the tensor.
    params = [p for _, p in _trainable(model)]
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=B,
    )
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run = types.SimpleNamespace(model=gsm, criterion=None, optimizer=optimizer, loss_fn=None)
    with pytest.raises(PrivacyError, match=r"position_embeddings\.weight: \(1, 64, 32\)"):
        check_per_sample_gradients(run, {**batch, "labels": LABELS}, _forward)
    optimizer.zero_grad(set_to_none=True)
    check_per_sample_gradients(run, add_position_ids({**batch, "labels": LABELS}), _forward)

    # Ghost clipping fails loudly as well: the position norms have batch dim 1.
    model, _ = _model(tiny_bert, "bert", FullMethod(name="full"))
    gsm, _, criterion, _ = _ghost(model, 1.0, 0.1)
    with pytest.raises(RuntimeError, match=r"got \[4\] at entry 0 and \[1\] at entry 1"):
        criterion(_forward(gsm, batch), LABELS).backward()


# --------------------------------------------------------------------------- 2. ghost mode


def _ghost(
    module: nn.Module, max_grad_norm: float, lr: float
) -> tuple[nn.Module, Any, Any, list[tuple[str, nn.Parameter]]]:
    """Wired as ``PrivacyEngine.make_private(grad_sample_mode="ghost", clipping="flat")`` does."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping, get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    named = _trainable(module)
    gsm = GradSampleModuleFastGradientClipping(
        module,
        batch_first=True,
        loss_reduction="mean",
        max_grad_norm=max_grad_norm,
        use_ghost_clipping=True,
    )
    cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    assert cls is DPOptimizerFastGradientClipping
    optimizer = cls(
        torch.optim.SGD([p for _, p in named], lr=lr),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=B,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss(), "mean")
    return gsm, optimizer, criterion, named


def _check_ghost(
    module: nn.Module, batch: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], logits
) -> None:
    norms = _norms(reference)
    scale = _scale(reference)
    # Clip the largest two examples, leave the smallest two alone.
    max_grad_norm = float(norms.sort().values[1:3].mean())
    lr = 0.1
    gsm, optimizer, criterion, named = _ghost(module, max_grad_norm, lr)
    before = {n: p.detach().clone() for n, p in named}
    loss = criterion(logits(gsm, batch), LABELS)
    loss.backward()  # two backward passes: norms, then the clipped sum
    _close(gsm.per_sample_gradient_norms, norms, "per-example norms", float(norms.max()))
    # Opacus clips with C / (norm + 1e-6), capped at 1.
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert int((coef < 1).sum()) == 2
    for name, param in named:
        clipped = torch.einsum("i,i...->...", coef, reference[name])
        _close(param.grad, clipped, f"{name} clipped sum", scale)
        assert getattr(param, "grad_sample", None) is None  # ghost: never materialised
    expected = {n: (p.grad / B).clone() for n, p in named}  # mean over expected batch size
    optimizer.step()  # σ = 0: no noise
    for name, param in named:
        _close(before[name] - param.detach(), lr * expected[name], f"{name} update", lr * scale)


@pytest.mark.parametrize("case", list(CASES))
def test_ghost_norms_and_clipped_sum(request: pytest.FixtureRequest, case: str) -> None:
    model, batch = _case(request, case)
    if "gpt2" in case:
        # GPT-2 looks token_type_ids up in wte, a second call of the word embeddings that ghost
        # clipping refuses (next test); GPT-2's own tokenizer gives none, the test one (BERT's) does.
        del batch["token_type_ids"]
    reference = _reference(model, batch)
    _check_ghost(model, batch, reference, _forward)


def test_ghost_refuses_gpt2_token_type_ids_with_trainable_word_embeddings(tiny_gpt2: Path) -> None:
    """GPT-2 embeds token_type_ids with ``wte`` too: two calls of one nn.Embedding per forward.

    Hooks mode sums both calls' per-example gradients (right: ``full-gpt2`` above passes with
    token_type_ids); ghost clipping takes the second call for parameter tying and raises in the
    forward pass. With frozen embeddings (LoRA) nothing is raised.
    """
    model, _ = _model(tiny_gpt2, "gpt2", FullMethod(name="full"))
    batch = _batch(tiny_gpt2, position_ids=True)
    assert "token_type_ids" in batch
    gsm, _, _, _ = _ghost(model, 1.0, 0.1)
    with pytest.raises(NotImplementedError, match="Parameter tying is not supported"):
        _forward(gsm, batch)
    model, _ = _model(tiny_gpt2, "gpt2", CASES["lora-gpt2"][2])
    gsm, _, criterion, _ = _ghost(model, 1.0, 0.1)
    criterion(_forward(gsm, batch), LABELS).backward()
    assert gsm.per_sample_gradient_norms.shape == (B,)


def test_ghost_head_on_cached_features(tiny_bert: Path) -> None:
    head, batch = _head_on_features(tiny_bert)
    reference = _reference(head, batch)
    _check_ghost(head, batch, reference, lambda m, b: m(b["features"]))


# --------------------------------------------------------------------------- 3. σ = 0, C = ∞


def test_dp_step_without_noise_or_clipping_equals_plain_sgd(tiny_bert: Path) -> None:
    """prepare_private with σ = 0 and C = 1e9 takes exactly the non-private SGD step.

    Opacus' DPOptimizer sums the (unclipped) per-example gradients and divides by the expected
    batch size ``q * n`` (here 8), not by the size of the batch at hand (4): the plain twin
    therefore minimises ``sum_i loss_i / (q * n)`` with the same SGD(lr=0.1).
    """
    from hubtune.privacy import prepare_private
    from hubtune.recipe import PrivacySection
    from hubtune.tasks.text_classification import collator as _collator
    from hubtune.tasks.text_classification import encode as _encode

    n = 200
    frame = make_sentiment_frame(n)
    # Texts of 1..5 words, so batches have different lengths.
    frame["text"] = [" ".join(t.split()[-(1 + i % 5) :]) for i, t in enumerate(frame["text"])]
    frame["label"] = (frame["label"] == "pos").astype(int)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    dataset = _encode(tokenizer, frame, 32)
    collate = _collator(tokenizer)

    method = LoraMethod(name="lora", r=4, dropout=0.0)
    private, _ = _model(tiny_bert, "bert", method, seed=3)
    plain, _ = _model(tiny_bert, "bert", method, seed=3)
    for (name, a), (_, b) in zip(private.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    lr = 0.1
    # model_construct: σ = 0 is below the recipe's floor on purpose (no privacy, equivalence check).
    section = PrivacySection.model_construct(
        enabled=True,
        target_epsilon=None,
        delta=None,
        accountant="prv",
        grad_sample_mode="hooks",
        secure_mode=False,
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        logical_batch_size=8,
        physical_batch_size=8,
    )
    run = prepare_private(
        section=section,
        model=private,
        optimizer=torch.optim.SGD([p for _, p in _trainable(private)], lr=lr),
        dataset=dataset,
        collate=collate,
        epochs=1,
        num_processes=1,
        device=torch.device("cpu"),
    )
    assert run.sigma == 0.0 and run.q == 1 / 25
    expected_batch = run.optimizer.expected_batch_size
    assert expected_batch == 8 == round(run.q * run.n)
    plain_optimizer = torch.optim.SGD([p for _, p in _trainable(plain)], lr=lr)

    batch = collate([dataset[i] for i in range(B)])  # one fixed batch, not a Poisson one
    batch.pop("idx")
    labels = batch.pop("labels")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == B
    add_position_ids(batch)

    run.model.train()
    F.cross_entropy(_forward(run.model, batch), labels).backward()  # as hubtune's DP loop
    run.optimizer.step()
    assert not run.optimizer._is_last_step_skipped

    plain.train()
    (F.cross_entropy(_forward(plain, batch), labels, reduction="sum") / expected_batch).backward()
    plain_optimizer.step()

    # float64: equal to rounding error (far inside the 1e-6 asked for)
    for (name, a), (_, b) in zip(private.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    # and the step was not a no-op: every trained tensor moved
    start = dict(_model(tiny_bert, "bert", method, seed=3)[0].named_parameters())
    for name, param in _trainable(plain):
        assert not torch.equal(param, start[name]), name
