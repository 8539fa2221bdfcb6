"""Push a finished, audited run to the Hub: one commit with weights, card and audit.

The push goes through the real ``huggingface_hub`` client, so it works the same against
huggingface.co and against hubtune's local endpoint (``hubtune hub serve``). It is gated by
the audit: a run whose audit did not pass is refused unless ``allow_failing_audit`` is set,
and that override is recorded in run.json and stated in the model card.

What is pushed: the weights folder (``model/`` or ``adapter/``) at the repository root, the
card as ``README.md``, ``audit/`` (reports, audit.json, charts), ``privacy.json`` and the
resolved recipe. What never is: ``predictions.parquet`` (row-level test data with sensitive
columns), ``membership_scores.parquet`` (per-example losses), checkpoints and logs (they hold
the DP noise generators' state), and any token.

A retry after a failure is safe: every push carries a digest of its files in the commit
description, ``parent_commit`` guards against overwriting a concurrent change, and a retry
whose previous attempt did land is recognised and not committed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubtune.io import atomic_write_json
from hubtune.rundir import (
    AUDIT_DIR,
    AUDIT_FILE,
    AUDIT_JSON,
    CARD_DIR,
    POSTPROCESS_FILE,
    PRIVACY_FILE,
    PRIVACY_LEDGER,
    RECIPE_FILE,
    RUN_FILE,
    public_path,
    read_run_info,
    weights_dir,
)

__all__ = ["PushError", "PushResult", "push_run", "pushed_files"]

logger = logging.getLogger(__name__)

_PUSH_ID = "hubtune-push-id: "


class PushError(RuntimeError):
    """The run cannot be pushed; the message says why and what to do."""


@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    already_there: bool
    space_id: str | None = None
    space_commit: str | None = None


def pushed_files(run_dir: Path) -> dict[str, Path]:
    """Repository path -> local file, for everything a push of ``run_dir`` uploads."""
    files: dict[str, Path] = {}
    weights = weights_dir(run_dir)
    if not weights.is_dir():
        raise PushError(f"{run_dir} has no model/ or adapter/ folder; is it a complete run?")
    for path in sorted(weights.rglob("*")):
        if path.is_file():
            files[path.relative_to(weights).as_posix()] = path
    card = run_dir / CARD_DIR / "README.md"
    if card.exists():
        files["README.md"] = card
    audit = run_dir / AUDIT_DIR
    if audit.is_dir():
        for path in sorted(audit.rglob("*")):
            if path.is_file():
                files[f"audit/{path.relative_to(audit).as_posix()}"] = path
    for name in (PRIVACY_LEDGER, RECIPE_FILE, POSTPROCESS_FILE):
        if (run_dir / name).exists():
            files[name] = run_dir / name
    return files


def _public_copies(
    run_dir: Path, files: dict[str, Path], scratch: Path, *, include_membership: bool = False
) -> dict[str, Path]:
    """Replace files that record local paths or private statistics with copies that do not.

    peft writes the base model's local folder into ``adapter_config.json``, and a resolved
    recipe names local data files and folders: published as they are, they would tell the
    world how the machine is laid out, and the adapter would point at a folder nobody else
    has. The adapter is pointed at the base model's Hub id when there is one. The privacy
    ledgers and the audit go out as their public versions (:mod:`hubtune.audit.public`).
    """
    import yaml

    out = _public_audit_files(run_dir, dict(files), scratch, include_membership=include_membership)
    run_info = read_run_info(run_dir)
    assert run_info is not None  # push_run checked run.json first
    if "adapter_config.json" in files:
        config = json.loads(files["adapter_config.json"].read_text())
        base = config.get("base_model_name_or_path")
        if base and (Path(base).is_absolute() or Path(base).exists()):
            config["base_model_name_or_path"] = run_info.base_model.public_hub_id or public_path(
                base
            )
            target = scratch / "adapter_config.json"
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            out["adapter_config.json"] = target

    def public(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: public(v) for k, v in value.items()}
        if isinstance(value, list):
            return [public(v) for v in value]
        if isinstance(value, str) and (value.startswith(("/", "~")) or ".." in Path(value).parts):
            return public_path(value)
        return value

    if RECIPE_FILE in files:
        recipe = yaml.safe_load(files[RECIPE_FILE].read_text())
        target = scratch / RECIPE_FILE
        target.write_text(yaml.safe_dump(public(recipe), sort_keys=False))
        out[RECIPE_FILE] = target
    return out


def _public_audit_files(
    run_dir: Path, files: dict[str, Path], scratch: Path, *, include_membership: bool
) -> dict[str, Path]:
    """The public ledgers and a public audit (re-rendered) in place of the run's own."""
    from hubtune.audit.public import public_audit, public_ledger
    from hubtune.audit.report import render_reports

    for name in (PRIVACY_LEDGER, PRIVACY_FILE):
        if name in files:
            target = scratch / "ledgers" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(target, public_ledger(json.loads(files[name].read_text())))
            files[name] = target
    audit_json = run_dir / AUDIT_FILE  # carried whole: the public copy keeps every key
    if not audit_json.exists():
        return files
    audit = public_audit(json.loads(audit_json.read_text()), include_membership=include_membership)
    folder = scratch / AUDIT_DIR
    html, markdown = render_reports(audit, charts_dir=folder / "charts")
    atomic_write_json(folder / AUDIT_JSON, audit)
    (folder / "report.html").write_text(html, encoding="utf-8")
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    files = {k: v for k, v in files.items() if not k.startswith("audit/")}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[f"audit/{path.relative_to(folder).as_posix()}"] = path
    return files


