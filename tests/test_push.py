"""Push through the real Hub client to the local endpoint: gated, one commit, nothing private."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, snapshot_download
from huggingface_hub.repocard_data import model_index_to_eval_results
from typer.testing import CliRunner

from hubtune.audit import run_audit
from hubtune.cli import app
from hubtune.data import load_data
from hubtune.hub import hub_endpoint
from hubtune.pipeline import run_recipe
from hubtune.push import PushError, push_run
from hubtune.recipe import Recipe

from .conftest import make_fake_run, make_sentiment_frame, recipe_dict

TOKEN = "hf_canaryPUSHtokenNeverWrite0123456789"


@pytest.fixture()
def reviews(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_sentiment_frame(600).to_csv(path, index=False)
    return path


def _pushing_spec(model: Path, data: Path, tmp_path: Path, root: Path) -> dict:
    """A tiny recipe that pulls from and pushes (model and Space) to a local endpoint."""
    spec = recipe_dict(model, data, tmp_path / "runs")
    spec["train"].update(epochs=3, lr=0.01)
    spec["hub"] = {"endpoint": "local", "local_root": str(root)}
    spec["push"] = {
        "enabled": True,
        "repo_id": "local-user/tiny",
        "space_id": "local-user/tiny-demo",
        "allow_failing_audit": True,
    }
    return spec


def _all_text(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
    )


def test_run_pushes_one_commit_and_the_download_reproduces_the_run(
    tiny_bert: Path,
    reviews: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """What a user checks: download the pushed model, get the run's test predictions back."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "hub"
    spec = _pushing_spec(tiny_bert, reviews, tmp_path, root)
    recipe = Recipe.model_validate(spec)
    result = run_recipe(recipe)
    assert result.push is not None
    commit = result.push["commit"]
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")

    with hub_endpoint("local", local_root=root) as url:
        api = HfApi(endpoint=url)
        info = api.model_info("local-user/tiny")
        assert info.sha == commit and info.private is True
        files = set(api.list_repo_files("local-user/tiny", revision=commit))
        assert {"config.json", "model.safetensors", "README.md", "recipe.resolved.yaml"} <= files
        assert {"audit/report.html", "audit/report.md", "audit/audit.json"} <= files
        # Never pushed: row-level test data, per-example losses, checkpoints (DP RNG state).
        assert not {f for f in files if f.endswith(".parquet") or f.startswith("checkpoints")}
        local = Path(
            snapshot_download("local-user/tiny", revision=commit, cache_dir=tmp_path / "dl")
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            "local-user/tiny", revision=commit, cache_dir=tmp_path / "dl"
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            "local-user/tiny", revision=commit, cache_dir=tmp_path / "dl"
        )
        space = Path(
            snapshot_download(
                "local-user/tiny-demo", repo_type="space", cache_dir=tmp_path / "dl-space"
            )
        )
        commits = api.list_repo_commits("local-user/tiny")
    assert commits[0].commit_id == commit and "hubtune: tiny" in commits[0].title

    test = load_data(recipe.data, seed=recipe.seed).splits["test"]
    assert list(test["row_id"]) == list(predictions["row_id"])
    with torch.no_grad():
        batch = tokenizer(
            list(test["text"]), padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(probs[:, 1], predictions["prob_pos"].to_numpy(), atol=1e-5)
    assert (probs.argmax(-1) == predictions["prediction_id"].to_numpy()).all()

    card = ModelCard.load(local / "README.md")
    results = model_index_to_eval_results(card.data.to_dict()["model-index"])[1]
    accuracy = next(r for r in results if r.metric_type == "accuracy")
    assert accuracy.metric_value == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-4)
    assert "without differential privacy" in card.text
    config = json.loads((space / "space_config.json").read_text())
    assert config["model_repo_id"] == "local-user/tiny" and config["model_revision"] == commit
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["pushes"][-1]["commit"] == commit

    # The token never reaches a pushed file, the run directory, or the logs.
    out, err = capfd.readouterr()
    for text in (
        _all_text(local),
        _all_text(space),
        _all_text(result.run_dir),
        caplog.text,
        out,
        err,
    ):
        assert TOKEN not in text


