"""The local hub server, driven by the real clients (huggingface_hub, transformers, datasets).

Each test starts its own LocalHub on a loopback port in a tmp folder. The conftest makes the
suite offline (HF_HUB_OFFLINE, no HF_ENDPOINT) before the libraries are imported, and those
libraries read both settings once, at import, into module constants: the fixtures point them at
the local hub with hubtune's own switch, ``hubtune.hub.hub_endpoint`` (so it is tested here too).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from hubtune.hub import hub_endpoint
from hubtune.hubserver import LocalHub
from hubtune.hubserver.storage import git_blob_sha1
from tests.conftest import make_sentiment_frame, make_tiny_bert

TOKEN = "local-hub-test-token"


@pytest.fixture()
def aim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``aim(url, cache)``: point the clients at a hub with hubtune's own switch, until teardown."""
    import datasets.config as ds_config  # imported first, so hub_endpoint re-aims it too
    import huggingface_hub.constants as hf_constants

    with contextlib.ExitStack() as stack:

        def point(url: str, cache: str = "client-cache") -> None:
            # A fresh client cache per test: repo names repeat across tests, each on its own hub.
            monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / cache / "hub"))
            monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", tmp_path / cache / "datasets")
            stack.enter_context(hub_endpoint(url))

        yield point


@pytest.fixture()
def hub(tmp_path: Path, aim: Callable[..., None]) -> Iterator[LocalHub]:
    """An open (tokenless) local hub, with the clients pointed at it."""
    with LocalHub(tmp_path / "hub-root") as server:
        aim(server.url)
        yield server


@pytest.fixture()
def api(hub: LocalHub):  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=False)


def _files(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    folder = tmp_path / name
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def _add(path: str, text: str):  # type: ignore[no-untyped-def]
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=text.encode())


# --------------------------------------------------------------------------- repos


