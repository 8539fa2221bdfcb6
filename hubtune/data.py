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
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from hubtune.errors import InputError
from hubtune.recipe import DataSection
from hubtune.tasks import TASKS

__all__ = [
    "DataError",
    "DataSourceError",
    "IMAGE_SUFFIXES",
    "PreparedData",
    "check_source",
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


class DataError(ValueError, InputError):
    """The data does not fit the recipe; the message says what and how to fix it.

    An input error (exit status 2): found while the data is read, before anything trains.
    """


class DataSourceError(DataError):
    """The data source cannot be read as given (missing, empty, not UTF-8, corrupt, columns).

    ``check_source`` finds these before a run starts, except a fault deeper in a file than it
    reads (a damaged Parquet page), which loading finds.
    """


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
    # Language models: the Secret-Sharer canaries (canary_id, repetitions, secret), whose copies
    # are also in ``splits["train"]``. None without them.
    exposure_canaries: pd.DataFrame | None = None
    # data.anonymize: what was found and scrubbed, and what a second scan still finds (see
    # anonymize_splits); None without it. ``scrubber`` scrubs rows added later (canaries).
    anonymization: dict[str, Any] | None = None
    scrubber: Any = None

    def scrub_added(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows added after loading (audit canaries) through the same scrubber as the data, so
        scrubbing acts on them as on the user's rows; counted in ``anonymization``."""
        if self.scrubber is None or self.anonymization is None:
            return frame
        frame = frame.copy()
        gone, changed, _ = _scrub_columns(frame, self.text_columns, self.scrubber)
        self.anonymization["canary_rows"] = {
            "rows": len(frame),
            "changed": changed,
            "dropped": int(gone.sum()),
        }
        return frame[~gone]

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
            "exposure_canaries": None
            if self.exposure_canaries is None
            else {
                "canaries": len(self.exposure_canaries),
                "training_rows": int(self.exposure_canaries["repetitions"].sum()),
                "repetitions": sorted({int(k) for k in self.exposure_canaries["repetitions"]}),
            },
            "label_names": self.label_names,
            "source": self.source,
            "source_splits": self.source_splits,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": self.dropped,
            "anonymization": self.anonymization,
            "label_counts": {
                name: {
                    self.label_names[k]: int(v) for k, v in sorted(Counter(frame["label"]).items())
                }
                for name, frame in self.splits.items()
                if "label" in frame
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


@dataclass(frozen=True)
class _LocalFiles:
    """The data files a local source names: one format, one file per source split."""

    fmt: str  # a datasets builder: csv, json or parquet
    files: dict[str, Path]
    delimiter: str


def _local_files(section: DataSection) -> _LocalFiles | Literal["images"] | None:
    """The local data files of ``data.source``; ``"images"`` for an image folder; None for a Hub id.

    Raises:
        DataSourceError: a local source that does not exist or holds no data files.
    """
    source = Path(section.source).expanduser()
    if source.is_file():
        fmt = _FORMATS.get(source.suffix.lower())
        if fmt is None:
            raise DataSourceError(
                f"data.source {section.source!r}: unsupported file type; use csv, tsv, jsonl or parquet"
            )
        files = {"train": source}
    elif source.is_dir() and _is_image_folder(source):
        return "images"
    elif source.is_dir():
        # prepare.json is the report `hubtune data prepare` writes beside its data files.
        found = sorted(
            p
            for p in source.iterdir()
            if p.is_file() and p.suffix.lower() in _FORMATS and p.name != "prepare.json"
        )
        if not found:
            raise DataSourceError(
                f"data.source {section.source!r}: no csv/tsv/jsonl/parquet files, and no image "
                "class folders, in this directory"
            )
        kinds = {_FORMATS[p.suffix.lower()] for p in found}
        if len(kinds) > 1:
            raise DataSourceError(
                f"data.source {section.source!r}: mixed file types {sorted(kinds)}; keep one format"
            )
        fmt = kinds.pop()
        files = {p.stem: p for p in found} if len(found) > 1 else {"train": found[0]}
    elif (
        section.source.startswith((".", "/", "~"))
        or Path(section.source).suffix.lower() in _FORMATS
    ):
        from hubtune.prepare import PREPARERS

        hint = ""
        if source.parent.name in PREPARERS:  # e.g. data/redditbias/data.csv
            hint = f"; build it with: hubtune data prepare {source.parent.name}"
        raise DataSourceError(
            f"data.source {section.source!r} does not exist (looked for {source.absolute()}); "
            f"fix data.source{hint}"
        )
    else:
        return None
    tsv = all(p.suffix.lower() == ".tsv" for p in files.values())
    return _LocalFiles(fmt=fmt, files=files, delimiter="\t" if tsv else ",")


def _needed_columns(section: DataSection, task: str) -> list[str]:
    """The columns every split must have: model input, label, sensitive."""
    cols = section.columns
    if TASKS[task].input_kind == "image":
        inputs = [cols.image]
    elif cols.prompt and cols.completion:
        inputs = [cols.prompt, cols.completion]
    elif cols.messages:
        inputs = [cols.messages]
    else:
        inputs = [cols.text] + ([cols.text_pair] if cols.text_pair else [])
    labels = [cols.label] if TASKS[task].has_labels else []
    return [*inputs, *labels, *cols.sensitive]


def _conversations(values: pd.Series, split: str) -> pd.Series:
    """Each conversation as canonical JSON text (missing stays missing); DataError names the row."""
    from hubtune.tasks.chat import ConversationError, canonical, parse_conversation

    out: list[str | None] = []
    for index, value in values.items():
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append(None)
            continue
        try:
            out.append(canonical(parse_conversation(value)))
        except ConversationError as exc:
            raise DataError(
                f"split {split!r}, row {index}: data.columns.messages ({values.name!r}) is not a chat "
                f'conversation: {exc}. Each value must be a list of {{"role": ..., "content": ...}} '
                "messages (or its JSON text) with at least one assistant message."
            ) from None
    return pd.Series(out, index=values.index, dtype=object, name=values.name)


def _texts_of(frame: pd.DataFrame, column: str) -> list[str]:
    """The scrubbable texts of a column: the cells, or every message's content (messages)."""
    if column != "messages":
        return frame[column].astype(str).tolist()
    return [m["content"] for cell in frame[column] for m in json.loads(cell)]


def _put_texts(frame: pd.DataFrame, column: str, texts: list[str | None]) -> list[bool]:
    """Write scrubbed texts back (in ``_texts_of``'s order); which rows lost a value (drop)."""
    if column != "messages":
        frame[column] = [t if t is not None else "" for t in texts]
        return [t is None for t in texts]
    from hubtune.tasks.chat import canonical

    cells, gone, at = [], [], 0
    for cell in frame[column]:
        messages = json.loads(cell)
        lost = False
        for message in messages:
            new = texts[at]
            at += 1
            lost |= new is None
            message["content"] = new if new is not None else ""
        cells.append(canonical(messages))
        gone.append(lost)
    frame[column] = cells
    return gone


def _scrub_columns(
    frame: pd.DataFrame, columns: list[str], scrubber: Any, spans: dict[str, Any] | None = None
) -> tuple[pd.Series, int, dict[str, tuple[list[str | None], list[Any]]]]:
    """Scrub ``columns`` of ``frame`` in place (``spans``: detections already made, per column).

    Returns the rows to drop (``drop_row``), how many kept rows changed, and each column's
    scrubbed texts with where the scrubber wrote its own values (for the residual scan).
    """
    original = frame[columns].copy()
    gone = pd.Series(False, index=frame.index)
    written: dict[str, tuple[list[str | None], list[Any]]] = {}
    for column in columns:
        texts = _texts_of(frame, column)
        scrubbed = scrubber.scrub(texts, None if spans is None else spans[column])
        written[column] = (scrubbed, scrubber.regions)
        gone |= pd.Series(_put_texts(frame, column, scrubbed), index=frame.index)
    changed = int(((frame[columns] != original).any(axis=1) & ~gone).sum())
    return gone, changed, written


def _per_text(frame: pd.DataFrame, column: str, per_row: list[bool]) -> list[bool]:
    """A per-row flag repeated for each of the row's texts (messages: one per message)."""
    if column != "messages":
        return per_row
    return [
        flag for cell, flag in zip(frame[column], per_row, strict=True) for _ in json.loads(cell)
    ]


def anonymize_splits(
    clean: dict[str, pd.DataFrame],
    section: Any,
    columns: list[str],
    *,
    seed: int,
    dropped: dict[str, dict[str, int]],
) -> tuple[dict[str, Any], Any]:
    """Scrub ``columns`` of every split in place (``data.anonymize``; hubtune.pii), then scan the
    scrubbed text again. Returns the run.json record and the scrubber (for rows added later).

    The record: the settings and the detector (NER model, or why names are not detected);
    ``before``: values found per entity and rows with any; ``rows_changed`` / ``rows_dropped``;
    ``after``: what a second scan of the scrubbed rows still finds (leaving out hubtune's own
    tags, masks and synthetic values) and ``residual_rate``, the share of rows with any.
    """
    import time

    from hubtune.pii import Detector, Scrubber, scan_texts

    start = time.perf_counter()
    detector = Detector(section.entities, patterns=section.patterns, min_score=section.min_score)
    scrubber = Scrubber(
        detector,
        action=section.action,
        replace_with=section.replace_with,
        consistent=section.consistent,
        seed=seed,
    )
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    changed = dropped_rows = 0
    for name, frame in clean.items():
        frame = frame.copy()
        texts = {c: _texts_of(frame, c) for c in columns}
        spans = {c: detector.detect(t) for c, t in texts.items()}
        before.append(scan_texts(detector, texts, examples=0, spans=spans))
        gone, n_changed, written = _scrub_columns(frame, columns, scrubber, spans)
        changed += n_changed
        residual = {c: scrubber.residual(*written[c]) for c in columns}
        if gone.any():
            dropped.setdefault(name, {})["personal data (data.anonymize: drop_row)"] = int(
                gone.sum()
            )
            dropped_rows += int(gone.sum())
            keep = [not g for g in _per_text(frame, columns[0], gone.tolist())]
            residual = {
                c: [r for r, k in zip(v, keep, strict=True) if k] for c, v in residual.items()
            }
            frame = frame[~gone]
        kept = {c: _texts_of(frame, c) for c in columns}
        after.append(scan_texts(detector, kept, examples=0, spans=residual))
        clean[name] = frame
    rows_after = sum(a["rows"] for a in after)
    residual_rows = sum(a["rows_affected"] for a in after)
    record = {
        **scrubber.settings(),
        "not_detected": detector.undetectable(),
        "before": _sum_scans(before),
        "rows_changed": changed,
        "rows_dropped": dropped_rows,
        "after": _sum_scans(after),
        "residual_rows": residual_rows,
        "residual_rate": residual_rows / rows_after if rows_after else 0.0,
        "seconds": round(time.perf_counter() - start, 1),
    }
    logger.info(
        "data.anonymize: %d values in %d rows found, %d rows changed, %d dropped; residual rate %.4f",
        sum(e["count"] or 0 for e in record["before"]["entities"].values()),
        record["before"]["rows_affected"],
        record["rows_changed"],
        dropped_rows,
        record["residual_rate"],
    )
    return record, scrubber


def _sum_scans(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """Several splits' (or columns') scans as one: counts add up; None stays None."""
    rows = sum(s["rows"] for s in scans)
    affected = sum(s["rows_affected"] for s in scans)
    entities: dict[str, dict[str, Any]] = {}
    for scan in scans:
        for entity, entry in scan["entities"].items():
            total = entities.setdefault(entity, {"count": 0, "rows": 0})
            if entry["count"] is None:
                total.update(count=None, rows=None)
            elif total["count"] is not None:
                total["count"] += entry["count"]
                total["rows"] += entry["rows"]
    return {
        "rows": rows,
        "rows_affected": affected,
        "share_affected": affected / rows if rows else 0.0,
        "entities": entities,
    }


def _check_utf8(path: Path) -> None:
    # Line by line: a newline byte never occurs inside a UTF-8 sequence, so each line decodes
    # on its own, and the error can name its line.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                around = raw[max(0, exc.start - 20) : exc.start + 20].decode("utf-8", "replace")
                raise DataSourceError(
                    f"data file {path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                    f"at column {exc.start + 1}, in {around.strip()!r}). Save the file as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}` or pandas "
                    "`to_csv(path, encoding='utf-8')`."
                ) from None


def _csv_columns(path: Path, delimiter: str) -> tuple[list[str], int]:
    """The header and whether a first row follows (0 or 1), read the way ``datasets`` reads it.

    Every line is tokenised (in chunks, so memory stays bounded): a row with more fields than
    the header is found here, with its line number, not after the run has started.
    """
    options: dict[str, Any] = {"sep": delimiter, "dtype": str, "encoding": "utf-8"}
    try:
        head = pd.read_csv(path, nrows=1, **options)
        for _ in pd.read_csv(path, chunksize=1 << 16, **options):
            pass
    except pd.errors.EmptyDataError:
        return [], 0
    except pd.errors.ParserError as exc:
        raise DataSourceError(
            f"data file {path} cannot be parsed as {'TSV' if delimiter == chr(9) else 'CSV'}: "
            f"{str(exc).strip()}. Quote fields that contain {delimiter!r} or a line break, or fix "
            "that line."
        ) from None
    return [str(c) for c in head.columns], len(head)


def _json_columns(path: Path) -> tuple[list[str], int]:
    """Every key of a JSON Lines file (or a JSON array of objects) and its number of records."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(
                f"data file {path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
            ) from None
        numbered = list(enumerate(records, start=1))
        unit = "item"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataSourceError(
                    f"data file {path}: line {number} is not valid JSON ({exc.msg}, column "
                    f"{exc.colno}). A .jsonl file holds one JSON object per line."
                ) from None
        unit = "line"
    columns: dict[str, None] = {}
    for number, record in numbered:
        if not isinstance(record, dict):
            raise DataSourceError(
                f"data file {path}: {unit} {number} is a JSON {type(record).__name__}, not an "
                'object; each example is one object such as {"text": ..., "label": ...}'
            )
        columns.update(dict.fromkeys(record))
    return list(columns), len(numbered)


def _parquet_columns(path: Path) -> tuple[list[str], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataSourceError(
            f"data file {path} is not a readable Parquet file ({exc}). It may be cut short or not "
            "Parquet at all: copy it again, or write it again (pandas `to_parquet(path)`)."
        ) from None
    return list(metadata.schema.to_arrow_schema().names), metadata.num_rows


def _check_file(path: Path, local: _LocalFiles, needed: list[str]) -> None:
    """A data file can be read and has the recipe's columns (without building a data set)."""
    listed = ", ".join(needed)
    if path.stat().st_size == 0:
        raise DataSourceError(
            f"data file {path} is empty (0 bytes). It needs the columns {listed} and one row per "
            "example; check the file was written (or copied) completely."
        )
    if local.fmt == "parquet":
        columns, rows = _parquet_columns(path)
    else:
        _check_utf8(path)
        if local.fmt == "csv":
            columns, rows = _csv_columns(path, local.delimiter)
        else:
            columns, rows = _json_columns(path)
    if rows == 0:
        what = "a header but no rows" if columns else "no header and no rows"
        raise DataSourceError(
            f"data file {path} has {what}. It needs the columns {listed} and one row per example."
        )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataSourceError(
            f"data file {path} has no column(s) {missing}; it has {columns}. Name the file's "
            "columns under data.columns (text, text_pair, image, label, sensitive), or fix the file."
        )


def check_source(section: DataSection, *, task: str = "text-classification") -> str:
    """Check that the data source can be read and has the recipe's columns, without loading it.

    Local files are read through once (every line decodes as UTF-8, JSON lines parse, a
    Parquet file's footer reads) and their columns compared with the recipe's; label values
    are not checked here (``load_data`` does that). A Hub data set is looked up on the
    endpoint when online; an image folder is taken as found.

    Args:
        section: The recipe's data section.
        task: ``text-classification`` or ``image-classification`` (which input column).

    Returns:
        A line saying what was found.

    Raises:
        DataSourceError: what cannot be read, and what to do about it.
    """
    local = _local_files(section)
    if local is None:
        return _check_hub_dataset(section)
    if isinstance(local, str):
        return f"data {section.source}: an image folder"
    needed = _needed_columns(section, task)
    for path in local.files.values():
        _check_file(path, local, needed)
    return (
        f"data {section.source}: {len(local.files)} {local.fmt} file(s) "
        f"({', '.join(local.files)}), columns {needed} present"
    )


def _check_hub_dataset(section: DataSection) -> str:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"data.source {section.source!r}"
    if constants.HF_HUB_OFFLINE:
        # Offline, only the datasets cache can answer, and loading is what asks it.
        return f"{where}: a Hub data set (not looked up: offline)"
    try:
        info = HfApi().dataset_info(section.source, revision=section.revision)
    except RevisionNotFoundError:
        raise DataSourceError(
            f"{where}: the data set has no revision {section.revision!r} on {constants.ENDPOINT}. "
            "Set data.revision to an existing branch, tag or commit SHA."
        ) from None
    except RepositoryNotFoundError:
        raise DataSourceError(_no_dataset_message(section.source)) from None
    return f"{where}: a Hub data set at commit {info.sha}"


def _no_dataset_message(source: str) -> str:
    from huggingface_hub import constants

    return (
        f"data.source {source!r}: no such file or folder here ({Path.cwd()}), and no data set "
        f"repository of that id on {constants.ENDPOINT} (or it is private and your token cannot "
        "read it). Give a csv/tsv/jsonl/parquet file or a folder, or a Hub data set id (org/name)."
    )


def _load_raw(section: DataSection, needed: list[str]) -> dict[str, pd.DataFrame]:
    """Read the source with ``datasets`` and return one pandas frame per source split."""
    import datasets

    # datasets pings a public bucket to count loads of its csv/json/parquet builders even for
    # local files; a tool for private data sends nothing anywhere it was not asked to.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    local = _local_files(section)
    if isinstance(local, str):
        return _load_image_folder(Path(section.source).expanduser(), section)
    if local is None:
        return _load_hub_dataset(section)
    for path in local.files.values():
        _check_file(path, local, needed)
    kwargs = {"delimiter": local.delimiter} if local.fmt == "csv" else {}
    data_files = {split: str(path) for split, path in local.files.items()}
    try:
        loaded = datasets.load_dataset(local.fmt, data_files=data_files, **kwargs)
    except datasets.exceptions.DatasetGenerationError as exc:
        # The checks above read what every row needs; this is a fault deeper in a file (a row
        # with too many fields, a damaged Parquet page). The cause says where.
        cause = exc.__cause__ or exc
        raise DataSourceError(
            f"data.source {section.source!r}: cannot be read as {local.fmt}: "
            f"{type(cause).__name__}: {str(cause).rstrip('.')}. Fix or re-create the file (the "
            "error says where, when it can)."
        ) from None
    return _frames_with_classlabels(loaded)


def _load_hub_dataset(section: DataSection) -> dict[str, pd.DataFrame]:
    import datasets

    try:
        loaded = datasets.load_dataset(
            section.source, name=section.config_name, revision=section.revision
        )
    except datasets.exceptions.DatasetNotFoundError:
        raise DataSourceError(_no_dataset_message(section.source)) from None
    except ConnectionError as exc:
        if not datasets.config.HF_HUB_OFFLINE:
            raise
        raise DataSourceError(
            f"data.source {section.source!r}: not in the datasets cache, and offline mode "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) forbids downloading it. Load it once online, "
            f"or point hub.endpoint at a Hub that has it (e.g. hub.endpoint: local). ({exc})"
        ) from None
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
        stratify=_stratify(frame["label"]) if stratify and "label" in frame else None,
    )
    return keep, carved


def _subset(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if len(frame) <= limit:
        return frame
    # An exact row count: a fraction (limit / n) is rounded up by scikit-learn and could keep
    # limit + 1 rows. Stratified unless one side would be smaller than the number of classes.
    dropped = len(frame) - limit
    stratify = "label" in frame and min(limit, dropped) >= frame["label"].nunique()
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

    Long on purpose: reading, cleaning, label encoding, splitting, subsetting and canaries in the order they happen, each dropped row counted where it is dropped.

    Args:
        section: The recipe's data section.
        seed: Seed for carving missing splits and subsets (same seed, same rows).
        canaries: Audit canaries to generate (each trained on with probability 1/2).
        task: ``text-classification`` or ``image-classification`` (the input column's kind).

    Raises:
        DataSourceError: a source that cannot be read (see ``check_source``).
        DataError: missing columns, unknown label values, empty splits.
    """
    images = TASKS[task].input_kind == "image"
    labelled = TASKS[task].has_labels
    needed = _needed_columns(section, task)
    raw = _load_raw(section, needed)
    cols = section.columns
    source_dir = Path(section.source).expanduser()
    base = source_dir if source_dir.is_dir() else source_dir.parent
    # (source column, our column) of the model's text inputs
    if cols.prompt and cols.completion:
        text_inputs = [(cols.prompt, "prompt"), (cols.completion, "completion")]
    elif cols.messages:
        text_inputs = [(cols.messages, "messages")]
    else:
        text_inputs = [(cols.text, "text")] + (
            [(cols.text_pair, "text_pair")] if cols.text_pair else []
        )
    text_columns = [cols.image] if images else [source for source, _ in text_inputs]
    for name, frame in raw.items():
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(
                f"split {name!r} has no column(s) {missing}; it has {list(frame.columns)}. "
                f"Map your column names under data.columns ({'image' if images else 'text'}"
                f"{', label' if labelled else ''}, sensitive)."
            )
    chosen = {wanted: _pick_split(raw, wanted, section) for wanted in SPLITS}
    if chosen["train"] is None:
        raise DataError(
            f"no training split found in the source (it has {sorted(raw)}); set data.splits.train"
        )
    names = (
        _label_names({k: raw[v] for k, v in chosen.items() if v}, cols.label, section)
        if labelled
        else []
    )

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
        if cols.messages:  # canonical JSON text; a malformed conversation is an error, not a drop
            frame = frame.assign(
                **{cols.messages: _conversations(frame[cols.messages], source_name)}
            )
        for column in [] if images else text_columns:
            gone = _is_missing(frame[column]) & keep
            if gone.any():
                reasons[f"missing text ({column})"] = int(gone.sum())
            keep &= ~gone
        if labelled:
            gone = frame[cols.label].isna() & keep
            if gone.any():
                reasons["missing label"] = int(gone.sum())
            keep &= ~gone
        frame = frame[keep]
        out = pd.DataFrame({"row_id": [f"{source_name}:{i}" for i in frame.index]})
        if images:
            out["image"] = encoded[keep].to_numpy()
        else:
            for source, ours in text_inputs:
                out[ours] = frame[source].astype(str).to_numpy()
        if labelled:
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

    anonymization, scrubber = None, None
    if section.anonymize is not None and section.anonymize.enabled:
        if images:
            raise DataError("data.anonymize scrubs text; remove it for images")
        anonymization, scrubber = anonymize_splits(
            clean, section.anonymize, [ours for _, ours in text_inputs], seed=seed, dropped=dropped
        )
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
    present = set(clean["train"]["label"]) if labelled else {0, 1}
    if len(present) < 2:
        raise DataError(
            f"the training split has only label(s) {[names[i] for i in present]} after cleaning"
        )
    prepared = PreparedData(
        splits=clean,
        label_names=names,
        text_columns=["image"] if images else [ours for _, ours in text_inputs],
        sensitive_columns=list(cols.sensitive),
        rows_read=rows_read,
        dropped=dropped,
        source=_source_info(section),
        source_splits=dict(chosen),
        anonymization=anonymization,
        scrubber=scrubber,
    )
    # The fingerprint identifies the user's data, so it is taken before canaries go in.
    prepared.fingerprint = _fingerprint(
        clean, ["row_id", *prepared.text_columns, *(["label"] if labelled else [])]
    )
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
