"""Shared fixtures: no network, no user tokens, tiny models built from configs, small data."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# huggingface_hub, transformers and datasets read these once, at import: set them before any
# test module imports them, so nothing in the suite can reach a hub or a user's cache or token.
_HF_HOME = Path(tempfile.mkdtemp(prefix="hubtune-tests-hf-"))
os.environ.update(
    {
        "HF_HOME": str(_HF_HOME),
        "HF_HUB_CACHE": str(_HF_HOME / "hub"),
        "HF_DATASETS_CACHE": str(_HF_HOME / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT"):
    os.environ.pop(_name, None)

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tests.netguard import guarded  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Block every non-loopback connection and isolate caches and credentials.

    Libraries often swallow connection errors (telemetry, update checks), so attempts are also
    recorded, and a test that made one fails even if the code under test carried on.
    """
    attempts: list[str] = []
    guarded_connect, guarded_getaddrinfo = guarded(attempts)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setenv("HUBTUNE_CACHE_DIR", str(tmp_path / "hubtune-cache"))
    monkeypatch.setenv("HUBTUNE_DATA_DIR", str(tmp_path / "hubtune-data"))
    monkeypatch.setenv("HUBTUNE_PROGRESS", "0")
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


# --------------------------------------------------------------------------- tiny models

WORDS_POS = ["good", "great", "lovely", "fine", "happy", "nice", "superb", "kind"]
WORDS_NEG = ["bad", "awful", "poor", "sad", "ugly", "nasty", "rude", "grim"]
WORDS_FILL = [
    "the",
    "a",
    "movie",
    "day",
    "food",
    "was",
    "is",
    "very",
    "so",
    "quite",
    "really",
    "it",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _save_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    words = SPECIALS + WORDS_POS + WORDS_NEG + WORDS_FILL
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(
        folder
    )


def make_tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT backbone (no classification head) with a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=len(SPECIALS + WORDS_POS + WORDS_NEG + WORDS_FILL),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,  # larger random weights: informative features without pretraining
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder)
    return folder


def make_tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 GPT-2 (Conv1D projections) with the same tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        vocab_size=len(SPECIALS + WORDS_POS + WORDS_NEG + WORDS_FILL),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=0,
    )
    GPT2Model(config).save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder)
    return folder


LM_SPECIALS = ["<|endoftext|>", "<unk>"]


def _save_lm_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with GPT-2's end-of-text token as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = LM_SPECIALS + WORDS_POS + WORDS_NEG + WORDS_FILL + list("0123456789") + ["my", "number"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
    ).save_pretrained(folder)


LM_VOCAB = len(LM_SPECIALS + WORDS_POS + WORDS_NEG + WORDS_FILL) + 12


def make_tiny_causal_lm(folder: Path, arch: str = "gpt2", *, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 causal LM: GPT-2 (Conv1D, tied embeddings) or LLaMA (RMSNorm,
    rotary embeddings, untied output layer), with a word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "gpt2":
        model: Any = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=LM_VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=LM_VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
                tie_word_embeddings=False,
            )
        )
    model.save_pretrained(folder, safe_serialization=True)
    _save_lm_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2-lm"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama-lm"), "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def make_tiny_vit(folder: Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """A 2-layer, hidden-32 ViT backbone (patch 4) with a ViT image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def calibrate_batchnorm(model: object, image_size: int, *, seed: int = 0) -> None:
    """Give a random model's BatchNorm layers the statistics of its own activations.

    Pretrained models have running statistics matched to their weights; a freshly initialised
    one has mean 0 / variance 1 everywhere, which shrinks its activations to nothing in eval
    mode. A few forward passes in training mode with a cumulative average fix that.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # type: ignore[attr-defined]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(seed)
    model.train()  # type: ignore[attr-defined]
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(16, 3, image_size, image_size, generator=generator) * 2 - 1)  # type: ignore[operator]
    for m in norms:
        m.momentum = 0.1
    model.eval()  # type: ignore[attr-defined]


def make_tiny_resnet(folder: Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """A 2-stage transformers ResNet (BatchNorm everywhere) with its ConvNeXt-style processor."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_channels=3
    )
    model = ResNetModel(config)
    calibrate_batchnorm(model, image_size, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0).save_pretrained(folder)
    return folder


