"""The run directory: every file name the stages share, and the helpers that write and read them.

``runs/<name>/`` is the contract between the stages: training writes it, and the audit, the
card, the push and the Space read it, each able to run alone afterwards. The names live here,
once, so a stage that writes a file and the stages that read it cannot drift apart.

=========================  ===============================================================
``run.json``               the run's record; written last, so its presence marks a complete run
``metrics.json``           test metrics, majority baseline, per-epoch history
``predictions.parquet``    test predictions in the task's schema (the audit's input)
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
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hubtune.io import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "AuditSummary",
    "BaseModelRecord",
    "DataRecord",
    "Ledger",
    "RunInfo",
    "read_ledger",
    "read_run_info",
    "AUDIT_DIR",
    "AUDIT_FILE",
    "CARD_DIR",
    "CHECKPOINTS_DIR",
    "MEMBERSHIP_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
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
MEMBERSHIP_FILE = "membership_scores.parquet"  # per-example losses: local only, never pushed
PRIVACY_LEDGER = "privacy.json"
RECIPE_FILE = "recipe.resolved.yaml"
AUDIT_DIR = "audit"
AUDIT_FILE = "audit/audit.json"
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
    feature_cache: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)
    majority_baseline: dict[str, Any] = Field(default_factory=dict)
    privacy: dict[str, Any] = Field(default_factory=dict)
    audit: AuditSummary | None = None
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
