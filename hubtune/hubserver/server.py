"""The HTTP side of the local hub: a ``ThreadingHTTPServer`` speaking the Hub API subset that
``huggingface_hub``, ``transformers``, ``peft`` and ``datasets`` use. See the package docstring
for the endpoint list; storage lives in :mod:`hubtune.hubserver.storage`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

from hubtune.hubserver.body import BodyReader, Framing, parse_framing
from hubtune.hubserver.guard import HostPolicy, check_media_type
from hubtune.hubserver.lfs import DEFAULT_LFS_THRESHOLD, UploadSigner, lfs_patterns, wants_lfs
from hubtune.hubserver.storage import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    BlobBatch,
    Commit,
    FileEntry,
    HubError,
    RepoRef,
    RepoStore,
    api_oid,
    folder_oid,
    lfs_pointer,
    validate_repo_path,
)

__all__ = ["LocalHub", "serve"]

logger = logging.getLogger("hubtune.hubserver")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_READ_TIMEOUT_S = 60.0
LOCAL_USER = "local"  # the single user the hub knows; also the namespace of 'name'-only repos
_TREE_PAGE = 1000  # entries per page, as the Hub (50 when expanded)
_TREE_PAGE_EXPANDED = 50
_COMMITS_PAGE = 50
_COPY_CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_DRAIN_LIMIT = 8 << 20  # unread request bytes worth discarding to keep a connection alive
_SPACE_SDKS = ("gradio", "docker", "static", "streamlit")
_NO_PULL_REQUESTS = (
    "Pull requests are not supported by the local hub endpoint: commit to a branch instead "
    "(create_branch, then revision=<branch>)"
)
_NO_XET = (
    "Xet storage is not supported by the local hub endpoint: set HF_HUB_DISABLE_XET=1 so "
    "huggingface_hub uploads large files through Git LFS (or serve with --no-lfs)"
)
# Commit messages are stored in every commit record and returned by every history page: bound
# them (git itself does not, but a hub that keeps them in memory per request must).
_MAX_SUMMARY = 1000
_MAX_DESCRIPTION = 65_536
_MAX_HEADER_LINE = 1 << 20  # the header line's bytes (escaping can make JSON 6x longer)
# The media types huggingface_hub sends (httpx ``json=`` for the JSON routes, an explicit
# header for commits, a form for paths-info); anything else on a write is refused (guard.py).
_JSON_TYPES = ("application/json",)
_NDJSON_TYPES = ("application/x-ndjson",)
_PATHS_INFO_TYPES = ("application/x-www-form-urlencoded", "application/json")
# LFS: the batch API takes git-lfs's own JSON type (huggingface_hub sends it too), verify
# gets httpx's JSON, and the upload PUT carries raw bytes (huggingface_hub sends no type).
_LFS_JSON_TYPES = ("application/vnd.git-lfs+json", "application/json")
_LFS_PUT_TYPES: tuple[str | None, ...] = (None, "application/octet-stream")
_LFS_BATCH_MAX = 1000  # objects per batch request
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TYPE_FROM_PLURAL = {f"{t}s": t for t in REPO_TYPES}
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# C0 controls and DEL: a CR or LF copied from a request into a header would end the header
# early and let the request write headers of its own (response splitting).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SIGNATURE_RE = re.compile(r"signature=[^&\s]+")


def _header_safe(value: str) -> str:
    """A header value that cannot split a response: controls become spaces, and characters
    outside ASCII become backslash escapes (http.server encodes headers as latin-1)."""
    return _CONTROL_RE.sub(" ", value).encode("ascii", "backslashreplace").decode("ascii")


def _is_true(value: str | None) -> bool:
    # httpx sends Python booleans as "true"/"false"; other clients send "1"/"True".
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _card_data(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README.md (the Hub's ``cardData``), or ``None``."""
    text = readme.decode("utf-8", errors="replace").lstrip("\ufeff")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object request body (an empty body is ``{}``).

    Raises:
        HubError: 400 for invalid JSON or JSON that is not an object.
    """
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes not UTF-8
        raise HubError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise HubError(400, f"Expected a JSON object, got {type(data).__name__}")
    return data


def _opt_str(payload: dict[str, Any], name: str, *, where: str = "") -> str | None:
    """``payload[name]`` if it is a string, ``None`` if absent or null.

    Raises:
        HubError: 400 if it is anything else.
    """
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    raise HubError(400, f"{where}'{name}' must be a string, got {type(value).__name__}")


def _opt_bool(payload: dict[str, Any], name: str) -> bool | None:
    """``payload[name]`` if it is a boolean, ``None`` if absent or null (else a 400)."""
    value = payload.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise HubError(400, f"'{name}' must be a boolean, got {type(value).__name__}")


def _opt_size(payload: dict[str, Any], name: str, *, where: str = "") -> int | None:
    """``payload[name]`` if it is a non-negative integer, ``None`` if absent (else a 400)."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HubError(400, f"{where}'{name}' must be a non-negative integer, got {value!r:.40}")
    return value


