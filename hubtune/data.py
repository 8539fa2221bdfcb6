"""Loading, cleaning and splitting labelled text or images through ``datasets``.

Text comes from csv/jsonl/parquet files or Hub data sets; images from the same (an
``Image`` column) or from an image folder (one sub-folder per class, optionally under
``train/``, ``validation/``, ``test/``, with an optional ``metadata.csv`` of extra columns
such as sensitive features). Images are kept as their encoded bytes; they are decoded, one
at a time, when the model needs them.

Nothing is dropped silently: every removed row is counted by split and reason, and those
counts go to the log and to ``run.json``. Sensitive columns are carried alongside each row
(for the audits) but are never part of the model input.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hubtune.recipe import DataSection

__all__ = [
    "DataError",
    "IMAGE_SUFFIXES",
    "PreparedData",
    "decode_image",
    "load_data",
    "make_canaries",
    "SPLITS",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


class DataError(ValueError):
    """The data does not fit the recipe; the message says what and how to fix it."""


@dataclass
class PreparedData:
    """Clean train/validation/test frames with integer labels."""

    splits: dict[str, pd.DataFrame]
    label_names: list[str]
    # The model's input columns: ["text"] (+ "text_pair"), or ["image"] (encoded image bytes).
    text_columns: list[str]
    sensitive_columns: list[str]
    rows_read: dict[str, int]
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    fingerprint: str = ""
    # Audit canaries (random text, random label), all of them, with an ``included`` column;
    # the included ones are also in ``splits["train"]``. None without canaries.
    canaries: pd.DataFrame | None = None
    # Where the rows came from (see _source_info), and which split of the source each of ours
    # was read from (None: carved from the training data), so the model card can say so.
    source: dict[str, Any] = field(default_factory=dict)
    source_splits: dict[str, str | None] = field(default_factory=dict)

    @property
    def rows_kept(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.splits.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "canaries": None
            if self.canaries is None
            else {
                "count": len(self.canaries),
                "in_training": int(self.canaries["included"].sum()),
            },
            "label_names": self.label_names,
            "source": self.source,
            "source_splits": self.source_splits,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": self.dropped,
            "label_counts": {
                name: {
                    self.label_names[k]: int(v) for k, v in sorted(Counter(frame["label"]).items())
                }
                for name, frame in self.splits.items()
            },
        }


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _is_image_folder(source: Path) -> bool:
    data_files = [
        p
        for p in source.iterdir()
        if p.is_file() and p.suffix.lower() in _FORMATS and p.name != "prepare.json"
    ]
    return not data_files and any(p.is_dir() and _image_files(p) for p in source.iterdir())


def _read_image_split(folder: Path, label_col: str, image_col: str) -> pd.DataFrame:
    """One split of an image folder: class sub-folders, plus optional ``metadata.csv``."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for class_dir in classes:
        for path in _image_files(class_dir):
            rows.append(
                {
                    "file_name": path.relative_to(folder).as_posix(),
                    image_col: {"bytes": path.read_bytes(), "path": str(path)},
                    label_col: class_dir.name,
                }
            )
    frame = pd.DataFrame(rows, columns=["file_name", image_col, label_col])
    metadata = folder / "metadata.csv"
    if metadata.exists():
        extra = pd.read_csv(metadata, dtype=str, keep_default_na=False, na_values=[""])
        if "file_name" not in extra.columns:
            raise DataError(
                f"{metadata}: needs a file_name column (image path relative to {folder})"
            )
        unknown = sorted(set(extra["file_name"]) - set(frame["file_name"]))
        if unknown:
            raise DataError(
                f"{metadata}: {len(unknown)} file_name value(s) name no image in a class folder, e.g. "
                f"{unknown[:3]}; paths are relative to {folder}, like cat/001.png"
            )
        clash = sorted(set(extra.columns) & {image_col, label_col})
        if clash:
            raise DataError(f"{metadata}: column(s) {clash} clash with the image folder's own")
        frame = frame.merge(extra, on="file_name", how="left", validate="one_to_one")
    frame.attrs["classlabels"] = {label_col: [p.name for p in classes]}
    return frame


