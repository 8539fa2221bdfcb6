"""report.html in a real browser: self-contained, error-free, verdict and charts visible.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright; no browser is downloaded.
`bash scripts/setup.sh --with-browser` installs it (README's test command does).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hubtune.audit import run_audit

from .conftest import chromium, make_fake_run


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    with chromium() as launched:
        yield launched


def _failing_dp_run(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for group, n, accuracy in (("a", 400, 0.9), ("b", 300, 0.6), ("c", 200, 0.7), ("d", 12, 0.5)):
        labels = rng.integers(0, 2, n)
        right = rng.random(n) < accuracy
        rows += [
            {"label_id": int(y), "prediction_id": int(y if ok else 1 - y), "group": group}
            for y, ok in zip(labels, right, strict=True)
        ]
    membership = pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(2000)],
            "split": ["train"] * 1000 + ["test"] * 1000,
            "member": [True] * 1000 + [False] * 1000,
            "loss": np.concatenate([rng.gamma(2.0, 0.3, 1000), rng.gamma(2.0, 0.32, 1000)]),
            "predicts_label": True,
        }
    )
    privacy = {
        "epsilon": 8.0,
        "delta": 1e-5,
        "accountant": "prv",
        "epsilon_by_accountant": {"prv": 8.0, "rdp": 8.9},
        "noise_multiplier": 0.8,
        "max_grad_norm": 1.0,
        "sample_rate": 0.03,
        "sampling": "poisson",
        "steps": 600,
        "unit": "example",
        "secure_mode": False,
    }
    run_dir = make_fake_run(
        root / "runs" / "browser",
        pd.DataFrame(rows),
        label_names=["neg", "pos"],
        sensitive=["group"],
        privacy=privacy,
        membership=membership,
    )
    run_audit(run_dir, policy="default")
    return run_dir


def _non_dp_run(root: Path) -> Path:
    """A run trained without DP whose attack finds nothing: members have the higher losses."""
    rng = np.random.default_rng(1)
    rows = []
    for group, n, accuracy in (("female", 400, 0.9), ("black", 300, 0.6), ("lgbtq", 200, 0.7)):
        labels = rng.integers(0, 2, n)
        right = rng.random(n) < accuracy
        rows += [
            {"label_id": int(y), "prediction_id": int(y if ok else 1 - y), "target_group": group}
            for y, ok in zip(labels, right, strict=True)
        ]
    membership = pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(2000)],
            "split": ["train"] * 1000 + ["test"] * 1000,
            "member": [True] * 1000 + [False] * 1000,
            "loss": np.concatenate([rng.uniform(2.0, 3.0, 1000), rng.uniform(0.0, 1.0, 1000)]),
            "predicts_label": True,
        }
    )
    run_dir = make_fake_run(
        root / "runs" / "nodp",
        pd.DataFrame(rows),
        label_names=["neg", "pos"],
        sensitive=["target_group"],
        membership=membership,
    )
    run_audit(run_dir, policy="default")
    return run_dir


def _share_near(
    png: bytes,
    rgb: tuple[int, int, int],
    tolerance: int = 12,
    *,
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
) -> float:
    """The share of pixels near ``rgb`` in ``box`` (left, top, right, bottom, as fractions)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    left, top, right, bottom = box
    pixels = pixels[
        int(top * height) : int(bottom * height), int(left * width) : int(right * width)
    ]
    close = np.all(np.abs(pixels - np.array(rgb)) <= tolerance, axis=-1)
    return float(close.mean())


