"""File-backed repository storage for the local hub: content-addressed blobs, immutable commit
records and one mutable file per branch, updated last and atomically.

Layout under the root folder::

    repos/{models,datasets,spaces}/<org>/<name>/
        repo.json                  settings: private flag, space sdk, creation date
        refs/heads/<branch>        a branch head: a 40-hex commit id (replaced atomically)
        refs/tags/<tag>            a tag: the 40-hex commit id it names
        commits/<sha>.json         one immutable record per commit: parents, message, date and
                                   the full file manifest {path: {"oid": git-blob-sha1, "size"}}
                                   (plus "lfs": sha256 for files uploaded through Git LFS)
        objects/<oid[:2]>/<oid[2:]> file contents sent inline, named by their git blob sha1
        lfs/<sha[:2]>/<sha[2:]>    file contents uploaded through Git LFS, named by their sha256
                                   (and <sha[2:]>.gitoid: the same content's git blob sha1)
        .lock                      fcntl lock file: commits to one repo are serialised
    tmp/                           temporary files, renamed into place once complete
    .lock                          fcntl lock for creating and deleting repos

Crash safety: a commit writes its blobs and its record first, then replaces the ref file with
``os.replace`` (after fsync). A process killed at any point leaves the ref at either the old or
the new commit, and blobs or records not reachable from a ref are never listed or served.
Blobs that a refused commit stored (a stale parent, a missing file to delete) are removed again
unless a commit or another request in flight uses them. LFS objects are written by streaming
to a temporary file while hashing, checked against their sha256, then renamed into place.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

from hubtune.io import atomic_write_bytes
from hubtune.io import fsync_dir as _fsync_dir

__all__ = [
    "REPO_TYPES",
    "BlobBatch",
    "Commit",
    "FileEntry",
    "HubError",
    "RepoStore",
    "git_blob_sha1",
    "api_oid",
    "lfs_pointer",
]

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
# Names as the Hub accepts them: letters, digits, '-', '_', '.', not starting with a dot.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA_RE = re.compile(r"^[0-9a-f]{7,39}$")  # git's shortest default abbreviation is 7
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
REF_KINDS = ("heads", "tags")
_LFS_SPEC = "https://git-lfs.github.com/spec/v1"
_PATH_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# The Hub's initial commit of every new repo: a default .gitattributes routing large binary
# formats to LFS. Kept for fidelity (clients see a non-empty first commit with a real sha).
GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


class HubError(Exception):
    """A request the hub refuses, with the HTTP status and Hub error code to answer with.

    Args:
        status: HTTP status code.
        message: Human-readable message (sent in the JSON body and ``X-Error-Message``).
        code: Hub error code for ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
            ``EntryNotFound``), which ``huggingface_hub`` maps to its exception classes.
        headers: Extra response headers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as a small file's ETag and ``oid``."""
    # Two updates instead of one concatenation: no second copy of a large blob.
    digest = hashlib.sha1(b"blob %d\0" % len(data), usedforsecurity=False)
    digest.update(data)
    return digest.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in a git tree for an LFS file."""
    return f"version {_LFS_SPEC}\noid sha256:{sha256}\nsize {size}\n".encode()


def api_oid(entry: FileEntry) -> str:
    """The blob id the Hub API shows for a file: for an LFS file, its pointer's blob id."""
    return git_blob_sha1(lfs_pointer(entry.lfs, entry.size)) if entry.lfs else entry.oid


def _now_iso() -> str:
    """The current time in the Hub's format, e.g. ``2024-05-01T12:00:00.123000Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's manifest."""

    # The git blob sha1 of the content, however it was uploaded: commit ids hash it, so the
    # same files give the same commit whether they came inline or through LFS (recipes pin
    # such ids). What the API shows for LFS files, the pointer's id, is ``api_oid``.
    oid: str
    size: int
    lfs: str | None = None  # sha256 of the content, for files uploaded through Git LFS


