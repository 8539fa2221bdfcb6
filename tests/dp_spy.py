"""Record what Opacus actually applies at every DP step, to hold it against the ledger.

The ledger is the accountant's record; a bug between the recipe and Opacus (a clipping bound
passed wrong, the secret sampling generator not installed, σ re-planned but not applied) would
leave it looking right. This spy reads the live objects at each logical step: the optimizer's
σ and C, the sampler's rate and generator, the module's C under ghost clipping, and the std of
every noise draw.

In-process: ``spy = DPSpy(); spy.install(monkeypatch)``. In subprocesses (several ranks): put
:func:`sitecustomize_dir` first on ``PYTHONPATH``; each rank appends its steps to
``$HUBTUNE_TEST_DP_SPY/rank-<i>.jsonl``.
"""

from __future__ import annotations

import json
import os
from itertools import groupby
from pathlib import Path
from typing import Any

SPY_ENV = "HUBTUNE_TEST_DP_SPY"


class DPSpy:
    def __init__(self, sink: Path | None = None) -> None:
        self.steps: list[dict[str, Any]] = []
        self.noise_std: list[float] = []
        self.runs: list[Any] = []
        self.sink = sink

    def install(self, monkeypatch: Any = None) -> None:
        from opacus.optimizers import optimizer as plain
        from opacus.optimizers import optimizer_fast_gradient_clipping as ghost

        import hubtune.train as train

        def patch(owner: Any, name: str, value: Any) -> None:
            if monkeypatch is not None:
                monkeypatch.setattr(owner, name, value)
            else:
                setattr(owner, name, value)

        real_prepare = train.prepare_private

        def prepare_private(**kwargs: Any) -> Any:
            run = real_prepare(**kwargs)
            self.runs.append(run)
            self._watch(run)
            return run

        patch(train, "prepare_private", prepare_private)
        for module in (plain, ghost):
            real_noise = module._generate_noise

            def generate_noise(*args: Any, _real: Any = real_noise, **kwargs: Any) -> Any:
                self.noise_std.append(float(kwargs["std"] if "std" in kwargs else args[0]))
                return _real(*args, **kwargs)

            patch(module, "_generate_noise", generate_noise)

    def _watch(self, run: Any) -> None:
        hook = run.optimizer.step_hook
        sampling, noise = run.generator_state.generators

        def step_hook(optimizer: Any) -> None:
            sampler = run.loader.batch_sampler
            record = {
                "sigma": float(optimizer.noise_multiplier),
                "C": float(optimizer.max_grad_norm),
                "module_C": getattr(run.model, "max_grad_norm", None),
                "q": float(sampler.sample_rate),
                "expected_batch_size": int(optimizer.expected_batch_size),
                # The secret generators, not a fallback to the recipe's public seed.
                "sampler_generator_secret": sampler.generator is sampling,
                "noise_generator_secret": optimizer.generator is noise,
            }
            self.steps.append(record)
            if self.sink is not None:
                with self.sink.open("a") as out:
                    out.write(json.dumps(record) + "\n")
            hook(optimizer)

        run.optimizer.step_hook = step_hook

    def assert_matches(self, ledger: dict[str, Any], *, n: int | None = None) -> None:
        assert_steps_match(self.steps, ledger, n=n)
        applied = {round(s, 9) for s in self.noise_std}
        expected = {round(s["sigma"] * s["C"], 9) for s in self.steps}
        assert applied <= expected, f"noise drawn at std {applied}, ledger implies {expected}"


def assert_steps_match(
    steps: list[dict[str, Any]], ledger: dict[str, Any], *, n: int | None = None
) -> None:
    """Every applied step agrees with the ledger: σ per segment, C, q, secret generators."""
    history = [(float(s), float(q), int(k)) for s, q, k in ledger["history"]]
    applied = [(sigma, len(list(group))) for sigma, group in groupby(s["sigma"] for s in steps)]
    assert applied == [(s, k) for s, _, k in history], (applied, history)
    assert sum(k for _, _, k in history) == ledger["steps"] == len(steps)
    for step in steps:
        assert step["C"] == ledger["max_grad_norm"], step
        if step["module_C"] is not None:  # ghost clipping clips in the module
            assert step["module_C"] == ledger["max_grad_norm"], step
        assert step["q"] == ledger["sample_rate"] == history[0][1], step
        if n is not None:
            assert step["expected_batch_size"] == round(step["q"] * n), step
        assert step["sampler_generator_secret"] and step["noise_generator_secret"], step


def sitecustomize_dir(folder: Path, sink: Path) -> Path:
    """A folder whose ``sitecustomize.py`` installs the spy in every Python process started."""
    folder.mkdir(parents=True, exist_ok=True)
    sink.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get({SPY_ENV!r}):\n"
        "    from tests.dp_spy import install_from_env\n"
        "    install_from_env()\n"
    )
    return folder


def install_from_env() -> None:
    sink_dir = Path(os.environ[SPY_ENV])
    rank = os.environ.get("RANK", "0")
    DPSpy(sink=sink_dir / f"rank-{rank}.jsonl").install()


def read_rank_steps(sink: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        path.stem: [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(sink.glob("rank-*.jsonl"))
    }
