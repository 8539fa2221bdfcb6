"""GPU throughput and peak memory: non-DP vs DP-SGD (hooks, ghost) for LoRA and full fine-tuning.

Models are built from configs at real sizes (BERT-base, RoBERTa-large, GPT-2) with random
weights (speed does not depend on the weights), sequence length 128, bf16 autocast, batch 32
(``--batch``: the non-DP batch and the DP expected Poisson batch; ``--physical`` caps DP's
physical batches). DP runs go through hubtune's own DP path (``hubtune.privacy.prepare_private``
and the training loop's ``hubtune.privacy.loop.dp_epoch``: Poisson sampling, Opacus GradSampleModule / ghost
clipping, BatchMemoryManager, hubtune's checks), and, for
comparison, through a plain hand-written Opacus loop (``PrivacyEngine.make_private`` +
BatchMemoryManager), back to back on the same device.

Run on a GPU machine (one call, a few minutes):
    python bench/bench_dp_gpu.py --out bench/results/dp_gpu
    python bench/bench_dp_gpu.py --methods lora --batch 128 --physical 192 --out bench/results/dp_gpu_b128
Smoke test anywhere (tiny models, CPU ok):
    python bench/bench_dp_gpu.py --smoke --out /tmp/dp_gpu_smoke
Causal language models (``gpt2-lm``: GPT-2 small, tied embeddings; ``llama-125m``: a
LLaMA-style ~125M config), next-token loss per sequence (hubtune's text-generation loss), with
``--seq 256``:
    python bench/bench_dp_gpu.py --models gpt2-lm,llama-125m --methods lora --seq 256 \
        --batch 64 --physical 72 --out bench/results/dp_gpu_lm
Fixed per-step cost (real depth, width 16; CPU):
    python bench/bench_dp_gpu.py --overhead --models bert-base --methods lora --steps 60 \
        --physical 48 --out bench/results/dp_overhead_cpu_p48
Operators per logical step (``--overhead`` sizes, a CPU profile of the timed window; default
models bert-base and gpt2, 2 warm-up and 3 profiled logical steps; a few minutes on 2 cores):
    python bench/bench_dp_gpu.py --ops --physical 48 --out bench/results/dp_ops_cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import (
    command_line,
    command_section,
    hardware,
    machine_section,
    md_table,
    package_versions,
    set_say_tag,
    write_results,
)

SEQ = 128
PHYSICAL = 32  # DP physical batch cap (BatchMemoryManager)
BATCH = 32  # non-DP batch = DP expected (Poisson) batch
VARIANTS: dict[str, tuple[str | None, str | None]] = {  # label: (grad_sample_mode, path)
    "non-DP": (None, None),
    "DP hooks": ("hooks", "hubtune"),
    "DP ghost": ("ghost", "hubtune"),
    "plain Opacus hooks": ("hooks", "opacus"),
    "plain Opacus ghost": ("ghost", "opacus"),
}


# Causal language models: the loss is hubtune's text-generation loss (each sequence's mean
# token loss), the labels the input ids.
LM_MODELS = ("gpt2-lm", "llama-125m")


def is_lm(name: str) -> bool:
    return name in LM_MODELS


def lm_config(name: str, size: str) -> Any:
    """GPT-2 small (124M, Conv1D, tied embeddings) or a LLaMA-style ~125M config (RMSNorm,
    rotary embeddings, SwiGLU, untied head); ``smoke``/``overhead``: same depth rules as the
    classifiers."""
    from transformers import GPT2Config, LlamaConfig

    tiny = size in ("smoke", "overhead")
    width = 64 if size == "smoke" else 16
    depth = 2 if size == "smoke" else 12
    if name == "gpt2-lm":
        if tiny:
            return GPT2Config(n_embd=width, n_layer=depth, n_head=2, vocab_size=1000,
                              n_positions=512, pad_token_id=0)  # fmt: skip
        return GPT2Config(pad_token_id=50256)
    if tiny:
        return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                           num_attention_heads=2, num_key_value_heads=2, vocab_size=1000,
                           max_position_embeddings=512, pad_token_id=0)  # fmt: skip
    return LlamaConfig(  # ~125M: 12 x 768, SwiGLU 2048, 32k vocabulary, untied
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def model_config(name: str, size: str) -> Any:
    """The model's config: ``real`` sizes, ``smoke`` (2 tiny layers) or ``overhead``.

    ``overhead`` keeps each model's real depth (so the same number of layers, hooks and
    parameter tensors) at width 16, so compute is negligible and a step's time is its fixed
    cost: Python, hooks and per-tensor operations, which is what dominates a GPU step at small
    batches.
    """
    from transformers import BertConfig, GPT2Config, RobertaConfig

    if is_lm(name):
        return lm_config(name, size)
    if size in ("smoke", "overhead"):
        width = 64 if size == "smoke" else 16
        depth = (
            {"bert-base": 12, "roberta-large": 24, "gpt2": 12}[name] if size == "overhead" else 2
        )
        if name == "gpt2":
            return GPT2Config(
                n_embd=width,
                n_layer=depth,
                n_head=2,
                vocab_size=1000,
                n_positions=256,
                pad_token_id=0,
                num_labels=2,
            )
        cls = BertConfig if name == "bert-base" else RobertaConfig
        return cls(
            vocab_size=1000,
            max_position_embeddings=300,
            num_labels=2,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=2,
            intermediate_size=2 * width,
        )
    if name == "bert-base":
        return BertConfig(num_labels=2)
    if name == "roberta-large":
        return RobertaConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            vocab_size=50265,
            max_position_embeddings=514,
            type_vocab_size=1,
            num_labels=2,
        )
    return GPT2Config(num_labels=2, pad_token_id=50256)


def build(name: str, method: str, size: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hubtune.methods import apply_method
    from hubtune.recipe import FullMethod, LoraMethod

    torch.manual_seed(0)
    config = model_config(name, size)
    config.hidden_dropout_prob = getattr(config, "hidden_dropout_prob", 0.1)
    auto: Any = AutoModelForCausalLM if is_lm(name) else AutoModelForSequenceClassification
    model = auto.from_config(config)
    spec = LoraMethod(name="lora", r=8) if method == "lora" else FullMethod(name="full")
    plan = apply_method(model, spec, lr=1e-4 if method == "lora" else 2e-5)
    return plan, config


class Synthetic(torch.utils.data.Dataset):
    """Random token ids; fixed length, so every mode sees the same work per example. ``lm``:
    the labels are the ids themselves (next-token prediction)."""

    def __init__(self, n: int, vocab: int, seed: int = 0, lm: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab - 1, (n, SEQ), generator=g)
        self.labels = self.ids if lm else torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.labels[i],
        }


LM_RUN = False  # set by measure(): the model being timed is a causal LM


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not items:  # an empty Poisson batch
        return {
            "input_ids": torch.zeros(0, SEQ, dtype=torch.long),
            "attention_mask": torch.zeros(0, SEQ, dtype=torch.long),
            "labels": torch.zeros((0, SEQ) if LM_RUN else (0,), dtype=torch.long),
        }
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def lm_criterion() -> Any:
    """hubtune's text-generation loss (a module with ``reduction``, as ghost clipping needs)."""
    from hubtune.tasks.text_generation import criterion

    return criterion()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_loss(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, criterion: Any = None
) -> torch.Tensor:
    from hubtune.privacy import add_position_ids

    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    add_position_ids(batch)
    # bf16 autocast on GPUs (as users train there); on a CPU bf16 matmuls are emulated and slow.
    with torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        logits = model(**batch).logits
    return (
        criterion(logits.float(), labels)
        if criterion is not None
        else F.cross_entropy(logits.float(), labels)
    )


