"""Mutation testing of the privacy and security code with mutmut (not part of CI).

Each module group is mutated in its own work folder under ``build/mutation/<group>/`` (a copy
of ``hubtune/``, ``tests/`` and ``pyproject.toml`` with a ``[tool.mutmut]`` section added), and
driven by the fast tests of that module only (``-m "not slow"``, the slowest end-to-end runs
deselected). mutmut maps every mutated function to the tests that call it, so each mutant runs
only those; a small pytest plugin (``bench/mutation_plugin.py``) orders them fastest first, so a
killed mutant dies at the first cheap test that notices it, and refuses to run at all unless
``hubtune`` is imported from the mutated copy.

    bash scripts/mutation.sh                 # every group, in priority order
    bash scripts/mutation.sh privacy dp_epoch
    bash scripts/mutation.sh --survivors privacy   # re-run only the last survivors (new tests)
    bash scripts/mutation.sh --rest privacy        # ... and what a stopped run did not reach

Writes ``bench/results/mutation.json`` and ``bench/results/mutation.md`` (atomically; a group
that is run again replaces its own entry and keeps the others).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import importlib.metadata as md
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "mutation"
RESULTS = REPO / "bench" / "results"
PLUGIN = REPO / "bench" / "mutation_plugin.py"

# The endpoint's validation: the path, name, revision and token checks of storage.py and
# server.py, all of guard.py (Host, Origin/Referer, Content-Type) and body.py's framing and
# size limits. A listed function that no longer exists is reported; after a rewrite, change
# these lines and re-run `bash scripts/mutation.sh endpoint`.
ENDPOINT_MODULES = [
    "hubtune/hubserver/storage.py",
    "hubtune/hubserver/server.py",
    "hubtune/hubserver/guard.py",
    "hubtune/hubserver/body.py",
]
ENDPOINT_FUNCTIONS = [
    *(
        f"hubtune/hubserver/storage.py:{f}"
        for f in (
            "validate_ref_name",
            "validate_repo_path",
            "_plain_path",
            "RepoStore.locate",
            "RepoStore.head",
            "RepoStore._ref",
            "RepoStore.commit",
            "RepoStore.resolve",
            "RepoStore._ref_sha",
            "RepoStore._expand_short_sha",
        )
    ),
    *(
        f"hubtune/hubserver/server.py:{f}"
        for f in (
            "_is_true",
            "_json_object",
            "_opt_str",
            "_opt_bool",
            "_opt_size",
            "_Handler._check_caller",
            "_Handler._presented_token",
            "_Handler._authenticated",
            "_Handler._require_write",
            "_Handler._visible_repo",
            "_Handler._require_body_type",
            "_Handler._repo_from_payload",
            "_Handler._writable_branch",
        )
    ),
    "hubtune/hubserver/guard.py",  # all of it
    *(
        f"hubtune/hubserver/body.py:{f}"
        for f in (
            "parse_framing",
            "BodyReader._next_chunk_size",
            "BodyReader._end_of_chunk",
            "BodyReader._read_chunked",
            "BodyReader.next_line",
            "BodyReader.read_all",
        )
    ),
]

# The endpoint's fast tests: the unit-level checks of the validation functions (no server) and
# the end-to-end refusals that go through them (a hub in a thread per test, ~0.1-1 s each). The
# client round trips (upload, download, transformers, datasets, LFS, concurrency) run in CI.
ENDPOINT_TESTS = [
    f"tests/test_hubserver.py::{t}"
    for t in (
        # unit level
        "test_repo_paths_that_could_escape_are_refused",
        "test_plain_repo_paths_are_accepted_unchanged",
        "test_repo_types_and_ids_are_validated",
        "test_revisions_resolve_to_branches_or_full_shas_only",
        "test_the_token_check_and_private_repos",
        "test_repo_payloads_and_writable_branches",
        "test_the_host_header_must_name_this_server",
        "test_the_host_names_a_bind_accepts",
        "test_writes_from_another_origin_are_refused",
        "test_write_bodies_need_the_media_type_the_clients_send",
        "test_body_framing_is_read_strictly",
        "test_chunked_bodies_are_decoded_and_malformed_ones_refused",
        "test_sized_bodies_stop_at_their_length_and_at_the_limits",
        "test_body_lines_and_their_limit",
        "test_server_payload_helpers_are_strict",
        "test_every_request_names_one_host_and_writes_their_origin",
        "test_ref_names_tags_and_short_shas_at_unit_level",
        "test_percent_encoded_repo_paths_are_checked_decoded",
        "test_chunked_framing_reads_no_more_than_its_bounds",
        "test_own_origin_on_port_80",
        "test_a_short_sha_that_matches_no_commit_is_not_found",
        "test_messages_without_a_prefix_and_long_encoded_paths",
        # end to end, through a hub
        "test_malformed_requests_get_a_400_with_a_clear_message",
        "test_cross_origin_writes_are_refused",
        "test_same_origin_writes_are_allowed",
        "test_writes_need_the_content_type_the_clients_send",
        "test_requests_for_other_hosts_are_refused",
        "test_loopback_host_names_are_accepted",
        "test_commit_messages_are_bounded",
        "test_commit_paths_are_validated",
        "test_preupload_paths_are_validated",
        "test_read_paths_are_validated",
        "test_every_write_needs_the_token",
        "test_private_repos_need_the_token_on_every_read",
    )
]

# Lines whose expressions are not mutated: a log call, and a string literal alone on its line
# (the continuation lines of an error message). mutmut would otherwise make three mutants of
# each message fragment ("XX..XX", lower, upper case) that only change wording; the tests pin
# what a message must say (named exception type + match=), not every word of it.
DO_NOT_MUTATE_PATTERNS = [
    r"^\s*logger\.(debug|info|warning|error|exception)\(",
    r"""^\s*[rbfRBF]{0,2}("([^"\\]|\\.)*"|'([^'\\]|\\.)*')\s*\)?\s*(from None)?\s*,?\s*$""",
]