@dataclass(frozen=True)
class Commit:
    """An immutable commit record."""

    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The record as stored on disk."""
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "author": self.author,
            "files": {p: _entry_json(e) for p, e in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        """Parse a stored record."""
        return cls(
            id=data["id"],
            parents=list(data["parents"]),
            title=data["title"],
            message=data["message"],
            date=data["date"],
            author=data["author"],
            files={
                p: FileEntry(oid=e["oid"], size=int(e["size"]), lfs=e.get("lfs"))
                for p, e in data["files"].items()
            },
        )


def _entry_json(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"oid": entry.oid, "size": entry.size}
    if entry.lfs is not None:
        out["lfs"] = entry.lfs
    return out


@dataclass(frozen=True)
class RepoRef:
    """Where a repo lives: its type, id and folder."""

    repo_type: str
    repo_id: str
    path: Path


def validate_ref_name(name: str) -> str:
    """Check a new branch or tag name (git's rules, simplified, and no pull-request refs).

    Raises:
        HubError: 400 naming the problem.
    """
    parts = name.split("/")
    if (
        not _BRANCH_RE.match(name)
        or ".." in name
        or name.startswith("refs/")
        or _SHA_RE.match(name)
        or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
        or name.endswith(".")
    ):
        raise HubError(
            400,
            f"Invalid reference name {name!r}: letters, digits, '-', '_', '.', '/' (no '..', "
            "no 'refs/' prefix, not a commit id)",
        )
    return name


def validate_repo_path(path: str) -> str:
    """Check a file path inside a repo: relative, ``/``-separated, no ``.``/``..``/empty parts,
    no ``.git``, no backslash or control character, and none of these once percent-decoded
    (as often as decoding changes it).

    The decoded forms are checked too because a path is often put into a URL or a file name by
    something that decodes it again (``%2e%2e`` is ``..`` to a second decoder).

    Args:
        path: The path as the client sent it.

    Returns:
        The path, unchanged.

    Raises:
        HubError: 400 if the path could escape the repo or is not a plain relative path.
    """
    current = path
    for _ in range(8):  # each round peels one layer of encoding; 8 is more than any client uses
        if not _plain_path(current):
            raise HubError(400, f"Invalid path in repo: {path[:200]!r}")
        decoded = unquote(current)
        if decoded == current:
            return path
        current = decoded
    raise HubError(400, f"Invalid path in repo (encoded too often): {path[:200]!r}")


def _plain_path(path: str) -> bool:
    return not (
        not path
        or path.startswith("/")
        or "\\" in path
        or _PATH_CONTROL_RE.search(path)
        or any(part in ("", ".", "..", ".git") for part in path.split("/"))
    )


class RepoStore:
    """All repos under one root folder; safe for threads and for several processes.

    Args:
        root: The folder holding the ``repos/`` tree (created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.repos_dir = self.root / "repos"
        self.tmp_dir = self.root / "tmp"
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Blobs that requests in flight have stored or found, per (repo folder, oid): a refused
        # commit must not remove a blob that a concurrent commit is about to reference.
        self._pins: collections.Counter[tuple[str, str]] = collections.Counter()
        self._clean_stale_tmp()

    # ------------------------------------------------------------------ locking and files

    def _clean_stale_tmp(self, *, max_age_s: float = 3600.0) -> None:
        """Remove temporary files left by a killed server. Only old ones: another live server
        process on the same root may be writing fresh ones right now."""
        cutoff = time.time() - max_age_s
        for item in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if item.lstat().st_mtime < cutoff:
                    if item.is_dir() and not item.is_symlink():
                        shutil.rmtree(item, ignore_errors=True)
                    else:
                        item.unlink()

    def _thread_lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def _locked(self, lock_file: Path, key: str) -> Iterator[None]:
        """Hold the in-process lock for ``key`` and an exclusive ``flock`` on ``lock_file``.

        The thread lock orders threads of this server; the flock orders server processes that
        share the root (flock locks belong to the open file, so both are needed and compatible).
        """
        with self._thread_lock(key):
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_file, "a+b") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _write_atomic(self, target: Path, data: bytes) -> None:
        """Write ``data`` so ``target`` is either absent/old or complete, never partial."""
        atomic_write_bytes(target, data, tmp_dir=self.tmp_dir, mode=0o644)

    # ------------------------------------------------------------------ repos

    def locate(self, repo_type: str, repo_id: str) -> RepoRef:
        """Map a repo type and id to its folder, validating both.

        Args:
            repo_type: ``model``, ``dataset`` or ``space``.
            repo_id: ``org/name``.

        Returns:
            The repo's reference (the folder may not exist).

        Raises:
            HubError: 400 for an invalid type or id.
        """
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME_RE.match(p) and ".." not in p for p in parts):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'org/name'")
        return RepoRef(repo_type, repo_id, self.repos_dir / f"{repo_type}s" / parts[0] / parts[1])

    def exists(self, repo: RepoRef) -> bool:
        """Whether the repo has been created (and not deleted)."""
        return (repo.path / "repo.json").is_file()

    def settings(self, repo: RepoRef) -> dict[str, Any]:
        """The repo's settings (``private``, ``sdk``, ``createdAt``).

        Raises:
            HubError: 404 ``RepoNotFound`` if the repo does not exist.
        """
        try:
            data: dict[str, Any] = json.loads((repo.path / "repo.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise HubError(404, "Repository not found", code="RepoNotFound") from None
        return data

    def create(
        self,
        repo: RepoRef,
        *,
        private: bool,
        sdk: str | None = None,
        author: str = "local",
    ) -> None:
        """Create a repo with the Hub's initial commit (a default ``.gitattributes``).

        The repo is assembled in ``tmp/`` and renamed into place, so it appears whole or not
        at all, and two creators racing on one name cannot both succeed.

        Raises:
            HubError: 409 if the repo already exists.
        """
        with self._locked(self.root / ".lock", "<repos>"):
            if self.exists(repo):
                raise HubError(409, "You already created this repo")
            staging = Path(tempfile.mkdtemp(prefix="create-", dir=self.tmp_dir))
            settings = {"private": bool(private), "createdAt": _now_iso()}
            if sdk is not None:
                settings["sdk"] = sdk
            (staging / "repo.json").write_text(json.dumps(settings))
            oid = self._store_blob_at(staging, GITATTRIBUTES)
            commit = self._make_commit(
                parents=[],
                title="initial commit",
                message="",
                author=author,
                files={".gitattributes": FileEntry(oid=oid, size=len(GITATTRIBUTES))},
            )
            self._write_commit_at(staging, commit)
            ref_file = staging / "refs" / "heads" / DEFAULT_BRANCH
            ref_file.parent.mkdir(parents=True)
            ref_file.write_text(commit.id)
            repo.path.parent.mkdir(parents=True, exist_ok=True)
            # A leftover empty folder (e.g. from an interrupted delete) must not block creation.
            with contextlib.suppress(OSError):
                repo.path.rmdir()
            try:
                os.rename(staging, repo.path)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                raise HubError(409, "You already created this repo") from None
            _fsync_dir(repo.path.parent)

    def delete(self, repo: RepoRef) -> None:
        """Delete a repo: it disappears at once (renamed into ``tmp/``), then is removed.

        Raises:
            HubError: 404 ``RepoNotFound`` if the repo does not exist.
        """
        with self._locked(self.root / ".lock", "<repos>"):
            if not self.exists(repo):
                raise HubError(404, "Repository not found", code="RepoNotFound")
            with self._locked(repo.path / ".lock", repo.path.as_posix()):
                trash = self.tmp_dir / f"deleted-{uuid.uuid4().hex}"
                os.rename(repo.path, trash)
            _fsync_dir(repo.path.parent)
            shutil.rmtree(trash, ignore_errors=True)

    def update_settings(self, repo: RepoRef, **changes: Any) -> None:
        """Change repo settings (e.g. ``private``)."""
        with self._locked(repo.path / ".lock", repo.path.as_posix()):
            settings = self.settings(repo)
            settings.update(changes)
            self._write_atomic(repo.path / "repo.json", json.dumps(settings).encode())

    # ------------------------------------------------------------------ blobs and commits

    def _store_blob_at(self, repo_path: Path, data: bytes) -> str:
        oid = git_blob_sha1(data)
        self._write_blob(repo_path, oid, data)
        return oid

    def _write_blob(self, repo_path: Path, oid: str, data: bytes) -> bool:
        """Write a blob unless it exists; True if this call created it."""
        target = repo_path / "objects" / oid[:2] / oid[2:]
        if target.exists():  # content-addressed: an existing blob already holds these bytes
            return False
        self._write_atomic(target, data)
        return True

    def store_blob(self, repo: RepoRef, data: bytes) -> str:
        """Store file content (idempotent) and return its git blob sha1."""
        return self._store_blob_at(repo.path, data)

    @contextlib.contextmanager
    def staging(self, repo: RepoRef) -> Iterator[BlobBatch]:
        """Blobs for one commit: stored as they arrive, removed again if the commit fails.

        If the block raises (a refused commit, a client gone mid-body), the blobs it created
        are deleted unless a commit of the repo or another request in flight uses them.
        """
        batch = BlobBatch(self, repo)
        try:
            yield batch
        except BaseException:
            self._unpin(repo, batch.pinned)
            batch.pinned = []
            self._discard(repo, batch.created)
            raise
        finally:
            self._unpin(repo, batch.pinned)

    def _pin(self, repo: RepoRef, oid: str) -> None:
        with self._locks_guard:
            self._pins[(repo.path.as_posix(), oid)] += 1

    def _unpin(self, repo: RepoRef, oids: list[str]) -> None:
        with self._locks_guard:
            for oid in oids:
                key = (repo.path.as_posix(), oid)
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]

    def _referenced_oids(self, repo: RepoRef) -> set[str]:
        """Every blob id any commit of the repo lists (refused commits are rare: a full scan)."""
        oids: set[str] = set()
        for record in (repo.path / "commits").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                oids.update(e["oid"] for e in json.loads(record.read_text())["files"].values())
        return oids

    def _discard(self, repo: RepoRef, oids: list[str]) -> None:
        """Delete blobs a failed request created, unless referenced or pinned by another."""
        if not oids:
            return
        with self._locked(repo.path / ".lock", repo.path.as_posix()):  # no commit lands meanwhile
            referenced = self._referenced_oids(repo)
            for oid in oids:
                if oid in referenced:
                    continue
                # Checked and deleted under the pin lock: a request that pins the blob after
                # this finds it gone and writes it again.
                with self._locks_guard:
                    if self._pins.get((repo.path.as_posix(), oid)):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        self.blob_path(repo, oid).unlink()

    def blob_path(self, repo: RepoRef, oid: str) -> Path:
        """Where a blob's bytes are stored."""
        return repo.path / "objects" / oid[:2] / oid[2:]

    def open_blob(self, repo: RepoRef, oid: str) -> BinaryIO:
        """Open a blob for reading."""
        return open(self.blob_path(repo, oid), "rb")

    def content_path(self, repo: RepoRef, entry: FileEntry) -> Path:
        """Where a manifest entry's bytes are stored (an inline blob or an LFS object)."""
        return self.lfs_path(repo, entry.lfs) if entry.lfs else self.blob_path(repo, entry.oid)

    def open_entry(self, repo: RepoRef, entry: FileEntry) -> BinaryIO:
        """Open a manifest entry's content for reading."""
        return open(self.content_path(repo, entry), "rb")

    # ------------------------------------------------------------------ LFS objects

    def lfs_path(self, repo: RepoRef, sha256: str) -> Path:
        """Where an LFS object's bytes are stored."""
        if not _SHA256_RE.match(sha256):
            raise HubError(400, f"Invalid LFS object id {sha256[:80]!r}: expected 64 hex digits")
        return repo.path / "lfs" / sha256[:2] / sha256[2:]

    def lfs_git_oid(self, repo: RepoRef, sha256: str) -> str:
        """The git blob sha1 of a stored LFS object's content (what manifests record)."""
        path = self.lfs_path(repo, sha256)
        with contextlib.suppress(FileNotFoundError):
            oid = path.with_name(path.name + ".gitoid").read_text().strip()
            if _SHA_RE.match(oid):
                return oid
        # Not recorded (an interrupted upload between the two renames): hash it again.
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_COPY_CHUNK), b""):
                digest.update(block)
        return digest.hexdigest()

    def lfs_size(self, repo: RepoRef, sha256: str) -> int | None:
        """The size of a stored LFS object, or ``None`` if the repo has none with this id."""
        try:
            return self.lfs_path(repo, sha256).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_lfs_object(
        self, repo: RepoRef, *, sha256: str, size: int, chunks: Iterator[bytes]
    ) -> None:
        """Stream an LFS object to disk: hashed as it arrives, kept only if it is what was
        announced (size and sha256), renamed into place complete.

        Memory use is one chunk, whatever the object's size.

        Raises:
            HubError: 400 if the bytes are more or fewer than ``size`` or do not hash to
                ``sha256``; nothing is stored then.
        """
        target = self.lfs_path(repo, sha256)
        digest = hashlib.sha256()
        # The git blob id too, in the same pass: manifests record it (see FileEntry.oid).
        git_digest = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
        received = 0
        fd, tmp = tempfile.mkstemp(prefix="lfs-", suffix=".tmp", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise HubError(400, f"Upload of {sha256} is longer than its {size} bytes")
                    digest.update(chunk)
                    git_digest.update(chunk)
                    handle.write(chunk)
                if received != size:
                    raise HubError(400, f"Upload of {sha256}: {received} bytes, not {size}")
                if digest.hexdigest() != sha256:
                    raise HubError(
                        400,
                        f"Upload corrupt: its sha256 is {digest.hexdigest()}, not {sha256}; "
                        "nothing was stored",
                    )
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            # The id first, the object last: an object that exists always has its id beside it.
            self._write_atomic(
                target.with_name(target.name + ".gitoid"), git_digest.hexdigest().encode()
            )
            # Content-addressed and verified: a concurrent upload of the same object renames
            # identical bytes, so either rename may win.
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)

    def _make_commit(
        self,
        *,
        parents: list[str],
        title: str,
        message: str,
        author: str,
        files: dict[str, FileEntry],
    ) -> Commit:
        date = _now_iso()
        # The id is a function of what the commit *is* (parents, message, author, files) and
        # not of when it was made: publishing the same folder onto the same parent gives the
        # same id on every machine, so a recipe can pin a seeded repo by commit SHA. Two
        # different commits can never share a parent and content, because commits to a repo
        # are serialised and each one moves the head.
        body = {
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "files": {p: [e.oid, e.size] for p, e in sorted(files.items())},
        }
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode(), usedforsecurity=False)
        return Commit(sha.hexdigest(), parents, title, message, date, author, dict(files))

    def _write_commit_at(self, repo_path: Path, commit: Commit) -> None:
        self._write_atomic(
            repo_path / "commits" / f"{commit.id}.json", json.dumps(commit.to_json()).encode()
        )

    def head(self, repo: RepoRef, branch: str = DEFAULT_BRANCH) -> str | None:
        """The commit id a branch points to, or ``None`` if the branch does not exist."""
        return self._ref(repo, "heads", branch)

    def _ref(self, repo: RepoRef, kind: str, name: str) -> str | None:
        if not _BRANCH_RE.match(name) or ".." in name:
            return None
        try:
            sha = (repo.path / "refs" / kind / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return sha if _SHA_RE.match(sha) else None

    def refs(self, repo: RepoRef, kind: str) -> dict[str, str]:
        """Every branch (``heads``) or tag (``tags``) of the repo: name -> commit id."""
        self.settings(repo)
        folder = repo.path / "refs" / kind
        found = {}
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            name = path.relative_to(folder).as_posix()
            sha = self._ref(repo, kind, name) if path.is_file() else None
            if sha is not None:
                found[name] = sha
        return found

    def create_ref(self, repo: RepoRef, kind: str, name: str, target: Commit) -> None:
        """Create a branch or tag pointing at ``target``.

        Raises:
            HubError: 400 for an invalid name, 409 if it exists (or clashes with a ref
                that has it as a folder, like ``a`` and ``a/b``, which git cannot hold either).
        """
        validate_ref_name(name)
        with self._locked(repo.path / ".lock", repo.path.as_posix()):
            self.settings(repo)
            ref_file = repo.path / "refs" / kind / name
            if ref_file.is_file():
                what = "Branch" if kind == "heads" else "Tag"
                raise HubError(409, f"{what} {name!r} already exists")
            if ref_file.exists():
                raise HubError(409, f"{name!r} clashes with existing refs under {name + '/'!r}")
            try:
                self._write_atomic(ref_file, target.id.encode())
            except (NotADirectoryError, FileExistsError, IsADirectoryError):
                raise HubError(409, f"{name!r} clashes with an existing ref") from None

    def delete_ref(self, repo: RepoRef, kind: str, name: str) -> None:
        """Delete a branch or tag (never the default branch).

        Raises:
            HubError: 400 for the default branch, 404 if there is no such ref.
        """
        if kind == "heads" and name == DEFAULT_BRANCH:
            raise HubError(400, f"Cannot delete the default branch {DEFAULT_BRANCH!r}")
        with self._locked(repo.path / ".lock", repo.path.as_posix()):
            self.settings(repo)
            if self._ref(repo, kind, name) is None:
                what = "Branch" if kind == "heads" else "Tag"
                raise HubError(404, f"{what} {name!r} not found", code="RevisionNotFound")
            ref_file = repo.path / "refs" / kind / name
            ref_file.unlink()
            # Empty folders left by 'a/b' style names would block a later ref named 'a'.
            folder = ref_file.parent
            while folder != repo.path / "refs" / kind:
                with contextlib.suppress(OSError):
                    folder.rmdir()
                folder = folder.parent
            _fsync_dir(ref_file.parent)

    def commit(self, repo: RepoRef, sha: str) -> Commit | None:
        """Load a commit record, or ``None`` if there is none with this id."""
        if not _SHA_RE.match(sha):
            return None
        try:
            return Commit.from_json(json.loads((repo.path / "commits" / f"{sha}.json").read_text()))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def resolve(self, repo: RepoRef, revision: str) -> Commit:
        """Resolve a revision to its commit.

        A revision is, in this order: a branch, a tag, ``refs/heads/<branch>`` or
        ``refs/tags/<tag>``, a full commit id, or a unique prefix of one (7 hex digits or more).

        Raises:
            HubError: 404 ``RepoNotFound`` or ``RevisionNotFound`` (also for an ambiguous prefix).
        """
        self.settings(repo)  # 404 RepoNotFound first, like the Hub
        sha = self._ref_sha(repo, revision)
        if sha is None and _SHA_RE.match(revision):
            sha = revision
        if sha is None and _SHORT_SHA_RE.match(revision):
            sha = self._expand_short_sha(repo, revision)
        commit = self.commit(repo, sha) if sha is not None else None
        if commit is None:
            raise HubError(
                404, f"Invalid rev id: {revision}", code="RevisionNotFound"
            )  # the Hub's own wording
        return commit

    def _ref_sha(self, repo: RepoRef, revision: str) -> str | None:
        for kind in REF_KINDS:
            prefix = f"refs/{kind}/"
            if revision.startswith(prefix):
                return self._ref(repo, kind, revision[len(prefix) :])
        return self._ref(repo, "heads", revision) or self._ref(repo, "tags", revision)

    def _expand_short_sha(self, repo: RepoRef, prefix: str) -> str | None:
        """The one commit id starting with ``prefix`` (only hex digits: safe in a glob)."""
        matches = [p.stem for p in (repo.path / "commits").glob(f"{prefix}*.json")]
        matches = [m for m in matches if _SHA_RE.match(m)]
        if len(matches) > 1:
            raise HubError(
                404,
                f"Invalid rev id: {prefix} is ambiguous ({len(matches)} commits start with it)",
                code="RevisionNotFound",
            )
        return matches[0] if matches else None

    def list_repos(self, repo_type: str) -> list[RepoRef]:
        """Every repo of a type, sorted by id."""
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        folder = self.repos_dir / f"{repo_type}s"
        found = []
        for settings in sorted(folder.glob("*/*/repo.json")):
            org, name = settings.parent.parent.name, settings.parent.name
            if _NAME_RE.match(org) and _NAME_RE.match(name):
                found.append(RepoRef(repo_type, f"{org}/{name}", settings.parent))
        return found

    def history(self, repo: RepoRef, start: Commit) -> Iterator[Commit]:
        """Commits reachable from ``start``, newest first (first-parent history)."""
        current: Commit | None = start
        while current is not None:
            yield current
            current = self.commit(repo, current.parents[0]) if current.parents else None

    def apply_commit(
        self,
        repo: RepoRef,
        *,
        branch: str,
        additions: dict[str, FileEntry],
        deleted_files: list[str],
        deleted_folders: list[str],
        title: str,
        message: str,
        parent_commit: str | None,
        author: str = "local",
    ) -> Commit:
        """Create a commit on ``branch`` from already stored blobs, then move the branch.

        Args:
            repo: The repo.
            branch: The branch to commit to.
            additions: Added or replaced files (their blobs must be stored already).
            deleted_files: File paths to delete.
            deleted_folders: Folder paths whose files are all deleted.
            title: Commit summary.
            message: Commit description.
            parent_commit: If given, the commit is refused unless the branch is still there.
            author: Recorded author name.

        Returns:
            The new commit.

        Raises:
            HubError: 404 (repo, branch or deleted path missing) or 412 (stale parent).
        """
        with self._locked(repo.path / ".lock", repo.path.as_posix()):
            self.settings(repo)  # the repo may have been deleted while the body was read
            head_sha = self.head(repo, branch)
            head = self.commit(repo, head_sha) if head_sha else None
            if head is None:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if parent_commit is not None and parent_commit != head.id:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again. "
                    f"(parentCommit {parent_commit} is not the head of '{branch}', {head.id})",
                )
            files = dict(head.files)
            for path in deleted_files:
                if files.pop(path, None) is None:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                    )
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(
                        404,
                        f"A folder with this name doesn't exist: {folder}",
                        code="EntryNotFound",
                    )
                for path in doomed:
                    del files[path]
            for path, entry in additions.items():
                if not self.content_path(repo, entry).is_file():
                    # Only when another server process's refused commit removed a blob this
                    # one found already stored: never commit a manifest without its bytes.
                    raise HubError(409, f"The content of {path!r} was removed meanwhile; retry")
            files.update(additions)
            for path in additions:  # a file and a folder cannot share a name
                if any(p.startswith(path + "/") for p in files):
                    raise HubError(400, f"Cannot add file {path!r}: a folder has that name")
                for parent in _parents(path):
                    if parent in files:
                        raise HubError(400, f"Cannot add {path!r}: {parent!r} is a file")
            commit = self._make_commit(
                parents=[head.id], title=title, message=message, author=author, files=files
            )
            # Record first, ref last: the ref file is the single switch from old to new state.
            self._write_commit_at(repo.path, commit)
            self._write_atomic(repo.path / "refs" / "heads" / branch, commit.id.encode())
            return commit

    def last_commits(self, repo: RepoRef, start: Commit, paths: list[str]) -> dict[str, Commit]:
        """For each path (file or folder), the newest commit from ``start`` that changed it."""
        wanted = set(paths)
        found: dict[str, Commit] = {}
        commits = list(self.history(repo, start))
        for index, commit in enumerate(commits):
            parent = commits[index + 1] if index + 1 < len(commits) else None
            for path in list(wanted):
                if _subtree(commit.files, path) != (_subtree(parent.files, path) if parent else {}):
                    found[path] = commit
                    wanted.discard(path)
            if not wanted:
                break
        return found


