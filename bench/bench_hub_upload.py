"""Upload cost of the local Hub endpoint: wall time and peak server memory per file size.

For each size (64 MiB, 256 MiB and 1 GiB by default) a fresh ``LocalHub`` runs in its own
process on an empty root, and a second process uploads one random file with the real client,
``HfApi().upload_file`` (with ``HF_HUB_DISABLE_XET=1``, as hubtune's own clients run against a
local endpoint: large files go through Git LFS). Recorded per size:

- ``seconds``: wall time of ``upload_file`` (client sha256, preupload, LFS batch, PUT,
  verify, commit), measured in the client process;
- ``server_peak_rss_mib``: the server process's peak resident memory (``VmHWM`` in
  ``/proc/PID/status``), and its resident memory before the upload (``server_idle_rss_mib``);
- ``client_peak_rss_mib``: the client process's peak (``ru_maxrss``), for context;
- ``mode``: ``lfs`` or ``inline``, read back from the commit (``get_paths_info``), and
  ``ok``: the stored file has the uploaded content (its sha256 or git blob id).

``--baseline-src DIR`` also measures another hubtune source tree the same way (e.g. the code
before LFS: ``git archive <commit> hubtune | tar -x -C DIR``), each upload capped at
``--baseline-timeout-s``.

    python bench/bench_hub_upload.py                       # writes bench/results/hub_upload.{json,md}
    python bench/bench_hub_upload.py --sizes-mib 8,32      # quick check
    python bench/bench_hub_upload.py --baseline-src /tmp/hubtune-before --baseline-timeout-s 600
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (
    REPO,
    RESULTS_DIR,
    hardware,
    md_table,
    package_versions,
    set_say_tag,
    write_results,
)

MIB = 1 << 20

_SERVER = """
import sys, time
from pathlib import Path
from hubtune.hubserver import LocalHub
options = {"lfs_threshold": None} if sys.argv[2:] == ["inline"] else {}
hub = LocalHub(Path(sys.argv[1]), **options)
import hubtune
print(hub.start(), hubtune.__file__, flush=True)
time.sleep(86400)
"""

# The client runs in its own process: its memory (the inline path base64-encodes the whole
# file) stays out of the server's numbers, and a stuck upload can be killed.
_CLIENT = """
import hashlib, json, os, resource, sys, time
os.environ["HF_HUB_DISABLE_XET"] = "1"
from huggingface_hub import HfApi
url, path, repo = sys.argv[1], sys.argv[2], "bench/upload"
api = HfApi(endpoint=url, token=False)
api.create_repo(repo)
started = time.perf_counter()
api.upload_file(path_or_fileobj=path, path_in_repo="model.safetensors", repo_id=repo)
seconds = time.perf_counter() - started
(info,) = api.get_paths_info(repo, ["model.safetensors"])
sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\\0" % os.path.getsize(path))
with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
        sha256.update(block)
        sha1.update(block)