@dataclass(frozen=True)
class Group:
    name: str
    files: list[str]  # files mutmut mutates
    functions: list[str]  # "file:function" or "file:Class.method"; empty = every function
    tests: list[str]  # the fast tests that drive it
    deselect: list[str]  # end-to-end tests too slow to run per mutant (they run in CI)
    security: bool  # a privacy/security module: every survivor must be explained or killed


PRIVACY_TESTS = ["tests/test_privacy.py", "tests/test_privacy_grads.py"]
# 10-35 s each on 2 cores: whole tiny training runs (continued training, ghost clipping on
# LoRA, resume with more epochs, the secret-seed run twice). They run in CI; what they check of
# the privacy package and of the DP epoch is also checked by focused tests that take about a second.
PRIVACY_SLOW = [
    "tests/test_privacy.py::test_continued_dp_training_adds_to_epsilon",
    "tests/test_privacy.py::test_ghost_clipping_runs_with_lora",
    "tests/test_privacy.py::test_resume_with_more_epochs_plans_the_rest_and_never_exceeds_the_target",
    "tests/test_privacy.py::test_ghost_clipping_on_a_layer_called_twice_is_refused_with_the_fix",
    "tests/test_privacy.py::test_sampling_and_noise_are_secret_unless_the_unsafe_seed_fixes_them",
]
# The privacy package and the DP epoch are checked by unit tests (the epoch's on a Linear model, ~0.1 s);
# the tiny training runs (5 s each, several minutes together on a busy machine) would run for
# every surviving mutant of a function they pass through. The 1-2 s runs stay.
PRIVACY_RUNS = [
    "tests/test_privacy.py::test_ledger_matches_an_independent_accountant",
    "tests/test_privacy.py::test_lora_weights_move_under_dp_and_adapter_reproduces_logits",
    "tests/test_privacy.py::test_budget_guard_stops_before_the_target",
    "tests/test_privacy.py::test_sgd_optimizer_under_dp_takes_momentum_steps",
    "tests/test_privacy.py::test_a_nan_in_the_last_pass_of_a_run_is_caught_before_anything_is_saved",
    "tests/test_privacy.py::test_a_checkpoint_without_its_dp_record_is_not_resumed",
]