def _line_text(raw: bytes, number: int) -> str:
    """A commit line as text (UTF-8, as NDJSON is)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HubError(400, f"Invalid NDJSON commit line {number}: not UTF-8 ({exc})") from None


def _commit_line(raw: bytes | str, number: int) -> tuple[str, dict[str, Any]]:
    """One NDJSON commit line as ``(key, value)``.

    Raises:
        HubError: 400 unless the line is a JSON object with a string ``key`` and an object
            ``value``.
    """
    try:
        item = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes not UTF-8
        raise HubError(400, f"Invalid NDJSON commit line {number}: {exc}") from None
    if not isinstance(item, dict):
        raise HubError(400, f"Invalid commit line {number}: expected a JSON object")
    key, value = item.get("key"), item.get("value")
    if not isinstance(key, str):
        raise HubError(400, f"Invalid commit line {number}: 'key' must be a string")
    if not isinstance(value, dict):
        raise HubError(
            400, f"Invalid commit line {number}: the {key!r:.40} 'value' must be an object"
        )
    return key, value


def _line_path(value: dict[str, Any], number: int, *, folder: bool = False) -> str:
    """The validated repo path of a commit line (a folder's without its trailing slash)."""
    path = _opt_str(value, "path", where=f"commit line {number}: ") or ""
    return validate_repo_path(path.rstrip("/") if folder else path)


def _inline_content(value: dict[str, Any], path: str) -> bytes:
    """The bytes of a ``file`` commit line (base64, or UTF-8 text)."""
    encoding = _opt_str(value, "encoding") or "base64"
    content = _opt_str(value, "content") or ""
    value.pop("content", None)  # the only reference left is ``content``, gone after decoding
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise HubError(400, f"Invalid base64 content for {path}") from None
    if encoding.lower() in ("utf-8", "utf8"):
        return content.encode()
    raise HubError(400, f"Unsupported encoding {encoding!r} for {path}: base64 or utf-8")


def _lfs_line(value: dict[str, Any], path: str, repo: RepoRef, store: RepoStore) -> FileEntry:
    """The manifest entry of an ``lfsFile`` commit line, whose object must be stored."""
    if (_opt_str(value, "algo") or "sha256") != "sha256":
        raise HubError(400, f"lfsFile {path!r}: only sha256 object ids are supported")
    oid = _opt_str(value, "oid") or ""
    if not _SHA256_RE.match(oid):
        raise HubError(400, f"lfsFile {path!r}: 'oid' must be 64 hex digits")
    size = _opt_size(value, "size")
    stored = store.lfs_size(repo, oid)
    if stored is None:
        raise HubError(
            400,
            f"lfsFile {path!r}: LFS object {oid} was not uploaded to this repo (upload it "
            "through the LFS batch API first; objects stored elsewhere are not supported)",
        )
    if size is not None and size != stored:
        raise HubError(400, f"lfsFile {path!r}: size {size}, but the object has {stored} bytes")
    return FileEntry(oid=store.lfs_git_oid(repo, oid), size=stored, lfs=oid)


def _lfs_error(oid: str, size: Any, code: int, message: str) -> dict[str, Any]:
    """An LFS batch answer for one object that cannot be uploaded."""
    return {
        "oid": oid,
        "size": size if isinstance(size, int) else 0,
        "error": {"code": code, "message": message},
    }


def _sibling(path: str, entry: FileEntry) -> dict[str, Any]:
    """A repo info ``siblings`` item."""
    item: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": api_oid(entry)}
    if entry.lfs:
        pointer_size = len(lfs_pointer(entry.lfs, entry.size))
        item["lfs"] = {"sha256": entry.lfs, "size": entry.size, "pointerSize": pointer_size}
    return item


def _commit_header(header: dict[str, Any]) -> tuple[str, str, str | None]:
    """The summary, description and optional parent commit of a commit's header line.

    Raises:
        HubError: 400 for a missing summary or fields of the wrong type.
    """
    summary = (_opt_str(header, "summary", where="header: ") or "").strip()
    if not summary:
        raise HubError(400, "The commit summary is required")
    if len(summary) > _MAX_SUMMARY:
        raise HubError(400, f"The commit summary is longer than {_MAX_SUMMARY} characters")
    description = _opt_str(header, "description", where="header: ") or ""
    if len(description) > _MAX_DESCRIPTION:
        raise HubError(400, f"The commit description is longer than {_MAX_DESCRIPTION} characters")
    parent = _opt_str(header, "parentCommit", where="header: ")
    if parent and not _SHA_RE.match(parent):
        raise HubError(
            400, f"header: 'parentCommit' must be a 40-hex commit id, got {parent!r:.60}"
        )
    return summary, description, parent or None


_BUSY_BODY = json.dumps({"error": "The local hub has too many open connections; retry"}).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


class _HubHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them at once."""

    daemon_threads = True  # a stuck client must not keep the process alive at shutdown
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        store: RepoStore,
        *,
        token: str | None,
        allowed_hosts: tuple[str, ...],
        max_connections: int,
        read_timeout_s: float,
        lfs_threshold: int | None,
    ) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.signer = UploadSigner()
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        # Built after binding: with port 0 the real port is only known now.
        self.policy = HostPolicy(
            bound_host=address[0], port=self.server_address[1], allowed_hosts=allowed_hosts
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            admitted = self._active < self.max_connections
            if admitted:
                self._active += 1
        if not admitted:
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _refuse_busy(self, request: Any) -> None:
        """Answer 503 on the accepting thread without ever blocking it, then close."""
        logger.warning("refusing a connection: %d open (the limit)", self.max_connections)
        with contextlib.suppress(OSError):
            request.setblocking(False)  # a fresh socket's buffer takes these few bytes
            request.send(_BUSY)
        self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    """One request: route, check access, answer JSON or file bytes."""

    server: _HubHTTPServer
    _reader: BodyReader | None = None  # this request's body, once something started reading it
    _framing: Framing | None = None  # this request's body framing, once checked
    protocol_version = "HTTP/1.1"  # keep-alive: the clients reuse connections
    server_version = "hubtune-localhub"

    def setup(self) -> None:
        # Every read and write on the socket gives up after this long, so an idle keep-alive
        # connection or a request that never finishes frees its thread and connection slot.
        super().setup()
        self.connection.settimeout(self.server.read_timeout_s)

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        # Route http.server's access log through logging. Only the request line and status are
        # logged, never headers, so Authorization never reaches the log.
        # Control characters escaped as http.server does, so a request cannot forge log lines.
        message = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", format % args)
        # An LFS upload link's signature authorises a write, like a token: not for the log.
        message = _SIGNATURE_RE.sub("signature=<redacted>", message)
        logger.info("%s - %s", self.address_string(), message)

    def send_header(self, keyword: str, value: str) -> None:
        # The one place every response header passes (http.server's own included), so no
        # caller has to remember to clean a value that holds request data.
        super().send_header(keyword, _header_safe(str(value)))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # so the client does not reuse it
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, *, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message[:500], **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers=headers)

    def _body(self) -> BodyReader:
        if self._reader is None:
            assert self._framing is not None  # checked before routing
            self._reader = BodyReader(self.rfile, self._framing)
        return self._reader

    def _settle_body(self) -> None:
        """Before an early answer: read away a small unread body, or close the connection.

        An unread body would be parsed as the next request on this keep-alive connection, and
        a body whose framing is broken cannot be told apart from that next request at all.
        """
        if self._framing is None:
            self.close_connection = True
            return
        reader = self._body()
        if reader.broken:
            self.close_connection = True
            return
        if reader.done:
            return
        remaining = reader.remaining
        if remaining is not None and remaining <= _DRAIN_LIMIT:
            reader.drain()
            if reader.done:
                return
        self.close_connection = True

    def _require_body_type(self, allowed: tuple[str | None, ...]) -> None:
        """Refuse a body whose Content-Type the Hub clients never send to this route."""
        assert self._framing is not None  # checked before routing
        if self._framing.has_body:
            check_media_type(self.headers.get("Content-Type"), allowed)

    def _json_body(self, *, allowed: tuple[str, ...] = _JSON_TYPES) -> dict[str, Any]:
        self._require_body_type(allowed)
        return _json_object(self._body().read_all())

    def _base_url(self) -> str:
        # The Host header is how the client reached us (e.g. a 0.0.0.0 bind seen as an address).
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    # ------------------------------------------------------------------ access control

    def _check_caller(self) -> None:
        """Host on every request (DNS rebinding), Origin/Referer on every non-read request."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise HubError(400, "More than one Host header")
        policy = self.server.policy
        policy.check_host(hosts[0] if hosts else None)
        if self.command not in ("GET", "HEAD"):
            policy.check_origin(self.headers.get("Origin"), self.headers.get("Referer"))

    def _presented_token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def _authenticated(self) -> bool:
        if self.server.token is None:
            return True  # open local use
        presented = self._presented_token()
        return presented is not None and hmac.compare_digest(
            presented.encode(), self.server.token.encode()
        )

    def _require_write(self) -> None:
        if self._authenticated():
            return
        if self._presented_token() is None:
            raise HubError(401, "Authorization required: this hub needs a token for writes")
        raise HubError(401, "Invalid credentials in Authorization header")

    def _visible_repo(self, repo_type: str, repo_id: str) -> RepoRef:
        """The repo, if it exists and the caller may see it (private repos need the token)."""
        store = self.server.store
        repo = store.locate(repo_type, repo_id)
        settings = store.settings(repo)
        if settings.get("private") and not self._authenticated():
            # As the Hub: a private repo is indistinguishable from a missing one.
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        # CORS preflights land here and are never approved (no Access-Control-Allow-* header),
        # so browsers never send a cross-origin JSON/NDJSON write at all.
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        # Split before unquoting: a revision like 'refs%2Fpr%2F1' is one segment.
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._reader = None
        self._framing = None
        try:
            self._framing = parse_framing(self.headers)
            self._check_caller()
            self._route(segments, query)
        except HubError as err:
            self._settle_body()
            self._error(err)
        except (ConnectionError, TimeoutError) as exc:
            logger.warning("%s %s: connection lost (%s)", self.command, split.path, exc)
            self.close_connection = True
        except Exception:
            logger.exception("%s %s failed", self.command, split.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._error(HubError(500, "Internal error in the local hub (see its log)"))

    def _route(self, seg: list[str], query: dict[str, str]) -> None:
        method = self.command
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and method == "GET":
                # huggingface_hub fetches this registry for agent detection (user-agent only);
                # an empty registry means "no agent detected" and saves a logged 404.
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(rest) == 1 and rest[0] in _TYPE_FROM_PLURAL and method == "GET":
                return self._list_repos(_TYPE_FROM_PLURAL[rest[0]], query)
            if len(rest) >= 3 and rest[0] in _TYPE_FROM_PLURAL:
                repo_type = _TYPE_FROM_PLURAL[rest[0]]
                repo_id = f"{rest[1]}/{rest[2]}"
                action, args = (rest[3], rest[4:]) if len(rest) > 3 else ("", [])
                handled = self._repo_api(method, repo_type, repo_id, action, args, query)
                if handled:
                    return None
        else:
            repo_type, rest = "model", seg
            if seg[:1] in (["datasets"], ["spaces"]):
                repo_type, rest = _TYPE_FROM_PLURAL[seg[0]], seg[1:]
            if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
            is_lfs = len(rest) >= 5 and rest[1].endswith(".git") and rest[2:4] == ["info", "lfs"]
            if is_lfs and self._lfs_api(
                method, self._lfs_repo(repo_type, rest[0], rest[1]), rest[4:], query
            ):
                return None
        # Missing API surface must be obvious: say what was asked for.
        logger.warning("unsupported endpoint: %s %s", method, urlsplit(self.path).path)
        raise HubError(404, f"Not supported by the local hub: {method} {urlsplit(self.path).path}")

    def _lfs_api(self, method: str, repo: RepoRef, rest: list[str], query: dict[str, str]) -> bool:
        if method == "POST" and rest == ["objects", "batch"]:
            self._lfs_batch(repo)
        elif method == "PUT" and len(rest) == 2 and rest[0] == "objects":
            self._lfs_upload(repo, rest[1], query)
        elif method == "POST" and rest == ["verify"]:
            self._lfs_verify(repo)
        else:
            return False
        return True

    def _repo_api(
        self,
        method: str,
        repo_type: str,
        repo_id: str,
        action: str,
        args: list[str],
        query: dict[str, str],
    ) -> bool:
        if method == "GET" and action == "" and not args:
            self._repo_info(repo_type, repo_id, DEFAULT_BRANCH, query)
        elif method == "GET" and action == "revision" and args:
            self._repo_info(repo_type, repo_id, "/".join(args), query)
        elif method == "GET" and action == "tree" and args:
            self._tree(repo_type, repo_id, args[0], "/".join(args[1:]), query)
        elif method == "POST" and action == "paths-info" and args:
            self._paths_info(repo_type, repo_id, "/".join(args))
        elif method == "GET" and action == "commits" and args:
            self._commits(repo_type, repo_id, "/".join(args), query)
        elif method == "POST" and action == "preupload" and args:
            self._preupload(repo_type, repo_id, "/".join(args), query)
        elif method == "POST" and action == "commit" and args:
            self._commit(repo_type, repo_id, "/".join(args), query)
        elif method == "PUT" and action == "settings" and not args:
            self._settings(repo_type, repo_id)
        elif method == "GET" and action == "refs" and not args:
            self._refs(repo_type, repo_id, query)
        elif action in ("branch", "tag") and args and method in ("POST", "DELETE"):
            self._change_ref(repo_type, repo_id, action, "/".join(args))
        elif method == "POST" and action == "discussions" and not args:
            self._refuse_discussion()
        elif action in ("xet-write-token", "xet-read-token"):
            # hf_xet shows only the status and URL to its user: say it here, too.
            logger.warning("%s %s: a client tried Xet storage. %s", repo_type, repo_id, _NO_XET)
            raise HubError(400, _NO_XET)
        else:
            return False
        return True

    # ------------------------------------------------------------------ account and repos

    def _whoami(self) -> None:
        if self.server.token is not None and not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "id": LOCAL_USER,
                "name": LOCAL_USER,
                "fullname": "Local hub user",
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local", "role": "write"},
                },
            },
        )

    def _repo_from_payload(self, payload: dict[str, Any]) -> RepoRef:
        repo_type = _opt_str(payload, "type") or "model"
        name = _opt_str(payload, "name")
        if not name:
            raise HubError(400, "Missing repo name")
        org = _opt_str(payload, "organization") or LOCAL_USER
        return self.server.store.locate(repo_type, f"{org}/{name}")

    @staticmethod
    def _private_from_payload(payload: dict[str, Any]) -> bool | None:
        """The requested privacy: ``visibility`` wins over ``private``; None if neither."""
        visibility = _opt_str(payload, "visibility")
        if visibility is not None:
            return visibility != "public"
        return _opt_bool(payload, "private")

    def _repo_url(self, repo: RepoRef) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self._base_url()}/{prefix}{repo.repo_id}"

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        repo = self._repo_from_payload(payload)
        private = bool(self._private_from_payload(payload))
        sdk = _opt_str(payload, "sdk")
        if repo.repo_type == "space":
            if sdk not in _SPACE_SDKS:
                raise HubError(400, f"Invalid space sdk {sdk!r}: one of {', '.join(_SPACE_SDKS)}")
        else:
            sdk = None
        store = self.server.store
        try:
            store.create(repo, private=private, sdk=sdk, author=LOCAL_USER)
        except HubError as err:
            if err.status != 409:
                raise
            # As the Hub: 409 with the URL. create_repo(exist_ok=True) swallows the error but
            # then reads "url" from the body, so it must be there.
            self._json(
                409,
                {"error": "You already created this repo", "url": self._repo_url(repo)},
                headers={"X-Error-Message": "You already created this repo"},
            )
            return
        logger.info("created %s %s (private=%s)", repo.repo_type, repo.repo_id, private)
        self._json(200, {"url": self._repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        repo = self._repo_from_payload(self._json_body())
        self.server.store.delete(repo)
        logger.info("deleted %s %s", repo.repo_type, repo.repo_id)
        self._json(200, {})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        self._require_write()
        repo = self._visible_repo(repo_type, repo_id)
        payload = self._json_body()
        private = self._private_from_payload(payload)
        if private is not None:
            self.server.store.update_settings(repo, private=private)
        self._json(200, {})

    def _validate_yaml(self) -> None:
        payload = self._json_body()
        content = str(payload.get("content", ""))
        text = content.lstrip("\ufeff")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
        warnings: list[dict[str, str]] = []
        if match is not None:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                self._json(400, {"errors": [{"message": f"Invalid YAML: {exc}"}], "warnings": []})
                return
            if data is not None and not isinstance(data, dict):
                self._json(
                    400,
                    {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []},
                )
                return
            if not data:
                warnings.append({"message": "Empty metadata"})
        self._json(200, {"errors": [], "warnings": warnings})

    # ------------------------------------------------------------------ reading repos

    def _repo_info(
        self, repo_type: str, repo_id: str, revision: str, query: dict[str, str]
    ) -> None:
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        self._json(200, self._info(repo, store.resolve(repo, revision)))

    def _info(self, repo: RepoRef, commit: Commit) -> dict[str, Any]:
        """A repo's info at a commit, in the Hub's JSON shape."""
        repo_type, repo_id = repo.repo_type, repo.repo_id
        store = self.server.store
        settings = store.settings(repo)
        card = None
        if "README.md" in commit.files:
            with store.open_entry(repo, commit.files["README.md"]) as handle:
                card = _card_data(handle.read(1 << 20))
        org = repo_id.split("/")[0]
        tags = [str(t) for t in (card or {}).get("tags") or [] if isinstance(t, str | int)]
        info: dict[str, Any] = {
            "_id": repo_id,
            "id": repo_id,
            "author": org,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": settings.get("createdAt"),
            "private": bool(settings.get("private")),
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "usedStorage": sum(e.size for e in commit.files.values()),
            "siblings": [_sibling(path, entry) for path, entry in sorted(commit.files.items())],
        }
        if card is not None:
            info["cardData"] = card
        if repo_type == "model":
            info["modelId"] = repo_id
            if card is not None:
                info["library_name"] = card.get("library_name")
                info["pipeline_tag"] = card.get("pipeline_tag")
            config = self._small_json(repo, commit, "config.json")
            if config is not None:
                info["config"] = {
                    k: config[k] for k in ("architectures", "model_type") if k in config
                }
        elif repo_type == "dataset":
            info["description"] = None
            info["citation"] = None
        else:
            info["sdk"] = settings.get("sdk") or (card or {}).get("sdk")
            info["subdomain"] = repo_id.replace("/", "-").lower()
        return info

    def _list_repos(self, repo_type: str, query: dict[str, str]) -> None:
        """``list_models``/``list_datasets``/``list_spaces``: ``author`` (the namespace),
        ``search`` (case-insensitive substring of the id), ``filter`` (tags, all required),
        ``limit``, and ``full`` (with files). Other filters and sorting are not supported."""
        author = query.get("author", "").lower()
        search = query.get("search", "").lower()
        # 'filter' repeats (filter=a&filter=b); the parsed query keeps one value per name.
        wanted_tags = set(parse_qs(urlsplit(self.path).query).get("filter") or [])
        full = _is_true(query.get("full"))
        limit = self._cursor({"cursor": query.get("limit", "0")}) or None
        store = self.server.store
        items = []
        for repo in store.list_repos(repo_type):
            org = repo.repo_id.split("/")[0].lower()
            if (author and org != author) or search not in repo.repo_id.lower():
                continue
            try:
                self._visible_repo(repo_type, repo.repo_id)
                info = self._info(repo, store.resolve(repo, DEFAULT_BRANCH))
            except HubError:
                continue  # private without the token, or deleted meanwhile
            if not wanted_tags <= set(info["tags"]):
                continue
            if not full:
                for key in ("siblings", "cardData", "config"):
                    info.pop(key, None)
            items.append(info)
        items = items[:limit]
        start = self._cursor(query)
        page = items[start : start + _TREE_PAGE]
        self._send_page(page, start=start, total=len(items), query=query)

    # ------------------------------------------------------------------ branches and tags

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, str]) -> None:
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)

        def listing(kind: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
                for name, sha in store.refs(repo, kind).items()
            ]

        answer: dict[str, Any] = {
            "branches": listing("heads"),
            "converts": [],
            "tags": listing("tags"),
        }
        if _is_true(query.get("include_prs")):
            answer["pullRequests"] = []  # pull requests are not supported
        self._json(200, answer)

    def _change_ref(self, repo_type: str, repo_id: str, action: str, name: str) -> None:
        """``create_branch``/``delete_branch`` (POST/DELETE ``branch/{name}``, body
        ``startingPoint``) and ``create_tag``/``delete_tag`` (POST ``tag/{revision}`` with
        body ``tag``; DELETE ``tag/{tag}``)."""
        self._require_write()
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        kind = "heads" if action == "branch" else "tags"
        if self.command == "DELETE":
            store.delete_ref(repo, kind, name)
            logger.info("deleted %s %s of %s %s", action, name, repo_type, repo_id)
            self._json(200, {})
            return
        payload = self._json_body()
        if kind == "heads":
            start = _opt_str(payload, "startingPoint") or DEFAULT_BRANCH
            ref_name = name
        else:
            start, ref_name = name, _opt_str(payload, "tag") or ""
            _opt_str(payload, "message")  # accepted; tags here are lightweight
        store.create_ref(repo, kind, ref_name, store.resolve(repo, start))
        logger.info("created %s %s of %s %s at %s", action, ref_name, repo_type, repo_id, start)
        self._json(200, {})

    def _refuse_discussion(self) -> None:
        payload = self._json_body()
        if payload.get("pullRequest"):
            raise HubError(400, _NO_PULL_REQUESTS)
        raise HubError(400, "Discussions are not supported by the local hub endpoint")

    def _small_json(self, repo: RepoRef, commit: Commit, path: str) -> dict[str, Any] | None:
        entry = commit.files.get(path)
        if entry is None or entry.size > 1 << 20:
            return None
        with self.server.store.open_entry(repo, entry) as handle:
            try:
                data = json.loads(handle.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
        return data if isinstance(data, dict) else None

    def _entries(
        self,
        repo: RepoRef,
        commit: Commit,
        paths: list[tuple[str, str]],
        *,
        expand: bool,
    ) -> list[dict[str, Any]]:
        """Tree/paths-info entries for ``(kind, path)`` pairs, in the Hub's JSON shape."""
        last: dict[str, Commit] = {}
        if expand:
            last = self.server.store.last_commits(repo, commit, [p for _, p in paths])
        out = []
        for kind, path in paths:
            if kind == "file":
                entry = commit.files[path]
                item: dict[str, Any] = {
                    "type": "file",
                    "oid": api_oid(entry),
                    "size": entry.size,
                    "path": path,
                }
                if entry.lfs:
                    item["lfs"] = {
                        "oid": entry.lfs,
                        "size": entry.size,
                        "pointerSize": len(lfs_pointer(entry.lfs, entry.size)),
                    }
            else:
                item = {
                    "type": "directory",
                    "oid": folder_oid(commit.files, path),
                    "size": 0,
                    "path": path,
                }
            if expand and path in last:
                item["lastCommit"] = {
                    "id": last[path].id,
                    "title": last[path].title,
                    "date": last[path].date,
                }
            if expand and kind == "file":
                item["securityFileStatus"] = {
                    "status": "unscanned",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
            out.append(item)
        return out

    @staticmethod
    def _cursor(query: dict[str, str]) -> int:
        try:
            return max(0, int(query.get("cursor", "0") or 0))
        except ValueError:
            raise HubError(400, "Invalid cursor") from None

    def _send_page(self, page: list[Any], *, start: int, total: int, query: dict[str, str]) -> None:
        """Answer one page, with a GitHub-style ``Link: <...>; rel="next"`` if more follow."""
        headers = {}
        if start + len(page) < total:
            params = {**query, "cursor": str(start + len(page))}
            path = urlsplit(self.path).path
            headers["Link"] = f'<{self._base_url()}{path}?{urlencode(params)}>; rel="next"'
        self._json(200, page, headers=headers)

    def _tree(
        self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, str]
    ) -> None:
        store = self.server.store
        path = path.rstrip("/")  # a folder may be named with its trailing slash
        if path:
            validate_repo_path(path)
        repo = self._visible_repo(repo_type, repo_id)
        commit = store.resolve(repo, revision)
        recursive = _is_true(query.get("recursive"))
        expand = _is_true(query.get("expand"))
        prefix = f"{path}/" if path else ""
        if path and path in commit.files:
            raise HubError(404, f"{path} is a file, not a folder", code="EntryNotFound")
        folders: set[str] = set()
        files: list[str] = []
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            rel_parts = file_path[len(prefix) :].split("/")
            if recursive:
                files.append(file_path)
                for depth in range(1, len(rel_parts)):
                    folders.add(prefix + "/".join(rel_parts[:depth]))
            elif len(rel_parts) == 1:
                files.append(file_path)
            else:
                folders.add(prefix + rel_parts[0])
        if path and not files and not folders:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        # The Hub lists folders before files, each sorted by path.
        listing = [("directory", p) for p in sorted(folders)] + [("file", p) for p in sorted(files)]
        page_size = _TREE_PAGE_EXPANDED if expand else _TREE_PAGE
        start = self._cursor(query)
        # Expand only the page being returned: last-commit lookups walk history.
        window = listing[start : start + page_size]
        entries = self._entries(repo, commit, window, expand=expand)
        self._send_page(entries, start=start, total=len(listing), query=query)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        commit = store.resolve(repo, revision)
        self._require_body_type(_PATHS_INFO_TYPES)
        paths, expand = self._paths_info_request(self._body().read_all())
        wanted: list[tuple[str, str]] = []
        for path in paths:
            path = validate_repo_path(path.rstrip("/"))
            if path in commit.files:
                wanted.append(("file", path))
            elif any(p.startswith(path + "/") for p in commit.files):
                wanted.append(("directory", path))
            # Missing paths are left out, as the Hub does.
        self._json(200, self._entries(repo, commit, wanted, expand=expand))

    def _paths_info_request(self, raw: bytes) -> tuple[list[str], bool]:
        """The ``paths`` and ``expand`` of a paths-info request (JSON, or the client's form)."""
        if "json" in self.headers.get("Content-Type", ""):
            data = _json_object(raw)
            paths = data.get("paths", [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise HubError(400, "'paths' must be a list of strings")
            return paths, bool(data.get("expand"))
        # huggingface_hub posts a form: paths=a&paths=b&expand=False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HubError(400, "The form body is not UTF-8") from None
        form = parse_qs(text, keep_blank_values=True)
        return form.get("paths", []), _is_true((form.get("expand") or ["false"])[-1])

    def _commits(self, repo_type: str, repo_id: str, revision: str, query: dict[str, str]) -> None:
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        start = store.resolve(repo, revision)
        start_at = self._cursor(query)
        items = [
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author}],
                "parents": c.parents,
            }
            for c in store.history(repo, start)
        ]
        page = items[start_at : start_at + _COMMITS_PAGE]
        self._send_page(page, start=start_at, total=len(items), query=query)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        validate_repo_path(path)
        repo = self._visible_repo(repo_type, repo_id)
        commit = store.resolve(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(
                404,
                f"Entry not found: {path}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.id},
            )
        headers = {
            "X-Repo-Commit": commit.id,
            # Small files on the Hub: ETag is the git blob sha1, quoted. LFS files: the sha256,
            # also as X-Linked-Etag/X-Linked-Size (what the Hub sends beside its CDN redirect,
            # and what huggingface_hub prefers), served here directly without the redirect.
            "ETag": f'"{entry.lfs or entry.oid}"',
            **(
                {"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)}
                if entry.lfs
                else {}
            ),
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        start, end = 0, entry.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = self._parse_range(range_header, entry.size)
            if parsed is None:
                self._send(416, b"", headers={**headers, "Content-Range": f"bytes */{entry.size}"})
                return
            if parsed != (0, entry.size - 1) or entry.size == 0:
                status = 206
            start, end = parsed
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with store.open_entry(repo, entry) as handle:
            handle.seek(start)
            remaining = length
            while remaining:
                chunk = handle.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int] | None:
        """A single ``bytes=`` range as inclusive offsets, or ``None`` if unsatisfiable."""
        match = _RANGE_RE.match(header.strip())
        if match is None or size == 0:
            return (0, size - 1) if size else None
        first, last = match.groups()
        if first == "" and last == "":
            return None
        if first == "":  # suffix range: the last N bytes
            count = int(last)
            return (max(0, size - count), size - 1) if count else None
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or end < start:
            return None
        return start, end

    # ------------------------------------------------------------------ writing

    def _writable_branch(self, repo: RepoRef, revision: str, query: dict[str, str]) -> str:
        if _is_true(query.get("create_pr")):
            raise HubError(400, _NO_PULL_REQUESTS)
        revision = revision.removeprefix("refs/heads/")
        if self.server.store.head(repo, revision) is None:
            raise HubError(
                404,
                f"Invalid rev id: {revision} (commits go to a branch, e.g. 'main')",
                code="RevisionNotFound",
            )
        return revision

    def _preupload(
        self, repo_type: str, repo_id: str, revision: str, query: dict[str, str]
    ) -> None:
        self._require_write()
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        branch = self._writable_branch(repo, revision, query)
        commit = store.resolve(repo, branch)
        payload = self._json_body()
        files = payload.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise HubError(400, "Expected 'files': a list of objects")
        patterns = self._lfs_patterns(repo, commit)
        answer = []
        for item in files:
            path = validate_repo_path(_opt_str(item, "path", where="files: ") or "")
            size = _opt_size(item, "size", where="files: ") or 0
            lfs = wants_lfs(path, size, patterns=patterns, threshold=self.server.lfs_threshold)
            existing = commit.files.get(path)
            answer.append(
                {
                    "path": path,
                    # Large and binary files through LFS (streamed, hashed, never inline).
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    # The current content id lets the client skip unchanged files: the sha256
                    # for LFS files, the git blob id for others (what the client compares).
                    "oid": (existing.lfs or existing.oid) if existing else None,
                }
            )
        self._json(200, {"files": answer, "commitOid": commit.id})

    def _lfs_patterns(self, repo: RepoRef, commit: Commit) -> list[str]:
        entry = commit.files.get(".gitattributes")
        if entry is None or entry.size > 1 << 20:
            return []
        with self.server.store.open_entry(repo, entry) as handle:
            return lfs_patterns(handle.read())

    # ------------------------------------------------------------------ Git LFS

    def _lfs_repo(self, repo_type: str, org: str, name_git: str) -> RepoRef:
        """The repo of an LFS URL (``{org}/{name}.git/info/lfs/...``)."""
        return self.server.store.locate(repo_type, f"{org}/{name_git.removesuffix('.git')}")

    def _lfs_batch(self, repo: RepoRef) -> None:
        """The LFS batch API: upload instructions (basic transfer) for objects not stored yet.

        Only ``upload`` is offered; downloads go through ``resolve/``. No ``chunk_size`` in
        the upload header, so huggingface_hub never uses its multipart transfer.
        """
        self._require_write()
        self._visible_repo(repo.repo_type, repo.repo_id)
        payload = self._json_body(allowed=_LFS_JSON_TYPES)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported; download through resolve/")
        if payload.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "Only sha256 LFS object ids are supported")
        transfers = payload.get("transfers", ["basic"])
        if not isinstance(transfers, list) or "basic" not in transfers:
            raise HubError(400, "Only the 'basic' LFS transfer is supported")
        objects = payload.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
            raise HubError(400, "Expected 'objects': a list of objects")
        if len(objects) > _LFS_BATCH_MAX:
            raise HubError(413, f"More than {_LFS_BATCH_MAX} objects in one LFS batch")
        answers = [self._lfs_batch_object(repo, item) for item in objects]
        body = json.dumps({"transfer": "basic", "objects": answers, "hash_algo": "sha256"})
        self._send(200, body.encode(), content_type="application/vnd.git-lfs+json")

    def _lfs_batch_object(self, repo: RepoRef, item: dict[str, Any]) -> dict[str, Any]:
        oid, size = item.get("oid"), item.get("size")
        if not isinstance(oid, str) or not _SHA256_RE.match(oid):
            return _lfs_error(str(oid)[:80], size, 422, "Invalid object id: 64 hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return _lfs_error(oid, 0, 422, "Invalid object size")
        stored = self.server.store.lfs_size(repo, oid)
        if stored is not None:
            if stored != size:
                return _lfs_error(oid, size, 422, f"Object stored with size {stored}")
            return {"oid": oid, "size": size}  # no actions: nothing to upload
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        base = f"{self._base_url()}/{prefix}{repo.repo_id}.git/info/lfs"
        query = self.server.signer.query(
            repo_type=repo.repo_type, repo_id=repo.repo_id, oid=oid, size=size
        )
        return {
            "oid": oid,
            "size": size,
            "authenticated": True,
            "actions": {
                "upload": {"href": f"{base}/objects/{oid}?{query}", "expires_in": 86400},
                "verify": {"href": f"{base}/verify", "expires_in": 86400},
            },
        }

    def _lfs_upload(self, repo: RepoRef, oid: str, query: dict[str, str]) -> None:
        """The basic transfer: a PUT of the object's bytes, streamed to disk and verified."""
        size = self.server.signer.check(
            repo_type=repo.repo_type, repo_id=repo.repo_id, oid=oid, query=query
        )
        self.server.store.settings(repo)  # 404 if the repo was deleted meanwhile
        self._require_body_type(_LFS_PUT_TYPES)
        assert self._framing is not None
        if not self._framing.chunked and self._framing.length != size:
            raise HubError(400, f"Content-Length {self._framing.length} is not the {size} bytes")
        body = self._body()
        self.server.store.write_lfs_object(
            repo, sha256=oid, size=size, chunks=iter(body.read_chunk, b"")
        )
        logger.info("LFS upload of %s (%d bytes) to %s %s", oid, size, repo.repo_type, repo.repo_id)
        self._send(200, b"")

    def _lfs_verify(self, repo: RepoRef) -> None:
        self._require_write()
        self._visible_repo(repo.repo_type, repo.repo_id)
        payload = self._json_body(allowed=_LFS_JSON_TYPES)
        oid = _opt_str(payload, "oid") or ""
        size = _opt_size(payload, "size")
        stored = self.server.store.lfs_size(repo, oid) if _SHA256_RE.match(oid) else None
        if stored is None or stored != size:
            raise HubError(404, f"LFS object {oid[:80]!r} of {size} bytes is not stored")
        self._json(200, {"message": "Object verified"})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, str]) -> None:
        self._require_write()
        store = self.server.store
        repo = self._visible_repo(repo_type, repo_id)
        branch = self._writable_branch(repo, revision, query)
        self._require_body_type(_NDJSON_TYPES)
        # Blobs are stored as their lines arrive (one line in memory at a time) and removed
        # again if the commit is refused (stale parent, missing path) or the client goes away.
        with store.staging(repo) as staged:
            ops = _read_commit(self._body(), staged, store)
            summary, description, parent = _commit_header(ops.header)
            commit = store.apply_commit(
                repo,
                branch=branch,
                additions=ops.additions,
                deleted_files=ops.deleted_files,
                deleted_folders=ops.deleted_folders,
                title=summary,
                message=description,
                parent_commit=parent,
                author=LOCAL_USER,
            )
        logger.info(
            "commit %s to %s %s@%s (%d added, %d deleted)",
            commit.id[:12],
            repo_type,
            repo_id,
            branch,
            len(ops.additions),
            len(ops.deleted_files) + len(ops.deleted_folders),
        )
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}",
                "pullRequestUrl": None,
                "hookOutput": "",
            },
        )


