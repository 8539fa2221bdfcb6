"""What is published: void guarantees refused, private statistics withheld, uncovered figures named.

Each test here failed on c677977, where a run with a fixed DP seed still claimed its ε and
could be pushed, audit/ and privacy.json went out with statistics of the training rows, and an
attack too weak to refute the claimed ε counted as a passed check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import HfApi, snapshot_download

from hubtune.audit import run_audit
from hubtune.card import build_card
from hubtune.hub import hub_endpoint
from hubtune.pipeline import privacy_lines as _privacy_lines
from hubtune.push import PushError, push_run

from .test_card import LEDGER, make_run

VOID_LEDGER = {
    **LEDGER,
    "noise_source": "fixed by HUBTUNE_UNSAFE_DP_SEED (testing only: NO privacy guarantee)",
}


def _policy(tmp_path: Path) -> Path:
    path = tmp_path / "lenient.yaml"
    path.write_text(
        "name: lenient\nn_boot: 100\nmin_group_size: 5\n"
        "thresholds: {max_equalized_odds_difference: 0.9, fail_if_attack_beats_dp_bound: true}\n"
        "membership: {enabled: true, fpr_levels: [0.01, 0.1]}\n"
    )
    return path


def _add_canaries(run_dir: Path, count: int = 40) -> None:
    rng = np.random.default_rng(3)
    scores = pd.read_parquet(run_dir / "membership_scores.parquet")
    canaries = pd.DataFrame(
        {
            "row_id": [f"canary:{i}" for i in range(count)],
            "split": "canaries",
            "member": rng.random(count) < 0.5,
            "loss": rng.exponential(1.0, count),
            "predicts_label": rng.random(count) < 0.5,
        }
    )
    pd.concat([scores, canaries]).to_parquet(run_dir / "membership_scores.parquet", index=False)


def _check(audit: dict, name: str) -> dict:
    return next(c for c in audit["verdict"]["checks"] if c["check"] == name)


# --------------------------------------------------------------------------- a void guarantee


def test_a_fixed_dp_seed_voids_every_output_and_the_push(tiny_bert: Path, tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, dp=True, audit=True)
    honest = run_audit(run_dir, policy=_policy(tmp_path))
    assert honest["verdict"]["status"] == "pass"  # the same run with a secret seed passes
    (run_dir / "privacy.json").write_text(json.dumps(VOID_LEDGER))
    audit = run_audit(run_dir, policy=_policy(tmp_path))
    assert audit["verdict"]["status"] == "fail"
    assert _check(audit, "DP guarantee in force")["passed"] is False
    assert audit["privacy"]["guarantee_void"] is True
    assert audit["privacy"]["statement"].startswith("NO privacy guarantee")
    assert "(3.5, 1e-05)-differentially private" not in json.dumps(audit)
    html = (run_dir / "audit" / "report.html").read_text()
    assert "it has NONE" in html and "does not hold" in html
    lines = _privacy_lines(run_dir)
    assert lines[0].startswith("privacy:   NO GUARANTEE: HUBTUNE_UNSAFE_DP_SEED fixed")
    assert "-DP (" not in "\n".join(lines)
    card = build_card(run_dir)
    assert card.data.to_dict()["privacy"]["guarantee_void"] is True
    assert "it has no privacy guarantee" in card.text.lower()
    assert "bounds the privacy loss of the whole training" not in card.text
    assert "The seed is secret" not in card.text
    shutil.copytree(tiny_bert, run_dir / "model")
    with hub_endpoint("local", local_root=tmp_path / "hub") as url:
        with pytest.raises(PushError, match="HUBTUNE_UNSAFE_DP_SEED.*does not\\s+override"):
            push_run(run_dir, repo_id="org/void", endpoint=url, allow_failing_audit=True)
        assert not HfApi(endpoint=url).repo_exists("org/void")


# --------------------------------------------------------------------------- what is pushed


def test_push_carries_a_public_ledger_and_aggregate_audit_unless_asked(
    tiny_bert: Path, tmp_path: Path
) -> None:
    run_dir = make_run(tmp_path, dp=True, audit=True)
    _add_canaries(run_dir)
    ledger = {**LEDGER, "observed_batch_sizes": {"steps": 48, "min": 12, "max": 40}}
    ledger["expected_batch_size"] = 25.0
    (run_dir / "privacy.json").write_text(json.dumps(ledger))
    shutil.copytree(tiny_bert, run_dir / "model")
    (run_dir / "model" / "hubtune_privacy.json").write_text(json.dumps(ledger))
    run_audit(run_dir, policy=_policy(tmp_path))
    local_audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert local_audit["membership"]["at_fpr"] and local_audit["canaries"]["right_guesses"] >= 0
    with hub_endpoint("local", local_root=tmp_path / "hub") as url:
        push_run(run_dir, repo_id="org/public", endpoint=url)
        push_run(run_dir, repo_id="org/full", endpoint=url, include_membership_audit=True)
        public = Path(snapshot_download("org/public", endpoint=url, cache_dir=tmp_path / "c"))
        full = Path(snapshot_download("org/full", endpoint=url, cache_dir=tmp_path / "c"))
    for repo in (public, full):  # the exact data size never leaves, with or without details
        for name in ("privacy.json", "hubtune_privacy.json"):
            published = json.loads((repo / name).read_text())
            assert not {"dataset_size", "expected_batch_size", "observed_batch_sizes"} & set(
                published
            ), name
            assert published["history"] == ledger["history"]  # ε stays recomputable
    audit = json.loads((public / "audit" / "audit.json").read_text())
    membership, canaries = audit["membership"], audit["canaries"]
    assert membership["auc"] == local_audit["membership"]["auc"]
    assert membership["epsilon_lower_bound"] == local_audit["membership"]["epsilon_lower_bound"]
    assert "at_fpr" not in membership and "mean_loss" not in membership
    assert "right_guesses" not in canaries and "memorised" not in canaries
    assert "withheld" in membership["withheld"] and audit["publication"]["not_covered_by_dp"]
    report = (public / "audit" / "report.html").read_text()
    assert (
        "What the privacy guarantee covers" in report and "Per-threshold rates: withheld" in report
    )
    readme = (public / "README.md").read_text()
    assert "### What the privacy guarantee covers" in readme
    assert "held-out rows" in readme and "training-set size" in readme
    assert "Rates at each false-positive level: withheld" in readme
    detailed = json.loads((full / "audit" / "audit.json").read_text())
    assert detailed["membership"]["at_fpr"] == local_audit["membership"]["at_fpr"]
    assert detailed["canaries"]["memorised"] == local_audit["canaries"]["memorised"]
    assert detailed["publication"]["membership_details"] == "included"
    # The run's own audit is untouched: the reviewer keeps every figure locally.
    assert json.loads((run_dir / "audit" / "audit.json").read_text()) == local_audit


# --------------------------------------------------------------------------- the attack's power


@pytest.mark.parametrize(
    ("epsilon", "members_loss", "expected"),
    [
        (3.5, 0.6, "not informative"),  # ~200 rows cannot prove ε ≥ 3.5
        (1.0, 0.6, "pass"),  # they can prove more than 1: staying under it is a finding
        (0.05, 0.05, "FAIL"),  # members' losses far lower: the bound is beaten
    ],
)
def test_the_dp_bound_check_reports_its_power(
    tmp_path: Path, epsilon: float, members_loss: float, expected: str
) -> None:
    run_dir = make_run(tmp_path, dp=True, audit=True)
    rng = np.random.default_rng(5)
    n = 200
    pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(2 * n)],
            "split": ["train"] * n + ["test"] * n,
            "member": [True] * n + [False] * n,
            "loss": np.concatenate([rng.exponential(members_loss, n), rng.exponential(0.6, n)]),
            "predicts_label": rng.random(2 * n) < 0.8,
        }
    ).to_parquet(run_dir / "membership_scores.parquet", index=False)
    (run_dir / "privacy.json").write_text(json.dumps({**LEDGER, "epsilon": epsilon}))
    audit = run_audit(run_dir, policy=_policy(tmp_path))
    check = _check(audit, "attack within the DP bound")
    power = audit["membership"]["max_provable_epsilon"]
    assert check["power"] == {"loss attack": pytest.approx(power)}
    assert f"could prove at most ε ≥ {power:.3g}" in check["note"]
    html = (run_dir / "audit" / "report.html").read_text()
    row = html[html.index("<td>attack within the DP bound</td>") :].split("</tr>")[0]
    assert f"<b>{expected}</b>" in row and f"at most ε ≥ {power:.3g}" in row
    if expected == "not informative":
        assert power < epsilon and check["passed"] is None and check["informative"] is False
        assert audit["verdict"]["status"] == "pass"  # neither a pass of this check nor inconclusive
        assert audit["verdict"]["not_informative"] == [
            "attack within the DP bound (membership inference)"
        ]
        assert not audit["verdict"]["not_evaluable"]
    else:
        assert check["informative"] is True
        assert check["passed"] is (expected == "pass")
