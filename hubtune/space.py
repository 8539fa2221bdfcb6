"""Gradio Spaces for finished runs: render the Space repo files, or serve the app locally.

The template lives in the repository's ``space/`` folder (shipped inside the package as
``hubtune/space_template``): ``app.py`` is a standalone Gradio app that loads the model from its
Hub repo at a pinned commit and shows predictions plus a *Privacy & fairness* tab read from the
repo's ``privacy.json`` and ``audit/audit.json``. :func:`render_space` writes, for one run:

* ``app.py`` (copied as is) and ``requirements.txt`` (pins set to the run's library versions;
  gradio is left to the Space SDK),
* ``README.md`` whose YAML header comes from :class:`huggingface_hub.SpaceCardData`
  (``sdk: gradio``, ``sdk_version``, ``app_file``, ``models: [repo]``, ...),
* ``space_config.json``: repo id, commit SHA, labels, limits, title and the audit report's
  display names of the audit's metrics; never a token or a path of this machine.

:func:`serve_space` runs the same app here, from a rendered folder (Hub mode) or straight from
a run directory (local mode, offline: the model folder and reports are read from disk).

Example:
    >>> render_space(run_dir=Path("runs/quickstart"), model_repo_id="me/quickstart",
    ...              model_revision="0123456789abcdef0123456789abcdef01234567")
    PosixPath('runs/quickstart/space')
    >>> serve_space(source=Path("runs/quickstart"))  # http://127.0.0.1:7860, offline
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from hubtune.io import atomic_write_json, atomic_write_text
from hubtune.model import GROUPNORM_FILE
from hubtune.rundir import (
    PRIVACY_LEDGER,
    RECIPE_FILE,
    RUN_FILE,
    AuditRecord,
    RunDirError,
    RunInfo,
    read_audit,
    read_ledger,
    read_run_info,
)
from hubtune.tasks import get_task

__all__ = [
    "CONFIG_FILE",
    "SPACE_DIR",
    "SPACE_GRADIO_VERSION",
    "SpaceError",
    "build_space_demo",
    "load_app",
    "local_space_config",
    "render_space",
    "serve_space",
    "space_config",
    "template_dir",
]

logger = logging.getLogger(__name__)

SPACE_DIR = "space"
CONFIG_FILE = "space_config.json"
# The gradio version the template is tested with; README.md pins the Space SDK to it.
SPACE_GRADIO_VERSION = "6.31.0"
SPACE_PYTHON_VERSION = "3.11"
DEFAULT_MAX_INPUT_CHARS = 2000
DEFAULT_MAX_NEW_TOKENS = (
    40  # text generation: tokens a visitor gets per prompt (the app caps it at 128)
)
CONFIG_SCHEMA_VERSION = 1
COPIED_FILES = ("app.py",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
# requirement name -> run.json "versions" key
_PINNED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
}


class SpaceError(ValueError):
    """A run cannot be turned into a Space (or served); the message says why."""


def template_dir() -> Path:
    """The Space template folder: the packaged copy, else the repository's ``space/``."""
    for candidate in (
        Path(__file__).parent / "space_template",
        Path(__file__).resolve().parent.parent / "space",
    ):
        if (candidate / "app.py").is_file():
            return candidate
    raise SpaceError("the Space template (space/app.py) is missing from this installation")


# --------------------------------------------------------------------------- run contents


def _read_audit(run_dir: Path) -> AuditRecord | None:
    try:
        return read_audit(run_dir)
    except RunDirError as exc:
        raise SpaceError(str(exc)) from exc


def _run_info(run_dir: Path) -> RunInfo:
    info = read_run_info(run_dir)
    if info is None:
        raise SpaceError(f"{run_dir} is not a finished hubtune run (no run.json)")
    if info.status != "completed":
        raise SpaceError(f"{run_dir}: the run did not complete (status {info.status!r})")
    return info


def _recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECIPE_FILE
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, yaml.YAMLError) as exc:
        raise SpaceError(f"{path}: cannot be read ({exc})") from exc
    return loaded if isinstance(loaded, dict) else {}


def _model_dir_name(info: RunInfo) -> str:
    name = info.outputs.get("model_dir") or "model"
    if name not in ("model", "adapter"):
        raise SpaceError(f"run.json: unexpected outputs.model_dir {name!r}")
    return str(name)


