"""Canary exposure, extraction and perplexity of a fine-tuned language model against ε.

Runs a text-generation recipe (default: recipes/generate-quickstart.yaml, with its canaries) at
each privacy level (``inf``: no DP; a number: DP-SGD at that target ε, with the recipe's
``privacy`` settings or generate-dp's defaults) and each seed, through the public API, and
records per run: test perplexity, each repetition count's canary exposure (mean, min, max) and
the exposure (ε, δ)-DP allows for it, the extraction rates of training and held-out examples,
the membership-inference AUC and the wall time. Results: ``bench/results/<--name>.{json,md}``
with the machine.

    python bench/bench_exposure.py --epsilons inf 8 3 1 --seeds 42 43 44
    python bench/bench_exposure.py --quick     # one seed, inf and 8, small data: a smoke run
"""

from __future__ import annotations

import argparse
import json
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

DP_DEFAULTS = [  # generate-dp.yaml's mechanism, for a recipe without a privacy section
    "privacy.max_grad_norm=1.0",
    "privacy.logical_batch_size=256",
    "privacy.physical_batch_size=64",
]
QUICK = [
    "data.limit.train=600",
    "data.limit.validation=100",
    "data.limit.test=200",
    "privacy.logical_batch_size=64",
    "audit.exposure.samples=500",
    "audit.stereotypes=false",
    "train.epochs=1",
]


def run_one(
    recipe_path: Path,
    epsilon: str,
    seed: int,
    folder: Path,
    extra: list[str],
    arm: str = "",
) -> dict[str, Any]:
    from hubtune import load_recipe, run_recipe

    private = epsilon != "inf"
    slug = "".join(c if c.isalnum() else "-" for c in arm)
    overrides = [
        f"name=eps-{epsilon}-seed-{seed}{'-' + slug if slug else ''}",
        f"output_dir={yaml_str(folder)}",
        f"seed={seed}",
        "train.checkpoint=false",
        "train.log_with=[]",
        "push.enabled=false",
        *(
            ["privacy.enabled=true", f"privacy.target_epsilon={epsilon}", *DP_DEFAULTS]
            if private
            else ["privacy=null"]
        ),
        *extra,
    ]
    recipe = load_recipe(recipe_path, overrides=overrides)
    start = time.perf_counter()
    result = run_recipe(recipe, overwrite=True)
    wall = time.perf_counter() - start
    audit = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    ledger_path = result.run_dir / "privacy.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else None
    row = {
        "arm": arm,
        "anonymization": (
            json.loads((result.run_dir / "run.json").read_text())["data"].get("anonymization") or {}
        ).get("canary_rows"),
        "epsilon_target": epsilon,
        "epsilon": ledger["epsilon"] if ledger else None,
        "seed": seed,
        "perplexity": result.metrics["test"]["perplexity"],
        "exposure": {
            str(level["repetitions"]): {
                k: level[k] for k in ("mean_exposure", "min_exposure", "max_exposure", "dp_bound")
            }
            for level in (audit.get("exposure") or {}).get("levels", [])
        },
        "max_exposure_possible": (audit.get("exposure") or {}).get("max_exposure"),
        "extraction": {
            k: (audit.get("extraction") or {}).get(k)
            for k in ("training", "held_out", "difference")
        },
        "membership_auc": (audit.get("membership") or {}).get("auc"),
        "wall_s": wall,
    }
    say(
        f"{arm + ': ' if arm else ''}epsilon {epsilon} seed {seed}: perplexity {row['perplexity']:.1f}, exposure "
        + ", ".join(f"{k}x {v['mean_exposure']:.1f}" for k, v in row["exposure"].items())
        + f", {fmt_s(wall)}"
    )
    return row


def _exposure_cell(row: dict[str, Any], copies: str) -> str:
    level = row["exposure"].get(copies)
    if not level:
        return "-"
    bound = "" if level["dp_bound"] is None else f" (DP allows {level['dp_bound']:.1f})"
    return f"{level['mean_exposure']:.1f} [{level['min_exposure']:.1f}, {level['max_exposure']:.1f}]{bound}"


