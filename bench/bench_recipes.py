"""Shipped recipes against the baselines a user would try without a pretrained model.

For each recipe and seed (the seed draws the split, the initialisation and the batches), trains
the configurations asked for and records the test accuracy with its 95% interval, the majority
baseline, the classical baseline (TF-IDF + logistic regression for text, logistic regression on
pixels for images; fitted by every run on the same split) and the paired comparison of the two,
the kept epoch and the wall time. Configurations:

``shipped``  the recipe as shipped;
``scrubbed``, ``scrubbed_synthetic``: the recipe with personal data scrubbed before splitting
             (``data.anonymize``: type tags, or consistent synthetic values);
``freeze``   frozen backbone, head fitted to convergence on cached features (``method.name=freeze``,
             ``unfreeze_top_k=0``, ``head_fit=auto``: L-BFGS);
``topk``     the top 2 blocks unfrozen on the prefix cache (``unfreeze_top_k=2``, 3 epochs);
``full``     full fine-tuning (text: lr 5e-5, 1 epoch, what fits a CPU budget; images: lr 3e-4,
             12 epochs, the settings that won at 1,000 labels in bench/results/
             vision_label_efficiency.md);
``shipped_native``, ``freeze_native``: the same with ``model.pooling=native`` (the architecture's
             own head; ``auto`` takes a sentence-transformers model's mean pooling);
``shipped_mean``: the recipe with ``model.pooling=mean``.

Every run goes through the public API (``load_recipe`` + ``run_recipe``) with outputs in a work
folder, no checkpoints, no trackers, no audit and no push. Results:
``bench/results/<--name>.{json,md}`` with the machine.

    python bench/bench_recipes.py quickstart --seeds 42 43 44 --configs shipped freeze
    python bench/bench_recipes.py sentiment-rotten-tomatoes --seeds 42 --configs shipped topk
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from benchlib import (
    REPO,
    fmt_s,
    md_table,
    report_footer,
    result_head,
    say,
    setup_environment,
    workspace,
    write_results,
    yaml_str,
)

CONFIGS: dict[str, list[str]] = {
    "shipped": [],
    # The recipe with personal data scrubbed first (data.anonymize; type tags or fake values)
    "scrubbed": ["data.anonymize={}"],
    "scrubbed_synthetic": ["data.anonymize={replace_with: synthetic}"],
    # model.pooling=auto: the model's own pooling (mean for MiniLM), whatever the recipe pins
    "freeze": ["method={name: freeze, unfreeze_top_k: 0, head_fit: auto}", "model.pooling=auto"],
    "topk": [
        "method={name: freeze, unfreeze_top_k: 2, backbone_lr: 0.0002}",
        "train.epochs=3",
        "train.lr=0.001",
        "train.warmup_ratio=0.1",
    ],
    "full": ["method={name: full}", "train.epochs=1", "train.lr=5e-5", "train.warmup_ratio=0.1"],
    # Full fine-tuning at three learning rates, 2 epochs: forgetting against the learning rate
    # (checks.forgetting, on by default for text: the "forgetting" column).
    **{
        f"full_lr{lr}": [
            "method={name: full}",
            "train.epochs=2",
            f"train.lr={lr}",
            "train.warmup_ratio=0.1",
        ]
        for lr in ("1e-5", "1e-4", "1e-3")
    },
    # The same with the architecture's own head (BERT: pooler on [CLS]) instead of model.pooling:
    # auto, which takes a sentence-transformers model's mean pooling.
    "shipped_native": ["model.pooling=native"],
    "shipped_mean": ["model.pooling=mean"],
    "freeze_native": [
        "method={name: freeze, unfreeze_top_k: 0, head_fit: auto}",
        "model.pooling=native",
    ],
}

# Image recipes: no model.pooling (text only), and full fine-tuning of a CNN on 1,000 images takes
# more epochs at a higher rate than a transformer on 8,000 sentences.
IMAGE_CONFIGS: dict[str, list[str]] = {
    "freeze": ["method={name: freeze, unfreeze_top_k: 0, head_fit: auto}"],
    "full": ["method={name: full}", "train.epochs=12", "train.lr=0.0003", "train.warmup_ratio=0.1"],
}


def config_overrides(recipe_name: str, config: str) -> list[str]:
    """The overrides of one configuration for this recipe's task."""
    import yaml

    raw = yaml.safe_load((REPO / "recipes" / f"{recipe_name}.yaml").read_text())
    task = (raw.get("model") or {}).get("task", "text-classification")
    if task == "image-classification" and config in IMAGE_CONFIGS:
        return IMAGE_CONFIGS[config]
    if task == "image-classification" and any(
        o.startswith("model.pooling") for o in CONFIGS[config]
    ):
        raise SystemExit(f"config {config} sets model.pooling, which image recipes do not have")
    return CONFIGS[config]


