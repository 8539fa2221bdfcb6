"""The command line, including `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import recipe_dict

ROOT = Path(__file__).parents[1]


def _write_recipe(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hubtune", "--help"], capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0
    for command in ("run", "validate", "data"):
        assert command in out.stdout


def test_run_prints_outputs_and_baseline(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs")
    path = _write_recipe(tmp_path / "r.yaml", spec)
    out = subprocess.run(
        [sys.executable, "-m", "hubtune", "run", str(path), "train.epochs=1"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "outputs:" in out.stdout and "baseline:" in out.stdout
    resolved = yaml.safe_load((tmp_path / "runs" / "tiny" / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["epochs"] == 1  # the override is what ran, and what is recorded
    again = subprocess.run(
        [sys.executable, "-m", "hubtune", "run", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_run_reports_data_errors_without_traceback(tiny_bert: Path, tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    pd.DataFrame(
        {"text": ["a", "b", "c", "d"], "label": ["x", "y", "z", "x"], "group": "g"}
    ).to_csv(csv, index=False)
    spec = recipe_dict(tiny_bert, csv, tmp_path / "runs")
    path = _write_recipe(tmp_path / "r.yaml", spec)
    out = subprocess.run(
        [sys.executable, "-m", "hubtune", "run", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 2  # bad input (was 1 before the review asked for 2)
    assert "not among the labels" in out.stderr and "Traceback" not in out.stderr


def _launch(recipe: Path, *, processes: int) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --num_processes N --cpu -m hubtune run RECIPE`, which must succeed."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed next to this Python"
    command = [accelerate, "launch", "--num_processes", str(processes), "--cpu", "-m", "hubtune"]
    out = subprocess.run(
        [*command, "run", str(recipe)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_the_lbfgs_head_under_two_processes_is_the_single_process_head(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    """Every process fits the same head on the same cached features; the main one's is kept."""
    import torch
    from safetensors.torch import load_file

    heads = []
    for processes in ("1", "2"):
        spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / processes)
        spec["audit"] = {"enabled": False}
        path = _write_recipe(tmp_path / f"r{processes}.yaml", spec)
        out = _launch(path, processes=int(processes))
        assert "head fitted to convergence (L-BFGS)" in out.stdout
        run_dir = tmp_path / processes / "tiny"
        run = json.loads((run_dir / "run.json").read_text())
        assert run["hardware"]["num_processes"] == int(processes)
        assert run["method"]["head_fit"] == "lbfgs"
        heads.append(load_file(run_dir / "model" / "model.safetensors")["classifier.weight"])
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(
    tiny_bert: Path, sentiment_csv: Path, tmp_path: Path
) -> None:
    spec = recipe_dict(tiny_bert, sentiment_csv, tmp_path / "runs", name="lora", r=4)
    spec["train"]["epochs"] = 2
    spec["train"]["log_with"] = ["tensorboard"]
    out = _launch(_write_recipe(tmp_path / "r.yaml", spec), processes=2)
    assert out.stdout.count("outputs:") == 1  # one process speaks
    run_dir = tmp_path / "runs" / "tiny"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["hardware"]["num_processes"] == 2
    assert run["hardware"]["distributed_type"].endswith("MULTI_CPU")
    # One set of outputs: one adapter, one predictions file covering each test row exactly once.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "adapter",
        "audit",
        "checkpoints",
        "forgetting.json",
        "logs",
        "membership_scores.parquet",
        "metrics.json",
        "predictions.parquet",
        "recipe.resolved.yaml",
        "run.json",
        "validation_predictions.parquet",
    ]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    assert len(predictions) == run["data"]["rows_kept"]["test"] and predictions["row_id"].is_unique
    validation = pd.read_parquet(run_dir / "validation_predictions.parquet")
    assert len(validation) == run["data"]["rows_kept"]["validation"]
    assert validation["row_id"].is_unique
    # The membership scores gathered from both ranks hold every scored row exactly once.
    scores = pd.read_parquet(run_dir / "membership_scores.parquet")
    assert scores["row_id"].is_unique
    assert scores["split"].value_counts().to_dict() == {
        split: run["data"]["rows_kept"][split] for split in ("train", "test", "validation")
    }
    assert run["audit"]["status"] in {"pass", "fail", "inconclusive"}
    # Both ranks saved their RNG state in the checkpoint (a resumable 2-process run).
    checkpoint = next((run_dir / "checkpoints").iterdir())
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert not list(run_dir.rglob("*.tmp"))
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    writers = {p.name.split(".")[-2] for p in events}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert events and len(writers) == 1, events  # the main process alone logs to TensorBoard