def _load_image_folder(source: Path, section: DataSection) -> dict[str, pd.DataFrame]:
    cols = section.columns
    split_dirs = {
        p.name: p
        for p in source.iterdir()
        if p.is_dir() and any(p.name in aliases for aliases in _SPLIT_ALIASES.values())
    }
    if not split_dirs:
        return {"train": _read_image_split(source, cols.label, cols.image)}
    others = sorted(p.name for p in source.iterdir() if p.is_dir() and p.name not in split_dirs)
    if others:
        raise DataError(
            f"data.source {section.source!r}: mixes split folders {sorted(split_dirs)} with other "
            f"folders {others}; put class folders inside train/ (validation/, test/)"
        )
    frames = {name: _read_image_split(p, cols.label, cols.image) for name, p in split_dirs.items()}
    # One class list for all splits: a class missing from test is still a class.
    names = sorted({n for f in frames.values() for n in f.attrs["classlabels"][cols.label]})
    for frame in frames.values():
        frame.attrs["classlabels"] = {cols.label: names}
    return frames


def _load_raw(section: DataSection) -> dict[str, pd.DataFrame]:
    """Read the source with ``datasets`` and return one pandas frame per source split."""
    import datasets

    # datasets pings a public bucket to count loads of its csv/json/parquet builders even for
    # local files; a tool for private data sends nothing anywhere it was not asked to.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    source = Path(section.source).expanduser()
    if source.is_file():
        fmt = _FORMATS.get(source.suffix.lower())
        if fmt is None:
            raise DataError(
                f"data.source {section.source!r}: unsupported file type; use csv, tsv, jsonl or parquet"
            )
        data_files: dict[str, Any] = {"train": str(source)}
    elif source.is_dir() and _is_image_folder(source):
        return _load_image_folder(source, section)
    elif source.is_dir():
        # prepare.json is the report `hubtune data prepare` writes beside its data files.
        files = sorted(
            p for p in source.iterdir() if p.suffix.lower() in _FORMATS and p.name != "prepare.json"
        )
        if not files:
            raise DataError(
                f"data.source {section.source!r}: no csv/tsv/jsonl/parquet files, and no image "
                "class folders, in this directory"
            )
        kinds = {_FORMATS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise DataError(
                f"data.source {section.source!r}: mixed file types {sorted(kinds)}; keep one format"
            )
        fmt = kinds.pop()
        data_files = {p.stem: str(p) for p in files} if len(files) > 1 else {"train": str(files[0])}
    elif (
        section.source.startswith((".", "/", "~"))
        or Path(section.source).suffix.lower() in _FORMATS
    ):
        from hubtune.prepare import PREPARERS

        hint = ""
        if source.parent.name in PREPARERS:  # e.g. data/redditbias/data.csv
            hint = f"; build it with: hubtune data prepare {source.parent.name}"
        raise DataError(f"data.source {section.source!r} does not exist{hint}")
    else:
        loaded = datasets.load_dataset(
            section.source, name=section.config_name, revision=section.revision
        )
        return _frames_with_classlabels(loaded)
    kwargs = {"delimiter": "\t"} if source.suffix.lower() == ".tsv" else {}
    loaded = datasets.load_dataset(fmt, data_files=data_files, **kwargs)
    return _frames_with_classlabels(loaded)


def _source_info(section: DataSection) -> dict[str, Any]:
    """Where the data came from, as the model card cites it.

    A Hub data set repo: its id, revision, the endpoint it was pulled from and the licence its
    card declares. Local files: the licence of a data set card (README.md) inside a source
    folder; a single file has no card of its own, so nothing is claimed for it.
    """
    from hubtune.hub import card_license, current_endpoint

    source = Path(section.source).expanduser()
    if source.is_dir():
        return {"kind": "local", "license": card_license(source)}
    if source.exists() or section.source.startswith((".", "/", "~")):
        return {"kind": "local"}
    return {
        "kind": "hub",
        "repo_id": section.source,
        "revision": section.revision,
        "endpoint": current_endpoint(),
        **_hub_dataset_card(section.source, section.revision),
    }


def _hub_dataset_card(repo_id: str, revision: str | None) -> dict[str, Any]:
    """The commit and card licence of a Hub data set (``{}`` when its card cannot be fetched)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from hubtune.hub import card_license

    try:
        card = Path(hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision))
    except RemoteEntryNotFoundError:
        return {"license": None}  # no card: the repo declares no licence
    except OSError as exc:  # offline without a cached card, or the endpoint refused
        logger.warning(
            "data: cannot read the card of %s (%s); its licence is not recorded", repo_id, exc
        )
        return {}
    return {"sha": card.parent.name, "license": card_license(card.parent)}


def _frames_with_classlabels(loaded: Any) -> dict[str, pd.DataFrame]:
    frames = {}
    for name, split in loaded.items():
        frame = split.to_pandas()
        frame.attrs["classlabels"] = {
            col: feat.names
            for col, feat in split.features.items()
            if hasattr(feat, "names") and hasattr(feat, "str2int")
        }
        frames[name] = frame
    return frames


def _pick_split(frames: dict[str, pd.DataFrame], wanted: str, section: DataSection) -> str | None:
    if section.splits is not None:
        name = section.splits.get(wanted)  # type: ignore[call-overload]
        if name is not None and name not in frames:
            raise DataError(
                f"data.splits.{wanted}: split {name!r} not in the source (it has {sorted(frames)})"
            )
        return name
    return next((alias for alias in _SPLIT_ALIASES[wanted] if alias in frames), None)


def _is_missing(series: pd.Series) -> pd.Series:
    return series.isna() | series.astype(str).str.strip().eq("")


def _image_bytes(value: Any, base: Path | None) -> bytes | None:
    """Encoded image bytes from what ``datasets`` stores: {bytes, path}, bytes, or a path."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.read_bytes() if path.is_file() else None


def decode_image(data: bytes) -> Any:
    """Encoded bytes -> an RGB PIL image (grayscale and palette images are converted)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _readable(data: bytes | None) -> str | None:
    """None if the bytes hold an image PIL can read, else why not (header check only)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if data is None:
        return "missing image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width < 1 or image.height < 1:
                return "unreadable image"
    except (UnidentifiedImageError, OSError, ValueError):
        return "unreadable image"
    return None


def _label_names(
    frames: dict[str, pd.DataFrame], label_col: str, section: DataSection
) -> list[str]:
    if section.labels is not None:
        return list(section.labels)
    for frame in frames.values():
        names = frame.attrs.get("classlabels", {}).get(label_col)
        if names:
            return list(names)
    values = pd.concat([f[label_col] for f in frames.values()]).dropna()
    distinct = sorted(
        {_label_key(v) for v in values},
        key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v),
    )
    if len(distinct) < 2:
        raise DataError(
            f"label column {label_col!r} has {len(distinct)} distinct value(s); a classifier needs at least 2"
        )
    return distinct


