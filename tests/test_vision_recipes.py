"""The shipped vision recipes: the medical-imaging one on a tiny ViT and generated X-rays, and
the quality-control ones on the real converted EfficientNet-Lite0 and Debian's Fashion-MNIST."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hubtune.errors import RunError
from hubtune.pipeline import run_recipe
from hubtune.recipe import load_recipe

from .conftest import make_tiny_vit

ROOT = Path(__file__).parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
QC_RECIPES = ["qc-feature-extraction", "qc-feature-extraction-dp", "qc-finetune-top"]


def _xray_folder(folder: Path, *, per_split: dict[str, int]) -> Path:
    """Generated chest 'X-rays': dark ribcage noise; PNEUMONIA ones carry a bright opaque patch.

    Sizes vary (the processor resizes); ``metadata.csv`` adds sex, a synthetic attribute.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        rows = []
        for i in range(count):
            label = "PNEUMONIA" if i % 2 else "NORMAL"
            h, w = int(rng.integers(40, 56)), int(rng.integers(40, 56))
            pixels = rng.normal(60, 20, size=(h, w))
            pixels += 40 * np.sin(np.arange(h)[:, None] / 3.0)  # ribs
            if label == "PNEUMONIA":
                y, x = int(rng.integers(5, h - 20)), int(rng.integers(5, w - 20))
                pixels[y : y + 15, x : x + 15] += 120
            target = folder / split / label
            target.mkdir(parents=True, exist_ok=True)
            name = f"{i:04d}.jpeg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(target / name)
            rows.append(f"{label}/{name},{'FM'[int(rng.integers(0, 2))]}")
        (folder / split / "metadata.csv").write_text("file_name,sex\n" + "\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_xray_vit_lora_recipe_on_a_tiny_vit_and_generated_images(tmp_path: Path) -> None:
    shipped = yaml.safe_load((ROOT / "recipes" / "xray-vit-lora.yaml").read_text())
    assert (
        shipped["model"]["id"] == "google/vit-base-patch16-224-in21k"
    )  # the real one needs the internet
    vit = make_tiny_vit(tmp_path / "vit")
    data = _xray_folder(tmp_path / "chest-xray", per_split={"train": 120, "val": 40, "test": 80})
    recipe = load_recipe(
        ROOT / "recipes" / "xray-vit-lora.yaml",
        overrides=[
            f"model.id={vit}",
            f"data.source={data}",
            "data.columns.sensitive=[sex]",
            f"output_dir={tmp_path / 'runs'}",
            "train.epochs=4",
            "train.lr=0.005",
            "train.log_with=[]",
            "audit.policy=default",
        ],
    )
    result = run_recipe(recipe)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["data"]["rows_kept"] == {
        "train": 120,
        "validation": 40,
        "test": 80,
    }  # val/ is validation
    assert run["method"]["method"] == "lora"
    assert run["method"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert (result.run_dir / "adapter" / "adapter_config.json").exists()
    assert result.metrics["test"]["accuracy"] > 0.6  # the bright patch is learnable
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert set(predictions["sex"]) == {"F", "M"}
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    assert [s["name"] for s in audit["fairness"]["slices"]] == ["sex"]


def test_shipped_vision_recipes_validate_and_pin_the_seeded_commits() -> None:
    from hubtune.vision_assets import EFFICIENTNET_LITE0_REPO, FASHION_MNIST_REPO

    for name in QC_RECIPES:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert recipe.model.task == "image-classification"
        assert (
            recipe.model.id == EFFICIENTNET_LITE0_REPO and recipe.data.source == FASHION_MNIST_REPO
        )
        assert len(recipe.model.revision) == 40 and recipe.data.revision is not None
        assert recipe.hub.endpoint == "local"
    dp = load_recipe(ROOT / "recipes" / "qc-feature-extraction-dp.yaml")
    assert dp.dp and dp.privacy is not None and dp.privacy.target_epsilon == 8


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            "Debian's dataset-fashion-mnist is not installed (bash scripts/setup.sh --with-vision-data)"
        )
    import re

    from typer.testing import CliRunner

    from hubtune.cli import app

    base = tmp_path_factory.mktemp("fashion")
    out = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            "fashion-mnist",
            "-o",
            str(base / "data"),
            "--hub-root",
            str(base / "hub"),
        ],
    )
    assert out.exit_code == 0, out.output
    shas = dict(re.findall(r"local hub: (\S+)@([0-9a-f]{40})", out.output))
    return {"root": base / "hub", "shas": shas, "output": out.output}


@pytest.mark.slow
def test_prepare_shows_the_published_model_recognising_the_sample_photos(
    seeded: dict[str, object],
) -> None:
    """`hubtune data prepare fashion-mnist` classifies the sample photos with the published model."""
    output = str(seeded["output"])
    assert "kept 70,000 of 70,000 images" in output
    assert re.search(r"china\.jpg: palace 0\.2\d\d", output), output
    assert re.search(r"flower\.jpg: daisy 0\.3\d\d", output), output


@pytest.mark.slow
def test_qc_feature_extraction_on_real_assets(seeded: dict[str, object], tmp_path: Path) -> None:
    """The converted EfficientNet-Lite0 at the pinned SHA, frozen, on real Fashion-MNIST rows."""
    from hubtune.vision_assets import EFFICIENTNET_LITE0_REPO, FASHION_MNIST_REPO

    pinned = yaml.safe_load((ROOT / "recipes" / "qc-feature-extraction.yaml").read_text())
    shas = seeded["shas"]
    assert isinstance(shas, dict)
    assert shas[EFFICIENTNET_LITE0_REPO] == pinned["model"]["revision"]
    assert shas[FASHION_MNIST_REPO] == pinned["data"]["revision"]
    recipe = load_recipe(
        ROOT / "recipes" / "qc-feature-extraction.yaml",
        overrides=[
            f"hub.local_root={seeded['root']}",
            f"output_dir={tmp_path / 'runs'}",
            "model.image_size=64",
            "data.limit.train=300",
            "data.limit.validation=100",
            "data.limit.test=300",
            "train.epochs=30",
            "train.log_with=[]",
        ],
    )
    result = run_recipe(recipe)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["base_model"]["sha"] == pinned["model"]["revision"]
    assert run["method"]["trainable_parameters"] == 1280 * 10 + 10
    assert run["feature_cache"]["used"] is True
    # ImageNet features transfer: 300 labels of 10 classes, far above the 0.1 baseline
    assert result.metrics["test"]["accuracy"] > 0.6
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    assert {c["label"] for c in audit["fairness"]["per_class"]} == set(run["data"]["label_names"])
    assert any(c["check"] == "class recall" for c in audit["verdict"]["checks"])


@pytest.mark.slow
def test_qc_dp_recipe_refuses_trainable_batchnorm_on_real_assets(
    seeded: dict[str, object], tmp_path: Path
) -> None:
    recipe = load_recipe(
        ROOT / "recipes" / "qc-feature-extraction-dp.yaml",
        overrides=[
            f"hub.local_root={seeded['root']}",
            f"output_dir={tmp_path / 'runs'}",
            "model.image_size=32",
            "data.limit.train=1000",
            "method.unfreeze_top_k=1",
            "train.log_with=[]",
        ],
    )
    with pytest.raises(RunError, match="method.batchnorm: frozen") as caught:
        run_recipe(recipe)
    assert "method.batchnorm: groupnorm" in str(caught.value)
