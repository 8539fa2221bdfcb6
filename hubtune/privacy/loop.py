"""The DP-SGD epoch and its guards: Poisson logical batches, physical passes, device-side checks.

Beside the engine (:mod:`hubtune.privacy.engine`) because every line here is part of what the
guarantee depends on: each logical batch is exactly what the Poisson sampler drew, the budget
guard stops before a step would pass the target, a non-finite loss or weight stops the run
before anything is saved, and a trained tensor that never moves is refused (opacus #820).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hubtune.errors import RunError
from hubtune.privacy.accounting import PrivacyError, SpentBudget
from hubtune.privacy.engine import PrivacyRun, add_position_ids, check_per_sample_gradients
from hubtune.progress import OnStep, StepInfo, progress

__all__ = [
    "LengthSorted",
    "any_nonfinite",
    "check_moved",
    "check_restored_budget",
    "dp_epoch",
    "dp_preflight",
    "stop_if_nonfinite",
    "sum_over_processes",
]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def dp_epoch(
    *,
    accelerator: Any,
    run: PrivacyRun,
    forward: Any,
    scheduler: Any,
    epoch: int,
    epochs: int,
    step: int,
    initial: dict[str, torch.Tensor] | None,
    needs_position_ids: bool,
    lengths: list[int] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: OnStep | None = None,
) -> tuple[float, int, int, list[int]]:
    """One DP-SGD epoch: Poisson logical batches, split into physical ones by BatchMemoryManager.

    With ``lengths`` (text), each logical batch is ordered by length before it is split, so the
    physical batches pad less. The logical batch (the examples the mechanism sampled) and its
    clipped-gradient sum, noise and accounting are unchanged.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    seen = 0
    sizes: list[int] = []  # examples in each logical (Poisson) batch, this process
    current = 0
    model, optimizer = run.model, run.optimizer
    # The loss sum and a non-finite-loss flag stay on the device: the host never waits for a
    # pass to finish (it used to read the loss twice per physical pass, draining a GPU's queue).
    running = torch.zeros((), device=accelerator.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    pending: tuple[Callable[[], list[bool]], int, int] | None = None  # the last step's checks
    source = run.loader
    if lengths is not None:
        source = DataLoader(
            source.dataset,
            batch_sampler=LengthSorted(source.batch_sampler, lengths),
            collate_fn=source.collate_fn,
            generator=source.generator,
        )
    with BatchMemoryManager(
        data_loader=source, max_physical_batch_size=run.physical_batch_size, optimizer=optimizer
    ) as loader:
        for batch in progress(loader, accelerator, f"epoch {epoch + 1}/{epochs} (DP)"):
            if run.steps_taken >= run.max_steps:
                # Budget guard: one more step would take ε past the target.
                run.stopped_by_budget = True
                break
            batch.pop("idx", None)
            # non_blocking: a blocking host-to-GPU copy waits for all queued work first.
            labels = batch.pop("labels").to(accelerator.device, non_blocking=True)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            if needs_position_ids:
                add_position_ids(batch)
            with accelerator.autocast():
                logits = forward(model, batch)
            if len(labels) == 0:
                # An empty Poisson batch is a real step of the mechanism: no example, zero
                # clipped gradient, the noise alone. A mean over no examples would be NaN.
                loss = logits.float().sum() * 0.0
            elif run.criterion is not None:
                loss = run.criterion(logits.float(), labels)
            else:
                loss = (loss_fn or _cross_entropy)(logits, labels)
            detached = loss.detach()
            nonfinite |= ~torch.isfinite(detached)
            running += detached.float() * len(labels)
            loss.backward()
            optimizer.step()
            current += len(labels)
            if not optimizer._is_last_step_skipped:  # a logical (Poisson) batch is complete
                sizes.append(current)
                current = 0
                scheduler.step()
                step += 1
                if on_step is not None:  # host time: a GPU step may still be running
                    on_step(StepInfo(epoch, step, sizes[-1], time.perf_counter()))
                # The loss flag and every trained tensor's finiteness, copied to the host
                # without waiting; the copy is read at the next logical step (long done by
                # then), so the GPU queue never drains for it. A NaN reaches only weights that
                # are discarded: the run stops here or at the loop's end, before any save.
                flags = torch.stack([nonfinite, any_nonfinite(trained, nonfinite.device)])
                previous, pending = pending, (_read_later(flags), epoch, step)
                if previous is not None:
                    stop_if_nonfinite(model, *previous)
                if initial is not None:
                    check_moved(model, initial)
                    initial = None
            optimizer.zero_grad(set_to_none=True)
            seen += len(labels)
    if pending is not None:
        stop_if_nonfinite(model, *pending)
    return float(running), seen, step, sizes


def _read_later(flags: torch.Tensor) -> Callable[[], list[bool]]:
    """Start copying a small device tensor to the host; the returned function waits for it.

    On a GPU the copy goes to pinned memory behind a CUDA event, so neither starting it nor
    reading it a step later stalls the host on the work queued in between.
    """
    if flags.device.type == "cuda":
        host = flags.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read() -> list[bool]:
            done.synchronize()
            return host.tolist()

        return read
    return flags.tolist


def stop_if_nonfinite(model: Any, read: Callable[[], list[bool]], epoch: int, step: int) -> None:
    loss_bad, weights_bad = read()
    if loss_bad:
        raise RunError(
            f"non-finite loss at epoch {epoch + 1}, step {step}; stopped. The last good "
            "checkpoint is kept (lower train.lr, or check the data)."
        )
    if weights_bad:
        bad = [
            # the model's own names, not those of Opacus' wrapper (GradSampleModule._module)
            n.removeprefix("_module.")
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(p).all()
        ]
        if bad:  # else a finite tensor's norm overflowed: nothing is wrong
            raise RunError(
                f"non-finite weights after step {step} ({', '.join(bad[:3])}); stopped. The "
                "last good checkpoint is kept."
            )


def any_nonfinite(tensors: Sequence[torch.Tensor], device: Any = None) -> torch.Tensor:
    """A device-side flag: does any tensor hold a NaN or an infinity?

    One fused norm over all tensors (a single kernel launch per device and dtype on a GPU)
    instead of two reductions per tensor: a NaN or inf makes its tensor's norm non-finite. The
    converse can fail only when a finite tensor's norm overflows, so a caller that sees the flag
    names the culprits with an exact per-tensor check.
    """
    # no_grad as a block, not a decorator: mutmut skips decorated functions.
    with torch.no_grad():
        if not tensors:
            return torch.zeros((), dtype=torch.bool, device=device)
        return torch.stack(torch._foreach_norm(list(tensors))).isfinite().all().logical_not()


class LengthSorted:
    """A Poisson batch sampler whose batches come out ordered by example length (same examples)."""

    def __init__(self, sampler: Any, lengths: list[int]):
        self.sampler = sampler
        self.lengths = lengths

    def __iter__(self) -> Any:
        for batch in self.sampler:
            yield sorted(batch, key=lambda i: self.lengths[i])  # stable: deterministic order

    def __len__(self) -> int:
        return len(self.sampler)


def sum_over_processes(accelerator: Any, sizes: list[int]) -> list[int]:
    """Per-step batch sizes summed over processes (each process samples its own shard)."""
    if accelerator.num_processes == 1:
        return sizes
    tensor = torch.tensor(sizes, dtype=torch.long, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(tensor, reduction="sum").cpu()]


def check_moved(model: Any, initial: dict[str, torch.Tensor]) -> None:
    unchanged = [
        n
        for n, p in model.named_parameters()
        if n in initial and torch.equal(p.detach(), initial[n])
    ]
    if unchanged:
        raise RunError(
            f"DP training left {len(unchanged)} trained tensor(s) unchanged after the first step "
            f"({', '.join(unchanged[:4])}): their gradients never reach the DP optimizer, so ε would grow "
            "while they do not learn (cf. opacus #820). Stopped."
        )


def dp_preflight(
    run: PrivacyRun,
    dataset: Dataset,
    collate: Any,
    forward: Any,
    device: torch.device,
    needs_position_ids: bool,
) -> None:
    """On one real batch: every trainable tensor gets a per-example gradient of the batch's size."""
    size = min(4, len(dataset))  # type: ignore[arg-type]
    items = [dataset[i] for i in range(size)]
    batch = collate(items) if collate is not None else torch.utils.data.default_collate(items)
    batch.pop("idx", None)
    batch = {k: v.to(device) for k, v in batch.items()}
    if needs_position_ids:
        add_position_ids(batch)
    try:
        check_per_sample_gradients(run, batch, forward)
    except PrivacyError as exc:
        raise RunError(f"privacy: {exc}") from None


def check_restored_budget(run: PrivacyRun, spent: SpentBudget | None) -> None:
    """The accountant and optimizer restored from the checkpoint agree with the budget planned from it."""
    restored = [(float(s), float(q), int(k)) for s, q, k in run.history]
    if spent is None or restored != spent.history:
        raise RunError(
            f"--resume: the restored accountant history {restored} differs from the checkpoint's record "
            f"{None if spent is None else spent.history}; refusing to train on a budget that cannot be "
            "trusted. Use --overwrite."
        )
    if run.optimizer.noise_multiplier != run.sigma:
        raise RunError(
            f"internal check failed: the DP optimizer adds noise σ = {run.optimizer.noise_multiplier} "
            f"but σ = {run.sigma} was planned"
        )