# The 1-2 s runs (refusals, preflight, non-finite loss or gradients): the DP epoch's group keeps
# them; the privacy group's unit tests check the same decisions directly.
PRIVACY_SHORT_RUNS = [
    "tests/test_privacy.py::test_unchanged_trained_tensors_stop_the_run",
    "tests/test_privacy.py::test_refusals_say_why",
    "tests/test_privacy.py::test_preflight_finds_tensors_without_per_example_gradients",
    "tests/test_privacy.py::test_non_finite_loss_under_dp_stops_and_keeps_the_last_good_checkpoint",
    "tests/test_privacy.py::test_non_finite_gradients_under_dp_stop_the_run",
]

GROUPS = [
    Group(
        "privacy",
        ["hubtune/privacy/accounting.py", "hubtune/privacy/engine.py"],
        [],
        PRIVACY_TESTS,
        PRIVACY_SLOW + PRIVACY_RUNS + PRIVACY_SHORT_RUNS,
        True,
    ),
    Group(
        "dp_epoch",
        ["hubtune/privacy/loop.py", "hubtune/checkpoint.py"],
        ["hubtune/privacy/loop.py", "hubtune/checkpoint.py:checkpoint_state"],
        PRIVACY_TESTS,
        PRIVACY_SLOW + PRIVACY_RUNS,
        True,
    ),
    Group(
        "endpoint",
        ENDPOINT_MODULES,
        ENDPOINT_FUNCTIONS,
        ENDPOINT_TESTS,
        [],
        True,
    ),
    Group(
        "membership",
        ["hubtune/audit/membership.py"],
        [],
        ["tests/test_audit_membership.py", "tests/test_publication.py"],
        [],
        False,
    ),
    Group(
        "fairness",
        ["hubtune/audit/fairness.py"],
        [],
        ["tests/test_audit_fairness.py"],
        [],
        False,
    ),
]

STATUSES = ["killed", "survived", "timeout", "no tests", "skipped", "suspicious", "segfault"]


def mutmut_requirement() -> str:
    """The pinned mutmut, from pyproject's ``mutation`` extra (one place to change it)."""
    # A regex, not tomllib: that is Python 3.11+, and hubtune supports 3.10.
    match = re.search(
        r'^mutation = \["(mutmut[^"]*)"\]', (REPO / "pyproject.toml").read_text(), re.M
    )
    if match is None:
        raise SystemExit('pyproject.toml has no `mutation = ["mutmut..."]` extra')
    return match.group(1)