def _column(page, table: str, header: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The text of every body cell under ``header`` in ``table``."""
    headers = page.locator(f"{table} th").all_inner_texts()
    index = headers.index(header) + 1
    return [c.strip() for c in page.locator(f"{table} tr td:nth-child({index})").all_inner_texts()]


def test_report_renders_without_errors_or_network_and_shows_verdict_and_charts(
    browser, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    run_dir = _failing_dp_run(tmp_path)
    report = run_dir / "audit" / "report.html"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console, errors, requests = [], [], []
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")

    assert errors == [] and [c for c in console if c[0] in ("error", "warning")] == []
    assert requests == [report.as_uri()], "the report must not fetch anything"
    assert page.title() == "Audit: browser — FAIL"
    verdict = page.locator("#verdict")
    assert verdict.locator(".big").inner_text() == "FAIL"
    assert "equalized odds difference (group)" in verdict.inner_text()
    # The verdict box is drawn in the failing colours (pale red fill, red border) ...
    shot = verdict.screenshot()
    assert _share_near(shot, (0xFD, 0xEC, 0xEA)) > 0.5
    assert _share_near(shot, (0xC6, 0x28, 0x28), tolerance=30) > 0.005
    # ... the small group is suppressed in the table, and every chart decoded and has bars.
    assert "suppressed: fewer than 30 test rows" in page.locator("table.groups").inner_text()
    charts = page.locator("img.chart")
    assert charts.count() == 2  # per-group metrics and membership inference
    for i in range(charts.count()):
        chart = charts.nth(i)
        assert chart.evaluate("img => img.complete && img.naturalWidth > 200")
    groups_chart = charts.nth(0).screenshot()
    assert _share_near(groups_chart, (0x1F, 0x77, 0xB4), tolerance=20) > 0.01  # group "a" bars
    assert _share_near(groups_chart, (0xFF, 0x7F, 0x0E), tolerance=20) > 0.01  # group "b" bars
    membership_chart = charts.nth(1).screenshot()
    assert _share_near(membership_chart, (0xD6, 0x27, 0x28), tolerance=20) > 0.005  # attack TPR
    # The DP bound sits beside the attack's numbers, and this weak attack beats it at no level.
    table = page.locator("table#mia").inner_text()
    assert "Largest TPR the DP guarantee allows" in table
    assert _column(page, "table#mia", "Beats the bound?") == ["no", "no"]
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 50_000
    page.close()


@pytest.mark.parametrize("width", [1280, 420])
def test_report_fits_the_window_and_explains_itself(browser, tmp_path: Path, width: int) -> None:  # type: ignore[no-untyped-def]
    """On a laptop and on a phone: no sideways page scroll, every term and cell explained."""
    for run_dir in (_failing_dp_run(tmp_path), _non_dp_run(tmp_path)):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto((run_dir / "audit" / "report.html").as_uri())
        page.wait_for_load_state("load")
        # Wide tables may scroll inside their own box; the document itself must not.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
            run_dir.name,
            width,
            page.evaluate("document.documentElement.scrollWidth"),
        )
        help_text = page.locator("#checks-help").inner_text()
        assert "Judged value: the number the rule is applied to" in help_text
        assert "Margin: how far the judged value is from the rule's limit" in help_text
        terms = page.locator("dl.glossary dt").all_inner_texts()
        assert {"Judged value", "Margin"} <= set(terms)
        beats = _column(page, "table#mia", "Beats the bound?")
        assert len(beats) == 2 and all(beats), beats
        if run_dir.name == "nodp":
            assert beats == ["n/a: trained without DP"] * 2
        page.screenshot(path=str(tmp_path / f"{run_dir.name}-{width}.png"), full_page=True)
        page.close()


def test_zero_rates_are_visible_on_the_log_scale_membership_chart(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A rate of 0 cannot be a bar on a log axis: it is a marker on the floor, with a note."""
    for run_dir, zeros in (
        (_failing_dp_run(tmp_path), ("fpr",)),
        (_non_dp_run(tmp_path), ("tpr", "fpr")),
    ):
        audit = json.loads((run_dir / "audit" / "audit.json").read_text())
        first = audit["membership"]["at_fpr"][0]  # target FPR 0.001: the left group of bars
        assert all(first[rate] == 0 for rate in zeros), first
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((run_dir / "audit" / "report.html").as_uri())
        chart = page.locator("img.chart").nth(1).screenshot()
        # Inside the plot, around the left group of bars (the legend is on the right; the
        # box leaves out the tick labels, whose anti-aliased edges are grey too), each 0 shows.
        left_group = (0.1, 0.15, 0.4, 0.85)
        if "fpr" in zeros:
            assert _share_near(chart, (0x7F, 0x7F, 0x7F), 8, box=left_group) > 5e-4
        if "tpr" in zeros:
            assert _share_near(chart, (0xD6, 0x27, 0x28), 8, box=left_group) > 5e-4
        assert page.locator("#floor-note").count() == 1
        note = page.locator("#floor-note").inner_text()
        assert "cannot show 0" in note and "0.0001" in note
        page.close()