def make_tiny_timm(folder: Path, architecture: str, *, seed: int = 0, image_size: int = 16) -> Path:
    """A timm test architecture (test_efficientnet, test_resnet, test_vit...) as a TimmWrapper folder."""
    import timm
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(timm.create_model(architecture).pretrained_cfg)
    cfg = {k: v for k, v in cfg.items() if k not in ("url", "hf_hub_id")}
    cfg.update({"input_size": (3, image_size, image_size), "crop_pct": 1.0})
    model_args = {"img_size": image_size} if architecture.startswith("test_vit") else None
    config = TimmWrapperConfig(
        architecture=architecture,
        pretrained_cfg=cfg,
        num_labels=5,
        model_args=model_args,
    )
    model = TimmWrapperForImageClassification(config)
    # timm zero-initialises the last norm of residual blocks; pretrained ones are not zero.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("bn3.weight") and not param.any():
                param.fill_(1.0)
    calibrate_batchnorm(model.timm_model, image_size, seed=seed)
    # transformers keeps a timm model's preprocessing in config.json (pretrained_cfg): saving
    # the model saves it; TimmWrapperImageProcessor.save_pretrained is deliberately a no-op.
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_digits_folder(
    folder: Path, *, per_class: int = 30, classes: int = 3, size: int = 16, sensitive: bool = True
) -> Path:
    """scikit-learn's handwritten digits as an image folder (train/ and test/, class sub-folders).

    ``metadata.csv`` adds a synthetic ``site`` column (for the audit), a function of the row,
    never of the label.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for digit in range(classes):
        images = digits.images[digits.target == digit][: per_class * 2]
        for i, pixels in enumerate(images):
            split = "train" if i % 4 else "test"
            target = folder / split / f"digit{digit}"
            target.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L")
            image.resize((size, size), Image.NEAREST).save(target / f"{i:03d}.png")
            rows[split].append(f"digit{digit}/{i:03d}.png,{'site' + 'AB'[i % 2]}")
    if sensitive:
        for split, lines in rows.items():
            (folder / split / "metadata.csv").write_text(
                "file_name,site\n" + "\n".join(lines) + "\n"
            )
    return folder


def image_recipe_dict(model_dir: Path, data_dir: Path, out_dir: Path, **method: object) -> dict:
    """A small image-classification recipe as a dict."""
    return {
        "name": "tiny-vision",
        "seed": 0,
        "output_dir": str(out_dir),
        "model": {"id": str(model_dir), "task": "image-classification"},
        "data": {
            "source": str(data_dir),
            "columns": {"sensitive": ["site"]},
        },
        "method": {"name": "freeze", **method},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "log_with": []},
        "audit": {"policy": "default"},
    }


def make_sentiment_frame(n: int = 240, *, seed: int = 0) -> pd.DataFrame:
    """Learnable synthetic reviews: the label follows the sentiment words; a group column rides along."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = WORDS_POS if label else WORDS_NEG
        text = (
            " ".join(rng.choice(WORDS_FILL) for _ in range(3))
            + " "
            + " ".join(rng.choice(words) for _ in range(2))
        )
        rows.append(
            {"text": text, "label": "pos" if label else "neg", "group": rng.choice(["a", "b", "c"])}
        )
    return pd.DataFrame(rows)


@pytest.fixture()
def sentiment_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_sentiment_frame().to_csv(path, index=False)
    return path


def recipe_dict(model_dir: Path, data_path: Path, out_dir: Path, **method: object) -> dict:
    """A small recipe as a dict (tests tweak it, then validate with Recipe.model_validate)."""
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out_dir),
        "model": {"id": str(model_dir), "max_length": 32},
        "data": {
            "source": str(data_path),
            "columns": {"text": "text", "label": "label", "sensitive": ["group"]},
            "labels": ["neg", "pos"],
        },
        "method": method or {"name": "freeze"},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "log_with": []},
    }


def make_fake_run(
    run_dir: Path,
    predictions: pd.DataFrame,
    *,
    label_names: list[str],
    sensitive: list[str],
    privacy: dict | None = None,
    membership: pd.DataFrame | None = None,
) -> Path:
    """A finished run directory as `hubtune run` leaves it, from given test predictions.

    For audit tests that need exact control over predictions and groups without training.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir.mkdir(parents=True, exist_ok=True)
    frame = predictions.copy()
    if "row_id" not in frame:
        frame.insert(0, "row_id", [f"test:{i}" for i in range(len(frame))])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {"label_names": label_names, "sensitive_columns": sensitive}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"hubtune": json.dumps(meta).encode()}
    )
    pq.write_table(table, run_dir / "predictions.parquet")
    if membership is not None:
        membership.to_parquet(run_dir / "membership_scores.parquet", index=False)
    if privacy is not None:
        (run_dir / "privacy.json").write_text(json.dumps(privacy))
    (run_dir / "recipe.resolved.yaml").write_text(
        f"name: {run_dir.name}\ndescription: a fake run for audit tests\naudit:\n  policy: default\n"
    )
    accuracy = float((frame["label_id"] == frame["prediction_id"]).mean())
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "name": run_dir.name,
                "status": "completed",
                "base_model": {"spec": "tiny/model", "sha": "0" * 40},
                "method": {"method": "freeze"},
                "data": {"label_names": label_names},
                "test": {"accuracy": accuracy},
            }
        )
    )
    return run_dir


CHROMIUM = os.environ.get("HUBTUNE_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium, headless as root, with its background traffic (which this machine's closed
# network refuses) switched off. Playwright never downloads a browser here.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator:  # type: ignore[type-arg]
    """A headless Chromium through Playwright; fails (not skips) when the browser is missing."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: run `bash scripts/setup.sh --with-browser` "
            "(installs Debian's chromium) or set HUBTUNE_CHROMIUM"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def synthetic_predictions(
    sizes: dict[str, int], accuracy: dict[str, float], seed: int = 0
) -> pd.DataFrame:
    """Binary test predictions with a given size and accuracy per group (column ``group``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for group, n in sizes.items():
        labels = rng.integers(0, 2, n)
        right = rng.random(n) < accuracy[group]
        predictions = np.where(right, labels, 1 - labels)
        rows += [
            {"label_id": int(y), "prediction_id": int(p), "group": group}
            for y, p in zip(labels, predictions, strict=True)
        ]
    return pd.DataFrame(rows)