@dataclass
class _CommitOps:
    """What an NDJSON commit body asks for."""

    header: dict[str, Any]
    additions: dict[str, FileEntry] = field(default_factory=dict)
    deleted_files: list[str] = field(default_factory=list)
    deleted_folders: list[str] = field(default_factory=list)


def _read_header(body: BodyReader) -> dict[str, Any]:
    """The first line of a commit body, which must be its header (bounded in size)."""
    while (line := body.next_line(limit=_MAX_HEADER_LINE, what="commit header line")) is not None:
        if line.strip():
            key, value = _commit_line(line, 1)
            if key != "header":
                raise HubError(400, "The commit payload must start with a 'header' line")
            return value
    raise HubError(400, "Empty commit payload")


def _read_commit(body: BodyReader, staged: BlobBatch, store: RepoStore) -> _CommitOps:
    """Parse a commit body line by line, storing inline file contents as they come."""
    ops = _CommitOps(header=_read_header(body))
    number = 1
    while (line := body.next_line()) is not None:
        number += 1
        if not line.strip():
            continue
        # An inline file's line is as large as its base64: each form (bytes, text, the parsed
        # content, the decoded file) is dropped as soon as the next exists, so at most two
        # are held at once.
        text = _line_text(line, number)
        del line
        key, value = _commit_line(text, number)
        del text
        if key == "file":
            path = _line_path(value, number)
            data = _inline_content(value, path)
            ops.additions[path] = FileEntry(oid=staged.add(data), size=len(data))
        elif key == "deletedFile":
            ops.deleted_files.append(_line_path(value, number))
        elif key == "deletedFolder":
            ops.deleted_folders.append(_line_path(value, number, folder=True))
        elif key == "lfsFile":
            path = _line_path(value, number)
            ops.additions[path] = _lfs_line(value, path, staged.repo, store)
        elif key == "header":
            raise HubError(400, f"Commit line {number}: a second 'header' line")
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")
    return ops


