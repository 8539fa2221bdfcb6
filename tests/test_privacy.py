"""DP-SGD runs: the ledger is right and recomputable, refusals are clear, nothing silently breaks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from hubtune import train as train_module
from hubtune.errors import RunError
from hubtune.pipeline import run_recipe
from hubtune.privacy import PrivacyError, check_modules, compute_epsilons, max_steps_within
from hubtune.recipe import Recipe

from .conftest import make_sentiment_frame, recipe_dict
from .dp_spy import DPSpy, assert_steps_match, read_rank_steps, sitecustomize_dir

ROOT = Path(__file__).parents[1]
DP = {"enabled": True, "target_epsilon": 4.0, "logical_batch_size": 64, "physical_batch_size": 16}


@pytest.fixture()
def dp_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_sentiment_frame(900).to_csv(path, index=False)
    return path


def _spec(
    model: Path,
    csv: Path,
    out: Path,
    privacy_section: dict | None = None,
    epochs: int = 2,
    **method: object,
) -> dict:
    spec = recipe_dict(model, csv, out, **method)
    spec["train"].update(epochs=epochs, lr=0.01)
    spec["privacy"] = {**DP, **(privacy_section or {})}
    return spec


def _independent_epsilons(history: list[list[float]], delta: float) -> dict[str, float]:
    """ε from Google's dp_accounting, a library hubtune does not use."""
    import dp_accounting
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), int(steps)
        )
        for sigma, q, steps in history
    ]
    rdp = dp_accounting.rdp.RdpAccountant()
    pld = pld_privacy_accountant.PLDAccountant()
    for event in events:
        rdp.compose(event)
        pld.compose(event)
    return {"rdp": rdp.get_epsilon(delta), "pld": pld.get_epsilon(delta)}


def test_ledger_matches_an_independent_accountant(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    result = run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path)))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    n = ledger["dataset_size"]
    assert ledger["sampling"] == "poisson" and ledger["accountant"] == "prv"
    assert ledger["sample_rate"] == pytest.approx(1 / -(-n // 64))
    assert ledger["delta"] < 1 / n
    assert (
        ledger["steps"]
        == sum(h[2] for h in ledger["history"])
        == 2 * round(1 / ledger["sample_rate"])
    )
    assert ledger["epsilon"] <= 4.0 and ledger["epsilon"] == ledger["epsilon_by_accountant"]["prv"]
    independent = _independent_epsilons(ledger["history"], ledger["delta"])
    assert ledger["epsilon_by_accountant"]["rdp"] == pytest.approx(independent["rdp"], rel=0.01)
    assert ledger["epsilon_by_accountant"]["prv"] == pytest.approx(independent["pld"], rel=0.02)
    # Poisson sampling really happened: batch sizes vary around q*n, one per accounted step.
    observed = ledger["observed_batch_sizes"]
    assert observed["steps"] == ledger["steps"]
    assert observed["min"] < observed["max"]
    assert (
        abs(observed["mean"] - observed["expected"])
        < 4 * (observed["expected"] ** 0.5) / observed["steps"] ** 0.5
    )
    # The noise seed is secret: neither the ledger nor run.json says what it was.
    assert ledger["noise_source"] == "os.urandom"
    assert ledger["guarantee_void"] is False and ledger["guarantee"].endswith(
        "-DP at the example level"
    )
    text = (result.run_dir / "privacy.json").read_text() + (result.run_dir / "run.json").read_text()
    assert "noise_seed" not in text
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["privacy"]["enabled"] and run["privacy"]["epsilon"] == ledger["epsilon"]
    assert (result.run_dir / "model" / "hubtune_privacy.json").exists()


def test_lora_weights_move_under_dp_and_adapter_reproduces_logits(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, dp_csv, tmp_path, name="lora", r=4)
    result = run_recipe(Recipe.model_validate(spec))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert any("lora_A" in n for n in ledger["trained_parameters"])
    assert any("lora_B" in n for n in ledger["trained_parameters"])
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero
    assert_adapter_reproduces_predictions(result.run_dir, dp_csv)


def assert_adapter_reproduces_predictions(run_dir: Path, csv: Path) -> None:
    """The saved adapter, reloaded by plain peft, gives the run's test probabilities."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(
        run_dir / "adapter", num_labels=2
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    data = pd.read_csv(csv)
    texts = [data.loc[int(r.split(":")[1]), "text"] for r in predictions["row_id"]]
    with torch.no_grad():
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        ).logits
    assert (
        abs(torch.softmax(logits, -1)[:, 1].numpy() - predictions["prob_pos"].to_numpy()).max()
        < 1e-4
    )


def test_unchanged_trained_tensors_stop_the_run(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opacus #820 failure mode: ε grows while some trained tensor never moves."""
    real_step = torch.optim.AdamW.step

    def step_skipping_bias(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 1:
                    p.grad = None  # as if this tensor's gradient never reached the optimizer
        return real_step(self, closure)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_skipping_bias)
    with pytest.raises(RunError, match="unchanged after the first step"):
        run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path)))


def test_budget_guard_stops_before_the_target(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubtune.privacy import accounting as privacy

    real = privacy.sigma_for_target

    def too_little_noise(**kwargs):  # type: ignore[no-untyped-def]
        return real(**kwargs) * 0.8  # a σ that would overshoot the target if all steps ran

    monkeypatch.setattr(privacy, "sigma_for_target", too_little_noise)
    result = run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path, epochs=3)))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    planned = 3 * round(1 / ledger["sample_rate"])
    assert ledger["stopped_by_budget"] and ledger["steps"] < planned
    assert ledger["epsilon"] <= 4.0
    one_more = compute_epsilons(
        [[ledger["noise_multiplier"], ledger["sample_rate"], ledger["steps"] + 1]], ledger["delta"]
    )["prv"]
    assert one_more > 4.0  # it stopped at the last step that fit


@pytest.mark.parametrize(
    ("accountant", "q", "steps", "target"),
    [
        ("prv", 0.1, 20, 4.0),
        ("prv", 1 / 8, 64, 1.0),
        ("prv", 1 / 32, 64, 8.0),
        ("rdp", 0.1, 20, 4.0),
    ],
)
def test_sigma_for_target_lands_just_under_the_target_in_few_evaluations(
    monkeypatch: pytest.MonkeyPatch, accountant: str, q: float, steps: int, target: float
) -> None:
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    from hubtune.privacy import accounting as privacy

    seen: list[float] = []
    real = privacy._epsilon

    def counting(name: str, history: list, delta: float) -> float:  # type: ignore[type-arg]
        seen.append(history[-1][0])
        return real(name, history, delta)

    monkeypatch.setattr(privacy, "_epsilon", counting)
    sigma = privacy.sigma_for_target(
        accountant=accountant, prior=[], q=q, steps=steps, delta=1e-5, target=target
    )
    eps = real(accountant, [(sigma, q, steps)], 1e-5)
    assert target - 0.01 <= eps <= target
    assert len(seen) <= 8 and min(seen) >= privacy.MIN_SIGMA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_noise_multiplier(
            target_epsilon=target,
            target_delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant=accountant,
        )
    assert sigma == pytest.approx(theirs, rel=0.01)  # Opacus' bisection, same tolerance


def test_sigma_for_target_after_prior_training_and_at_the_floor() -> None:
    from hubtune.privacy import accounting as privacy

    prior = [(1.0, 0.1, 20)]
    sigma = privacy.sigma_for_target(
        accountant="prv", prior=prior, q=0.05, steps=40, delta=1e-5, target=6.0
    )
    assert 5.99 <= compute_epsilons([*prior, (sigma, 0.05, 40)], 1e-5)["prv"] <= 6.0
    # A target that even σ = MIN_SIGMA stays under: the floor, never a σ hubtune cannot account.
    assert (
        privacy.sigma_for_target(
            accountant="rdp", prior=[], q=0.01, steps=10, delta=1e-5, target=1e4
        )
        == privacy.MIN_SIGMA
    )


def test_memoized_rdp_orders_equal_the_library_values() -> None:
    from opacus.accountants.analysis import rdp

    from hubtune.privacy.accounting import _memoize_rdp_orders

    _memoize_rdp_orders()
    _memoize_rdp_orders()  # idempotent: wrapped once
    original = rdp._compute_rdp.__wrapped__
    assert not hasattr(original, "cache_info")
    for q, sigma, alpha in [(0.1, 0.9, 1.5), (0.01, 2.0, 32), (1 / 32, 0.8, 7.3), (0.5, 0.4, 2.0)]:
        assert rdp._compute_rdp(q, sigma, alpha) == original(q, sigma, alpha)
        assert rdp._compute_rdp(q, sigma, alpha) == original(q, sigma, alpha)  # from the cache


def test_max_steps_within_is_the_largest_fitting_count() -> None:
    steps = max_steps_within(
        accountant="rdp", prior=[], sigma=1.0, q=0.01, delta=1e-5, target=2.0, upper=10_000
    )
    eps = lambda k: compute_epsilons([(1.0, 0.01, k)], 1e-5)["rdp"]  # noqa: E731
    assert 0 < steps < 10_000 and eps(steps) <= 2.0 < eps(steps + 1)


def test_ghost_clipping_on_a_layer_called_twice_is_refused_with_the_fix(
    tiny_gpt2: Path, dp_csv: Path, tmp_path: Path
) -> None:
    """GPT-2 (with a tokenizer that gives token_type_ids) calls wte twice: ghost cannot, hooks can."""
    spec = _spec(tiny_gpt2, dp_csv, tmp_path / "ghost", {"grad_sample_mode": "ghost"}, epochs=1)
    spec["method"] = {"name": "full"}
    with pytest.raises(RunError, match=r"Parameter tying.*grad_sample_mode: hooks"):
        run_recipe(Recipe.model_validate(spec))
    spec = _spec(tiny_gpt2, dp_csv, tmp_path / "hooks", {"grad_sample_mode": "hooks"}, epochs=1)
    spec["method"] = {"name": "full"}
    result = run_recipe(Recipe.model_validate(spec))
    assert json.loads((result.run_dir / "privacy.json").read_text())["grad_sample_mode"] == "hooks"


def test_refusals_say_why(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RunError, match=r"not below 1/n"):
        run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path / "a", {"delta": 0.01})))
    monkeypatch.setitem(sys.modules, "torchcsprng", None)  # make sure it is missing
    with pytest.raises(RunError, match="needs the torchcsprng package"):
        run_recipe(
            Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path / "b", {"secure_mode": True}))
        )
    with pytest.raises(ValidationError, match="fp16 GradScaler"):
        spec = _spec(tiny_bert, dp_csv, tmp_path / "c")
        spec["train"]["mixed_precision"] = "fp16"
        Recipe.model_validate(spec)


def test_trainable_batchnorm_is_refused_frozen_is_fine() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        PrivacyError, match="BatchNorm.*DP guarantee does not hold.*method.batchnorm: frozen"
    ):
        check_modules(model)
    for p in model[1].parameters():
        p.requires_grad_(False)
    check_modules(model)


def test_preflight_finds_tensors_without_per_example_gradients(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_module.prepare_private

    def with_unused_parameter(**kwargs):  # type: ignore[no-untyped-def]
        # A trainable tensor that the forward pass never uses gets no per-example gradient.
        kwargs["model"].add_module("orphan", nn.Linear(2, 2))
        return real(**kwargs)

    monkeypatch.setattr(train_module, "prepare_private", with_unused_parameter)
    with pytest.raises(RunError, match="per-example gradient"):
        run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path)))


