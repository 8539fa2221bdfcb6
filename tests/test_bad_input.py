"""Bad input through the real command line: one located message, a meaningful exit status, no traceback.

Each row of ``ROWS`` is one kind of input a user can get wrong. A new kind of bad input is one
new row: its setup writes the recipe (and whatever it names) and returns the arguments.

Exit status 2: the recipe, or a file, folder, model or revision it names, or the values in
the data (labels outside data.labels, a single class), cannot be used as given; `run` checks
the inputs first (as `validate --inputs` does) and reads the values before anything trains, so
no run folder is left. `validate --inputs` reads no values, so it passes those (exit 0), and
the row says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from hubtune.cli import app
from hubtune.hub import hub_endpoint, publish_folder

from .conftest import make_fake_run, make_sentiment_frame, recipe_dict

ROOT = Path(__file__).parents[1]


@dataclass
class Inputs:
    """What a row's setup may use: a folder of its own, a tiny model, a local Hub holding it."""

    tmp: Path
    model: Path
    hub_root: Path  # a local endpoint's repositories: bad-input/tiny (the tiny model), at main

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / "tiny"

    def recipe(
        self,
        *,
        data: Path | str | None = None,
        model: dict | None = None,
        local_hub: bool = False,
        **sections: dict,
    ) -> list[str]:
        """Write a recipe (the tiny model on good data, unless told otherwise); its arguments."""
        if data is None:
            data = self.tmp / "good.csv"
            make_sentiment_frame(60).to_csv(data, index=False)
        spec = recipe_dict(self.model, Path(data), self.tmp / "runs")
        spec["data"]["source"] = str(data)
        spec["model"].update(model or {})
        if local_hub:
            spec["hub"] = {"endpoint": "local", "local_root": str(self.hub_root)}
        for name, values in sections.items():
            spec.setdefault(name, {}).update(values)
        path = self.tmp / "r.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return [str(path)]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


Setup = Callable[[Inputs], list[str]]

# --------------------------------------------------------------------------- data


def empty_csv(i: Inputs) -> list[str]:
    return i.recipe(data=i.file("data.csv", ""))


def header_only_csv(i: Inputs) -> list[str]:
    return i.recipe(data=i.file("data.csv", "text,label,group\n"))


def non_utf8_csv(i: Inputs) -> list[str]:
    rows = "text,label,group\n" + "good day,pos,a\n" * 10 + "café bad,neg,b\n" * 10
    return i.recipe(data=i.file("data.csv", rows.encode("latin-1")))


def malformed_csv_row(i: Inputs) -> list[str]:
    rows = "text,label,group\n" + "good day,pos,a\n" * 10 + "bad, sad day,neg,b\n"
    return i.recipe(data=i.file("data.csv", rows))


def missing_label_column(i: Inputs) -> list[str]:
    path = i.tmp / "data.csv"
    make_sentiment_frame(60).drop(columns="label").to_csv(path, index=False)
    return i.recipe(data=path)


def label_not_in_labels(i: Inputs) -> list[str]:
    frame = make_sentiment_frame(60)
    frame.loc[[0, 1], "label"] = "meh"
    path = i.tmp / "data.csv"
    frame.to_csv(path, index=False)
    return i.recipe(data=path)


def single_class(i: Inputs) -> list[str]:
    frame = make_sentiment_frame(60).assign(label="pos")
    path = i.tmp / "data.csv"
    frame.to_csv(path, index=False)
    args = i.recipe(data=path)
    return [*args, "data.labels=null"]


def missing_data_file(i: Inputs) -> list[str]:
    return i.recipe(data=i.tmp / "no-such-file.csv")


def folder_without_data_files(i: Inputs) -> list[str]:
    folder = i.tmp / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing to train on\n")
    return i.recipe(data=folder)


def corrupt_parquet(i: Inputs) -> list[str]:
    return i.recipe(data=i.file("data.parquet", b"PAR1 this is not really parquet"))


def damaged_parquet_page(i: Inputs) -> list[str]:
    """Footer intact (so the check passes), a data page garbled: found while loading."""
    path = i.tmp / "data.parquet"
    make_sentiment_frame(2000).to_parquet(path)
    raw = bytearray(path.read_bytes())
    for k in range(200, 2000):
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))
    return i.recipe(data=path)