class LocalHub:
    """A local, file-backed Hub server running in a background thread.

    Args:
        root: Folder holding the repos (created if missing).
        host: Address to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
        token: If set, writes need ``Authorization: Bearer <token>`` and private repos are
            only visible with it. If ``None``, anyone who can connect may write.
        allowed_hosts: Host names (besides loopback names and addresses, and the bound
            address) clients may use in ``Host``/``Origin``; anything else is refused, which
            stops DNS rebinding. A hub bound to every interface also accepts any IP address
            and this machine's host name.
        max_connections: Connections served at once; more are answered 503 and closed (each
            connection holds a thread; the clients use a handful each).
        read_timeout_s: Seconds a connection may stay silent (idle keep-alive, a request or
            body that stops arriving, a client that stops reading) before it is closed.
        lfs_threshold: Files of at least this many bytes (and files ``.gitattributes`` routes
            to LFS) are uploaded through Git LFS: streamed to disk, never inline in the
            commit. ``None``: every file inline, for clients that cannot use LFS (e.g.
            huggingface_hub with Xet enabled: it uploads "lfs" files through Xet, which
            this hub does not speak; ``HF_HUB_DISABLE_XET=1`` makes it use LFS).

    Example:
        >>> with LocalHub(Path("hub-data")) as hub:
        ...     HfApi(endpoint=hub.url).create_repo("org/model")
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        lfs_threshold: int | None = DEFAULT_LFS_THRESHOLD,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self.token = token
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.lfs_threshold = lfs_threshold
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL (``http://HOST:PORT``) to use as ``HF_ENDPOINT``.

        Raises:
            RuntimeError: If the server is not running.
        """
        if self._server is None:
            raise RuntimeError("LocalHub is not running: call start() first")
        host, port = self._server.server_address[:2]
        host = str(host)
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Bind and serve in a daemon thread.

        Returns:
            The base URL.
        """
        if self._server is not None:
            return self.url
        store = RepoStore(self.root)
        self._server = _HubHTTPServer(
            (self.host, self.port),
            store,
            token=self.token,
            allowed_hosts=self.allowed_hosts,
            max_connections=self.max_connections,
            read_timeout_s=self.read_timeout_s,
            lfs_threshold=self.lfs_threshold,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="hubtune-localhub",
            daemon=True,
        )
        self._thread.start()
        logger.info("local hub serving %s at %s", self.root, self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket (in-flight commits either land or do not)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    lfs_threshold: int | None = DEFAULT_LFS_THRESHOLD,
) -> None:
    """Serve a local hub in the foreground until interrupted (Ctrl-C).

    Args:
        root: Folder holding the repos.
        host: Address to bind; loopback by default (pass ``0.0.0.0`` deliberately, with a token).
        port: Port to bind.
        token: Optional write/private-read token (see :class:`LocalHub`).
        allowed_hosts: Extra host names clients may use (see :class:`LocalHub`).
        lfs_threshold: Size from which files go through Git LFS; ``None``: never (see
            :class:`LocalHub`).
    """
    hub = LocalHub(
        root,
        host=host,
        port=port,
        token=token,
        allowed_hosts=allowed_hosts,
        lfs_threshold=lfs_threshold,
    )
    url = hub.start()
    logger.info("HF_ENDPOINT=%s", url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
