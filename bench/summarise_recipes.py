"""One table from the bench_recipes.py result files: each recipe and configuration over its seeds.

For every (recipe, configuration): the seeds run, the test accuracy of each seed and their mean,
the classical baseline's mean, how many seeds beat / tie with / lose to it (by the paired
bootstrap interval of each run), the majority baseline and the mean wall time. The rows come
from the named result files as they were measured (their machines and commits are listed);
nothing is re-run.

    python bench/summarise_recipes.py recipes_vs_baselines recipes_vs_baselines_full ... \\
        --name recipes_summary
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

from benchlib import RESULTS_DIR, fmt_s, md_table, write_results

ORDER = ["shipped", "freeze", "freeze_native", "topk", "full", "shipped_native", "shipped_mean"]
# Rows measured before model.pooling existed (commit bff611d): their "freeze" read BERT's pooler
# on [CLS], which is what the freeze_native configuration asks for now ("freeze" now takes the
# model's own pooling: mean for MiniLM).
RENAMES = {("recipes_vs_baselines", "freeze"): "freeze_native"}
DESCRIBE = {
    "shipped": "the recipe as shipped",
    "freeze": "frozen features, head fitted to convergence (L-BFGS)",
    "freeze_native": "frozen features (the architecture's own pooling), L-BFGS head",
    "topk": "top 2 blocks unfrozen",
    "full": "full fine-tuning",
    "shipped_native": "the recipe with model.pooling=native",
    "shipped_mean": "the recipe with model.pooling=mean",
}


def summarise(files: list[str]) -> dict[str, Any]:
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    sources = []
    for name in files:
        payload = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        machine = payload["machine"]
        sources.append(
            {
                "file": f"bench/results/{name}.md",
                "commit": machine.get("git_commit"),
                "date": machine.get("date_utc"),
                "runs": len(payload["runs"]),
            }
        )
        for run in payload["runs"]:
            # A later file's run of the same (recipe, config, seed) replaces an earlier one.
            config = RENAMES.get((name, run["config"]), run["config"])
            runs[(run["recipe"], config)][int(run["seed"])] = {**run, "config": config}
    rows = []
    for (recipe, config), by_seed in sorted(
        runs.items(),
        key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]) if kv[0][1] in ORDER else 99),
    ):
        seeds = sorted(by_seed)
        chosen = [by_seed[s] for s in seeds]
        outcomes = [r["outcome"] for r in chosen]
        rows.append(
            {
                "recipe": recipe,
                "config": config,
                "seeds": seeds,
                "accuracy": [r["accuracy"] for r in chosen],
                "mean_accuracy": sum(r["accuracy"] for r in chosen) / len(chosen),
                "mean_classical": sum(r["classical"] for r in chosen) / len(chosen),
                "majority": chosen[0]["majority"],
                "better": outcomes.count("better"),
                "not_distinguishable": outcomes.count("not distinguishable"),
                "worse": outcomes.count("worse"),
                "mean_wall_s": sum(r["wall_s"] for r in chosen) / len(chosen),
            }
        )
    return {"rows": rows, "sources": sources}


def markdown(summary: dict[str, Any]) -> str:
    notes = [f"- {n}" for n in summary.get("notes") or []]
    table = md_table(
        [
            "recipe",
            "configuration",
            "seeds",
            "test accuracy per seed",
            "mean",
            "classical (mean)",
            "majority",
            "vs classical: better / tie / worse",
            "wall (mean)",
        ],
        [
            [
                r["recipe"],
                f"`{r['config']}`: {DESCRIBE.get(r['config'], r['config'])}",
                ", ".join(map(str, r["seeds"])),
                ", ".join(f"{a:.4f}" for a in r["accuracy"]),
                f"**{r['mean_accuracy']:.4f}**",
                f"{r['mean_classical']:.4f}",
                f"{r['majority']:.4f}",
                f"{r['better']} / {r['not_distinguishable']} / {r['worse']}",
                fmt_s(r["mean_wall_s"]),
            ]
            for r in summary["rows"]
        ],
    )
    sources = [
        f"- `{s['file']}`: {s['runs']} runs, commit {str(s['commit'])[:10]}, {s['date']}"
        for s in summary["sources"]
    ]
    return "\n".join(
        [
            "# Shipped recipes against the baselines: the summary",
            "",
            "Each shipped recipe and configuration over its seeds (the seed draws the split, the "
            "initialisation and the batches). 'vs classical' counts the seeds whose paired "
            "bootstrap interval of (model - TF-IDF/pixels + logistic regression) lies above 0 "
            "(better), straddles it (tie) or lies below (worse). Wall times are of one torch "
            "thread on a 2-core machine shared with other jobs; see each source for its machine, "
            "load and the exact overrides of each configuration.",
            "",
            *table,
            "",
            "## Sources",
            "",
            *sources,
            "",
            *(["## Notes", "", *notes, ""] if notes else []),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="result names under bench/results (no suffix)")
    parser.add_argument("--name", default="recipes_summary")
    parser.add_argument("--note", action="append", default=[], help="a note for the summary")
    args = parser.parse_args()
    summary = {**summarise(args.files), "notes": args.note}
    write_results(args.name, summary, markdown(summary))


if __name__ == "__main__":
    main()
