"""The run directory: every file name the stages share, and the helpers that write and read them.

``runs/<name>/`` is the contract between the stages: training writes it, and the audit, the
card, the push and the Space read it, each able to run alone afterwards. The names live here,
once, so a stage that writes a file and the stages that read it cannot drift apart.

=========================  ===============================================================
``run.json``               the run's record; written last, so its presence marks a complete run
``metrics.json``           test metrics, majority baseline, per-epoch history
``predictions.parquet``    test predictions in the task's schema (the audit's input)
``validation_predictions.parquet``  the same for the validation split (classifiers; the input
                           of ``hubtune mitigate``); local only, never pushed
``forgetting.json``        text classifiers: what fine-tuning kept of the encoder's general behaviour
``postprocess.json``       a mitigated run's per-group decision rule (``hubtune mitigate``)
``membership_scores.parquet``  per-example losses for the membership audit; never published
``privacy.json``           the DP ledger (DP runs)
``recipe.resolved.yaml``   the recipe that ran, defaults filled in
``model/`` | ``adapter/``  the weights (``hubtune_privacy.json`` beside them under DP)
``audit/``                 ``audit.json``, ``report.html``, ``report.md``, ``charts/``
``card/README.md``         the model card
``checkpoints/epoch-N``    checkpoints (local only: they hold the DP generators' state)
=========================  ===============================================================
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from hubtune.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "AuditRecord",
    "AuditSummary",
    "CanaryRecord",
    "ComparisonRecord",
    "Estimate",
    "FairnessRecord",
    "MembershipRecord",
    "Metrics",
    "GENERATION_COLUMNS",
    "PREDICTION_COLUMNS",
    "PolicyRecord",
    "Predictions",
    "read_predictions",
    "write_predictions",
    "Verdict",
    "read_audit",
    "read_metrics",
    "write_metrics",
    "BaseModelRecord",
    "DataRecord",
    "Ledger",
    "RunDirError",
    "RunInfo",
    "read_ledger",
    "read_run_info",
    "AUDIT_DIR",
    "AUDIT_FILE",
    "AUDIT_JSON",
    "CARD_DIR",
    "CHECKPOINTS_DIR",
    "EXPOSURE_FILE",
    "FORGETTING_FILE",
    "SAMPLES_FILE",
    "STEREOTYPES_FILE",
    "MEMBERSHIP_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "POSTPROCESS_FILE",
    "VALIDATION_PREDICTIONS_FILE",
    "PRIVACY_FILE",
    "PRIVACY_LEDGER",
    "RECIPE_FILE",
    "RUN_FILE",
    "privacy_summary",
    "public_path",
    "read_json",
    "read_parquet",
    "scrub",
    "secrets",
    "weights_dir",
    "write_parquet",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
VALIDATION_PREDICTIONS_FILE = "validation_predictions.parquet"  # classifiers; never pushed
POSTPROCESS_FILE = "postprocess.json"  # a mitigated run's per-group thresholds
MEMBERSHIP_FILE = "membership_scores.parquet"  # per-example losses: local only, never pushed
EXPOSURE_FILE = "exposure.json"  # language models: each canary's rank and exposure (no secrets)
STEREOTYPES_FILE = "stereotypes.json"  # language models: CrowS-Pairs choices, base vs fine-tuned
FORGETTING_FILE = "forgetting.json"  # text classifiers: hubtune.forgetting's figures
SAMPLES_FILE = "samples.json"  # language models: greedy continuations of a fixed prompt set
PRIVACY_LEDGER = "privacy.json"
RECIPE_FILE = "recipe.resolved.yaml"
AUDIT_DIR = "audit"
AUDIT_JSON = "audit.json"  # inside AUDIT_DIR
AUDIT_FILE = f"{AUDIT_DIR}/{AUDIT_JSON}"
CARD_DIR = "card"
CHECKPOINTS_DIR = "checkpoints"
# The privacy ledger stored beside the saved weights: further DP training of those weights adds
# to its ε (hubtune reads it as the prior history of a base model).
PRIVACY_FILE = "hubtune_privacy.json"


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def weights_dir(run_dir: Path) -> Path:
    """Where a run's weights are: ``adapter/`` (LoRA) or ``model/``."""
    adapter = run_dir / "adapter"
    return adapter if adapter.is_dir() else run_dir / "model"


def write_parquet(path: Path, frame: Any, metadata: dict[str, Any]) -> None:
    """Write ``frame`` atomically as Parquet, ``metadata`` in the schema under ``hubtune``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"hubtune": json.dumps(metadata).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_parquet(path: Path) -> tuple[Any, dict[str, Any]]:
    """(frame, the ``hubtune`` metadata :func:`write_parquet` stored)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"hubtune", b"{}"))
    return table.to_pandas(), meta