def _label_key(value: Any) -> str:
    """A label value as text; 1.0 (how pandas stores int labels with gaps) reads as 1."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _encode_labels(
    column: pd.Series, names: list[str], classlabels: list[str] | None, split: str
) -> pd.Series:
    """Map label values (names, or indices into ``names``) to class indices; refuse unknown ones."""
    lookup = {name: index for index, name in enumerate(names)}
    if classlabels is not None:  # a ClassLabel column stores indices into its own names
        lookup.update({str(i): lookup[n] for i, n in enumerate(classlabels) if n in lookup})
    elif not any(name.lstrip("-").isdigit() for name in names):
        lookup.update({str(i): i for i in range(len(names))})  # integer labels with given names
    keys = column.map(_label_key)
    encoded = keys.map(lookup)
    unknown = keys[encoded.isna()]
    if len(unknown):
        examples = Counter(unknown).most_common(5)
        shown = ", ".join(f"{value!r} ({count} rows)" for value, count in examples)
        raise DataError(
            f"{split} split: {len(unknown)} rows have label values that are not among the labels "
            f"{names}: {shown}. Fix the data, or list every label under data.labels "
            f"(names, or integer indices into that list)."
        )
    return encoded.astype("int64")


def _stratify(labels: pd.Series) -> pd.Series | None:
    counts = labels.value_counts()
    return labels if len(counts) > 1 and counts.min() >= 2 else None


def _carve(
    frame: pd.DataFrame, size: float | int, seed: int, stratify: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ``size`` rows (an int) or that fraction of them (a float), seeded."""
    from sklearn.model_selection import train_test_split

    if size <= 0 or len(frame) < 2:
        return frame, frame.iloc[0:0]
    keep, carved = train_test_split(
        frame,
        test_size=size,
        random_state=seed,
        stratify=_stratify(frame["label"]) if stratify else None,
    )
    return keep, carved


