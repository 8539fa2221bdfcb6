"""DP-SGD runs: the ledger is right and recomputable, refusals are clear, nothing silently breaks."""

from __future__ import annotations

import json
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
    with pytest.raises(RunError, match=r"non-finite weights after step [0-9]+ \(.+\); stopped"):
        run_recipe(recipe)
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
    from hubtune.privacy import prepare_private
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

    from hubtune.privacy import SpentBudget, plan_noise

    section = SimpleNamespace(noise_multiplier=None, target_epsilon=4.0, accountant="rdp")
    spent = SpentBudget(history=[(1.1, 0.1, 20)], sigma=1.1, planned_steps=60, max_steps=57)
    same = plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=60, delta=1e-5)
    assert (same.sigma, same.max_steps) == (1.1, 57)  # an interrupted run continues exactly
    grown = plan_noise(section=section, prior=[], spent=spent, q=0.1, planned_steps=80, delta=1e-5)
    eps = compute_epsilons([(1.1, 0.1, 20), (grown.sigma, 0.1, 60)], 1e-5)["rdp"]
    assert 4.0 - 0.011 <= eps <= 4.0 and grown.max_steps == 80


def test_resume_refuses_when_the_budget_is_already_spent() -> None:
    from types import SimpleNamespace

    from hubtune.privacy import SpentBudget, plan_noise

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