class BlobBatch:
    """The blobs one commit request stores (see :meth:`RepoStore.staging`)."""

    def __init__(self, store: RepoStore, repo: RepoRef) -> None:
        self._store = store
        self.repo = repo
        self.created: list[str] = []  # blobs this request wrote (candidates for removal)
        self.pinned: list[str] = []  # blobs this request uses (protected while it runs)

    def add(self, data: bytes) -> str:
        """Store file content (idempotent); returns its git blob sha1."""
        oid = git_blob_sha1(data)
        # Pin before looking: a concurrent refusal then either sees the pin or has already
        # removed the file, which this call then writes again.
        self._store._pin(self.repo, oid)
        self.pinned.append(oid)
        if self._store._write_blob(self.repo.path, oid, data):
            self.created.append(oid)
        return oid


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _subtree(files: dict[str, FileEntry], path: str) -> dict[str, FileEntry]:
    prefix = path + "/"
    return {p: e for p, e in files.items() if p == path or p.startswith(prefix)}


def folder_oid(files: dict[str, FileEntry], folder: str) -> str:
    """A stable id for a folder's content (stands in for the git tree sha)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for path, entry in sorted(_subtree(files, folder).items()):
        digest.update(f"{path}\0{entry.oid}\n".encode())
    return digest.hexdigest()