def _subset(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if len(frame) <= limit:
        return frame
    # An exact row count: a fraction (limit / n) is rounded up by scikit-learn and could keep
    # limit + 1 rows. Stratified unless one side would be smaller than the number of classes.
    dropped = len(frame) - limit
    stratify = min(limit, dropped) >= frame["label"].nunique()
    if limit <= dropped:
        _, kept = _carve(frame, int(limit), seed, stratify=stratify)
    else:
        kept, _ = _carve(frame, int(dropped), seed, stratify=stratify)
    return kept


def digest_bytes(series: pd.Series) -> pd.Series:
    """sha256 of each value (encoded images), so frames of bytes can be hashed quickly."""
    return series.map(lambda b: hashlib.sha256(b).hexdigest())


def _fingerprint(splits: dict[str, pd.DataFrame], columns: list[str]) -> str:
    digest = hashlib.sha256()
    for name in SPLITS:
        frame = splits[name][columns].copy()
        if "image" in frame:
            frame["image"] = digest_bytes(frame["image"])
        digest.update(name.encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def make_canaries(
    count: int,
    *,
    label_names: list[str],
    seed: int,
    pair: bool,
    sensitive: list[str],
    images: bool = False,
) -> pd.DataFrame:
    """Random-input, random-label examples for a one-run privacy audit.

    Each canary is a string of random letter-words (nothing any real comment resembles), or for
    images a 32x32 picture of uniform random noise, with a uniformly random label, and is put
    into the training set with probability 1/2 (``included``), as Steinke, Nasr & Jagielski
    (2023) require.
    """
    rng = np.random.default_rng([seed, 0xCA9A])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def text() -> str:
        return " ".join("".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(12))

    def noise_png() -> bytes:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
        return buffer.getvalue()

    frame = pd.DataFrame({"row_id": [f"canary:{i}" for i in range(count)]})
    if images:
        frame["image"] = [noise_png() for _ in range(count)]
    else:
        frame["text"] = [text() for _ in range(count)]
    if pair:
        frame["text_pair"] = [text() for _ in range(count)]
    frame["label"] = rng.integers(0, len(label_names), size=count)
    for column in sensitive:
        frame[column] = None
    frame["included"] = rng.random(count) < 0.5
    return frame


def load_data(
    section: DataSection, *, seed: int, canaries: int = 0, task: str = "text-classification"
) -> PreparedData:
    """Load, clean, encode and split the data described by the recipe's ``data`` section.

    Args:
        section: The recipe's data section.
        seed: Seed for carving missing splits and subsets (same seed, same rows).
        canaries: Audit canaries to generate (each trained on with probability 1/2).
        task: ``text-classification`` or ``image-classification`` (the input column's kind).

    Raises:
        DataError: missing columns, unknown label values, empty splits.
    """
    images = task == "image-classification"
    raw = _load_raw(section)
    cols = section.columns
    source_dir = Path(section.source).expanduser()
    base = source_dir if source_dir.is_dir() else source_dir.parent
    text_columns = (
        [cols.image] if images else [cols.text] + ([cols.text_pair] if cols.text_pair else [])
    )
    needed = [*text_columns, cols.label, *cols.sensitive]
    for name, frame in raw.items():
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(
                f"split {name!r} has no column(s) {missing}; it has {list(frame.columns)}. "
                f"Map your column names under data.columns ({'image' if images else 'text'}, label, sensitive)."
            )
    chosen = {wanted: _pick_split(raw, wanted, section) for wanted in SPLITS}
    if chosen["train"] is None:
        raise DataError(
            f"no training split found in the source (it has {sorted(raw)}); set data.splits.train"
        )
    names = _label_names({k: raw[v] for k, v in chosen.items() if v}, cols.label, section)

    rows_read: dict[str, int] = {}
    dropped: dict[str, dict[str, int]] = {}
    clean: dict[str, pd.DataFrame] = {}
    for wanted, source_name in chosen.items():
        if source_name is None:
            continue
        frame = raw[source_name]
        rows_read[wanted] = len(frame)
        reasons: dict[str, int] = {}
        keep = pd.Series(True, index=frame.index)
        if images:
            encoded = frame[cols.image].map(lambda v: _image_bytes(v, base))
            problem = encoded.map(_readable)
            for reason, count in problem.dropna().value_counts().sort_index().items():
                reasons[f"{reason} ({cols.image})"] = int(count)
            keep &= problem.isna()
        for column in [] if images else text_columns:
            gone = _is_missing(frame[column]) & keep
            if gone.any():
                reasons[f"missing text ({column})"] = int(gone.sum())
            keep &= ~gone
        gone = frame[cols.label].isna() & keep
        if gone.any():
            reasons["missing label"] = int(gone.sum())
        keep &= ~gone
        frame = frame[keep]
        out = pd.DataFrame({"row_id": [f"{source_name}:{i}" for i in frame.index]})
        if images:
            out["image"] = encoded[keep].to_numpy()
        else:
            out["text"] = frame[cols.text].astype(str).to_numpy()
        if cols.text_pair:
            out["text_pair"] = frame[cols.text_pair].astype(str).to_numpy()
        classlabels = raw[source_name].attrs.get("classlabels", {}).get(cols.label)
        out["label"] = _encode_labels(
            frame[cols.label].reset_index(drop=True), names, classlabels, wanted
        ).to_numpy()
        for column in cols.sensitive:
            # Missing sensitive values stay missing (None): the audit counts them as their own group.
            values = frame[column].to_numpy(dtype=object)
            out[column] = [
                None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                for v in values
            ]
        dropped[wanted] = reasons
        for reason, count in reasons.items():
            logger.warning("data: dropped %d %s rows: %s", count, wanted, reason)
        clean[wanted] = out

    train = clean["train"]
    if "test" not in clean:
        train, clean["test"] = _carve(train, section.split.test, seed, section.split.stratify)
    if "validation" not in clean:
        fraction = section.split.validation / max(
            1e-9, 1.0 - (section.split.test if chosen["test"] is None else 0.0)
        )
        train, clean["validation"] = _carve(
            train, min(fraction, 0.5), seed + 1, section.split.stratify
        )
    clean["train"] = train
    for name, limit in section.limit.items():
        clean[name] = _subset(clean[name], limit, seed + 2)
    for name in SPLITS:
        clean[name] = clean[name].reset_index(drop=True)
    if len(clean["train"]) == 0:
        raise DataError("the training split is empty after cleaning")
    if len(clean["test"]) == 0:
        raise DataError(
            "the test split is empty; the run must report test metrics. Set data.split.test > 0"
        )
    present = set(clean["train"]["label"])
    if len(present) < 2:
        raise DataError(
            f"the training split has only label(s) {[names[i] for i in present]} after cleaning"
        )
    prepared = PreparedData(
        splits=clean,
        label_names=names,
        text_columns=["image"] if images else ["text"] + (["text_pair"] if cols.text_pair else []),
        sensitive_columns=list(cols.sensitive),
        rows_read=rows_read,
        dropped=dropped,
        source=_source_info(section),
        source_splits=dict(chosen),
    )
    # The fingerprint identifies the user's data, so it is taken before canaries go in.
    prepared.fingerprint = _fingerprint(clean, ["row_id", *prepared.text_columns, "label"])
    if canaries:
        prepared.canaries = make_canaries(
            canaries,
            label_names=names,
            seed=seed,
            pair=bool(cols.text_pair),
            sensitive=list(cols.sensitive),
            images=images,
        )
        inserted = prepared.canaries[prepared.canaries["included"]].drop(columns="included")
        clean["train"] = pd.concat([clean["train"], inserted], ignore_index=True)
    return prepared