def train_step(
    model: Any,
    optimizer: Any,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    criterion: Any = None,
) -> None:
    """Forward and loss (``forward_loss``), backward, optimizer step, gradients dropped."""
    forward_loss(model, batch, device, criterion).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def run_nondp(
    plan: Any,
    dataset: Synthetic,
    device: torch.device,
    steps: int,
    warmup: int,
    criterion: Any = None,
) -> tuple[float, int, int]:
    model = plan.model.to(device).train()
    optimizer = torch.optim.AdamW(plan.param_groups)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, collate_fn=collate, drop_last=True
    )
    it = iter(loader)
    seen, start = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = clock(device)
        batch = next(it)
        train_step(model, optimizer, batch, device, criterion)
        if i >= warmup:
            seen += len(batch["labels"])
    return seen / (clock(device) - start), seen, steps


def run_dp(
    plan: Any,
    dataset: Synthetic,
    device: torch.device,
    steps: int,
    warmup: int,
    mode: str,
    path: str,
    lm_loss: Any = None,
) -> tuple[float, int, int]:
    """DP through hubtune (path='hubtune') or a plain Opacus loop (path='opacus').
    ``lm_loss``: a causal LM's loss module (else cross-entropy on class labels)."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    optimizer = torch.optim.AdamW(plan.param_groups)
    if path == "hubtune":
        return _run_hubtune(plan, optimizer, dataset, device, steps, warmup, mode, lm_loss)
    engine = PrivacyEngine(accountant="prv")
    base = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate)
    out = engine.make_private(
        module=plan.model.to(device),
        optimizer=optimizer,
        data_loader=base,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode=mode,
        criterion=lm_loss if lm_loss is not None else torch.nn.CrossEntropyLoss(),
    )
    if mode == "ghost":
        model, dp_optimizer, criterion, loader = out
    else:
        (model, dp_optimizer, loader), criterion = out, lm_loss
    model.train()
    logical, seen, start, physical = 0, 0, 0.0, 0
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=PHYSICAL, optimizer=dp_optimizer
    ) as batches:
        for batch in batches:
            if logical == warmup and start == 0.0:
                start = clock(device)
            train_step(model, dp_optimizer, batch, device, criterion)
            if logical >= warmup:
                seen += len(batch["labels"])
                physical += 1
            if not dp_optimizer._is_last_step_skipped:
                logical += 1
                if logical >= warmup + steps:
                    break
    return seen / (clock(device) - start), seen, physical


def _run_hubtune(
    plan: Any,
    optimizer: Any,
    dataset: Synthetic,
    device: torch.device,
    steps: int,
    warmup: int,
    mode: str,
    lm_loss: Any = None,
) -> tuple[float, int, int]:
    """Time hubtune's DP setup and its own epoch loop (``hubtune.privacy.loop.dp_epoch``), as ``hubtune run``.

    That is everything a training step costs there: the Accelerate autocast, position ids, the
    length-sorted Poisson batches split by BatchMemoryManager, the loss and weights checks, the
    scheduler. The budget guard (``max_steps``) ends the warm-up and then the timed window.
    """
    from accelerate import Accelerator

    from hubtune.privacy import forward_takes_position_ids, prepare_private
    from hubtune.privacy.loop import dp_epoch
    from hubtune.recipe import PrivacySection

    section = PrivacySection(
        enabled=True,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        logical_batch_size=BATCH,
        physical_batch_size=PHYSICAL,
    )
    run = prepare_private(
        section=section,
        model=plan.model,
        optimizer=optimizer,
        dataset=dataset,
        collate=collate,
        epochs=1,
        num_processes=1,
        device=device,
        **({"criterion": lm_loss, "loss_fn": lm_loss} if lm_loss is not None else {}),
    )
    needs_position_ids = forward_takes_position_ids(plan.model)  # the model, not Opacus' wrapper
    os.environ.setdefault("HUBTUNE_PROGRESS", "0")
    accelerator = Accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model = run.model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def epoch(initial: Any) -> tuple[int, list[int]]:
        _, seen, _, sizes = dp_epoch(
            accelerator=accelerator,
            run=run,
            forward=lambda module, batch: module(**batch).logits,
            scheduler=scheduler,
            epoch=0,
            epochs=1,
            step=run.steps_taken,
            initial=initial,
            needs_position_ids=needs_position_ids,
            loss_fn=lm_loss,
        )
        return seen, sizes

    run.max_steps = warmup
    epoch(initial)
    start = clock(device)
    run.max_steps = warmup + steps
    seen, sizes = epoch(None)
    elapsed = clock(device) - start
    passes = sum(max(1, -(-size // PHYSICAL)) for size in sizes)  # BatchMemoryManager's split
    return seen / elapsed, seen, passes


def measure(
    name: str,
    method: str,
    label: str,
    mode: str | None,
    path: str | None,
    size: str,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """One timed run of one variant, on a freshly built model."""
    # Free the previous variant's model (Opacus hooks and autograd graphs form reference
    # cycles) so that its weights do not count in this variant's peak.
    gc.collect()
    baseline = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    global LM_RUN
    LM_RUN = is_lm(name)
    plan, config = build(name, method, size, device)
    dataset = Synthetic(BATCH * 200, config.vocab_size, lm=LM_RUN)
    lm_loss = lm_criterion() if LM_RUN else None
    try:
        if mode is None:
            rate, seen, passes = run_nondp(plan, dataset, device, steps, warmup, lm_loss)
        else:
            rate, seen, passes = run_dp(
                plan, dataset, device, steps, warmup, mode, path or "hubtune", lm_loss
            )
        error = None
    except Exception as exc:  # report, keep measuring the others
        rate, seen, passes = float("nan"), 0, 0
        error = f"{type(exc).__name__}: {exc}"[:300]
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if device.type == "cuda" else None
    return {
        "model": name,
        "method": method,
        "variant": label,
        "samples_per_s": rate,
        "examples": seen,
        "physical_steps": passes,  # forward/backward passes in the timed window
        "peak_gib": peak,
        "error": error,
    }


def _key(run: dict[str, Any]) -> tuple[str, str, str]:
    return run["model"], run["method"], run["variant"]


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's repeats as one row: median throughput, its range, worst-case memory."""
    rates = sorted(r["samples_per_s"] for r in runs)
    peaks = [r["peak_gib"] for r in runs if r["peak_gib"] is not None]
    errors = [r["error"] for r in runs if r["error"]]
    return {
        **{k: runs[0][k] for k in ("model", "method", "variant")},
        "samples_per_s": statistics.median(rates),
        "samples_per_s_runs": [r["samples_per_s"] for r in runs],
        "examples": sum(r["examples"] for r in runs),
        "physical_steps": sum(r["physical_steps"] for r in runs) / len(runs),
        "peak_gib": max(peaks) if peaks else None,
        "error": errors[0] if errors else None,
    }


