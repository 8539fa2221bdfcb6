"""Git LFS for the local hub: which files go through LFS, and signed upload links.

Which files (``preupload`` answers ``"uploadMode": "lfs"``), as the Hub decides:

- files of at least ``threshold`` bytes (10 MiB by default, the size above which the Hub
  refuses plain git blobs), and
- files whose path matches a ``filter=lfs`` pattern of the branch's ``.gitattributes`` (every
  new repo's default file routes ``*.safetensors``, ``*.bin``, ``*.pt``, archives, ... to LFS).
  Patterns are the common subset of gitattributes: a pattern without ``/`` matches the file
  name at any depth, one with ``/`` matches the whole path; ``*``, ``?`` and ``[...]`` globs.

Empty files are always regular (the client sends them inline whatever the answer). With the
threshold set to ``None``, every file is regular: content comes base64 inside the NDJSON
commit, which suits clients that cannot use LFS.

Upload links: the LFS batch API answers each new object with an ``href`` for a plain ``PUT``
of its bytes, which clients send *without* their Authorization header (on the Hub the href is
a presigned storage URL). So the href carries its own authority: an HMAC, under a secret
random to this server process, of the repo, the object id, its size and an expiry time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import time
from urllib.parse import urlencode

from hubtune.hubserver.storage import HubError

__all__ = ["DEFAULT_LFS_THRESHOLD", "UploadSigner", "lfs_patterns", "wants_lfs"]

DEFAULT_LFS_THRESHOLD = 10 << 20  # 10 MiB


def lfs_patterns(gitattributes: bytes) -> list[str]:
    """The patterns a ``.gitattributes`` file routes to LFS (``filter=lfs``), in order."""
    patterns: list[str] = []
    for raw in gitattributes.decode("utf-8", errors="replace").splitlines():
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        pattern, attributes = fields[0].lstrip("/"), fields[1:]
        if "filter=lfs" in attributes:
            patterns.append(pattern)
        elif "-filter" in attributes or "!filter" in attributes:
            patterns = [p for p in patterns if p != pattern]  # a later line unsets it
    return patterns


def wants_lfs(path: str, size: int, *, patterns: list[str], threshold: int | None) -> bool:
    """Whether a file of this path and size is uploaded through LFS (see the module doc)."""
    if threshold is None or size == 0:
        return False
    if size >= threshold:
        return True
    name = path.rsplit("/", 1)[-1]
    return any(
        fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns
    )


class UploadSigner:
    """Signs and checks LFS upload links (see the module doc).

    Args:
        ttl_s: How long a link stays valid; the check happens when an upload starts.
    """

    def __init__(self, *, ttl_s: float = 24 * 3600) -> None:
        self._secret = secrets.token_bytes(32)
        self._ttl_s = ttl_s

    def _mac(self, repo_type: str, repo_id: str, oid: str, size: int, expires: int) -> str:
        message = f"{repo_type}\0{repo_id}\0{oid}\0{size}\0{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def query(self, *, repo_type: str, repo_id: str, oid: str, size: int) -> str:
        """The query string that authorises one upload of ``oid`` (``size`` bytes)."""
        expires = int(time.time() + self._ttl_s)
        mac = self._mac(repo_type, repo_id, oid, size, expires)
        return urlencode({"size": size, "expires": expires, "signature": mac})

    def check(self, *, repo_type: str, repo_id: str, oid: str, query: dict[str, str]) -> int:
        """The signed size of an upload link.

        Raises:
            HubError: 403 for a missing, wrong or expired signature.
        """
        try:
            size, expires = int(query["size"]), int(query["expires"])
            presented = query["signature"]
        except (KeyError, ValueError):
            raise HubError(403, "LFS upload link without a valid signature") from None
        expected = self._mac(repo_type, repo_id, oid, size, expires)
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise HubError(403, "LFS upload link with a wrong signature")
        if time.time() > expires:
            raise HubError(403, "LFS upload link expired: ask the batch API again")
        return size