def ensure_mutmut() -> str:
    req = mutmut_requirement()
    wanted = req.split("==", 1)[1] if "==" in req else None
    try:
        have: str | None = md.version("mutmut")
    except md.PackageNotFoundError:
        have = None
    if have is None or (wanted is not None and have != wanted):
        print(f"installing {req} (found {have})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", req], check=True)
        have = md.version("mutmut")
    return have


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def mutant_glob(spec: str) -> str:
    """``file:function`` / ``file:Class.method`` -> the glob of its mutmut mutant names."""
    path, _, func = spec.partition(":")
    module = path[: -len(".py")].replace("/", ".")
    if not func:
        return f"{module}.*"
    if "." in func:
        cls, meth = func.split(".", 1)
        return f"{module}.xǁ{cls}ǁ{meth}__mutmut_*"
    return f"{module}.x_{func}__mutmut_*"


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare_workdir(group: Group, *, keep: bool, folder: str | None = None) -> Path:
    work = WORK / (folder or group.name)
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for part in ("hubtune", "tests"):
        target = work / part
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(REPO / part, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(PLUGIN, work / "mutation_plugin.py")
    # Before mutmut starts: Python caches "nothing to import here" for a PYTHONPATH folder that
    # does not exist yet, and mutmut would then fail to import the plugin from it.
    (work / "mutants").mkdir(exist_ok=True)
    pytest_args = ["-p", "mutation_plugin", "-p", "no:cacheprovider", "-m", "not slow"]
    for node in group.deselect:
        pytest_args += ["--deselect", node]
    config = f"""

[tool.mutmut]
source_paths = ["hubtune"]
only_mutate = {toml_list(group.files)}
also_copy = ["mutation_plugin.py"]
pytest_add_cli_args = {toml_list(pytest_args)}
pytest_add_cli_args_test_selection = {toml_list(group.tests)}
do_not_mutate_patterns = {toml_list(DO_NOT_MUTATE_PATTERNS)}
# wall-clock limit per mutant: 3 x (its tests' clean time + 10 s)
timeout_multiplier = 3.0
timeout_constant = 10.0
process_isolation = "forkserver"
use_git_change_detection = false
"""
    text = (REPO / "pyproject.toml").read_text() + config
    (work / "pyproject.toml").write_text(text)
    if keep:
        # A re-run with changed tests: copy them into the mutated tree too, so the stats
        # (which tests call which function) are collected again for the new tests.
        mutated_tests = work / "mutants" / "tests"
        if mutated_tests.exists():
            shutil.rmtree(mutated_tests)
    return work


def read_results(work: Path, group: Group) -> dict[str, int | None]:
    globs = [mutant_glob(s) for s in group.functions] or [mutant_glob(f) for f in group.files]
    out: dict[str, int | None] = {}
    for path in group.files:
        meta = work / "mutants" / (path + ".meta")
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        for key, code in data["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(key, g) for g in globs):
                out[key] = code
    return out


def status_of(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    return str(status_by_exit_code[code])


def function_of(key: str) -> str:
    name = key.partition("__mutmut_")[0].rpartition(".")[2]
    return name.replace("xǁ", "").replace("ǁ", ".").removeprefix("x_")


def show(work: Path, key: str, mutmut: str) -> str:
    proc = subprocess.run(
        [mutmut, "show", key], cwd=work, capture_output=True, text=True, env=run_env(work)
    )
    lines = proc.stdout.splitlines()
    diff = [ln for ln in lines if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    return "\n".join(diff) if diff else proc.stdout.strip()


def run_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The mutated copy first for the test processes and anything they start; never the
    # checkout (nor the editable install's finder, which comes after sys.path).
    env["PYTHONPATH"] = str(work / "mutants")
    env.pop("MUTANT_UNDER_TEST", None)
    return env


def run_group(
    group: Group,
    *,
    survivors_only: bool,
    max_children: int,
    previous: dict[str, Any] | None,
    keep: bool = False,
    rest: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    mutmut = str(Path(sys.executable).parent / "mutmut")
    names: list[str]
    if survivors_only:
        # What the last run did not kill: survivors and timeouts; with `rest`, also the mutants
        # a stopped run never reached.
        skip = {"killed"} if rest else {"killed", "not checked"}
        names = [
            k
            for k, code in (previous or {}).get("exit_codes", {}).items()
            if status_of(code) not in skip
        ]
        if only:
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in only)]
        if not names:
            print(f"[{group.name}] nothing left to re-run", flush=True)
            return previous or {}
    else:
        names = [mutant_glob(s) for s in group.functions] or [mutant_glob(f) for f in group.files]
    work = prepare_workdir(group, keep=survivors_only or keep)
    command = [mutmut, "run", "--max-children", str(max_children), *names]
    log = WORK / f"{group.name}.log"
    print(f"[{group.name}] {shlex.join(command[1:4])} ... ({len(names)} name(s)); log: {log}")
    at_start = machine()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            command, cwd=work, env=run_env(work), stdout=out, stderr=subprocess.STDOUT
        )
    wall = time.monotonic() - start
    results = read_results(work, group)
    if survivors_only and previous:
        merged = {k: v for k, v in previous.get("exit_codes", {}).items()}
        merged.update({k: v for k, v in results.items() if k in names})
        results = merged
    counts = {s: 0 for s in STATUSES}
    counts["not checked"] = 0
    for code in results.values():
        status = status_of(code)
        counts[status] = counts.get(status, 0) + 1
    total = len(results)
    decided = total - counts["not checked"]
    survivors = []
    for key, code in sorted(results.items()):
        if status_of(code) in ("survived", "timeout", "suspicious", "no tests"):
            survivors.append(
                {
                    "mutant": key,
                    "function": function_of(key),
                    "status": status_of(code),
                    "diff": show(work, key, mutmut),
                }
            )
    found = {function_of(k) for k in results}
    missing = [
        s
        for s in group.functions
        if ":" in s and s.partition(":")[2] not in found and "*" not in s.partition(":")[2]
    ]
    per_function: dict[str, dict[str, int]] = {}
    for key, code in results.items():
        row = per_function.setdefault(function_of(key), {})
        row[status_of(code)] = row.get(status_of(code), 0) + 1
    entry = {
        "group": group.name,
        "files": group.files,
        "functions": group.functions or ["(all)"],
        "tests": group.tests,
        "deselected": group.deselect,
        "security": group.security,
        "exit_code": proc.returncode,
        "total": total,
        "counts": counts,
        "kill_share": (counts["killed"] / decided) if decided else None,
        "survivors": survivors,
        "missing_functions": missing,
        "per_function": per_function,
        "exit_codes": results,
        "command": "cd build/mutation/"
        + group.name
        + " && "
        + (
            shlex.join(["mutmut", *command[1:4]]) + f" <{len(names)} mutants not killed before>"
            if survivors_only
            else shlex.join(["mutmut", *command[1:]])
        ),
        "wall_s": round(wall, 1),
        "runs": ((previous or {}).get("runs", []) if survivors_only else [])
        + [
            {
                "mutants": len(names) if survivors_only else total,
                "wall_s": round(wall, 1),
                "started": started,
                "load_average_at_start": at_start["load_average_at_start"],
                "command": "cd build/mutation/"
                + group.name
                + " && "
                + shlex.join(["mutmut", *command[1:4]])
                + (f" <{len(names)} mutant names>" if len(command) > 4 else ""),
            }
        ],
        "started": (previous or {}).get("started", started) if survivors_only else started,
        "machine_at_start": (previous or {}).get("machine_at_start", at_start)
        if survivors_only
        else at_start,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "survivors_only_rerun": survivors_only,
    }
    print(
        f"[{group.name}] {total} mutants: {counts['killed']} killed, {counts['survived']} survived, "
        f"{counts['timeout']} timeout, {counts['no tests']} without tests, in {wall:.0f} s",
        flush=True,
    )
    return entry


def count_mutants(group: Group) -> int:
    """How many mutants a group has, without running any test (to estimate a run not made)."""
    work = prepare_workdir(group, keep=False, folder=f"{group.name}-count")
    here = os.getcwd()
    os.chdir(work)
    try:
        from mutmut.configuration import reset_config
        from mutmut.mutation.file_mutation import mutate_file_contents

        reset_config()
        globs = [mutant_glob(s) for s in group.functions] or [mutant_glob(f) for f in group.files]
        count = 0
        for path in group.files:
            module = path[: -len(".py")].replace("/", ".")
            mutated = mutate_file_contents(path, Path(path).read_text())
            names = [f"{module}.{name}" for name in mutated.mutant_names]
            count += sum(any(fnmatch.fnmatchcase(n, g) for g in globs) for n in names)
        return count
    finally:
        os.chdir(here)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def share(entry: dict[str, Any]) -> str:
    value = entry.get("kill_share")
    return "-" if value is None else f"{100 * value:.1f}%"


def render(report: dict[str, Any], notes: dict[str, str]) -> str:
    m = report["machine"]
    lines = [
        "# Mutation testing (mutmut)",
        "",
        f"Tool: mutmut {report['tool_version']}. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_gib']} GiB RAM, Python {m['python']}, shared with other work (each group's "
        "start time and load average are in the table).",
        "",
        "Re-run: `bash scripts/mutation.sh [group ...]` (groups: "
        + ", ".join(g.name for g in GROUPS)
        + "); `--survivors` re-runs only the last survivors. Not part of CI.",
        "",
        "Kill share = killed / (mutants that were run); a timeout (a mutant that made its "
        "tests run past 3 x their clean time, e.g. a search that no longer converges) is "
        "counted apart, not as killed. 'Not run yet' are mutants a stopped run did not reach "
        "(`--rest` runs them). Every survivor is listed with its diff and, where it cannot "
        "change behaviour (or not on this CPU-only machine), why. Lines that only log, and "
        "string literals alone on a line (error message text), are not mutated "
        "(`do_not_mutate_patterns` in bench/mutation.py); mutmut does not mutate decorated "
        "functions (properties).",
        "",
        "Columns: 'explained' counts the survivors and timeouts that bench/mutation_equivalents.json "
        "explains (equivalent, or not observable on this CPU-only machine); 'kill share' is the "
        "raw share, killed / (run); 'with explained' is (killed + explained) / (run). 'Load' is "
        "the 1/5/15-minute load average when the group started.",
        "",
        "| group | files | mutants | killed | survived | timeout | no tests | skipped | not run yet "
        "| explained | kill share | with explained | wall | started (UTC) | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- | --- |",
    ]
    for g in GROUPS:
        e = report["groups"].get(g.name)
        if not e:
            est = report.get("estimates", {}).get(g.name)
            what = (
                f"not run ({est['mutants']} mutants, about {est['estimated_min']} min)"
                if est
                else "not run"
            )
            lines.append(f"| {g.name} | {', '.join(g.files)} | {what} | | | | | | | | | | | | |")
            continue
        c = e["counts"]
        explained = sum(1 for v in e["survivors"] if v["mutant"] in notes)
        decided = e["total"] - c.get("not checked", 0)
        with_explained = f"{100 * (c['killed'] + explained) / decided:.1f}%" if decided else "-"
        load = e.get("machine_at_start", {}).get("load_average_at_start")
        lines.append(
            f"| {g.name}{' (security)' if e['security'] else ''} | {', '.join(e['files'])} | "
            f"{e['total']} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | "
            f"{c['skipped']} | {c.get('not checked', 0)} | {explained} | {share(e)} | "
            f"{with_explained} | "
            f"{sum(r['wall_s'] for r in e.get('runs', [e])) / 60:.1f} min"
            + (" (stopped before the end)" if c.get("not checked") else "")
            + f" | {e.get('started', '-')} | "
            + (", ".join(f"{x:.1f}" for x in load) if load else "-")
            + " |"
        )
    if report.get("notes"):
        lines += ["", "Notes on this run:", ""] + [f"- {n}" for n in report["notes"]]
    for g in GROUPS:
        e = report["groups"].get(g.name)
        if not e:
            continue
        lines += [
            "",
            f"## {g.name}",
            "",
            f"- Mutated: {', '.join(e['functions'])}",
            f"- Tests: {' '.join(e['tests'])} (`-m 'not slow'`"
            + (
                f"; deselected: {', '.join(d.split('::')[1] for d in e['deselected'])}"
                if e["deselected"]
                else ""
            )
            + ")",
            f"- Command: `{e['command']}` (mutmut exit code {e['exit_code']}; "
            f"{'re-run of the mutants not killed before' if e['survivors_only_rerun'] else 'full run'} "
            f"finished {e['finished']}, {e['wall_s'] / 60:.1f} min; runs: "
            + ", ".join(
                f"{r['mutants']} mutants in {r['wall_s'] / 60:.1f} min"
                + (f" from {r['started']}" if r.get("started") else "")
                + (f" (`{r['command']}`)" if r.get("command") else "")
                for r in e.get("runs", [])
            )
            + ")",
        ]
        if e["missing_functions"]:
            lines.append(
                f"- NOT FOUND (update ENDPOINT_FUNCTIONS?): {', '.join(e['missing_functions'])}"
            )
        lines += [
            "",
            "| function | killed | survived | timeout | not run yet | other |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for func, row in sorted(e["per_function"].items()):
            named = ("killed", "survived", "timeout", "not checked")
            other = sum(v for k, v in row.items() if k not in named)
            lines.append(
                f"| {func} | {row.get('killed', 0)} | {row.get('survived', 0)} | "
                f"{row.get('timeout', 0)} | {row.get('not checked', 0)} | {other} |"
            )
        if e["survivors"]:
            lines += ["", "Survivors:", ""]
            for s in e["survivors"]:
                note = notes.get(s["mutant"]) or (
                    "timeout: its tests did not finish within the limit (the mutant makes them "
                    "hang, which CI would notice); counted apart, not as killed"
                    if s["status"] == "timeout"
                    else "NOT YET EXPLAINED"
                )
                diff = s["diff"].replace("\n", " / ")
                if len(diff) > 300:
                    diff = diff[:300] + " ..."
                lines.append(f"- `{s['mutant']}` ({s['status']}): `{diff}` — {note}")
    return "\n".join(lines) + "\n"


def load_notes() -> dict[str, str]:
    path = REPO / "bench" / "mutation_equivalents.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("groups", nargs="*", help="groups to run (default: all, in priority order)")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-run only the last run's survivors and timeouts (e.g. after adding tests)",
    )
    parser.add_argument(
        "--rest",
        action="store_true",
        help="like --survivors, and also the mutants a stopped run did not reach",
    )
    parser.add_argument(
        "--max-children", type=int, default=1, help="mutants run at once (default 1)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="with --survivors: re-run only the mutants matching GLOB (repeatable), e.g. the "
        "ones a new test targets",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render the Markdown report")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="reuse the group's work folder (mutants already generated) for a full run",
    )
    parser.add_argument(
        "--count",
        action="store_true",
        help="only count the mutants of the groups (no test run) and estimate their run time",
    )
    args = parser.parse_args(argv)
    by_name = {g.name: g for g in GROUPS}
    unknown = [g for g in args.groups if g not in by_name]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {list(by_name)}")
    json_path = RESULTS / "mutation.json"
    report: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    report.setdefault("groups", {})
    if args.count:
        ensure_mutmut()
        done = [e for e in report["groups"].values() if e.get("total")]
        per_mutant = sum(e["wall_s"] for e in done) / max(1, sum(e["total"] for e in done))
        estimates = {}
        for name in args.groups or list(by_name):
            n = count_mutants(by_name[name])
            estimates[name] = {"mutants": n, "estimated_min": round(n * per_mutant / 60)}
            print(
                f"[{name}] {n} mutants, about {n * per_mutant / 60:.0f} min at {per_mutant:.1f} s each"
            )
        # Read again before writing: a group may have finished meanwhile.
        report = json.loads(json_path.read_text()) if json_path.exists() else report
        report.setdefault("estimates", {}).update(estimates)
        write_atomic(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    elif not args.report_only:
        version = ensure_mutmut()
        report["tool_version"] = version
        report["machine"] = machine()
        WORK.mkdir(parents=True, exist_ok=True)
        for name in args.groups or list(by_name):
            entry = run_group(
                by_name[name],
                survivors_only=args.survivors or args.rest,
                rest=args.rest,
                max_children=args.max_children,
                previous=report["groups"].get(name),
                keep=args.keep,
                only=args.only,
            )
            if entry:
                # Read again before writing: groups may run in parallel invocations.
                latest = json.loads(json_path.read_text()) if json_path.exists() else {}
                latest.setdefault("groups", {})[name] = entry
                latest["tool_version"] = version
                latest["machine"] = report["machine"]
                report = latest
            write_atomic(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
            write_atomic(RESULTS / "mutation.md", render(report, load_notes()))
    write_atomic(RESULTS / "mutation.md", render(report, load_notes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
