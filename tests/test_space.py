"""The Gradio Space: rendered repo files, and the app itself in a real browser.

The app is served in-process on a loopback port from a tiny run directory (local-model mode)
and driven through Playwright with Debian's Chromium (/usr/bin/chromium); no browser is
downloaded and nothing leaves the machine (tests/conftest.py blocks non-loopback sockets, and
the page's own requests are checked to stay on the loopback server).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError

from hubtune.space import (
    CONFIG_FILE,
    SPACE_GRADIO_VERSION,
    SpaceError,
    build_space_demo,
    load_app,
    local_space_config,
    render_space,
    template_dir,
)

from .conftest import chromium, make_tiny_bert
from .netguard import ATTEMPT_MARK, CHILD_PREAMBLE

SHA = "0123456789abcdef0123456789abcdef01234567"
LABELS = ["neg", "pos"]
PRIVACY = {
    "schema_version": 1,
    "epsilon": 3.2147,
    "delta": 1e-5,
    "accountant": "prv",
    "epsilon_by_accountant": {"prv": 3.2147, "rdp": 3.6},
    "noise_multiplier": 1.1,
    "max_grad_norm": 1.0,
    "sample_rate": 0.05,
    "steps": 120,
    "unit": "example",
}
AUDIT = {
    "schema_version": 1,
    "policy": {"name": "default", "description": "Equalized odds within 0.1."},
    "verdict": {
        "status": "fail",
        "passed": False,
        "checks": [
            {
                "check": "equalized odds difference",
                "scope": "group",
                "value": 0.31,
                "judged_value": 0.31,
                "rule": "≤ 0.1",
                "passed": False,
            }
        ],
        "failed": ["equalized odds difference (group)"],
    },
    "privacy": {"dp": True, "epsilon": 3.2147, "delta": 1e-5, "accountant": "prv"},
    "fairness": {
        "slices": [
            {
                "name": "group",
                "disparities": {
                    "demographic_parity_difference": {"value": 0.22},
                    "equalized_odds_difference": {"value": 0.31},
                    "largest_gap": {
                        "accuracy": {"value": 0.125, "highest": "a", "lowest": "c"},
                        "tpr": {"value": 0.31, "highest": "b", "lowest": "a"},
                    },
                },
            }
        ]
    },
    "membership": {"auc": {"value": 0.512}},
}


def _audit_with_intervals() -> dict[str, Any]:
    """AUDIT as `hubtune audit` writes it: with its metrics list and confidence intervals."""
    audit = copy.deepcopy(AUDIT)
    audit["verdict"]["checks"][0].update(ci=[0.25, 0.37], threshold=0.1, judged_on="estimate")
    fairness = audit["fairness"]
    fairness.update(
        metrics=["accuracy", "selection_rate", "tpr", "fpr", "count"],
        ci_level=0.95,
    )
    disparities = fairness["slices"][0]["disparities"]
    disparities["demographic_parity_difference"]["ci"] = [0.12, 0.3]
    disparities["equalized_odds_difference"]["ci"] = [0.25, 0.37]
    disparities["largest_gap"]["accuracy"]["ci"] = [0.05, 0.2]
    disparities["largest_gap"]["tpr"]["ci"] = [0.2, 0.42]
    disparities["largest_gap"]["selection_rate"] = {
        "value": 0.22,
        "ci": [0.12, 0.3],
        "highest": "b",
        "lowest": "c",
    }
    return audit


def _make_run(root: Path, tiny_bert: Path, *, dp: bool = True, audit: bool = True) -> Path:
    """A finished run as `hubtune run` leaves it: model/, run.json, recipe, privacy, audit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = root / "tiny-run"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    with torch.no_grad():  # a head that gives clearly different probabilities per text
        model.classifier.weight.normal_(0, 0.4)
    model.save_pretrained(run_dir / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(run_dir / "model")
    (run_dir / "recipe.resolved.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "tiny-run",
                "model": {"id": str(tiny_bert), "max_length": 32},
                "data": {"columns": {"text": "text", "label": "label"}, "labels": LABELS},
            }
        )
    )
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "name": "tiny-run",
                "versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2"},
                "base_model": {
                    "spec": str(tiny_bert),
                    "local_dir": str(tiny_bert),
                    "kind": "local",
                    "sha": "sha256:" + "0" * 64,
                },
                "data": {"label_names": LABELS},
                "outputs": {"model_dir": "model"},
            }
        )
    )
    if dp:
        (run_dir / "privacy.json").write_text(json.dumps(PRIVACY))
    if audit:
        (run_dir / "audit").mkdir()
        (run_dir / "audit" / "audit.json").write_text(json.dumps(AUDIT))
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("space-run")
    return _make_run(root, make_tiny_bert(root / "tiny-bert"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _softmax(run_dir: Path, text: str) -> dict[str, float]:
    """The model's own class probabilities, computed here without the app."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = run_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        text, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits[0], dim=-1).tolist()
    return {model.config.id2label[i]: p for i, p in enumerate(probs)}


# --------------------------------------------------------------------------- rendering


def test_render_space_writes_a_valid_space_repo(tiny_run: Path, tmp_path: Path) -> None:
    from huggingface_hub import SpaceCard

    out = render_space(
        run_dir=tiny_run, model_repo_id="me/tiny-run", model_revision=SHA, out_dir=tmp_path / "sp"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "app.py",
        "requirements.txt",
        CONFIG_FILE,
    ]
    card = SpaceCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == SPACE_GRADIO_VERSION
    assert meta["app_file"] == "app.py"
    assert meta["models"] == ["me/tiny-run"]
    assert meta["license"] == "apache-2.0"
    assert meta["colorFrom"] in {
        "red",
        "yellow",
        "green",
        "blue",
        "indigo",
        "purple",
        "pink",
        "gray",
    }
    assert meta["colorTo"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert {"hubtune", "differential-privacy", "fairness-audit"} <= set(meta["tags"])
    assert len(meta["short_description"]) <= 60
    assert meta["title"] and meta["emoji"]
    assert "ε = 3.21" in card.text and "FAIL" in card.text and SHA in card.text

    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_repo_id"] == "me/tiny-run"
    assert config["model_revision"] == SHA
    assert config["labels"] == LABELS
    assert config["max_length"] == 32
    assert "model_path" not in config
    text = (out / CONFIG_FILE).read_text()
    assert str(tiny_run) not in text and "/tmp" not in text and "hf_" not in text
    assert not any(isinstance(v, str) and v.startswith("/") for v in config.values())

    assert (out / "app.py").read_text() == (template_dir() / "app.py").read_text()
    requirements = (out / "requirements.txt").read_text()
    pins = dict(
        line.split("==") for line in requirements.splitlines() if line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"  # the run's 2.13.0+cpu, without the local label
    assert pins["transformers"] == "5.24.0"
    assert {"peft", "huggingface_hub"} <= set(pins)
    assert "gradio" not in pins  # the Space SDK provides it (sdk_version)


def test_render_space_defaults_to_run_dir_and_without_dp(tmp_path: Path, tiny_bert: Path) -> None:
    from huggingface_hub import SpaceCard

    run_dir = _make_run(tmp_path, tiny_bert, dp=False, audit=False)
    out = render_space(run_dir=run_dir, model_repo_id="me/tiny-run", model_revision=SHA)
    assert out == run_dir / "space"
    card = SpaceCard.load(out / "README.md")
    assert "differential-privacy" not in card.data.to_dict()["tags"]
    assert "trained without differential privacy" in card.text
    assert "not audited" in card.text


@pytest.mark.parametrize(
    ("repo_id", "revision", "message"),
    [
        ("me/tiny-run", "main", "commit SHA"),
        ("me/tiny-run", SHA[:12], "commit SHA"),
        ("not a repo", SHA, "owner/name"),
        ("/abs/path", SHA, "owner/name"),
    ],
)
def test_render_space_refuses_unpinned_or_bad_ids(
    tiny_run: Path, tmp_path: Path, repo_id: str, revision: str, message: str
) -> None:
    with pytest.raises(SpaceError, match=message):
        render_space(
            run_dir=tiny_run, model_repo_id=repo_id, model_revision=revision, out_dir=tmp_path
        )


def test_render_space_refuses_an_unfinished_run(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="run.json"):
        render_space(run_dir=tmp_path, model_repo_id="me/x", model_revision=SHA)


def test_local_config_has_only_relative_paths(tiny_run: Path) -> None:
    config = local_space_config(run_dir=tiny_run)
    assert config["model_path"] == "model"
    assert config["reports_path"] == "."
    assert "model_repo_id" not in config


def test_report_texts_from_app() -> None:
    app = load_app()
    text = app.privacy_markdown(PRIVACY, AUDIT)
    assert "ε = 3.2" in text and "PRV" in text and "RDP ε = 3.60" in text
    assert "without differential privacy" in app.privacy_markdown(None, {"privacy": {"dp": False}})
    assert "no differential-privacy claim" in app.privacy_markdown(None, None)
    # A DP run whose privacy.json is missing still shows the audit's record of its guarantee.
    assert "ε = 3.2" in app.privacy_markdown(None, AUDIT)
    fairness = app.fairness_markdown(AUDIT)
    assert "Verdict: FAIL" in fairness
    assert fairness.index("| tpr |") < fairness.index("| accuracy |")  # largest gap first
    assert "No fairness audit" in app.fairness_markdown(None)
    # Names from the audit cannot inject Markdown or HTML.
    hostile = {"verdict": {"status": "pass"}, "policy": {"name": "<img src=x onerror=alert(1)>"}}
    assert "<img" not in app.fairness_markdown(hostile)


def test_input_limits_and_errors_are_enforced_server_side() -> None:
    import gradio as gr

    app = load_app()

    def boom(text: str) -> dict[str, float]:
        raise RuntimeError("secret detail /srv/model")

    ok = app.make_predict(lambda text: {"neg": 0.25, "pos": 0.75}, 10)
    probs, table = ok("good")
    assert probs == {"neg": 0.25, "pos": 0.75}
    assert table.splitlines()[2] == "| pos | 0.7500 |"
    with pytest.raises(gr.Error, match="at most 10"):
        ok("x" * 11)
    with pytest.raises(gr.Error, match="type some text"):
        ok("   ")
    with pytest.raises(gr.Error) as info:
        app.make_predict(boom, 10)("good")
    assert info.value.message == app.GENERIC_ERROR
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_config_carries_the_reports_metric_names(tiny_run: Path, tmp_path: Path) -> None:
    """One source of display names: the audit report's helper, shipped in space_config.json."""
    from hubtune.audit.report import metric_label

    out = render_space(
        run_dir=tiny_run, model_repo_id="me/tiny-run", model_revision=SHA, out_dir=tmp_path / "sp"
    )
    names = json.loads((out / CONFIG_FILE).read_text())["metric_names"]
    keys = {"accuracy", "tpr", "demographic_parity_difference", "equalized_odds_difference"}
    assert names == {key: metric_label(key) for key in keys}
    assert names["tpr"] == "TPR" and names["equalized_odds_difference"] == (
        "Equalized odds difference"
    )
    assert local_space_config(run_dir=tiny_run)["metric_names"] == names


def test_gap_table_has_the_reports_names_and_the_audits_intervals() -> None:
    from hubtune.audit.report import metric_label

    app = load_app()
    audit = _audit_with_intervals()
    names = {key: metric_label(key) for key in ("accuracy", "selection_rate", "tpr")}
    names["equalized_odds_difference"] = metric_label("equalized_odds_difference")
    text = app.fairness_markdown(audit, metric_names=names)
    assert "| metric | gap (95% confidence interval) | highest | lowest |" in text
    assert "| TPR | 0.310 (0.200–0.420) | b | a |" in text
    assert "| Selection rate | 0.220 (0.120–0.300) | b | c |" in text
    assert "| Accuracy | 0.125 (0.050–0.200) | a | c |" in text
    assert "| tpr |" not in text and "selection_rate" not in text
    assert "Equalized odds difference 0.310 (0.250–0.370)" in text


def test_verdict_in_plain_words() -> None:
    from hubtune.audit.report import metric_label

    app = load_app()
    names = {"equalized_odds_difference": metric_label("equalized_odds_difference")}
    failing = app.verdict_markdown(_audit_with_intervals(), metric_names=names)
    assert "Fairness audit: FAIL" in failing and "**failed**" in failing
    assert (
        "- Equalized odds difference (group) is 0.310 (0.250–0.370); "
        "the policy allows at most 0.100." in failing
    )
    passing = {"verdict": {"status": "pass", "checks": []}, "policy": {"name": "default"}}
    assert "Fairness audit: PASS" in app.verdict_markdown(passing)
    unsure = {
        "verdict": {
            "status": "inconclusive",
            "checks": [{"check": "tpr gap", "scope": "group", "passed": None}],
        },
        "policy": {"name": "strict"},
    }
    text = app.verdict_markdown(unsure, metric_names={"tpr": "TPR"})
    assert "Fairness audit: INCONCLUSIVE" in text and "- Largest TPR gap (group)" in text
    assert "No fairness audit was published" in app.verdict_markdown(None)


def test_rendered_space_needs_its_pinned_repo_offline(tiny_run: Path, tmp_path: Path) -> None:
    """Hub mode really goes to the Hub: offline and uncached, it fails instead of guessing."""
    out = render_space(
        run_dir=tiny_run, model_repo_id="me/tiny-run", model_revision=SHA, out_dir=tmp_path / "sp"
    )
    with pytest.raises(LocalEntryNotFoundError, match="outgoing traffic has been disabled"):
        build_space_demo(source=out)


def test_hub_mode_loads_the_pinned_commit_and_its_reports(tiny_run: Path, tmp_path: Path) -> None:
    """Weights and reports come from the model repo at the pinned SHA, not from main."""
    import torch

    cache = Path(os.environ["HF_HUB_CACHE"]) / "models--me--tiny-hub"
    pinned, newer = cache / "snapshots" / SHA, cache / "snapshots" / ("f" * 40)
    shutil.copytree(tiny_run / "model", pinned)
    shutil.copy(tiny_run / "privacy.json", pinned / "privacy.json")
    shutil.copytree(tiny_run / "audit", pinned / "audit")
    shutil.copytree(tiny_run / "model", newer)
    from safetensors.torch import load_file, save_file

    weights = load_file(newer / "model.safetensors")
    weights["classifier.bias"] = torch.tensor([5.0, -5.0])
    save_file(weights, newer / "model.safetensors", metadata={"format": "pt"})
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("f" * 40)

    out = render_space(
        run_dir=tiny_run, model_repo_id="me/tiny-hub", model_revision=SHA, out_dir=tmp_path / "sp"
    )
    app = load_app(out / "app.py")
    config = app.load_config(out / CONFIG_FILE)
    classifier = app.load_classifier(config, base_dir=out)
    text = "so sad and awful"
    assert classifier.probabilities(text) == pytest.approx(_softmax(tiny_run, text), abs=1e-6)
    assert app._read_report(config, "privacy.json", out, None)["epsilon"] == PRIVACY["epsilon"]
    assert app._read_report(config, "audit/audit.json", out, None)["verdict"]["status"] == "fail"
    assert build_space_demo(source=out) is not None


def test_lora_adapter_run_is_served_on_its_base_model(tmp_path: Path, tiny_bert: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = _make_run(tmp_path, tiny_bert)
    base = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(run_dir / "model").save_pretrained(run_dir / "adapter")
    # The adapter names its base; the run's own model/ folder stands in for it here.
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(run_dir / "model")
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    info = json.loads((run_dir / "run.json").read_text())
    info["outputs"] = {"model_dir": "adapter"}
    (run_dir / "run.json").write_text(json.dumps(info))

    app = load_app()
    classifier = app.load_classifier(local_space_config(run_dir=run_dir), base_dir=run_dir)
    text = "a nice happy day"
    batch = classifier.tokenizer(text, return_tensors="pt")
    peft_model.eval()
    with torch.no_grad():
        expected = torch.softmax(peft_model(**batch).logits[0], dim=-1).tolist()
    assert list(classifier.probabilities(text).values()) == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(list(_softmax(run_dir, text).values()), abs=1e-3)

    # Rendering for the Hub needs a Hub base model for the adapter.
    with pytest.raises(SpaceError, match="base_model_repo_id"):
        render_space(run_dir=run_dir, model_repo_id="me/tiny-lora", model_revision=SHA)
    out = render_space(
        run_dir=run_dir,
        model_repo_id="me/tiny-lora",
        model_revision=SHA,
        base_model_repo_id="org/tiny-base",
        base_model_revision="e" * 40,
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["base_model_repo_id"] == "org/tiny-base"
    assert config["base_model_revision"] == "e" * 40


def test_serve_space_runs_a_run_dir_offline(tiny_run: Path) -> None:
    """serve_space (what `hubtune space serve RUN_DIR` calls) answers on loopback only."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    # The child runs under the same network guard as the tests (loopback only).
    code = (
        CHILD_PREAMBLE + "import sys; from hubtune.space import serve_space; "
        f"serve_space(source=sys.argv[1], port={port})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tiny_run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180  # gradio imports slowly on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as resp:
                    config = json.loads(resp.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"serve_space did not come up: {proc.communicate()[0][-3000:]}")
                time.sleep(0.25)
        labels = [c.get("props", {}).get("label") for c in config["components"]]
        assert "Privacy & fairness" in labels and "Prediction" in labels
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert ATTEMPT_MARK not in output, output[-3000:]


# --------------------------------------------------------------------------- browser


def test_app_in_a_browser(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app()
    real = app.Classifier.probabilities

    def probabilities(self: Any, text: str) -> dict[str, float]:
        if "explode" in text:
            raise RuntimeError("secret internal detail /srv/weights Traceback")
        return real(self, text)

    monkeypatch.setattr(app.Classifier, "probabilities", probabilities)
    demo = build_space_demo(source=tiny_run)  # local-model mode, straight from the run dir
    port = _free_port()
    app.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    url = f"http://127.0.0.1:{port}/"
    foreign: list[str] = []
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.on(
                "request",
                lambda request: (
                    None
                    if request.url.startswith((url, "data:", "blob:"))
                    else foreign.append(request.url)
                ),
            )
            page.goto(url)
            textbox = page.locator("#input-text textarea")
            button = page.locator("#classify-button")
            output = page.locator("#prediction")
            table = page.locator("#probabilities")

            text = "the movie was great and lovely"
            expected = _softmax(tiny_run, text)
            textbox.fill(text)
            button.click()
            top = max(expected, key=expected.__getitem__)
            table.get_by_text("probability").wait_for()
            shown = dict(re.findall(r"(neg|pos)\s+([01]\.\d{4})", table.inner_text()))
            assert {k: float(v) for k, v in shown.items()} == pytest.approx(expected, abs=5e-5)
            label_text = output.inner_text()
            assert top in label_text
            for name, p in expected.items():
                assert f"{round(p * 100)}%" in label_text, (name, label_text)

            page.get_by_role("tab", name="Privacy & fairness").click()
            reports = page.locator("#privacy-fairness")
            reports.get_by_text("Verdict: FAIL").wait_for()
            body = reports.inner_text()
            assert "ε = 3.21" in body and "δ = 1e-05" in body and "PRV" in body
            assert "equalized odds difference" in body and "TPR" in body
            page.get_by_role("tab", name="Classify").click()

            textbox.fill("x" * 2001)
            button.click()
            page.get_by_text("accepts at most 2000").first.wait_for()
            page.get_by_text("at most 2000").first.wait_for()

            textbox.fill("please explode now")
            button.click()
            page.get_by_text(app.GENERIC_ERROR).first.wait_for()
            content = page.content()
            assert "secret internal detail" not in content
            assert "Traceback" not in content and "/srv/weights" not in content
    finally:
        demo.close()
    assert not foreign, f"the page requested other hosts: {foreign}"


def test_space_privacy_text_for_a_void_guarantee_and_a_re_planned_noise() -> None:
    app = load_app()
    void = {**PRIVACY, "noise_source": "fixed by HUBTUNE_UNSAFE_DP_SEED (testing only)"}
    text = app.privacy_markdown(void, AUDIT)
    assert "has no privacy guarantee" in text and "ε = 3.2" not in text
    segments = {
        **PRIVACY,
        "noise_multiplier": None,
        "noise": "σ 0.9 for 20 steps, then 1.1 for 20 steps",
    }
    assert (
        "| noise multiplier σ | 0.9 for 20 steps, then 1.1 for 20 steps |"
        in app.privacy_markdown(segments, AUDIT)
    )


def test_classify_tab_shows_the_verdict_and_clears_after_errors(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside each prediction, the audit verdict; after an error, no stale probabilities."""
    run_dir = _make_run(tmp_path, tiny_bert)
    (run_dir / "audit" / "audit.json").write_text(json.dumps(_audit_with_intervals()))
    app = load_app()
    real = app.Classifier.probabilities

    def probabilities(self: Any, text: str) -> dict[str, float]:
        if "explode" in text:
            raise RuntimeError("model failure")
        return real(self, text)

    monkeypatch.setattr(app.Classifier, "probabilities", probabilities)
    demo = build_space_demo(source=run_dir)
    port = _free_port()
    app.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            verdict = page.locator("#audit-verdict")
            verdict.get_by_text("Fairness audit: FAIL").wait_for()
            assert verdict.is_visible()  # on the Classify tab, without opening another
            assert (
                "Equalized odds difference (group) is 0.310 (0.250–0.370); the policy allows "
                "at most 0.100." in verdict.inner_text()
            )
            textbox = page.locator("#input-text textarea")
            button = page.locator("#classify-button")
            table = page.locator("#probabilities")
            output = page.locator("#prediction")
            for bad_input, message in (("   ", "type some text"), ("explode", app.GENERIC_ERROR)):
                textbox.fill("a great and lovely day")
                button.click()
                table.get_by_text("probability").wait_for()
                assert "%" in output.inner_text()
                textbox.fill(bad_input)
                button.click()
                page.get_by_text(message).first.wait_for()
                page.wait_for_function(
                    "() => !document.querySelector('#probabilities').innerText.trim()"
                )
                assert "probability" not in table.inner_text()
                assert "%" not in output.inner_text(), (bad_input, output.inner_text())
                page.screenshot(path=str(tmp_path / f"after-error-{len(bad_input)}.png"))
            page.get_by_role("tab", name="Privacy & fairness").click()
            reports = page.locator("#privacy-fairness")
            reports.get_by_text("Verdict: FAIL").wait_for()
            body = reports.inner_text()
            assert "TPR" in body and "0.310 (0.200–0.420)" in body and "Selection rate" in body
            assert "selection_rate" not in body
    finally:
        demo.close()