ok = info.lfs.sha256 == sha256.hexdigest() if info.lfs else info.blob_id == sha1.hexdigest()
print(json.dumps({
    "seconds": round(seconds, 2),
    "mode": "lfs" if info.lfs else "inline",
    "ok": bool(ok and info.size == os.path.getsize(path)),
    "client_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}))
"""


def _status_mib(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        return None
    return None


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 16 * MIB))
            handle.write(block)
            left -= len(block)


def _env(source: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env["PYTHONPATH"] = str(source)
    env["HF_HOME"] = tempfile.mkdtemp(prefix="bench-hf-home-")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


def measure(
    *, source: Path, file: Path, root: Path, timeout_s: float, inline: bool = False
) -> dict[str, Any]:
    """One upload of ``file`` to a fresh server (hubtune from ``source``) on ``root``; with
    ``inline``, a server started with ``lfs_threshold=None`` (``--no-lfs``)."""
    shutil.rmtree(root, ignore_errors=True)
    env = _env(source)
    # cwd outside any source tree: ``python -c`` puts the cwd first on sys.path, and only
    # PYTHONPATH may decide which hubtune runs.
    cwd = root.parent
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(root), *(["inline"] if inline else [])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    try:
        assert server.stdout is not None
        url, module = server.stdout.readline().split()
        assert Path(module).resolve().is_relative_to(source.resolve()), module
        idle = _status_mib(server.pid, "VmRSS")
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CLIENT, url, str(file)],
                capture_output=True,
                text=True,
                env=env,
                cwd=cwd,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {
                "ok": False,
                "error": f"timed out after {timeout_s:.0f} s",
                "server_peak_rss_mib": _status_mib(server.pid, "VmHWM"),
                "server_idle_rss_mib": idle,
            }
        peak = _status_mib(server.pid, "VmHWM")
        if done.returncode != 0:
            return {"ok": False, "error": done.stderr.strip().splitlines()[-1][:300]}
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return {**result, "server_peak_rss_mib": peak, "server_idle_rss_mib": idle}
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(env["HF_HOME"], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def render(payload: dict[str, Any]) -> str:
    """The Markdown report."""
    machine = payload["machine"]
    lines = [
        "# Local Hub endpoint: upload time and peak server memory",
        "",
        f"{machine['cpu_model']}, {machine['cpus_usable']} usable cores, {machine['ram_gib']} GiB "
        f"RAM; Python {payload['versions']['python']}, huggingface_hub "
        f"{payload['versions']['huggingface_hub']} (HF_HUB_DISABLE_XET=1), git "
        f"{(machine.get('git_commit') or '?')[:12]}; {machine['date_utc']}. Work folder "
        f"`{payload['workdir']}` ({payload['workdir_free_gib']} GiB free).",
        "",
        "One random file per size, `HfApi().upload_file` in its own process, a fresh server "
        "process each time. Peak RSS is the server's `VmHWM`; idle is its RSS before the "
        "upload. Produced by `bench/bench_hub_upload.py`.",
        "",
    ]
    table = []
    for row in payload["results"]:
        seconds = row.get("seconds")
        table.append(
            [
                row["server"],
                row["size_mib"],
                row.get("mode", "-"),
                seconds if seconds is not None else row.get("error", "-"),
                f"{row['size_mib'] / seconds:.0f}" if seconds else "-",
                row.get("server_peak_rss_mib", "-"),
                row.get("server_idle_rss_mib", "-"),
                row.get("client_peak_rss_mib", "-"),
                "yes" if row.get("ok") else "no",
            ]
        )
    lines += md_table(
        [
            "server",
            "size (MiB)",
            "mode",
            "seconds",
            "MiB/s",
            "server peak RSS (MiB)",
            "server idle RSS (MiB)",
            "client peak RSS (MiB)",
            "content ok",
        ],
        table,
        align="lrlrrrrrl",
    )
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", default="64,256,1024")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument(
        "--inline-sizes-mib", default="", help="also this tree with --no-lfs, at these sizes"
    )
    parser.add_argument("--baseline-src", type=Path, help="another hubtune source tree to compare")
    parser.add_argument(
        "--baseline-sizes-mib", help="sizes for the baseline (default: --sizes-mib)"
    )
    parser.add_argument("--baseline-timeout-s", type=float, default=600)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hub-upload-bench"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "hub_upload")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args()
    set_say_tag("bench-hub-upload")
    # A plain kill must still stop the server and client processes (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sizes = [int(s) for s in args.sizes_mib.split(",")]
    inline_sizes = [int(s) for s in args.inline_sizes_mib.split(",") if s]
    baseline_sizes = (
        [int(s) for s in args.baseline_sizes_mib.split(",")] if args.baseline_sizes_mib else sizes
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    free_gib = round(shutil.disk_usage(args.workdir).free / 2**30, 1)
    all_sizes = sorted(set(sizes + inline_sizes + (baseline_sizes if args.baseline_src else [])))
    needed_gib = max(all_sizes) * 2 / 1024  # the file and the server's copy
    if free_gib < needed_gib + 1:
        sys.exit(f"{args.workdir}: {free_gib} GiB free, about {needed_gib + 1:.1f} needed")
    # (label, source tree, sizes, timeout, inline)
    runs: list[tuple[str, Path, list[int], float, bool]] = [
        ("this tree", REPO, sizes, args.timeout_s, False),
        ("this tree, --no-lfs", REPO, inline_sizes, args.timeout_s, True),
    ]
    if args.baseline_src:
        label = f"baseline ({args.baseline_src.name})"
        runs.append((label, args.baseline_src, baseline_sizes, args.baseline_timeout_s, False))
    results = []
    for size in all_sizes:
        file = args.workdir / f"random-{size}MiB.bin"
        _random_file(file, size * MIB)
        try:
            for label, source, wanted, timeout_s, inline in runs:
                if size not in wanted:
                    continue
                print(f"{label}: {size} MiB ...", flush=True)
                root = args.workdir / "root"
                row = measure(
                    source=source, file=file, root=root, timeout_s=timeout_s, inline=inline
                )
                row = {"server": label, "size_mib": size, **row}
                print(json.dumps(row), flush=True)
                results.append(row)
        finally:
            file.unlink()
    payload = {
        "machine": hardware(),
        "versions": {
            "python": sys.version.split()[0],
            **package_versions(("huggingface_hub", "hf_xet", "httpx2"), keep_missing=True),
        },
        "workdir": str(args.workdir),
        "workdir_free_gib": free_gib,
        "results": results,
        "notes": args.note,
    }
    text = render(payload)
    write_results(args.out.name, payload, text, results_dir=args.out.parent)
    print(text)


if __name__ == "__main__":
    main()
