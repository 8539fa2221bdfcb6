"""The frozen-prefix cache: run the frozen bottom of a network once, train only the top.

When a method trains only the top blocks of a backbone (``freeze`` with ``unfreeze_top_k``,
``lora`` with ``adapt_top_k``), everything below the lowest trained block is a fixed function of
the example: the same input gives the same hidden states at every epoch. hubtune then computes
those hidden states once (the *prefix*), stores them, and every training step runs only the
trained blocks, the layers after them and the head. Gradients never flowed into the frozen
prefix anyway, so a step costs what the top blocks cost: with 2 of 6 blocks trained, about a
third of the full forward and backward.

How it stays exact and architecture-agnostic:

- The model's own ``forward`` still runs (attention-mask expansion, rotary position embeddings,
  pooling, the head): only the block container is temporarily cut to the trained blocks, and a
  forward pre-hook on the first trained block swaps its hidden-state input for the cached one.
- Before anything is cached, one forward pass records which modules run before the first trained
  block. If any of them holds a trainable tensor (a trainable embedding, say), the prefix is not a
  fixed function and the cache is refused.
- Text hidden states are stored without their padding (only the tokens the attention mask keeps)
  and re-padded per batch, with the batch's own attention mask, on either padding side.
- The frozen prefix runs in eval mode when cached (no dropout there), which the methods that use
  it already do without the cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from hubtune.methods import MethodError
from hubtune.methods.common import find_blocks, under

__all__ = [
    "PrefixCut",
    "PrefixUnusable",
    "PrefixTooLarge",
    "PrefixExamples",
    "PrefixCached",
    "find_prefix_cut",
    "capture_input",
    "capture_prefix",
    "compute_prefix",
    "example_lengths",
    "inference_loader",
    "prefix_collate",
    "probe_prefix",
]

logger = logging.getLogger("hubtune")


class PrefixCut:
    """Where the frozen prefix ends: the block container and the index of the first trained block."""

    def __init__(self, model: nn.Module, container: str, first: int):
        self.container = container
        self.first = first
        self.total = len(cast(nn.ModuleList, model.get_submodule(container)))
        self.block = f"{container}.{first}"

    def key(self) -> str:
        """Cache-key text; independent of peft's ``base_model.model.`` prefix."""
        return f"prefix:{self.container.removeprefix('base_model.model.')}.{self.first}"

    def describe(self) -> str:
        return f"blocks 0-{self.first - 1} of {self.total} in {self.container}"