def main() -> None:
    global PHYSICAL, BATCH, SEQ
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="results path without suffix (.json and .md are written)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps (CPU ok)")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="real depth at width 16 and sequence 16: times the fixed per-step cost (CPU ok)",
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="at the --overhead sizes, count the operators each variant dispatches per logical "
        "step (a CPU torch.profiler trace of the timed window), the ones that would make the "
        "host wait for a GPU, and what hubtune's path runs that a plain Opacus loop does not "
        "(default models bert-base,gpt2; --steps 3 --warmup 2)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (non-DP always runs)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed logical steps (15; --ops: 3)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each variant this many times, round-robin; rows give the median and range",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up logical steps (3; --ops: 2)"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="classifiers: bert-base, roberta-large, gpt2 (default: all three; --ops: bert-base "
        "and gpt2); causal LMs: " + ", ".join(LM_MODELS),
    )
    parser.add_argument("--seq", type=int, default=SEQ, help="sequence length (tokens)")
    parser.add_argument("--methods", default="lora,full", help="lora and/or full")
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help="non-DP batch and DP expected Poisson batch (the DP overhead per step is largely "
        "fixed, so larger batches amortise it)",
    )
    parser.add_argument(
        "--physical",
        type=int,
        default=None,
        help="DP physical batch cap (default: --batch). A Poisson batch larger than the cap is "
        "split into two physical steps, which at a cap equal to the expected batch happens on "
        "about half the steps; a cap of ~1.5x the batch avoids that at a little memory",
    )
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    BATCH = args.batch
    PHYSICAL = args.physical or args.batch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    size = "smoke" if args.smoke else "overhead" if args.overhead or args.ops else "real"
    SEQ = 16 if args.overhead or args.ops else args.seq
    models = args.models or ("bert-base,gpt2" if args.ops else "bert-base,roberta-large,gpt2")
    default_steps, default_warmup = (3, 2) if args.ops else (15, 3)
    steps = args.steps if args.steps is not None else default_steps
    warmup = args.warmup if args.warmup is not None else default_warmup
    if args.smoke:
        steps, warmup = 3, 1
    set_say_tag("bench-dp-gpu")
    machine: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": package_versions(("transformers", "peft", "opacus")),
        "python": platform.python_version(),
        "host": _host(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "seq_len": SEQ,
            "physical_batch": PHYSICAL,
            "expected_logical_batch": BATCH,
            "memory": "peak allocated during the run minus what was allocated before the model was built",
            "autocast": "bf16" if device.type == "cuda" else "none (CPU)",
            "tf32": device.type == "cuda",
            "steps": steps,
            "warmup": warmup,
            "size": size,
            "repeats": args.repeats,  # per variant, round-robin
        },
    }
    if args.ops:
        machine["settings"]["profile"] = (
            "torch.profiler, CPU activity, record_shapes off, with_stack on"
        )
        ops_main(
            Path(args.out), machine, models, args.methods, args.variants, device, steps, warmup
        )
        return
    runs = []
    for name in models.split(","):
        for method in args.methods.split(","):
            wanted = {"non-DP", *args.variants.split(",")}
            # Repeats go round the variants (A B C, A B C, ...), so a slow spell of a shared
            # machine lands on every variant rather than on one.
            for _ in range(args.repeats):
                for label, (mode, path) in VARIANTS.items():
                    if label not in wanted:
                        continue
                    run = measure(name, method, label, mode, path, size, device, steps, warmup)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                    save_results(Path(args.out), runs, machine, steps, args.repeats)
    print(save_results(Path(args.out), runs, machine, steps, args.repeats), end="")