def _fake_pushable_run(tmp_path: Path, tiny_bert: Path, *, fair: bool) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for group, accuracy in (("a", 0.9), ("b", 0.9 if fair else 0.5)):
        labels = rng.integers(0, 2, 300)
        right = rng.random(300) < accuracy
        rows += [
            {"label_id": int(y), "prediction_id": int(y if ok else 1 - y), "group": group}
            for y, ok in zip(labels, right, strict=True)
        ]
    run_dir = make_fake_run(
        tmp_path / "runs" / ("fair" if fair else "unfair"),
        pd.DataFrame(rows),
        label_names=["neg", "pos"],
        sensitive=["group"],
    )
    shutil.copytree(tiny_bert, run_dir / "model")
    policy = tmp_path / "eo.yaml"
    policy.write_text("name: eo\nn_boot: 100\nthresholds: {max_equalized_odds_difference: 0.2}\n")
    run_audit(run_dir, policy=policy)
    return run_dir


def test_gate_refuses_a_failing_audit_and_records_an_override(
    tiny_bert: Path, tmp_path: Path
) -> None:
    run_dir = _fake_pushable_run(tmp_path, tiny_bert, fair=False)
    with hub_endpoint("local", local_root=tmp_path / "hub") as url:
        with pytest.raises(PushError, match="--allow-failing-audit"):
            push_run(run_dir, repo_id="org/unfair", endpoint=url)
        api = HfApi(endpoint=url)
        assert not api.repo_exists("org/unfair")  # nothing was created
        pushed = push_run(run_dir, repo_id="org/unfair", endpoint=url, allow_failing_audit=True)
        readme = api.hf_hub_download(
            "org/unfair", "README.md", revision=pushed.commit, cache_dir=tmp_path / "c"
        )
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["audit"]["override"]["allowed_failing_audit"] is True
    assert run_info["pushes"][-1]["audit_overridden"] is True
    card = ModelCard.load(readme)
    assert card.data.to_dict()["fairness"]["overridden"] is True
    assert "published despite a fail fairness audit" in card.text.lower()