# The predictions schema, the contract with the audit: one row per test example, with these
# columns and every sensitive column (a task adds its own: classification writes the label
# names and one ``prob_<label>`` column per label).
PREDICTION_COLUMNS = ("row_id", "label_id", "prediction_id")
# A language model's test rows (model.task: text-generation): each example's mean token loss,
# its labelled tokens, the share of them that are the greedy next token, and whether all are.
GENERATION_COLUMNS = ("row_id", "loss", "tokens", "token_accuracy", "exact_match")


@dataclass
class Predictions:
    """``predictions.parquet``: the test predictions (a frame with :data:`PREDICTION_COLUMNS`
    and every sensitive column, plus the task's own columns) and what they name."""

    frame: Any  # pandas.DataFrame
    label_names: list[str]
    sensitive_columns: list[str]
    kind: str = "classification"  # or "generation" (GENERATION_COLUMNS)

    def missing_columns(self) -> list[str]:
        """The columns the schema asks for that the frame lacks."""
        schema = GENERATION_COLUMNS if self.kind == "generation" else PREDICTION_COLUMNS
        wanted = [*schema, *self.sensitive_columns]
        return [c for c in wanted if c not in self.frame.columns]


def write_predictions(
    run_dir: Path, predictions: Predictions, *, name: str = PREDICTIONS_FILE
) -> None:
    """Write ``predictions.parquet`` (or ``name``) atomically, refusing a frame that breaks the schema."""
    missing = predictions.missing_columns()
    if missing:
        raise ValueError(f"the predictions frame lacks the columns {missing} (task bug)")
    write_parquet(
        run_dir / name,
        predictions.frame,
        {
            "label_names": predictions.label_names,
            "sensitive_columns": predictions.sensitive_columns,
            "kind": predictions.kind,
        },
    )


def read_predictions(
    run_dir: Path, *, label_names: list[str] | None = None, name: str = PREDICTIONS_FILE
) -> Predictions | None:
    """The run's test predictions (or those in ``name``), or None when the file is missing.

    Args:
        run_dir: The run directory.
        label_names: The labels to assume when the file does not record them (older runs).
        name: The file: :data:`PREDICTIONS_FILE` or :data:`VALIDATION_PREDICTIONS_FILE`.

    Raises:
        RunDirError: The file cannot be read or lacks columns of the schema.
    """
    path = run_dir / name
    if not path.exists():
        return None
    try:
        frame, meta = read_parquet(path)
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot be read ({exc}); re-run the training") from exc
    predictions = Predictions(
        frame=frame,
        label_names=[str(n) for n in meta.get("label_names") or label_names or []],
        sensitive_columns=[str(c) for c in meta.get("sensitive_columns") or []],
        kind=str(meta.get("kind") or "classification"),
    )
    missing = predictions.missing_columns()
    if missing:
        raise RunDirError(
            f"{path}: lacks the columns {missing} of the predictions schema; "
            "re-run the training with this hubtune version"
        )
    return predictions


def privacy_summary(ledger: dict[str, Any]) -> dict[str, Any]:
    """The part of the privacy ledger that run.json repeats."""
    keys = (
        "epsilon",
        "delta",
        "accountant",
        "epsilon_by_accountant",
        "noise_multiplier",
        "noise",
        "max_grad_norm",
        "sample_rate",
        "steps",
        "stopped_by_budget",
        "guarantee",
        "guarantee_void",
    )
    return {"enabled": True, "ledger": PRIVACY_LEDGER, **{k: ledger.get(k) for k in keys}}


def public_path(value: str | None) -> str | None:
    """A local path as it may be published: project-relative paths stay, others keep their name.

    ``data/redditbias/data.csv`` is kept; ``/home/alice/clients/x.csv``, ``~/x`` and
    ``../../x`` become ``x.csv``/``x`` so nothing about the machine's layout leaks.
    """
    if not value:
        return None
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or value.startswith("~") or ".." in pure.parts or ":" in pure.parts[0]:
        return pure.name or None
    return str(pure)


# Shapes that must never reach a published file (tokens, absolute local paths).
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
# An absolute or home-relative POSIX path of at least two parts (not a URL, not a relative path).
_ABS_PATH = re.compile(r"(?<![\w:/.~])(?:~/|/)(?:[\w.@+-]+/)+[\w.@+-]*")
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def secrets() -> list[str]:
    """Token values that must never be published (environment and the local token file)."""
    found = [os.environ[name] for name in _TOKEN_ENV if os.environ.get(name)]
    try:
        from huggingface_hub import get_token

        token = get_token()
        if token:
            found.append(token)
    except Exception:  # pragma: no cover - a broken token file must not stop a card
        pass
    return [s for s in found if len(s) >= 8]