def test_continued_dp_training_adds_to_epsilon(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    first = run_recipe(
        Recipe.model_validate(
            _spec(tiny_bert, dp_csv, tmp_path / "one", {"target_epsilon": 2.0}, name="full")
        )
    )
    spec = _spec(
        first.run_dir / "model", dp_csv, tmp_path / "two", {"target_epsilon": 3.0}, name="full"
    )
    second = run_recipe(Recipe.model_validate(spec))
    one = json.loads((first.run_dir / "privacy.json").read_text())
    two = json.loads((second.run_dir / "privacy.json").read_text())
    assert two["prior_history"] == one["history"]
    assert one["epsilon"] < two["epsilon"] <= 3.0
    assert two["epsilon"] == pytest.approx(
        compute_epsilons(two["prior_history"] + two["history"], two["delta"])["prv"]
    )


def test_ghost_clipping_runs_with_lora(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = DPSpy()
    spy.install(monkeypatch)
    spec = _spec(
        tiny_bert,
        dp_csv,
        tmp_path,
        {"grad_sample_mode": "ghost", "max_grad_norm": 0.5},
        epochs=1,
        name="lora",
        r=4,
    )
    result = run_recipe(Recipe.model_validate(spec))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    assert ledger["grad_sample_mode"] == "ghost" and ledger["epsilon"] <= 4.0
    assert ledger["max_grad_norm"] == 0.5
    spy.assert_matches(ledger, n=ledger["dataset_size"])
    assert all(step["module_C"] == 0.5 for step in spy.steps)  # the module clips (ghost)


def _hubtune(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hubtune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_ledger_and_weights(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    import yaml

    env = dict(os.environ, PYTHONPATH=str(ROOT), HUBTUNE_UNSAFE_DP_SEED="7")
    paths = {}
    for name in ("whole", "killed"):
        spec = _spec(tiny_bert, dp_csv, tmp_path / name, epochs=3, name="full")
        spec["train"]["log_with"] = []
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    whole = _hubtune("run", str(paths["whole"]), env=env)
    assert whole.wait(timeout=600) == 0, whole.stdout.read() if whole.stdout else ""
    killed = _hubtune("run", str(paths["killed"]), env=env)
    run_dir = tmp_path / "killed" / "tiny"
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "epoch-1" / "trainer_state.json").exists():
        assert killed.poll() is None and time.time() < deadline, (
            "run ended before it could be killed"
        )
        time.sleep(0.05)
    time.sleep(0.5)  # now in the middle of epoch 2
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (run_dir / "run.json").exists()
    resumed = _hubtune("run", str(paths["killed"]), "--resume", env=env)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    a = json.loads((tmp_path / "whole" / "tiny" / "privacy.json").read_text())
    b = json.loads((run_dir / "privacy.json").read_text())
    for key in ("history", "epsilon", "epsilon_by_accountant", "steps", "observed_batch_sizes"):
        assert a[key] == b[key], key
    # The fixed seed that makes this comparable voids the guarantee, and the ledger says so.
    assert b["guarantee_void"] is True and b["guarantee"].startswith("NONE: HUBTUNE_UNSAFE_DP_SEED")
    assert "NO GUARANTEE" in out
    wa = load_file(tmp_path / "whole" / "tiny" / "model" / "model.safetensors")
    wb = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("top", [None, 1], ids=["lora", "lora-top1-prefix-cache"])
def test_two_processes_poisson_per_rank_and_one_ledger(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, top: int | None
) -> None:
    import shutil

    import yaml

    spec = _spec(tiny_bert, dp_csv, tmp_path, epochs=2, name="lora", r=4, adapt_top_k=top)
    spec["train"]["log_with"] = []
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(spec))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate
    sink = tmp_path / "spy"
    site = sitecustomize_dir(tmp_path / "site", sink)
    out = subprocess.run(
        [accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "hubtune", "run", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", HUBTUNE_TEST_DP_SPY=str(sink)),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ledger = json.loads((tmp_path / "tiny" / "privacy.json").read_text())
    assert ledger["num_processes"] == 2
    cache = json.loads((tmp_path / "tiny" / "run.json").read_text())["feature_cache"]
    assert cache["used"] is (top is not None)
    steps_per_epoch = round(1 / ledger["sample_rate"])
    # Each rank sampled its own shard; the accountant counted exactly the steps taken.
    assert ledger["steps"] == 2 * steps_per_epoch == ledger["observed_batch_sizes"]["steps"]
    observed = ledger["observed_batch_sizes"]
    assert observed["min"] < observed["max"]
    assert (
        abs(observed["mean"] - observed["expected"])
        < 4 * observed["expected"] ** 0.5 / observed["steps"] ** 0.5
    )
    assert ledger["epsilon"] <= 4.0
    assert ledger["epsilon_by_accountant"]["rdp"] == pytest.approx(
        _independent_epsilons(ledger["history"], ledger["delta"])["rdp"], rel=0.01
    )
    # What each rank's Opacus applied, step by step, is what the one ledger says.
    ranks = read_rank_steps(sink)
    assert sorted(ranks) == ["rank-0", "rank-1"], sorted(ranks)
    for name, steps in ranks.items():
        assert_steps_match(steps, ledger)
        assert all(step["expected_batch_size"] > 0 for step in steps), name


def test_tiny_noise_is_refused_and_never_exhausts_memory() -> None:
    base = {
        "name": "x",
        "model": {"id": "o/m"},
        "data": {"source": "d.csv"},
        "method": {"name": "full"},
    }
    with pytest.raises(ValidationError, match="greater than or equal to 0.3"):
        Recipe.model_validate({**base, "privacy": {"enabled": True, "noise_multiplier": 0.01}})
    # σ = 0.01 made the PRV accountant allocate > 6 GB; now it is reported as unbounded at once.
    assert compute_epsilons([(0.01, 1 / 16, 16)], 1e-5) == {
        "prv": float("inf"),
        "rdp": float("inf"),
    }


def test_sgd_optimizer_under_dp_takes_momentum_steps(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.optimizer: sgd reaches the DP optimizer as torch SGD with the recipe's momentum."""
    seen: list[torch.optim.Optimizer] = []
    real = train_module.prepare_private

    def spy(**kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["optimizer"])
        return real(**kwargs)

    monkeypatch.setattr(train_module, "prepare_private", spy)
    spec = _spec(tiny_bert, dp_csv, tmp_path, epochs=1, name="lora", r=4)
    spec["train"].update(optimizer="sgd", momentum=0.8, lr=0.5)
    result = run_recipe(Recipe.model_validate(spec))
    (optimizer,) = seen
    assert isinstance(optimizer, torch.optim.SGD)
    assert {group["momentum"] for group in optimizer.param_groups} == {0.8}
    assert json.loads((result.run_dir / "privacy.json").read_text())["epsilon"] <= 4.0


def _poison_training_loss(
    monkeypatch: pytest.MonkeyPatch, poison: Callable[[int], bool], grad_only: bool = False
) -> dict[str, int]:
    """Wrap the loss hubtune trains with; ``poison(n)`` says whether training pass n breaks.

    A chosen pass returns ``loss * nan``, or with ``grad_only``, the same value with NaN
    gradients (d√u at u = 0, times 0). Returns the live count of training passes, ``["n"]``.
    """
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def wrapped(logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        loss = real(logits, labels, **kwargs)
        if not logits.requires_grad:  # evaluation
            return loss
        calls["n"] += 1
        if not poison(calls["n"]):
            return loss
        if grad_only:
            return loss + 0.0 * torch.sqrt(logits - logits.detach()).sum()
        return loss * float("nan")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", wrapped)
    return calls


def test_non_finite_loss_under_dp_stops_and_keeps_the_last_good_checkpoint(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss in a physical pass (not the last of its logical step) stops the DP run.

    The loss is checked on the device and read a logical step later, so the NaN first reaches
    the weights through that step's update; the run must still stop, name the loss, and leave
    only the last epoch's checkpoint (no run.json).
    """
    spec = _spec(tiny_bert, dp_csv, tmp_path)  # logical 64, physical 16: ~4 passes per step
    recipe = Recipe.model_validate(spec)
    first = recipe.run_dir / "checkpoints" / "epoch-1"
    after = {"n": 0}  # training passes of epoch 2

    def sixth_of_epoch_2(n: int) -> bool:
        after["n"] += first.exists()
        return first.exists() and after["n"] == 6

    _poison_training_loss(monkeypatch, sixth_of_epoch_2)
    with pytest.raises(RunError, match="non-finite loss at epoch 2, step [0-9]+; stopped"):
        run_recipe(recipe)
    assert after["n"] >= 6
    checkpoints = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch-1"]
    assert not (recipe.run_dir / "run.json").exists()


def test_non_finite_gradients_under_dp_stop_the_run(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss with NaN gradients (d√u at u = 0, times 0) stops the run at that step."""
    recipe = Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path, epochs=1))
    calls = _poison_training_loss(monkeypatch, lambda n: n == 5, grad_only=True)
    with pytest.raises(
        RunError, match=r"non-finite weights after step [0-9]+ \(.+\); stopped"
    ) as err:
        run_recipe(recipe)
    assert "_module." not in str(err.value)  # the model's names, not Opacus' wrapper's
    assert calls["n"] >= 5
    assert not (recipe.run_dir / "run.json").exists()


def test_a_nan_in_the_last_pass_of_a_run_is_caught_before_anything_is_saved(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks of a logical step are read one step later; the last step's at the loop's end.

    A first run (fixed DP seed: the same Poisson batches) counts the training passes; the second
    poisons the very last one, whose step has no next step to read its checks.
    """
    monkeypatch.setenv("HUBTUNE_UNSAFE_DP_SEED", "11")
    last = {"pass": 0}
    calls = _poison_training_loss(monkeypatch, lambda n: n == last["pass"])
    first = run_recipe(Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path / "a", epochs=1)))
    steps = json.loads((first.run_dir / "privacy.json").read_text())["steps"]
    last["pass"], calls["n"] = calls["n"], 0
    recipe = Recipe.model_validate(_spec(tiny_bert, dp_csv, tmp_path / "b", epochs=1))
    with pytest.raises(RunError, match=f"non-finite loss at epoch 1, step {steps}; stopped"):
        run_recipe(recipe)
    assert calls["n"] == last["pass"]
    assert not (recipe.run_dir / "run.json").exists()
    assert not list((recipe.run_dir / "checkpoints").glob("epoch-*"))


def test_the_fused_finiteness_check_flags_nan_and_inf_and_never_misses() -> None:
    from hubtune.privacy.loop import any_nonfinite as _any_nonfinite

    finite = [torch.ones(3), torch.zeros(2, 2, dtype=torch.bfloat16), torch.full((2,), -7.0)]
    assert not bool(_any_nonfinite(finite))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert bool(_any_nonfinite([*finite, torch.tensor([0.5, bad])]))
    assert not bool(_any_nonfinite([]))
    assert _any_nonfinite([]).dtype == torch.bool and _any_nonfinite([]).shape == ()
    assert _any_nonfinite(finite).dtype == torch.bool  # a flag, stacked with the loss flag
    # A finite tensor whose norm overflows is flagged too: the caller then checks each tensor
    # exactly, so the fused check may over-report but never misses a NaN or inf.
    assert bool(_any_nonfinite([torch.full((4,), 3e38)]))


class _Rows(torch.utils.data.Dataset):
    """Four features per row (row i holds i), alternating labels; optionally the row index."""

    def __init__(self, n: int, index: bool):
        self.n, self.index = n, index

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        row = {"features": torch.full((4,), float(i)), "labels": i % 2}
        return {**row, "idx": i} if self.index else row


def _private_on_rows(
    model: nn.Module,
    mode: str,
    *,
    rows: int,
    logical: int,
    physical: int,
    lr: float,
    index: bool = False,
) -> Any:
    """hubtune's DP setup (σ = 1, SGD) for ``model`` on ``rows`` rows of _Rows."""
    from hubtune.privacy.engine import prepare_private
    from hubtune.recipe import PrivacySection

    section = PrivacySection(
        enabled=True,
        noise_multiplier=1.0,
        logical_batch_size=logical,
        physical_batch_size=physical,
        grad_sample_mode=mode,
    )
    return prepare_private(
        section=section,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        dataset=_Rows(rows, index),
        collate=None,
        epochs=1,
        num_processes=1,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_is_a_noise_only_step(mode: str) -> None:
    """Poisson sampling can draw no example: that step still happens, with noise and accounting."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    run = _private_on_rows(model, mode, rows=100, logical=10, physical=10, lr=1.0, index=True)
    # Opacus shapes an empty batch like the first one; hubtune primes that template, so even a
    # first batch that is empty has the dict structure the model takes.
    empty = run.loader.collate_fn([])
    assert set(empty) == {"features", "labels", "idx"} and empty["features"].shape == (0, 4)
    before = [p.detach().clone() for p in run.model.parameters()]
    logits = run.model(empty["features"])
    (logits.float().sum() * 0.0).backward()  # what the training loop does on an empty batch
    run.optimizer.step()
    moved = [
        float((p.detach() - b).abs().max())
        for p, b in zip(run.model.parameters(), before, strict=True)
    ]
    assert all(m > 1e-3 for m in moved)  # the noise alone, scale sigma * C / expected batch
    assert run.steps_taken == 1


@pytest.mark.slow
def test_runs_with_many_empty_poisson_batches_complete(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    spec = _spec(
        tiny_bert, dp_csv, tmp_path, {"logical_batch_size": 1, "physical_batch_size": 8}, epochs=1
    )
    spec["privacy"].pop("target_epsilon", None)
    spec["privacy"]["noise_multiplier"] = 1.0
    result = run_recipe(Recipe.model_validate(spec))
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    observed = ledger["observed_batch_sizes"]
    assert observed["min"] == 0  # q = 1/n: about a third of the steps drew no example
    assert ledger["steps"] == observed["steps"] == round(1 / ledger["sample_rate"])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_gradient_scaling_is_linear_in_tensors_and_equals_opacus(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opacus' scale_grad walks every parameter once per parameter (O(P²)); hubtune's walks once.

    Same divisor, same gradients, bit for bit; and one DP step reads ``accumulated_iterations``
    a constant number of times however many tensors train (40 here).
    """
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(19)], nn.Linear(4, 2))
    run = _private_on_rows(model, mode, rows=64, logical=16, physical=64, lr=0.1)
    optimizer = run.optimizer
    assert optimizer.scale_grad is not None and "scale_grad" in vars(optimizer)
    grads = [torch.randn_like(p) for p in optimizer.params]
    for p, g in zip(optimizer.params, grads, strict=True):
        p.grad = g.clone()
        p.grad_sample = torch.zeros(3, *p.shape)  # what accumulated_iterations reads
    optimizer.scale_grad()
    ours = [p.grad.clone() for p in optimizer.params]
    for p, g in zip(optimizer.params, grads, strict=True):
        p.grad = g.clone()
    DPOptimizer.scale_grad(optimizer)  # Opacus' own
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, optimizer.params, strict=True))
    assert not all(torch.equal(a, g) for a, g in zip(ours, grads, strict=True))  # it did divide

    reads = 0
    original = type(optimizer).accumulated_iterations

    def counting(self: Any) -> int:
        nonlocal reads
        reads += 1
        return original.fget(self)

    monkeypatch.setattr(type(optimizer), "accumulated_iterations", property(counting))
    optimizer.zero_grad(set_to_none=True)
    batch = next(iter(run.loader))
    logits = run.model(batch["features"])
    loss = (
        run.criterion(logits, batch["labels"])
        if run.criterion is not None
        else F.cross_entropy(logits, batch["labels"])
    )
    loss.backward()
    optimizer.step()
    assert run.steps_taken == 1
    assert reads <= 2, reads  # once for the divisor, once for the accountant; Opacus: 40 + 1


# --------------------------------------------------------------------------- resume and the budget


def test_resume_with_more_epochs_plans_the_rest_and_never_exceeds_the_target(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's overrun: 2 epochs at target ε = 4, then train.epochs=4 --resume reached ε = 4.69.

    The resumed run must plan σ for the remaining steps from the history actually spent, and
    every figure shown must come from that history (two σ segments here).
    """
    from hubtune.pipeline import format_summary

    spy = DPSpy()
    spy.install(monkeypatch)
    spec = _spec(tiny_bert, dp_csv, tmp_path, epochs=2, name="full")
    spec["train"]["log_with"] = []
    first = run_recipe(Recipe.model_validate(spec))
    before = json.loads((first.run_dir / "privacy.json").read_text())
    spy.assert_matches(before, n=before["dataset_size"])
    assert before["epsilon"] <= 4.0
    spec["train"]["epochs"] = 4
    result = run_recipe(Recipe.model_validate(spec), resume=True)
    ledger = json.loads((result.run_dir / "privacy.json").read_text())
    steps_per_epoch = round(1 / ledger["sample_rate"])
    assert ledger["steps"] == 4 * steps_per_epoch and not ledger["stopped_by_budget"]
    assert ledger["epsilon"] <= 4.0
    independent = _independent_epsilons(ledger["history"], ledger["delta"])
    assert independent["pld"] <= 4.0 * 1.01 and ledger["epsilon_by_accountant"]["rdp"] == (
        pytest.approx(independent["rdp"], rel=0.01)
    )
    # The first two epochs kept their σ; the last two were planned from what was spent.
    (s1, q1, k1), (s2, q2, k2) = ledger["history"]
    assert [s1, q1, k1] == before["history"][0] and k2 == 2 * steps_per_epoch and q2 == q1
    assert s2 > s1  # less budget left per step
    assert ledger["noise_multiplier"] is None
    assert ledger["noise_segments"] == [
        {"noise_multiplier": s, "sample_rate": q, "steps": k} for s, q, k in ledger["history"]
    ]
    assert f"{s1:.4g} for {k1} steps, then {s2:.4g} for {k2} steps" in ledger["noise"]
    summary = format_summary(result)
    assert ledger["noise"] in summary and "sigma 0." not in summary
    report = (result.run_dir / "audit" / "report.md").read_text()
    assert ledger["noise"] in report
    # What Opacus applied, step by step, in both runs: σ per segment, C, q, secret generators.
    spy.assert_matches(ledger, n=ledger["dataset_size"])


def test_resume_with_unchanged_epochs_keeps_the_planned_noise(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from hubtune.privacy.accounting import SpentBudget, plan_noise

    section = SimpleNamespace(noise_multiplier=None, target_epsilon=4.0, accountant="rdp")
    spent = SpentBudget(history=[(1.1, 0.1, 20)], sigma=1.1, planned_steps=60, max_steps=57)
    same = plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=60, delta=1e-5)
    assert (same.sigma, same.max_steps) == (1.1, 57)  # an interrupted run continues exactly
    grown = plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=80, delta=1e-5)
    eps = compute_epsilons([(1.1, 0.1, 20), (grown.sigma, 0.1, 60)], 1e-5)["rdp"]
    assert 4.0 - 0.011 <= eps <= 4.0 and grown.max_steps == 80


def test_resume_refuses_when_the_budget_is_already_spent() -> None:
    from types import SimpleNamespace

    from hubtune.privacy.accounting import SpentBudget, plan_noise

    section = SimpleNamespace(noise_multiplier=None, target_epsilon=1.0, accountant="rdp")
    spent = SpentBudget(history=[(0.6, 0.1, 200)], sigma=0.6, planned_steps=200, max_steps=200)
    with pytest.raises(PrivacyError, match=r"already spent ε = .* of its target 1\.0 in 200 steps"):
        plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=400, delta=1e-5)
    with pytest.raises(PrivacyError, match="data or batch size changed"):
        plan_noise(section=section, prior=[], spent=spent, q=0.05, planned_steps=400, delta=1e-5)


def test_a_checkpoint_without_its_dp_record_is_not_resumed(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_bert, dp_csv, tmp_path, epochs=1, name="full")
    spec["train"]["log_with"] = []
    first = run_recipe(Recipe.model_validate(spec))
    state_path = next((first.run_dir / "checkpoints").glob("epoch-*")) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert (
        state["dp"]["history"]
        == json.loads((first.run_dir / "privacy.json").read_text())["history"]
    )
    del state["dp"]  # as an older hubtune wrote it
    state_path.write_text(json.dumps(state))
    spec["train"]["epochs"] = 2
    with pytest.raises(RunError, match="did not record the DP budget it spent.*--overwrite"):
        run_recipe(Recipe.model_validate(spec), resume=True)


def _head_run(tiny_bert: Path, dp_csv: Path, out: Path) -> tuple[list[int], torch.Tensor]:
    """A cheap DP run (head on cached features): its Poisson batch sizes and trained head."""
    spec = _spec(tiny_bert, dp_csv, out, epochs=1)
    spec["train"]["log_with"] = []
    spec["train"]["checkpoint"] = False
    result = run_recipe(Recipe.model_validate(spec))
    sizes = [b for h in result.metrics["history"] for b in h["dp_logical_batch_sizes"]]
    return sizes, load_file(result.run_dir / "model" / "model.safetensors")["classifier.weight"]


def test_sampling_and_noise_are_secret_unless_the_unsafe_seed_fixes_them(
    tiny_bert: Path, dp_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By behaviour, not by the name of a seed source: the recipe's public seed must not decide
    which examples a step samples or the noise it adds."""
    monkeypatch.delenv("HUBTUNE_UNSAFE_DP_SEED", raising=False)
    sizes_a, head_a = _head_run(tiny_bert, dp_csv, tmp_path / "a")
    sizes_b, head_b = _head_run(tiny_bert, dp_csv, tmp_path / "b")
    assert len(sizes_a) == len(sizes_b) >= 10
    assert sizes_a != sizes_b  # P(same 10+ Poisson batch sizes by chance) is negligible
    assert not torch.equal(head_a, head_b)
    monkeypatch.setenv("HUBTUNE_UNSAFE_DP_SEED", "5")
    sizes_c, head_c = _head_run(tiny_bert, dp_csv, tmp_path / "c")
    sizes_d, head_d = _head_run(tiny_bert, dp_csv, tmp_path / "d")
    assert sizes_c == sizes_d and torch.equal(head_c, head_d)
    ledger = json.loads((tmp_path / "d" / "tiny" / "privacy.json").read_text())
    assert ledger["guarantee_void"] and ledger["guarantee"].startswith("NONE")


# --------------------------------------------------------------------------- focused unit tests
# Each pins one decision of privacy.py with exact values, so that a changed constant, operator or
# branch fails here in well under a second (bench/mutation.py runs these per mutant).


def test_default_delta_is_a_power_of_ten_below_one_tenth_of_1_over_n() -> None:
    from hubtune.privacy.accounting import default_delta

    assert [default_delta(n) for n in (1, 900, 20_000, 123_456, 10**6)] == [
        1e-5,
        1e-5,
        1e-6,
        1e-7,
        1e-7,
    ]


def test_sample_rate_gives_an_integer_number_of_steps() -> None:
    from hubtune.privacy.accounting import sample_rate_for

    assert sample_rate_for(100, 10) == 0.1
    assert sample_rate_for(101, 10) == 1 / 11  # ceil: 11 steps, never 10.1
    assert sample_rate_for(900, 64) == 1 / 15


def test_epsilon_of_no_step_small_sigma_and_each_accountant() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    from hubtune.privacy.accounting import _epsilon

    assert compute_epsilons([], 1e-5) == {"prv": 0.0, "rdp": 0.0}
    assert _epsilon("rdp", [(0.2999, 0.01, 1)], 1e-5) == float("inf")
    assert _epsilon("rdp", [(0.3, 0.01, 1)], 1e-5) < 1e3  # σ = 0.3 exactly is still accounted
    history = [(1.0, 0.1, 30)]
    for name, accountant in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
        accountant.history = list(history)
        assert _epsilon(name, history, 1e-5) == pytest.approx(
            accountant.get_epsilon(delta=1e-5), rel=1e-9
        )
    eps = compute_epsilons(history, 1e-5)
    assert eps["prv"] < eps["rdp"] < float("inf")  # each name reaches its own accountant


def test_max_steps_within_at_the_edges() -> None:
    exact = compute_epsilons([(1.0, 0.01, 300)], 1e-5)["rdp"]
    kwargs: dict[str, Any] = {"accountant": "rdp", "sigma": 1.0, "q": 0.01, "delta": 1e-5}
    # ε exactly at the target still fits ("at or below").
    assert max_steps_within(prior=[], target=exact, upper=10_000, **kwargs) == 300
    assert max_steps_within(prior=[], target=exact, upper=300, **kwargs) == 300
    assert max_steps_within(prior=[], target=exact, upper=299, **kwargs) == 299
    assert max_steps_within(prior=[], target=100.0, upper=10, **kwargs) == 10
    # A prior that already spent more than the target leaves no step at all.
    assert max_steps_within(prior=[(0.5, 0.5, 100)], target=2.0, upper=10, **kwargs) == 0
    # One step fits, two do not.
    one = compute_epsilons([(1.0, 0.01, 1)], 1e-5)["rdp"]
    assert max_steps_within(prior=[], target=one, upper=50, **kwargs) == 1


def test_max_steps_within_asks_its_accountant_about_the_history_after_the_prior(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hubtune.privacy import accounting as privacy

    asked: list[tuple[str, list[tuple[float, float, int]]]] = []

    def epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
        asked.append((name, list(history)))
        assert len(asked) <= 9, "the bisection does not converge"  # 2 + ceil(log2(100))
        return sum(k for _, _, k in history) / 10  # 0.1 per step

    monkeypatch.setattr(privacy, "_epsilon", epsilon)
    prior = [(2.0, 0.5, 3)]
    fits = max_steps_within(
        accountant="prv", prior=prior, sigma=1.0, q=0.1, delta=1e-5, target=1.0, upper=100
    )
    assert fits == 7  # 0.3 spent, 0.1 per step, at most 1.0
    assert {name for name, _ in asked} == {"prv"}
    assert ("prv", prior) in asked  # no step: the prior alone, not a 0-step segment
    assert all(h == prior or h == [*prior, (1.0, 0.1, h[-1][2])] for _, h in asked)
    assert [*prior, (1.0, 0.1, 0)] not in [h for _, h in asked]


def test_spent_budget_round_trips_through_json() -> None:
    from hubtune.privacy.accounting import SpentBudget, steps_in

    spent = SpentBudget(
        history=[(1.1, 0.1, 20), (1.3, 0.1, 7)], sigma=1.3, planned_steps=60, max_steps=57
    )
    data = spent.to_json()
    assert data == {
        "history": [[1.1, 0.1, 20], [1.3, 0.1, 7]],
        "noise_multiplier": 1.3,
        "planned_steps": 60,
        "max_steps": 57,
    }
    back = SpentBudget.from_json(json.loads(json.dumps(data)))
    assert back == spent and back.steps == 27 == steps_in(back.history)
    assert SpentBudget.from_json({**data, "history": [["1", "0.5", "3"]]}).history == [
        (1.0, 0.5, 3)
    ]


def test_prior_history_reads_the_base_models_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A base model's ledger: its prior history, then its own, as (σ, q, steps) numbers."""
    from hubtune.privacy.accounting import prior_history
    from hubtune.rundir import PRIVACY_FILE

    assert prior_history(tmp_path) == [] and prior_history(tmp_path / "missing") == []
    ledger = tmp_path / PRIVACY_FILE
    caplog.set_level("INFO", logger="hubtune.privacy.accounting")
    ledger.write_text(
        json.dumps(
            {
                "prior_history": [[2, "0.05", 10.0]],
                "history": [["1.5", 0.1, "20"]],
                "epsilon": 2.5,
            }
        )
    )
    history = prior_history(tmp_path)
    assert history == [(2.0, 0.05, 10), (1.5, 0.1, 20)]
    assert [type(x) for x in history[0]] == [float, float, int]
    assert [r.getMessage() for r in caplog.records] == [
        "privacy: base model was trained with DP (epsilon 2.5); its history is carried on"
    ]
    caplog.clear()
    ledger.write_text(json.dumps({"history": [[1.0, 0.1, 5]]}))  # no prior, no epsilon
    assert prior_history(tmp_path) == [(1.0, 0.1, 5)]
    assert [r.getMessage() for r in caplog.records] == [
        "privacy: base model was trained with DP (epsilon nan); its history is carried on"
    ]
    ledger.write_text(json.dumps({"prior_history": [[1.0, 0.1, 5]]}))
    assert prior_history(tmp_path) == [(1.0, 0.1, 5)]


def _section(**kwargs: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        **{"noise_multiplier": None, "target_epsilon": 4.0, "accountant": "rdp", **kwargs}
    )


def test_plan_noise_with_an_explicit_sigma_or_a_target() -> None:
    from hubtune.privacy.accounting import NoisePlan, SpentBudget, plan_noise

    fixed = _section(noise_multiplier=1.3, target_epsilon=None)
    assert plan_noise(section=fixed, prior=[], spent=None, q=0.1, planned_steps=40, delta=1e-5) == (
        NoisePlan(1.3, 40, 40)
    )
    spent = SpentBudget(history=[(1.3, 0.1, 10)], sigma=1.3, planned_steps=20, max_steps=20)
    assert plan_noise(
        section=fixed, prior=[], spent=spent, q=0.1, planned_steps=40, delta=1e-5
    ) == (NoisePlan(1.3, 40, 40))
    plan = plan_noise(section=_section(), prior=[], spent=None, q=0.1, planned_steps=30, delta=1e-5)
    assert plan.planned_steps == 30 and plan.max_steps == 30
    assert 3.99 <= compute_epsilons([(plan.sigma, 0.1, 30)], 1e-5)["rdp"] <= 4.0
    # A single step to plan: it fits.
    one = plan_noise(section=_section(), prior=[], spent=None, q=0.1, planned_steps=1, delta=1e-5)
    assert (one.planned_steps, one.max_steps) == (1, 1)
    # The sampling rate may differ by rounding only.
    near = SpentBudget(history=[(1.1, 0.1 + 1e-13, 20)], sigma=1.1, planned_steps=60, max_steps=60)
    assert (
        plan_noise(
            section=_section(), prior=[], spent=near, q=0.1, planned_steps=80, delta=1e-5
        ).planned_steps
        == 80
    )
    off = SpentBudget(history=[(1.1, 0.1 + 1e-11, 20)], sigma=1.1, planned_steps=60, max_steps=60)
    with pytest.raises(
        PrivacyError, match=r"rates \[0\.10000000001\], this run samples at q = 0\.1:"
    ):
        plan_noise(section=_section(), prior=[], spent=off, q=0.1, planned_steps=80, delta=1e-5)


def test_plan_noise_counts_the_prior_and_the_spent_steps() -> None:
    from hubtune.privacy.accounting import SpentBudget, plan_noise

    prior = [(1.0, 0.1, 20)]
    spent = SpentBudget(history=[(1.2, 0.1, 20)], sigma=1.2, planned_steps=40, max_steps=40)
    plan = plan_noise(
        section=_section(target_epsilon=8.0),
        prior=prior,
        spent=spent,
        q=0.1,
        planned_steps=60,
        delta=1e-5,
    )
    assert (plan.planned_steps, plan.max_steps) == (60, 60)
    eps = compute_epsilons([*prior, (1.2, 0.1, 20), (plan.sigma, 0.1, 40)], 1e-5)["rdp"]
    assert 7.99 <= eps <= 8.0  # σ of the 40 remaining steps, after the prior and the spent 20
    with pytest.raises(
        PrivacyError,
        match=r"^this run already took 20 DP steps; 20 are planned\. Raise train\.epochs",
    ):
        plan_noise(section=_section(), prior=[], spent=spent, q=0.1, planned_steps=20, delta=1e-5)
    with pytest.raises(PrivacyError, match=r"^this run already took 20 DP steps; 10 are planned"):
        plan_noise(section=_section(), prior=[], spent=spent, q=0.1, planned_steps=10, delta=1e-5)
    # The base model alone spent the target: its own message.
    with pytest.raises(
        PrivacyError,
        match=r"^the base model's earlier DP training already spent ε = [0-9.]+ ≥ target 1\.0; raise privacy\.target_epsilon$",
    ):
        plan_noise(
            section=_section(target_epsilon=1.0),
            prior=[(0.6, 0.1, 200)],
            spent=None,
            q=0.1,
            planned_steps=10,
            delta=1e-5,
        )


def test_plan_noise_when_no_sigma_fits_the_rest() -> None:
    from hubtune.privacy.accounting import SpentBudget, plan_noise

    history = [(0.6, 0.1, 200)]
    spent_eps = compute_epsilons(history, 1e-5)["rdp"]
    section = _section(target_epsilon=math.nextafter(spent_eps, math.inf))  # nothing is left
    spent = SpentBudget(history=history, sigma=0.6, planned_steps=200, max_steps=200)
    with pytest.raises(
        PrivacyError,
        match=r"already spent ε = .* \(RDP\) of its target .* in 200 steps; no noise multiplier up to "
        r"1e5 fits 100 more steps in the rest\. At the σ used so far \(0\.6\) 0 more step\(s\) fit\.",
    ):
        plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=300, delta=1e-5)
    # Without a checkpoint the search's own refusal comes through.
    with pytest.raises(PrivacyError, match=r"^no noise multiplier up to 1e5 reaches target ε"):
        plan_noise(section=section, prior=history, spent=None, q=0.1, planned_steps=100, delta=1e-5)


def test_plan_noise_asks_the_sections_accountant_and_stops_at_a_target_already_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every ε of the plan comes from the section's accountant; a history whose ε equals the
    target leaves nothing to spend; no history spends nothing (whatever the target)."""
    from hubtune.privacy import accounting
    from hubtune.privacy.accounting import SpentBudget, plan_noise

    asked: list[str] = []

    def epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
        asked.append(name)
        assert len(asked) <= 60, "the search does not converge"
        return sum(q * k / s for s, q, k in history)  # 0.1 per step at σ = 1, q = 0.1

    monkeypatch.setattr(accounting, "_epsilon", epsilon)
    section = _section(target_epsilon=0.9, accountant="prv")
    plan = plan_noise(section=section, prior=[], spent=None, q=0.1, planned_steps=10, delta=1e-5)
    assert 0.89 <= 1.0 / plan.sigma <= 0.9 and plan.max_steps == 10  # nothing spent before
    assert asked and set(asked) == {"prv"}
    asked.clear()
    with pytest.raises(PrivacyError) as info:
        plan_noise(
            section=_section(target_epsilon=0.5, accountant="prv"),
            prior=[(1.0, 0.1, 5)],
            spent=None,
            q=0.1,
            planned_steps=10,
            delta=1e-5,
        )
    assert str(info.value) == (
        "the base model's earlier DP training already spent ε = 0.5 ≥ target 0.5; "
        "raise privacy.target_epsilon"
    )
    assert asked == ["prv"]
    asked.clear()
    spent = SpentBudget(history=[(1.0, 0.1, 5)], sigma=1.0, planned_steps=10, max_steps=10)
    with pytest.raises(PrivacyError) as info:
        plan_noise(
            section=_section(target_epsilon=0.5000001, accountant="prv"),
            prior=[],
            spent=spent,
            q=0.1,
            planned_steps=20,
            delta=1e-5,
        )
    assert str(info.value) == (
        "the resumed run (with any earlier training of its base model) has already spent ε = "
        "0.5 (PRV) of its target 0.5000001 in 5 steps; no noise multiplier up to 1e5 fits 15 "
        "more steps in the rest. At the σ used so far (1) 0 more step(s) fit. Keep train.epochs "
        "at what the checkpoint planned, or start over with --overwrite so σ is planned for all "
        "epochs at once."
    )
    assert len(asked) > 3 and set(asked) == {"prv"}


def test_sigma_search_stops_within_tolerance_and_brackets_from_both_sides() -> None:
    from hubtune.privacy import accounting as privacy

    for start_above in (True, False):  # ε at σ = 1 above the target, or below it
        target = 2.0 if start_above else 30.0
        sigma = privacy.sigma_for_target(
            accountant="rdp", prior=[], q=0.1, steps=20, delta=1e-5, target=target
        )
        eps = compute_epsilons([(sigma, 0.1, 20)], 1e-5)["rdp"]
        assert target - 0.01 <= eps <= target, (target, eps)
        tight = privacy.sigma_for_target(
            accountant="rdp", prior=[], q=0.1, steps=20, delta=1e-5, target=target, tolerance=1e-4
        )
        assert target - 1e-4 <= compute_epsilons([(tight, 0.1, 20)], 1e-5)["rdp"] <= target


def test_noise_segments_and_their_description() -> None:
    from hubtune.privacy.accounting import describe_noise, noise_segments

    assert noise_segments([(1, 0.5, 3)]) == [
        {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 3}
    ]
    assert isinstance(noise_segments([(1, 1, 3.0)])[0]["steps"], int)
    assert describe_noise([]) == "no DP step"
    assert describe_noise([(0.94912, 0.1, 20)]) == "σ 0.9491"
    assert describe_noise([(0.94912, 0.1, 20), (0.94912, 0.05, 5)]) == "σ 0.9491"
    assert (
        describe_noise([(0.94912, 0.1, 20), (1.0912, 0.1, 7)])
        == "σ 0.9491 for 20 steps, then 1.091 for 7 steps (re-planned when the run was resumed)"
    )


def test_the_secret_generators_and_the_unsafe_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubtune.privacy.accounting import TEST_SEED_ENV, guarantee_is_void
    from hubtune.privacy.engine import _GeneratorState, _secret_generators

    monkeypatch.delenv(TEST_SEED_ENV, raising=False)
    a_sampling, a_noise, source = _secret_generators(False, torch.device("cpu"))
    b_sampling, _, _ = _secret_generators(False, torch.device("cpu"))
    assert source == "os.urandom" and not guarantee_is_void(source)
    assert a_sampling.initial_seed() != a_noise.initial_seed()
    assert a_sampling.initial_seed() != b_sampling.initial_seed()
    monkeypatch.setenv(TEST_SEED_ENV, "5")
    sampling, noise, source = _secret_generators(False, torch.device("cpu"))
    assert (sampling.initial_seed(), noise.initial_seed()) == (5, 6)
    assert source == "fixed by HUBTUNE_UNSAFE_DP_SEED (testing only: NO privacy guarantee)"
    assert guarantee_is_void(source) and not guarantee_is_void(None) and not guarantee_is_void("")
    with pytest.raises(
        PrivacyError,
        match=r"^HUBTUNE_UNSAFE_DP_SEED fixes the DP randomness and cannot be combined with secure_mode$",
    ):
        _secret_generators(True, torch.device("cpu"))
    # The noise generator lives where the gradients do (a CUDA noise draw needs a CUDA generator).
    made: list[Any] = []
    real_generator = torch.Generator

    def generator(device: Any = None) -> torch.Generator:
        made.append(device)
        return real_generator()

    with monkeypatch.context() as patch:
        patch.setattr(torch, "Generator", generator)
        _secret_generators(False, torch.device("cuda", 1))
    assert made == [None, torch.device("cuda", 1)]
    # Their states ride along in checkpoints and restore the same draws.
    state = _GeneratorState(sampling, noise)
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    assert sorted(saved) == ["state_0", "state_1"]
    first = (torch.rand(3, generator=sampling), torch.rand(3, generator=noise))
    state.load_state_dict(saved)
    assert torch.equal(torch.rand(3, generator=sampling), first[0])
    assert torch.equal(torch.rand(3, generator=noise), first[1])


def test_secure_mode_needs_torchcsprng(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from hubtune.privacy.engine import check_secure_mode

    monkeypatch.setitem(sys.modules, "torchcsprng", None)
    with pytest.raises(
        PrivacyError, match=r"^privacy\.secure_mode: true needs the torchcsprng package"
    ) as info:
        check_secure_mode()
    assert info.value.__cause__ is None and info.value.__suppress_context__
    monkeypatch.setitem(sys.modules, "torchcsprng", types.ModuleType("torchcsprng"))
    check_secure_mode()  # installed: no refusal


def test_module_checks_name_what_opacus_cannot_handle() -> None:
    from hubtune.privacy.engine import (
        batchnorm_in_train_mode,
        out_of_place,
        refuse_trainable_batchnorm,
    )

    with pytest.raises(
        PrivacyError,
        match=r"^Opacus cannot compute per-example gradients for this model: We do not support nn\.LSTM",
    ):
        check_modules(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)))
    # Opacus versions that flag every BatchNorm, frozen ones too: those findings are dropped.
    from opacus.validators import ModuleValidator

    def validate(model: nn.Module, strict: bool = False) -> list[Exception]:
        assert strict is False
        return [ValueError("BatchNorm cannot support training with differential privacy")]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModuleValidator, "validate", staticmethod(validate))
        check_modules(nn.Sequential(nn.Linear(4, 4)))
    many = nn.Sequential(*[nn.BatchNorm1d(2) for _ in range(4)])
    with pytest.raises(
        PrivacyError, match=r"^4 trainable BatchNorm layer\(s\) \(0, 1, 2\.\.\.\): in training"
    ):
        refuse_trainable_batchnorm(many)
    three = nn.Sequential(*[nn.BatchNorm1d(2) for _ in range(3)])
    with pytest.raises(
        PrivacyError, match=r"^3 trainable BatchNorm layer\(s\) \(0, 1, 2\): in training"
    ):
        refuse_trainable_batchnorm(three)
    three[0].weight.requires_grad_(False)  # one trainable tensor is enough
    with pytest.raises(PrivacyError, match=r"^3 trainable"):
        refuse_trainable_batchnorm(three)
    model = nn.Sequential(
        nn.ReLU(inplace=True), nn.ReLU(), nn.Dropout(inplace=True), nn.BatchNorm1d(2)
    )
    assert out_of_place(model) == 2 and model[0].inplace is False and model[2].inplace is False
    assert out_of_place(model) == 0
    assert batchnorm_in_train_mode(model) == ["3"]
    assert batchnorm_in_train_mode(model.eval()) == []


def test_position_ids_are_per_example() -> None:
    from hubtune.privacy.engine import add_position_ids, forward_takes_position_ids

    class Takes(nn.Module):
        def forward(self, input_ids: Any, position_ids: Any = None) -> Any:
            return input_ids

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Takes()

        def get_base_model(self) -> nn.Module:
            return self.inner

    class Opaque(nn.Module):
        forward = 3  # type: ignore[assignment]  # not callable: inspect cannot read a signature

    assert forward_takes_position_ids(Takes()) and forward_takes_position_ids(Wrapper())
    assert not forward_takes_position_ids(nn.Linear(2, 2))
    assert not forward_takes_position_ids(Opaque())
    batch = add_position_ids({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["position_ids"].is_contiguous()
    given = torch.ones(2, 3, dtype=torch.long)
    assert (
        add_position_ids({"input_ids": torch.zeros(2, 3), "position_ids": given})["position_ids"]
        is given
    )
    assert "position_ids" not in add_position_ids({"features": torch.zeros(2, 3)})


def _fake_run(model: nn.Module, criterion: Any = None) -> Any:
    from types import SimpleNamespace

    zeroed: list[bool] = []
    optimizer = SimpleNamespace(
        zero_grad=lambda set_to_none: zeroed.append(set_to_none), zeroed=zeroed
    )
    return SimpleNamespace(model=model, criterion=criterion, optimizer=optimizer, loss_fn=None)


def test_preflight_names_tensors_without_per_example_gradients() -> None:
    from hubtune.privacy.engine import check_per_sample_gradients

    model = nn.Linear(4, 2)
    batch = {"features": torch.ones(3, 4), "labels": torch.tensor([0, 1, 0])}

    def forward(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        assert set(b) == {"features"}  # the labels are not the model's input
        return m(b["features"])

    run = _fake_run(model)
    with pytest.raises(
        PrivacyError,
        match=r"^preflight: these trainable tensors get no per-example gradient of batch size 3, "
        r"so they cannot be clipped per example: weight: None; bias: None$",
    ):
        check_per_sample_gradients(run, batch, forward)
    assert run.optimizer.zeroed == [True]
    model.weight.grad_sample = torch.zeros(3, 2, 4)
    model.bias.grad_sample = torch.zeros(2, 2)
    with pytest.raises(PrivacyError, match=r"clipped per example: bias: \(2, 2\)$"):
        check_per_sample_gradients(run, batch, forward)
    model.bias.requires_grad_(False)  # frozen tensors need none
    check_per_sample_gradients(run, batch, forward)
    model.bias.requires_grad_(True)
    model.weight.requires_grad_(False)  # a frozen tensor before a bad one: still checked
    with pytest.raises(PrivacyError, match=r"clipped per example: bias: \(2, 2\)$"):
        check_per_sample_gradients(run, batch, forward)
    model.weight.requires_grad_(True)
    # Ghost clipping: per-example norms of the batch's size.
    ghost = _fake_run(model, criterion=F.cross_entropy)
    with pytest.raises(
        PrivacyError,
        match=r"^preflight: ghost clipping computed per-example norms of shape None for a batch of 3$",
    ):
        check_per_sample_gradients(ghost, batch, forward)
    model.per_sample_gradient_norms = torch.ones(2)
    with pytest.raises(PrivacyError, match=r"of shape \(2,\) for a batch of 3$"):
        check_per_sample_gradients(ghost, batch, forward)
    model.per_sample_gradient_norms = torch.ones(3)
    check_per_sample_gradients(ghost, batch, forward)


def test_preflight_turns_an_opacus_failure_into_a_privacy_error_with_the_fix() -> None:
    from hubtune.privacy.engine import check_per_sample_gradients

    def fails(message: str) -> Any:
        def forward(model: nn.Module, batch: Any) -> Any:
            raise RuntimeError(message)

        return forward

    batch = {"features": torch.ones(3, 4), "labels": torch.tensor([0, 1, 0])}
    run = _fake_run(nn.Linear(4, 2))
    with pytest.raises(
        PrivacyError,
        match=r"^preflight: per-example gradients could not be computed on a real batch: RuntimeError\('boom'\)$",
    ) as info:
        check_per_sample_gradients(run, batch, fails("boom"))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(
        PrivacyError,
        match=r"RuntimeError\('Parameter TYING'\)\. Ghost clipping cannot handle .*grad_sample_mode: hooks",
    ):
        check_per_sample_gradients(run, batch, fails("Parameter TYING"))
    assert run.optimizer.zeroed == [True, True]


def test_scale_grad_is_left_alone_for_summed_losses_and_subclasses() -> None:
    from opacus.optimizers import DPOptimizer

    from hubtune.privacy.engine import _scale_grad_in_linear_time

    param = nn.Parameter(torch.ones(2))
    summed = DPOptimizer(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        loss_reduction="sum",
    )
    _scale_grad_in_linear_time(summed)
    param.grad = torch.full((2,), 8.0)
    summed.scale_grad()
    assert param.grad.tolist() == [8.0, 8.0]  # a summed loss is not divided

    class Own(DPOptimizer):
        def scale_grad(self) -> None:
            pass

    own = Own(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    _scale_grad_in_linear_time(own)
    assert "scale_grad" not in vars(own)
    mean = DPOptimizer(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    _scale_grad_in_linear_time(mean)
    param.grad_sample = torch.zeros(3, 2)
    param.grad = torch.full((2,), 8.0)
    mean.scale_grad()
    assert param.grad.tolist() == [2.0, 2.0]  # 8 / (expected batch 4 x 1 accumulated pass)
    param.grad_sample = [torch.zeros(3, 2), torch.zeros(3, 2)]  # two passes accumulated
    param.grad = torch.full((2,), 8.0)
    mean.scale_grad()
    assert param.grad.tolist() == [1.0, 1.0]  # 8 / (4 x 2)


def _ledger_run(history: list[tuple[float, float, int]], **kwargs: Any) -> Any:
    from types import SimpleNamespace

    from hubtune.privacy.engine import PrivacyRun

    fields: dict[str, Any] = {
        "engine": SimpleNamespace(accountant=SimpleNamespace(history=list(history))),
        "model": nn.Linear(2, 2),
        "optimizer": None,
        "loader": None,
        "criterion": None,
        "n": 1000,
        "q": 0.1,
        "sigma": 1.2,
        "delta": 1e-5,
        "max_grad_norm": 0.5,
        "accountant": "rdp",
        "grad_sample_mode": "hooks",
        "logical_batch_size": 100,
        "physical_batch_size": 25,
        "secure_mode": False,
        "noise_source": "os.urandom",
        "target_epsilon": 8.0,
        "max_steps": 40,
        "planned_steps": 40,
        **kwargs,
    }
    return PrivacyRun(**fields)


def test_the_ledger_states_exactly_what_was_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubtune.privacy.accounting import VOID_REASON, SpentBudget

    prior = [(2.0, 0.05, 10)]
    run = _ledger_run([(1.2, 0.1, 20)], prior_history=prior, num_processes=2)
    assert run.steps_taken == 20 and run.full_history() == [*prior, (1.2, 0.1, 20)]
    assert run.spent_budget() == SpentBudget([(1.2, 0.1, 20)], 1.2, 40, 40)
    ledger = run.ledger(trained_names=["w"], trained_count=4, batch_sizes=[90, 110, 100])
    eps = compute_epsilons([*prior, (1.2, 0.1, 20)], 1e-5)
    versions = ledger.pop("versions")
    import importlib.metadata as md

    names = ("opacus", "torch", "transformers", "peft", "accelerate")
    assert versions == {name: md.version(name) for name in names}
    assert ledger == {
        "schema_version": 1,
        "guarantee": f"({eps['rdp']:.4g}, 1e-05)-DP at the example level",
        "guarantee_void": False,
        "epsilon": eps["rdp"],
        "delta": 1e-5,
        "accountant": "rdp",
        "epsilon_by_accountant": eps,
        "target_epsilon": 8.0,
        "stopped_by_budget": False,
        "noise_multiplier": 1.2,
        "noise_segments": [{"noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 20}],
        "noise": "σ 1.2",
        "max_grad_norm": 0.5,
        "clipping": "flat",
        "grad_sample_mode": "hooks",
        "sample_rate": 0.1,
        "sampling": "poisson",
        "dataset_size": 1000,
        "expected_batch_size": 100.0,
        "logical_batch_size": 100,
        "physical_batch_size": 25,
        "steps": 20,
        "observed_batch_sizes": {
            "steps": 3,
            "mean": 100.0,
            "min": 90,
            "max": 110,
            "expected": 100.0,
        },
        "history": [[1.2, 0.1, 20]],
        "prior_history": [[2.0, 0.05, 10]],
        "num_processes": 2,
        "unit": "example",
        "secure_mode": False,
        "noise_source": "os.urandom",
        "trained_parameters": ["w"],
        "trained_parameter_count": 4,
    }
    # Two σ (a resumed run re-planned): no single noise multiplier, the segments say it all.
    resumed = _ledger_run([(1.2, 0.1, 20), (1.5, 0.1, 20)], accountant="prv").ledger(
        trained_names=[], trained_count=0
    )
    assert resumed["noise_multiplier"] is None and len(resumed["noise_segments"]) == 2
    assert resumed["epsilon"] == resumed["epsilon_by_accountant"]["prv"]
    assert resumed["observed_batch_sizes"] == {
        "steps": 0,
        "mean": None,
        "min": None,
        "max": None,
        "expected": 100.0,
    }
    # No step taken: the planned σ, said so.
    idle = _ledger_run([]).ledger(trained_names=[], trained_count=0)
    assert (idle["noise_multiplier"], idle["noise"], idle["epsilon"]) == (
        1.2,
        "σ 1.2 (no step taken)",
        0.0,
    )
    # A library that is not installed is left out of the versions, nothing else changes.
    real_version = md.version

    def version(name: str) -> str:
        if name == "peft":
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", version)
    without_peft = idle.copy()
    assert _ledger_run([]).ledger(trained_names=[], trained_count=0) == {
        **without_peft,
        "versions": {n: real_version(n) for n in names if n != "peft"},
    }
    # A fixed (public) seed voids the guarantee, and the ledger says so first.
    void = _ledger_run(
        [(1.2, 0.1, 20)], noise_source="fixed by HUBTUNE_UNSAFE_DP_SEED (testing only)"
    )
    ledger = void.ledger(trained_names=[], trained_count=0)
    assert ledger["guarantee_void"] is True
    assert ledger["guarantee"] == (
        f"NONE: {VOID_REASON} (the accounting below would give "
        f"({ledger['epsilon']:.4g}, 1e-05)-DP at the example level)"
    )


def test_prepare_private_refuses_what_would_void_the_guarantee(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hubtune.privacy.engine import prepare_private
    from hubtune.recipe import PrivacySection

    def prepare(rows: int, **section: Any) -> Any:
        model = nn.Linear(4, 2)
        return prepare_private(
            section=PrivacySection(enabled=True, noise_multiplier=1.0, **section),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            dataset=_Rows(rows, False),
            collate=None,
            epochs=3,
            num_processes=1,
            device=torch.device("cpu"),
        )

    with pytest.raises(
        PrivacyError,
        match=r"^privacy\.delta = 0\.01 is not below 1/n = 0\.01 \(n = 100 training examples\)",
    ):
        prepare(100, delta=0.01, logical_batch_size=10)
    with pytest.raises(
        PrivacyError,
        match=r"^privacy\.logical_batch_size \(101\) exceeds the 100 training examples$",
    ):
        prepare(100, logical_batch_size=101)
    caplog.set_level("WARNING", logger="hubtune.privacy.engine")
    run = prepare(500, logical_batch_size=16, physical_batch_size=8)
    assert not [r for r in caplog.records if "is small" in r.getMessage()]
    assert (run.n, run.q, run.delta, run.sigma) == (500, 1 / 32, 1e-5, 1.0)
    assert (run.planned_steps, run.max_steps, run.target_epsilon) == (96, 96, None)
    assert (run.max_grad_norm, run.accountant, run.grad_sample_mode) == (1.0, "prv", "hooks")
    assert (run.logical_batch_size, run.physical_batch_size, run.num_processes) == (16, 8, 1)
    assert run.prior_history == [] and run.noise_source == "os.urandom"
    # The loader samples with the secret generator at the accounted rate; the noise has its own.
    sampling, noise = run.generator_state.generators
    assert run.loader.batch_sampler.generator is sampling
    assert run.optimizer.generator is noise and run.optimizer.noise_multiplier == 1.0
    assert run.loader.batch_sampler.sample_rate == run.q
    assert prepare(500, logical_batch_size=16, delta=1e-6).delta == 1e-6  # given: kept
    for rows, logical in ((499, 16), (500, 15)):
        caplog.clear()
        prepare(rows, logical_batch_size=logical)
        assert [r.getMessage() for r in caplog.records if "is small" in r.getMessage()], (
            rows,
            logical,
        )


def test_prepare_private_checks_the_samplers_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubtune.privacy import engine as privacy

    monkeypatch.setattr(privacy, "sample_rate_for", lambda n, size: 0.1 + 1e-9)
    with pytest.raises(
        PrivacyError,
        match=r"^internal check failed: the sampler's rate 0\.1 is not the accounted q = 0\.100000001$",
    ):
        _private_on_rows(nn.Linear(4, 2), "hooks", rows=100, logical=10, physical=10, lr=0.1)


# --------------------------------------------------------------------------- the DP epoch's checks


def test_a_non_finite_loss_or_weight_stops_with_its_step() -> None:
    from hubtune.privacy.loop import stop_if_nonfinite as _stop_if_nonfinite

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    _stop_if_nonfinite(model, lambda: [False, False], 0, 1)
    _stop_if_nonfinite(model, lambda: [False, True], 0, 1)  # an overflowing norm: all finite
    with pytest.raises(
        RunError,
        match=r"^non-finite loss at epoch 3, step 7; stopped\. The last good checkpoint is kept "
        r"\(lower train\.lr, or check the data\)\.$",
    ):
        _stop_if_nonfinite(model, lambda: [True, False], 2, 7)
    with torch.no_grad():
        for layer in model[1:]:
            layer.bias[0] = float("nan")
    model[4].bias.requires_grad_(False)  # a frozen tensor is not the run's doing
    _stop_if_nonfinite(model, lambda: [False, False], 0, 1)  # the flags decide whether to look
    with pytest.raises(
        RunError,
        match=r"^non-finite weights after step 7 \(1\.bias, 2\.bias, 3\.bias\); stopped\. The last good checkpoint is kept\.$",
    ):
        _stop_if_nonfinite(model, lambda: [False, True], 2, 7)
    with pytest.raises(RunError, match=r"^non-finite loss at epoch 1, step 2"):
        _stop_if_nonfinite(model, lambda: [True, True], 0, 2)


def test_an_unchanged_trained_tensor_after_the_first_step_stops_the_run() -> None:
    from hubtune.privacy.loop import check_moved as _check_moved

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)])
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight += 1
    with pytest.raises(
        RunError,
        match=r"^DP training left 5 trained tensor\(s\) unchanged after the first step \(0\.bias, "
        r"1\.weight, 1\.bias, 2\.weight\): their gradients never reach the DP optimizer",
    ):
        _check_moved(model, initial)
    del initial["1.weight"], initial["1.bias"], initial["2.weight"]  # not trained: not checked
    with pytest.raises(
        RunError,
        match=r"^DP training left 2 trained tensor\(s\) unchanged after the first step \(0\.bias, 2\.bias\)",
    ):
        _check_moved(model, initial)
    with torch.no_grad():
        model[0].bias += 1
        model[2].bias += 1
    _check_moved(model, initial)


def test_a_restored_budget_must_match_the_checkpoints_record() -> None:
    from types import SimpleNamespace

    from hubtune.privacy.accounting import SpentBudget
    from hubtune.privacy.loop import check_restored_budget as _check_restored_budget

    run = _ledger_run([(1.2, 0.1, 20)], optimizer=SimpleNamespace(noise_multiplier=1.2))
    same = SpentBudget([(1.2, 0.1, 20)], 1.2, 40, 40)
    _check_restored_budget(run, same)
    with pytest.raises(
        RunError,
        match=r"^--resume: the restored accountant history \[\(1\.2, 0\.1, 20\)\] differs from the "
        r"checkpoint's record None; refusing to train on a budget that cannot be trusted\. Use --overwrite\.$",
    ):
        _check_restored_budget(run, None)
    with pytest.raises(
        RunError, match=r"differs from the checkpoint's record \[\(1\.2, 0\.1, 19\)\];"
    ):
        _check_restored_budget(run, SpentBudget([(1.2, 0.1, 19)], 1.2, 40, 40))
    run.optimizer.noise_multiplier = 1.3
    with pytest.raises(
        RunError,
        match=r"^internal check failed: the DP optimizer adds noise σ = 1\.3 but σ = 1\.2 was planned$",
    ):
        _check_restored_budget(run, same)


def test_a_checkpoint_state_is_read_against_the_recipe(tmp_path: Path) -> None:
    from hubtune.checkpoint import checkpoint_state as _checkpoint_state
    from hubtune.checkpoint import recipe_digest as _recipe_digest
    from hubtune.privacy.accounting import SpentBudget

    spec = _spec(tmp_path / "model", tmp_path / "d.csv", tmp_path / "out")
    recipe = Recipe.model_validate(spec)
    spent = SpentBudget([(1.2, 0.1, 20)], 1.2, 40, 40)
    state = {"recipe_digest": _recipe_digest(recipe), "epoch": 1, "dp": spent.to_json()}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert _checkpoint_state(tmp_path, recipe) == (state, spent)
    spec["train"]["epochs"] = 7  # the one change a resume may make
    assert _checkpoint_state(tmp_path, Recipe.model_validate(spec)) == (state, spent)
    spec["train"]["lr"] = 0.5
    with pytest.raises(
        RunError,
        match=r"^--resume: the recipe differs from the one .* was trained with \(only train\.epochs may change\)",
    ):
        _checkpoint_state(tmp_path, Recipe.model_validate(spec))
    del state["dp"]
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(
        RunError,
        match=r"^--resume: .* was written by an older hubtune that did not record the DP budget",
    ):
        _checkpoint_state(tmp_path, recipe)
    plain = dict(spec, privacy={"enabled": False})
    plain["train"] = {**spec["train"], "lr": 0.01}
    plain_recipe = Recipe.model_validate(plain)
    state["recipe_digest"] = _recipe_digest(plain_recipe)
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert _checkpoint_state(tmp_path, plain_recipe) == (state, None)  # no DP: no budget to read


class _Const(torch.utils.data.Dataset):
    """``n`` identical rows of ones, label 0 (every example has the same loss), with extras."""

    def __init__(self, n: int, *, fill: float = 1.0, index: bool = False, ids: bool = False):
        self.n, self.fill, self.index, self.ids = n, fill, index, ids

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        row: dict[str, Any] = {"features": torch.full((4,), self.fill), "labels": 0}
        if self.index:
            row["idx"] = i
        if self.ids:
            row["input_ids"] = torch.zeros(3, dtype=torch.long)
        return row


def _epoch(
    dataset: torch.utils.data.Dataset,
    *,
    mode: str = "hooks",
    logical: int = 16,
    physical: int = 4,
    lr: float = 0.0,
    max_steps: int | None = None,
    initial: bool = False,
    needs_position_ids: bool = False,
    lengths: list[int] | None = None,
    monkeypatch: pytest.MonkeyPatch,
    **extra: Any,
) -> tuple[Any, tuple[float, int, int, list[int]], list[dict[str, Any]], int]:
    """One _dp_epoch of hubtune's DP setup on a Linear model (fixed DP seed): its result, the
    physical batches the model saw, and how often the scheduler stepped."""
    import contextlib
    from types import SimpleNamespace

    from hubtune.privacy.engine import prepare_private
    from hubtune.privacy.loop import dp_epoch as _dp_epoch
    from hubtune.recipe import PrivacySection

    monkeypatch.setenv("HUBTUNE_UNSAFE_DP_SEED", "3")
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    run = prepare_private(
        section=PrivacySection(
            enabled=True,
            noise_multiplier=1.0,
            logical_batch_size=logical,
            physical_batch_size=physical,
            grad_sample_mode=mode,
        ),
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        dataset=dataset,
        collate=None,
        epochs=1,
        num_processes=1,
        device=torch.device("cpu"),
    )
    if max_steps is not None:
        run.max_steps = max_steps
    seen: list[dict[str, Any]] = []

    def forward(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        seen.append(dict(batch))
        return m(batch["features"])

    scheduler = SimpleNamespace(count=0)
    scheduler.step = lambda: setattr(scheduler, "count", scheduler.count + 1)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), autocast=contextlib.nullcontext, is_local_main_process=True
    )
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()} if initial else None
    result = _dp_epoch(
        accelerator=accelerator,
        run=run,
        forward=forward,
        scheduler=scheduler,
        epoch=0,
        epochs=1,
        step=5,
        initial=start,
        needs_position_ids=needs_position_ids,
        lengths=lengths,
        **extra,
    )
    return run, result, seen, scheduler.count


def test_a_dp_epoch_reports_each_step_and_trains_with_the_tasks_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """on_step gets every logical step (epoch, step, its Poisson batch size, a host time);
    a task's loss_fn replaces cross-entropy when Opacus brings no criterion."""
    import time as time_module

    from hubtune.progress import StepInfo

    infos: list[StepInfo] = []
    before = time_module.perf_counter()
    _, plain, _, _ = _epoch(_Const(64), monkeypatch=monkeypatch, on_step=infos.append)
    after = time_module.perf_counter()
    loss, seen, step, sizes = plain
    assert step == 5 + len(sizes) and len(sizes) >= 3
    assert [(i.epoch, i.step, i.examples) for i in infos] == [
        (0, 6 + k, size) for k, size in enumerate(sizes)
    ]
    times = [i.time for i in infos]
    assert before < times[0] and times == sorted(times) and times[-1] < after
    calls: list[int] = []

    def doubled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(len(labels))
        return 2.0 * F.cross_entropy(logits, labels)

    _, other, _, _ = _epoch(_Const(64), monkeypatch=monkeypatch, loss_fn=doubled)
    assert other[1:] == plain[1:]  # the same Poisson batches (fixed seed, lr 0)
    assert other[0] == pytest.approx(2 * loss, rel=1e-6) and loss > 0
    assert sum(calls) == seen and 0 not in calls  # an empty batch never reaches the loss


def test_position_ids_and_the_empty_flag_are_made_on_the_inputs_device() -> None:
    """On a GPU they must live beside the inputs; the meta device shows where they are made."""
    from hubtune.privacy.engine import add_position_ids
    from hubtune.privacy.loop import any_nonfinite

    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    made = add_position_ids({"input_ids": ids})["position_ids"]
    assert made.device.type == "meta" and made.shape == (2, 3)
    flag = any_nonfinite([], torch.device("meta"))
    assert flag.device.type == "meta" and flag.dtype == torch.bool and flag.shape == ()


def test_a_dp_epoch_checks_the_first_step_once_and_frees_the_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The unchanged-tensor check runs after the first logical step only; every step ends with
    the gradients freed (set to None, not kept as zeros)."""
    from hubtune.privacy import loop

    checked: list[int] = []
    real = loop.check_moved

    def check_moved(model: Any, initial: dict[str, torch.Tensor]) -> None:
        checked.append(len(initial))
        real(model, initial)

    monkeypatch.setattr(loop, "check_moved", check_moved)
    run, (_, _, step, sizes), _, _ = _epoch(
        _Const(64), lr=0.1, initial=True, monkeypatch=monkeypatch
    )
    assert len(sizes) >= 3 and step == 5 + len(sizes)
    assert checked == [2]  # weight and bias, once
    assert all(p.grad is None for p in run.model.parameters())
    checked.clear()
    _epoch(_Const(64), lr=0.1, monkeypatch=monkeypatch)
    assert checked == []  # a resumed epoch has no first step to check


def test_batch_sizes_are_summed_over_processes() -> None:
    from types import SimpleNamespace

    from hubtune.privacy.loop import sum_over_processes

    sizes = [3, 0, 5]
    one = SimpleNamespace(num_processes=1)
    assert sum_over_processes(one, sizes) is sizes
    asked: list[Any] = []

    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        asked.append((tensor.dtype, tensor.device, tuple(tensor.shape), reduction))
        return torch.tensor([6, 0, 10])

    # The meta device stands in for a GPU: the sizes go to the accelerator's device to be summed.
    two = SimpleNamespace(num_processes=2, device=torch.device("meta"), reduce=reduce)
    summed = sum_over_processes(two, sizes)
    assert summed == [6, 0, 10] and all(type(v) is int for v in summed)
    assert asked == [(torch.long, torch.device("meta"), (3,), "sum")]


def test_the_dp_preflight_checks_four_examples_without_their_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One real batch of at most four examples, without 'idx', on the run's device, with
    per-example position ids when the model takes them; a refusal becomes a RunError."""
    from hubtune.privacy import loop

    seen: list[dict[str, Any]] = []

    def check(run: Any, batch: dict[str, Any], forward: Any) -> None:
        seen.append(batch)

    monkeypatch.setattr(loop, "check_per_sample_gradients", check)
    run = _private_on_rows(nn.Linear(4, 2), "hooks", rows=20, logical=10, physical=10, lr=0.1)
    loop.dp_preflight(run, _Rows(20, True), None, None, torch.device("cpu"), False)
    (batch,) = seen
    assert sorted(batch) == ["features", "labels"] and batch["features"][:, 0].tolist() == [
        0.0,
        1.0,
        2.0,
        3.0,
    ]
    seen.clear()
    loop.dp_preflight(run, _Rows(2, False), None, None, torch.device("meta"), False)
    assert seen[0]["features"].shape == (2, 4) and seen[0]["features"].device.type == "meta"
    seen.clear()

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = torch.utils.data.default_collate(items)
        batch["input_ids"] = torch.zeros(len(items), 3, dtype=torch.long)
        return batch

    loop.dp_preflight(run, _Rows(20, False), collate, None, torch.device("cpu"), True)
    assert seen[0]["position_ids"].tolist() == [[0, 1, 2]] * 4
    loop.dp_preflight(run, _Rows(20, False), collate, None, torch.device("cpu"), False)
    assert "position_ids" not in seen[1]

    def refuse(run: Any, batch: dict[str, Any], forward: Any) -> None:
        raise PrivacyError("no per-example gradient for x")

    monkeypatch.setattr(loop, "check_per_sample_gradients", refuse)
    with pytest.raises(RunError, match=r"^privacy: no per-example gradient for x$"):
        loop.dp_preflight(run, _Rows(20, False), None, None, torch.device("cpu"), False)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_epoch_counts_steps_examples_and_the_loss(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, (running, seen, step, sizes), batches, stepped = _epoch(
        _Const(64, index=True), mode=mode, monkeypatch=monkeypatch
    )
    # q = 16/64: four logical (Poisson) steps, each split into physical batches of at most 4.
    assert step == 5 + 4 and stepped == 4 and run.steps_taken == 4 and len(sizes) == 4
    assert not run.stopped_by_budget
    assert sum(sizes) == seen == sum(len(b["features"]) for b in batches) > 0
    assert max(sizes) > 4 >= max(len(b["features"]) for b in batches)  # split, then summed again
    assert all("idx" not in b and "labels" not in b for b in batches)
    # lr = 0: the weights stay put, so every example's loss is the same one value.
    with torch.no_grad():
        one = F.cross_entropy(run.model(torch.ones(1, 4)), torch.tensor([0])).item()
    assert running == pytest.approx(one * seen, rel=1e-5)


def test_a_dp_epoch_stops_at_the_budget_and_checks_the_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, (_, seen, step, sizes), _, stepped = _epoch(
        _Const(64), max_steps=2, monkeypatch=monkeypatch
    )
    assert run.stopped_by_budget and run.steps_taken == 2 and step == 7 and stepped == 2
    assert len(sizes) == 2 and sum(sizes) == seen
    run, _, _, _ = _epoch(_Const(64), max_steps=4, monkeypatch=monkeypatch)
    assert not run.stopped_by_budget and run.steps_taken == 4
    # The first step must move every trained tensor: with lr = 0 nothing moves.
    with pytest.raises(
        RunError, match=r"^DP training left 2 trained tensor\(s\) unchanged after the first step"
    ):
        _epoch(_Const(64), initial=True, monkeypatch=monkeypatch)
    run, _, _, _ = _epoch(_Const(64), initial=True, lr=1.0, monkeypatch=monkeypatch)
    assert run.steps_taken == 4


def test_a_dp_epoch_stops_on_a_non_finite_loss_and_takes_empty_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(RunError, match=r"^non-finite loss at epoch 1, step 6;"):
        _epoch(_Const(64, fill=float("nan")), monkeypatch=monkeypatch)
    # One step in the whole epoch: its flags are read after the loop, before returning.
    with pytest.raises(RunError, match=r"^non-finite loss at epoch 1, step 6;"):
        _epoch(_Const(64, fill=float("nan")), logical=64, physical=64, monkeypatch=monkeypatch)
    # q = 1/100: most Poisson batches are empty; each is still a step, with a zero loss.
    run, (running, seen, step, sizes), _, _ = _epoch(
        _Const(100), logical=1, physical=4, monkeypatch=monkeypatch
    )
    assert run.steps_taken == 100 == len(sizes) and step == 105 and 0 in sizes
    assert seen == sum(sizes) and math.isfinite(running)


def test_a_dp_epoch_orders_by_length_and_adds_position_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _Rows(64, True)
    lengths = [64 - i for i in range(64)]  # longer first in index order: sorted, it reverses
    _, (_, seen, _, sizes), batches, _ = _epoch(
        rows, lengths=lengths, physical=64, monkeypatch=monkeypatch
    )
    for batch in batches:
        firsts = batch["features"][:, 0].tolist()
        assert firsts == sorted(firsts, reverse=True)
    assert any(len(b["features"]) > 1 for b in batches)
    # Ordered by length, an empty Poisson batch still comes out shaped like the others.
    run, (_, seen, step, sizes), _, _ = _epoch(
        _Rows(100, False), lengths=[1] * 100, logical=1, monkeypatch=monkeypatch
    )
    assert run.steps_taken == 100 and 0 in sizes and seen == sum(sizes)
    _, _, batches, _ = _epoch(
        _Const(64, ids=True), needs_position_ids=True, monkeypatch=monkeypatch
    )
    assert all(b["position_ids"].shape == b["input_ids"].shape for b in batches)
    _, _, batches, _ = _epoch(_Const(64, ids=True), monkeypatch=monkeypatch)
    assert all("position_ids" not in b for b in batches)


def test_a_dp_epoch_shows_its_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HUBTUNE_PROGRESS", "1")
    run, _, _, _ = _epoch(_Const(64), monkeypatch=monkeypatch)
    assert run.steps_taken == 4
    assert "epoch 1/1 (DP)" in capsys.readouterr().err


def test_prepare_private_hands_opacus_the_plan_and_the_secret_generators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What reaches Opacus: the section's accountant and secure mode, the planned σ (from what
    a resumed run spent), the recipe's collate, DPDDP with several processes."""
    import opacus
    import opacus.distributed

    from hubtune.privacy.accounting import SpentBudget
    from hubtune.privacy.engine import prepare_private
    from hubtune.recipe import PrivacySection

    engines: list[dict[str, Any]] = []
    real_engine = opacus.PrivacyEngine

    def engine(**kwargs: Any) -> Any:
        engines.append(kwargs)
        return real_engine(accountant=kwargs["accountant"], secure_mode=False)

    wrapped: list[Any] = []

    def dpddp(module: nn.Module) -> nn.Module:
        wrapped.append(module)
        return module

    monkeypatch.setattr(opacus, "PrivacyEngine", engine)
    monkeypatch.setattr(opacus.distributed, "DifferentiallyPrivateDistributedDataParallel", dpddp)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = torch.utils.data.default_collate(items)
        batch["marked"] = torch.ones(len(items))
        return batch

    def prepare(processes: int = 1, spent: Any = None, **section: Any) -> Any:
        model = nn.Linear(4, 2)
        return prepare_private(
            section=PrivacySection(
                enabled=True, logical_batch_size=10, physical_batch_size=10, **section
            ),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            dataset=_Rows(100, False),
            collate=collate,
            epochs=2,
            num_processes=processes,
            device=torch.device("cpu"),
            spent=spent,
        )

    run = prepare(target_epsilon=8.0, accountant="rdp", delta=1e-4)
    assert engines == [{"accountant": "rdp", "secure_mode": False}] and wrapped == []
    eps = compute_epsilons([(run.sigma, 0.1, 20)], 1e-4)["rdp"]
    assert 7.99 <= eps <= 8.0 and run.optimizer.noise_multiplier == run.sigma
    assert "marked" in next(iter(run.loader))  # the recipe's collate, under Opacus' wrapper
    # A resumed run with the same plan keeps the σ its checkpoint recorded.
    spent = SpentBudget([(1.7, 0.1, 5)], 1.7, 20, 19)
    resumed = prepare(target_epsilon=8.0, accountant="rdp", delta=1e-4, spent=spent)
    assert (resumed.sigma, resumed.max_steps, resumed.planned_steps) == (1.7, 19, 20)
    # Several processes: the model goes through DPDDP (Opacus' distributed wrapper) first.
    several = prepare(processes=2, noise_multiplier=1.0)
    assert len(wrapped) == 1 and isinstance(wrapped[0], nn.Linear) and several.num_processes == 2
    # secure_mode: Opacus' own CSPRNG, never hubtune's generators (torchcsprng faked here).
    import types

    monkeypatch.setitem(sys.modules, "torchcsprng", types.ModuleType("torchcsprng"))
    engines.clear()
    secure = prepare(noise_multiplier=1.0, secure_mode=True)
    assert engines == [{"accountant": "prv", "secure_mode": True}]
    sampling, noise = secure.generator_state.generators
    assert secure.loader.batch_sampler.generator is not sampling
    assert secure.optimizer.generator is not noise and secure.secure_mode is True


def test_prepare_private_makes_the_generators_and_moves_the_model_to_the_run_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The generators are asked for with the section's secure mode and the run's device, and
    the model is moved there (on a GPU: the noise is drawn beside the gradients)."""
    import types

    from hubtune.privacy import engine as engine_module

    asked: list[tuple[Any, Any]] = []
    real = engine_module._secret_generators

    def generators(secure_mode: Any, device: Any) -> Any:
        asked.append((secure_mode, device))
        return real(secure_mode, device)

    moved: list[Any] = []

    class Recorded(nn.Linear):
        def to(self, *args: Any, **kwargs: Any) -> Any:
            moved.append(args)
            return super().to(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_secret_generators", generators)
    monkeypatch.delenv("HUBTUNE_UNSAFE_DP_SEED", raising=False)
    run = _private_on_rows(Recorded(4, 2), "hooks", rows=20, logical=10, physical=10, lr=0.1)
    assert asked == [(False, torch.device("cpu"))] and moved[0] == (torch.device("cpu"),)
    assert run.noise_source == "os.urandom"
    # secure_mode reaches the generators: with the test seed set, that is refused.
    monkeypatch.setitem(sys.modules, "torchcsprng", types.ModuleType("torchcsprng"))
    monkeypatch.setenv("HUBTUNE_UNSAFE_DP_SEED", "1")
    model = nn.Linear(4, 2)
    from hubtune.recipe import PrivacySection

    with pytest.raises(
        PrivacyError,
        match=r"^HUBTUNE_UNSAFE_DP_SEED fixes the DP randomness and cannot be combined with secure_mode$",
    ):
        engine_module.prepare_private(
            section=PrivacySection(
                enabled=True,
                noise_multiplier=1.0,
                logical_batch_size=10,
                physical_batch_size=10,
                secure_mode=True,
            ),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            dataset=_Rows(20, False),
            collate=None,
            epochs=1,
            num_processes=1,
            device=torch.device("cpu"),
        )
    assert asked[-1] == (True, torch.device("cpu"))


def test_prepare_private_asks_opacus_for_poisson_sampling_flat_clipping_and_cross_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mechanism's settings are passed explicitly (not left to Opacus' defaults), and the
    empty-batch template is shaped from the first example alone."""
    import opacus

    calls: list[dict[str, Any]] = []
    real = opacus.PrivacyEngine.make_private

    def make_private(self: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(opacus.PrivacyEngine, "make_private", make_private)
    read: list[int] = []

    class Spied(_Rows):
        def __getitem__(self, i: int) -> dict:
            read.append(i)
            return super().__getitem__(i)

    from hubtune.privacy.engine import prepare_private
    from hubtune.recipe import PrivacySection

    model = nn.Linear(4, 2)
    run = prepare_private(
        section=PrivacySection(
            enabled=True, noise_multiplier=1.0, logical_batch_size=10, physical_batch_size=10
        ),
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=Spied(20, False),
        collate=None,
        epochs=1,
        num_processes=1,
        device=torch.device("cpu"),
    )
    (kwargs,) = calls
    assert kwargs["poisson_sampling"] is True and kwargs["clipping"] == "flat"
    assert type(kwargs["criterion"]) is nn.CrossEntropyLoss
    assert kwargs["noise_multiplier"] == 1.0 and kwargs["max_grad_norm"] == 1.0
    assert set(read) == {0}  # the template of an empty first batch: row 0's shapes (as Opacus)
    template = run.loader.collate_fn.first_batch
    assert template["features"].shape == (1, 4) and template["features"][0, 0] == 0.0


def test_prepare_private_keeps_the_criterion_target_and_prior_history() -> None:
    """Ghost clipping trains through the criterion Opacus returns; the run records the target ε
    and the base model's prior history (the ledger and the resume read them from the run)."""
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from hubtune.privacy.engine import prepare_private
    from hubtune.recipe import PrivacySection

    ghost = _private_on_rows(nn.Linear(4, 2), "ghost", rows=20, logical=10, physical=10, lr=0.1)
    assert isinstance(ghost.criterion, DPLossFastGradientClipping)
    hooks = _private_on_rows(nn.Linear(4, 2), "hooks", rows=20, logical=10, physical=10, lr=0.1)
    assert hooks.criterion is None and hooks.prior_history == [] and hooks.target_epsilon is None
    model = nn.Linear(4, 2)
    prior = [(2.0, 0.05, 10)]
    run = prepare_private(
        section=PrivacySection(
            enabled=True, target_epsilon=8.0, logical_batch_size=10, physical_batch_size=10
        ),
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=_Rows(20, False),
        collate=None,
        epochs=1,
        num_processes=1,
        device=torch.device("cpu"),
        prior_history=prior,
    )
    assert run.target_epsilon == 8.0 and run.prior_history == prior
    assert run.prior_history is not prior  # a copy: the caller's list may change later


def test_max_steps_within_bisects_to_the_exact_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ε = 0.1 per step, the answer is the exact number of steps that fits, for every
    target and bound (the bisection's last halving included)."""
    from hubtune.privacy import accounting

    monkeypatch.setattr(
        accounting, "_epsilon", lambda name, history, delta: sum(k for *_, k in history) / 10
    )
    for upper in range(1, 13):
        for fits in range(0, 14):
            target = fits / 10 + 0.05
            got = accounting.max_steps_within(
                accountant="rdp", prior=[], sigma=1.0, q=0.1, delta=1e-5, target=target, upper=upper
            )
            assert got == min(fits, upper), (upper, fits)


def test_non_finite_weights_after_the_last_step_of_an_epoch_stop_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One step in the epoch: its weights are checked after the loop, by name (the model's own
    names, without the ``_module.`` of Opacus' wrapper)."""
    with pytest.raises(
        RunError,
        match=r"^non-finite weights after step 6 \(weight, bias\); stopped\. "
        r"The last good checkpoint is kept\.$",
    ):
        _epoch(_Const(64), logical=64, physical=64, lr=float("inf"), monkeypatch=monkeypatch)


def test_max_steps_within_bisects_in_few_accountant_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ε is a full accountant computation: the search asks at most 2 + ceil(log2(upper))
    times, and never for a negative number of steps (a bisection that stops halving would
    otherwise loop for ever; the fake accountant refuses the extra call instead)."""
    from hubtune.privacy import accounting

    calls = 0
    budget = 0

    def epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
        nonlocal calls
        calls += 1
        assert calls <= budget, "the bisection does not converge"
        assert all(k >= 0 for *_, k in history), history
        return sum(k for *_, k in history) / 10  # 0.1 per step

    monkeypatch.setattr(accounting, "_epsilon", epsilon)
    for upper in (2, 3, 7, 8, 100, 1000, 12_345):
        for fits in sorted({0, 1, upper // 3, upper // 2, upper - 1}):
            calls, budget = 0, 2 + math.ceil(math.log2(upper))
            got = accounting.max_steps_within(
                accountant="rdp",
                prior=[],
                sigma=1.0,
                q=0.1,
                delta=1e-5,
                target=fits / 10 + 0.05,
                upper=upper,
            )
            assert got == fits, (upper, fits)


def test_read_later_copies_gpu_flags_to_the_host_behind_an_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU the flags are copied to the host without blocking, an event is recorded after
    the copy, and reading them waits for that event first (a stand-in tensor on a "cuda"
    device and a stand-in event: the branch's calls, on this CPU-only machine)."""
    from hubtune.privacy import loop

    calls: list[Any] = []

    class Event:
        def __init__(self) -> None:
            calls.append("event")

        def record(self) -> None:
            calls.append("record")

        def synchronize(self) -> None:
            calls.append("synchronize")

    class GpuFlags:
        device = torch.device("cuda", 0)

        def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(("to", args, kwargs))
            return torch.tensor([False, True])

        def tolist(self) -> list[bool]:
            raise AssertionError("flags on a GPU are read from their host copy")

    monkeypatch.setattr(loop.torch.cuda, "Event", Event)
    read = loop._read_later(GpuFlags())  # type: ignore[arg-type]
    assert calls == [("to", ("cpu",), {"non_blocking": True}), "event", "record"]
    assert read() == [False, True]
    assert calls[3:] == ["synchronize"]
    # Flags on the CPU are read directly.
    cpu = torch.tensor([True, False])
    assert loop._read_later(cpu)() == [True, False]


def test_plan_noise_accepts_a_rate_exactly_at_the_tolerance() -> None:
    """A recorded rate at most 1e-12 from q is the same rate (the bound included); 2e-12 - 1e-12
    is exactly 1e-12 in binary floating point, 3e-12 - 1e-12 is past it."""
    from hubtune.privacy.accounting import NoisePlan, SpentBudget, plan_noise

    fixed = _section(noise_multiplier=1.0, target_epsilon=None)
    assert 2e-12 - 1e-12 == 1e-12
    at = SpentBudget(history=[(1.0, 2e-12, 5)], sigma=1.0, planned_steps=10, max_steps=10)
    assert plan_noise(
        section=fixed, prior=[], spent=at, q=1e-12, planned_steps=20, delta=1e-5
    ) == NoisePlan(1.0, 20, 20)
    past = SpentBudget(history=[(1.0, 3e-12, 5)], sigma=1.0, planned_steps=10, max_steps=10)
    with pytest.raises(PrivacyError, match=r"the data or batch size changed"):
        plan_noise(section=fixed, prior=[], spent=past, q=1e-12, planned_steps=20, delta=1e-5)


def test_sigma_for_target_logs_how_many_accountant_evaluations_it_took(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hubtune.privacy import accounting

    asked: list[float] = []

    def epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
        asked.append(history[-1][0])
        return 4.0 / history[-1][0]  # ε = 4 / σ

    monkeypatch.setattr(accounting, "_epsilon", epsilon)
    caplog.set_level("DEBUG", logger="hubtune.privacy.accounting")
    sigma = accounting.sigma_for_target(
        accountant="rdp", prior=[], q=0.1, steps=10, delta=1e-5, target=2.0
    )
    assert 1.99 <= 4.0 / sigma <= 2.0 and len(asked) > 2
    assert [r.getMessage() for r in caplog.records] == [
        f"privacy: σ = {sigma:.6g} after {len(asked)} accountant evaluations"
    ]


def _fake_accountant(
    monkeypatch: pytest.MonkeyPatch, epsilon_at: Callable[[float], float], *, most: int = 60
) -> list[float]:
    """Replace the accountant by ε = epsilon_at(σ); the σ asked are recorded, and a search that
    asks more than ``most`` times fails at once instead of running on."""
    from hubtune.privacy import accounting

    asked: list[float] = []

    def epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
        asked.append(history[-1][0])
        assert len(asked) <= most, f"no convergence after {most} accountant calls: {asked[-5:]}"
        return epsilon_at(history[-1][0])

    monkeypatch.setattr(accounting, "_epsilon", epsilon)
    return asked


def _sigma(target: float) -> float:
    from hubtune.privacy import accounting

    return accounting.sigma_for_target(
        accountant="rdp", prior=[], q=0.1, steps=10, delta=1e-5, target=target
    )


def test_sigma_for_target_steps_up_at_most_20_fold_per_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bracket steps σ by ε/target x 1.25, with ε/target capped at 16: never more than 20x
    in one step (far jumps are slow to account), and it stops once it is under the target."""
    asked = _fake_accountant(monkeypatch, lambda s: 100.0 / s)
    sigma = _sigma(1.0)
    assert 0.99 <= 100.0 / sigma <= 1.0
    assert asked[:2] == [1.0, 20.0]  # ε/target = 100 at σ = 1: capped at 16, x 1.25
    ups = [b / a for a, b in zip(asked, asked[1:], strict=False) if b > a]
    assert ups and max(ups) <= 20.0


def test_sigma_for_target_when_a_step_meets_the_target_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # σ = 1 (the first one asked) gives exactly the target: it is the answer.
    asked = _fake_accountant(monkeypatch, lambda s: 4.0 / s)
    assert _sigma(4.0) == 1.0
    # A step up lands exactly on the target (ε = 20/σ, σ = 1 -> 20): found in two evaluations.
    asked = _fake_accountant(monkeypatch, lambda s: 20.0 / s)
    assert _sigma(1.0) == 20.0 and asked == [1.0, 20.0]


def test_sigma_for_target_counts_an_epsilon_of_zero_as_under_the_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An accountant may answer ε = 0 (no loss at all) for enough noise: that is under any
    target (its log is not taken), and the search narrows down to the crossing."""
    asked = _fake_accountant(monkeypatch, lambda s: max(0.0, 6.0 / s - 1.0))
    sigma = _sigma(1.0)
    assert 0.99 <= 6.0 / sigma - 1.0 <= 1.0
    assert any(6.0 / s - 1.0 <= 0.0 for s in asked)  # a σ with ε = 0 was asked


def test_sigma_for_target_refuses_a_sigma_past_1e5(monkeypatch: pytest.MonkeyPatch) -> None:
    """σ = 1, 20, 400, 8000 (ε/target capped at 16), then 8000 x 10.00004 x 1.25 = 100000.4:
    past the 1e5 limit, refused without asking the accountant about it."""
    asked = _fake_accountant(monkeypatch, lambda s: 80000.32 / s)
    with pytest.raises(
        PrivacyError, match=r"^no noise multiplier up to 1e5 reaches target ε = 1\.0$"
    ):
        _sigma(1.0)
    assert asked == [1.0, 20.0, 400.0, 8000.0]


def test_sigma_for_target_steps_down_to_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubtune.privacy.accounting import MIN_SIGMA

    # ε a little under the target at σ = 1: one step down, by ε/target x 0.8, brackets it.
    asked = _fake_accountant(monkeypatch, lambda s: 0.9 / s)
    sigma = _sigma(1.0)
    assert 0.99 <= 0.9 / sigma <= 1.0
    assert asked[:2] == [1.0, pytest.approx(0.72)]
    # Far under the target even at the floor: MIN_SIGMA, asked once, and the search ends there.
    asked = _fake_accountant(monkeypatch, lambda s: 0.001 / s)
    assert _sigma(1.0) == MIN_SIGMA and asked == [1.0, MIN_SIGMA]


def test_sigma_for_target_ends_at_a_probe_that_meets_the_target_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ε = 100/σ, reported as exactly the target within 1e-9 of σ = 100: the bracket is
    [20, 125] after σ = 1, 20, 125, and the secant's probe near 100 ends the search."""
    asked = _fake_accountant(monkeypatch, lambda s: 1.0 if abs(s - 100.0) < 1e-7 else 100.0 / s)
    sigma = _sigma(1.0)
    assert asked[:3] == [1.0, 20.0, pytest.approx(125.0)] and len(asked) == 4
    assert sigma == asked[-1] and abs(sigma - 100.0) < 1e-7


@pytest.mark.parametrize(
    ("curve", "most"),
    [
        (lambda s: 100.0 / s, 5),  # a power law: the secant in log-log is exact
        (lambda s: 100.0 / s + 0.5, 5),
        (lambda s: 100.0 / s**0.5 + 0.2, 8),
        (lambda s: 100.0 / s**2, 11),
        (lambda s: 2.0 / s**1.5 + 0.1, 4),
        (lambda s: 0.5 / s**2, 4),
        # ε under the target at σ = 1: the bracket steps down first.
        (lambda s: 0.8 / s**0.5, 3),
        (lambda s: 0.5 / s, 3),
        (lambda s: max(0.5 / s - 0.5, 0.0), 6),
        # Curves on which the Illinois halving of the stale end decides the count.
        (lambda s: max(30.0 / s**2 - 0.5, 0.0), 12),
        (lambda s: 5.0 / s**1.5, 5),
        (lambda s: max(2.0 / s**2 - 0.5, 0.0), 5),
        (lambda s: 5.0 / s**2 + 0.5, 6),
        (lambda s: 2.0 / s**2 + 0.5, 6),
        (lambda s: 5.0 / s**3 + 0.5, 6),
    ],
)
def test_sigma_for_target_lands_under_the_target_in_few_evaluations_on_smooth_curves(
    monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float], most: int
) -> None:
    """Each evaluation is a full PRV computation: the regula falsi (Illinois) needs no more than
    these on smooth ε(σ) curves, and its answer is never above the target."""
    asked = _fake_accountant(monkeypatch, curve)
    sigma = _sigma(1.0)
    assert 0.99 <= curve(sigma) <= 1.0
    assert len(asked) <= most, asked


@pytest.mark.parametrize(
    ("curve", "jump", "most"),
    [
        (lambda s: math.inf if s < 0.5 else 0.45 / s, 0.5, 22),  # unbounded below σ = 0.5
        (lambda s: 2.0 if s < 3.3 else 0.5, 3.3, 26),
    ],
)
def test_sigma_for_target_narrows_a_jump_across_the_target_to_its_upper_side(
    monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float], jump: float, most: int
) -> None:
    """ε that jumps across the target (never within the tolerance): the search stops once the
    bracket is 1e-6 x σ wide and answers its upper end, under the target."""
    asked = _fake_accountant(monkeypatch, curve)
    sigma = _sigma(1.0)
    assert curve(sigma) <= 1.0 and jump <= sigma <= jump * (1 + 2e-6)
    assert len(asked) <= most, asked


def test_the_rdp_memo_is_bounded_and_used() -> None:
    """The memo of Opacus' per-order RDP holds at most 2**16 entries (a long process must not
    grow it without bound), and a repeated (q, σ, α) is answered from it."""
    from opacus.accountants.analysis import rdp

    from hubtune.privacy.accounting import _memoize_rdp_orders

    _memoize_rdp_orders()
    assert rdp._compute_rdp.cache_info().maxsize == 1 << 16
    rdp._compute_rdp(0.1, 0.9, 1.5)
    hits = rdp._compute_rdp.cache_info().hits
    rdp._compute_rdp(0.1, 0.9, 1.5)
    assert rdp._compute_rdp.cache_info().hits == hits + 1
