"""The real offline vision assets: EfficientNet-Lite0 converted for timm/transformers, and
Fashion-MNIST from Debian's dataset-fashion-mnist, both seeded to the local Hub endpoint."""

from __future__ import annotations

import gzip
import json
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hubtune import prepare as prep
from hubtune import vision_assets as va
from hubtune.prepare import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    IdxFormatError,
    ImagePrepareReport,
    prepare,
    prepare_fashion_mnist,
    read_idx,
)
from hubtune.vision_assets import (
    ARCHITECTURE,
    EFFICIENTNET_LITE0_REPO,
    FASHION_MNIST_REPO,
    ConversionError,
    check_sample_images,
    convert_efficientnet_lite0,
    load_source_state_dict,
    map_state_dict,
    reference_timm_model,
    verify_sample_predictions,
)

MODEL_FILES = ["README.md", "config.json", "model.safetensors"]
# What the correct conversion predicts (see SAMPLE_IMAGE_CLASSES in hubtune.vision_assets).
CHINA_TOP5 = ["palace", "bell cote, bell cot", "monastery", "lakeside, lakeshore", "boathouse"]
FLOWER_TOP1 = "daisy"

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=(
        f"{FASHION_MNIST_DIR} is absent: Debian's dataset-fashion-mnist is not installed "
        "(apt-get install dataset-fashion-mnist, or bash scripts/setup.sh --with-vision-data)"
    ),
)


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------- tensor mapping


@pytest.fixture(scope="module")
def source_and_target() -> tuple[OrderedDict[str, torch.Tensor], dict[str, torch.Tensor]]:
    import timm

    return load_source_state_dict(), timm.create_model(ARCHITECTURE).state_dict()


def test_mapping_pairs_every_tensor_in_order(source_and_target) -> None:
    source, target = source_and_target
    assert len(source) == len(target) == 296
    mapped = map_state_dict(source, target)
    assert list(mapped) == list(target)
    for (src_key, value), (dst_key, converted) in zip(source.items(), mapped.items(), strict=True):
        assert src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        assert torch.equal(value, converted)
    assert next(iter(source)) == "_conv_stem.weight" and next(iter(mapped)) == "conv_stem.weight"
    assert list(source)[-1] == "_fc.bias" and list(mapped)[-1] == "classifier.bias"


def test_mapping_refuses_a_shape_mismatch(source_and_target) -> None:
    source, target = source_and_target
    broken = OrderedDict(source)
    broken["_blocks.3._project_conv.weight"] = torch.zeros(7, 7, 1, 1)
    with pytest.raises(ConversionError, match=r"_blocks\.3\._project_conv\.weight.*shape mismatch"):
        map_state_dict(broken, target)


def test_mapping_refuses_a_kind_mismatch(source_and_target) -> None:
    source, target = source_and_target
    # _bn0.weight and _bn0.bias have the same shape: only the kind check can tell them apart.
    items = list(source.items())
    keys = [k for k, _ in items]
    i, j = keys.index("_bn0.weight"), keys.index("_bn0.bias")
    items[i], items[j] = items[j], items[i]
    with pytest.raises(ConversionError, match=r"_bn0\.bias.*bn1\.weight.*kind mismatch"):
        map_state_dict(OrderedDict(items), target)
    # running_mean and running_var likewise.
    items = list(source.items())
    i, j = keys.index("_bn0.running_mean"), keys.index("_bn0.running_var")
    items[i], items[j] = items[j], items[i]
    with pytest.raises(ConversionError, match="running_var vs running_mean"):
        map_state_dict(OrderedDict(items), target)


def test_mapping_refuses_a_missing_tensor_or_dtype(source_and_target) -> None:
    source, target = source_and_target
    shorter = OrderedDict(list(source.items())[:-1])
    with pytest.raises(ConversionError, match="295 tensors.*296"):
        map_state_dict(shorter, target)
    wrong_dtype = OrderedDict(source)
    wrong_dtype["_fc.bias"] = wrong_dtype["_fc.bias"].double()
    with pytest.raises(ConversionError, match="dtype mismatch"):
        map_state_dict(wrong_dtype, target)


