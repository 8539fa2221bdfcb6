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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
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
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (non-DP always runs)",
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each variant this many times, round-robin; rows give the median and range",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--models",
        default="bert-base,roberta-large,gpt2",
        help="classifiers: bert-base, roberta-large, gpt2; causal LMs: " + ", ".join(LM_MODELS),
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
    size = "smoke" if args.smoke else "overhead" if args.overhead else "real"
    SEQ = 16 if args.overhead else args.seq
    steps, warmup = (3, 1) if args.smoke else (args.steps, args.warmup)
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
    runs = []
    for name in args.models.split(","):
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


def _host() -> dict[str, Any]:
    """CPU, cores, RAM, platform, git commit and date (benchlib.hardware), or the basics."""
    try:
        return hardware()
    except Exception:  # the device machine may lack something hardware() reads
        return {"cpu_count": os.cpu_count(), "platform": platform.platform()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
