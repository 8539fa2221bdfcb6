"""A local, file-backed server for the part of the Hugging Face Hub HTTP API that
``huggingface_hub``, ``transformers``, ``peft`` and ``datasets`` use, for air-gapped teams, the
quickstart and tests. Point clients at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` (set before
they are imported) or ``HfApi(endpoint=...)``.

Example:
    >>> from hubtune.hubserver import LocalHub
    >>> with LocalHub(Path("hub-data")) as hub:
    ...     api = HfApi(endpoint=hub.url)
    ...     api.create_repo("org/tiny-bert")
    ...     api.upload_folder(repo_id="org/tiny-bert", folder_path="model/")

Supported endpoints (``{type}s`` is ``models``, ``datasets`` or ``spaces``; ids are ``org/name``):

- ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (empty registry)
- ``POST /api/repos/create`` (``name``, ``organization``, ``type``, ``private``/``visibility``,
  ``sdk`` for spaces; 409 if it exists), ``DELETE /api/repos/delete``
- ``PUT /api/{type}s/{id}/settings`` (``private``/``visibility`` only)
- ``POST /api/validate-yaml`` (README.md front matter)
- ``GET /api/{type}s/{id}`` and ``GET /api/{type}s/{id}/revision/{rev}`` (repo info: ``sha``,
  ``siblings``, ``private``, ``lastModified``, ``cardData``, ``tags``, ...)
- ``GET /api/{type}s/{id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``; cursor pagination
  through ``Link: rel="next"``), ``POST /api/{type}s/{id}/paths-info/{rev}``
- ``GET /api/{type}s/{id}/commits/{rev}`` (newest first, paginated)
- ``POST /api/{type}s/{id}/preupload/{rev}`` (always ``uploadMode: regular``: no LFS or Xet)
- ``POST /api/{type}s/{id}/commit/{rev}`` (NDJSON ``header``, ``file`` (base64),
  ``deletedFile``, ``deletedFolder``; ``lfsFile`` is refused; a stale ``parentCommit`` gets 412)
- ``HEAD``/``GET /{id}/resolve/{rev}/{path}``, ``/datasets/{id}/resolve/...``,
  ``/spaces/{id}/resolve/...`` with ``X-Repo-Commit``, quoted ``ETag`` (git blob sha1),
  ``Content-Length`` and single ``Range`` requests.

Revisions are branch names (``main``) or full 40-hex commit ids, URL-encoded or not. Anything
else answers 404 with a JSON ``error`` naming the method and path, and a warning in the log.

Storage layout (see :mod:`hubtune.hubserver.storage`)::

    <root>/repos/{models,datasets,spaces}/<org>/<name>/
        repo.json  refs/heads/main  commits/<sha>.json  objects/<oid[:2]>/<oid[2:]>  .lock
    <root>/tmp/  <root>/.lock

A commit writes its blobs and record first and then atomically replaces ``refs/heads/<branch>``
(fsync + ``os.replace``), so a server killed mid-upload leaves the repo at its previous commit.
Commits to one repo are serialised by a thread lock and an ``fcntl`` file lock, so several
server processes may share a root.

Access: with a ``token``, writes need ``Authorization: Bearer <token>`` and private repos answer
404 without it; with no token, the hub is open (bind it to loopback, the default).
"""

from hubtune.hubserver.server import LocalHub, serve

__all__ = ["LocalHub", "serve"]