def scrub(text: str, *, paths: list[str]) -> str:
    """Last line of defence for published text: remove tokens and local absolute paths.

    Tokens (the environment's, the login's, and anything shaped like one) become
    ``[redacted]``; ``paths`` (longest first) and any other absolute path become
    ``<local path>``. Each removal is logged: it means something upstream leaked.
    """
    for secret in secrets():
        if secret in text:
            logger.warning("a token value was found in text to publish and removed")
            text = text.replace(secret, "[redacted]")
    if _TOKEN.search(text):
        logger.warning("something shaped like a Hugging Face token was removed")
        text = _TOKEN.sub("[redacted]", text)
    for path in sorted({p for p in paths if len(p) > 1}, key=len, reverse=True):
        if path in text:
            logger.warning("a local absolute path was found in text to publish and removed")
            text = text.replace(path, "<local path>")
    if _ABS_PATH.search(text):
        logger.warning("a local absolute path was found in text to publish and removed")
        text = _ABS_PATH.sub("<local path>", text)
    return text


# --------------------------------------------------------------------------- typed records


class RunDirError(ValueError):
    """A file of the run directory exists but cannot be read; the message says which and why."""


class _Record(BaseModel):
    """A record as written (older runs lack newer fields: each has a default; extra keys stay)."""

    model_config = ConfigDict(extra="allow")


class BaseModelRecord(_Record):
    """Where the base model came from, decided once when it was pulled (hub.ResolvedModel)."""

    spec: str = ""
    local_dir: str | None = None
    kind: str | None = None  # "hub" | "package" | "local"
    revision: str | None = None
    sha: str | None = None  # commit SHA, or "sha256:<digest>" of a folder's files
    license: dict[str, str] | None = None
    endpoint: str | None = None
    hub_id: str | None = None  # the public Hub id (hub.ResolvedModel.hub_id); None: not on a Hub

    @property
    def public_hub_id(self) -> str | None:
        """The recorded Hub id; for runs that predate the record, derived the same way."""
        if "hub_id" in self.model_fields_set:
            return self.hub_id
        from hubtune.hub import upstream_copy

        if self.kind == "hub":
            return self.spec
        upstream = upstream_copy(self.spec, self.sha) if self.spec.startswith("package:") else None
        return upstream.hub_id if upstream else None


class DataRecord(_Record):
    """What the data preparation read, kept and dropped (``data.PreparedData.summary``)."""

    fingerprint: str | None = None
    label_names: list[str] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)
    source_splits: dict[str, Any] | None = None
    rows_read: dict[str, Any] = Field(default_factory=dict)
    rows_kept: dict[str, Any] = Field(default_factory=dict)
    dropped: dict[str, Any] = Field(default_factory=dict)
    label_counts: dict[str, Any] = Field(default_factory=dict)
    canaries: dict[str, Any] | None = None
    exposure_canaries: dict[str, Any] | None = None  # language models (audit.exposure)
    anonymization: dict[str, Any] | None = None  # data.anonymize (data.anonymize_splits)


class AuditSummary(_Record):
    """The audit verdict run.json carries (push's gate reads it)."""

    status: str = "missing"
    passed: bool = False
    policy: str | None = None
    failed: list[str] = Field(default_factory=list)
    report: str | None = None
    created: str | None = None
    override: dict[str, Any] | None = None


class RunInfo(_Record):
    """``run.json``: the record of a complete run."""

    schema_version: int = 1
    status: str = "completed"
    name: str | None = None
    recipe_source: str | None = None
    created: str | None = None
    resumed_from_epoch: int | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    base_model: BaseModelRecord = Field(default_factory=BaseModelRecord)
    data: DataRecord = Field(default_factory=DataRecord)
    method: dict[str, Any] = Field(default_factory=dict)
    newly_initialized: list[str] = Field(default_factory=list)
    # Text: how the head pools token states, {"mode", "source"} (hubtune.model.choose_pooling);
    # None: image models, or runs before pooling was recorded (native).
    pooling: dict[str, str] | None = None
    feature_cache: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)
    majority_baseline: dict[str, Any] = Field(default_factory=dict)
    classical_baseline: dict[str, Any] | None = None  # hubtune.baselines (None: not computed)
    selected_epoch: dict[str, Any] | None = None  # hubtune.selection (None: older runs)
    privacy: dict[str, Any] = Field(default_factory=dict)
    audit: AuditSummary | None = None
    forgetting: dict[str, Any] | None = None  # hubtune.forgetting (None: not measured)
    scratch_baseline: dict[str, Any] | None = None  # checks.negative_transfer (hubtune.pipeline)
    # hubtune mitigate: the post-processing that made this run from another (None: none)
    postprocessing: dict[str, Any] | None = None
    pushes: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def method_name(self) -> str | None:
        value = self.method.get("method")
        return str(value) if value else None

    @property
    def is_adapter(self) -> bool:
        return self.outputs.get("model_dir") == "adapter"