def _push_id(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for repo_path, local in sorted(files.items()):
        digest.update(repo_path.encode() + b"\0" + hashlib.sha256(local.read_bytes()).digest())
    return digest.hexdigest()[:32]


def _check_no_token(files: dict[str, Path], token: str | None) -> None:
    """Refuse to upload a file that contains the token (defence in depth)."""
    if not token or len(token) < 8:
        return
    needle = token.encode()
    for repo_path, local in files.items():
        if needle in local.read_bytes():
            raise PushError(f"refusing to push: {repo_path} contains the Hub token")


def _commit(
    api: Any,
    *,
    repo_id: str,
    repo_type: str,
    files: dict[str, Path],
    message: str,
    private: bool,
    space_sdk: str | None = None,
) -> tuple[str, bool]:
    """One atomic commit of ``files``; returns (commit sha, whether it was already there)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo(
        repo_id, repo_type=repo_type, private=private, exist_ok=True, space_sdk=space_sdk
    )
    push_id = _push_id(files)
    commits = api.list_repo_commits(repo_id, repo_type=repo_type)
    head = commits[0].commit_id if commits else None
    if commits and _PUSH_ID + push_id in (commits[0].message or ""):
        return commits[0].commit_id, True  # an earlier attempt landed: nothing to do
    operations = [
        CommitOperationAdd(path_in_repo=repo_path, path_or_fileobj=str(local))
        for repo_path, local in files.items()
    ]
    description = f"{_PUSH_ID}{push_id}"
    for attempt in range(2):
        try:
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                repo_type=repo_type,
                parent_commit=head,
            )
            return info.oid, False
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in (409, 412) or attempt:
                raise
            # The head moved since we looked: our own earlier attempt, or someone else's change.
            commits = api.list_repo_commits(repo_id, repo_type=repo_type)
            if commits and _PUSH_ID + push_id in (commits[0].message or ""):
                return commits[0].commit_id, True
            raise PushError(
                f"{repo_id} changed while pushing (new head {commits[0].commit_id[:12] if commits else '?'}); "
                "nothing was overwritten. Look at the repository, then push again."
            ) from None
    raise AssertionError("unreachable")


def _refuse_void_guarantee(run_dir: Path) -> None:
    """A model that claims DP while its noise came from a public seed is never published."""
    from hubtune.privacy import VOID_REASON, guarantee_is_void

    path = run_dir / PRIVACY_LEDGER
    if path.exists() and guarantee_is_void(json.loads(path.read_text()).get("noise_source")):
        raise PushError(
            f"{run_dir} was trained with {VOID_REASON}. Pushing it would publish a privacy claim that "
            "does not hold; train again without HUBTUNE_UNSAFE_DP_SEED. (--allow-failing-audit does not "
            "override this.)"
        )


def push_run(
    run_dir: str | Path,
    *,
    repo_id: str,
    private: bool = True,
    space_id: str | None = None,
    allow_failing_audit: bool = False,
    include_membership_audit: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Push a finished run (and optionally its Gradio Space) to the Hub.

    Args:
        run_dir: A complete, audited run directory.
        repo_id: Model repository, ``org/name``.
        private: Create the repositories private (the default).
        space_id: Also render and push the Gradio Space demo to this Space repository.
        allow_failing_audit: Push although the audit did not pass; recorded in run.json and
            stated in the model card. It never overrides a void DP guarantee.
        include_membership_audit: Also publish the membership audit's details (loss means,
            rates per level, canary hits) and the non-private twin's per-group figures, all
            computed on training rows without DP. Off by default: the card and report then
            carry the verdict and aggregate figures only.
        endpoint: Hub URL; default ``HF_ENDPOINT`` or huggingface.co.
        token: Hub token; default ``HF_TOKEN`` or the huggingface_hub login. Never written
            anywhere.

    Raises:
        PushError: the audit gate refuses, the run is incomplete, or the repo changed meanwhile.
    """
    from huggingface_hub import HfApi, get_token

    from hubtune.audit import audit_gate
    from hubtune.card import write_card

    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise PushError(f"{run_dir} is not a complete run (no run.json)")
    _refuse_void_guarantee(run_dir)
    gate = audit_gate(run_dir, allow_failing=allow_failing_audit)
    if not gate["allowed"]:
        raise PushError(
            f"the audit gate refuses to push {run_dir}: {gate['reason']}. Read {run_dir / 'audit' / 'report.html'}; "
            "to push anyway, pass --allow-failing-audit (it is recorded in run.json and stated in the model card)."
        )
    if gate["overridden"]:
        logger.warning("push: audit %s overridden by --allow-failing-audit", gate["status"])
    token = token or get_token()
    api = HfApi(endpoint=endpoint, token=token)
    write_card(
        run_dir,
        repo_id=repo_id,
        allow_failing_audit=gate["overridden"],
        include_membership_audit=include_membership_audit,
    )
    scratch = Path(tempfile.mkdtemp(prefix="hubtune-push-"))
    try:
        return _push(
            run_dir,
            api=api,
            repo_id=repo_id,
            private=private,
            space_id=space_id,
            gate=gate,
            token=token,
            files=_public_copies(
                run_dir,
                pushed_files(run_dir),
                scratch,
                include_membership=include_membership_audit,
            ),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _push(
    run_dir: Path,
    *,
    api: Any,
    repo_id: str,
    private: bool,
    space_id: str | None,
    gate: dict[str, Any],
    token: str | None,
    files: dict[str, Path],
) -> PushResult:
    _check_no_token(files, token)
    info = read_run_info(run_dir)
    message = f"hubtune: {(info.name if info else None) or run_dir.name} (audit {gate['status']})"
    commit, already = _commit(
        api, repo_id=repo_id, repo_type="model", files=files, message=message, private=private
    )
    endpoint_url = str(api.endpoint).rstrip("/")
    result = PushResult(
        repo_id=repo_id,
        commit=commit,
        url=f"{endpoint_url}/{repo_id}/tree/{commit}",
        already_there=already,
    )
    if space_id:
        from hubtune.space import render_space

        space_dir = render_space(run_dir=run_dir, model_repo_id=repo_id, model_revision=commit)
        space_files = {
            p.relative_to(space_dir).as_posix(): p
            for p in sorted(space_dir.rglob("*"))
            if p.is_file()
        }
        _check_no_token(space_files, token)
        result.space_id = space_id
        result.space_commit, _ = _commit(
            api,
            repo_id=space_id,
            repo_type="space",
            files=space_files,
            message=f"hubtune: demo of {repo_id}@{commit[:12]}",
            private=private,
            space_sdk="gradio",
        )
    run_info = json.loads((run_dir / RUN_FILE).read_text())
    run_info.setdefault("pushes", []).append(
        {
            "repo_id": repo_id,
            "commit": commit,
            "endpoint": endpoint_url,
            "private": private,
            "space_id": result.space_id,
            "space_commit": result.space_commit,
            "audit_status": gate["status"],
            "audit_overridden": gate["overridden"],
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    atomic_write_json(run_dir / RUN_FILE, run_info)
    return result