def save_results(
    out: Path, runs: list[dict[str, Any]], machine: dict[str, Any], steps: int, repeats: int
) -> str:
    """Write <out>.json and <out>.md from the runs so far (after every run: a timeout keeps
    them); returns the markdown."""
    command = command_line("bench_dp_gpu.py")
    rows = summarize(runs)
    text = gpu_markdown(machine, rows, steps=steps, repeats=repeats, command=command)
    payload = {"machine": machine, "command": command, "rows": rows, "runs": runs}
    write_results(out.name, payload, text, results_dir=out.parent)
    return text


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, variant): the median of its repeats, and its ratios to the
    non-DP row of the same model and method."""
    rows = [
        _median_row([r for r in runs if _key(r) == key]) for key in dict.fromkeys(map(_key, runs))
    ]
    for row in rows:
        base = next(
            r
            for r in rows
            if r["model"] == row["model"]
            and r["method"] == row["method"]
            and r["variant"] == "non-DP"
        )
        row["ratio_vs_nondp"] = (
            row["samples_per_s"] / base["samples_per_s"] if base["samples_per_s"] else None
        )
        if base["peak_gib"]:
            row["memory_vs_nondp"] = (row["peak_gib"] or 0) / base["peak_gib"]
    return rows


def gpu_markdown(
    machine: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    steps: int,
    repeats: int,
    command: str,
) -> str:
    """The result table (one row per variant), the host and the command."""
    lines = [
        f"# DP throughput on {machine['device']}"
        + (
            " (fixed per-step cost: real depth, width 16, sequence 16)"
            if machine["settings"]["size"] == "overhead"
            else ""
        ),
        "",
        f"torch {machine['torch']}, {json.dumps(machine['versions'])}; {json.dumps(machine['settings'])}",
        "",
    ]
    table = []
    for r in rows:
        ratio = (
            f"{r['ratio_vs_nondp']:.2f}"
            if r.get("ratio_vs_nondp") == r.get("ratio_vs_nondp")
            and r.get("ratio_vs_nondp") is not None
            else "-"
        )
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] else "-"
        memr = f"{r['memory_vs_nondp']:.2f}" if r.get("memory_vs_nondp") else "-"
        rate = f"{r['samples_per_s']:.1f}"
        if len(r["samples_per_s_runs"]) > 1:
            rate += " ({:.0f}-{:.0f})".format(
                min(r["samples_per_s_runs"]), max(r["samples_per_s_runs"])
            )
        table.append(
            [
                r["model"],
                r["method"],
                r["variant"],
                rate,
                ratio,
                f"{r['physical_steps'] / steps:.2f}",
                mem,
                memr,
                r["error"] or "",
            ]
        )
    lines += md_table(
        [
            "model",
            "method",
            "variant",
            "samples/s" + (" (median, range)" if repeats > 1 else ""),
            "× non-DP",
            "passes / step",
            "peak GiB",
            "× non-DP mem",
            "note",
        ],
        table,
    )
    lines += ["", *machine_section(machine.get("host") or {}, style="items")]
    lines += ["", *command_section(command)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- --ops
# Operators each variant dispatches per logical step, from a CPU profile of exactly the
# window the timing modes time (the two calls of ``clock`` in run_nondp, run_dp and
# _run_hubtune), so hubtune's per-epoch setup inside that window is counted too.

# Operators that read a device tensor's value on the host (so a GPU would drain its queue
# first). On a CPU they are ordinary operators: each is listed with the function that ran it,
# and those under the DataLoader (the Poisson sampler, collation) work on host tensors.
SYNC_OPS = (
    "aten::_local_scalar_dense",  # item(), float(), int(), bool() of a tensor
    "aten::nonzero",
    "aten::equal",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
)
# Python-level Tensor methods that copy a tensor's values to the host and show no aten
# operator for a CPU tensor (counted from the profile's Python events; ``item`` is counted as
# its ``_local_scalar_dense``).
SYNC_METHODS = ("tolist", "cpu", "numpy")
# Leaf operators that launch no kernel on a GPU (views, metadata, allocation): the rest of the
# leaves is the "compute" count, a proxy for kernel launches.
NO_KERNEL = {
    f"aten::{op}"
    for op in (
        *("as_strided", "view", "reshape", "_reshape_alias", "_unsafe_view", "expand"),
        *("expand_as", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select"),
        *("narrow", "split", "split_with_sizes", "chunk", "unbind", "alias", "detach"),
        *("detach_", "lift_fresh", "resolve_conj", "resolve_neg", "empty", "empty_like"),
        *("empty_strided", "is_same_size", "size", "stride", "numel", "dim", "is_nonzero"),
        *("item", "to", "contiguous", "view_as", "flatten", "unflatten", "result_type"),
        *("_has_compatible_shallow_copy_type", "broadcast_tensors"),
    )
}
_PY_FRAME = re.compile(r"^(?P<path>.*?\.py)\((?P<line>\d+)\): (?P<func>.*)$")
_SITE_PARTS = (
    "hubtune/",
    "bench_dp_gpu.py",
    "opacus/",
    "peft/",
    "transformers/",
    "accelerate/",
    "torch/utils/data/",
    "torch/optim/",
)
_DATA = "enumerate(DataLoader)"  # the DataLoader's record_function around each __next__
# The DataLoader's __next__ as a Python frame: what data loading runs under (in the profiler's
# own tree the record_function above is a sibling of the Python frames it encloses).
_DATA_FRAME = re.compile(r"torch/utils/data/dataloader\.py\(\d+\): __next__$")


class _ProfiledWindow:
    """Stands in for ``clock`` during an --ops run: the timed window's first call starts a CPU
    profile, the second stops it. On a GPU, CUDA's sync debug mode is on in between, and each
    synchronising call it warns about is recorded with the Python line that made it."""

    def __init__(self) -> None:
        self.profile: Any = None
        self.done = False
        self.cuda_syncs: Counter[str] = Counter()
        self._warnings: Any = None
        self._caught: list[Any] = []

    def __call__(self, device: torch.device) -> float:
        if self.profile is None:
            sync(device)
            self.profile = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                record_shapes=False,
                with_stack=True,  # Python frames in the event tree: who dispatched each op
            )
            self.profile.start()
            if device.type == "cuda":
                self._warnings = warnings.catch_warnings(record=True)
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif not self.done:
            self.close()
            sync(device)
        return time.perf_counter()

    def close(self) -> None:
        """End the window (also after an error inside it)."""
        if self.profile is None or self.done:
            return
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.cuda_syncs[f"{w.filename}:{w.lineno}"] += 1
        self.profile.stop()
        self.done = True


def _site(name: str) -> str | None:
    """``hubtune/privacy/loop.py:dp_epoch`` for a Python event of one of the files that matter."""
    m = _PY_FRAME.match(name)
    if m is None:
        return None
    path = m["path"]
    for part in _SITE_PARTS:
        at = path.find(part)
        if at >= 0:
            short = path[at:] if part != "bench_dp_gpu.py" else "bench/bench_dp_gpu.py"
            return f"{short}:{m['func']}@{m['line']}"
    return None


def _event_tree(profile: Any) -> tuple[list[Any], Any]:
    """The profile's events as a tree: (roots, children of a node). The profiler's own tree
    (a C++ walk) when this torch has it, else ``profile.events()`` (slow with Python frames:
    ~30 s for a few GPT-2 steps)."""
    results = getattr(profile.profiler, "kineto_results", None)
    tree = getattr(results, "experimental_event_tree", None)
    if tree is not None:
        return list(tree()), lambda ev: ev.children
    events = profile.events()
    return [ev for ev in events if ev.cpu_parent is None], lambda ev: ev.cpu_children


def count_ops(profile: Any) -> dict[str, Any]:
    """Counts over one profile: top-level, all and compute aten operators, by name; the
    possible host reads; each op's dispatching function (``site``). Data loading (ops under
    the DataLoader's ``__next__``: the Poisson sampler, ``__getitem__``, collation) is counted
    apart: on a GPU it works on host tensors."""
    roots, children = _event_tree(profile)
    out: dict[str, Any] = {
        part: {"top": Counter(), "all": Counter(), "compute": Counter()}
        for part in ("step", "data")
    }
    sites: dict[str, Counter[str]] = defaultdict(Counter)  # top-level step op -> its sites
    host_reads: dict[str, Counter[str]] = {"step": Counter(), "data": Counter()}
    batches = 0  # DataLoader __next__ calls inside the window
    # depth-first, carrying (under the DataLoader, under an aten op, under a host-read op,
    # innermost function); a host read inside another (the CPU unique_dim kernel calls
    # aten::equal per row) is the outer one's implementation and is not counted
    todo: list[tuple[Any, bool, bool, bool, str | None]] = [
        (ev, False, False, False, None) for ev in roots
    ]
    while todo:
        ev, in_data, aten_above, in_read, site = todo.pop()
        name = ev.name
        kids = children(ev)
        part = "data" if in_data else "step"
        is_aten = name.startswith("aten::")
        if name.startswith(_DATA):
            batches += 1
        elif name.startswith("<built-in method ") and " of Tensor object" in name:
            method = name.split()[2]
            if method in SYNC_METHODS:
                host_reads[part][f"Tensor.{method} ({site or '?'})"] += 1
        elif is_aten:
            counts = out[part]
            counts["all"][name] += 1
            if not aten_above:
                counts["top"][name] += 1
                if part == "step":
                    sites[name][site or "?"] += 1
            if name not in NO_KERNEL and not any(k.name.startswith("aten::") for k in kids):
                counts["compute"][name] += 1
            if name in SYNC_OPS and not in_read:
                host_reads[part][f"{name} ({site or '?'})"] += 1
        if kids:
            state = (
                in_data or name.startswith(_DATA) or _DATA_FRAME.search(name) is not None,
                aten_above or is_aten,
                in_read or name in SYNC_OPS,
                _site(name) or site,
            )
            todo.extend((kid, *state) for kid in kids)
    return {**out, "sites": sites, "host_reads": host_reads, "batches_drawn": batches}


def measure_ops(
    name: str,
    method: str,
    label: str,
    mode: str | None,
    path: str | None,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """``measure`` at the overhead size with the timed window profiled instead of timed."""
    global clock
    window = _ProfiledWindow()
    timer, clock = clock, window
    try:
        run = measure(name, method, label, mode, path, "overhead", device, steps, warmup)
    finally:
        clock = timer
        closed = window.done
        window.close()
    if not closed:
        run["error"] = run["error"] or "the timed window was never closed"
        return {**run, "steps": steps, "counts": None}
    counts = count_ops(window.profile)
    window.profile = None
    cuda_syncs = dict(window.cuda_syncs.most_common()) if device.type == "cuda" else None
    return {**run, "steps": steps, "counts": counts, "cuda_syncs": cuda_syncs}


def _per_step(counter: Counter[str], steps: int) -> float:
    return sum(counter.values()) / steps


def ops_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per logical step: operators (top-level, all, compute), the ratio to non-DP, host reads."""
    rows = []
    for run in runs:
        c, steps = run["counts"], run["steps"]
        row = {k: run[k] for k in ("model", "method", "variant", "error")}
        if c is None:
            rows.append(row)
            continue
        row |= {
            "passes_per_step": run["physical_steps"] / steps,
            "top_level": _per_step(c["step"]["top"], steps),
            "all_aten": _per_step(c["step"]["all"], steps),
            "compute": _per_step(c["step"]["compute"], steps),
            "data_loading_all_aten": _per_step(c["data"]["all"], steps),
            "batches_drawn": c["batches_drawn"],  # in the whole window
            "host_reads": sum(c["host_reads"]["step"].values()) / steps,
            "host_reads_by_site": {k: v / steps for k, v in c["host_reads"]["step"].most_common()},
            "data_loading_host_reads_by_site": {
                k: v / steps for k, v in c["host_reads"]["data"].most_common()
            },
            "cuda_syncs_by_line": run.get("cuda_syncs"),  # GPU only: sync debug mode warnings
        }
        rows.append(row)
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if (r["model"], r["method"], r["variant"])
                == (row["model"], row["method"], "non-DP")
                and "top_level" in r
            ),
            None,
        )
        if base is not None and "top_level" in row:
            row["top_level_vs_nondp"] = row["top_level"] / base["top_level"]
            row["all_aten_vs_nondp"] = row["all_aten"] / base["all_aten"]
    return rows


