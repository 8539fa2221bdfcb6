"""A plain, hand-written Opacus DP-SGD loop: the baseline hubtune is compared with.

This is the pattern of the Opacus text-classification tutorial (BERT on SNLI): build the
model and an optimizer, ``PrivacyEngine().make_private(module, optimizer, data_loader,
noise_multiplier, max_grad_norm, poisson_sampling=True)``, then train under
``BatchMemoryManager`` with a standard ``zero_grad / forward / loss.backward / step`` loop.
No hubtune code is used here (only the shared ``StepTimer`` from ``bench_dp.py``, wrapped
around the physical-batch iterator exactly as on the hubtune side).

It is started by ``python bench/bench_dp.py vs-opacus`` with a JSON spec (model folder, the
CSV of training rows hubtune uses, method lora|full, lr, max_length, batches, sigma, C,
warm-up and timed steps) and writes its measurements to ``--out``::

    python bench/bench_dp_plain_opacus.py --spec spec.json --out out.json

``--lora-accuracy-sigma SIGMA`` (repeatable) is a separate diagnosis: the LoRA recipe's rows
trained by a plain loop, test accuracy per epoch (does plain Opacus learn at that noise?)::

    python bench/bench_dp_plain_opacus.py --lora-accuracy-sigma 0.669 --lora-accuracy-sigma 0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench_dp import RECIPE_LORA_DP, StepTimer, fix_poisson_batches
from benchlib import atomic_write_text, package_model_dir, peak_rss_mib, rss_mib


def lora(model: Any) -> Any:
    """peft LoRA r 8, alpha 16 on query and value, the classifier trained in full (as hubtune's
    quickstart LoRA recipe)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, config)


def add_positions(batch: dict[str, Any], device: Any = None) -> None:
    """Per-example ``position_ids``: with BERT's broadcast [1, T] ids Opacus would compute
    per-sample gradients of batch 1 for the position embeddings (opacus #841)."""
    import torch

    ids = batch["input_ids"]
    batch["position_ids"] = (
        torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids).contiguous()
    )


def run_plain(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pandas as pd
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    if spec.get("poisson_seed") is not None:  # bench_dp --same-batches: hubtune's batches
        fix_poisson_batches(int(spec["poisson_seed"]))
    rss_after_import = rss_mib()
    torch.manual_seed(spec["seed"])
    device = torch.device("cpu")

    # data: the same rows hubtune trains on
    frame = pd.read_csv(spec["rows_csv"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    padding = "max_length" if spec["padding"] == "max_length" else False
    enc = tokenizer(
        frame["text"].astype(str).tolist(),
        truncation=True,
        max_length=spec["max_length"],
        padding=padding,
    )
    labels = frame["label"].astype(int).tolist()
    dataset = [
        {**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(labels))
    ]
    if spec["padding"] == "max_length":
        from transformers import default_data_collator as collate
    else:
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    train_loader = DataLoader(dataset, batch_size=spec["logical_batch"], collate_fn=collate)

    # model
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2)
    if spec["method"] == "lora":
        model = lora(model)
    model = model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)

    privacy_engine = PrivacyEngine(accountant="prv")
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=spec["sigma"],
        max_grad_norm=spec["max_grad_norm"],
        poisson_sampling=True,
    )
    # Full fine-tuning trains BERT's position embeddings: give each example its own position
    # ids, otherwise the broadcast [1, T] ids yield per-sample gradients of batch 1.
    per_example_positions = spec["method"] == "full"

    timer = StepTimer(spec["warmup_steps"], spec["measure_steps"])
    losses = []
    with BatchMemoryManager(
        data_loader=train_loader,
        max_physical_batch_size=spec["physical_batch"],
        optimizer=optimizer,
    ) as memory_safe_data_loader:
        bar = tqdm(memory_safe_data_loader, leave=False)
        for batch in timer.wrap(bar, optimizer):
            optimizer.zero_grad()
            batch = {k: v.to(device) for k, v in batch.items()}
            if per_example_positions:
                add_positions(batch, device)
            outputs = model(**batch)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    epsilon = privacy_engine.get_epsilon(delta=1e-5)
    return {
        "kind": "plain-opacus",
        "timer": timer.summary(),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_import_mib": rss_after_import,
        "trainable_parameters": sum(p.numel() for p in params),
        "mean_train_loss": sum(losses) / max(1, len(losses)),
        "epsilon_prv_at_1e-5": epsilon,
        "steps": sum(int(h[2]) for h in privacy_engine.accountant.history),
        "torch_threads": torch.get_num_threads(),
    }


def lora_accuracy_check(sigma: float, seed: int, epochs: int = 3) -> None:
    """Diagnosis: does a plain Opacus + peft LoRA loop learn at noise ``sigma``?

    Trains on exactly the rows of ``recipes/quickstart-dp-lora.yaml`` at ``seed`` (hubtune's
    split, loaded with ``hubtune.data.load_data``: the only hubtune code used) with the
    recipe's settings (r 8, alpha 16, lr 0.002, expected batch 128, physical 32, C 1,
    max_length 64), AdamW, and prints the test accuracy after every epoch as JSON lines.
    """
    import numpy as np
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )
    from transformers import logging as hf_logging

    from hubtune import load_recipe
    from hubtune.data import load_data

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    recipe = load_recipe(RECIPE_LORA_DP, overrides=[f"seed={seed}"])
    data = load_data(recipe.data, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(package_model_dir())

    def rows(split: str) -> list[dict[str, Any]]:
        frame = data.splits[split]
        enc = tokenizer(frame["text"].tolist(), truncation=True, max_length=64)
        labels = frame["label"].to_numpy()
        return [
            {**{k: v[i] for k, v in enc.items()}, "labels": int(y)} for i, y in enumerate(labels)
        ]

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    train, test = rows("train"), rows("test")
    model = lora(
        AutoModelForSequenceClassification.from_pretrained(package_model_dir(), num_labels=2)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.002, weight_decay=0.0)
    model.train()
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train, batch_size=128, collate_fn=collate),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    majority = float(np.mean([r["labels"] for r in test]))
    majority = max(majority, 1 - majority)
    for epoch in range(epochs):
        model.train()
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=32, optimizer=optimizer
        ) as physical:
            for batch in physical:
                optimizer.zero_grad()
                add_positions(batch)
                model(**batch).loss.backward()
                optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in DataLoader(test, batch_size=64, collate_fn=collate):
                labels = batch.pop("labels")
                correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        result = {
            "sigma": sigma,
            "seed": seed,
            "epoch": epoch + 1,
            "test_accuracy": correct / len(test),
        }
        print(json.dumps({**result, "majority_share": majority}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", help="JSON spec written by bench_dp.py")
    parser.add_argument("--out", help="where to write the measurements (JSON)")
    parser.add_argument(
        "--lora-accuracy-sigma",
        type=float,
        action="append",
        metavar="SIGMA",
        help="diagnosis instead: train the LoRA recipe's rows with a plain loop at this noise "
        "multiplier and print the test accuracy per epoch (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=1, help="split seed for the diagnosis")
    args = parser.parse_args()
    if args.lora_accuracy_sigma:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for sigma in args.lora_accuracy_sigma:
            lora_accuracy_check(sigma, args.seed)
        return
    if not (args.spec and args.out):
        parser.error("--spec and --out are required (or --lora-accuracy-sigma)")
    spec = json.loads(Path(args.spec).read_text())
    t0 = time.perf_counter()
    out = run_plain(spec)
    out["run_wall_s"] = time.perf_counter() - t0
    atomic_write_text(Path(args.out), json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
