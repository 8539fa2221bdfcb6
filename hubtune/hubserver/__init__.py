"""A local, file-backed server for the part of the Hugging Face Hub HTTP API that
``huggingface_hub``, ``transformers``, ``peft`` and ``datasets`` use, for air-gapped teams, the
quickstart and tests. Point clients at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` and
``HF_HUB_DISABLE_XET=1`` (set before they are imported), or ``HfApi(endpoint=...)`` inside
:func:`hubtune.hub.hub_endpoint`, which sets both.

Example:
    >>> from hubtune.hubserver import LocalHub
    >>> os.environ["HF_HUB_DISABLE_XET"] = "1"  # before huggingface_hub is imported
    >>> with LocalHub(Path("hub-data")) as hub:
    ...     api = HfApi(endpoint=hub.url)
    ...     api.create_repo("org/tiny-bert")
    ...     api.upload_folder(repo_id="org/tiny-bert", folder_path="model/")

Supported endpoints (``{type}s`` is ``models``, ``datasets`` or ``spaces``; ids are ``org/name``):

- ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (empty registry)
- ``GET /api/{type}s`` (``author``, ``search``, ``filter`` (tags), ``limit``, ``full``)
- ``POST /api/repos/create`` (``name``, ``organization``, ``type``, ``private``/``visibility``,
  ``sdk`` for spaces; 409 if it exists), ``DELETE /api/repos/delete``
- ``PUT /api/{type}s/{id}/settings`` (``private``/``visibility`` only)
- ``POST /api/validate-yaml`` (README.md front matter)
- ``GET /api/{type}s/{id}`` and ``GET /api/{type}s/{id}/revision/{rev}`` (repo info: ``sha``,
  ``siblings`` with ``lfs``, ``private``, ``lastModified``, ``cardData``, ``tags``, ...)
- ``GET /api/{type}s/{id}/tree/{rev}[/{path}]`` (``recursive``, ``expand``; cursor pagination
  through ``Link: rel="next"``), ``POST /api/{type}s/{id}/paths-info/{rev}``
- ``GET /api/{type}s/{id}/commits/{rev}`` (newest first, paginated)
- ``GET /api/{type}s/{id}/refs``, ``POST``/``DELETE /api/{type}s/{id}/branch/{name}``
  (``startingPoint``), ``POST /api/{type}s/{id}/tag/{rev}`` (``tag``),
  ``DELETE /api/{type}s/{id}/tag/{tag}``
- ``POST /api/{type}s/{id}/preupload/{rev}`` (``lfs`` for files of 10 MiB or more and for paths
  the branch's ``.gitattributes`` routes to LFS, else ``regular``; see :mod:`.lfs`)
- ``POST /{id}.git/info/lfs/objects/batch`` (also under ``datasets/``, ``spaces/``; upload,
  basic transfer), ``PUT .../info/lfs/objects/{sha256}`` (a signed link: the body streamed to
  disk, its size and sha256 checked), ``POST .../info/lfs/verify``
- ``POST /api/{type}s/{id}/commit/{rev}`` (NDJSON ``header``, ``file`` (base64), ``lfsFile``
  (an uploaded object), ``deletedFile``, ``deletedFolder``; a stale ``parentCommit`` gets 412)
- ``HEAD``/``GET /{id}/resolve/{rev}/{path}``, ``/datasets/{id}/resolve/...``,
  ``/spaces/{id}/resolve/...`` with ``X-Repo-Commit``, quoted ``ETag`` (git blob sha1, or the
  sha256 of an LFS file, also as ``X-Linked-Etag`` with ``X-Linked-Size``), ``Content-Length``
  and single ``Range`` requests.

Revisions are branches, tags (also as ``refs/heads/...``/``refs/tags/...``), full commit ids or
unique prefixes of 7+ hex digits, URL-encoded or not. Pull requests, discussions and Xet
storage answer 400 saying so; anything else answers 404 with a JSON ``error`` naming the method
and path, and a warning in the log. huggingface_hub sends the files the hub routes to LFS
through Xet unless ``HF_HUB_DISABLE_XET=1`` (hubtune's own clients set it); ``lfs_threshold=None``
takes every file inline instead.

Storage layout (see :mod:`hubtune.hubserver.storage`)::

    <root>/repos/{models,datasets,spaces}/<org>/<name>/
        repo.json  refs/{heads,tags}/<name>  commits/<sha>.json  objects/<oid[:2]>/<oid[2:]>
        lfs/<sha256[:2]>/<sha256[2:]>  .lock
    <root>/tmp/  <root>/.lock

A commit writes its blobs and record first and then atomically replaces ``refs/heads/<branch>``
(fsync + ``os.replace``), so a server killed mid-upload leaves the repo at its previous commit;
a refused commit removes the blobs it stored. Commits to one repo are serialised by a thread
lock and an ``fcntl`` file lock, so several server processes may share a root.

Access: with a ``token``, writes need ``Authorization: Bearer <token>`` and private repos answer
404 without it; with no token, the hub is open (bind it to loopback, the default). Either way,
requests must address the hub by a loopback name or address, its bound address or an allowed
host (DNS rebinding), writes from another web origin (``Origin``/``Referer``, ``null``
included) are refused, and write bodies must have the media types the Hub clients send (see
:mod:`hubtune.hubserver.guard`). Malformed requests get a 400 (:mod:`hubtune.hubserver.body`);
connections time out when silent and are capped in number (503 beyond).
"""

from hubtune.hubserver.server import LocalHub, serve

__all__ = ["LocalHub", "serve"]