def _common_config(run_dir: Path, info: RunInfo, recipe: dict[str, Any]) -> dict[str, Any]:
    if ((recipe.get("data") or {}).get("columns") or {}).get("text_pair"):
        raise SpaceError(
            f"{run_dir}: the model classifies text pairs; the Space template takes one text"
        )
    task = str((recipe.get("model") or {}).get("task") or "text-classification")
    generation = not get_task(task).has_labels
    labels = info.data.label_names or (recipe.get("data") or {}).get("labels") or []
    if not labels and not generation:
        raise SpaceError(f"{run_dir}: run.json records no label names")
    if (run_dir / "model" / GROUPNORM_FILE).exists():
        raise SpaceError(
            f"{run_dir}: this model's BatchNorm layers were replaced by GroupNorm (method.batchnorm: "
            "groupnorm), which only hubtune can rebuild (hubtune.model.load_saved_image_model); the "
            "Space runs without hubtune. Push without a Space (no push.space_id)."
        )
    name = str(info.name or run_dir.name)
    return {
        "schema_version": CONFIG_SCHEMA_VERSION,
        "task": task,
        "title": f"{name} {'text generator' if generation else 'classifier'}"[:60],
        "labels": [str(label) for label in labels],
        **(
            {
                "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
                # chat: the demo's prompt is a user message rendered by the pushed tokenizer's
                # chat template, as the model was trained; text: [bos] + the prompt's tokens
                "prompt_format": "chat"
                if ((recipe.get("data") or {}).get("columns") or {}).get("messages")
                else "text",
            }
            if generation
            else {}
        ),
        "max_input_chars": DEFAULT_MAX_INPUT_CHARS,
        "max_length": int((recipe.get("model") or {}).get("max_length") or 128),
        "metric_names": _metric_names(run_dir),
    }


def _metric_names(run_dir: Path) -> dict[str, str]:
    """Display names of the metrics the run's audit.json names, as the audit report shows them.

    The Space runs without hubtune, so it cannot call the report's naming helper: the names
    travel in ``space_config.json`` instead, computed by that helper.
    """
    from hubtune.audit.report import metric_label

    audit = _read_audit(run_dir)
    if audit is None or audit.fairness is None:
        return {}
    keys = {str(metric) for metric in audit.fairness.metrics}
    for slice_ in audit.fairness.slices:
        disparities = slice_.disparities
        written = disparities.model_fields_set | set(disparities.model_extra or {})
        keys.update(str(name) for name in written if name != "largest_gap")
        keys.update(str(metric) for metric in disparities.largest_gap)
    return {key: metric_label(key) for key in sorted(keys)}


def _base_model(
    info: RunInfo, base_model_repo_id: str | None, base_model_revision: str | None
) -> tuple[str, str]:
    """The Hub repo and commit of a LoRA adapter's base model."""
    if base_model_repo_id:
        if not base_model_revision:
            raise SpaceError("base_model_repo_id needs base_model_revision (a commit SHA)")
        return base_model_repo_id, base_model_revision
    base = info.base_model
    hub_id = base.public_hub_id
    if hub_id:  # a Hub repo, or an exact packaged copy of one (then its main)
        revision = base.sha if base.kind == "hub" else None
        return hub_id, str(revision) if revision and _SHA.match(revision) else "main"
    raise SpaceError(
        f"the adapter's base model {info.base_model.spec!r} is not a Hub repo: pass "
        "base_model_repo_id and base_model_revision so the Space can download it"
    )


def space_config(
    *,
    run_dir: Path,
    model_repo_id: str,
    model_revision: str,
    base_model_repo_id: str | None = None,
    base_model_revision: str | None = None,
) -> dict[str, Any]:
    """The ``space_config.json`` of a run pushed to ``model_repo_id`` at ``model_revision``.

    Args:
        run_dir: A completed run directory.
        model_repo_id: The Hub model repo holding the run's weights, privacy.json and audit/.
        model_revision: The 40-character commit SHA the Space pins.
        base_model_repo_id: For LoRA runs whose base model is not a Hub repo: its Hub id.
        base_model_revision: The commit (or branch) of ``base_model_repo_id``.

    Returns:
        The config as a dict (no tokens, no local paths).

    Raises:
        SpaceError: Not a finished run, a malformed repo id, or a revision that is not a SHA.
    """
    run_dir = Path(run_dir)
    if not _REPO_ID.match(model_repo_id):
        raise SpaceError(f"model repo id {model_repo_id!r} is not of the form owner/name")
    if not _SHA.match(model_revision):
        raise SpaceError(
            f"model revision {model_revision!r} is not a 40-character commit SHA: the Space pins "
            "an exact commit so it always serves the weights that were audited"
        )
    info = _run_info(run_dir)
    config = _common_config(run_dir, info, _recipe(run_dir))
    config.update({"model_repo_id": model_repo_id, "model_revision": model_revision})
    if _model_dir_name(info) == "adapter":
        repo, revision = _base_model(info, base_model_repo_id, base_model_revision)
        config.update({"base_model_repo_id": repo, "base_model_revision": revision})
    _check_public(config)
    return config