def corrupt_jsonl(i: Inputs) -> list[str]:
    lines = '{"text": "good day", "label": "pos", "group": "a"}\n{"text": "bad", label\n'
    return i.recipe(data=i.file("data.jsonl", lines))


def unknown_hub_dataset(i: Inputs) -> list[str]:
    return i.recipe(data="org/absent-data", local_hub=True)


# --------------------------------------------------------------------------- recipe


def yaml_syntax_error(i: Inputs) -> list[str]:
    return [str(i.file("r.yaml", "name: x\nmodel:\n  id: [unclosed\ndata:\n  source: d.csv\n"))]


def recipe_not_a_mapping(i: Inputs) -> list[str]:
    return [str(i.file("r.yaml", "- name: x\n- model: y\n"))]


def recipe_not_utf8(i: Inputs) -> list[str]:
    return [str(i.file("r.yaml", "name: x\ndescription: caf\xe9\n".encode("latin-1")))]


def recipe_is_a_folder(i: Inputs) -> list[str]:
    (i.tmp / "recipes").mkdir()
    return [str(i.tmp / "recipes")]


def recipe_missing(i: Inputs) -> list[str]:
    return [str(i.tmp / "no-such-recipe.yaml")]


def infinite_epsilon(i: Inputs) -> list[str]:
    return [*i.recipe(), "privacy.enabled=true", "privacy.target_epsilon=inf"]


# --------------------------------------------------------------------------- model


def model_without_config(i: Inputs) -> list[str]:
    folder = i.tmp / "model"
    shutil.copytree(i.model, folder)
    (folder / "config.json").unlink()
    return i.recipe(model={"id": str(folder)})


def missing_model_folder(i: Inputs) -> list[str]:
    return i.recipe(model={"id": str(i.tmp / "no-such-model")})


def model_id_is_a_file(i: Inputs) -> list[str]:
    return i.recipe(model={"id": str(i.model / "config.json")})