def test_create_repos_of_every_type_and_exist_ok(api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub.errors import HfHubHTTPError

    url = api.create_repo("org/model")
    assert url == f"{api.endpoint}/org/model" and url.repo_id == "org/model"
    assert api.create_repo("org/data", repo_type="dataset").repo_type == "dataset"
    space = api.create_repo("org/demo", repo_type="space", space_sdk="gradio")
    assert space == f"{api.endpoint}/spaces/org/demo"

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/model")
    assert err.value.response.status_code == 409
    assert api.create_repo("org/model", exist_ok=True).repo_id == "org/model"

    info = api.model_info("org/model")
    assert info.id == "org/model" and len(info.sha) == 40 and info.private is False
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's first commit
    assert api.dataset_info("org/data").id == "org/data"
    assert api.space_info("org/demo").sdk == "gradio"
    assert api.repo_exists("org/demo", repo_type="space")
    assert not api.repo_exists("org/demo")  # same id, other type


def test_delete_repo(api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub.errors import RepositoryNotFoundError

    api.create_repo("org/gone", repo_type="dataset")
    api.delete_repo("org/gone", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/gone")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("org/gone", repo_type="dataset")
    api.delete_repo("org/gone", repo_type="dataset", missing_ok=True)
    api.create_repo("org/gone", repo_type="dataset")  # the name is free again


# --------------------------------------------------------------------------- commits


def test_upload_folder_info_files_and_card(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/m")
    folder = _files(
        tmp_path,
        "upload",
        {
            "README.md": "---\nlicense: mit\ntags: [hubtune, text-classification]\n---\n# Model\n",
            "config.json": '{"model_type": "bert", "architectures": ["BertModel"]}',
            "sub/dir/notes.txt": "deep",
        },
    )
    info = api.upload_folder(repo_id="org/m", folder_path=folder, commit_message="add files")
    model = api.model_info("org/m")
    assert model.sha == info.oid
    assert model.card_data is not None and model.card_data.license == "mit"
    assert "hubtune" in model.tags
    assert model.config == {"model_type": "bert", "architectures": ["BertModel"]}
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes["sub/dir/notes.txt"] == 4
    assert sorted(api.list_repo_files("org/m")) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "sub/dir/notes.txt",
    ]

    top = {e.path: type(e).__name__ for e in api.list_repo_tree("org/m")}
    assert top["sub"] == "RepoFolder" and top["config.json"] == "RepoFile"
    nested = [e.path for e in api.list_repo_tree("org/m", path_in_repo="sub", recursive=True)]
    assert nested == ["sub/dir", "sub/dir/notes.txt"]
    (entry,) = api.get_paths_info("org/m", ["config.json", "missing.txt"], expand=True)
    assert entry.blob_id == git_blob_sha1(b'{"model_type": "bert", "architectures": ["BertModel"]}')
    assert entry.last_commit is not None and entry.last_commit.oid == info.oid

    commits = api.list_repo_commits("org/m")
    assert [c.title for c in commits] == ["add files", "initial commit"]  # newest first
    assert commits[0].commit_id == info.oid


def test_create_commit_parent_and_deletions(api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo("org/p")
    head = api.model_info("org/p").sha
    first = api.create_commit(
        "org/p",
        operations=[_add("a.txt", "one"), _add("dir/b.txt", "two"), _add("dir/c.txt", "three")],
        commit_message="first",
        parent_commit=head,
    )
    # A stale parent (someone committed since) is refused, like the Hub's 412.
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            "org/p", operations=[_add("a.txt", "stale")], commit_message="x", parent_commit=head
        )
    assert err.value.response.status_code == 412
    assert api.model_info("org/p").sha == first.oid

    second = api.create_commit(
        "org/p",
        operations=[CommitOperationDelete("a.txt"), CommitOperationDelete("dir/", is_folder=True)],
        commit_message="clean up",
        parent_commit=first.oid,
    )
    assert api.list_repo_files("org/p") == [".gitattributes"]
    assert api.list_repo_files("org/p", revision=first.oid) == [
        ".gitattributes",
        "a.txt",
        "dir/b.txt",
        "dir/c.txt",
    ]
    assert [c.commit_id for c in api.list_repo_commits("org/p")][:2] == [second.oid, first.oid]


def test_lfs_commit_lines_are_refused_clearly(hub: LocalHub, api) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/l")
    lines = [
        {"key": "header", "value": {"summary": "lfs"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64}},
    ]
    status, body, _ = _request(
        hub.url,
        "POST",
        "/api/models/org/l/commit/main",
        b"".join(json.dumps(x).encode() + b"\n" for x in lines),
        headers={"Content-Type": "application/x-ndjson"},  # as huggingface_hub sends it
    )
    assert status == 400 and "not supported" in json.loads(body)["error"]


# --------------------------------------------------------------------------- downloads


def test_snapshot_download_main_and_pinned_sha(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    api.create_repo("org/s")
    old = api.create_commit("org/s", operations=[_add("a.txt", "old")], commit_message="v1")
    new = api.create_commit(
        "org/s", operations=[_add("a.txt", "new"), _add("b.txt", "b")], commit_message="v2"
    )
    latest = Path(snapshot_download("org/s", endpoint=api.endpoint))
    assert (latest / "a.txt").read_text() == "new" and (latest / "b.txt").exists()
    assert latest.name == new.oid

    pinned = Path(snapshot_download("org/s", revision=old.oid, endpoint=api.endpoint))
    assert (pinned / "a.txt").read_text() == "old" and not (pinned / "b.txt").exists()

    one = hf_hub_download("org/s", "a.txt", revision=old.oid, endpoint=api.endpoint)
    assert Path(one).read_text() == "old"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/s", "missing.txt", endpoint=api.endpoint)


def test_resolve_headers_and_range(hub: LocalHub, api) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/r", repo_type="dataset")
    data = "0123456789" * 10
    info = api.create_commit(
        "org/r", repo_type="dataset", operations=[_add("x.txt", data)], commit_message="x"
    )
    status, body, headers = _request(hub.url, "HEAD", f"/datasets/org/r/resolve/{info.oid}/x.txt")
    assert status == 200 and body == b""
    assert headers["etag"] == f'"{git_blob_sha1(data.encode())}"'
    assert headers["x-repo-commit"] == info.oid and headers["content-length"] == "100"

    status, body, headers = _request(
        hub.url, "GET", "/datasets/org/r/resolve/main/x.txt", headers={"Range": "bytes=10-19"}
    )
    assert status == 206 and body == b"0123456789"
    assert headers["content-range"] == "bytes 10-19/100"
    status, _, headers = _request(
        hub.url, "GET", "/datasets/org/r/resolve/main/x.txt", headers={"Range": "bytes=200-"}
    )
    assert status == 416

    status, body, headers = _request(hub.url, "GET", "/datasets/org/r/resolve/main/nope.txt")
    assert status == 404 and headers["x-error-code"] == "EntryNotFound"
    assert headers["x-repo-commit"] == info.oid
    status, body, headers = _request(hub.url, "GET", "/datasets/org/r/resolve/refs%2Fnope/x.txt")
    assert status == 404 and headers["x-error-code"] == "RevisionNotFound"


def test_unknown_endpoint_is_a_json_404(hub: LocalHub) -> None:
    status, body, _ = _request(hub.url, "GET", "/api/models/org/x/discussions")
    assert status == 404
    assert "/api/models/org/x/discussions" in json.loads(body)["error"]


def test_space_upload_and_download(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download

    api.create_repo("org/app", repo_type="space", space_sdk="gradio")
    api.upload_file(
        path_or_fileobj=b"import gradio\n",
        path_in_repo="app.py",
        repo_id="org/app",
        repo_type="space",
    )
    path = hf_hub_download("org/app", "app.py", repo_type="space", endpoint=api.endpoint)
    assert Path(path).read_bytes() == b"import gradio\n"


# --------------------------------------------------------------------------- real libraries


def test_transformers_round_trip(hub: LocalHub, api, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = make_tiny_bert(tmp_path / "tiny-bert")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2)
    model.save_pretrained(local)  # with its classification head, so logits must match
    api.create_repo("org/tiny-bert")
    api.upload_folder(repo_id="org/tiny-bert", folder_path=local)

    remote = AutoModelForSequenceClassification.from_pretrained("org/tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained("org/tiny-bert")
    batch = tokenizer(["the movie was good", "so bad"], padding=True, return_tensors="pt")
    model.eval()
    remote.eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(**batch).logits, model(**batch).logits)
    assert tokenizer.convert_tokens_to_ids("good") == AutoTokenizer.from_pretrained(
        local
    ).convert_tokens_to_ids("good")


def test_datasets_load_dataset_with_revision(
    hub: LocalHub, api, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import datasets

    api.create_repo("org/reviews", repo_type="dataset")
    frame = make_sentiment_frame(20)
    first = api.create_commit(
        "org/reviews",
        repo_type="dataset",
        operations=[_add("train.csv", frame.iloc[:10].to_csv(index=False))],
        commit_message="ten rows",
    )
    api.create_commit(
        "org/reviews",
        repo_type="dataset",
        operations=[_add("train.csv", frame.to_csv(index=False))],
        commit_message="twenty rows",
    )
    latest = datasets.load_dataset("org/reviews")
    assert latest["train"].num_rows == 20
    assert latest["train"].column_names == ["text", "label", "group"]
    pinned = datasets.load_dataset("org/reviews", revision=first.oid)
    assert pinned["train"].num_rows == 10


# --------------------------------------------------------------------------- access control


def test_token_protects_writes_and_private_repos(
    tmp_path: Path, aim: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    caplog.set_level(logging.INFO, logger="hubtune.hubserver")
    with LocalHub(tmp_path / "hub-root", token=TOKEN) as server:
        aim(server.url)
        owner = HfApi(endpoint=server.url, token=TOKEN)
        anonymous = HfApi(endpoint=server.url, token=False)
        intruder = HfApi(endpoint=server.url, token="wrong-token")

        owner.create_repo("org/secret", private=True)
        owner.create_commit("org/secret", operations=[_add("s.txt", "hidden")], commit_message="s")
        owner.create_repo("org/open")
        assert owner.model_info("org/secret").private is True
        assert owner.whoami()["name"] == "local"

        for client in (anonymous, intruder):
            with pytest.raises(RepositoryNotFoundError):
                client.model_info("org/secret")
            with pytest.raises(HfHubHTTPError) as err:
                client.create_repo("org/new")
            assert err.value.response.status_code == 401
            with pytest.raises(HfHubHTTPError):
                client.create_commit("org/open", operations=[_add("x", "x")], commit_message="x")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("org/secret", "s.txt", endpoint=server.url, token=False)
        assert anonymous.model_info("org/open").private is False  # public stays readable
        assert anonymous.list_repo_files("org/open") == [".gitattributes"]
        path = hf_hub_download("org/secret", "s.txt", endpoint=server.url, token=TOKEN)
        assert Path(path).read_text() == "hidden"
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text
    assert "Authorization" not in caplog.text


# --------------------------------------------------------------------------- robustness


def test_concurrent_commits_are_serialised(api) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/c")
    start = threading.Barrier(4)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def commit(index: int) -> None:
        try:
            start.wait()
            info = api.create_commit(
                "org/c", operations=[_add(f"f{index}.txt", str(index))], commit_message=f"c{index}"
            )
            results[index] = info.oid
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    history = api.list_repo_commits("org/c")
    assert len(history) == 5  # initial + 4: none lost to a race
    assert set(results.values()) == {c.commit_id for c in history[:4]}
    assert sorted(api.list_repo_files("org/c")) == [".gitattributes"] + [
        f"f{i}.txt" for i in range(4)
    ]


def _start_server_process(root: Path) -> tuple[subprocess.Popen[str], str]:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from hubtune.hubserver import LocalHub\n"
        "hub = LocalHub(Path(sys.argv[1]))\n"
        "print(hub.start(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    return proc, url


@pytest.mark.slow
def test_server_killed_mid_upload_keeps_previous_commit(
    tmp_path: Path, aim: Callable[..., None]
) -> None:
    from huggingface_hub import HfApi, snapshot_download

    root = tmp_path / "hub-root"
    proc, url = _start_server_process(root)
    try:
        aim(url)
        api = HfApi(endpoint=url, token=False)
        api.create_repo("org/k")
        before = api.create_commit("org/k", operations=[_add("a.txt", "v1")], commit_message="v1")

        # A commit whose body is never finished: one whole file line, then part of another.
        first = b"first file fully received " * 1000
        header = json.dumps({"key": "header", "value": {"summary": "doomed"}}).encode() + b"\n"
        head = header + (
            json.dumps(
                {
                    "key": "file",
                    "value": {
                        "path": "new.bin",
                        "encoding": "base64",
                        "content": base64.b64encode(first).decode(),
                    },
                }
            ).encode()
            + b"\n"
        )
        partial = b'{"key": "file", "value": {"path": "a.txt", "encoding": "base64", "content": "'
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.putrequest("POST", "/api/models/org/k/commit/main")
        conn.putheader("Content-Type", "application/x-ndjson")
        conn.putheader("Content-Length", str(50 * 1024 * 1024))  # promised, never delivered
        conn.endheaders()
        conn.send(head + partial + b"QUJD" * 5000)
        blob = (
            root
            / "repos/models/org/k/objects"
            / git_blob_sha1(first)[:2]
            / git_blob_sha1(first)[2:]
        )
        deadline = time.monotonic() + 10
        while not blob.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blob.exists(), "the server should have stored the first file's blob by now"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    proc, url = _start_server_process(root)
    try:
        aim(url, "client-cache-2")
        api = HfApi(endpoint=url, token=False)
        info = api.model_info("org/k")
        assert info.sha == before.oid
        assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "a.txt"]
        assert [c.title for c in api.list_repo_commits("org/k")] == ["v1", "initial commit"]
        snapshot = Path(snapshot_download("org/k", endpoint=url))
        assert sorted(os.listdir(snapshot)) == [".gitattributes", "a.txt"]
        assert (snapshot / "a.txt").read_text() == "v1"
        # The repo still takes commits after the crash.
        after = api.create_commit("org/k", operations=[_add("b.txt", "b")], commit_message="v2")
        assert api.model_info("org/k").sha == after.oid
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- helpers


def _request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def _raw(base_url: str, data: bytes, *, timeout: float = 10) -> bytes:
    """Send raw bytes (one request, ``Connection: close``) and read the whole raw response."""
    import socket

    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _raw_status(response: bytes) -> int:
    """The status code of a raw response (0 if there is none: connection dropped)."""
    if not response.startswith(b"HTTP/1."):
        return 0
    return int(response.split(b" ", 2)[1])


def _raw_get(base_url: str, target: str, *, headers: str = "") -> bytes:
    host = urlsplit(base_url).netloc
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
    return _raw(base_url, request.encode("latin-1"))


# --------------------------------------------------------------------------- response headers


@pytest.mark.parametrize(
    "target",
    [
        "/org/h/resolve/main/x%0dX-Injected:%20yes",  # CR in the path
        "/org/h/resolve/main/x%0aX-Injected:%20yes",  # LF in the path
        "/org/h/resolve/main/x%0d%0aX-Injected:%20yes",
        "/org/h/resolve/main%0dX-Injected:%20yes/x.txt",  # CR in the revision
        "/api/models/org/h/revision/main%0d%0aX-Injected:%20yes",
        "/api/models/org/h/tree/main%0bv%7f%00/x",  # other control characters
        "/org/h/resolve/main/%E2%82%AC%0d.txt",  # and a character latin-1 cannot encode
    ],
)
def test_control_characters_never_reach_response_headers(hub: LocalHub, api, target: str) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/h")
    response = _raw_get(hub.url, target)
    head, _, body = response.partition(b"\r\n\r\n")
    assert _raw_status(response) in (400, 404), response[:300]
    lines = head.split(b"\r\n")
    # Every header line is one CRLF-terminated line of printable characters: no line was split
    # off by a CR or LF taken from the request, and no control character survives.
    for line in lines:
        assert all(32 <= byte < 127 or byte == 9 for byte in line), line
    assert not any(line.lower().startswith(b"x-injected") for line in lines)
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert json.loads(body)["error"]  # the JSON body still says what went wrong


# --------------------------------------------------------------------------- malformed requests


def _ndjson(*items: object) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


_HEADER_LINE = {"key": "header", "value": {"summary": "s"}}
_JSON = "Content-Type: application/json\r\n"
_NDJSON = "Content-Type: application/x-ndjson\r\n"

# (id, method, target, extra header lines, body (None: no Content-Length), message fragment)
_MALFORMED: list[tuple[str, str, str, str, bytes | None, str]] = [
    (
        "commit value not an object",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson(_HEADER_LINE, {"key": "file", "value": "x"}),
        "line 2",
    ),
    (
        "commit header value not an object",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson({"key": "header", "value": [1]}),
        "header",
    ),
    (
        "commit line not an object",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson(_HEADER_LINE, [1, 2]),
        "line 2",
    ),
    (
        "commit line not UTF-8",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson(_HEADER_LINE) + b'{"key": "file", "value": {"path": "\xff"}}\n',
        "line 2",
    ),
    (
        "commit line invalid JSON",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson(_HEADER_LINE) + b'{"key": "file", \n',
        "line 2",
    ),
    (
        "commit path not a string",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson(_HEADER_LINE, {"key": "deletedFile", "value": {"path": 5}}),
        "path",
    ),
    (
        "commit summary not a string",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson({"key": "header", "value": {"summary": {"a": 1}}}),
        "summary",
    ),
    (
        "commit parentCommit not a commit id",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON,
        _ndjson({"key": "header", "value": {"summary": "s", "parentCommit": 5}}),
        "parentCommit",
    ),
    (
        "chunk size zz",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON + "Transfer-Encoding: chunked\r\n",
        b"zz\r\nabc\r\n0\r\n\r\n",
        "chunk",
    ),
    (
        "chunk size huge",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON + "Transfer-Encoding: chunked\r\n",
        b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        "chunk",
    ),
    (
        "chunk without its CRLF",
        "POST",
        "/api/models/org/bad/commit/main",
        _NDJSON + "Transfer-Encoding: chunked\r\n",
        b"3\r\nabcXY\r\n0\r\n\r\n",
        "chunk",
    ),
    (
        "Content-Length abc",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: abc\r\n",
        b"",
        "Content-Length",
    ),
    (
        "Content-Length negative",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: -5\r\n",
        b"",
        "Content-Length",
    ),
    (
        "Content-Length signed",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: +2\r\n",
        b"{}",
        "Content-Length",
    ),
    (
        "Content-Length huge",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: 99999999999999999999999999\r\n",
        b"",
        "Content-Length",
    ),
    (
        "Content-Length twice, different",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: 2\r\nContent-Length: 3\r\n",
        b"{}",
        "Content-Length",
    ),
    (
        "Content-Length and chunked",
        "POST",
        "/api/repos/create",
        _JSON + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        "Transfer-Encoding",
    ),
    (
        "Transfer-Encoding gzip",
        "POST",
        "/api/repos/create",
        _JSON + "Transfer-Encoding: gzip\r\n",
        b"",
        "Transfer-Encoding",
    ),
    (
        "GET with Content-Length abc",
        "GET",
        "/api/models/org/bad",
        "Content-Length: abc\r\n",
        b"",
        "Content-Length",
    ),
    ("create: invalid JSON", "POST", "/api/repos/create", _JSON, b'{"name": ', "JSON"),
    ("create: JSON not an object", "POST", "/api/repos/create", _JSON, b"[1]", "JSON object"),
    ("create: name not a string", "POST", "/api/repos/create", _JSON, b'{"name": 5}', "name"),
    (
        "create: organization not a string",
        "POST",
        "/api/repos/create",
        _JSON,
        b'{"name": "x", "organization": ["a"]}',
        "organization",
    ),
    (
        "paths-info: invalid JSON",
        "POST",
        "/api/models/org/bad/paths-info/main",
        _JSON,
        b"{nope",
        "JSON",
    ),
    (
        "paths-info: paths not a list",
        "POST",
        "/api/models/org/bad/paths-info/main",
        _JSON,
        b'{"paths": 5}',
        "paths",
    ),
    (
        "paths-info: form not UTF-8",
        "POST",
        "/api/models/org/bad/paths-info/main",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        b"paths=\xff",
        "UTF-8",
    ),
    (
        "preupload: file not an object",
        "POST",
        "/api/models/org/bad/preupload/main",
        _JSON,
        b'{"files": [1]}',
        "files",
    ),
    (
        "preupload: path not a string",
        "POST",
        "/api/models/org/bad/preupload/main",
        _JSON,
        b'{"files": [{"path": 5}]}',
        "path",
    ),
    (
        "preupload: size not a number",
        "POST",
        "/api/models/org/bad/preupload/main",
        _JSON,
        b'{"files": [{"path": "a", "size": "x"}]}',
        "size",
    ),
    (
        "settings: private not a boolean",
        "PUT",
        "/api/models/org/bad/settings",
        _JSON,
        b'{"private": "no"}',
        "private",
    ),
    ("tree: bad cursor", "GET", "/api/models/org/bad/tree/main?cursor=x", "", None, "cursor"),
]


@pytest.mark.parametrize(
    ("method", "target", "extra", "body", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in _MALFORMED],
)
def test_malformed_requests_get_a_400_with_a_clear_message(
    hub: LocalHub, api, method: str, target: str, extra: str, body: bytes | None, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/bad")
    head = f"{method} {target} HTTP/1.1\r\nHost: {urlsplit(hub.url).netloc}\r\n{extra}"
    if body is not None and "Content-Length" not in extra and "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    response = _raw(hub.url, (head + "Connection: close\r\n\r\n").encode() + (body or b""))
    assert _raw_status(response) == 400, response[:400]
    message = json.loads(response.partition(b"\r\n\r\n")[2])["error"]
    assert fragment.lower() in message.lower(), message
    # The server is still fine, and the repo unchanged.
    assert [c.title for c in api.list_repo_commits("org/bad")] == ["initial commit"]


# --------------------------------------------------------------------------- cross-origin writes


def _post_raw(
    base_url: str,
    target: str,
    body: bytes,
    *,
    headers: dict[str, str],
    host: str | None = None,
    method: str = "POST",
) -> tuple[int, str]:
    """A raw request with exactly these headers (and Host); returns (status, JSON error or '')."""
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {urlsplit(base_url).netloc if host is None else host}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    response = _raw(base_url, "\r\n".join(lines).encode() + body)
    payload = response.partition(b"\r\n\r\n")[2]
    try:
        error = json.loads(payload).get("error", "")
    except (ValueError, AttributeError):
        error = ""
    return _raw_status(response), str(error)


_CREATE = json.dumps({"name": "csrf", "organization": "local-user"}).encode()


@pytest.mark.parametrize(
    "headers",
    [
        # The reviewer's curl: a form-like simple request no browser preflights.
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "http://evil.example", "Content-Type": "application/json"},
        {"Origin": "null", "Content-Type": "application/json"},  # file:// pages, sandboxes
        {"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"},  # other port
        {"Origin": "https://127.0.0.1", "Content-Type": "application/json"},
        {"Referer": "http://evil.example/page.html", "Content-Type": "application/json"},
        {"Referer": "file:///tmp/page.html", "Content-Type": "application/json"},
    ],
    ids=["text-plain", "json", "null", "other-port", "https-no-port", "referer", "file-referer"],
)
def test_cross_origin_writes_are_refused(hub: LocalHub, api, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    status, error = _post_raw(hub.url, "/api/repos/create", _CREATE, headers=headers)
    assert status == 403, error
    assert "origin" in error.lower() or "referer" in error.lower()
    assert not api.repo_exists("local-user/csrf")
    # A commit and a delete from another origin are refused the same way.
    api.create_repo("org/target")
    commit = _ndjson({"key": "header", "value": {"summary": "x"}}) + _ndjson(
        {"key": "file", "value": {"path": "pwned.txt", "content": "eA==", "encoding": "base64"}}
    )
    ndjson_headers = {**headers, "Content-Type": "application/x-ndjson"}
    status, _ = _post_raw(
        hub.url, "/api/models/org/target/commit/main", commit, headers=ndjson_headers
    )
    assert status == 403
    delete = json.dumps({"name": "target", "organization": "org"}).encode()
    status, _ = _post_raw(
        hub.url,
        "/api/repos/delete",
        delete,
        headers=headers | {"Content-Type": "application/json"},
        method="DELETE",
    )
    assert status == 403
    assert api.list_repo_files("org/target") == [".gitattributes"]


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}"])
def test_same_origin_writes_are_allowed(hub: LocalHub, api, origin: str) -> None:  # type: ignore[no-untyped-def]
    port = urlsplit(hub.url).port
    headers = {"Origin": origin.format(port=port), "Content-Type": "application/json"}
    status, error = _post_raw(hub.url, "/api/repos/create", _CREATE, headers=headers)
    assert status == 200, error
    assert api.repo_exists("local-user/csrf")


@pytest.mark.parametrize(
    ("target", "content_type", "body"),
    [
        ("/api/repos/create", "text/plain", _CREATE),
        ("/api/repos/create", "application/x-www-form-urlencoded", _CREATE),
        ("/api/repos/create", "multipart/form-data; boundary=x", _CREATE),
        ("/api/repos/create", None, _CREATE),  # fetch() with a Blob body sends none
        ("/api/models/org/ct/commit/main", "application/json", b""),
        ("/api/models/org/ct/commit/main", "text/plain", b""),
        ("/api/models/org/ct/preupload/main", "text/plain", b'{"files": []}'),
        ("/api/models/org/ct/settings", "text/plain", b'{"private": true}'),
        ("/api/repos/delete", "text/plain", b'{"name": "ct", "organization": "org"}'),
    ],
)
def test_writes_need_the_content_type_the_clients_send(
    hub: LocalHub, api, target: str, content_type: str | None, body: bytes
) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/ct")
    if target.endswith("/commit/main"):
        body = _ndjson({"key": "header", "value": {"summary": "x"}}) + _ndjson(
            {"key": "file", "value": {"path": "f.txt", "content": "eA==", "encoding": "base64"}}
        )
    method = {"settings": "PUT", "delete": "DELETE"}.get(target.rsplit("/", 1)[-1], "POST")
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, error = _post_raw(hub.url, target, body, headers=headers, method=method)
    assert status == 403, error
    assert "content-type" in error.lower()
    assert not api.repo_exists("local-user/csrf")
    assert api.list_repo_files("org/ct") == [".gitattributes"]
    assert api.model_info("org/ct").private is False


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",  # DNS rebinding: a name the attacker controls, pointing here
        "evil.example",
        "127.0.0.1:1",  # the right address, another port
        "localhost.evil.example:{port}",
        "",
    ],
)
def test_requests_for_other_hosts_are_refused(hub: LocalHub, api, host: str) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/private-data")
    host = host.format(port=urlsplit(hub.url).port)
    status, error = _post_raw(
        hub.url,
        "/api/repos/create",
        _CREATE,
        headers={"Content-Type": "application/json"},
        host=host,
    )
    assert status in (400, 403) and "host" in error.lower(), error
    assert not api.repo_exists("local-user/csrf")
    status, error = _post_raw(
        hub.url, "/api/models/org/private-data", b"", headers={}, host=host, method="GET"
    )
    assert status in (400, 403) and "host" in error.lower(), error


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}"])
def test_loopback_host_names_are_accepted(hub: LocalHub, api, host: str) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/ok")
    host = host.format(port=urlsplit(hub.url).port)
    status, error = _post_raw(
        hub.url, "/api/models/org/ok", b"", headers={}, host=host, method="GET"
    )
    assert status == 200, error


def _serve_page(folder: Path) -> tuple[Callable[[], None], str]:
    """Serve ``folder`` on another loopback port (another origin); returns (stop, base URL)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop, f"http://127.0.0.1:{server.server_address[1]}"


_ATTACK_JS = """async (hub) => {
  const results = [];
  const attempt = async (label, url, init) => {
    try { const r = await fetch(url, init); results.push(label + ':' + r.status); }
    catch (e) { results.push(label + ':blocked'); }
  };
  const create = JSON.stringify({name: 'csrf', organization: 'local-user'});
  await attempt('text', hub + '/api/repos/create', {method: 'POST', body: create,
      headers: {'Content-Type': 'text/plain'}});
  await attempt('no-cors', hub + '/api/repos/create', {method: 'POST', mode: 'no-cors',
      body: new Blob([create])});
  const commit = JSON.stringify({key: 'header', value: {summary: 'pwned'}}) + '\\n' +
      JSON.stringify({key: 'file', value: {path: 'pwned.txt', content: 'eA==', encoding: 'base64'}});
  await attempt('commit', hub + '/api/models/org/victim/commit/main', {method: 'POST',
      mode: 'no-cors', body: commit, headers: {'Content-Type': 'text/plain'}});
  await attempt('json', hub + '/api/repos/create', {method: 'POST', body: create,
      headers: {'Content-Type': 'application/json'}});
  // A classic form post, too: navigation, no CORS at all.
  const form = document.createElement('form');
  form.method = 'POST'; form.action = hub + '/api/repos/create'; form.enctype = 'text/plain';
  const input = document.createElement('input');
  input.name = '{"name": "csrf-form", "organization": "local-user", "x": "';
  input.value = '"}';
  form.appendChild(input); document.body.appendChild(form);
  return results;
}"""


@pytest.mark.parametrize("page_origin", ["file", "other-port"])
def test_a_browser_page_elsewhere_cannot_write(
    hub: LocalHub, api, tmp_path: Path, page_origin: str
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import chromium

    api.create_repo("org/victim")
    site = tmp_path / "site"
    site.mkdir()
    (site / "attack.html").write_text("<!doctype html><title>attack</title><body></body>")
    stop: Callable[[], None] = lambda: None  # noqa: E731
    if page_origin == "file":
        page_url = (site / "attack.html").as_uri()
    else:
        stop, base = _serve_page(site)
        page_url = f"{base}/attack.html"
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(page_url)
            results = page.evaluate(_ATTACK_JS, hub.url)
            with page.expect_navigation(timeout=10_000):
                page.evaluate("() => document.forms[0].submit()")
            page.close()
    finally:
        stop()
    # Whatever the browser let through, the hub refused it: nothing was created or committed.
    assert not api.repo_exists("local-user/csrf"), results
    assert not api.repo_exists("local-user/csrf-form"), results
    assert api.list_repo_files("org/victim") == [".gitattributes"], results


# --------------------------------------------------------------------------- resource bounds


def _stored_blobs(root: Path, repo: str) -> set[str]:
    objects = root / "repos" / "models" / repo / "objects"
    return {p.parent.name + p.name for p in objects.glob("*/*")}


def test_refused_commits_leave_no_blobs_behind(hub: LocalHub, api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    api.create_repo("org/gc")
    head = api.model_info("org/gc").sha
    api.create_commit("org/gc", operations=[_add("kept.txt", "kept")], commit_message="one")
    before = _stored_blobs(hub.root, "org/gc")
    with pytest.raises(HfHubHTTPError) as err:  # stale parent: 412
        api.create_commit(
            "org/gc",
            operations=[_add("new.txt", "never committed"), _add("again.txt", "kept")],
            commit_message="stale",
            parent_commit=head,
        )
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):  # a missing file to delete: 404
        api.create_commit(
            "org/gc",
            operations=[_add("other.txt", "also never"), CommitOperationDelete("missing.txt")],
            commit_message="bad delete",
        )
    # The refused commits' new blobs are gone; a blob a real commit uses ("kept") stays.
    assert _stored_blobs(hub.root, "org/gc") == before
    assert git_blob_sha1(b"kept") in before
    assert git_blob_sha1(b"never committed") not in before
    path = api.hf_hub_download("org/gc", "kept.txt")
    assert Path(path).read_text() == "kept"


def _closed_by_server(sock: object, *, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    import socket

    assert isinstance(sock, socket.socket)
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass  # an error answer before the close is fine
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_idle_connections_time_out_and_extra_ones_get_a_503(tmp_path: Path) -> None:
    import socket

    with LocalHub(tmp_path / "hub-root", read_timeout_s=2.5, max_connections=4) as server:
        parts = urlsplit(server.url)
        address = (parts.hostname, parts.port)
        idle = [socket.create_connection(address, timeout=10) for _ in range(3)]
        half = socket.create_connection(address, timeout=10)
        half.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x")  # a request never finished
        time.sleep(0.3)  # let the server take all four
        try:
            # A fifth connection is over the cap: answered 503 at once, not queued or held.
            started = time.monotonic()
            extra = _raw_get(server.url, "/api/whoami-v2")
            assert _raw_status(extra) == 503, extra[:200]
            assert time.monotonic() - started < 1.0
            assert b"Retry-After" in extra
            # The idle and half-open connections are closed by the server after the read
            # timeout, freeing their slots.
            for sock in [*idle, half]:
                assert _closed_by_server(sock, within=5.0)
        finally:
            for sock in [*idle, half]:
                sock.close()
        time.sleep(0.2)
        assert _raw_status(_raw_get(server.url, "/api/whoami-v2")) == 200


@pytest.mark.parametrize(
    ("header", "status", "fragment"),
    [
        ({"summary": "s" * 1001}, 400, "summary"),
        ({"summary": "s", "description": "d" * 65_537}, 400, "description"),
        ({"summary": "s", "description": "d" * (2 << 20)}, 413, "header"),  # the line itself
    ],
    ids=["summary", "description", "header-line"],
)
def test_commit_messages_are_bounded(
    hub: LocalHub, api, header: dict[str, str], status: int, fragment: str
) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/msg")
    body = _ndjson(
        {"key": "header", "value": header},
        {"key": "file", "value": {"path": "a.txt", "content": "eA==", "encoding": "base64"}},
    )
    got, error = _post_raw(
        hub.url,
        "/api/models/org/msg/commit/main",
        body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert got == status and fragment in error.lower(), error
    assert api.list_repo_files("org/msg") == [".gitattributes"]
    # Right at the limits, a commit is fine.
    info = api.create_commit(
        "org/msg",
        operations=[_add("a.txt", "x")],
        commit_message="s" * 1000,
        commit_description="d" * 65_536,
    )
    assert api.list_repo_commits("org/msg")[0].commit_id == info.oid


# --------------------------------------------------------------------------- branches, tags, refs


def test_branches_commits_and_downloads(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import BadRequestError, HfHubHTTPError, RevisionNotFoundError

    api.create_repo("org/b")
    first = api.create_commit("org/b", operations=[_add("a.txt", "v1")], commit_message="v1")
    refs = api.list_repo_refs("org/b")
    assert [(r.name, r.ref, r.target_commit) for r in refs.branches] == [
        ("main", "refs/heads/main", first.oid)
    ]
    assert refs.tags == [] and refs.converts == []
    assert api.list_repo_refs("org/b", include_pull_requests=True).pull_requests == []

    api.create_branch("org/b", branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("org/b", branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch("org/b", branch="dev", exist_ok=True)
    on_dev = api.upload_file(
        path_or_fileobj=b"dev only", path_in_repo="b.txt", repo_id="org/b", revision="dev"
    )
    assert api.list_repo_files("org/b") == [".gitattributes", "a.txt"]  # main untouched
    assert api.list_repo_files("org/b", revision="dev") == [".gitattributes", "a.txt", "b.txt"]
    assert api.model_info("org/b", revision="dev").sha == on_dev.oid
    assert Path(hf_hub_download("org/b", "b.txt", revision="dev")).read_text() == "dev only"
    snapshot = Path(snapshot_download("org/b", revision="dev"))
    assert (snapshot / "b.txt").read_text() == "dev only"
    assert [c.title for c in api.list_repo_commits("org/b", revision="dev")][:2] == [
        "Upload b.txt with huggingface_hub",
        "v1",
    ]

    # A branch with a slash, from an older commit; then a commit on it with parent_commit.
    api.create_branch("org/b", branch="feature/x", revision=first.oid)
    feature = api.create_commit(
        "org/b",
        operations=[_add("c.txt", "c")],
        commit_message="feature",
        revision="feature/x",
        parent_commit=first.oid,
    )
    branches = {r.name: r.target_commit for r in api.list_repo_refs("org/b").branches}
    assert branches == {"main": first.oid, "dev": on_dev.oid, "feature/x": feature.oid}
    assert Path(hf_hub_download("org/b", "c.txt", revision="feature/x")).read_text() == "c"

    with pytest.raises(BadRequestError):
        api.create_branch("org/b", branch="refs/pr/1")
    with pytest.raises(BadRequestError):
        api.create_branch("org/b", branch="bad..name")
    with pytest.raises(RevisionNotFoundError):
        api.create_branch("org/b", branch="from-nowhere", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="org/b", revision="nope")

    api.delete_branch("org/b", branch="dev")
    assert {r.name for r in api.list_repo_refs("org/b").branches} == {"main", "feature/x"}
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/b", revision="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.delete_branch("org/b", branch="dev")
    assert err.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as err:
        api.delete_branch("org/b", branch="main")
    assert err.value.response.status_code in (400, 403)
    assert "default branch" in str(err.value)


def test_tags_and_short_shas_are_revisions(api, hub: LocalHub) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api.create_repo("org/t")
    v1 = api.create_commit("org/t", operations=[_add("a.txt", "one")], commit_message="v1")
    v2 = api.create_commit("org/t", operations=[_add("a.txt", "two")], commit_message="v2")
    api.create_tag("org/t", tag="v1.0", revision=v1.oid, tag_message="first release")
    api.create_tag("org/t", tag="latest")  # main, by default
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("org/t", tag="v1.0")
    assert err.value.response.status_code == 409
    api.create_tag("org/t", tag="v1.0", exist_ok=True)
    tags = {r.name: (r.ref, r.target_commit) for r in api.list_repo_refs("org/t").tags}
    assert tags == {"v1.0": ("refs/tags/v1.0", v1.oid), "latest": ("refs/tags/latest", v2.oid)}

    assert api.model_info("org/t", revision="v1.0").sha == v1.oid
    assert api.list_repo_commits("org/t", revision="v1.0")[0].commit_id == v1.oid
    assert Path(hf_hub_download("org/t", "a.txt", revision="v1.0")).read_text() == "one"
    assert api.model_info("org/t", revision="refs/tags/v1.0").sha == v1.oid
    assert api.model_info("org/t", revision="refs/heads/main").sha == v2.oid
    # Tags are not branches: no commits onto them.
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("org/t", operations=[_add("x", "x")], commit_message="x", revision="v1.0")

    # Short SHAs: a unique prefix of 7 or more hex digits.
    for prefix in (v1.oid[:7], v1.oid[:12], v1.oid[:39]):
        assert api.model_info("org/t", revision=prefix).sha == v1.oid
    assert Path(hf_hub_download("org/t", "a.txt", revision=v1.oid[:8])).read_text() == "one"
    status, _, headers = _request(hub.url, "HEAD", f"/org/t/resolve/{v1.oid[:7]}/a.txt")
    assert status == 200 and headers["x-repo-commit"] == v1.oid
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/t", revision=v1.oid[:6])  # too short to mean a commit
    # An ambiguous prefix names no commit.
    commits = hub.root / "repos/models/org/t/commits"
    twin = commits / (v1.oid[:7] + "f" * 33 + ".json")
    if not twin.exists():
        twin.write_bytes((commits / f"{v1.oid}.json").read_bytes())
        with pytest.raises(RevisionNotFoundError, match="ambiguous"):
            api.model_info("org/t", revision=v1.oid[:7])
        twin.unlink()

    api.delete_tag("org/t", tag="v1.0")
    assert [r.name for r in api.list_repo_refs("org/t").tags] == ["latest"]
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/t", revision="v1.0")


def test_list_repos_with_author_and_search(api) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/bert-small")
    api.create_repo("org/bert-large")
    api.create_repo("other/gpt-tiny")
    api.create_repo("org/reviews", repo_type="dataset")
    api.create_repo("other/bert-data", repo_type="dataset")
    api.create_repo("org/demo", repo_type="space", space_sdk="gradio")
    api.upload_file(
        path_or_fileobj=b"---\ntags: [hubtune]\n---\n",
        path_in_repo="README.md",
        repo_id="org/bert-small",
    )

    def ids(items) -> list[str]:  # type: ignore[no-untyped-def]
        return sorted(i.id for i in items)

    assert ids(api.list_models()) == ["org/bert-large", "org/bert-small", "other/gpt-tiny"]
    assert ids(api.list_models(author="org")) == ["org/bert-large", "org/bert-small"]
    assert ids(api.list_models(search="bert")) == ["org/bert-large", "org/bert-small"]
    assert ids(api.list_models(search="GPT")) == ["other/gpt-tiny"]  # case-insensitive
    assert ids(api.list_models(author="other", search="bert")) == []
    assert len(list(api.list_models(limit=1))) == 1
    assert ids(api.list_models(filter="hubtune")) == ["org/bert-small"]
    (small,) = [m for m in api.list_models(author="org", full=True) if m.id == "org/bert-small"]
    assert small.sha == api.model_info("org/bert-small").sha
    assert {s.rfilename for s in small.siblings or []} == {".gitattributes", "README.md"}
    assert ids(api.list_datasets(author="org")) == ["org/reviews"]
    assert ids(api.list_datasets(search="bert")) == ["other/bert-data"]
    assert ids(api.list_spaces(author="org")) == ["org/demo"]
    assert ids(api.list_spaces(search="nothing")) == []


def test_pull_requests_are_refused_clearly(api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub.errors import BadRequestError

    api.create_repo("org/pr")
    with pytest.raises(BadRequestError, match="[Pp]ull requests are not supported by the local"):
        api.create_pull_request("org/pr", title="please merge")
    with pytest.raises(BadRequestError, match="[Pp]ull requests are not supported by the local"):
        api.create_commit(
            "org/pr", operations=[_add("a.txt", "a")], commit_message="pr", create_pr=True
        )
    with pytest.raises(BadRequestError, match="not supported by the local"):
        api.create_discussion("org/pr", title="a question")
    assert api.list_repo_files("org/pr") == [".gitattributes"]


# --------------------------------------------------------------------------- Git LFS


def _lfs_records(root: Path, repo: str) -> dict[str, dict[str, object]]:
    """The manifest of a repo's head commit, as stored (server-side record of LFS files)."""
    folder = root / "repos" / "models" / repo
    head = (folder / "refs" / "heads" / "main").read_text().strip()
    files: dict[str, dict[str, object]] = json.loads(
        (folder / "commits" / f"{head}.json").read_text()
    )["files"]
    return files


def test_large_files_go_through_lfs_and_download_bit_identical(
    hub: LocalHub, api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from huggingface_hub import hf_hub_download, snapshot_download

    caplog.set_level(logging.INFO, logger="hubtune.hubserver")
    api.create_repo("org/big")
    rng = np.random.default_rng(0)
    big = rng.bytes((10 << 20) + 1)  # just above the 10 MiB threshold
    weights = rng.bytes(4096)  # small, but *.safetensors: LFS by .gitattributes
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "data.txt").write_bytes(big)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "notes.txt").write_text("small and inline")
    info = api.upload_folder(repo_id="org/big", folder_path=folder)

    records = _lfs_records(hub.root, "org/big")
    assert records["data.txt"]["lfs"] == hashlib.sha256(big).hexdigest()
    assert records["model.safetensors"]["lfs"] == hashlib.sha256(weights).hexdigest()
    assert "lfs" not in records["notes.txt"]
    # Through the LFS batch API and one plain PUT per object (no multipart), never inline.
    puts = [
        r.getMessage()
        for r in caplog.records
        if '"PUT /org/big.git/info/lfs/objects/' in r.getMessage()
    ]
    assert len(puts) == 2
    assert all("signature=<redacted>" in put for put in puts)  # the link's authority stays out
    assert sum("LFS upload of" in r.getMessage() for r in caplog.records) == 2
    assert not (hub.root / "repos/models/org/big/objects" / git_blob_sha1(big)[:2]).exists()

    # The clients see what the Hub shows for LFS files...
    entries = {e.path: e for e in api.list_repo_tree("org/big")}
    assert entries["data.txt"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert entries["data.txt"].size == len(big) and entries["notes.txt"].lfs is None
    sibling = {s.rfilename: s for s in api.model_info("org/big").siblings or []}["data.txt"]
    assert sibling.lfs is not None and sibling.lfs.size == len(big)
    status, _, headers = _request(hub.url, "HEAD", "/org/big/resolve/main/data.txt")
    assert status == 200
    assert headers["x-linked-etag"] == headers["etag"] == f'"{hashlib.sha256(big).hexdigest()}"'
    assert headers["x-linked-size"] == headers["content-length"] == str(len(big))
    # ... and download the same bytes, whole, in ranges, and in a snapshot.
    assert Path(hf_hub_download("org/big", "data.txt")).read_bytes() == big
    status, body, _ = _request(
        hub.url, "GET", "/org/big/resolve/main/data.txt", headers={"Range": "bytes=1000-1999"}
    )
    assert status == 206 and body == big[1000:2000]
    snapshot = Path(snapshot_download("org/big", revision=info.oid))
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert (snapshot / "notes.txt").read_text() == "small and inline"

    # Uploading the same content again skips the transfer (the object is already stored).
    again = api.upload_file(path_or_fileobj=big, path_in_repo="copy.txt", repo_id="org/big")
    assert _lfs_records(hub.root, "org/big")["copy.txt"]["lfs"] == records["data.txt"]["lfs"]
    assert sum("LFS upload of" in r.getMessage() for r in caplog.records) == 2
    assert api.model_info("org/big").sha == again.oid


def _lfs_batch(
    hub: LocalHub, repo: str, oid: str, size: int, headers: dict[str, str] | None = None
):  # type: ignore[no-untyped-def]
    payload = {
        "operation": "upload",
        "transfers": ["basic", "multipart"],
        "objects": [{"oid": oid, "size": size}],
        "hash_algo": "sha256",
    }
    return _request(
        hub.url,
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        json.dumps(payload).encode(),
        headers={"Content-Type": "application/vnd.git-lfs+json", **(headers or {})},
    )


def test_corrupt_or_forged_lfs_uploads_store_nothing(hub: LocalHub, api) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    api.create_repo("org/lfs")
    data = os.urandom(100_000)
    oid = hashlib.sha256(data).hexdigest()
    status, body, _ = _lfs_batch(hub, "org/lfs", oid, len(data))
    assert status == 200
    (answer,) = json.loads(body)["objects"]
    href = urlsplit(answer["actions"]["upload"]["href"])
    assert "chunk_size" not in answer["actions"]["upload"].get("header", {})  # no multipart
    target = f"{href.path}?{href.query}"
    lfs_dir = hub.root / "repos/models/org/lfs/lfs"

    def stored() -> list[Path]:
        return [p for p in [*lfs_dir.rglob("*"), *(hub.root / "tmp").rglob("*")] if p.is_file()]

    corrupt = bytearray(data)
    corrupt[500] ^= 0xFF
    status, body, _ = _request(hub.url, "PUT", target, bytes(corrupt))
    assert status == 400 and "sha256" in json.loads(body)["error"]
    status, body, _ = _request(hub.url, "PUT", target, data + b"extra")
    assert status == 400
    status, body, _ = _request(hub.url, "PUT", target.replace("signature=", "signature=0"), data)
    assert status == 403
    forged = target.replace(f"size={len(data)}", f"size={len(data) + 1}")
    status, body, _ = _request(hub.url, "PUT", forged, data + b"x")
    assert status == 403
    assert stored() == []
    # A commit cannot reference the object that never arrived.
    commit = _ndjson(
        {"key": "header", "value": {"summary": "x"}},
        {
            "key": "lfsFile",
            "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)},
        },
    )
    status, body, _ = _request(
        hub.url,
        "POST",
        "/api/models/org/lfs/commit/main",
        commit,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400 and "not uploaded" in json.loads(body)["error"]
    # The right bytes are taken, verified, and then committable.
    status, _, _ = _request(hub.url, "PUT", target, data)
    assert status == 200
    verify = json.dumps({"oid": oid, "size": len(data)}).encode()
    status, _, _ = _request(
        hub.url,
        "POST",
        "/org/lfs.git/info/lfs/verify",
        verify,
        headers={"Content-Type": "application/json"},
    )
    assert status == 200
    status, body, _ = _request(
        hub.url,
        "POST",
        "/api/models/org/lfs/commit/main",
        commit,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 200, body
    assert Path(api.hf_hub_download("org/lfs", "w.bin")).read_bytes() == data


def test_lfs_writes_need_the_token(tmp_path: Path, aim: Callable[..., None]) -> None:
    import hashlib

    from huggingface_hub import HfApi

    with LocalHub(tmp_path / "hub-root", token=TOKEN) as server:
        aim(server.url)
        owner = HfApi(endpoint=server.url, token=TOKEN)
        owner.create_repo("org/open-lfs")  # public: only the token check can refuse
        data = os.urandom(1000)
        oid = hashlib.sha256(data).hexdigest()
        verify = json.dumps({"oid": oid, "size": len(data)}).encode()
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            status, _, _ = _lfs_batch(server, "org/open-lfs", oid, len(data), headers=auth)  # type: ignore[arg-type]
            assert status == 401
            status, _, _ = _request(
                server.url,
                "POST",
                "/org/open-lfs.git/info/lfs/verify",
                verify,
                headers={"Content-Type": "application/json", **auth},
            )
            assert status == 401
        # The owner's upload goes through (the signed PUT carries no token, as on the Hub),
        # also to a private repo.
        owner.create_repo("org/secret-lfs", private=True)
        owner.upload_file(
            path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="org/secret-lfs"
        )
        path = owner.hf_hub_download("org/secret-lfs", "w.safetensors")
        assert Path(path).read_bytes() == data
        status, _, _ = _request(server.url, "GET", "/org/secret-lfs/resolve/main/w.safetensors")
        assert status == 404  # private: no token, no file


def test_xet_clients_are_told_how_to_use_lfs(hub: LocalHub) -> None:
    status, body, headers = _request(hub.url, "GET", "/api/models/org/any/xet-write-token/main")
    assert status == 400
    assert "HF_HUB_DISABLE_XET=1" in json.loads(body)["error"]


def test_lfs_can_be_turned_off(tmp_path: Path, aim: Callable[..., None]) -> None:
    from huggingface_hub import HfApi

    with LocalHub(tmp_path / "hub-root", lfs_threshold=None) as server:
        aim(server.url)
        api = HfApi(endpoint=server.url, token=False)
        api.create_repo("org/inline")
        data = os.urandom(50_000)
        api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="org/inline")
        files = _lfs_records(server.root, "org/inline")
        assert files["w.safetensors"] == {"oid": git_blob_sha1(data), "size": len(data)}


@pytest.mark.parametrize(
    ("path", "size", "expected"),
    [
        ("small.txt", 10, False),
        ("big.txt", 10 << 20, True),
        ("nested/dir/model.safetensors", 10, True),
        ("weights.bin", 1, True),
        ("empty.safetensors", 0, False),  # empty files are always inline
        ("data/train.parquet", 100, True),
        ("only/here.md", 5, True),  # a pattern with a slash matches the whole path
        ("elsewhere/only/here.md", 5, False),
        ("unset.bin.txt", 5, False),
    ],
)
def test_which_files_go_through_lfs(path: str, size: int, expected: bool) -> None:
    from hubtune.hubserver.lfs import lfs_patterns, wants_lfs
    from hubtune.hubserver.storage import GITATTRIBUTES

    patterns = lfs_patterns(
        GITATTRIBUTES
        + b"/only/here.md filter=lfs\n# comment\n*.bin.txt filter=lfs\n*.bin.txt -filter\n"
    )
    assert wants_lfs(path, size, patterns=patterns, threshold=10 << 20) is expected
    assert wants_lfs(path, size, patterns=patterns, threshold=None) is False


# --------------------------------------------------------------------------- path validation

# Paths that could leave the repo (or the storage root) once a client or a server joins them
# to a folder, or that git itself refuses. JSON bodies carry them as they are; URLs carry them
# percent-encoded, and once more encoded, since a second decoding is a classic bypass.
_BAD_PATHS = [
    "../../escape.txt",
    "..",
    "a/../../escape.txt",
    "/etc/escape.txt",
    ".git/config",
    "sub/.git/hooks/x",
    "%2e%2e/%2e%2e/escape.txt",
    "%2E%2E%2Fescape.txt",
    "..\\..\\escape.txt",
    "a\\b.txt",
    "nul\x00.txt",
    "cr\r.txt",
    "a//b.txt",
    "./a.txt",
]


def _assert_nothing_escaped(tmp_path: Path, root: Path) -> None:
    outside = [
        p
        for p in tmp_path.rglob("*escape*")
        if root not in p.parents and "client-cache" not in p.parts
    ]
    assert outside == [], outside


@pytest.mark.parametrize("bad", _BAD_PATHS)
@pytest.mark.parametrize("key", ["file", "lfsFile", "deletedFile", "deletedFolder"])
def test_commit_paths_are_validated(hub: LocalHub, api, tmp_path: Path, key: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    api.create_repo("org/paths")
    value: dict[str, object] = {"path": bad}
    if key == "file":
        value |= {"content": base64.b64encode(b"escaped").decode(), "encoding": "base64"}
    elif key == "lfsFile":  # an object that is stored, so only the path can be refused
        api.upload_file(
            path_or_fileobj=b"weights", path_in_repo="ok.safetensors", repo_id="org/paths"
        )
        value |= {"algo": "sha256", "oid": hashlib.sha256(b"weights").hexdigest(), "size": 7}
    body = _ndjson({"key": "header", "value": {"summary": "escape"}}, {"key": key, "value": value})
    before = api.list_repo_files("org/paths")
    status, error = _post_raw(
        hub.url,
        "/api/models/org/paths/commit/main",
        body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400 and "path" in error.lower(), (status, error)
    assert api.list_repo_files("org/paths") == before
    _assert_nothing_escaped(tmp_path, hub.root)


@pytest.mark.parametrize("bad", _BAD_PATHS)
def test_preupload_paths_are_validated(hub: LocalHub, api, bad: str) -> None:  # type: ignore[no-untyped-def]
    api.create_repo("org/paths")
    body = json.dumps({"files": [{"path": bad, "size": 1, "sample": ""}]}).encode()
    status, error = _post_raw(
        hub.url,
        "/api/models/org/paths/preupload/main",
        body,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "path" in error.lower(), (status, error)


@pytest.mark.parametrize("bad", _BAD_PATHS)
@pytest.mark.parametrize("route", ["resolve", "tree", "paths-info"])
def test_read_paths_are_validated(hub: LocalHub, api, route: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    from urllib.parse import quote

    api.create_repo("org/paths")
    api.create_commit("org/paths", operations=[_add("dir/a.txt", "a")], commit_message="a")
    for encoded in {
        quote(bad, safe="/"),
        quote(quote(bad, safe="/"), safe="/"),
        quote(bad, safe=""),
    }:
        if route == "paths-info":
            form = f"paths={quote(bad, safe='')}&expand=false".encode()
            status, error = _post_raw(
                hub.url,
                "/api/models/org/paths/paths-info/main",
                form,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        else:
            prefix = (
                "/org/paths/resolve/main/"
                if route == "resolve"
                else "/api/models/org/paths/tree/main/"
            )
            status, error = _post_raw(hub.url, prefix + encoded, b"", headers={}, method="GET")
        assert status == 400 and "path" in error.lower(), (encoded, status, error)


# --------------------------------------------------------------------------- tokens


def _token_hub(tmp_path: Path, aim: Callable[..., None]):  # type: ignore[no-untyped-def]
    """A hub with a token, a public repo (org/pub: branch dev, tag v0) and a private one."""
    from huggingface_hub import HfApi

    server = LocalHub(tmp_path / "hub-root", token=TOKEN)
    server.start()
    aim(server.url)
    owner = HfApi(endpoint=server.url, token=TOKEN)
    owner.create_repo("org/pub")
    owner.create_branch("org/pub", branch="dev")
    owner.create_tag("org/pub", tag="v0")
    owner.create_repo("org/priv", private=True)
    owner.create_commit("org/priv", operations=[_add("s.txt", "secret")], commit_message="s")
    return server, owner


_PUB_COMMIT = _ndjson(
    {"key": "header", "value": {"summary": "x"}},
    {"key": "file", "value": {"path": "x.txt", "content": "eA==", "encoding": "base64"}},
)
_JSON_CT = {"Content-Type": "application/json"}
_LFS_CT = {"Content-Type": "application/vnd.git-lfs+json"}
_LFS_BATCH_BODY = json.dumps(
    {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": "a" * 64, "size": 1}]}
).encode()

# (method, target, headers, body) of every write route, on the public repo.
_WRITES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/api/repos/create", _JSON_CT, b'{"name": "new", "organization": "org"}'),
    ("DELETE", "/api/repos/delete", _JSON_CT, b'{"name": "pub", "organization": "org"}'),
    ("PUT", "/api/models/org/pub/settings", _JSON_CT, b'{"private": true}'),
    (
        "POST",
        "/api/models/org/pub/preupload/main",
        _JSON_CT,
        b'{"files": [{"path": "x.txt", "size": 1}]}',
    ),
    (
        "POST",
        "/api/models/org/pub/commit/main",
        {"Content-Type": "application/x-ndjson"},
        _PUB_COMMIT,
    ),
    ("POST", "/api/models/org/pub/branch/new", _JSON_CT, b"{}"),
    ("DELETE", "/api/models/org/pub/branch/dev", {}, b""),
    ("POST", "/api/models/org/pub/tag/main", _JSON_CT, b'{"tag": "v1"}'),
    ("DELETE", "/api/models/org/pub/tag/v0", {}, b""),
    ("POST", "/org/pub.git/info/lfs/objects/batch", _LFS_CT, _LFS_BATCH_BODY),
    (
        "POST",
        "/org/pub.git/info/lfs/verify",
        _JSON_CT,
        json.dumps({"oid": "a" * 64, "size": 1}).encode(),
    ),
]


@pytest.mark.parametrize(
    "auth", [{}, {"Authorization": "Bearer wrong-token"}], ids=["missing", "wrong"]
)
@pytest.mark.parametrize(
    ("method", "target", "headers", "body"), _WRITES, ids=[f"{m} {t}" for m, t, _, _ in _WRITES]
)
def test_every_write_needs_the_token(
    tmp_path: Path,
    aim: Callable[..., None],
    auth: dict[str, str],
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    server, owner = _token_hub(tmp_path, aim)
    try:
        state = (
            owner.list_repo_files("org/pub"),
            owner.list_repo_refs("org/pub"),
            owner.model_info("org/pub").private,
        )
        status, error = _post_raw(server.url, target, body, headers=headers | auth, method=method)
        assert status == 401, (status, error)
        assert owner.repo_exists("org/pub") and not owner.repo_exists("org/new")
        after = (
            owner.list_repo_files("org/pub"),
            owner.list_repo_refs("org/pub"),
            owner.model_info("org/pub").private,
        )
        assert after == state
        # The owner's token is accepted on the same route (not a 401).
        status, error = _post_raw(
            server.url,
            target,
            body,
            headers=headers | {"Authorization": f"Bearer {TOKEN}"},
            method=method,
        )
        assert status != 401, error
    finally:
        server.stop()


_PRIVATE_READS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/api/models/org/priv", {}, b""),
    ("GET", "/api/models/org/priv/revision/main", {}, b""),
    ("GET", "/api/models/org/priv/tree/main", {}, b""),
    (
        "POST",
        "/api/models/org/priv/paths-info/main",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"paths=s.txt",
    ),
    ("GET", "/api/models/org/priv/commits/main", {}, b""),
    ("GET", "/api/models/org/priv/refs", {}, b""),
    ("GET", "/org/priv/resolve/main/s.txt", {}, b""),
    ("HEAD", "/org/priv/resolve/main/s.txt", {}, b""),
]


@pytest.mark.parametrize(
    "auth", [{}, {"Authorization": "Bearer wrong-token"}], ids=["missing", "wrong"]
)
@pytest.mark.parametrize(
    ("method", "target", "headers", "body"),
    _PRIVATE_READS,
    ids=[f"{m} {t}" for m, t, _, _ in _PRIVATE_READS],
)
def test_private_repos_need_the_token_on_every_read(
    tmp_path: Path,
    aim: Callable[..., None],
    auth: dict[str, str],
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    server, _ = _token_hub(tmp_path, aim)
    try:
        status, error = _post_raw(server.url, target, body, headers=headers | auth, method=method)
        assert status == 404, (status, error)
        status, error = _post_raw(
            server.url,
            target,
            body,
            headers=headers | {"Authorization": f"Bearer {TOKEN}"},
            method=method,
        )
        assert status == 200, (status, error)
    finally:
        server.stop()


def test_private_repos_are_not_listed_without_the_token(
    tmp_path: Path, aim: Callable[..., None]
) -> None:
    from huggingface_hub import HfApi

    server, owner = _token_hub(tmp_path, aim)
    try:
        for client in (
            HfApi(endpoint=server.url, token=False),
            HfApi(endpoint=server.url, token="wrong"),
        ):
            assert sorted(m.id for m in client.list_models(author="org")) == ["org/pub"]
        assert sorted(m.id for m in owner.list_models(author="org")) == ["org/priv", "org/pub"]
    finally:
        server.stop()


def test_commit_ids_do_not_depend_on_lfs(tmp_path: Path, aim: Callable[..., None]) -> None:
    """Recipes pin commit SHAs of seeded repos: a file must count by its content, not by how it
    was uploaded (LFS or inline), or every pin made before LFS breaks."""
    from huggingface_hub import HfApi

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(50_000))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    shas = []
    for threshold in (10 << 20, None):
        with LocalHub(tmp_path / f"hub-{threshold}", lfs_threshold=threshold) as server:
            aim(server.url, f"cache-{threshold}")
            api = HfApi(endpoint=server.url, token=False)
            api.create_repo("org/pinned")
            shas.append(
                api.upload_folder(repo_id="org/pinned", folder_path=folder, commit_message="m").oid
            )
            stored = _lfs_records(server.root, "org/pinned")["model.safetensors"]
            assert ("lfs" in stored) is (threshold is not None)
            assert stored["oid"] == git_blob_sha1((folder / "model.safetensors").read_bytes())
    assert shas[0] == shas[1]


# --------------------------------------------------------------------------- validation, unit level
# Focused checks of the path, name and revision validation and of the token check, without a
# client (bench/mutation.py runs them per mutant). They name the server's own functions: after
# the server rewrite, point them at their successors.


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "a\\b",
        "a\0b",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "../a",
        "a/../b",
        ".git",
        "a/.git/config",
    ],
)
def test_repo_paths_that_could_escape_are_refused(path: str) -> None:
    from hubtune.hubserver.storage import HubError, validate_repo_path

    with pytest.raises(HubError, match=r"^Invalid path in repo: ") as info:
        validate_repo_path(path)
    assert info.value.status == 400 and info.value.message == f"Invalid path in repo: {path!r}"


@pytest.mark.parametrize(
    "path", ["a", "README.md", "a/b/c.bin", ".gitattributes", "a..b/.hidden", "..a"]
)
def test_plain_repo_paths_are_accepted_unchanged(path: str) -> None:
    from hubtune.hubserver.storage import validate_repo_path

    assert validate_repo_path(path) == path


def test_repo_types_and_ids_are_validated(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore

    store = RepoStore(tmp_path)
    for repo_type in ("model", "dataset", "space"):
        ref = store.locate(repo_type, "org-1/name_2.v3")
        assert (ref.repo_type, ref.repo_id) == (repo_type, "org-1/name_2.v3")
        assert ref.path == tmp_path / "repos" / f"{repo_type}s" / "org-1" / "name_2.v3"
    assert store.locate("model", f"o/{'n' * 96}").repo_id == f"o/{'n' * 96}"
    with pytest.raises(HubError, match=r"^Invalid repo type: 'models'$") as info:
        store.locate("models", "o/n")
    assert info.value.status == 400
    for repo_id in (
        "o",
        "o/n/x",
        "/n",
        "o/",
        ".o/n",
        "o/-n",
        "o/.n",
        "o/a..b",
        "o/n m",
        f"o/{'n' * 97}",
        "../n",
        "o/..",
    ):
        with pytest.raises(HubError, match=r"expected 'org/name'$") as info:
            store.locate("model", repo_id)
        assert (
            info.value.status == 400
            and info.value.message == f"Invalid repo id {repo_id!r}: expected 'org/name'"
        )


def test_revisions_resolve_to_branches_or_full_shas_only(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore

    store = RepoStore(tmp_path)
    repo = store.locate("model", "o/n")
    with pytest.raises(HubError, match=r"^Repository not found"):  # no repo: that first
        store.resolve(repo, "main")
    store.create(repo, private=False)
    head = store.head(repo)
    assert head is not None and store.head(repo, "main") == head and len(head) == 40
    commit = store.resolve(repo, "main")
    assert commit.id == head and store.resolve(repo, head).id == head
    assert store.commit(repo, head) == commit
    for branch in ("../main", "a..b", ".main", "-x", "", "x" * 201):
        assert store.head(repo, branch) is None, branch
    (repo.path / "refs" / "heads" / ("b" * 200)).write_text(head)
    assert store.head(repo, "b" * 200) == head  # 200 characters: the longest branch name
    # '..' inside an otherwise valid name could climb out of refs/heads (here back into it).
    (repo.path / "refs" / "heads" / "x").mkdir()
    (repo.path / "refs" / "heads" / "x" / "y").write_text(head)
    assert store.head(repo, "x/y") == head and store.head(repo, "x/../main") is None
    # A branch whose name looks like a sha is still a branch: its head, not a commit of that id.
    (repo.path / "refs" / "heads" / ("a" * 40)).write_text(head)
    assert store.resolve(repo, "a" * 40).id == head
    (repo.path / "refs" / "heads" / "broken").write_text("not-a-sha\n")
    assert store.head(repo, "broken") is None
    (repo.path / "refs" / "heads" / "spaced").write_text(f"  {head}\n")
    assert store.head(repo, "spaced") == head
    assert store.commit(repo, head[:39]) is None  # a prefix is no commit id ...
    assert store.resolve(repo, head[:39]).id == head  # ... but a revision that resolves to one
    for bad in (head.upper(), head + "0", "0" * 40, "../" + head[3:]):
        assert store.commit(repo, bad) is None, bad
        with pytest.raises(HubError, match=r"^Invalid rev id: ") as info:
            store.resolve(repo, bad)
        assert (info.value.status, info.value.code) == (404, "RevisionNotFound")
        assert info.value.message == f"Invalid rev id: {bad}"


def _handler(store: Any, token: str | None, authorization: str | None = None) -> Any:
    from types import SimpleNamespace

    from hubtune.hubserver.server import _Handler

    handler = object.__new__(_Handler)
    handler.server = SimpleNamespace(store=store, token=token)  # type: ignore[assignment]
    handler.headers = {} if authorization is None else {"Authorization": authorization}  # type: ignore[assignment]
    return handler


def test_the_token_check_and_private_repos(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore

    store = RepoStore(tmp_path)
    assert _handler(store, None)._authenticated()  # open local use
    _handler(store, None)._require_write()
    for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}  "):
        assert _handler(store, TOKEN, header)._authenticated(), header
        _handler(store, TOKEN, header)._require_write()
    for header in (
        None,
        "",
        TOKEN,
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
    ):
        assert not _handler(store, TOKEN, header)._authenticated(), header
    with pytest.raises(
        HubError, match=r"^Authorization required: this hub needs a token for writes$"
    ) as info:
        _handler(store, TOKEN)._require_write()
    assert info.value.status == 401
    with pytest.raises(HubError, match=r"^Invalid credentials in Authorization header$") as info:
        _handler(store, TOKEN, "Bearer wrong")._require_write()
    assert info.value.status == 401
    public, private = store.locate("model", "o/public"), store.locate("model", "o/private")
    store.create(public, private=False)
    store.create(private, private=True)
    assert _handler(store, TOKEN)._visible_repo("model", "o/public") == public
    assert _handler(store, TOKEN, f"Bearer {TOKEN}")._visible_repo("model", "o/private") == private
    assert _handler(store, None)._visible_repo("model", "o/private") == private
    with pytest.raises(HubError, match=r"^Repository not found$") as info:
        _handler(store, TOKEN, "Bearer wrong")._visible_repo("model", "o/private")
    assert (info.value.status, info.value.code) == (404, "RepoNotFound")


def test_repo_payloads_and_writable_branches(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore

    store = RepoStore(tmp_path)
    handler = _handler(store, None)
    assert handler._repo_from_payload({"name": "n"}) == store.locate("model", "local/n")
    assert handler._repo_from_payload({"name": "n", "type": "dataset", "organization": "o"}) == (
        store.locate("dataset", "o/n")
    )
    assert handler._repo_from_payload({"name": "n", "type": None, "organization": ""}) == (
        store.locate("model", "local/n")
    )
    for payload in ({}, {"name": ""}, {"name": None}):
        with pytest.raises(HubError, match=r"^Missing repo name$") as info:
            handler._repo_from_payload(payload)
        assert info.value.status == 400
    with pytest.raises(HubError, match=r"^'name' must be a string, got int$") as info:
        handler._repo_from_payload({"name": 3})
    assert info.value.status == 400
    with pytest.raises(HubError, match=r"^Invalid repo id 'o/\.\.': expected"):
        handler._repo_from_payload({"name": "..", "organization": "o"})
    repo = store.locate("model", "o/n")
    store.create(repo, private=False)
    assert handler._writable_branch(repo, "main", {}) == "main"
    assert handler._writable_branch(repo, "main", {"create_pr": "false"}) == "main"
    assert handler._writable_branch(repo, "refs/heads/main", {}) == "main"
    for flag in ("1", "true", "True", " yes ", "on"):
        with pytest.raises(
            HubError,
            match=r"^Pull requests are not supported by the local hub endpoint: commit to a branch "
            r"instead \(create_branch, then revision=<branch>\)$",
        ) as info:
            handler._writable_branch(repo, "main", {"create_pr": flag})
        assert info.value.status == 400
    head = store.head(repo)
    for revision in ("dev", head):  # a commit is not a branch to write to
        with pytest.raises(
            HubError, match=r"^Invalid rev id: .* \(commits go to a branch, e\.g\. 'main'\)$"
        ) as info:
            handler._writable_branch(repo, revision, {})
        assert (info.value.status, info.value.code) == (404, "RevisionNotFound")


# --------------------------------------------------------------------------- guard and body, unit level
# Host, Origin/Referer and Content-Type checks, and the body framing and size limits, without a
# server (the end-to-end tests above check that every request goes through them).


def _policy(bound_host: str = "127.0.0.1", port: int = 8765, allowed: tuple[str, ...] = ()) -> Any:
    from hubtune.hubserver.guard import HostPolicy

    return HostPolicy(bound_host=bound_host, port=port, allowed_hosts=allowed)


def _refused_host(policy: Any, host: str) -> None:
    from hubtune.hubserver.storage import HubError

    with pytest.raises(HubError) as info:
        policy.check_host(host)
    assert info.value.status == 403, host
    assert info.value.message == (
        f"Host {host[:100]!r} is not this server: requests must name it by a loopback name or "
        f"address, its bound address or an allowed host, with port {policy.port} (a name that "
        "resolves here is not enough: DNS rebinding)"
    )


def test_the_host_header_must_name_this_server() -> None:
    import socket

    from hubtune.hubserver.storage import HubError

    policy = _policy()
    for missing in (None, ""):
        with pytest.raises(HubError, match=r"^Missing Host header$") as info:
            policy.check_host(missing)
        assert info.value.status == 400
    for host in (
        "127.0.0.1:8765",
        " localhost:8765 ",
        "LOCALHOST.:8765",
        "localhost.localdomain:8765",
        "[::1]:8765",
        "127.0.0.2:8765",  # all of 127/8 is loopback
        "localhost:08765",  # the same port number
    ):
        policy.check_host(host)
    for host in (
        "evil.example:8765",  # DNS rebinding: a name pointing here
        "127.0.0.1:8766",
        "127.0.0.1",  # port 80
        "127.0.0.1:",  # port 80 too
        "localhost:8765:1",
        "[::1]8765",
        "[::1",
        "[]:8765",
        ":8765",
        "localhost:87a5",
        "localhost:-8765",
        "localhost:000008765",  # more than 5 digits
        "localhost:008765",  # 6 digits
        "10.0.0.1:8765",
        socket.gethostname() + ":8765",  # only on a wildcard bind
        "x" * 300,
    ):
        _refused_host(policy, host)
    assert _policy(port=80).check_host("localhost") is None
    assert _policy(port=80).check_host("[::1]") is None
    # A bracketed (IPv6) host must be closed once, followed by nothing or ":port"; on port 80
    # the default port would otherwise make these pass.
    from hubtune.hubserver.guard import _split_authority

    for authority in ("[::1", "[::1]]", "[::1]]:80", "[::1]x", "[::1]80"):
        assert _split_authority(authority, default_port=80) is None, authority
        _refused_host(_policy(port=80), authority)
    # Without a port too, the name is lower-cased and loses its trailing dot (only that).
    assert _split_authority(" .Hub.Example. ", default_port=80) == (".hub.example", 80)
    _policy(port=80).check_host("LOCALHOST.")


def test_the_host_names_a_bind_accepts() -> None:
    import socket

    wildcard = _policy("0.0.0.0", 1)
    for host in ("10.1.2.3:1", "[fe80::1]:1", f"{socket.gethostname().upper()}:1", "localhost:1"):
        wildcard.check_host(host)
    _refused_host(wildcard, "evil.example:1")
    _refused_host(wildcard, "10.1.2.3:2")
    for bind in ("", "::"):
        _policy(bind, 1).check_host("10.1.2.3:1")
    lan = _policy("192.168.1.5", 1, allowed=("Hub.Example.",))
    for host in ("192.168.1.5:1", "127.0.0.1:1", "hub.example:1", "HUB.EXAMPLE.:1"):
        lan.check_host(host)
    for host in ("192.168.1.6:1", "192.168.1.5:2", socket.gethostname() + ":1"):
        _refused_host(lan, host)
    named = _policy("MyHost.Lan.", 1)
    named.check_host("myhost.lan:1")
    named.check_host("localhost:1")
    _refused_host(named, "other.lan:1")


def test_writes_from_another_origin_are_refused() -> None:
    from hubtune.hubserver.storage import HubError

    policy = _policy()
    for url in (
        "http://127.0.0.1:8765",
        "http://localhost:8765/some/page?x=1",
        "http://[::1]:8765",
    ):
        assert policy.is_own_origin(url), url
    for url in (
        "https://127.0.0.1:8765",
        "http://127.0.0.1",
        "http://evil.example:8765",
        "http://user@127.0.0.1:8765",
        "http://",
        "null",
        "",
    ):
        assert not policy.is_own_origin(url), url
    policy.check_origin(None, None)
    policy.check_origin("http://127.0.0.1:8765", "http://evil.example/")  # Origin wins
    policy.check_origin(None, "http://localhost:8765/page")
    for origin in ("null", "http://evil.example", "http://" + "e" * 200):
        with pytest.raises(HubError) as info:
            policy.check_origin(origin, "http://127.0.0.1:8765/")
        assert info.value.status == 403
        assert info.value.message == (
            f"Cross-origin request refused: Origin {origin[:100]!r} is not this hub. The local "
            "hub takes writes only from Hub clients or pages it serves itself."
        )
    with pytest.raises(HubError) as info:
        policy.check_origin(None, "http://evil.example:81/path?q=secret")
    assert (info.value.status, info.value.message) == (
        403,
        "Cross-origin request refused: Referer http://evil.example:81 is not this hub.",
    )
    with pytest.raises(HubError) as info:
        policy.check_origin(None, "https://" + "e" * 200 + "/x")
    assert info.value.message == (
        f"Cross-origin request refused: Referer https://{'e' * 100} is not this hub."
    )


def test_write_bodies_need_the_media_type_the_clients_send() -> None:
    from hubtune.hubserver.guard import check_media_type, media_type
    from hubtune.hubserver.storage import HubError

    assert media_type(None) is None
    assert media_type("") is None and media_type(" ; charset=utf-8") is None
    assert media_type(" Application/JSON ; charset=utf-8; x=y") == "application/json"
    assert media_type("application/x-ndjson") == "application/x-ndjson"
    check_media_type("application/json; charset=utf-8", ["application/json"])
    check_media_type(None, [None, "application/json"])
    check_media_type("APPLICATION/X-NDJSON", iter(["application/x-ndjson"]))
    for sent, allowed, takes in (
        ("text/plain", ["application/json", None], "application/json, none"),
        (None, ["application/json"], "application/json"),
        ("application/json" + "x" * 100, ["application/json"], "application/json"),
    ):
        with pytest.raises(HubError) as info:
            check_media_type(sent, allowed)
        assert info.value.status == 403
        assert info.value.message == (
            f"Content-Type {sent!r:.80} refused for this write: it takes {takes} (what the Hub "
            "clients send); other types are what a web page can send cross-site"
        )


def _headers(*pairs: tuple[str, str]) -> Any:
    from email.message import Message

    message = Message()
    for name, value in pairs:
        message[name] = value
    return message


def test_body_framing_is_read_strictly() -> None:
    from hubtune.hubserver.body import MAX_CONTENT_LENGTH, Framing, parse_framing
    from hubtune.hubserver.storage import HubError

    assert MAX_CONTENT_LENGTH == 2**40
    assert parse_framing(_headers()) == Framing(length=0, chunked=False)
    assert not parse_framing(_headers()).has_body
    assert parse_framing(_headers(("Content-Length", "0"))) == Framing(0, False)
    assert not parse_framing(_headers(("Content-Length", "0"))).has_body
    assert parse_framing(_headers(("Content-Length", "1"))).has_body
    assert parse_framing(_headers(("Content-Length", " 10 "), ("Content-Length", "10"))) == (
        Framing(10, False)
    )
    assert parse_framing(_headers(("Content-Length", str(2**40)))) == Framing(2**40, False)
    for te in ("chunked", " Chunked "):
        framing = parse_framing(_headers(("Transfer-Encoding", te)))
        assert framing == Framing(0, True) and framing.has_body
    for pairs, message in (
        (
            (("Content-Length", "10"), ("Content-Length", "11")),
            "Conflicting Content-Length headers: ['10', '11']",
        ),
        ((("Content-Length", "-1"),), "Invalid Content-Length '-1': expected a byte count"),
        ((("Content-Length", "1e3"),), "Invalid Content-Length '1e3': expected a byte count"),
        ((("Content-Length", ""),), "Invalid Content-Length '': expected a byte count"),
        (
            (("Content-Length", "1" * 14),),
            f"Invalid Content-Length {'1' * 14!r}: expected a byte count",
        ),
        (
            (("Content-Length", "9" * 50),),
            f"Invalid Content-Length {'9' * 40!r}: expected a byte count",
        ),
        (
            (("Content-Length", str(2**40 + 1)),),
            f"Invalid Content-Length {2**40 + 1}: more than 1 TiB",
        ),
        ((("Transfer-Encoding", "gzip"),), "Unsupported Transfer-Encoding 'gzip'"),
        (
            (("Transfer-Encoding", "gzip, chunked"),),
            "Unsupported Transfer-Encoding 'gzip, chunked'",
        ),
        (
            (("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")),
            "Unsupported Transfer-Encoding 'chunked, chunked'",
        ),
        (
            (("Transfer-Encoding", "chunked"), ("Content-Length", "3")),
            "Both Content-Length and Transfer-Encoding: refused as ambiguous",
        ),
    ):
        with pytest.raises(HubError) as info:
            parse_framing(_headers(*pairs))
        assert (info.value.status, info.value.message) == (400, message), pairs


def _reader(data: bytes, *, chunked: bool = False, length: int | None = None) -> Any:
    import io

    from hubtune.hubserver.body import BodyReader, Framing

    framing = Framing(0 if chunked else len(data) if length is None else length, chunked)
    return BodyReader(io.BufferedReader(io.BytesIO(data)), framing)  # type: ignore[arg-type]


def test_chunked_bodies_are_decoded_and_malformed_ones_refused() -> None:
    from hubtune.hubserver.storage import HubError

    for raw in (
        b"3\r\nabc\r\n0\r\n\r\n",
        b"3;ext=1\r\nabc\r\n0\r\n\r\n",
        b"3 \t\nabc\n0\nX-Trailer: 1\nX-Other: 2\n\n",
        b"0000000000000003\r\nabc\r\n0\r\n\r\n",  # 16 hex digits
        b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n",
        b"3\r\nabc\r\n0\r\n",  # the connection closes after the last chunk
        b"3\r\nabc\r\n0\r\n" + b"T: x\r\n" * 99 + b"\r\n",
    ):
        reader = _reader(raw, chunked=True)
        assert reader.remaining is None and not reader.done
        assert reader.read_all() == b"abc", raw
        assert reader.done and not reader.broken and reader.read_chunk() == b""
    assert _reader(b"A\r\n0123456789\r\n0\r\n\r\n", chunked=True).read_all() == b"0123456789"
    assert _reader(b"a\r\n0123456789\r\n0\r\n\r\n", chunked=True).read_all() == b"0123456789"
    for raw, message in (
        (b"zz\r\nabc\r\n0\r\n\r\n", "invalid chunk size line b'zz\\r\\n'"),
        (b"00000000000000003\r\nabc\r\n", "invalid chunk size line b'00000000000000003\\r\\n'"),
        (b"3", "invalid chunk size line b'3'"),
        (b"-3\r\n", "invalid chunk size line b'-3\\r\\n'"),
        (b"1" * 2000, f"invalid chunk size line {b'1' * 40!r}"),  # at most 1024 bytes read
        (b"3\r\nabcX\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"3\r\nabc\r\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"3\r\nabc\r\n0\r\n" + b"T: x\r\n" * 100 + b"\r\n", "too many trailer lines"),
        # one trailer line over the line limit is refused, not read as several lines
        (
            b"3\r\nabc\r\n0\r\nT: " + b"x" * 1100 + b"\r\n\r\n",
            "trailer line longer than 1024 bytes",
        ),
    ):
        reader = _reader(raw, chunked=True)
        with pytest.raises(HubError) as info:
            reader.read_all()
        assert (info.value.status, info.value.message) == (
            400,
            f"Malformed chunked body: {message}",
        ), raw
        assert reader.broken
    # Cut short (the client went away), not malformed: mid-data, before a chunk's CRLF, before
    # the next size line.
    for raw in (b"", b"5\r\nab", b"3\r\nabc", b"3\r\nabc\r\n"):
        reader = _reader(raw, chunked=True)
        with pytest.raises(ConnectionError, match=r"^request body ended early$"):
            reader.read_all()
        assert not reader.broken, raw


def test_sized_bodies_stop_at_their_length_and_at_the_limits() -> None:
    from hubtune.hubserver.body import COPY_CHUNK
    from hubtune.hubserver.storage import HubError

    assert COPY_CHUNK == 2**20
    reader = _reader(b"abcdef", length=4)
    assert reader.remaining == 4 and not reader.done
    assert reader.read_all() == b"abcd" and reader.remaining == 0 and reader.done
    with pytest.raises(ConnectionError, match=r"^request body ended early$"):
        _reader(b"abc", length=5).read_all()
    assert _reader(b"").read_all() == b"" and _reader(b"").done
    assert _reader(b"x" * 10).read_all(limit=10) == b"x" * 10
    with pytest.raises(HubError, match=r"^Request body too large$") as info:
        _reader(b"x" * 11).read_all(limit=10)
    assert info.value.status == 413
    assert len(_reader(b"x" * (64 << 20)).read_all()) == 64 << 20  # the default limit
    with pytest.raises(HubError, match=r"^Request body too large$"):
        _reader(b"x" * ((64 << 20) + 1)).read_all()


def test_body_lines_and_their_limit() -> None:
    from hubtune.hubserver.body import COPY_CHUNK
    from hubtune.hubserver.storage import HubError

    # One call at a time first, so that a reader which stops consuming its buffer, or reads
    # past its end, fails here instead of making the list() calls below endless.
    reader = _reader(b"a\nbc\n\nd")
    assert reader.next_line() == b"a"
    assert reader.next_line() == b"bc"
    assert reader.next_line() == b""
    assert reader.next_line() == b"d"
    assert reader.next_line() is None
    assert list(_reader(b"a\nbc\n\nd").lines()) == [b"a", b"bc", b"", b"d"]
    assert list(_reader(b"a\n").lines()) == [b"a"]
    assert list(_reader(b"").lines()) == []
    chunked = _reader(b"2\r\na\n\r\n3\r\nbc\n\r\n0\r\n\r\n", chunked=True)
    assert list(chunked.lines()) == [b"a", b"bc"]
    assert _reader(b"x" * 5).next_line(limit=5) == b"x" * 5
    for what, expected in (
        ("line", "The line is longer than 5 bytes"),
        ("commit header", "The commit header is longer than 5 bytes"),
    ):
        with pytest.raises(HubError) as info:
            _reader(b"x" * 6).next_line(limit=5, what=what)
        assert (info.value.status, info.value.message) == (413, expected)
    with pytest.raises(HubError, match=r"^The line is longer than 5 bytes$"):
        _reader(b"x" * 6).next_line(limit=5)
    # A line longer than one read: the rest of the body is kept exactly (and read_chunk
    # returns what was buffered first).
    long = b"y" * (COPY_CHUNK + 5)
    reader = _reader(long + b"\nnext\nlast")
    assert reader.next_line() == long
    assert reader.next_line() == b"next"
    assert reader.read_chunk() == b"last" and reader.read_chunk() == b""
    reader = _reader(b"a\n" + b"z" * 10)
    assert reader.next_line() == b"a"
    assert reader.read_chunk() == b"z" * 10


def test_server_payload_helpers_are_strict() -> None:
    from hubtune.hubserver.server import _is_true, _json_object, _opt_bool, _opt_size, _opt_str
    from hubtune.hubserver.storage import HubError

    assert [_is_true(v) for v in ("1", "true", " TRUE ", "Yes", "on")] == [True] * 5
    assert [_is_true(v) for v in (None, "", "0", "false", "no", "off", "2")] == [False] * 7
    assert _json_object(b"") == {} and _json_object(b'{"a": 1}') == {"a": 1}
    for raw, message in (
        (b"[1]", "Expected a JSON object, got list"),
        (b"3", "Expected a JSON object, got int"),
        (b"null", "Expected a JSON object, got NoneType"),
    ):
        with pytest.raises(HubError) as info:
            _json_object(raw)
        assert (info.value.status, info.value.message) == (400, message)
    for raw in (b"{", b"\xff"):
        with pytest.raises(HubError, match=r"^Invalid JSON body: ") as info:
            _json_object(raw)
        assert info.value.status == 400
    assert _opt_str({"a": "x"}, "a") == "x" and _opt_str({}, "a") is None
    assert _opt_str({"a": None}, "a") is None and _opt_str({"a": ""}, "a") == ""
    with pytest.raises(HubError) as info:
        _opt_str({"a": 1}, "a", where="files: ")
    assert (info.value.status, info.value.message) == (400, "files: 'a' must be a string, got int")
    assert _opt_bool({"a": True}, "a") is True and _opt_bool({"a": False}, "a") is False
    assert _opt_bool({}, "a") is None and _opt_bool({"a": None}, "a") is None
    with pytest.raises(HubError) as info:
        _opt_bool({"a": "true"}, "a")
    assert (info.value.status, info.value.message) == (400, "'a' must be a boolean, got str")
    assert _opt_size({"s": 0}, "s") == 0 and _opt_size({"s": 7}, "s") == 7
    assert _opt_size({}, "s") is None and _opt_size({"s": None}, "s") is None
    for bad in (-1, True, 1.5, "3", "x" * 60):
        with pytest.raises(HubError) as info:
            _opt_size({"s": bad}, "s", where="files: ")
        assert (info.value.status, info.value.message) == (
            400,
            f"files: 's' must be a non-negative integer, got {bad!r:.40}",
        )


def test_every_request_names_one_host_and_writes_their_origin() -> None:
    from types import SimpleNamespace

    from hubtune.hubserver.body import Framing
    from hubtune.hubserver.server import _Handler
    from hubtune.hubserver.storage import HubError

    def handler(command: str, *pairs: tuple[str, str], framing: Any = None) -> Any:
        made = object.__new__(_Handler)
        made.server = SimpleNamespace(policy=_policy())  # type: ignore[assignment]
        made.headers = _headers(*pairs)  # type: ignore[assignment]
        made.command = command
        made._framing = framing
        return made

    host = ("Host", "127.0.0.1:8765")
    evil = ("Origin", "http://evil.example")
    handler("GET", host, evil)._check_caller()  # reads: no origin check
    handler("HEAD", host, ("Referer", "http://evil.example/"))._check_caller()
    handler("POST", host, ("Origin", "http://127.0.0.1:8765"))._check_caller()
    handler("POST", host)._check_caller()
    for command in ("POST", "PUT", "DELETE", "OPTIONS", "get"):
        with pytest.raises(HubError, match=r"^Cross-origin request refused: Origin") as info:
            handler(command, host, evil)._check_caller()
        assert info.value.status == 403
    with pytest.raises(HubError, match=r"^Cross-origin request refused: Referer") as info:
        handler("PUT", host, ("Referer", "http://evil.example/"))._check_caller()
    with pytest.raises(HubError, match=r"^More than one Host header$") as info:
        handler("GET", host, host)._check_caller()
    assert info.value.status == 400
    with pytest.raises(HubError, match=r"^Missing Host header$"):
        handler("GET")._check_caller()
    with pytest.raises(HubError, match=r"is not this server") as info:
        handler("GET", ("Host", "evil.example:8765"))._check_caller()
    assert info.value.status == 403
    # The body's media type is checked only when there is a body.
    typed = ("Content-Type", "text/plain")
    handler("POST", typed, framing=Framing(0, False))._require_body_type(("application/json",))
    for framing in (Framing(3, False), Framing(0, True)):
        with pytest.raises(HubError, match=r"^Content-Type 'text/plain' refused") as info:
            handler("POST", typed, framing=framing)._require_body_type(("application/json",))
        assert info.value.status == 403
    handler(
        "POST", ("Content-Type", "application/json"), framing=Framing(3, False)
    )._require_body_type(("application/json",))


def test_ref_names_tags_and_short_shas_at_unit_level(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore, validate_ref_name

    store = RepoStore(tmp_path)
    repo = store.locate("model", "o/n")
    store.create(repo, private=False)
    first = store.head(repo)
    assert first is not None
    second = store.apply_commit(
        repo,
        branch="main",
        additions={},
        deleted_files=[],
        deleted_folders=[],
        title="second",
        message="",
        parent_commit=None,
    ).id
    assert second != first and store.head(repo) == second
    for name in ("main", "v1.0", "feature/x-y_z", "a" * 200, "x.lockx", "a.b/c", first[:39]):
        assert validate_ref_name(name) == name
    for name in (
        "",
        "-x",
        ".x",
        "a..b",
        "refs/heads/x",
        first,
        "a/.b",
        "a//b",
        "a/",
        "x.lock",
        "a/b.lock/c",
        "x.",
        "a b",
        "a~1",
        "a" * 201,
    ):
        with pytest.raises(HubError) as info:
            validate_ref_name(name)
        assert (info.value.status, info.value.message) == (
            400,
            f"Invalid reference name {name!r}: letters, digits, '-', '_', '.', '/' (no '..', "
            "no 'refs/' prefix, not a commit id)",
        ), name
    refs = repo.path / "refs"
    (refs / "tags").mkdir(exist_ok=True)
    (refs / "tags" / "v1").write_text(first)
    (refs / "tags" / "dup").write_text(first)
    (refs / "heads" / "dup").write_text(second)
    (refs / "tags" / "bad").write_text("zz")
    assert store.resolve(repo, "v1").id == first  # a tag
    assert store.resolve(repo, "dup").id == second  # a branch before a tag
    assert store.resolve(repo, "refs/tags/dup").id == first
    assert store.resolve(repo, "refs/heads/dup").id == second
    assert store.resolve(repo, "refs/heads/main").id == second
    assert store.resolve(repo, first[:7]).id == first  # a unique prefix of 7 or more
    assert store.resolve(repo, second[:12]).id == second
    for revision in (
        "refs/heads/v1",
        "refs/tags/main",
        "bad",
        "refs/tags/../heads/main",
        first[:6],
        first[:7].upper(),
        "refs/x/main",
    ):
        with pytest.raises(HubError) as info:
            store.resolve(repo, revision)
        assert (info.value.status, info.value.code, info.value.message) == (
            404,
            "RevisionNotFound",
            f"Invalid rev id: {revision}",
        ), revision
    # Two commits starting with the same 7 digits: the prefix names neither.
    commits = repo.path / "commits"
    twin = first[:7] + ("0" if first[7] != "0" else "1") * 33
    (commits / f"{twin}.json").write_text((commits / f"{first}.json").read_text())
    (commits / f"{first[:7]}-not-a-sha.json").write_text("{}")  # only full ids count
    assert store.resolve(repo, first[:8]).id == first
    with pytest.raises(HubError) as info:
        store.resolve(repo, first[:7])
    assert (info.value.status, info.value.code, info.value.message) == (
        404,
        "RevisionNotFound",
        f"Invalid rev id: {first[:7]} is ambiguous (2 commits start with it)",
    )


def test_percent_encoded_repo_paths_are_checked_decoded() -> None:
    from urllib.parse import quote

    from hubtune.hubserver.storage import HubError, validate_repo_path

    for path in ("a%2Fb", "a%20b", "50%25.txt", "%41"):
        assert validate_repo_path(path) == path
    for path in ("%2e%2e/x", "x/%2E%2E", "%252e%252e/x", "a%00b", "a%5Cb", "%2Fetc", ".%67it"):
        with pytest.raises(HubError) as info:
            validate_repo_path(path)
        assert (info.value.status, info.value.message) == (400, f"Invalid path in repo: {path!r}")
    seven = "a b"
    for _ in range(7):
        seven = quote(seven)
    assert validate_repo_path(seven) == seven  # seven layers decode within the 8 rounds
    eight = quote(seven)
    with pytest.raises(HubError) as info:
        validate_repo_path(eight)
    assert (info.value.status, info.value.message) == (
        400,
        f"Invalid path in repo (encoded too often): {eight!r}",
    )
    long = "../" + "x" * 300
    with pytest.raises(HubError) as info:
        validate_repo_path(long)
    assert info.value.message == f"Invalid path in repo: {long[:200]!r}"


def test_chunked_framing_reads_no_more_than_its_bounds() -> None:
    """Size and CRLF lines are read with a bound, hex sizes of several digits, a trailer line
    over the line limit is refused after 1 KiB, and a bare LF ends the trailers (the bytes
    after it belong to the next request)."""
    import io

    from hubtune.hubserver.body import BodyReader, Framing
    from hubtune.hubserver.storage import HubError

    def reader(raw: bytes) -> tuple[Any, io.BufferedReader]:
        stream = io.BufferedReader(io.BytesIO(raw))
        return BodyReader(stream, Framing(0, True)), stream  # type: ignore[arg-type]

    body, stream = reader(b"10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n")
    assert body.read_all() == b"z" * 16  # 0x10 bytes
    body, stream = reader(b"1" * 2000)
    with pytest.raises(HubError, match=r"^Malformed chunked body: invalid chunk size line"):
        body.read_all()
    assert stream.tell() == 1024  # the size line is read 1 KiB at most
    body, stream = reader(b"3\r\nabcWXYZ" + b"x" * 5000)
    with pytest.raises(
        HubError, match=r"^Malformed chunked body: chunk data not followed by CRLF$"
    ):
        body.read_all()
    assert stream.tell() == 3 + 3 + 3  # three bytes after the data, no more
    body, stream = reader(b"0\n\nNEXT\n")
    assert body.read_all() == b"" and stream.tell() == 3
    long_trailer = b"0\r\n" + b"T" * 2000 + b"\r\n" + b"T: x\r\n" * 98 + b"\r\n"
    body, stream = reader(long_trailer)
    with pytest.raises(
        HubError, match=r"^Malformed chunked body: trailer line longer than 1024 bytes$"
    ):
        body.read_all()
    assert stream.tell() == 3 + 1024  # the long line is read 1 KiB at most


def test_own_origin_on_port_80() -> None:
    assert _policy(port=80).is_own_origin("http://localhost")  # no port: 80
    assert _policy(port=80).is_own_origin("http://127.0.0.1:80/x")
    assert not _policy(port=81).is_own_origin("http://localhost")


def test_a_short_sha_that_matches_no_commit_is_not_found(tmp_path: Path) -> None:
    from hubtune.hubserver.storage import HubError, RepoStore

    store = RepoStore(tmp_path)
    repo = store.locate("model", "o/n")
    store.create(repo, private=False)
    head = store.head(repo)
    assert head is not None
    unknown = "0000000" if not head.startswith("0000000") else "1111111"
    with pytest.raises(HubError) as info:
        store.resolve(repo, unknown)
    assert (info.value.status, info.value.code, info.value.message) == (
        404,
        "RevisionNotFound",
        f"Invalid rev id: {unknown}",
    )


def test_messages_without_a_prefix_and_long_encoded_paths() -> None:
    from urllib.parse import quote

    from hubtune.hubserver.server import _opt_size
    from hubtune.hubserver.storage import HubError, validate_repo_path

    with pytest.raises(HubError) as info:
        _opt_size({"size": -1}, "size")
    assert info.value.message == "'size' must be a non-negative integer, got -1"
    eight = "a b" + "x" * 300
    for _ in range(8):
        eight = quote(eight)
    with pytest.raises(HubError) as info:
        validate_repo_path(eight)
    assert info.value.message == f"Invalid path in repo (encoded too often): {eight[:200]!r}"