# The two loops' own bodies (batch to the device, forward, loss, backward, step): one row in
# the by-function comparison, so that it shows what each loop runs beyond the other.
_LOOP_BODIES = (
    "hubtune/privacy/loop.py:dp_epoch@",
    "hubtune/privacy/loop.py:_cross_entropy@",
    "hubtune/privacy/loop.py:<dictcomp>@",
    "bench/bench_dp_gpu.py:train_step@",
    "bench/bench_dp_gpu.py:forward_loss@",
    "bench/bench_dp_gpu.py:<dictcomp>@",
)
LOOP_BODY = "loop body (hubtune: dp_epoch; plain: train_step, forward_loss)"


def _loop_body(site: str) -> str:
    return LOOP_BODY if site.startswith(_LOOP_BODIES) else site


def ops_diffs(runs: list[dict[str, Any]], top: int = 10) -> list[dict[str, Any]]:
    """For each model, method and DP mode: the top-level step operators whose count per logical
    step differs most between hubtune's path and the plain Opacus loop, with the functions that
    dispatched the larger side."""
    diffs = []
    by_key = {(r["model"], r["method"], r["variant"]): r for r in runs if r.get("counts")}
    for (model, method, variant), ours in by_key.items():
        if not variant.startswith("DP "):
            continue
        plain = by_key.get((model, method, "plain Opacus " + variant.removeprefix("DP ")))
        if plain is None:
            continue
        a, b = ours["counts"]["step"]["top"], plain["counts"]["step"]["top"]
        sa, sb = ours["steps"], plain["steps"]
        names = set(a) | set(b)
        delta = {n: a[n] / sa - b[n] / sb for n in names}
        ranked = sorted(names, key=lambda n: (-abs(delta[n]), n))[:top]
        rows = []
        for n in ranked:
            larger = ours if delta[n] > 0 else plain
            where = larger["counts"]["sites"][n]
            total = sum(where.values()) or 1
            rows.append(
                {
                    "op": n,
                    "hubtune": a[n] / sa,
                    "plain": b[n] / sb,
                    "delta": delta[n],
                    "sites_of_larger": {k: round(v / total, 3) for k, v in where.most_common(3)},
                }
            )
        # where hubtune's extra operators come from, by dispatching function
        site_a: Counter[str] = Counter()
        site_b: Counter[str] = Counter()
        for where in ours["counts"]["sites"].values():
            site_a.update({_loop_body(k): v for k, v in where.items()})
        for where in plain["counts"]["sites"].values():
            site_b.update({_loop_body(k): v for k, v in where.items()})
        site_delta = {k: site_a[k] / sa - site_b[k] / sb for k in set(site_a) | set(site_b)}
        by_site = [
            {"site": k, "hubtune": site_a[k] / sa, "plain": site_b[k] / sb, "delta": d}
            for k, d in sorted(site_delta.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:top]
        ]
        diffs.append(
            {
                "model": model,
                "method": method,
                "mode": variant.removeprefix("DP "),
                "top_level_delta": sum(delta.values()),
                "ops": rows,
                "sites": by_site,
            }
        )
    return diffs