def _summary(rows: list[dict[str, Any]], copies: list[str]) -> list[str]:
    """Over seeds, per arm and ε: mean perplexity, and per copy count the mean of the canaries'
    mean exposure with the lowest and highest single canary (only with several seeds)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("arm") or "", r["epsilon_target"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    arms = any(arm for arm, _ in groups)
    body = []
    for (arm, eps), runs in groups.items():
        cells = []
        for c in copies:
            levels = [r["exposure"][c] for r in runs if c in r["exposure"]]
            if not levels:
                cells.append("-")
                continue
            mean = sum(lv["mean_exposure"] for lv in levels) / len(levels)
            low = min(lv["min_exposure"] for lv in levels)
            high = max(lv["max_exposure"] for lv in levels)
            bounds = [lv["dp_bound"] for lv in levels if lv["dp_bound"] is not None]
            allowed = f" (DP allows {min(bounds):.1f})" if bounds else ""
            cells.append(f"{mean:.1f} [{low:.1f}, {high:.1f}]{allowed}")
        train = [
            r["extraction"]["training"]["rate"]
            for r in runs
            if (r["extraction"].get("training") or {}).get("examples")
        ]
        held = [
            r["extraction"]["held_out"]["rate"]
            for r in runs
            if (r["extraction"].get("held_out") or {}).get("examples")
        ]
        aucs = [r["membership_auc"]["value"] for r in runs if r.get("membership_auc")]
        body.append(
            [
                *([arm or "-"] if arms else []),
                eps,
                str(len(runs)),
                f"{sum(r['perplexity'] for r in runs) / len(runs):.1f}",
                *cells,
                "-"
                if not train
                else f"{sum(train) / len(train):.4f} / {sum(held) / len(held):.4f}",
                "-" if not aucs else f"{sum(aucs) / len(aucs):.3f}",
            ]
        )
    return [
        "## Over seeds",
        "",
        "Per ε: the mean over seeds of test perplexity, of each repetition count's mean canary "
        "exposure [the lowest and highest single canary of any seed] (and the smallest exposure "
        "the guarantee allows, over seeds), of the extraction rates and of the membership AUC.",
        "",
        *md_table(
            [
                *(["arm"] if arms else []),
                "ε (target)",
                "seeds",
                "test perplexity",
                *[f"exposure {c}x, bits" for c in copies],
                "extraction: training / held out",
                "MIA AUC",
            ],
            body,
        ),
        "",
        "## Every run",
        "",
    ]


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["runs"]
    copies = sorted({c for r in rows for c in r["exposure"]}, key=int)
    scrubbed = any(r.get("anonymization") for r in rows)
    table = md_table(
        [
            *(["arm"] if any(r.get("arm") for r in rows) else []),
            "ε (target)",
            "ε (spent)",
            "seed",
            "test perplexity",
            *[f"exposure {c}x, bits: mean [min, max]" for c in copies],
            "extraction: training / held out",
            "MIA AUC",
            *(["canary rows scrubbed"] if scrubbed else []),
            "wall",
        ],
        [
            [
                *([r.get("arm") or "-"] if any(x.get("arm") for x in rows) else []),
                r["epsilon_target"],
                "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}",
                r["seed"],
                f"{r['perplexity']:.1f}",
                *[_exposure_cell(r, c) for c in copies],
                " / ".join(
                    "-"
                    if not (r["extraction"].get(k) or {}).get("examples")
                    else f"{r['extraction'][k]['rate']:.3f}"
                    for k in ("training", "held_out")
                ),
                "-" if not r["membership_auc"] else f"{r['membership_auc']['value']:.3f}",
                *(
                    [
                        "-"
                        if not r.get("anonymization")
                        else f"{r['anonymization']['changed'] + r['anonymization']['dropped']}"
                        f" of {r['anonymization']['rows']}"
                    ]
                    if scrubbed
                    else []
                ),
                fmt_s(r["wall_s"]),
            ]
            for r in rows
        ],
    )
    top = rows[0]["max_exposure_possible"] if rows else None
    return "\n".join(
        [
            "# Canary exposure against ε",
            "",
            f"Recipe `{payload['recipe']}`"
            + (
                " with " + ", ".join(f"`{o}`" for o in payload.get("overrides") or [])
                if payload.get("overrides")
                else ""
            )
            + f". Exposure in bits: {top:.1f} means the secret is ranked "
            "first among all candidates; about 1.44 is what a secret the model never saw gets. "
            "'DP allows' is the exposure the run's (ε, δ)-DP guarantee allows that many copies with "
            "95% probability (group privacy; hubtune.audit.exposure)."
            if top
            else "",
            "",
            *_summary(rows, copies),
            *table,
            "",
            *report_footer(
                payload["machine"], payload["command"], [f"- {n}" for n in payload["notes"]]
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="generate-quickstart")
    parser.add_argument("--epsilons", nargs="+", default=["inf", "8", "3", "1"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--quick", action="store_true", help="one seed, inf and 8, small data")
    parser.add_argument("--name", default="exposure_vs_epsilon")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--keep", default=None, help="keep run folders here")
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a configuration to run at every ε and seed (repeatable): its name, '=', and its "
        "recipe overrides separated by ';' (e.g. 'scrubbed=data.anonymize={entities: [email]}'); "
        "default: one arm, the recipe with --set",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run (repeatable), e.g. method.name=full",
    )
    args = parser.parse_args()
    if args.quick:
        args.epsilons, args.seeds = ["inf", "8"], args.seeds[:1]
    setup_environment(threads=args.threads)
    recipe_path = REPO / "recipes" / f"{args.recipe}.yaml"
    payload = {
        **result_head("exposure_vs_epsilon", script="bench_exposure.py", quick=args.quick),
        "recipe": args.recipe,
        "runs": [],
        "overrides": args.overrides,
        "arms": args.arm,
        "notes": args.note,
    }
    with workspace(args.keep) as folder:
        arms = [a.partition("=") for a in args.arm] or [("", "", "")]
        for seed in args.seeds:
            for arm, _, arm_overrides in arms:
                for epsilon in args.epsilons:
                    extra = [o.strip() for o in arm_overrides.split(";") if o.strip()]
                    payload["runs"].append(
                        run_one(
                            recipe_path,
                            epsilon,
                            seed,
                            folder,
                            [*(QUICK if args.quick else []), *args.overrides, *extra],
                            arm,
                        )
                    )
                    write_results(args.name, payload, markdown(payload))  # after every run


if __name__ == "__main__":
    main()
