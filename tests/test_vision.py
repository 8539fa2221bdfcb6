"""Image classification: data, methods per architecture, BatchNorm honesty, DP, outputs.

Every model is a tiny random one built from a config (transformers ViT and ResNet, timm's
test architectures through TimmWrapper); the data are scikit-learn's handwritten digits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hubtune.data import DataError, load_data
from hubtune.errors import RunError
from hubtune.images import ImageExamples
from hubtune.methods import apply_method, batchnorm_modules, find_blocks
from hubtune.pipeline import run_recipe
from hubtune.recipe import AugmentSection, FreezeMethod, FullMethod, LoraMethod, Recipe

from .conftest import (
    image_recipe_dict,
    make_tiny_resnet,
    make_tiny_timm,
    make_tiny_vit,
    write_digits_folder,
)

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def tiny_effnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_timm(tmp_path_factory.mktemp("effnet"), "test_efficientnet")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_resnet(tmp_path_factory.mktemp("resnet"))


def _recipe(
    model: Path, data: Path, out: Path, *, privacy: dict | None = None, **method: Any
) -> Recipe:
    raw = image_recipe_dict(model, data, out, **method)
    if privacy is not None:
        raw["privacy"] = {
            "enabled": True,
            "target_epsilon": 8,
            "logical_batch_size": 16,
            "physical_batch_size": 8,
            **privacy,
        }
        raw["train"]["lr"] = 0.01
    return Recipe.model_validate(raw)


def _image_model(folder: Path, labels: int = 3) -> nn.Module:
    return transformers.AutoModelForImageClassification.from_pretrained(
        folder, num_labels=labels, ignore_mismatched_sizes=True
    )


# --------------------------------------------------------------------------- data


def test_image_folder_with_metadata_and_unreadable_files(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "d", per_class=8)
    (folder / "train" / "digit0" / "broken.png").write_bytes(b"not an image")
    with (folder / "train" / "metadata.csv").open("a") as handle:
        handle.write("digit0/broken.png,siteA\n")
    section = Recipe.model_validate(image_recipe_dict(tmp_path, folder, tmp_path)).data
    data = load_data(section, seed=0, task="image-classification")
    assert data.label_names == ["digit0", "digit1", "digit2"]
    assert data.text_columns == ["image"]
    assert data.dropped["train"] == {"unreadable image (image)": 1}
    train = data.splits["train"]
    assert set(train["site"]) == {"siteA", "siteB"}
    assert sum(data.rows_kept.values()) == 3 * 16  # every readable image, in some split
    assert isinstance(train["image"][0], bytes) and train["image"][0][:4] == b"\x89PNG"
    # a metadata row naming no image is refused with the path convention
    (folder / "test" / "metadata.csv").write_text("file_name,site\nnope/1.png,siteA\n")
    with pytest.raises(DataError, match="relative to"):
        load_data(section, seed=0, task="image-classification")


def test_parquet_with_an_image_feature(tmp_path: Path, digits: Path) -> None:
    import datasets

    files = sorted((digits / "train").glob("*/*.png"))
    table = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [f.parent.name for f in files]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=["digit0", "digit1", "digit2"]),
            }
        ),
    )
    table = table.cast_column("image", datasets.Image(decode=True))
    table.to_parquet(str(tmp_path / "train.parquet"), batch_size=100)
    raw = image_recipe_dict(tmp_path, tmp_path / "train.parquet", tmp_path)
    raw["data"]["columns"] = {}
    data = load_data(Recipe.model_validate(raw).data, seed=0, task="image-classification")
    assert data.label_names == ["digit0", "digit1", "digit2"]
    assert sum(data.rows_kept.values()) == len(files)
    assert all(isinstance(b, bytes) for b in data.splits["train"]["image"])


def test_augmentation_is_seeded_per_epoch_and_train_only(tiny_vit: Path, digits: Path) -> None:
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_vit)
    images = [p.read_bytes() for p in sorted((digits / "train").glob("*/*.png"))[:4]]
    augment = AugmentSection(
        horizontal_flip=0.5, rotation=20, crop_scale=(0.6, 1.0), brightness=0.3
    )
    train = ImageExamples(images, np.zeros(4), processor, augment=augment, seed=1)
    again = ImageExamples(images, np.zeros(4), processor, augment=augment, seed=1)
    plain = ImageExamples(images, np.zeros(4), processor, augment=None, seed=1)
    first = torch.stack([train[i]["pixel_values"] for i in range(4)])
    assert torch.equal(first, torch.stack([again[i]["pixel_values"] for i in range(4)]))
    train.set_epoch(1)
    second = torch.stack([train[i]["pixel_values"] for i in range(4)])
    assert not torch.equal(first, second)  # a new draw every epoch
    unaugmented = torch.stack([plain[i]["pixel_values"] for i in range(4)])
    assert not torch.equal(first, unaugmented)
    plain.set_epoch(1)
    assert torch.equal(unaugmented, torch.stack([plain[i]["pixel_values"] for i in range(4)]))


def test_recipe_validation_for_images(tmp_path: Path) -> None:
    raw = image_recipe_dict(tmp_path, tmp_path, tmp_path)
    raw["data"]["augment"] = {"crop_scale": [0.9, 0.5]}
    with pytest.raises(ValueError, match="crop_scale"):
        Recipe.model_validate(raw)
    text = image_recipe_dict(tmp_path, tmp_path, tmp_path)
    text["model"] = {"id": "x", "image_size": 64}
    with pytest.raises(ValueError, match="image-classification only"):
        Recipe.model_validate(text)


# --------------------------------------------------------------------------- methods per architecture


def test_blocks_per_architecture(
    tmp_path: Path, tiny_vit: Path, tiny_resnet: Path, tiny_effnet: Path
) -> None:
    vit = _image_model(tiny_vit)
    assert find_blocks(vit)[1] == ["vit.layers.0", "vit.layers.1"]
    plan = apply_method(vit, FreezeMethod(name="freeze", unfreeze_top_k=1), lr=0.1)
    assert plan.unfrozen_blocks == ["vit.layers.1", "vit.layernorm"]

    resnet = _image_model(tiny_resnet)
    assert find_blocks(resnet)[1] == ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]

    effnet = _image_model(tiny_effnet)
    blocks = find_blocks(effnet)[1]
    assert blocks[0] == "timm_model.blocks.0" and len(blocks) == len(effnet.timm_model.blocks)
    plan = apply_method(effnet, FreezeMethod(name="freeze", unfreeze_top_k=1), lr=0.1)
    assert plan.head_name == "timm_model.classifier"
    assert plan.unfrozen_blocks == [blocks[-1], "timm_model.conv_head", "timm_model.bn2"]

    timm_resnet = _image_model(make_tiny_timm(tmp_path / "r", "test_resnet"))
    assert find_blocks(timm_resnet)[1] == [f"timm_model.layer{i}" for i in range(1, 5)]
    assert (
        apply_method(timm_resnet, FreezeMethod(name="freeze"), lr=0.1).head_name == "timm_model.fc"
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return {k.removeprefix("timm_model."): v for k, v in out.items()}


@pytest.mark.slow
def test_frozen_weights_and_batchnorm_statistics_stay_bit_identical(
    tmp_path: Path, tiny_effnet: Path, digits: Path
) -> None:
    before = _tensors(tiny_effnet)
    # head only (cached features), then the top two stages with their BatchNorm frozen
    head = run_recipe(_recipe(tiny_effnet, digits, tmp_path / "a"))
    assert json.loads((head.run_dir / "run.json").read_text())["feature_cache"]["used"]
    after = _tensors(head.run_dir / "model")
    for name, value in before.items():
        if name.startswith("classifier"):
            continue
        assert torch.equal(after[name], value), name  # weights and running statistics alike
    top = run_recipe(
        _recipe(tiny_effnet, digits, tmp_path / "b", unfreeze_top_k=2, batchnorm="frozen")
    )
    after = _tensors(top.run_dir / "model")
    model = _image_model(tiny_effnet)
    norms = {n.removeprefix("timm_model.") for n in batchnorm_modules(model)}
    last = len(model.timm_model.blocks) - 2
    moved = 0
    for name, value in before.items():
        if name.startswith("classifier"):
            continue
        in_bn = any(name.startswith(n + ".") for n in norms)
        trained = name.startswith(("conv_head", f"blocks.{last}", f"blocks.{last + 1}"))
        if in_bn or not trained:
            assert torch.equal(after[name], value), name
        else:
            moved += not torch.equal(after[name], value)
    assert moved >= 4


@pytest.mark.slow
def test_lora_on_a_conv_model_keeps_batchnorm_in_eval_mode(
    tmp_path: Path, tiny_effnet: Path, digits: Path
) -> None:
    result = run_recipe(_recipe(tiny_effnet, digits, tmp_path, name="lora", r=2))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["method"]["lora_target_modules"] == ["conv_pw", "conv_pwl"]
    assert run["method"]["batchnorm_in_eval_mode"] == len(
        batchnorm_modules(_image_model(tiny_effnet))
    )
    from peft import PeftModel

    base = _image_model(tiny_effnet)
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    from transformers.models.timm_wrapper import TimmWrapperImageProcessor

    processor = TimmWrapperImageProcessor.from_pretrained(
        result.run_dir / "adapter", image_processor_filename="preprocessor_config.json"
    )
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    data = load_data(
        _recipe(tiny_effnet, digits, tmp_path).data, seed=0, task="image-classification"
    )
    from hubtune.data import decode_image

    pixels = processor(
        images=[decode_image(b) for b in data.splits["test"]["image"]], return_tensors="pt"
    )
    with torch.no_grad():
        probs = torch.softmax(model(**pixels).logits, -1).numpy()
    np.testing.assert_allclose(probs[:, 0], predictions["prob_digit0"].to_numpy(), atol=1e-5)


# --------------------------------------------------------------------------- DP


def test_dp_refuses_trainable_batchnorm_and_names_the_options(
    tmp_path: Path, tiny_effnet: Path, digits: Path
) -> None:
    recipe = _recipe(tiny_effnet, digits, tmp_path, privacy={}, unfreeze_top_k=1)
    with pytest.raises(RunError) as caught:
        run_recipe(recipe)
    message = str(caught.value)
    assert "BatchNorm" in message and "DP guarantee does not hold" in message
    assert "method.batchnorm: frozen" in message and "method.batchnorm: groupnorm" in message
    assert not (tmp_path / "tiny-vision" / "run.json").exists()
    full = _recipe(tiny_effnet, digits, tmp_path / "f", privacy={}, name="full")
    with pytest.raises(RunError, match="method.batchnorm: groupnorm"):
        run_recipe(full)


def _conv_case(case: str, folder: Path) -> nn.Module:
    torch.manual_seed(0)
    model = _image_model(folder)
    method = {
        "top2-frozen-bn": FreezeMethod(name="freeze", unfreeze_top_k=2, batchnorm="frozen"),
        "top2-groupnorm": FreezeMethod(name="freeze", unfreeze_top_k=2, batchnorm="groupnorm"),
        "lora-conv": LoraMethod(name="lora", r=2, dropout=0.0),
        "full-groupnorm": FullMethod(name="full", batchnorm="groupnorm"),
    }[case]
    plan = apply_method(model, method, lr=0.1)
    model = plan.model
    if case == "lora-conv":
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    model.double()
    plan.train_mode(model)
    assert not [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    return model


@pytest.mark.parametrize(
    "case", ["top2-frozen-bn", "top2-groupnorm", "lora-conv", "full-groupnorm"]
)
def test_dp_per_sample_gradients_of_a_conv_model(case: str, tiny_effnet: Path) -> None:
    import opacus

    model = _conv_case(case, tiny_effnet)
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = {}
    per_example = []
    for i in range(4):
        loss = F.cross_entropy(model(pixel_values=pixels[i : i + 1]).logits, labels[i : i + 1])
        per_example.append(torch.autograd.grad(loss, [p for _, p in named]))
    for j, (name, _) in enumerate(named):
        reference[name] = torch.stack([g[j] for g in per_example])
    scale = max(float(g.abs().max()) for g in reference.values())
    assert scale > 0
    nonzero = [n for n, g in reference.items() if g.abs().max() > 1e-6 * scale]
    assert len(nonzero) >= 0.9 * len(reference)  # the comparison is not vacuous
    gsm = opacus.GradSampleModule(model, loss_reduction="mean")
    F.cross_entropy(gsm(pixel_values=pixels).logits, labels).backward()
    for name, param in named:
        assert param.grad_sample is not None and param.grad_sample.shape == (4, *param.shape), name
        torch.testing.assert_close(
            param.grad_sample,
            reference[name],
            rtol=1e-6,
            atol=1e-9 * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.slow
def test_dp_run_on_a_conv_model_with_frozen_batchnorm(
    tmp_path: Path, tiny_effnet: Path, digits: Path
) -> None:
    from hubtune.privacy import compute_epsilons

    recipe = _recipe(
        tiny_effnet, digits, tmp_path, privacy={}, unfreeze_top_k=2, batchnorm="frozen"
    )
    result = run_recipe(recipe)
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert ledger["epsilon"] <= 8 and ledger["sampling"] == "poisson"
    history = [tuple(h) for h in ledger["history"]]
    assert ledger["epsilon_by_accountant"] == pytest.approx(
        compute_epsilons(history, ledger["delta"])
    )
    before, after = _tensors(tiny_effnet), _tensors(result.run_dir / "model")
    norms = {n.removeprefix("timm_model.") for n in batchnorm_modules(_image_model(tiny_effnet))}
    for name, value in before.items():
        if any(name.startswith(n + ".") for n in norms):
            assert torch.equal(after[name], value), name  # statistics never saw a batch


@pytest.mark.slow
def test_groupnorm_model_is_saved_reloadable(
    tmp_path: Path, tiny_resnet: Path, digits: Path
) -> None:
    from hubtune.data import decode_image
    from hubtune.model import GROUPNORM_FILE, load_saved_image_model

    raw = image_recipe_dict(tiny_resnet, digits, tmp_path, name="full", batchnorm="groupnorm")
    raw["train"]["epochs"] = 1
    result = run_recipe(Recipe.model_validate(raw))
    assert json.loads((result.run_dir / "model" / GROUPNORM_FILE).read_text())["replaced"]
    processor, model = load_saved_image_model(result.run_dir / "model")
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not batchnorm_modules(model)
    test = load_data(Recipe.model_validate(raw).data, seed=0, task="image-classification").splits[
        "test"
    ]
    pixels = processor(images=[decode_image(b) for b in test["image"]], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**pixels).logits, -1).numpy()
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    np.testing.assert_allclose(probs[:, 1], predictions["prob_digit1"].to_numpy(), atol=1e-5)


# --------------------------------------------------------------------------- outputs and audit


@pytest.mark.slow
def test_vision_run_outputs_audit_and_image_size(
    tmp_path: Path, tiny_vit: Path, digits: Path
) -> None:
    raw = image_recipe_dict(tiny_vit, digits, tmp_path, name="lora", r=2)
    raw["data"]["augment"] = {"horizontal_flip": 0.5}
    raw["audit"]["canaries"] = 8
    result = run_recipe(Recipe.model_validate(raw))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["test"]["accuracy"] >= 0
    assert run["feature_cache"]["used"] is False
    saved = json.loads((result.run_dir / "adapter" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 16, "width": 16}
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert {"row_id", "label", "prediction", "site", "prob_digit0"} <= set(predictions.columns)
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    assert "site" in {s["name"] for s in audit["fairness"]["slices"]}
    per_class = {c["label"]: c for c in audit["fairness"]["per_class"]}
    assert set(per_class) == {"digit0", "digit1", "digit2"}
    truth = predictions["label"] == "digit1"
    hits = (predictions["prediction"] == "digit1") & truth
    assert per_class["digit1"]["recall"]["value"] == pytest.approx(hits.sum() / truth.sum())
    assert per_class["digit1"]["support"] == truth.sum()
    html = (result.run_dir / "audit" / "report.html").read_text()
    assert "digit1" in html and "site" in html
    membership = pd.read_parquet(result.run_dir / "membership_scores.parquet")
    assert (membership["split"] == "canaries").sum() == 8


@pytest.mark.slow
def test_image_size_is_used_and_saved(tmp_path: Path, tiny_effnet: Path, digits: Path) -> None:
    raw = image_recipe_dict(tiny_effnet, digits, tmp_path)
    raw["model"]["image_size"] = 24
    raw["train"]["epochs"] = 1
    result = run_recipe(Recipe.model_validate(raw))
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 24, 24]
    processor = transformers.AutoImageProcessor.from_pretrained(result.run_dir / "model")
    from hubtune.data import decode_image

    image = decode_image((sorted((digits / "test").glob("*/*.png"))[0]).read_bytes())
    assert processor(images=image, return_tensors="pt")["pixel_values"].shape == (1, 3, 24, 24)


# --------------------------------------------------------------------------- Space


@pytest.mark.slow
@pytest.mark.parametrize("case", ["timm-lora", "vit-full"])
def test_space_serves_image_runs(
    case: str,
    tmp_path: Path,
    tiny_effnet: Path,
    tiny_vit: Path,
    digits: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gradio as gr

    from hubtune.data import decode_image
    from hubtune.space import build_space_demo, load_app, local_space_config, render_space

    if case == "timm-lora":
        raw = image_recipe_dict(tiny_effnet, digits, tmp_path, name="lora", r=2)
    else:
        raw = image_recipe_dict(tiny_vit, digits, tmp_path, name="full")
    raw["train"]["epochs"] = 1
    recipe = Recipe.model_validate(raw)
    result = run_recipe(recipe)
    app = load_app()
    config = local_space_config(run_dir=result.run_dir)
    assert config["task"] == "image-classification"
    classifier = app.load_classifier(config, base_dir=result.run_dir)
    test = load_data(recipe.data, seed=0, task="image-classification").splits["test"]
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    for i in (0, 7):
        probs = classifier.probabilities(decode_image(test["image"][i]))
        assert probs["digit2"] == pytest.approx(predictions["prob_digit2"][i], abs=1e-5)
    handler = app.make_predict(classifier, 10, images=True, max_image_pixels=20 * 20)
    label, table = handler(decode_image(test["image"][0]))
    assert set(label) == {"digit0", "digit1", "digit2"} and "| class | probability |" in table
    from PIL import Image

    with pytest.raises(gr.Error, match="upload an image"):
        handler(None)
    with pytest.raises(gr.Error, match="at most 400 pixels"):
        handler(Image.new("RGB", (21, 20)))
    assert build_space_demo(source=result.run_dir) is not None
    # The card's how-to-load snippet is image code, and (for a local full model) really runs.
    from hubtune.card import build_card

    card = str(build_card(result.run_dir))
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "how-to-load", "exec")
    assert (
        "AutoModelForImageClassification" in code and "pipeline_tag: image-classification" in card
    )
    if case == "timm-lora":
        assert "TimmWrapperImageProcessor.from_pretrained" in code
    else:
        decode_image(test["image"][0]).save(tmp_path / "replace-with-your-image.png")
        monkeypatch.chdir(tmp_path)
        namespace: dict = {}
        exec(compile(code, "how-to-load", "exec"), namespace)
        assert float(namespace["probabilities"][0, 2]) == pytest.approx(
            predictions["prob_digit2"][0], abs=1e-5
        )
    if case == "vit-full":
        out = render_space(
            run_dir=result.run_dir,
            model_repo_id="me/vit",
            model_revision="a" * 40,
            out_dir=tmp_path / "sp",
        )
        requirements = (out / "requirements.txt").read_text()
        assert "timm==" in requirements and "torchvision==" in requirements
        assert "image-classification" in (out / "README.md").read_text()


def test_space_refuses_a_groupnorm_model(tmp_path: Path) -> None:
    from hubtune.model import GROUPNORM_FILE
    from hubtune.space import SpaceError, local_space_config

    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / GROUPNORM_FILE).write_text('{"replaced": ["bn"]}')
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "name": "gn",
                "data": {"label_names": ["a", "b"]},
                "outputs": {"model_dir": "model"},
            }
        )
    )
    with pytest.raises(SpaceError, match="GroupNorm"):
        local_space_config(run_dir=run_dir)


@pytest.mark.slow
def test_resume_with_augmentation_gives_the_uninterrupted_weights(
    tmp_path: Path, tiny_effnet: Path, digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Augmentation draws depend on (seed, epoch, image) only: a resumed run sees the same images."""

    def recipe(out: Path, epochs: int) -> Recipe:
        raw = image_recipe_dict(tiny_effnet, digits, out, unfreeze_top_k=1, batchnorm="frozen")
        raw["data"]["augment"] = {"horizontal_flip": 0.5, "rotation": 15, "crop_scale": [0.7, 1.0]}
        raw["train"]["epochs"] = epochs
        raw["audit"] = {"enabled": False}
        return Recipe.model_validate(raw)

    from hubtune import checkpoint as checkpoint_module

    whole = run_recipe(recipe(tmp_path / "a", 2))

    class Crash(Exception):
        pass

    def crash(epoch: int) -> None:
        if epoch == 0:
            raise Crash

    monkeypatch.setattr(checkpoint_module, "after_checkpoint", crash)
    with pytest.raises(Crash):
        run_recipe(recipe(tmp_path / "b", 2))
    monkeypatch.setattr(checkpoint_module, "after_checkpoint", None)
    resumed = run_recipe(recipe(tmp_path / "b", 2), resume=True)
    assert resumed.resumed_from_epoch == 1
    a, b = _tensors(whole.run_dir / "model"), _tensors(resumed.run_dir / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the augmentation really changed what was trained on
    plain = recipe(tmp_path / "c", 2).model_copy(deep=True)
    plain.data.augment = None
    unaugmented = _tensors(run_recipe(plain).run_dir / "model")
    assert not all(torch.equal(a[n], unaugmented[n]) for n in a)


@pytest.mark.slow
def test_dp_on_images_with_two_processes(tmp_path: Path, tiny_effnet: Path, digits: Path) -> None:
    """accelerate launch --num_processes 2 --cpu: Poisson per rank, frozen BatchNorm, one ledger."""
    import os
    import shutil
    import subprocess
    import sys
    import warnings

    import yaml

    raw = image_recipe_dict(tiny_effnet, digits, tmp_path, name="lora", r=2)
    raw["privacy"] = {
        "enabled": True,
        "target_epsilon": 8,
        "logical_batch_size": 16,
        "physical_batch_size": 8,
    }
    raw["audit"] = {"enabled": False}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(raw))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate

    def launch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                accelerate,
                "launch",
                "--num_processes",
                "2",
                "--cpu",
                "-m",
                "hubtune",
                "run",
                str(path),
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
            timeout=600,
        )

    out = launch()
    if out.returncode != 0 and "SIGABRT" in out.stderr:
        # A worker killed by SIGABRT inside torch's gloo transport (seen once in ~15 runs, never
        # with a Python error; see the closing note of issue 6): one retry, with the first
        # attempt's native messages kept in the warning, so a real bug still fails the test.
        native = [
            line
            for line in out.stderr.splitlines()
            if any(k in line for k in ("terminate", "what()", "Abort", "corrupt", "free()", "gloo"))
        ]
        warnings.warn(
            "2-process run: a worker aborted; retrying once:\n" + "\n".join(native[:20]),
            stacklevel=1,
        )
        shutil.rmtree(tmp_path / "tiny-vision", ignore_errors=True)
        out = launch()
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line]
    assert out.returncode == 0, "\n".join(errors[:20]) + "\n" + out.stderr[-3000:]
    run_dir = tmp_path / "tiny-vision"
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert ledger["num_processes"] == 2 and ledger["sampling"] == "poisson"
    assert (
        ledger["steps"]
        == 2 * round(1 / ledger["sample_rate"])
        == ledger["observed_batch_sizes"]["steps"]
    )
    assert ledger["epsilon"] <= 8
    run = json.loads((run_dir / "run.json").read_text())
    assert run["hardware"]["num_processes"] == 2
    # the frozen BatchNorm statistics never moved, in any process
    from peft import PeftModel

    model = PeftModel.from_pretrained(_image_model(tiny_effnet), run_dir / "adapter")
    merged = {k: v for k, v in model.state_dict().items() if "running_" in k}
    original = _tensors(tiny_effnet)
    for key, value in merged.items():
        name = key.split("timm_model.", 1)[1]
        assert torch.equal(value, original[name]), key


def test_dp_refuses_trainable_batchnorm_before_any_cache_is_computed(
    tmp_path: Path, tiny_effnet: Path, digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal needs only the model: it comes before the prefix cache runs over every split."""
    from hubtune import cache as cache_module

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("expensive work started before the BatchNorm refusal")

    monkeypatch.setattr(cache_module, "compute_prefix", no_work)
    monkeypatch.setattr(cache_module, "head_features", no_work)
    recipe = _recipe(tiny_effnet, digits, tmp_path, privacy={}, unfreeze_top_k=1)
    with pytest.raises(RunError, match="BatchNorm.*method.batchnorm: frozen"):
        run_recipe(recipe)
    assert not list((tmp_path / "hubtune-cache").rglob("*.safetensors"))
