"""Personal data: detection (Presidio + spaCy), scrubbing, data.anonymize in runs, scan, gate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hubtune import pii
from hubtune.recipe import AnonymizeSection, DataSection, Recipe

TEXT = (
    "Hi, I'm John Smith from Boston. Mail john.smith@example.com or call (212) 555-0199. "
    "Card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, IP 192.168.1.10, see "
    "https://example.org/x u/throwaway42 and @jsmith99. I was born on 3 March 1985."
)
EXPECTED = {
    "person": "John Smith",
    "location": "Boston",
    "email": "john.smith@example.com",
    "phone": "(212) 555-0199",
    "credit_card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "ip_address": "192.168.1.10",
    "url": "https://example.org/x",
    "date_of_birth": "3 March 1985",
}


@pytest.fixture(scope="module")
def detector() -> pii.Detector:
    return pii.Detector(patterns={"employee_id": r"\bE[0-9]{6}\b"})


def _found(detector: pii.Detector, text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for span in detector.detect([text])[0]:
        out.setdefault(span.entity, []).append(text[span.start : span.end])
    return out


def test_every_entity_type_is_found_with_its_exact_span(detector: pii.Detector) -> None:
    found = _found(detector, TEXT)
    for entity, value in EXPECTED.items():
        assert found.get(entity) == [value], (entity, found)
    assert found["handle"] == ["u/throwaway42", "@jsmith99"]
    assert detector.ner["available"] and "en_core_web_sm" in detector.ner["model"]
    # a recipe pattern is its own entity
    assert _found(detector, "ticket from E123456 today") == {"employee_id": ["E123456"]}


@pytest.mark.parametrize(
    ("text", "absent"),
    [
        ("the movie came out on 4 July 2019", "date_of_birth"),  # a date, no birth context
        ("a birthday gift this year", "date_of_birth"),  # relative: not a date of birth
        ("not feeling it.all she has to do", "url"),  # two words and a full stop
        ("antique art deco.beautiful stuff", "url"),
        ("write to me at jane@mail.com", "handle"),  # the domain of an e-mail is no handle
        ("card 4111 1111 1111 1112 was declined", "credit_card"),  # fails the Luhn check
    ],
)
def test_lookalikes_are_not_reported(detector: pii.Detector, text: str, absent: str) -> None:
    assert absent not in _found(detector, text)


@pytest.mark.parametrize("card", ["2230-7562-6368-9700", "6759 6498 2643 8453", "4111111111111111"])
def test_card_numbers_presidio_misses_are_found_by_the_luhn_check(
    detector: pii.Detector, card: str
) -> None:
    """Mastercard's 2-series and Maestro are outside Presidio's card pattern; hubtune's own
    recogniser finds any 13-19 digit group that passes the Luhn check."""
    assert _found(detector, f"card: {card} thanks") == {"credit_card": [card]}
    broken = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert "credit_card" not in _found(detector, f"card: {broken} thanks")


def test_overlapping_detections_keep_the_stronger_one(detector: pii.Detector) -> None:
    spans = detector.detect(["mail jane.doe@example.com now"])[0]
    assert [(s.entity, s.start, s.end) for s in spans] == [("email", 5, 25)]  # no URL inside
    # a structured match beats spaCy's 0.85 for a name or place over the same characters
    assert _found(detector, "follow me on twitter @Yobrien")["handle"] == ["@Yobrien"]


def test_without_the_ner_model_names_are_not_detected_and_said_so() -> None:
    blind = pii.Detector(spacy_model="no_such_spacy_model")
    assert blind.ner["available"] is False and "no_such_spacy_model" in blind.ner["problem"]
    assert blind.undetectable() == ["person", "location"]
    scan = pii.scan_texts(blind, {"text": [TEXT]})
    assert scan["entities"]["person"]["count"] is None  # never a silent 0
    assert scan["entities"]["email"]["count"] == 1
    assert scan["detector"]["not_detected"] == ["location", "person"]
    assert "Names and places are not detected" in pii.scan_html(scan, title="t")


def test_scan_examples_mask_every_value_in_view(detector: pii.Detector) -> None:
    scan = pii.scan_texts(detector, {"text": [TEXT, "nothing to see", TEXT]})
    assert scan["rows"] == 3 and scan["rows_affected"] == 2
    assert scan["entities"]["email"] == {
        "count": 2,
        "rows": 2,
        "share_rows": pytest.approx(2 / 3),
        "examples": scan["entities"]["email"]["examples"],
    }
    page = pii.scan_html(scan, title="scan")
    for example in (e for entry in scan["entities"].values() for e in entry["examples"]):
        for value in EXPECTED.values():
            assert value not in example, (value, example)
    assert "john.smith@example.com" not in page and "Smith" not in page
    assert "<script" not in page and "http" not in page.split("<body>")[0]


def test_scrubbing_masks_tags_or_fakes_consistently(detector: pii.Detector) -> None:
    texts = [TEXT, "John Smith again, from Boston", "nothing here"]
    masked = pii.Scrubber(detector, action="mask").scrub(texts)
    assert "John" not in masked[0] and "**********" in masked[0] and masked[2] == "nothing here"
    tagged = pii.Scrubber(detector, action="replace").scrub(texts)
    assert tagged[1] == "<PERSON> again, from <LOCATION>"
    fake = pii.Scrubber(detector, replace_with="synthetic", seed=3)
    out = fake.scrub(texts)
    name = out[0][len("Hi, I'm ") :].split(" from ")[0]
    assert name != "John Smith" and out[1].startswith(name + " again")  # same original, same fake
    for value in EXPECTED.values():
        assert value not in out[0]
    again = pii.Scrubber(detector, replace_with="synthetic", seed=3).scrub(texts)
    assert again == out  # seeded
    loose = pii.Scrubber(detector, replace_with="synthetic", consistent=False, seed=3)
    loose_out = loose.scrub(texts)
    assert not loose_out[1].startswith(loose_out[0][len("Hi, I'm ") :].split(" from ")[0])
    assert pii.Scrubber(detector, action="drop_row").scrub(texts) == [None, None, "nothing here"]


def test_residual_leaves_out_the_scrubbers_own_values_only(detector: pii.Detector) -> None:
    scrubber = pii.Scrubber(detector, replace_with="synthetic", seed=0)
    out = scrubber.scrub([TEXT])
    assert scrubber.residual(out, scrubber.regions) == [[]]  # its fakes are not residue
    # text that escaped scrubbing is found: the same fakes outside the scrubber's regions
    leaked = [str(out[0])]
    found = scrubber.residual(leaked, [[]])
    assert {s.entity for s in found[0]} >= {"email", "credit_card"}


def test_the_section_validates_entities_and_patterns() -> None:
    assert AnonymizeSection(patterns={"emp": "E[0-9]{6}"}).entities[-1] == "emp"
    with pytest.raises(ValueError, match=r"entities \['social'\] are unknown"):
        AnonymizeSection(entities=["social"])
    with pytest.raises(ValueError, match=r"patterns.emp: 'E\[0-9' is not a valid regular"):
        AnonymizeSection(patterns={"emp": "E[0-9"})
    with pytest.raises(ValueError, match="not a built-in entity"):
        AnonymizeSection(patterns={"email": "x"})


ROWS = [
    "call me at (212) 555-0199 tomorrow",
    "my email is jane.doe@example.com thanks",
    "John Smith was here",
    "a plain comment about the film",
]


def _pii_csv(path: Path, n: int = 40) -> Path:
    rows = [
        {"text": f"{ROWS[i % 4]} number {i}", "label": "a" if (i // 4) % 2 else "b", "group": "g"}
        for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("action", ["replace", "drop_row"])
def test_data_anonymize_scrubs_every_split_before_it_is_made(tmp_path: Path, action: str) -> None:
    from hubtune.data import load_data

    spec = {
        "source": str(_pii_csv(tmp_path / "d.csv", 80)),
        "columns": {"sensitive": ["group"]},
        "anonymize": {"action": action},
    }
    data = load_data(DataSection.model_validate(spec), seed=0)
    every = pd.concat(data.splits.values())
    joined = " ".join(every["text"])
    assert "555-0199" not in joined and "jane.doe" not in joined and "John" not in joined
    record = data.anonymization
    assert record is not None
    assert record["before"]["entities"]["phone"]["count"] == 20
    assert record["before"]["entities"]["email"]["count"] == 20
    assert record["before"]["rows_affected"] == 60
    assert record["residual_rate"] == 0.0 and record["after"]["rows_affected"] == 0
    if action == "drop_row":
        assert len(every) == 20 and record["rows_dropped"] == 60
        reason = "personal data (data.anonymize: drop_row)"
        assert sum(r.get(reason, 0) for r in data.dropped.values()) == 60
    else:
        assert len(every) == 80 and record["rows_changed"] == 60
        assert (every["text"].str.contains("<PHONE>")).sum() == 20
    plain = load_data(DataSection.model_validate({**spec, "anonymize": None}), seed=0)
    assert plain.fingerprint != data.fingerprint  # what is trained on is what is fingerprinted


def test_chat_messages_are_scrubbed_inside_their_contents(tmp_path: Path) -> None:
    from hubtune.data import load_data

    conversations = [
        json.dumps(
            [
                {"role": "user", "content": f"I am John Smith, call (212) 555-0199 ({i})"},
                {"role": "assistant", "content": "Thanks John Smith, noted."},
            ]
        )
        for i in range(20)
    ]
    pd.DataFrame({"m": conversations}).to_csv(tmp_path / "chat.csv", index=False)
    section = DataSection.model_validate(
        {"source": str(tmp_path / "chat.csv"), "columns": {"messages": "m"}, "anonymize": {}}
    )
    data = load_data(section, seed=0, task="text-generation")
    for cell in pd.concat(data.splits.values())["messages"]:
        messages = json.loads(cell)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert "John" not in cell and "555" not in cell and "<PERSON>" in messages[1]["content"]


def test_a_run_records_scrubbing_and_a_policy_gates_on_the_residual(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from hubtune.audit import run_audit
    from hubtune.pipeline import run_recipe

    spec = {
        "name": "pii-run",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "model": {"id": str(tiny_bert), "max_length": 16},
        "data": {
            "source": str(_pii_csv(tmp_path / "d.csv", 80)),
            "columns": {"sensitive": ["group"]},
            "anonymize": {"replace_with": "synthetic"},
        },
        "method": {"name": "freeze"},
        "train": {"epochs": 1, "batch_size": 16, "log_with": []},
        "audit": {"enabled": False},
    }
    result = run_recipe(Recipe.model_validate(spec))
    run = json.loads((result.run_dir / "run.json").read_text())
    record = run["data"]["anonymization"]
    assert record["action"] == "replace" and record["replace_with"] == "synthetic"
    assert record["before"]["entities"]["phone"]["count"] == 20 and record["residual_rate"] == 0.0
    assert "555-0199" not in (result.run_dir / "run.json").read_text()  # no value, no mapping

    strict = tmp_path / "strict.yaml"
    strict.write_text("name: strict\nthresholds: {max_residual_pii_rate: 0.001}\n")
    audit = run_audit(result.run_dir, policy=strict)
    check = next(c for c in audit["verdict"]["checks"] if c["check"] == "residual personal data")
    assert check["passed"] is True and check["value"] == 0.0
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert "Personal data in the training text" in report and "Still found after" in report
    html = (result.run_dir / "audit" / "report.html").read_text()
    assert 'id="anonymization"' in html
    from hubtune.card import build_card

    card = str(build_card(result.run_dir))
    assert "### Personal data scrubbed before training" in card
    assert "replaced by realistic synthetic values (the same original, the same fake)" in card
    assert "| phone | 20 | 0 |" in card and "555-0199" not in card

    # The same policy fails a run that never scrubbed, and says why.
    run["data"]["anonymization"] = None
    (result.run_dir / "run.json").write_text(json.dumps(run))
    audit = run_audit(result.run_dir, policy=strict)
    check = next(c for c in audit["verdict"]["checks"] if c["check"] == "residual personal data")
    assert check["passed"] is False and "data.anonymize was not enabled" in check["note"]
    assert not audit["verdict"]["passed"]


def test_scan_command_reports_counts_and_writes_json_and_html(
    tiny_bert: Path, tmp_path: Path
) -> None:
    import yaml
    from typer.testing import CliRunner

    from hubtune.cli import app

    source = _pii_csv(tmp_path / "d.csv")
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["data", "scan", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "phone" in result.output and "10 in 10 rows (25.00%)" in result.output
    scan = json.loads((out / "scan.json").read_text())
    assert scan["entities"]["email"]["count"] == 10 and scan["rows"] == 40
    assert (out / "scan.html").read_text().count("<tr>") == 1 + len(pii.ENTITIES)
    blind = CliRunner().invoke(app, ["data", "scan", str(source), "-o", str(out), "--no-ner"])
    assert "person         not detected" in blind.output
    # a recipe: its data as a run reads it (columns mapped, rows cleaned), its own scrubbing off
    recipe = tmp_path / "r.yaml"
    pd.DataFrame(
        {"body": ["mail jane.doe@example.com", "", "fine"] * 10, "label": ["a", "a", "b"] * 10}
    ).to_csv(tmp_path / "body.csv", index=False)
    spec = {
        "name": "r",
        "model": {"id": str(tiny_bert)},
        "data": {
            "source": str(tmp_path / "body.csv"),
            "columns": {"text": "body"},
            "anonymize": {},
        },
        "method": {"name": "freeze"},
    }
    recipe.write_text(yaml.safe_dump(spec))
    by_recipe = CliRunner().invoke(app, ["data", "scan", str(recipe), "-o", str(out)])
    assert by_recipe.exit_code == 0, by_recipe.output
    assert "recipe r" in by_recipe.output and "20 rows" in by_recipe.output  # empty rows dropped
    assert json.loads((out / "scan.json").read_text())["entities"]["email"]["count"] == 10
    missing = CliRunner().invoke(app, ["data", "scan", str(source), "-c", "body"])
    assert missing.exit_code == 2 and "has no column(s) ['body']" in missing.output


@pytest.mark.parametrize(
    ("shape", "length", "space"), [("phone", 7, 8 * 10**6), ("email", 6, 26**6)]
)
def test_pii_shaped_canaries_are_what_the_detector_finds(
    detector: pii.Detector, shape: str, length: int, space: int
) -> None:
    from hubtune.audit.exposure import make_exposure_canaries, secret_space
    from hubtune.recipe import ExposureSection

    section = ExposureSection(shape=shape, digits=length)
    assert section.prefix == {"phone": "my phone number is", "email": "my email is"}[shape]
    assert secret_space(shape, length) == space
    canaries, rows = make_exposure_canaries(
        per_repetition=5, repetitions=[1], digits=length, prefix=section.prefix, seed=0,
        columns=["text"], sensitive=[], shape=shape,
    )  # fmt: skip
    found = detector.detect(rows["text"].tolist())
    for text, secret, spans in zip(rows["text"], canaries["secret"], found, strict=True):
        assert [(s.entity, text[s.start : s.end]) for s in spans] == [(shape, secret)]
    with pytest.raises(ValueError, match="set digits: 7"):
        ExposureSection(shape="phone", digits=6)


def test_scrubbing_reaches_the_canaries_and_their_exposure_is_still_measured(
    tiny_gpt2_lm: Path, tmp_path: Path
) -> None:
    """With data.anonymize on, e-mail-shaped canaries are scrubbed like real addresses before
    training, so the audit measures what scrubbing leaves of them (the issue's side by side)."""
    from hubtune.pipeline import run_recipe

    from .test_generation import lm_recipe, make_lm_frame

    csv = tmp_path / "lm.csv"
    make_lm_frame(60).to_csv(csv, index=False)
    spec = lm_recipe(tiny_gpt2_lm, csv, tmp_path / "runs")
    spec["data"]["anonymize"] = {"entities": ["email"]}
    spec["audit"] = {
        "enabled": True,
        "stereotypes": False,
        "exposure": {"shape": "email", "digits": 2, "per_repetition": 2, "repetitions": [1, 4]},
    }
    result = run_recipe(Recipe.model_validate(spec))
    record = json.loads((result.run_dir / "run.json").read_text())["data"]["anonymization"]
    assert record["canary_rows"] == {"rows": 10, "changed": 10, "dropped": 0}
    exposure = json.loads((result.run_dir / "exposure.json").read_text())
    assert exposure["shape"] == "email" and len(exposure["per_canary"]) == 4
    assert all(c["method"] == "exact" for c in exposure["per_canary"])  # 26**2 candidates
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert "e-mail addresses, 2 random letters @example.com" in report and "676 possible" in report