class Ledger(_Record):
    """``privacy.json``: the DP ledger (see :meth:`hubtune.privacy.engine.PrivacyRun.ledger`)."""

    schema_version: int = 1
    guarantee: str | None = None
    guarantee_void: bool = False
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    epsilon_by_accountant: dict[str, float] = Field(default_factory=dict)
    target_epsilon: float | None = None
    stopped_by_budget: bool = False
    noise_multiplier: float | None = None
    noise: str | None = None
    noise_segments: list[dict[str, Any]] = Field(default_factory=list)
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    sampling: str | None = None
    steps: int | None = None
    history: list[list[float]] = Field(default_factory=list)
    prior_history: list[list[float]] = Field(default_factory=list)
    unit: str = "example"
    secure_mode: bool | None = None
    noise_source: str | None = None


def read_run_info(run_dir: Path) -> RunInfo | None:
    """The run's ``run.json`` as a typed record, or None when the run is not complete."""
    data = read_json(run_dir / RUN_FILE)
    return RunInfo.model_validate(data) if isinstance(data, dict) else None


def read_ledger(run_dir: Path) -> Ledger | None:
    """The run's ``privacy.json`` as a typed record, or None without DP."""
    data = read_json(run_dir / PRIVACY_LEDGER)
    return Ledger.model_validate(data) if isinstance(data, dict) else None


# ----------------------------------------------------------------- metrics.json and audit.json

# Figures keep the type they were written with (an int stays an int): the card formats them.
Num = int | float


class Metrics(_Record):
    """``metrics.json``: test metrics, the majority-label baseline and the per-epoch history."""

    test: dict[str, Num] = Field(default_factory=dict)
    majority_baseline: dict[str, Any] = Field(default_factory=dict)
    classical_baseline: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    selected_epoch: dict[str, Any] | None = None  # hubtune.selection (None: older runs)
    forgetting: dict[str, Any] | None = None  # hubtune.forgetting (None: not measured)
    scratch_baseline: dict[str, Any] | None = None  # checks.negative_transfer (hubtune.pipeline)


class Estimate(_Record):
    """A figure with its confidence interval (``ci``: [low, high], or None where none is)."""

    value: Num | None = None
    ci: list[Num | None] | None = None


class Gap(Estimate):
    """The largest gap of one metric between two groups of a slice."""

    highest: str | None = None
    lowest: str | None = None


class Disparities(_Record):
    """A slice's disparity figures (Fairlearn's definitions) and each metric's largest gap."""

    demographic_parity_difference: Estimate | None = None
    demographic_parity_ratio: Estimate | None = None
    equalized_odds_difference: Estimate | None = None
    largest_gap: dict[str, Gap | None] = Field(default_factory=dict)

    NAMES: ClassVar[tuple[str, ...]] = (
        "demographic_parity_difference",
        "demographic_parity_ratio",
        "equalized_odds_difference",
    )

    def named(self) -> dict[str, Estimate]:
        """The disparity figures that were computed, by name, in the audit's order."""
        found = {name: getattr(self, name) for name in self.NAMES}
        return {name: e for name, e in found.items() if e is not None and e.value is not None}


class FairnessSlice(_Record):
    """One sensitive column (or intersection) of the fairness audit."""

    name: str | None = None
    groups: list[dict[str, Any]] = Field(default_factory=list)
    reportable_groups: list[str] | int | None = None
    suppressed_groups: list[str] | int | None = None
    disparities: Disparities = Field(default_factory=Disparities)


class FairnessRecord(_Record):
    """The ``fairness`` part of audit.json (:func:`hubtune.audit.fairness.audit_fairness`)."""

    metrics: list[str] = Field(default_factory=list)
    slices: list[FairnessSlice] = Field(default_factory=list)


class Check(_Record):
    """One policy check and its result (``passed``: None when it could not be evaluated)."""

    check: str | None = None
    scope: str | None = None
    value: Num | None = None
    ci: list[Num | None] | None = None
    rule: str | None = None
    passed: bool | None = None