def find_prefix_cut(model: nn.Module) -> PrefixCut | None:
    """The cut below the lowest block with a trainable tensor, or None (nothing frozen to cache)."""
    try:
        _, names = find_blocks(model)
    except MethodError:
        return None
    container = names[0].rsplit(".", 1)[0]
    if names != [f"{container}.{i}" for i in range(len(names))]:
        return None  # blocks not in one indexable container (timm ResNet's layer1..layer4)
    if not isinstance(model.get_submodule(container), (nn.ModuleList, nn.Sequential)):
        return None
    trained = [
        i
        for i, name in enumerate(names)
        if any(p.requires_grad for p in model.get_submodule(name).parameters())
    ]
    if not trained or trained[0] == 0:
        return None
    return PrefixCut(model, container, trained[0])


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _modules_called(model: nn.Module) -> Iterator[list[str]]:
    """Names of ``model``'s modules in the order their forward starts."""
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(module: nn.Module, _args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            order.append(name)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield order
    finally:
        handle.remove()


@torch.no_grad()
def capture_input(
    model: nn.Module, module: str, batch: dict[str, torch.Tensor], *, check: bool = False
) -> torch.Tensor:
    """What ``model`` feeds its sub-module ``module`` for ``batch``: the output of the part below.

    The forward pass is cut short with an exception as ``module`` is entered, so nothing above
    it runs. The one mechanism behind both caches: the head's input (feature extraction) and
    the first trained block's input (the frozen prefix). With ``check``, also verify that no
    module holding a trainable tensor runs before ``module`` (then its input would not be a
    fixed function of the example).
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise MethodError(
                f"{module} received no hidden-state tensor; its input cannot be cached "
                "(set method.feature_cache: false)"
            )
        captured.append(hidden.detach())
        raise _Stop

    handle = model.get_submodule(module).register_forward_pre_hook(hook, with_kwargs=True)
    stack = contextlib.ExitStack()
    order = stack.enter_context(_modules_called(model)) if check else None
    try:
        with stack:
            model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise MethodError(
            f"the model never called {module}; its input cannot be cached "
            "(set method.feature_cache: false)"
        )
    if order is not None:
        early = [
            name
            for name in order
            if not under(name, module)
            and any(p.requires_grad for p in model.get_submodule(name).parameters(recurse=False))
        ]
        if early:
            raise MethodError(
                f"trainable module(s) {', '.join(early[:3])} run before {module}, so the layers below it are "
                "not a fixed function of the input and cannot be cached (set method.feature_cache: false)"
            )
    return captured[0]


def capture_prefix(
    model: nn.Module, cut: PrefixCut, batch: dict[str, torch.Tensor], *, check: bool = False
) -> torch.Tensor:
    """The hidden states the first trained block receives for ``batch`` (the prefix's output)."""
    return capture_input(model, cut.block, batch, check=check)


def ragged(
    hidden: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token hidden states without padding: ``(tokens [N, H], per-example lengths [B])``.

    Only text batches (an attention mask of the hidden states' [B, T] shape) are stored this way.
    """
    mask = batch["attention_mask"].bool()
    return hidden[mask], mask.sum(dim=1)


def is_token_level(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> bool:
    mask = batch.get("attention_mask")
    return mask is not None and hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(mask.shape)


class PrefixExamples(Dataset):
    """The encoded examples plus each one's cached prefix output (``hidden``)."""

    def __init__(
        self, base: Dataset, hidden: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> None:
        self.base = base
        self.hidden = hidden
        self.lengths = lengths
        if lengths is not None:
            self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            if int(self.offsets[-1]) != len(hidden):
                raise ValueError("cached prefix: token counts do not add up (corrupt cache file)")
        if len(self) != (len(lengths) if lengths is not None else len(hidden)):
            raise ValueError("cached prefix: row count differs from the data set's")

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        if self.lengths is None:
            item["hidden"] = self.hidden[i]
        else:
            item["hidden"] = self.hidden[self.offsets[i] : self.offsets[i + 1]]
        return item


def prefix_collate(
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], token_level: bool
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Wrap the model's collate: the cached hidden states go back where the attention mask says."""

    def collate_prefix(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        items = [dict(item) for item in items]
        hidden = [item.pop("hidden") for item in items]
        batch = collate(items)
        if not token_level:
            batch["hidden"] = torch.stack(hidden) if hidden else torch.zeros(0)
            return batch
        mask = batch["attention_mask"].bool()
        width = hidden[0].shape[-1] if hidden else 0
        padded = torch.zeros(*mask.shape, width, dtype=hidden[0].dtype if hidden else torch.float32)
        if hidden:
            lengths = torch.tensor([len(h) for h in hidden])
            if not torch.equal(lengths, mask.sum(dim=1)):
                raise ValueError(
                    "cached prefix: lengths differ from the attention mask (stale cache)"
                )
            padded[mask] = torch.cat(hidden)
        batch["hidden"] = padded
        return batch

    return collate_prefix


class PrefixCached(nn.Module):
    """Runs ``model`` on cached prefix outputs: only the blocks from ``cut.first`` up compute.

    ``forward(hidden=..., **inputs)`` calls ``model(**inputs)`` with the block container cut to
    the trained blocks and ``hidden`` fed to the first of them. ``model`` itself is unchanged
    outside the call (the container is restored, the hook is idle), so it saves and evaluates as
    usual.
    """

    def __init__(self, model: nn.Module, cut: PrefixCut):
        super().__init__()
        self.model = model
        self.cut = cut
        parent_name, _, self._attr = cut.container.rpartition(".")
        full = cast(nn.ModuleList, model.get_submodule(cut.container))
        # Kept out of the module tree (a tuple), so parameters are not listed twice.
        self._parent_and_lists = (
            model.get_submodule(parent_name) if parent_name else model,
            full,
            full[cut.first :],
        )
        self._hidden: torch.Tensor | None = None
        self._handle = model.get_submodule(cut.block).register_forward_pre_hook(
            self._feed, with_kwargs=True
        )

    def _feed(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._hidden is None:
            return None
        hidden = self._hidden.to(args[0].dtype if args else kwargs["hidden_states"].dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def forward(self, hidden: torch.Tensor, **inputs: Any) -> Any:
        parent, full, kept = self._parent_and_lists
        setattr(parent, self._attr, kept)
        self._hidden = hidden
        try:
            return self.model(**inputs)
        finally:
            self._hidden = None
            setattr(parent, self._attr, full)

    def remove(self) -> None:
        """Detach the feeding hook from the model (after training)."""
        self._handle.remove()


class PrefixUnusable(Exception):
    """The cache cannot stand in for the prefix here (too large, or batch-dependent); train without it."""


class PrefixTooLarge(PrefixUnusable):
    """The cache would exceed the size limit."""


def max_cache_bytes() -> int:
    """Largest cached prefix per split: ``$HUBTUNE_PREFIX_CACHE_MAX_GIB`` (default 4 GiB)."""
    import os

    return int(float(os.environ.get("HUBTUNE_PREFIX_CACHE_MAX_GIB", "4")) * 2**30)


@torch.no_grad()
def probe_prefix(
    model: nn.Module,
    cut: PrefixCut,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    tokens: int | None = None,
) -> bool:
    """Check the cut on two real examples and the cache's size; return whether it is token-level.

    Runs identically on every process (no files), so they all take the same decision. Raises
    MethodError when a trainable module runs below the cut, PrefixTooLarge when the cache would
    pass ``max_cache_bytes()``. ``tokens`` is the data set's total token count (text).
    """
    was_training = model.training
    model.eval()
    try:
        items = _probe_items(dataset)
        batch = collate([dict(item) for item in items])
        batch.pop("idx", None)
        batch.pop("labels", None)
        hidden = capture_prefix(model, cut, batch, check=True)
        token_level = is_token_level(hidden, batch)
        # Each example alone must give what it gets in a padded batch: the cache is computed in
        # other batches than the training ones (left padding with positions counted from the
        # first pad, for one, fails this).
        alone = []
        for item in items:
            single = collate([dict(item)])
            single.pop("idx", None)
            single.pop("labels", None)
            out = capture_prefix(model, cut, single)
            alone.append(ragged(out, single)[0] if token_level else out[0])
    finally:
        model.train(was_training)
    together = ragged(hidden, batch)[0] if token_level else hidden
    expected = torch.cat(alone) if token_level else torch.stack(alone)
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(together, expected, rtol=1e-4, atol=1e-4 * scale):
        raise PrefixUnusable(
            f"the output of {cut.describe()} depends on how an example is padded in its batch "
            f"(max difference {float((together - expected).abs().max()):.3g}), so it cannot be "
            "computed once"
        )
    if token_level:
        estimate = (tokens or hidden.shape[1] * len(dataset)) * hidden.shape[-1] * 4  # type: ignore[arg-type]
    else:
        estimate = hidden[0].numel() * 4 * len(dataset)  # type: ignore[arg-type]
    if estimate > max_cache_bytes():
        raise PrefixTooLarge(
            f"the cached prefix would take {estimate / 2**30:.1f} GiB (limit "
            f"{max_cache_bytes() / 2**30:.1f} GiB, $HUBTUNE_PREFIX_CACHE_MAX_GIB)"
        )
    return token_level


def _probe_items(dataset: Dataset, look: int = 32) -> list[dict[str, Any]]:
    """Two examples of the most different lengths among the first ``look`` (to test padding)."""
    items = [dataset[i] for i in range(min(look, len(dataset)))]  # type: ignore[arg-type]
    if "input_ids" not in items[0]:
        return items[:2]
    items.sort(key=lambda item: len(item["input_ids"]))
    return [items[0], items[-1]] if len(items) > 1 else items


@torch.no_grad()
def compute_prefix(
    model: nn.Module,
    cut: PrefixCut,
    dataset: Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    token_level: bool,
    progress: Callable[[Any, str], Any] = lambda it, _desc: it,
) -> dict[str, torch.Tensor]:
    """Run the frozen prefix over ``dataset`` in eval mode: the tensors to store.

    Text: ``{"hidden": [tokens, H] (padding dropped), "lengths": [rows]}``; otherwise
    ``{"hidden": [rows, ...]}``.
    """
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    # Text is computed in order of length (batches of similar lengths pad little), then put
    # back in row order.
    lengths = example_lengths(dataset) if token_level else None
    order = sorted(range(n), key=lengths.__getitem__) if lengths is not None else list(range(n))
    loader = inference_loader(dataset, batch_size, collate, order)
    pieces: list[torch.Tensor] = []
    for batch in progress(loader, "prefix cache"):
        batch.pop("idx", None)
        batch.pop("labels", None)
        hidden = capture_prefix(model, cut, batch).cpu()
        if hidden.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.float()
        if token_level:
            flat, counts = ragged(hidden, batch)
            pieces += list(flat.split(counts.tolist()))
        else:
            pieces += list(hidden)
    rows: list[torch.Tensor] = [torch.empty(0)] * n
    for position, row in zip(order, pieces, strict=True):
        rows[position] = row
    if token_level:
        return {
            "hidden": torch.cat(rows),
            "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long),
        }
    return {"hidden": torch.stack(rows)}


def inference_loader(
    dataset: Dataset, batch_size: int, collate: Any, order: list[int] | None = None
) -> Any:
    """A loader over ``dataset`` in row order (or ``order``) that leaves the global RNG alone.

    Iterating a DataLoader draws a seed; from the global RNG, a cache computed on a miss would
    shift every later dropout mask, so a run would depend on whether the cache was hit.
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )


def example_lengths(dataset: Dataset) -> list[int] | None:
    """Token counts of a text data set (also one with a cached prefix); None for other inputs."""
    encodings = getattr(getattr(dataset, "base", dataset), "encodings", None)
    if not encodings or "input_ids" not in encodings:
        return None
    return [len(ids) for ids in encodings["input_ids"]]