def local_space_config(*, run_dir: Path) -> dict[str, Any]:
    """A config that serves a run straight from disk (``hubtune space serve RUN_DIR``).

    Paths are relative to ``run_dir``: pass ``base_dir=run_dir`` to the app. Never publish it.
    """
    run_dir = Path(run_dir)
    info = _run_info(run_dir)
    config = _common_config(run_dir, info, _recipe(run_dir))
    model_dir = _model_dir_name(info)
    if not (run_dir / model_dir).is_dir():
        raise SpaceError(f"{run_dir}: the model folder {model_dir}/ is missing")
    config.update({"model_path": model_dir, "reports_path": "."})
    return config


def _check_public(config: dict[str, Any]) -> None:
    text = json.dumps(config)
    if _TOKEN.search(text):
        raise SpaceError("refusing to write a Space config that contains an access token")
    for value in config.values():
        if isinstance(value, str) and (
            value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", value)
        ):
            raise SpaceError(f"refusing to write a local path into a Space config: {value!r}")


# --------------------------------------------------------------------------- render


def _requirements(template: str, versions: dict[str, Any]) -> str:
    """The template's requirements with the pins set to the versions the run used."""
    out = []
    for line in template.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==\S+$", line.strip())
        key = _PINNED.get(match.group(1)) if match else None
        version = versions.get(key) if key else None
        if match and version:
            # Local version labels (2.13.0+cpu) are not on PyPI.
            line = f"{match.group(1)}=={str(version).split('+', 1)[0]}"
        out.append(line)
    return "\n".join(out) + "\n"


def _privacy_statement(run_dir: Path) -> str:
    from hubtune.privacy import guarantee_is_void

    ledger = read_ledger(run_dir)
    if ledger is None:
        return "trained without differential privacy"
    if ledger.guarantee_void or guarantee_is_void(ledger.noise_source):
        return "trained with DP-SGD noise fixed for testing: NO privacy guarantee"
    return (
        f"trained with differential privacy, (ε = {float(ledger.epsilon or 0):.2f}, "
        f"δ = {float(ledger.delta or 0):.2g})-DP at the {ledger.unit} level "
        f"({str(ledger.accountant or '').upper()} accountant)"
    )


def _audit_statement(run_dir: Path) -> tuple[str, str | None]:
    audit = _read_audit(run_dir)
    if audit is None:
        return "not audited", None
    verdict = (audit.verdict.status if audit.verdict else None) or "unknown"
    policy = audit.policy.name or "unknown"
    failed = audit.verdict.failed if audit.verdict else []
    text = f"**{str(verdict).upper()}** under the `{policy}` policy"
    if failed:
        text += " (failed: " + "; ".join(str(item) for item in failed) + ")"
    return text, str(verdict)