def ops_main(
    out: Path,
    machine: dict[str, Any],
    models: str,
    methods: str,
    variants: str,
    device: torch.device,
    steps: int,
    warmup: int,
) -> None:
    wanted = {"non-DP", *variants.split(",")}
    runs = []
    for name in models.split(","):
        for method in methods.split(","):
            for label, (mode, path) in VARIANTS.items():
                if label not in wanted:
                    continue
                began = time.perf_counter()
                run = measure_ops(name, method, label, mode, path, device, steps, warmup)
                run["wall_s"] = time.perf_counter() - began
                runs.append(run)
                print(
                    json.dumps(
                        {k: v for k, v in run.items() if k not in ("counts", "samples_per_s")}
                    ),
                    flush=True,
                )
                save_ops(out, runs, machine, steps, warmup)
    print(save_ops(out, runs, machine, steps, warmup), end="")


def save_ops(
    out: Path, runs: list[dict[str, Any]], machine: dict[str, Any], steps: int, warmup: int
) -> str:
    command = command_line("bench_dp_gpu.py")
    rows = ops_rows(runs)
    diffs = ops_diffs(runs)
    text = ops_markdown(machine, rows, diffs, steps=steps, warmup=warmup, command=command)
    # the full per-operator counts, per run (top-level and all, step and data loading)
    detail = [
        {
            **{k: r[k] for k in ("model", "method", "variant", "steps", "physical_steps")},
            "per_step": None
            if r.get("counts") is None
            else {
                part: {
                    kind: {n: v / r["steps"] for n, v in r["counts"][part][kind].most_common()}
                    for kind in ("top", "all")
                }
                for part in ("step", "data")
            },
        }
        for r in runs
    ]
    payload = {
        "machine": machine,
        "command": command,
        "rows": rows,
        "diffs": diffs,
        "runs": detail,
    }
    write_results(out.name, payload, text, results_dir=out.parent)
    return text


