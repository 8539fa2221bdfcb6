"""A run, stage by stage: train -> audit -> card -> push. The only module that knows the order.

Each stage reads what the previous one wrote in the run directory (:mod:`hubtune.rundir`), so
each also runs alone: ``hubtune audit RUN``, ``hubtune card RUN``, ``hubtune push RUN``. No
stage imports a later one or this module.

- **train** (:func:`hubtune.train.train`) on every process; with ``audit.compare_nonprivate``
  the recipe's non-private twin trains next, in-process, through the same entry point;
- then the process group is released, and the main process alone runs
- **audit** (:func:`hubtune.audit.run_audit`) and, when the recipe says so and the audit gate
  allows, **card** and **push** (:func:`hubtune.push.push_run` writes the card for the
  repository it pushes to; ``hubtune card RUN`` writes one for a run that is not pushed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from hubtune.errors import RunError
from hubtune.io import atomic_write_json, atomic_write_text
from hubtune.privacy import VOID_REASON, guarantee_is_void
from hubtune.progress import OnStep
from hubtune.recipe import Recipe
from hubtune.rundir import AUDIT_DIR, PRIVACY_LEDGER, RUN_FILE, read_json

__all__ = ["RunResult", "format_summary", "nonprivate_twin", "run_recipe"]

logger = logging.getLogger("hubtune")

TWIN_SOURCE = "twin-source.yaml"


@dataclass
class RunResult:
    """A finished run: where its files are, its metrics, and what the later stages did."""

    run_dir: Path
    metrics: dict[str, Any]
    resumed_from_epoch: int | None = None
    audit: dict[str, Any] | None = None
    push: dict[str, Any] | None = None


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    recipe_source: str | None = None,
    on_step: OnStep | None = None,
) -> RunResult:
    """Train, audit and (if the recipe says so) write the card and push, into ``<output_dir>/<name>/``.

    Args:
        recipe: A validated recipe.
        resume: Continue from the latest checkpoint of an interrupted run.
        overwrite: Delete an existing run directory of the same name first.
        recipe_source: Where the recipe came from (recorded in run.json).
        on_step: Called after each optimizer step of the main training (see
            :class:`hubtune.progress.StepInfo`).

    Raises:
        InputError: the model or data source cannot be used as given (nothing was started).
        RunError: the run started and stopped; see also DataError and MethodError.
    """
    from hubtune.hub import hub_endpoint
    from hubtune.inputs import check_inputs
    from hubtune.train import train

    with hub_endpoint(recipe.hub.endpoint, local_root=recipe.hub.local_root):
        # Before the run folder is touched: a missing file or unknown model neither starts a
        # run nor, with --overwrite, deletes the previous one.
        check_inputs(recipe)
        trained = train(
            recipe,
            resume=resume,
            overwrite=overwrite,
            recipe_source=recipe_source,
            on_step=on_step,
        )
        twin = (
            nonprivate_twin(recipe)
            if recipe.audit.enabled and recipe.audit.compare_nonprivate
            else None
        )
        scratch = scratch_twin(recipe) if recipe.checks.negative_transfer else None
        main = _release_processes()
        if main and scratch is not None:
            trained.metrics["scratch_baseline"] = record_scratch_baseline(recipe, scratch)
        result = RunResult(trained.run_dir, trained.metrics, trained.resumed_from_epoch)
        if main and recipe.audit.enabled:
            result.audit = _audit(recipe, twin)
            if recipe.push.enabled:  # the card is written for the repository it goes to
                result.push = _push(recipe)
    return result


def nonprivate_twin(recipe: Recipe) -> Path:
    """Train (or reuse) the recipe's non-private twin, for the per-group cost of privacy.

    The twin is the recipe with privacy off, no canaries and no audit (and the head trained by
    the same epochs of SGD as under DP, not fitted by L-BFGS), named
    ``<name>-nonprivate`` beside the run, trained in-process through the same entry point
    (on every process of a launch). A twin trained earlier from the same recipe is reused.
    """

    spec = recipe.model_dump(mode="json")
    spec.update(
        name=f"{recipe.name}-nonprivate",
        privacy=None,
        description=f"Non-private twin of {recipe.name} (for the audit's cost-of-privacy comparison).",
        audit={**spec["audit"], "enabled": False, "canaries": 0, "compare_nonprivate": False},
        push={**spec["push"], "enabled": False},
    )
    if spec["method"].get("head_fit") == "auto":
        # The same solver as the private run (DP-SGD's epochs, without the noise), so the
        # comparison measures privacy, not L-BFGS against SGD.
        spec["method"]["head_fit"] = "sgd"
    return _train_twin(spec, what="the non-private twin", of=recipe.name, stage="audit")


def _train_twin(spec: dict[str, Any], *, what: str, of: str, stage: str) -> Path:
    """Train the recipe ``spec`` in-process (every process of a launch), or reuse its run when
    an earlier one was trained from the same spec (``twin-source.yaml`` beside it)."""
    from hubtune.train import train

    twin = Recipe.model_validate(spec)
    text = yaml.safe_dump(spec, sort_keys=False)
    source = twin.run_dir / TWIN_SOURCE
    if (twin.run_dir / RUN_FILE).exists() and source.exists() and source.read_text() == text:
        logger.info("%s: reusing %s %s", stage, what, twin.run_dir)
        return twin.run_dir
    logger.info("%s: training %s %s", stage, what, twin.run_dir)
    train(twin, overwrite=True, recipe_source=f"{what} of {of}")
    atomic_write_text(source, text)
    return twin.run_dir


def scratch_twin(recipe: Recipe) -> Path:
    """Train (or reuse) the same architecture from random initialisation on the same split.

    ``<name>-scratch`` beside the run: ``model.init: random``, full fine-tuning at
    ``checks.scratch_lr`` for ``checks.scratch_epochs`` (default the recipe's), the recipe's
    data, seed (so the same split) and privacy settings; no audit, no checks, no push. Trained
    on every process of a launch, through the same entry point; reused when the recipe is
    unchanged.
    """

    spec = recipe.model_dump(mode="json")
    train_section = {**spec["train"], "lr": recipe.checks.scratch_lr}
    if recipe.checks.scratch_epochs is not None:
        train_section["epochs"] = recipe.checks.scratch_epochs
    spec.update(
        name=f"{recipe.name}-scratch",
        description=f"{recipe.name}'s architecture from random initialisation (negative-transfer check).",
        model={**spec["model"], "init": "random"},
        method={"name": "full"},
        train=train_section,
        audit={
            **spec["audit"],
            "enabled": False,
            "canaries": 0,
            "compare_nonprivate": False,
            "exposure": None,
        },
        checks={**spec["checks"], "negative_transfer": False, "forgetting": False},
        push={**spec["push"], "enabled": False},
    )
    return _train_twin(spec, what="the from-scratch twin", of=recipe.name, stage="checks")


def record_scratch_baseline(recipe: Recipe, scratch: Path) -> dict[str, Any]:
    """Compare the run's test predictions with the from-scratch model's (paired bootstrap) and
    record it in metrics.json and run.json (``scratch_baseline``)."""
    from hubtune.baselines import compare
    from hubtune.rundir import METRICS_FILE, read_predictions

    ours, theirs = read_predictions(recipe.run_dir), read_predictions(scratch)
    if ours is None or theirs is None or ours.kind != "classification":
        raise RunError(f"negative-transfer check: no classification predictions in {scratch}")
    if ours.frame["row_id"].tolist() != theirs.frame["row_id"].tolist():
        raise RunError(
            f"negative-transfer check: {scratch} was tested on other rows than {recipe.run_dir}; "
            "delete it and run again"
        )
    epochs = recipe.checks.scratch_epochs or recipe.train.epochs  # as scratch_twin trains
    labels = ours.frame["label_id"].to_numpy()
    record = {
        "name": f"same architecture from random initialisation (full fine-tuning, lr "
        f"{recipe.checks.scratch_lr:g}, {epochs} epochs)",
        "run": scratch.name,
        **compare(
            ours.frame["prediction_id"].to_numpy(),
            theirs.frame["prediction_id"].to_numpy(),
            labels,
            seed=recipe.seed,
        ),
    }
    for name in (METRICS_FILE, RUN_FILE):
        path = recipe.run_dir / name
        content = json.loads(path.read_text())
        content["scratch_baseline"] = record
        atomic_write_json(path, content)
    return record


def _release_processes() -> bool:
    """End distributed training (every process waits here); True on the main process.

    The later stages run on the main process alone, after the process group is gone, so no
    collective can wait on them. The Accelerate state is reset, so that a later run in the same
    process may choose another precision.
    """
    from accelerate.state import AcceleratorState, PartialState

    state = PartialState()
    state.wait_for_everyone()
    main = state.is_main_process
    state.destroy_process_group()
    AcceleratorState._reset_state()
    return bool(main)


def _audit(recipe: Recipe, twin: Path | None) -> dict[str, Any]:
    from hubtune.audit import AuditError, run_audit

    t0 = time.perf_counter()
    try:
        audit = run_audit(recipe.run_dir, policy=recipe.audit.policy, compare=twin)
    except (AuditError, ValueError, OSError) as exc:
        raise RunError(
            f"training finished and its outputs are in {recipe.run_dir}, but the audit failed: {exc}. "
            f"Retry it with `hubtune audit {recipe.run_dir}`."
        ) from exc
    logger.info("audit: %s in %.1f s", audit["verdict"]["status"], time.perf_counter() - t0)
    return audit


def _push(recipe: Recipe) -> dict[str, Any]:
    from hubtune.push import PushError, push_run

    assert recipe.push.repo_id is not None
    try:
        pushed = push_run(
            recipe.run_dir,
            repo_id=recipe.push.repo_id,
            private=recipe.push.private,
            space_id=recipe.push.space_id,
            allow_failing_audit=recipe.push.allow_failing_audit,
            include_membership_audit=recipe.push.include_membership_audit,
        )
    except PushError as exc:
        raise RunError(
            f"training and audit finished (outputs in {recipe.run_dir}), but the push was refused: {exc}"
        ) from None
    return asdict(pushed)


# --------------------------------------------------------------------------- the summary


def format_summary(result: RunResult) -> str:
    """The lines the CLI prints at the end of a run."""
    test = result.metrics["test"]
    return "\n".join(
        [
            f"outputs:   {result.run_dir.resolve()}",
            *_test_lines(result.metrics),
            *_selection_lines(result.metrics),
            *_classical_lines(result.metrics, test.get("accuracy", 0.0)),
            *_forgetting_lines(result.metrics),
            *_scratch_lines(result.metrics, test.get("accuracy", 0.0)),
            *privacy_lines(result.run_dir),
            *_audit_lines(result),
            *(
                [
                    f"pushed:    {result.push['repo_id']}@{result.push['commit']}"
                    + (f"; space {result.push['space_id']}" if result.push["space_id"] else "")
                ]
                if result.push
                else []
            ),
        ]
    )


def _test_lines(metrics: dict[str, Any]) -> list[str]:
    test = metrics["test"]
    if "perplexity" in test:  # a language model
        return [
            f"test:      token loss {test['loss']:.4f}  perplexity {test['perplexity']:.2f}  "
            f"next-token accuracy {test['accuracy']:.4f}  exact match {test['exact_match']:.4f}"
        ]
    base = metrics["majority_baseline"]
    return [
        f"test:      accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  loss {test['loss']:.4f}",
        f"baseline:  accuracy {base['accuracy']:.4f}  (always predicting '{base['label']}')",
        f"gain:      {100 * (test['accuracy'] - base['accuracy']):+.1f} accuracy points over the baseline",
    ]


def _selection_lines(metrics: dict[str, Any]) -> list[str]:
    from hubtune.selection import describe

    selected = metrics.get("selected_epoch")
    return [f"weights:   {describe(selected)}"] if selected else []


def _scratch_lines(metrics: dict[str, Any], accuracy: float) -> list[str]:
    from hubtune.baselines import verdict_text

    scratch = metrics.get("scratch_baseline")
    if not scratch:
        return []
    line = verdict_text(accuracy, {**scratch, "name": "from scratch"})
    return [f"scratch:   {line} ({scratch['name']}; run {scratch['run']})"]


def _forgetting_lines(metrics: dict[str, Any]) -> list[str]:
    forgetting = metrics.get("forgetting")
    if not forgetting:
        return []
    if "perplexity" in forgetting:
        ppl = forgetting["perplexity"]
        return [
            f"forgetting: perplexity of general sentences {ppl['before']:.1f} pretrained -> "
            f"{ppl['after']:.1f} fine-tuned ({forgetting['ratio']:.2f}x; forgetting.json)"
        ]
    topics = forgetting["topic_neighbours"]
    return [
        f"forgetting: general-sentence similarities kept at rank correlation "
        f"{forgetting['similarity_preserved']:.3f} with the pretrained encoder (same-topic "
        f"neighbours {topics['before']:.3f} -> {topics['after']:.3f}; forgetting.json)"
    ]


def _classical_lines(metrics: dict[str, Any], accuracy: float) -> list[str]:
    from hubtune.baselines import verdict_text

    classical = metrics.get("classical_baseline")
    if not classical:
        return []
    low, high = classical["ci"]
    return [
        f"classical: accuracy {classical['accuracy']:.4f} [{low:.4f}, {high:.4f}]  "
        f"({classical['name']}, no pretraining; C = {classical['C']})",
        f"transfer:  {verdict_text(accuracy, classical)}",
    ]


def privacy_lines(run_dir: Path) -> list[str]:
    """The summary's privacy line(s), from the ledger: the guarantee, or that there is none."""
    path = run_dir / PRIVACY_LEDGER
    ledger = read_json(path)
    if ledger is None:
        return ["privacy:   trained without differential privacy"]
    eps = ledger["epsilon_by_accountant"]
    mechanism = (
        f"{ledger.get('noise') or 'σ ' + format(ledger['noise_multiplier'], '.3f')}, C {ledger['max_grad_norm']:g}, "
        f"q {ledger['sample_rate']:.4g}, {ledger['steps']} steps; ledger {path}"
    )
    if guarantee_is_void(ledger.get("noise_source")):
        return [f"privacy:   NO GUARANTEE: {VOID_REASON}", f"           ({mechanism})"]
    return [
        f"privacy:   ({ledger['epsilon']:.3f}, {ledger['delta']:.2g})-DP ({ledger['accountant'].upper()}; "
        f"RDP epsilon {eps['rdp']:.3f}), {mechanism}"
    ]


def _audit_lines(result: RunResult) -> list[str]:
    if result.audit is None:
        return []
    verdict = result.audit["verdict"]
    detail = "; ".join(verdict["failed"] or verdict["not_evaluable"])
    if not verdict["checks"]:  # a pass with nothing checked must say so
        detail = "no check applied (" + "; ".join(verdict.get("notes") or []) + ")"
    membership = result.audit.get("membership") or {}
    lines = [
        f"audit:     {verdict['status'].upper().replace('_', ' ')} (policy {result.audit['policy']['name']})"
        + (f": {detail}" if detail else "")
        + f"; report {result.run_dir.resolve() / AUDIT_DIR / 'report.html'}"
    ]
    if "auc" in membership:
        lines.append(
            f"membership inference: AUC {membership['auc']['value']:.3f}, empirical epsilon lower bound "
            f"{membership['epsilon_lower_bound']:.3f}"
            + (" -- BEATS THE DP BOUND" if membership.get("beats_dp_bound") else "")
        )
    return lines