def wilson(accuracy: float, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval of an accuracy measured on n rows."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def run_one(
    recipe_name: str, config: str, seed: int, folder: Path, extra: list[str] | None = None
) -> dict[str, Any]:
    from hubtune import load_recipe, run_recipe
    from hubtune.rundir import read_run_info

    name = f"{config}-{seed}"
    overrides = [
        f"name={name}",
        f"output_dir={yaml_str(folder)}",
        f"seed={seed}",
        "train.checkpoint=false",
        "train.log_with=[]",
        "audit.enabled=false",
        "push.enabled=false",
        *config_overrides(recipe_name, config),
        *(extra or []),
    ]
    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml", overrides=overrides)
    start = time.perf_counter()
    result = run_recipe(recipe, overwrite=True)
    wall = time.perf_counter() - start
    info = read_run_info(result.run_dir)
    assert info is not None
    rows = info.data.rows_kept.get("test") or 0
    accuracy = float(result.metrics["test"]["accuracy"])
    classical = result.metrics.get("classical_baseline") or {}
    row = {
        "recipe": recipe_name,
        "config": config,
        "seed": seed,
        "overrides": [*config_overrides(recipe_name, config), *(extra or [])],
        "test_rows": rows,
        "accuracy": accuracy,
        "accuracy_ci": wilson(accuracy, rows),
        "macro_f1": result.metrics["test"]["macro_f1"],
        "majority": result.metrics["majority_baseline"]["accuracy"],
        "classical": classical.get("accuracy"),
        "classical_ci": classical.get("ci"),
        "difference": (classical.get("model_minus_baseline") or {}).get("value"),
        "difference_ci": (classical.get("model_minus_baseline") or {}).get("ci"),
        "outcome": classical.get("outcome"),
        "selected_epoch": result.metrics.get("selected_epoch"),
        "forgetting": result.metrics.get("forgetting"),
        "train_rows": info.data.rows_kept.get("train"),
        "wall_s": wall,
        "timings": info.timings,
    }
    say(
        f"{recipe_name} {config} seed {seed}: accuracy {accuracy:.4f}, classical "
        f"{row['classical']}, {row['outcome']}, {fmt_s(wall)}"
    )
    return row


def _fmt_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    spec = "+.3f" if signed else ".4f"
    return f"{value:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


def _fmt_forgetting(forgetting: dict[str, Any] | None) -> str:
    if not forgetting:
        return "-"
    topics = forgetting["topic_neighbours"]
    return (
        f"{forgetting['similarity_preserved']:.3f} "
        f"({topics['before']:.3f} -> {topics['after']:.3f})"
    )


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["runs"]
    table = md_table(
        [
            "recipe",
            "config",
            "seed",
            "test acc [95% CI]",
            "majority",
            "classical [95% CI]",
            "model - classical [95% CI]",
            "outcome",
            "kept",
            "forgetting: similarity kept (topic nbrs before -> after)",
            "wall",
        ],
        [
            [
                r["recipe"],
                r["config"],
                r["seed"],
                _fmt_ci(r["accuracy"], r["accuracy_ci"]),
                f"{r['majority']:.4f}",
                _fmt_ci(r["classical"], r["classical_ci"]),
                _fmt_ci(r["difference"], r["difference_ci"], signed=True),
                r["outcome"] or "-",
                (r["selected_epoch"] or {}).get("epoch", "-"),
                _fmt_forgetting(r.get("forgetting")),
                fmt_s(r["wall_s"]),
            ]
            for r in rows
        ],
    )
    configs = "\n".join(f"- `{k}`: `{' '.join(v) or '(as shipped)'}`" for k, v in CONFIGS.items())
    configs += "\n" + "\n".join(
        f"- `{k}` on image recipes: `{' '.join(v)}`" for k, v in IMAGE_CONFIGS.items()
    )
    return "\n".join(
        [
            "# Shipped recipes against a model without pretraining",
            "",
            "Test accuracy of each configuration with its 95% Wilson interval, the majority "
            "baseline, the classical baseline fitted on the same split (TF-IDF + logistic "
            "regression for text, pixels + logistic regression for images) and the paired "
            "bootstrap of the difference (hubtune.baselines.compare). 'kept' is the epoch whose "
            "weights were tested (best validation accuracy; for the L-BFGS head the weight-decay "
            "candidate). Wall time is the whole run_recipe call on the machine below.",
            "",
            *table,
            "",
            "Configurations (overrides on top of the recipe; every run also has train.checkpoint=false, "
            "train.log_with=[], audit.enabled=false, push.enabled=false, seed=SEED"
            + (f", and {' '.join(payload['set'])}" if payload.get("set") else "")
            + "):",
            "",
            configs,
            "",
            *report_footer(
                payload["machine"], payload["command"], [f"- {n}" for n in payload["notes"]]
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+", help="shipped recipe names (recipes/NAME.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--name", default="recipes_vs_baselines", help="result file name")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--note", action="append", default=[], help="a note for the report")
    parser.add_argument("--keep", default=None, help="keep run folders here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every run (e.g. data.limit.train=1000); repeatable",
    )
    args = parser.parse_args()
    setup_environment(threads=args.threads)
    payload = {
        **result_head("recipes_vs_baselines", script="bench_recipes.py", quick=False),
        "runs": [],
        "notes": args.note,
        "set": args.set,
    }
    start = time.perf_counter()
    with workspace(args.keep) as folder:
        for recipe_name in args.recipes:
            for seed in args.seeds:
                for config in args.configs:
                    payload["runs"].append(
                        run_one(recipe_name, config, seed, folder / recipe_name, args.set)
                    )
                    payload["total_s"] = time.perf_counter() - start
                    write_results(args.name, payload, markdown(payload))  # after every run


if __name__ == "__main__":
    main()