def test_sample_prediction_check_refuses_wrong_or_shifted_predictions() -> None:
    good = {
        "china.jpg": [("palace", 0.298), ("bell cote, bell cot", 0.17)],
        "flower.jpg": [("daisy", 0.323), ("bee", 0.059)],
    }
    verify_sample_predictions(good)
    with pytest.raises(ConversionError, match=r"china\.jpg: none of"):
        verify_sample_predictions({**good, "china.jpg": [("lakeside, lakeshore", 0.4)]})
    with pytest.raises(ConversionError, match=r"flower\.jpg: none of"):
        verify_sample_predictions({**good, "flower.jpg": [("lampshade, lamp shade", 0.2)]})
    # Right classes, wrong probability: what timm's PyTorch-padding efficientnet_lite0 gives.
    with pytest.raises(ConversionError, match=r"china\.jpg: expected top-1 'palace'"):
        verify_sample_predictions({**good, "china.jpg": [("palace", 0.357)]})
    with pytest.raises(ConversionError, match=r"flower\.jpg"):
        verify_sample_predictions({**good, "flower.jpg": [("bee", 0.3), ("daisy", 0.2)]})


# ---------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> va.Conversion:
    return convert_efficientnet_lite0(tmp_path_factory.mktemp("convert") / "efficientnet-lite0")


@pytest.mark.slow
def test_transformers_logits_equal_timm_reference(converted: va.Conversion) -> None:
    from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification

    model = AutoModelForImageClassification.from_pretrained(
        converted.model_dir, local_files_only=True
    ).eval()
    assert isinstance(model, TimmWrapperForImageClassification)
    reference = reference_timm_model()
    batch = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=batch).logits
        theirs = reference(batch)
    assert ours.shape == (3, 1000)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sample_images_get_the_expected_classes(converted: va.Conversion) -> None:
    predictions = check_sample_images(converted.model_dir)
    assert predictions == converted.predictions
    china = [label for label, _ in predictions["china.jpg"]]
    flower = [label for label, _ in predictions["flower.jpg"]]
    assert china == CHINA_TOP5
    assert flower[0] == FLOWER_TOP1 and "bee" in flower
    assert abs(predictions["china.jpg"][0][1] - 0.298) < 0.01
    assert abs(predictions["flower.jpg"][0][1] - 0.323) < 0.01