def render_space(
    *,
    run_dir: Path,
    model_repo_id: str,
    model_revision: str,
    out_dir: Path | None = None,
    base_model_repo_id: str | None = None,
    base_model_revision: str | None = None,
) -> Path:
    """Write the files of a Gradio Space repo for a run whose model is on the Hub.

    Long on purpose: the Space folder is written file by file (app, config, requirements, card) in one atomic directory swap.

    Args:
        run_dir: A completed run directory.
        model_repo_id: The Hub model repo the run was pushed to (weights, privacy.json, audit/).
        model_revision: The commit SHA of that push; the Space loads exactly this commit.
        out_dir: Where to write the Space (default ``RUN_DIR/space``); existing files of the
            same names are replaced, others are left alone.
        base_model_repo_id: For LoRA runs whose base model is not a Hub repo: its Hub id.
        base_model_revision: The commit (or branch) of ``base_model_repo_id``.

    Returns:
        The folder holding ``app.py``, ``requirements.txt``, ``README.md`` and
        ``space_config.json``, ready for ``upload_folder(repo_type="space")``.

    Raises:
        SpaceError: Not a finished run, or a repo id / revision that cannot be pinned.
    """
    from huggingface_hub import SpaceCard, SpaceCardData

    run_dir = Path(run_dir)
    config = space_config(
        run_dir=run_dir,
        model_repo_id=model_repo_id,
        model_revision=model_revision,
        base_model_repo_id=base_model_repo_id,
        base_model_revision=base_model_revision,
    )
    info = _run_info(run_dir)
    source = template_dir()
    target = Path(out_dir) if out_dir is not None else run_dir / SPACE_DIR
    target.mkdir(parents=True, exist_ok=True)

    for name in COPIED_FILES:
        atomic_write_text(target / name, (source / name).read_text(encoding="utf-8"))
    template = (source / "requirements.txt").read_text(encoding="utf-8")
    if get_task(str(config.get("task") or "text-classification")).input_kind == "image":
        # Image processors need Pillow; timm models (TimmWrapper) need timm and a torchvision
        # built for the same torch: pinned to what the run used when it was recorded.
        versions = info.versions
        for package in ("pillow", "timm", "torchvision"):
            version = str(versions.get(package) or "").split("+", 1)[0]
            template += f"{package}=={version}\n" if version else f"{package}\n"
    atomic_write_text(
        target / "requirements.txt",
        _requirements(template, info.versions),
    )
    atomic_write_json(target / CONFIG_FILE, config)

    privacy = _privacy_statement(run_dir)
    audit_text, verdict = _audit_statement(run_dir)
    tags = ["hubtune", str(config.get("task") or "text-classification"), "gradio"]
    if (run_dir / PRIVACY_LEDGER).exists():
        tags.append("differential-privacy")
    if verdict is not None:
        tags.append("fairness-audit")
    card_data = SpaceCardData(
        title=config["title"],
        emoji="🛡️",
        colorFrom="indigo",
        colorTo="blue",
        sdk="gradio",
        sdk_version=SPACE_GRADIO_VERSION,
        python_version=SPACE_PYTHON_VERSION,
        app_file="app.py",
        pinned=False,
        license="apache-2.0",
        models=[model_repo_id]
        + ([config["base_model_repo_id"]] if "base_model_repo_id" in config else []),
        tags=tags,
        short_description="Text classifier with its privacy and fairness audit",
    )
    card = SpaceCard.from_template(
        card_data,
        template_path=str(source / "README.md.j2"),
        title=config["title"],
        labels=config["labels"],
        model_repo_id=model_repo_id,
        model_revision=model_revision,
        model_url=f"/{model_repo_id}/tree/{model_revision}",
        privacy_statement=privacy,
        audit_statement=audit_text,
        max_input_chars=config["max_input_chars"],
    )
    atomic_write_text(target / "README.md", str(card))
    logger.info("Space for %s written to %s", run_dir, target)
    return target


# --------------------------------------------------------------------------- serve


def load_app(app_file: Path | None = None) -> ModuleType:
    """Import the Space's ``app.py`` (default: the template's) as a module."""
    path = Path(app_file) if app_file is not None else template_dir() / "app.py"
    name = f"hubtune_space_app_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpaceError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _app_and_config(source: str | Path) -> tuple[ModuleType, dict[str, Any]]:
    folder = Path(source)
    if (folder / RUN_FILE).is_file():
        return load_app(), local_space_config(run_dir=folder)
    if (folder / CONFIG_FILE).is_file():
        app_file = folder / "app.py"
        app = load_app(app_file if app_file.is_file() else None)
        try:
            return app, app.load_config(folder / CONFIG_FILE)
        except ValueError as exc:
            raise SpaceError(str(exc)) from exc
    raise SpaceError(
        f"{folder} is neither a run directory (run.json) nor a rendered Space ({CONFIG_FILE})"
    )


def build_space_demo(*, source: str | Path, endpoint: str | None = None) -> Any:
    """The app's ``gradio.Blocks`` for a rendered Space folder or a run directory.

    Args:
        source: A rendered Space folder (with ``space_config.json``; its own ``app.py`` is
            used) or a run directory (served from disk with the packaged template).
        endpoint: Hub endpoint for Hub-mode configs (default ``HF_ENDPOINT``).

    Returns:
        The ``gradio.Blocks`` demo, its model loaded and its queue configured.

    Raises:
        SpaceError: ``source`` is neither, or its config is malformed.
    """
    app, config = _app_and_config(source)
    return app.build_demo(config, base_dir=Path(source), endpoint=endpoint)


def serve_space(
    *,
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    endpoint: str | None = None,
) -> None:
    """Run a Space's app here until interrupted.

    Args:
        source: A rendered Space folder (the model comes from its Hub repo at the pinned
            revision) or a run directory (served offline from its model/ or adapter/ folder,
            privacy.json and audit/).
        host: Interface to listen on; the default is this machine only.
        port: TCP port.
        endpoint: Hub endpoint for a rendered Space (e.g. a local Hub-compatible server).

    Raises:
        SpaceError: ``source`` is neither a run directory nor a rendered Space.
    """
    app, config = _app_and_config(source)
    demo = app.build_demo(config, base_dir=Path(source), endpoint=endpoint)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the app", host)
    app.launch(demo, server_name=host, server_port=port)