class Verdict(_Record):
    """The audit's verdict: its status, every check, and which failed or could not be judged."""

    status: str | None = None
    passed: bool = False
    checks: list[Check] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    not_evaluable: list[str] = Field(default_factory=list)
    not_informative: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class PolicyRecord(_Record):
    """The audit policy that judged the run, as recorded (with its file's digest)."""

    name: str | None = None
    description: str | None = None
    digest: str | None = None


class AttackRate(_Record):
    """The membership attack at one false-positive rate, against the rate DP allows."""

    target_fpr: Num | None = None
    fpr: Num | None = None
    tpr: Num | None = None
    tpr_ci: list[Num] | None = None
    dp_bound_tpr: Num | None = None
    beats_dp_bound: bool = False


class MembershipRecord(_Record):
    """The loss-threshold membership audit (:mod:`hubtune.audit.membership`)."""

    skipped: str | None = None
    attack: str = "loss threshold"
    members: int | None = None
    nonmembers: int | None = None
    auc: Estimate | None = None
    at_fpr: list[AttackRate] = Field(default_factory=list)
    epsilon_lower_bound: Num | None = None
    max_provable_epsilon: Num | None = None
    confidence: Num | None = None
    dp_epsilon: Num | None = None
    dp_delta: Num | None = None
    can_refute_dp_epsilon: bool | None = None
    beats_dp_bound: bool = False
    withheld: str | None = None  # set in the public copy: the details were left out

    @property
    def ran(self) -> bool:
        return self.auc is not None


class CanaryRecord(_Record):
    """The canary audit: random canaries, some trained on, guessed from the model's losses."""

    canaries: int | None = None
    included: int | None = None
    guesses: int | None = None
    right_guesses: int | None = None
    epsilon_lower_bound: Num | None = None
    max_provable_epsilon: Num | None = None
    exceeds_dp_epsilon: bool = False
    withheld: str | None = None


class Change(_Record):
    """One metric of one group in this run and in the other, and the change with its interval."""

    this: Num | None = None
    other: Num | None = None
    change: Num | None = None
    ci: list[Num | None] | None = None


class ComparisonGroup(_Record):
    name: str | None = None
    suppressed: bool = False
    metrics: dict[str, Change | None] = Field(default_factory=dict)


class ComparisonSlice(_Record):
    name: str | None = None
    groups: list[ComparisonGroup] = Field(default_factory=list)


class ComparisonRecord(_Record):
    """Per-group changes against the non-private twin (``compare_fairness``)."""

    other_run: str | None = None
    slices: list[ComparisonSlice] = Field(default_factory=list)
    note: str | None = None  # why there are no slices (a test split below min_group_size)


class AuditRecord(_Record):
    """``audit/audit.json``: what the audit found (:func:`hubtune.audit.runner.run_audit`)."""

    schema_version: int = 1
    created: str | None = None
    run: dict[str, Any] = Field(default_factory=dict)
    policy: PolicyRecord = Field(default_factory=PolicyRecord)
    verdict: Verdict | None = None
    privacy: dict[str, Any] = Field(default_factory=dict)
    fairness: FairnessRecord | None = None
    membership: MembershipRecord | None = None
    canaries: CanaryRecord | None = None
    comparison: ComparisonRecord | None = None
    publication: dict[str, Any] = Field(default_factory=dict)  # set in the public copy


def write_metrics(run_dir: Path, metrics: Metrics) -> None:
    """Write ``metrics.json`` atomically."""
    atomic_write_json(run_dir / METRICS_FILE, metrics.model_dump())


def read_metrics(run_dir: Path) -> Metrics | None:
    """The run's ``metrics.json`` as a typed record, or None when it is missing."""
    data = read_json(run_dir / METRICS_FILE)
    return Metrics.model_validate(data) if isinstance(data, dict) else None


def read_audit(
    run_dir: Path, *, public: bool = False, include_membership: bool = False
) -> AuditRecord | None:
    """The run's ``audit/audit.json`` as a typed record, or None when the run was not audited.

    Args:
        run_dir: The run directory.
        public: The copy a public repository carries (:func:`hubtune.audit.public.public_audit`),
            as the card and the pushed report show it.
        include_membership: With ``public``: keep the membership audit's details.
    """
    path = run_dir / AUDIT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise RunDirError(
            f"{path}: cannot be read ({exc}); re-run the audit with `hubtune audit {run_dir}`"
        ) from exc
    if public:
        from hubtune.audit.public import public_audit

        data = public_audit(data, include_membership=include_membership)
    return AuditRecord.model_validate(data)