def pickle_only_model(i: Inputs) -> list[str]:
    import torch
    from safetensors.torch import load_file

    folder = i.tmp / "model"
    shutil.copytree(i.model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return i.recipe(model={"id": str(folder)})


def unknown_model_offline(i: Inputs) -> list[str]:
    return i.recipe(model={"id": "org/absent"})


def unknown_branch_offline(i: Inputs) -> list[str]:
    """The repo is in the Hub cache (at main), the branch is not; offline, the cache decides."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--bad-input--cached"
    if not repo.exists():
        shutil.copytree(i.model, repo / "snapshots" / ("3" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("3" * 40)
    return i.recipe(model={"id": "bad-input/cached", "revision": "no-such-branch"})


def invalid_model_id(i: Inputs) -> list[str]:
    return i.recipe(model={"id": "not a/valid id"})


def unknown_model_on_endpoint(i: Inputs) -> list[str]:
    return i.recipe(model={"id": "org/absent"}, local_hub=True)


def unknown_branch_on_endpoint(i: Inputs) -> list[str]:
    return i.recipe(model={"id": "bad-input/tiny", "revision": "no-such-branch"}, local_hub=True)


def unknown_sha_on_endpoint(i: Inputs) -> list[str]:
    return i.recipe(model={"id": "bad-input/tiny", "revision": "b" * 40}, local_hub=True)


def remote_code_from_folder_pinned_by_sha(i: Inputs) -> list[str]:
    return i.recipe(model={"trust_remote_code": True, "revision": "a" * 40})


def unknown_baseline(i: Inputs) -> list[str]:
    return i.recipe(train={"baselines": ["majority", "tfidf"]})


def policy_requirement_not_a_bool(i: Inputs) -> list[str]:
    policy = i.file("needs.yaml", "name: needs\nthresholds: {require_fairness_check: often}\n")
    return i.recipe(audit={"policy": str(policy)})


def lbfgs_head_under_privacy(i: Inputs) -> list[str]:
    return [
        *i.recipe(method={"name": "freeze", "head_fit": "lbfgs"}),
        "privacy.enabled=true",
        "privacy.target_epsilon=8",
    ]


def unknown_select_metric(i: Inputs) -> list[str]:
    return i.recipe(train={"select_metric": "f1"})


def mean_pooling_with_lora(i: Inputs) -> list[str]:
    return [*i.recipe(method={"name": "lora"}), "model.pooling=mean"]


def unknown_pooling(i: Inputs) -> list[str]:
    return [*i.recipe(), "model.pooling=average"]


def prompt_without_completion(i: Inputs) -> list[str]:
    return [
        *i.recipe(),
        "model.task=text-generation",
        "data.labels=null",
        "data.columns.prompt=text",
    ]


def language_model_with_nothing_to_train(i: Inputs) -> list[str]:
    return [*i.recipe(), "model.task=text-generation", "data.labels=null"]


def malformed_conversation(i: Inputs) -> list[str]:
    return [
        *i.recipe(method={"name": "lora"}),
        "model.task=text-generation",
        "data.labels=null",
        "data.columns.messages=text",
    ]


def messages_and_prompt(i: Inputs) -> list[str]:
    return [*malformed_conversation(i), "data.columns.prompt=text", "data.columns.completion=text"]


def chat_template_without_messages(i: Inputs) -> list[str]:
    return [
        *i.recipe(method={"name": "lora"}),
        "model.task=text-generation",
        "data.labels=null",
        "model.chat_template=chatml",
    ]


def phone_canaries_of_the_wrong_length(i: Inputs) -> list[str]:
    return [
        *chat_template_without_messages(i)[:-1],
        "audit.exposure={shape: phone, digits: 6}",
    ]


def unknown_pii_entity(i: Inputs) -> list[str]:
    return [*i.recipe(), "data.anonymize={entities: [ssn]}"]


def invalid_pii_pattern(i: Inputs) -> list[str]:
    return [*i.recipe(), "data.anonymize={patterns: {ticket: 'T[0-9'}}"]


def exposure_canaries_on_a_classifier(i: Inputs) -> list[str]:
    return [*i.recipe(), "audit.exposure={digits: 4}"]


def random_init_with_frozen_backbone(i: Inputs) -> list[str]:
    return [*i.recipe(), "model.init=random"]


def scratch_lr_zero(i: Inputs) -> list[str]:
    return [*i.recipe(), "checks.negative_transfer=true", "checks.scratch_lr=0"]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    name: str
    setup: Setup
    command: str  # run | validate (with --inputs)
    code: int
    message: str  # regex, searched in what the command printed


def both(name: str, setup: Setup, message: str) -> list[Row]:
    """Input `validate --inputs` finds: both commands exit 2 with the same message."""
    return [Row(name, setup, "run", 2, message), Row(name, setup, "validate", 2, message)]


def _fake_run(inputs: Inputs, labels: list[str]) -> Path:
    frame = pd.DataFrame(
        {"label_id": [0, 1, 1, 0], "prediction_id": [0, 1, 0, 0], "group": ["a", "b", "a", "b"]}
    )
    return make_fake_run(inputs.run_dir, frame, label_names=labels, sensitive=["group"])


def mitigate_without_validation_predictions(inputs: Inputs) -> list[str]:
    return [str(_fake_run(inputs, ["neg", "pos"]))]


def mitigate_three_classes(inputs: Inputs) -> list[str]:
    return [str(_fake_run(inputs, ["x", "y", "z"]))]


def mitigate_not_a_run(inputs: Inputs) -> list[str]:
    inputs.run_dir.mkdir(parents=True)
    return [str(inputs.run_dir)]


def mitigate_unknown_constraint(inputs: Inputs) -> list[str]:
    return [str(_fake_run(inputs, ["neg", "pos"])), "--constraint", "parity"]


ROWS: list[Row] = [
    *both("empty-csv", empty_csv, r"data file \S+data\.csv is empty \(0 bytes\)\. It needs the columns text, label, group"),
    *both("header-only-csv", header_only_csv, r"data file \S+data\.csv has a header but no rows"),
    *both("non-utf8-csv", non_utf8_csv, r"data file \S+data\.csv: line 12 is not UTF-8 text \(byte 0xe9 at column 4.*Save the file as UTF-8"),
    *both("malformed-csv-row", malformed_csv_row, r"data file \S+data\.csv cannot be parsed as CSV: .*Expected 3 fields in line 12, saw 4.*Quote fields"),
    *both("missing-label-column", missing_label_column, r"data file \S+data\.csv has no column\(s\) \['label'\]; it has \['text', 'group'\]\. Name the file's columns under data\.columns"),
    Row("label-not-in-labels", label_not_in_labels, "run", 2, r"2 rows have label values that are not among the labels \['neg', 'pos'\]: 'meh' \(2 rows\).*data\.labels"),
    Row("label-not-in-labels", label_not_in_labels, "validate", 0, r": ok \(freeze"),
    Row("single-class", single_class, "run", 2, r"label column 'label' has 1 distinct value\(s\); a classifier needs at least 2"),
    Row("single-class", single_class, "validate", 0, r": ok \(freeze"),
    *both("missing-data-file", missing_data_file, r"data\.source '\S+no-such-file\.csv' does not exist \(looked for \S+\); fix data\.source"),
    *both("folder-without-data-files", folder_without_data_files, r"data\.source '\S+data': no csv/tsv/jsonl/parquet files, and no image class folders"),
    *both("corrupt-parquet", corrupt_parquet, r"data file \S+data\.parquet is not a readable Parquet file .*copy it again, or write it again"),
    Row("damaged-parquet-page", damaged_parquet_page, "run", 2, r"data\.source '\S+data\.parquet': cannot be read as parquet: OSError: .*Fix or re-create the file"),
    Row("damaged-parquet-page", damaged_parquet_page, "validate", 0, r": ok \(freeze"),
    *both("corrupt-jsonl", corrupt_jsonl, r"data file \S+data\.jsonl: line 2 is not valid JSON \(.*\)\. A \.jsonl file holds one JSON object per line"),
    *both("unknown-hub-dataset", unknown_hub_dataset, r"data\.source 'org/absent-data': no such file or folder here .*no data set repository of that id on http://127\.0\.0\.1:\d+"),
    *both("yaml-syntax-error", yaml_syntax_error, r"r\.yaml:4: <root>: not valid YAML: .*\n +hint: check indentation"),
    *both("recipe-not-a-mapping", recipe_not_a_mapping, r"r\.yaml:1: <root>: a recipe must be a YAML mapping, not a list"),
    *both("recipe-not-utf8", recipe_not_utf8, r"r\.yaml:2: <root>: not UTF-8 text \(byte 0xe9\)\n +hint: save the recipe as UTF-8"),
    *both("recipe-is-a-folder", recipe_is_a_folder, r"recipes: <root>: is a folder, not a recipe file"),
    *both("recipe-missing", recipe_missing, r"recipe not found: \S+no-such-recipe\.yaml \(give a path, or a shipped recipe name: "),
    *both("infinite-epsilon", infinite_epsilon, r"privacy\.target_epsilon: Input should be a finite number \(set on the command line\)\n +hint: give `privacy\.target_epsilon` a finite number"),
    *both("model-without-config", model_without_config, r"model '\S+model': no config\.json in \S+, so this is not a transformers model folder"),
    *both("missing-model-folder", missing_model_folder, r"model '\S+no-such-model': local directory does not exist .*fix model\.id"),
    *both("model-id-is-a-file", model_id_is_a_file, r"model '\S+config\.json' is a file; model\.id names the folder"),
    *both("pickle-only-model", pickle_only_model, r"model '\S+model' has only pickle weights \(pytorch_model\.bin\).*model\.allow_pickle: true"),
    *both("unknown-model-offline", unknown_model_offline, r"model 'org/absent' at revision 'main' is not in the local Hub cache \(.*the cache has no copy of it\), and HF_HUB_OFFLINE is set"),
    *both("unknown-branch-offline", unknown_branch_offline, r"model 'bad-input/cached' at revision 'no-such-branch' is not in the local Hub cache \(.*; the cache has it at main\), and HF_HUB_OFFLINE is set"),
    *both("invalid-model-id", invalid_model_id, r"model 'not a/valid id': no such folder here \(.*\), and not a valid Hub repo id"),
    *both("unknown-model-on-endpoint", unknown_model_on_endpoint, r"model 'org/absent': no such folder here \(.*\), and no model repository of that id on http://127\.0\.0\.1:\d+"),
    *both("unknown-branch-on-endpoint", unknown_branch_on_endpoint, r"model 'bad-input/tiny' has no revision 'no-such-branch' on http://127\.0\.0\.1:\d+\. Set model\.revision to an existing branch"),
    *both("unknown-sha-on-endpoint", unknown_sha_on_endpoint, r"model 'bad-input/tiny' has no revision 'b{40}' on http://127\.0\.0\.1:\d+"),
    *both("unknown-baseline", unknown_baseline, r"train\.baselines\.1: Input should be 'majority' or 'classical'"),
    *both("policy-requirement-not-a-bool", policy_requirement_not_a_bool, r"r\.yaml:\d+: audit\.policy: \S+needs\.yaml: invalid audit policy\n +thresholds\.require_fairness_check: Input should be a valid boolean"),
    *both("lbfgs-head-under-privacy", lbfgs_head_under_privacy, r"method\.head_fit: lbfgs is not differentially private .*Use head_fit: auto or sgd"),
    *both("unknown-select-metric", unknown_select_metric, r"train\.select_metric: Input should be 'accuracy', 'macro_f1' or 'loss'"),
    *both("mean-pooling-with-lora", mean_pooling_with_lora, r"model\.pooling: mean with method\.name: lora is refused: .*Use model\.pooling: auto or native with LoRA"),
    *both("unknown-pooling", unknown_pooling, r"model\.pooling: Input should be 'auto', 'native', 'mean', 'cls', 'max' or 'mean_sqrt_len'"),
    *both("prompt-without-completion", prompt_without_completion, r"data\.columns: .*columns\.prompt is set without columns\.completion: .*Add columns\.completion"),
    *both("language-model-with-nothing-to-train", language_model_with_nothing_to_train, r"model\.task: text-generation: method\.name: freeze with no unfreeze_top_k leaves a language model nothing to learn.*set method\.unfreeze_top_k >= 1, or use lora or full"),
    Row("malformed-conversation", malformed_conversation, "run", 2, r"split 'train', row \d+: data\.columns\.messages \('text'\) is not a chat conversation: not JSON .*Each value must be a list of \{\"role\": \.\.\., \"content\": \.\.\.\} messages"),
    Row("malformed-conversation", malformed_conversation, "validate", 0, r": ok \(lora"),
    *both("messages-and-prompt", messages_and_prompt, r"columns\.messages and columns\.prompt/completion are two shapes of the same data; give one"),
    *both("chat-template-without-messages", chat_template_without_messages, r"model\.chat_template renders data\.columns\.messages, which is not set; remove it or give data\.columns\.messages"),
    *both("phone-canaries-of-the-wrong-length", phone_canaries_of_the_wrong_length, r"audit\.exposure: .*shape: phone draws 7 random digits .*set digits: 7"),
    *both("unknown-pii-entity", unknown_pii_entity, r"data\.anonymize: entities \['ssn'\] are unknown; known: person, email, phone"),
    *both("invalid-pii-pattern", invalid_pii_pattern, r"data\.anonymize: data\.anonymize\.patterns\.ticket: 'T\[0-9' is not a valid regular expression"),
    *both("random-init-with-frozen-backbone", random_init_with_frozen_backbone, r"model\.init: random starts every weight from scratch, so there is nothing pretrained to freeze or adapt; method\.name: freeze .*Use method: \{name: full\}"),
    *both("scratch-lr-zero", scratch_lr_zero, r"checks\.scratch_lr: Input should be greater than 0"),
    *both("exposure-canaries-on-a-classifier", exposure_canaries_on_a_classifier, r"audit\.exposure plants secrets for a language model .*Remove audit\.exposure"),
    *both("remote-code-from-folder-pinned-by-sha", remote_code_from_folder_pinned_by_sha, r"r\.yaml:\d+: model: trust_remote_code: true runs the Python code in the local folder"),
    Row("mitigate-without-validation-predictions", mitigate_without_validation_predictions, "mitigate", 2, r"hubtune mitigate: \S+tiny has no validation_predictions\.parquet: .*re-run the training"),
    Row("mitigate-three-classes", mitigate_three_classes, "mitigate", 2, r"hubtune mitigate: \S+tiny: threshold post-processing is defined for two classes .*this run has 3"),
    Row("mitigate-not-a-run", mitigate_not_a_run, "mitigate", 2, r"hubtune mitigate: \S+tiny is not a complete run \(no run\.json\)"),
    Row("mitigate-unknown-constraint", mitigate_unknown_constraint, "mitigate", 2, r"hubtune mitigate: --constraint must be one of \['equalized_odds', 'demographic_parity'\], not 'parity'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    root = tmp_path_factory.mktemp("hub")
    with hub_endpoint("local", local_root=root) as url:
        publish_folder(tiny_bert, repo_id="bad-input/tiny", endpoint=url)
    return root


def _invoke(command: str, args: list[str]) -> Result:
    extra = ["--inputs"] if command == "validate" else []
    return CliRunner().invoke(app, [command, *extra, *args])


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.command}-{r.name}" for r in ROWS])
def test_bad_input_gives_one_located_message(
    row: Row, tiny_bert: Path, hub_root: Path, tmp_path: Path
) -> None:
    inputs = Inputs(tmp=tmp_path, model=tiny_bert, hub_root=hub_root)
    result = _invoke(row.command, row.setup(inputs))
    printed = result.output
    # An exception other than the deliberate exit is what prints a traceback outside CliRunner.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in printed
    assert result.exit_code == row.code, printed
    assert re.search(row.message, printed), printed
    if row.code:
        stderr = result.stderr
        assert re.search(row.message, stderr) and not result.stdout, printed
        # One message: the recipe's own report, or one `hubtune COMMAND: ...`.
        assert stderr.count(f"hubtune {row.command}:") <= 1, stderr
    if row.command == "run":
        assert not (inputs.run_dir / "run.json").exists()
        assert not inputs.run_dir.exists(), sorted(inputs.run_dir.rglob("*"))


HEADLINE = ["empty-csv", "non-utf8-csv", "unknown-model-on-endpoint", "unknown-branch-on-endpoint"]


@pytest.mark.parametrize("name", HEADLINE)
def test_headline_cases_in_a_real_process(
    name: str, tiny_bert: Path, hub_root: Path, tmp_path: Path
) -> None:
    """The console entry point in its own process: exit 2, one line on stderr, no traceback."""
    row = next(r for r in ROWS if r.name == name and r.command == "run")
    args = row.setup(Inputs(tmp=tmp_path, model=tiny_bert, hub_root=hub_root))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "hubtune", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.strip()]
    assert line.startswith("hubtune run: ") and re.search(row.message, line), out.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_input_with_overwrite_keeps_the_previous_run(tiny_bert: Path, tmp_path: Path) -> None:
    """The inputs are checked before --overwrite deletes anything."""
    inputs = Inputs(tmp=tmp_path, model=tiny_bert, hub_root=tmp_path / "hub")
    make_fake_run(
        inputs.run_dir,
        pd.DataFrame({"label_id": [0, 1], "prediction_id": [0, 1], "group": ["a", "b"]}),
        label_names=["neg", "pos"],
        sensitive=["group"],
    )
    result = CliRunner().invoke(app, ["run", *empty_csv(inputs), "--overwrite"])
    assert result.exit_code == 2 and "is empty (0 bytes)" in result.stderr, result.output
    assert (inputs.run_dir / "run.json").exists()


def test_validate_without_inputs_checks_only_the_recipe(tmp_path: Path) -> None:
    """So shipped recipes validate where their data and models are not (CI, a laptop)."""
    path = tmp_path / "r.yaml"
    spec = recipe_dict(tmp_path / "no-model", tmp_path / "no-data.csv", tmp_path / "runs")
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and ": ok (" in result.output, result.output
    checked = CliRunner().invoke(app, ["validate", "--inputs", str(path)])
    assert checked.exit_code == 2, checked.output
    # Both problems at once, one per line.
    assert "no-model': local directory does not exist" in checked.stderr
    assert "no-data.csv' does not exist" in checked.stderr


def test_validate_inputs_says_what_it_found(
    tiny_bert: Path, hub_root: Path, tmp_path: Path
) -> None:
    inputs = Inputs(tmp=tmp_path, model=tiny_bert, hub_root=hub_root)
    args = inputs.recipe(model={"id": "bad-input/tiny"}, local_hub=True)
    result = CliRunner().invoke(app, ["validate", "--inputs", *args])
    assert result.exit_code == 0, result.output
    assert re.search(r"model bad-input/tiny@main: commit [0-9a-f]{40}", result.output)
    assert "1 csv file(s) (train), columns ['text', 'label', 'group'] present" in result.output