def ops_markdown(
    machine: dict[str, Any],
    rows: list[dict[str, Any]],
    diffs: list[dict[str, Any]],
    *,
    steps: int,
    warmup: int,
    command: str,
) -> str:
    s = machine["settings"]
    lines = [
        f"# Operators per logical DP step on {machine['device']} (real depth, width 16, "
        f"sequence {s['seq_len']})",
        "",
        f"torch {machine['torch']}, {json.dumps(machine['versions'])}; {json.dumps(s)}",
        "",
        f"Each variant runs as in the timing modes ({warmup} warm-up logical steps), and the "
        f"window those modes time ({steps} logical steps; for hubtune a second `dp_epoch` call, "
        "so its per-epoch setup is inside) is profiled with torch.profiler (CPU activity, "
        "record_shapes off, with_stack on). Counts are per logical step, of the operators the "
        "training step dispatches; data loading (operators under the DataLoader's `__next__`: "
        "Poisson sampling, `__getitem__`, collation; host tensors even on a GPU) is counted "
        "apart. **top-level**: `aten::` events with no `aten::` event above them (what Python "
        "code, autograd and hooks dispatch); **all**: every `aten::` event, nested ones too; "
        "**compute**: leaf `aten::` events that are not views, metadata or allocations (a proxy "
        "for GPU kernel launches). **host reads**: operators that read a tensor's value on the "
        "host (`_local_scalar_dense` = item/float/bool, `nonzero`, `equal`, `masked_select`, "
        "`unique`) and `Tensor.tolist/item/cpu/numpy` calls: on a GPU each one waits for the "
        "queued work if its tensor is on the device. On a CPU a device-to-host `to`/`copy_` "
        "cannot be told apart from other copies, and CUDA-only code (pinned copies, "
        "`torch.cuda.Event`) does not run at all. On a CPU, AdamW runs per tensor and reads "
        "each step count with `.item()`; on a GPU it runs `foreach` and its step counts are "
        "host tensors (no wait): the same in every variant. `_foreach_*` operators run as one "
        "multi-tensor kernel on a GPU but fall back to per-tensor loops on a CPU, so they count "
        "once in top-level and per tensor in all/compute. **batches drawn**: DataLoader "
        "`__next__` calls inside the window.",
        "",
    ]
    table = []
    for r in rows:
        if "top_level" not in r:
            table.append([r["model"], r["method"], r["variant"], *["-"] * 7, r["error"] or ""])
            continue
        table.append(
            [
                r["model"],
                r["method"],
                r["variant"],
                f"{r['passes_per_step']:.2f}",
                str(r["batches_drawn"]),
                f"{r['top_level']:.0f}",
                f"{r.get('top_level_vs_nondp', float('nan')):.2f}",
                f"{r['all_aten']:.0f}",
                f"{r['compute']:.0f}",
                f"{r['host_reads']:.2f}",
                r["error"] or "",
            ]
        )
    lines += md_table(
        [
            "model",
            "method",
            "variant",
            "passes / step",
            "batches drawn",
            "top-level aten / step",
            "× non-DP",
            "all aten / step",
            "compute / step",
            "host reads / step",
            "note",
        ],
        table,
    )
    lines += ["", "## Host reads per logical step (operator or method, dispatching function)", ""]
    for r in rows:
        if "top_level" not in r:
            continue
        reads = "; ".join(f"{k} x{v:.2f}" for k, v in r["host_reads_by_site"].items()) or "none"
        lines.append(f"- {r['model']} {r['method']} {r['variant']}: {reads}")
        if r.get("cuda_syncs_by_line") is not None:
            syncs = "; ".join(f"{k} x{v}" for k, v in r["cuda_syncs_by_line"].items()) or "none"
            lines.append(f"  - CUDA sync debug mode, whole window: {syncs}")
    data_reads = sorted({k for r in rows for k in r.get("data_loading_host_reads_by_site", {})})
    if data_reads:
        lines += [
            "",
            "Host reads under the DataLoader (host tensors on a GPU too, so no wait): "
            + "; ".join(data_reads)
            + ".",
        ]
    for d in diffs:
        lines += [
            "",
            f"## {d['model']} {d['method']} {d['mode']}: hubtune vs plain Opacus "
            f"({d['top_level_delta']:+.0f} top-level operators per logical step)",
            "",
        ]
        lines += md_table(
            ["operator", "hubtune / step", "plain / step", "Δ", "dispatched by (larger side)"],
            [
                [
                    o["op"],
                    f"{o['hubtune']:.2f}",
                    f"{o['plain']:.2f}",
                    f"{o['delta']:+.2f}",
                    "; ".join(f"{k} ({v:.0%})" for k, v in o["sites_of_larger"].items()),
                ]
                for o in d["ops"]
            ],
        )
        lines += ["", "By dispatching function (top-level operators per logical step):", ""]
        lines += md_table(
            ["function", "hubtune", "plain", "Δ"],
            [
                [x["site"], f"{x['hubtune']:.2f}", f"{x['plain']:.2f}", f"{x['delta']:+.2f}"]
                for x in d["sites"]
            ],
        )
    lines += ["", *machine_section(machine.get("host") or {}, style="items")]
    lines += ["", *command_section(command)]
    return "\n".join(lines) + "\n"


def _host() -> dict[str, Any]:
    """CPU, cores, RAM, platform, git commit and date (benchlib.hardware), or the basics."""
    try:
        return hardware()
    except Exception:  # the device machine may lack something hardware() reads
        return {"cpu_count": os.cpu_count(), "platform": platform.platform()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