@pytest.mark.slow
def test_folder_is_laid_out_like_a_timm_hub_repo(converted: va.Conversion) -> None:
    import timm
    from safetensors import safe_open
    from transformers import AutoConfig, AutoImageProcessor

    folder = converted.model_dir
    assert sorted(p.name for p in folder.iterdir()) == MODEL_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCHITECTURE
    assert (config["num_classes"], config["num_features"]) == (1000, 1280)
    assert len(config["label_names"]) == 1000
    assert config["label_names"][698] == "palace" and config["label_names"][985] == "daisy"
    cfg = config["pretrained_cfg"]
    assert not {"url", "hf_hub_id", "license", "architecture"} & set(cfg)
    assert (cfg["mean"], cfg["std"], cfg["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    assert "model_args" not in config
    # transformers picks TimmWrapper from pretrained_cfg (timm configs carry no model_type).
    auto = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert type(auto).__name__ == "TimmWrapperConfig" and auto.id2label[698] == "palace"
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    assert processor.data_config["crop_pct"] == 0.875
    # timm's own names, no transformers prefix, and timm loads the file natively too.
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    reference = reference_timm_model()
    assert keys == set(reference.state_dict())
    native = timm.create_model(
        ARCHITECTURE,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(folder / "model.safetensors")},
    ).eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(native.state_dict()[key], value), key
    # The model card: YAML front matter with the honest licence, and where the weights came from.
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm"
    assert "image-classification" in front["tags"]
    assert front["license"] == "other" and front["license_name"]
    assert va.SOURCE_SHA256 in card and va.SOURCE_FILENAME in card
    assert "License: UNKNOWN" in card and "Apache" in card


@pytest.mark.slow
def test_conversion_is_deterministic(converted: va.Conversion, tmp_path: Path) -> None:
    again = convert_efficientnet_lite0(tmp_path / "again")
    assert _file_bytes(again.model_dir) == _file_bytes(converted.model_dir)
    assert again.files == converted.files
    # Converting over an existing folder replaces it whole, with the same bytes.
    (tmp_path / "again" / "stale.txt").write_text("left over")
    convert_efficientnet_lite0(tmp_path / "again")
    assert _file_bytes(tmp_path / "again") == _file_bytes(converted.model_dir)


@pytest.mark.slow
def test_a_wrong_conversion_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Classifier rows out of order (a label mapping mistake) pass every shape check."""
    real = va.reference_timm_model

    def scrambled(state_dict=None):  # type: ignore[no-untyped-def]
        model = real(state_dict)
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight[order])
            model.classifier.bias.copy_(model.classifier.bias[order])
        return model

    monkeypatch.setattr(va, "reference_timm_model", scrambled)
    target = tmp_path / "out" / "efficientnet-lite0"
    with pytest.raises(ConversionError, match=r"misclassifies.*china\.jpg"):
        convert_efficientnet_lite0(target)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left either


@pytest.mark.slow
def test_the_pytorch_style_architecture_is_caught(converted: va.Conversion, tmp_path: Path) -> None:
    """timm's efficientnet_lite0 (symmetric padding, BN eps 1e-5) takes the same tensors and
    still says palace and daisy; the top-1 probability check catches it."""
    import shutil

    folder = tmp_path / "pytorch-style"
    shutil.copytree(converted.model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "efficientnet_lite0"
    (folder / "config.json").write_text(json.dumps(config))
    predictions = check_sample_images(folder)
    assert predictions["china.jpg"][0][0] == "palace"
    with pytest.raises(ConversionError, match="expected top-1"):
        verify_sample_predictions(predictions)


def test_a_foreign_source_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, other)
    monkeypatch.setattr(va, "source_weights_path", lambda: other)
    with pytest.raises(ConversionError, match="sha256"):
        convert_efficientnet_lite0(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- IDX reader


def _idx(array: np.ndarray, *, magic: bytes | None = None) -> bytes:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def test_idx_reader_reads_a_valid_file(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 9], dtype=np.uint8)
    got = read_idx(_write_gz(tmp_path / "images.gz", _idx(images)), ndim=3)
    assert got.shape == (3, 4, 5) and got.dtype == np.uint8 and np.array_equal(got, images)
    assert np.array_equal(read_idx(_write_gz(tmp_path / "labels.gz", _idx(labels)), ndim=1), labels)
    # Uncompressed files are read as well (gzip is detected from the content).
    (tmp_path / "plain").write_bytes(_idx(labels))
    assert np.array_equal(read_idx(tmp_path / "plain"), labels)


def test_idx_reader_refuses_a_wrong_magic_number(tmp_path: Path) -> None:
    labels = np.zeros(4, dtype=np.uint8)
    bad = _write_gz(tmp_path / "bad.gz", _idx(labels, magic=b"\x12\x34\x08\x01"))
    with pytest.raises(IdxFormatError, match="bad IDX magic number 0x12340801"):
        read_idx(bad, ndim=1)
    # A labels file (magic 0x00000801) where images (0x00000803) are expected.
    labels_file = _write_gz(tmp_path / "labels.gz", _idx(labels))
    with pytest.raises(IdxFormatError, match=r"0x00000801 says 1 dimension\(s\), expected 3"):
        read_idx(labels_file, ndim=3)
    # int32 data where unsigned bytes are expected.
    ints = _write_gz(tmp_path / "ints.gz", _idx(labels.astype(">i4"), magic=b"\0\0\x0c\x01"))
    with pytest.raises(IdxFormatError, match="type code 0x0c, expected 0x08"):
        read_idx(ints, ndim=1)


def test_idx_reader_refuses_truncated_files(tmp_path: Path) -> None:
    data = _idx(np.ones((10, 28, 28), dtype=np.uint8))
    short = _write_gz(tmp_path / "short.gz", data[:-100])
    with pytest.raises(IdxFormatError, match=r"truncated.*10x28x28"):
        read_idx(short, ndim=3)
    long = _write_gz(tmp_path / "long.gz", data + b"\0")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_idx(long, ndim=3)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(data, mtime=0)[:-20])  # the gzip stream itself cut short
    with pytest.raises(IdxFormatError, match="not a valid gzip file"):
        read_idx(cut, ndim=3)
    header_only = _write_gz(tmp_path / "header.gz", data[:6])
    with pytest.raises(IdxFormatError, match="truncated IDX header"):
        read_idx(header_only, ndim=3)


# ---------------------------------------------------------------------------- Fashion-MNIST


def _fake_source(folder: Path, *, train: int, test: int, bad_label: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        if bad_label:
            labels[-1] = 10
        _write_gz(
            folder / f"{prefix}-images-idx3-ubyte.gz", _idx(np.zeros((count, 28, 28), np.uint8))
        )
        _write_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", _idx(labels))
    return folder


def test_missing_source_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError) as caught:
        prepare_fashion_mnist(output_dir=tmp_path / "out", source_dir=tmp_path / "nowhere")
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "bash scripts/setup.sh --with-vision-data" in message
    # The same through prepare() and the default location.
    monkeypatch.setattr(prep, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion-mnist", output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "prepare.json").exists()


def test_wrong_counts_and_labels_are_refused(tmp_path: Path) -> None:
    small = _fake_source(tmp_path / "small", train=30, test=10)
    with pytest.raises(IdxFormatError, match=r"train has 30 images and 30 labels, expected 60,000"):
        prepare_fashion_mnist(output_dir=tmp_path / "out", source_dir=small)
    bad = _fake_source(tmp_path / "bad", train=60_000, test=10_000, bad_label=True)
    with pytest.raises(IdxFormatError, match="label 10 is out of range 0-9"):
        prepare_fashion_mnist(output_dir=tmp_path / "out", source_dir=bad)
    corrupt = _fake_source(tmp_path / "corrupt", train=30, test=10)
    path = corrupt / "t10k-labels-idx1-ubyte.gz"
    _write_gz(path, b"\0\0\x08\x07" + gzip.decompress(path.read_bytes())[4:])
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip, not idx")
    with pytest.raises(IdxFormatError, match="bad IDX magic number"):
        prepare_fashion_mnist(output_dir=tmp_path / "out", source_dir=corrupt)
    assert not (tmp_path / "out" / "prepare.json").exists()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> ImagePrepareReport:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is absent (apt-get install dataset-fashion-mnist)")
    return prepare_fashion_mnist(output_dir=tmp_path_factory.mktemp("fashion-mnist"))


@needs_fashion_mnist
@pytest.mark.slow
def test_fashion_mnist_counts_and_report(fashion: ImagePrepareReport) -> None:
    assert fashion.split_counts == {"train": 60_000, "test": 10_000}
    assert fashion.rows_read == fashion.rows_kept == 70_000
    assert fashion.label_names == list(FASHION_MNIST_LABELS) and len(fashion.label_names) == 10
    assert fashion.label_counts["train"] == dict.fromkeys(FASHION_MNIST_LABELS, 6_000)
    assert fashion.label_counts["test"] == dict.fromkeys(FASHION_MNIST_LABELS, 1_000)
    assert fashion.image_shape == [28, 28]
    assert [s.split(" ")[0] for s in fashion.source_files] == [
        "fashion-mnist/train-images-idx3-ubyte.gz",
        "fashion-mnist/train-labels-idx1-ubyte.gz",
        "fashion-mnist/t10k-images-idx3-ubyte.gz",
        "fashion-mnist/t10k-labels-idx1-ubyte.gz",
    ]
    recorded = json.loads((fashion.output_dir / "prepare.json").read_text())
    assert recorded["schema_version"] == 1
    assert {k: v for k, v in recorded.items() if k != "schema_version"} == fashion.to_dict()
    for file, digest in fashion.output_files.items():
        assert va._sha256_file(fashion.output_dir / file) == digest
    for entry in fashion.source_files:
        relative, digest = entry.split(" sha256=")
        assert va._sha256_file(FASHION_MNIST_DIR.parent / relative) == digest
    assert "kept 70,000 of 70,000 images" in fashion.summary()


@needs_fashion_mnist
@pytest.mark.slow
def test_fashion_mnist_loads_with_hf_features(fashion: ImagePrepareReport, tmp_path: Path) -> None:
    import datasets

    loaded = datasets.load_dataset(
        "parquet",
        data_files={
            "train": str(fashion.output_dir / "train.parquet"),
            "test": str(fashion.output_dir / "test.parquet"),
        },
        cache_dir=str(tmp_path / "cache"),
    )
    assert {name: split.num_rows for name, split in loaded.items()} == {
        "train": 60_000,
        "test": 10_000,
    }
    features = loaded["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel)
    assert features["label"].names == list(FASHION_MNIST_LABELS)
    # The PNGs decode to exactly the IDX pixels, in the source order.
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz", ndim=1)
    for index in (0, 1, 9_999):
        row = loaded["test"][index]
        assert row["image"].mode == "L"
        assert np.array_equal(np.asarray(row["image"]), images[index])
        assert row["label"] == int(labels[index])


@needs_fashion_mnist
@pytest.mark.slow
def test_fashion_mnist_rerun_is_idempotent_and_deterministic(
    fashion: ImagePrepareReport, tmp_path: Path
) -> None:
    files = [fashion.output_dir / f for f in ("train.parquet", "test.parquet", "prepare.json")]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert prepare("fashion-mnist", output_dir=fashion.output_dir) == fashion
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing rewritten
    rebuilt = prepare_fashion_mnist(output_dir=tmp_path / "again", force=True)
    assert rebuilt.output_files == fashion.output_files
    for name in ("train.parquet", "test.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (fashion.output_dir / name).read_bytes()
    # A damaged output is detected and rebuilt.
    (tmp_path / "again" / "test.parquet").write_bytes(b"damaged")
    assert prepare_fashion_mnist(output_dir=tmp_path / "again") == rebuilt
    assert (
        va._sha256_file(tmp_path / "again" / "test.parquet") == fashion.output_files["test.parquet"]
    )


# ---------------------------------------------------------------------------- local Hub


@pytest.mark.slow
def test_model_seeding_gives_the_same_sha_on_fresh_roots(tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageClassification

    from hubtune.hub import hub_endpoint

    first = va.seed_efficientnet_lite0(root=tmp_path / "hub1")
    assert va.seed_efficientnet_lite0(root=tmp_path / "hub2") == first
    # Again on the first root: the head already holds these files, so no new commit.
    assert va.seed_efficientnet_lite0(root=tmp_path / "hub1") == first
    with hub_endpoint("local", local_root=tmp_path / "hub1") as url:
        commits = HfApi(endpoint=url).list_repo_commits(EFFICIENTNET_LITE0_REPO)
        assert commits[0].commit_id == first
        assert sum(c.title == va._MODEL_MESSAGE for c in commits) == 1
        model = AutoModelForImageClassification.from_pretrained(
            EFFICIENTNET_LITE0_REPO, revision=first, cache_dir=tmp_path / "download"
        )
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert model.config.id2label[698] == "palace"


@needs_fashion_mnist
@pytest.mark.slow
def test_data_seeding_gives_the_same_sha_on_fresh_roots(
    fashion: ImagePrepareReport, tmp_path: Path
) -> None:
    import datasets
    from huggingface_hub import HfApi, hf_hub_download

    from hubtune.hub import hub_endpoint

    first = va.seed_fashion_mnist(root=tmp_path / "hub1", data_dir=fashion.output_dir)
    assert va.seed_fashion_mnist(root=tmp_path / "hub2", data_dir=fashion.output_dir) == first
    assert va.seed_fashion_mnist(root=tmp_path / "hub1", data_dir=fashion.output_dir) == first
    with hub_endpoint("local", local_root=tmp_path / "hub1") as url:
        api = HfApi(endpoint=url)
        files = sorted(api.list_repo_files(FASHION_MNIST_REPO, repo_type="dataset", revision=first))
        assert [f for f in files if f != ".gitattributes"] == [
            "README.md",
            "prepare.json",
            "test.parquet",
            "train.parquet",
        ]
        report = json.loads(
            Path(
                hf_hub_download(
                    FASHION_MNIST_REPO,
                    "prepare.json",
                    repo_type="dataset",
                    revision=first,
                    cache_dir=tmp_path / "download",
                )
            ).read_text()
        )
        assert "output_dir" not in report and str(tmp_path) not in json.dumps(report)
        card = Path(
            hf_hub_download(
                FASHION_MNIST_REPO,
                "README.md",
                repo_type="dataset",
                revision=first,
                cache_dir=tmp_path / "download",
            )
        ).read_text()
        assert yaml.safe_load(card.split("---")[1])["license"] == "mit"
        loaded = datasets.load_dataset(
            FASHION_MNIST_REPO, revision=first, cache_dir=str(tmp_path / "datasets")
        )
    assert loaded["test"].num_rows == 10_000
    assert loaded["train"].features["label"].names == list(FASHION_MNIST_LABELS)
