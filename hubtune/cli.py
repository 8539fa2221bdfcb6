"""The ``hubtune`` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from hubtune import __version__

app = typer.Typer(
    name="hubtune",
    help="Safe, shareable transfer learning for Hugging Face Hub models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Prepare the real data sets shipped inside Python packages.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as key.sub=value, e.g. train.epochs=2 method.r=16", show_default=False
    ),
]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _load(recipe: str, overrides: list[str] | None):
    from hubtune.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides=list(overrides or []))
    except RecipeError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(str(exc))


def _setup_logging(verbose: bool) -> None:
    # Only one process speaks under accelerate launch; the others log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    level = logging.INFO if rank == 0 else logging.WARNING
    if verbose:
        level = logging.DEBUG if rank == 0 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or shipped recipe name).")],
    overrides: Overrides = None,
) -> None:
    """Check a recipe: every problem at once, with field path, line and a hint."""
    loaded = _load(recipe, overrides)
    typer.echo(
        f"{recipe}: ok ({loaded.method.name}, model {loaded.model.id}@{loaded.model.revision}, "
        f"outputs in {loaded.run_dir})"
    )


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or shipped recipe name).")],
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run of the same name.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train and evaluate a recipe; outputs go to <output_dir>/<name>/.

    Works the same under `accelerate launch [--num_processes N] -m hubtune run RECIPE`.
    """
    loaded = _load(recipe, overrides)
    if resume and overwrite:
        _fail("--resume and --overwrite contradict each other; pick one")
    _setup_logging(verbose)
    from hubtune.launch import relaunch_on_cpu, requested_cpu_processes

    processes = requested_cpu_processes()
    if processes > 1:
        raise typer.Exit(relaunch_on_cpu(processes, sys.argv[1:]))
    from hubtune.data import DataError
    from hubtune.methods import MethodError
    from hubtune.train import RunError, format_summary, run_recipe

    try:
        result = run_recipe(loaded, resume=resume, overwrite=overwrite, recipe_source=str(recipe))
    except (RunError, DataError, MethodError, PermissionError, FileNotFoundError) as exc:
        _fail(f"hubtune run: {exc}", code=1)
        return
    if int(os.environ.get("RANK", "0") or 0) == 0:
        typer.echo(format_summary(result))


@app.command()
def audit(
    run_dir: Annotated[
        Path, typer.Argument(help="A complete run directory, e.g. runs/quickstart.")
    ],
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Policy name (default, strict) or path to a policy YAML; default: the recipe's audit.policy.",
        ),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="Another run on the same data and split (e.g. RUN-nonprivate): per-group changes.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Audit a finished run: per-group fairness (Fairlearn) and membership inference.

    Writes RUN_DIR/audit/{report.html,report.md,audit.json} and the verdict into run.json.
    Exit status: 0 pass, 3 fail or inconclusive, 2 unusable input.
    """
    _setup_logging(verbose)
    from hubtune.audit import AuditError, PolicyError, run_audit

    try:
        result = run_audit(run_dir, policy=policy, compare=compare)
    except (AuditError, PolicyError, ValueError, FileNotFoundError) as exc:
        _fail(f"hubtune audit: {exc}")
        return
    verdict = result["verdict"]
    typer.echo(f"verdict:   {verdict['status'].upper()} (policy {result['policy']['name']})")
    for check in verdict["checks"]:
        mark = {True: "pass", False: "FAIL", None: "n/a "}[check["passed"]]
        typer.echo(
            f"  {mark}  {check['check']} [{check['scope']}]: {check['judged_value']!s:.6} {check['rule']}"
        )
    membership = result.get("membership") or {}
    if "auc" in membership:
        typer.echo(
            f"membership inference: AUC {membership['auc']['value']:.3f}, empirical epsilon lower bound "
            f"{membership['epsilon_lower_bound']:.3f}"
            + (" -- BEATS THE DP BOUND" if membership.get("beats_dp_bound") else "")
        )
    typer.echo(f"report:    {(Path(run_dir) / 'audit' / 'report.html').resolve()}")
    if not verdict["passed"]:
        raise typer.Exit(3)


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="redditbias | rotten-tomatoes")],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Default: data/<name> (or $HUBTUNE_DATA_DIR/<name>)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if an up-to-date copy exists.")
    ] = False,
) -> None:
    """Build a clean data set (text, label[, target_group]) and report what was dropped and why."""
    from hubtune.prepare import prepare

    try:
        report = prepare(name, output_dir=output_dir, force=force)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return
    typer.echo(report.summary())


@app.command()
def version() -> None:
    """Print the hubtune version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="hubtune")


if __name__ == "__main__":
    main()
