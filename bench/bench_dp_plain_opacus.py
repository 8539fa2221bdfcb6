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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp import (  # noqa: E402
    StepTimer,
    _rss_mib,
    atomic_write_text,
    fix_poisson_batches,
    peak_rss_mib,
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
    rss_after_import = _rss_mib()
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
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )
        model = get_peft_model(model, config)
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
                ids = batch["input_ids"]
                batch["position_ids"] = (
                    torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
                ).contiguous()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec written by bench_dp.py")
    parser.add_argument("--out", required=True, help="where to write the measurements (JSON)")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    t0 = time.perf_counter()
    out = run_plain(spec)
    out["run_wall_s"] = time.perf_counter() - t0
    atomic_write_text(Path(args.out), json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