def test_retry_is_safe_and_a_concurrent_change_is_not_clobbered(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _fake_pushable_run(tmp_path, tiny_bert, fair=True)
    with hub_endpoint("local", local_root=tmp_path / "hub") as url:
        api = HfApi(endpoint=url)
        first = push_run(run_dir, repo_id="org/fair", endpoint=url)
        again = push_run(run_dir, repo_id="org/fair", endpoint=url)
        assert again.already_there and again.commit == first.commit
        assert len(api.list_repo_commits("org/fair")) == 2  # the initial commit + ours

        # Someone else commits between our look at the head and our commit.
        original = HfApi.create_commit

        def racing(self, repo_id, operations, **kwargs):  # type: ignore[no-untyped-def]
            note = CommitOperationAdd(path_in_repo="NOTES.md", path_or_fileobj=b"a note\n")
            original(api, repo_id, [note], commit_message="a colleague's note")
            return original(self, repo_id, operations, **kwargs)

        (run_dir / "recipe.resolved.yaml").write_text("name: fair\ndescription: changed\n")
        monkeypatch.setattr(HfApi, "create_commit", racing)
        with pytest.raises(PushError, match="changed while pushing"):
            push_run(run_dir, repo_id="org/fair", endpoint=url)
        monkeypatch.setattr(HfApi, "create_commit", original)
        head = api.list_repo_commits("org/fair")[0]
        assert "NOTES.md" in api.list_repo_files("org/fair", revision=head.commit_id)


def test_cli_push_refuses_with_exit_3(tiny_bert: Path, tmp_path: Path) -> None:
    run_dir = _fake_pushable_run(tmp_path, tiny_bert, fair=False)
    result = CliRunner().invoke(
        app,
        [
            "push",
            str(run_dir),
            "--repo-id",
            "org/unfair",
            "--endpoint",
            "local",
            "--hub-root",
            str(tmp_path / "hub"),
        ],
    )
    assert result.exit_code == 3 and "audit gate refuses" in result.output


def test_lora_adapter_pushed_and_loaded_by_repo_id_with_peft(
    tiny_bert: Path, reviews: Path, tmp_path: Path
) -> None:
    """A LoRA run on a Hub base model: peft loads base and adapter by repo id, as pushed."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    root = tmp_path / "hub"
    with hub_endpoint("local", local_root=root) as url:
        HfApi(endpoint=url).create_repo("org/tiny-base")
        base_sha = (
            HfApi(endpoint=url)
            .upload_folder(
                folder_path=str(tiny_bert), repo_id="org/tiny-base", commit_message="tiny base"
            )
            .oid
        )
    spec = recipe_dict(tiny_bert, reviews, tmp_path / "runs", name="lora", r=4, alpha=8)
    spec["model"].update(id="org/tiny-base", revision=base_sha)
    spec["train"].update(epochs=2, lr=0.01)
    spec["hub"] = {"endpoint": "local", "local_root": str(root)}
    spec["push"] = {"enabled": True, "repo_id": "org/tiny-lora", "allow_failing_audit": True}
    result = run_recipe(Recipe.model_validate(spec))
    assert result.push is not None
    commit = result.push["commit"]
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    with hub_endpoint("local", local_root=root):
        config = json.loads(
            Path(
                HfApi().hf_hub_download(
                    "org/tiny-lora",
                    "adapter_config.json",
                    revision=commit,
                    cache_dir=tmp_path / "c",
                )
            ).read_text()
        )
        assert config["base_model_name_or_path"] == "org/tiny-base"  # not a local folder
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            "org/tiny-lora", revision=commit, num_labels=2, cache_dir=tmp_path / "c"
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            "org/tiny-lora", revision=commit, cache_dir=tmp_path / "c"
        )
        recipe = Recipe.model_validate(spec)
        test = load_data(recipe.data, seed=recipe.seed).splits["test"]
    with torch.no_grad():
        batch = tokenizer(
            list(test["text"]), padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(probs[:, 1], predictions["prob_pos"].to_numpy(), atol=1e-5)


def test_pushed_space_answers_in_a_browser(
    tiny_bert: Path, reviews: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pushed Space, from its repo id, loads the pushed model at its commit and answers."""
    import re
    import socket

    from hubtune.space import build_space_demo, load_app

    from .conftest import chromium

    root = tmp_path / "hub"
    spec = _pushing_spec(tiny_bert, reviews, tmp_path, root)
    result = run_recipe(Recipe.model_validate(spec))
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    recipe = Recipe.model_validate(spec)
    test = load_data(recipe.data, seed=recipe.seed).splits["test"]
    text, expected = test["text"].iloc[0], float(predictions["prob_pos"].iloc[0])
    status = json.loads((result.run_dir / "run.json").read_text())["audit"]["status"].upper()

    with hub_endpoint("local", local_root=root) as url:
        space = Path(
            snapshot_download(
                "local-user/tiny-demo", repo_type="space", cache_dir=tmp_path / "space"
            )
        )
        app = load_app(space / "app.py")
        demo = build_space_demo(source=space, endpoint=url)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app.launch(
            demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
        )
        try:
            with chromium() as browser:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.locator("#input-text textarea").fill(text)
                page.locator("#classify-button").click()
                table = page.locator("#probabilities")
                table.get_by_text("probability").wait_for()
                shown = dict(re.findall(r"(neg|pos)\s+([01]\.\d{4})", table.inner_text()))
                assert float(shown["pos"]) == pytest.approx(expected, abs=6e-5)
                page.get_by_role("tab", name="Privacy & fairness").click()
                reports = page.locator("#privacy-fairness")
                reports.get_by_text(f"Verdict: {status}").wait_for()
                assert "without differential privacy" in reports.inner_text()
        finally:
            demo.close()


def test_lora_card_cites_its_local_sources_and_its_pipeline_names_the_labels(
    tiny_bert: Path, reviews: Path, tmp_path: Path
) -> None:
    """A LoRA run pulled from and pushed to the local endpoint: its card cites base model and
    data with their cards' licences and no link to huggingface.co (where neither repo is), says
    how the test split was carved, and its pipeline() snippet answers with the label names."""
    import re

    from transformers import pipeline

    root = tmp_path / "hub"
    base_dir = tmp_path / "tiny-base"
    shutil.copytree(tiny_bert, base_dir)
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny base\n")
    data_dir = tmp_path / "reviews-repo"
    data_dir.mkdir()
    shutil.copy(reviews, data_dir / "train.csv")
    (data_dir / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# Reviews\n")
    with hub_endpoint("local", local_root=root) as url:
        api = HfApi(endpoint=url)
        api.create_repo("org/tiny-base")
        base_sha = api.upload_folder(folder_path=str(base_dir), repo_id="org/tiny-base").oid
        api.create_repo("org/reviews", repo_type="dataset")
        data_sha = api.upload_folder(
            folder_path=str(data_dir), repo_id="org/reviews", repo_type="dataset"
        ).oid
    spec = recipe_dict(tiny_bert, reviews, tmp_path / "runs", name="lora", r=4, alpha=8)
    spec["model"].update(id="org/tiny-base", revision=base_sha)
    spec["data"].update(source="org/reviews", revision=data_sha)
    spec["train"].update(epochs=2, lr=0.01)
    spec["hub"] = {"endpoint": "local", "local_root": str(root)}
    spec["push"] = {"enabled": True, "repo_id": "org/tiny-lora", "allow_failing_audit": True}
    result = run_recipe(Recipe.model_validate(spec))
    assert result.push is not None
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    with hub_endpoint("local", local_root=root):
        readme = HfApi().hf_hub_download(
            "org/tiny-lora", "README.md", revision=result.push["commit"], cache_dir=tmp_path / "c"
        )
    card = ModelCard.load(readme)
    sources = card.text.split("## Sources and licences")[1].split("##")[0]
    assert "https://huggingface.co" not in sources and sources.count("no public link") == 2
    assert "`org/tiny-base` (pulled from a Hub endpoint" in sources and base_sha in sources
    assert "`org/reviews` (pulled from a Hub endpoint" in sources and data_sha in sources
    assert "Licence: `apache-2.0`, as its model card declares" in sources
    assert "Licence: `cc-by-4.0`, as its dataset card declares" in sources
    assert "20% seeded stratified (by label) hold-out of the source's `train` split, seed 0" in (
        sources
    )
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    for evaluated in results:
        assert evaluated.dataset_type == "org/reviews" and evaluated.dataset_revision == data_sha
        assert evaluated.dataset_args == {
            "source_split": "train",
            "test_split": "20% seeded stratified (by label) hold-out of the source's train "
            "split, seed 0",
        }
    # The card's pipeline() names the labels and gives the run's own test probabilities.
    with hub_endpoint("local", local_root=root):
        recipe = Recipe.model_validate(spec)
        test = load_data(recipe.data, seed=recipe.seed).splits["test"]
        code = re.findall(r"```python\n(.*?)```", card.text, re.S)[1]
        namespace: dict = {}
        exec(compile(code, "pipeline-snippet", "exec"), namespace)
        scores = namespace["classifier"](list(test["text"]), top_k=None)
        bare = pipeline("text-classification", model="org/tiny-lora")("a good day")
    assert {s["label"] for row in scores for s in row} == {"neg", "pos"}
    prob_pos = [next(s["score"] for s in row if s["label"] == "pos") for row in scores]
    np.testing.assert_allclose(prob_pos, predictions["prob_pos"].to_numpy(), atol=1e-5)
    # Why the card passes them: a bare pipeline() reads an adapter repo's config from its base.
    # (If this starts to fail, transformers reads labels from adapter repos: simplify the card.)
    assert bare[0]["label"] in {"LABEL_0", "LABEL_1"}
