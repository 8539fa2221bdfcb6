"""Cost of one DP-SGD physical step for LoRA: adapters everywhere vs the top blocks on the cache.

On the packaged all-MiniLM-L6-v2 and real RedditBias comments (``hubtune data prepare
redditbias`` first), each configuration runs forward + backward of one physical batch through
Opacus' GradSampleModule (hooks: per-example gradients), as hubtune's DP loop does:

- LoRA r=4 (query, value) in all 6 blocks, on token ids (no cache possible);
- LoRA in the top 2 / top 1 blocks, through the full model (what hubtune did before the cache);
- the same on the frozen-prefix cache (``hubtune.prefix``), only the top blocks run;

each for a batch as Poisson sampling draws it (random comments, padded to the longest) and as
hubtune now feeds it under DP (a logical batch ordered by length, then split: similar lengths).

    python bench/bench_prefix.py                  # writes bench/results/prefix_cache.{json,md}
    python bench/bench_prefix.py --quick          # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import (
    REDDITBIAS,
    check_prerequisites,
    command_line,
    command_section,
    hardware,
    machine_section,
    md_table,
    package_model_dir,
    set_say_tag,
    write_results,
)


def main() -> None:
    import opacus
    import pandas as pd
    import transformers

    from hubtune.methods import apply_method
    from hubtune.prefix import (
        PrefixCached,
        PrefixExamples,
        compute_prefix,
        find_prefix_cut,
        prefix_collate,
    )
    from hubtune.privacy import add_position_ids
    from hubtune.recipe import LoraMethod
    from hubtune.tasks.text_classification import collator, encode

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64, help="physical batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix_cache"))
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    check_prerequisites()
    set_say_tag("bench-prefix")
    torch.manual_seed(0)
    path = package_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    frame = pd.read_csv(REDDITBIAS).sample(1024, random_state=0).reset_index(drop=True)
    frame["label"] = (frame["label"] == "biased").astype(int)
    encoded = encode(tokenizer, frame[["text", "label"]], 48)
    collate = collator(tokenizer)
    lengths = [len(ids) for ids in encoded.encodings["input_ids"]]
    batches = {
        # the first B of a random sample: what a Poisson draw gives
        "random (Poisson draw)": list(range(args.batch)),
        # B consecutive examples of the 1,024 ordered by length, from the middle
        "length-sorted split": sorted(range(len(lengths)), key=lengths.__getitem__)[
            len(lengths) // 2 - args.batch // 2 :
        ][: args.batch],
    }

    def step(module: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
        gsm = opacus.GradSampleModule(module)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            F.cross_entropy(gsm(**batch).logits, labels).backward()
            times.append(time.perf_counter() - t0)
            for p in gsm.parameters():
                p.grad = None
                p.grad_sample = None
        gsm._close()
        return sorted(times[1:])[len(times[1:]) // 2]  # median after one warm-up

    rows = []
    for top in (None, 2, 1):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        plan = apply_method(
            model, LoraMethod(name="lora", r=4, dropout=0.0, adapt_top_k=top), lr=1.0
        )
        cut = find_prefix_cut(plan.model)
        cached = None
        if cut is not None:
            stored = compute_prefix(plan.model, cut, encoded, collate, 64, token_level=True)
            cached = PrefixExamples(encoded, stored["hidden"], stored["lengths"])
        plan.train_mode(plan.model)
        for kind, rows_idx in batches.items():
            plain = collate([encoded[i] for i in rows_idx])
            plain.pop("idx")
            labels = plain.pop("labels")
            add_position_ids(plain)
            width = plain["input_ids"].shape[1]
            what = "all 6 blocks" if top is None else f"top {top}"
            variants = [(f"LoRA {what}, full model", plan.model, plain)]
            if cached is not None:
                batch = prefix_collate(collate, True)([cached[i] for i in rows_idx])
                batch.pop("idx")
                batch.pop("labels")
                add_position_ids(batch)
                variants.append(
                    (f"LoRA {what}, prefix cache", PrefixCached(plan.model, cut), batch)
                )
            for label, module, batch in variants:
                seconds = step(module, batch, labels)
                row = {
                    "config": label,
                    "batch": kind,
                    "padded_to": width,
                    "mean_tokens": sum(lengths[i] for i in rows_idx) / len(rows_idx),
                    "s_per_step": seconds,
                    "ms_per_example": 1000 * seconds / len(rows_idx),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["batch"].startswith("random") and "all 6" in r["config"])
    for row in rows:
        row["speedup"] = base["s_per_step"] / row["s_per_step"]
    out = Path(args.out)
    payload = {
        "machine": hardware(),
        "batch": args.batch,
        "repeats": repeats,
        "rows": rows,
        "command": command_line("bench_prefix.py"),
    }
    text = markdown(payload, command=payload["command"])
    write_results(out.name, payload, text, results_dir=out.parent)
    print(text, end="")


def markdown(payload: dict[str, Any], *, command: str) -> str:
    """The result table, the machine and the command."""
    lines = [
        "# One DP-SGD physical step for LoRA: all blocks vs the top blocks on the prefix cache",
        "",
        f"all-MiniLM-L6-v2 (packaged), LoRA r=4 on query/value (+ head), Opacus GradSampleModule "
        f"(hooks), forward + backward of {payload['batch']} real RedditBias comments (max_length "
        f"48), median of {payload['repeats']} after a warm-up. 'random' is a Poisson draw as it "
        "comes; 'length-sorted split' is a physical batch cut from a length-ordered logical "
        "batch, as hubtune's DP loop now feeds them. Speed-up is against adapters in every block "
        "on a random batch.",
        "",
        *md_table(
            [
                "configuration",
                "batch",
                "padded to",
                "mean tokens",
                "s / step",
                "ms / example",
                "speed-up",
            ],
            (
                [
                    r["config"],
                    r["batch"],
                    r["padded_to"],
                    f"{r['mean_tokens']:.1f}",
                    f"{r['s_per_step']:.3f}",
                    f"{r['ms_per_example']:.2f}",
                    f"{r['speedup']:.1f}x",
                ]
                for r in payload["rows"]
            ),
        ),
        "",
        *machine_section(payload["machine"], style="items"),
        "",
        *command_section(command),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
