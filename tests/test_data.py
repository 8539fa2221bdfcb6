"""Data loading: formats, cleaning with counted drops, labels, splits, sensitive columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hubtune.data import DataError, load_data
from hubtune.recipe import DataSection

from .conftest import make_sentiment_frame


def _section(source: Path, **extra: object) -> DataSection:
    spec = {
        "source": str(source),
        "columns": {"text": "text", "label": "label", "sensitive": ["group"]},
    }
    spec.update(extra)
    return DataSection.model_validate(spec)


def test_missing_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    frame = make_sentiment_frame(100)
    frame.loc[[1, 2, 3], "text"] = None
    frame.loc[4, "text"] = "   "
    frame.loc[[5, 6], "label"] = None
    frame.loc[7, "group"] = None  # a missing sensitive value is kept, not dropped
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    data = load_data(_section(path, labels=["neg", "pos"]), seed=0)
    assert data.rows_read == {"train": 100}
    assert data.dropped["train"] == {"missing text (text)": 4, "missing label": 2}
    assert sum(data.rows_kept.values()) == 94
    every = pd.concat(data.splits.values())
    assert every["group"].isna().sum() == 1
    assert set(every.columns) == {"row_id", "text", "label", "group"}
    assert every["row_id"].is_unique
    assert data.summary()["dropped"]["train"]["missing label"] == 2


def test_unknown_labels_give_examples(tmp_path: Path) -> None:
    frame = make_sentiment_frame(60)
    frame.loc[[0, 1, 2], "label"] = "meh"
    frame.loc[3, "label"] = "positive?"
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_data(_section(path, labels=["neg", "pos"]), seed=0)
    message = str(info.value)
    assert "4 rows" in message and "'meh' (3 rows)" in message and "'positive?' (1 rows)" in message
    assert "data.labels" in message


def test_labels_inferred_sorted_and_integer_labels_with_names(tmp_path: Path) -> None:
    frame = make_sentiment_frame(80)
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    assert load_data(_section(path), seed=0).label_names == ["neg", "pos"]
    frame["label"] = (frame["label"] == "pos").astype(int)
    frame.to_csv(path, index=False)
    data = load_data(_section(path, labels=["negative", "positive"]), seed=0)
    assert data.label_names == ["negative", "positive"]
    merged = pd.concat(data.splits.values())
    original = frame.set_index(frame.index.map(lambda i: f"train:{i}"))
    assert (
        merged.set_index("row_id")["label"] == original.loc[merged["row_id"], "label"].to_numpy()
    ).all()


def test_seeded_stratified_splits_are_reproducible(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    make_sentiment_frame(200).to_csv(path, index=False)
    section = _section(path, split={"validation": 0.1, "test": 0.2})
    a, b = load_data(section, seed=3), load_data(section, seed=3)
    c = load_data(section, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.rows_kept == {"train": 140, "test": 40, "validation": 20}
    ids = [set(a.splits[s]["row_id"]) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for split in ("train", "validation", "test"):  # stratified: both classes in equal shares
        counts = a.splits[split]["label"].value_counts()
        assert counts.max() - counts.min() <= 1


def test_directory_of_named_splits_jsonl_and_limit(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, n in (("train", 120), ("validation", 30), ("test", 40)):
        make_sentiment_frame(n, seed=len(name)).to_json(
            folder / f"{name}.jsonl", orient="records", lines=True
        )
    data = load_data(_section(folder, limit={"train": 50}), seed=0)
    assert data.rows_read == {"train": 120, "validation": 30, "test": 40}
    assert data.rows_kept == {"train": 50, "validation": 30, "test": 40}
    assert data.splits["test"]["row_id"].str.startswith("test:").all()


def test_parquet_and_renamed_columns(tmp_path: Path) -> None:
    frame = make_sentiment_frame(80).rename(
        columns={"text": "comment", "label": "y", "group": "region"}
    )
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    section = DataSection.model_validate(
        {"source": str(path), "columns": {"text": "comment", "label": "y", "sensitive": ["region"]}}
    )
    data = load_data(section, seed=0)
    assert set(data.splits["train"].columns) == {"row_id", "text", "label", "region"}


def test_missing_column_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    make_sentiment_frame(40).drop(columns=["group"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no column\(s\) \['group'\]"):
        load_data(_section(path), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_data(_section(tmp_path / "nope.csv"), seed=0)


def test_real_redditbias_rows(tmp_path: Path) -> None:
    """The packaged RedditBias data, prepared, loads with its sensitive column."""
    from hubtune.prepare import prepare

    report = prepare("redditbias", output_dir=tmp_path / "rb")
    section = DataSection.model_validate(
        {
            "source": str(tmp_path / "rb" / "data.csv"),
            "columns": {"text": "text", "label": "label", "sensitive": ["target_group"]},
            "labels": ["not_biased", "biased"],
        }
    )
    data = load_data(section, seed=42)
    assert sum(data.rows_kept.values()) == report.rows_kept
    assert set(data.splits["test"]["target_group"]) == {
        "female",
        "black",
        "lgbtq",
        "jewish",
        "muslim",
    }


def test_loading_local_files_makes_no_network_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with the Hub online, a local csv is read without any lookup (datasets' load counter)."""
    import socket

    import datasets

    attempts: list[str] = []

    def record(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(str(host))
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", record)  # replaces the conftest guard for this test
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    path = tmp_path / "d.csv"
    make_sentiment_frame(40).to_csv(path, index=False)
    load_data(_section(path), seed=0)
    assert attempts == []


def test_limit_keeps_exactly_the_requested_rows() -> None:
    """A fraction limit / n is rounded up by scikit-learn (1,000 of 2,295 gave 1,001)."""
    from hubtune.data import _subset

    for n, limit in ((2295, 1000), (8029, 2000), (1147, 500), (301, 7), (1000, 999)):
        frame = make_sentiment_frame(n).assign(label=lambda f: (f["label"] == "pos").astype(int))
        kept = _subset(frame, limit, seed=3)
        assert len(kept) == limit, (n, limit)
        counts = kept["label"].value_counts()
        assert abs(counts.get(0, 0) - counts.get(1, 0)) <= 1  # still stratified


def test_source_licence_endpoint_and_split_origin_are_recorded(tmp_path: Path) -> None:
    """What the model card cites: where the rows came from, under which licence, and which
    split of the source each of ours is (None: carved from the training rows)."""
    from huggingface_hub import HfApi

    from hubtune.hub import hub_endpoint

    path = tmp_path / "reviews.csv"
    make_sentiment_frame(120).to_csv(path, index=False)
    summary = load_data(_section(path), seed=0).summary()
    assert summary["source"] == {"kind": "local"}  # a bare file has no card: nothing claimed
    assert summary["source_splits"] == {"train": "train", "validation": None, "test": None}

    repo = tmp_path / "repo"
    repo.mkdir()
    make_sentiment_frame(120).to_csv(repo / "train.csv", index=False)
    make_sentiment_frame(40, seed=1).to_csv(repo / "test.csv", index=False)
    (repo / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# Reviews\n")
    folder = load_data(_section(repo), seed=0).summary()
    assert folder["source"] == {"kind": "local", "license": {"id": "cc-by-4.0"}}
    assert folder["source_splits"] == {"train": "train", "validation": None, "test": "test"}
    with hub_endpoint("local", local_root=tmp_path / "hub") as url:
        api = HfApi(endpoint=url)
        api.create_repo("org/reviews", repo_type="dataset")
        sha = api.upload_folder(
            folder_path=str(repo), repo_id="org/reviews", repo_type="dataset"
        ).oid
        section = DataSection.model_validate(
            {
                "source": "org/reviews",
                "revision": sha,
                "columns": {"text": "text", "label": "label", "sensitive": ["group"]},
            }
        )
        source = load_data(section, seed=0).summary()["source"]
    assert source == {
        "kind": "hub",
        "repo_id": "org/reviews",
        "revision": sha,
        "endpoint": url,
        "sha": sha,
        "license": {"id": "cc-by-4.0"},
    }
