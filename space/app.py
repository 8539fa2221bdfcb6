"""A Gradio Space for a text or image classifier trained with hubtune.

This file runs on its own (on a Hugging Face Space, hubtune is not installed). It reads
``space_config.json`` next to it, which ``hubtune`` renders, in one of two modes:

* Hub mode: ``{"model_repo_id": "me/model", "model_revision": "<40-hex commit SHA>", ...}``.
  The weights (safetensors only), the tokenizer, ``privacy.json`` and ``audit/audit.json`` are
  downloaded through ``huggingface_hub`` from that repo at that exact commit, so ``HF_ENDPOINT``
  and the usual cache settings apply.
* Local mode: ``{"model_path": "path/to/model", "reports_path": "path/to/run"}`` (paths relative
  to the config file), for ``hubtune space serve RUN_DIR`` without a pushed repo.

Other keys: ``task`` (``text-classification``, the default, or ``image-classification``),
``title``, ``labels`` (class names in logit order), ``max_input_chars``, ``max_length``
(tokenizer truncation), ``max_image_pixels``, ``metric_names`` (audit metric -> the display
name hubtune's audit report uses), and for LoRA adapters ``base_model_repo_id`` /
``base_model_revision``.

Safe defaults: no share link, no file access, an input size limit (characters, or pixels for
images) enforced on the server, a bounded queue, and errors that are logged here but shown to
visitors as a generic message.
"""

from __future__ import annotations

import os

# Before gradio is imported: no usage analytics or version checks, no Hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import html  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

logger = logging.getLogger("hubtune_space")

CONFIG_FILE = "space_config.json"
PRIVACY_FILE = "privacy.json"
AUDIT_FILE = "audit/audit.json"
DEFAULT_MAX_INPUT_CHARS = 2000
DEFAULT_MAX_LENGTH = 256
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
IMAGES = "image-classification"
GENERATION = "text-generation"
MAX_NEW_TOKENS_CAP = 128  # whatever the config says: one visitor cannot hold a worker for long
QUEUE_MAX_SIZE = 32
CONCURRENCY_LIMIT = 2
GENERIC_ERROR = "Sorry, something went wrong while classifying this text. Please try again later."
GENERATION_ERROR = "Sorry, something went wrong while generating text. Please try again later."
# Only what a PyTorch classifier and its tokenizer need; never pickle weights (*.bin, *.pt).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# System fonts: the page asks no third-party font server for anything.
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


class InputError(ValueError):
    """A visitor's input that the app refuses; its message is safe to show."""


# --------------------------------------------------------------------------- configuration


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read ``space_config.json`` (default: the one next to this file)."""
    config_path = Path(path) if path is not None else Path(__file__).with_name(CONFIG_FILE)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{config_path.name}: expected a JSON object")
    hub = bool(config.get("model_repo_id"))
    local = bool(config.get("model_path"))
    if hub == local:
        raise ValueError(f"{config_path.name}: give either model_repo_id or model_path")
    if hub and not config.get("model_revision"):
        raise ValueError(f"{config_path.name}: model_revision (a commit SHA) is required")
    return config


# --------------------------------------------------------------------------- files


def _download_folder(
    repo_id: str, revision: str, endpoint: str | None, patterns: list[str] | None = None
) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id=repo_id,
        revision=revision,
        allow_patterns=patterns or MODEL_FILES,
        endpoint=endpoint,
    )
    return Path(folder)


def _read_report(config: dict[str, Any], name: str, base_dir: Path, endpoint: str | None) -> Any:
    """A JSON report from the model repo (or the local run), or None when it is not there."""
    if config.get("model_repo_id"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            path = Path(
                hf_hub_download(
                    repo_id=config["model_repo_id"],
                    filename=name,
                    revision=config["model_revision"],
                    endpoint=endpoint,
                )
            )
        except RemoteEntryNotFoundError:  # the repo has no such file (not: the Hub is unreachable)
            return None
    else:
        reports = config.get("reports_path") or config["model_path"]
        path = base_dir / reports / name
        if not path.is_file():
            return None
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- model


class Classifier:
    """A classifier and its tokenizer (or image processor), on CPU (or the Space's GPU), in eval mode."""

    def __init__(
        self, model: Any, tokenizer: Any, labels: list[str], max_length: int, images: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.images = images

    def probabilities(self, item: Any) -> dict[str, float]:
        """Softmax class probabilities for one text (or one PIL image), by class name."""
        import torch

        device = next(self.model.parameters()).device
        if self.images:
            batch = self.tokenizer(images=item.convert("RGB"), return_tensors="pt").to(device)
        else:
            batch = self.tokenizer(
                item, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(device)
        with torch.inference_mode():
            logits = self.model(**batch).logits[0].float()
        probs = torch.softmax(logits, dim=-1).tolist()
        if len(probs) != len(self.labels):
            raise RuntimeError(f"model has {len(probs)} outputs but {len(self.labels)} labels")
        return {label: float(p) for label, p in zip(self.labels, probs, strict=True)}


def _model_folders(
    config: dict[str, Any], *, base_dir: Path, endpoint: str | None
) -> tuple[Path, Path | None]:
    """The model's folder (downloaded at its pinned revision, or local), and for a LoRA adapter
    its base model's folder (None: a full model)."""
    if config.get("model_repo_id"):
        folder = _download_folder(config["model_repo_id"], config["model_revision"], endpoint)
    else:
        folder = base_dir / config["model_path"]
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return folder, None
    adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
    base_id = config.get("base_model_repo_id") or adapter.get("base_model_name_or_path")
    base_revision = config.get("base_model_revision") or adapter.get("revision") or "main"
    if not base_id:
        raise ValueError("adapter_config.json names no base model")
    if Path(base_id).is_dir():
        return folder, Path(base_id)
    return folder, _download_folder(base_id, base_revision, endpoint)


class Generator:
    """A causal language model and its tokenizer: greedy continuation of a prompt, bounded."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_length: int,
        max_new_tokens: int,
        prompt_format: str = "text",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_CAP))
        if prompt_format not in ("text", "chat"):
            raise ValueError(f"unknown prompt_format {prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format chat needs a tokenizer with a chat template")
        self.prompt_format = prompt_format

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids the model continues, built as in training: ``[bos] prompt`` for text, the chat
        template's rendering of one user message (with the generation prompt) for chat; the
        last ``max_length`` of them."""
        tok = self.tokenizer
        if self.prompt_format == "chat":
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            ids = bos + list(tok(prompt, add_special_tokens=False)["input_ids"])
        return ids[-self.max_length :]

    def generate(self, prompt: str) -> str:
        """The model's greedy continuation of ``prompt`` (the prompt itself left out)."""
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(prompt)], device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = output[0, batch["input_ids"].shape[1] :]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))


def load_generator(
    config: dict[str, Any], *, base_dir: Path, endpoint: str | None = None
) -> Generator:
    """Load the language model the config names: a full model, or a LoRA adapter on its base."""
    import torch
    import transformers

    folder, base = _model_folders(config, base_dir=base_dir, endpoint=endpoint)
    if base is not None:
        from peft import PeftModel

        base_model = transformers.AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
        model = PeftModel.from_pretrained(base_model, folder)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return Generator(
        model,
        tokenizer,
        int(config.get("max_length") or DEFAULT_MAX_LENGTH),
        int(config.get("max_new_tokens") or 40),
        str(config.get("prompt_format") or "text"),
    )


def make_generate(
    generator: Generator | Callable[[str], str], max_input_chars: int
) -> Callable[[str], str]:
    """The generation handler: size check, greedy continuation, errors that reveal nothing internal."""
    produce = generator.generate if isinstance(generator, Generator) else generator

    def generate(prompt: str) -> str:
        try:
            prompt = prompt or ""
            if not prompt.strip():
                raise InputError("Please type a prompt to continue.")
            if len(prompt) > max_input_chars:
                raise InputError(
                    f"Your prompt is {len(prompt)} characters long; this demo accepts at most "
                    f"{max_input_chars}. Please shorten it."
                )
            return produce(prompt)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception:
            logger.exception("generation failed")
            raise gr.Error(GENERATION_ERROR, print_exception=False) from None

    return generate


def _labels(config: dict[str, Any], model_config: Any) -> list[str]:
    labels = config.get("labels")
    if labels:
        return [str(label) for label in labels]
    id2label = getattr(model_config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)]


def load_classifier(
    config: dict[str, Any], *, base_dir: Path, endpoint: str | None = None
) -> Classifier:
    """Load the model the config names: a full classifier, or a LoRA adapter on its base."""
    import torch
    import transformers

    images = config.get("task") == IMAGES
    auto_model: Any = (
        transformers.AutoModelForImageClassification
        if images
        else transformers.AutoModelForSequenceClassification
    )
    folder, base = _model_folders(config, base_dir=base_dir, endpoint=endpoint)
    if base is not None:
        from peft import PeftModel

        labels = config.get("labels") or []
        extra: dict[str, Any] = {}
        if labels:
            extra = {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)},
            }
        if images:  # the base's head has the pretraining classes; the adapter brings its own
            extra["ignore_mismatched_sizes"] = True
        base_model = auto_model.from_pretrained(base, use_safetensors=True, **extra)
        model = PeftModel.from_pretrained(base_model, folder)
    else:
        model = auto_model.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=_is_pooled_classifier(folder)
        )
    tokenizer = (
        _image_processor(folder) if images else transformers.AutoTokenizer.from_pretrained(folder)
    )
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    max_length = int(config.get("max_length") or DEFAULT_MAX_LENGTH)
    return Classifier(model, tokenizer, _labels(config, model.config), max_length, images=images)


# hubtune's classifier that pools token states as the base model was trained (mean pooling for
# sentence-transformers models): its modelling file, modeling_pooled.py, is saved beside the
# weights and named by config.json's auto_map.
POOLED_MODEL_TYPE = "hubtune_pooled"
POOLED_CODE = "modeling_pooled.py"


def _is_pooled_classifier(folder: Path) -> bool:
    """Whether to load the model's own code: only hubtune's pooled classifier, from its own file.

    The model folder comes from the model repo at the pinned revision this Space names, so the
    code that runs is the file hubtune pushed with the weights; any other model loads with
    transformers' built-in classes only.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != POOLED_MODEL_TYPE:
        return False
    auto_map = config.get("auto_map") or {}
    named = {str(ref).split(".", 1)[0] + ".py" for ref in auto_map.values()}
    if named != {POOLED_CODE} or not (folder / POOLED_CODE).is_file():
        raise ValueError(
            f"{folder}: a {POOLED_MODEL_TYPE} model must ship its code as {POOLED_CODE} and name only "
            f"that file in config.json's auto_map (found {sorted(named)})"
        )
    return True


def _image_processor(folder: Path) -> Any:
    """The image processor saved with the model (timm models: in preprocessor_config.json for
    adapters, in config.json otherwise)."""
    from transformers import AutoImageProcessor

    saved = folder / "preprocessor_config.json"
    if saved.is_file():
        kind = json.loads(saved.read_text(encoding="utf-8")).get("image_processor_type")
        if kind == "TimmWrapperImageProcessor":
            from transformers.models.timm_wrapper import TimmWrapperImageProcessor

            return TimmWrapperImageProcessor.from_pretrained(
                folder, image_processor_filename="preprocessor_config.json"
            )
    return AutoImageProcessor.from_pretrained(folder)


# --------------------------------------------------------------------------- text


def _md(value: Any) -> str:
    """Plain text made safe inside Markdown (and table cells)."""
    text = html.escape(str(value).replace("\n", " "), quote=False)
    for char in "\\`*_{}[]()#+!|~":
        text = text.replace(char, "\\" + char)
    return text


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return "n/a"


def privacy_markdown(ledger: dict[str, Any] | None, audit: dict[str, Any] | None) -> str:
    """The differential-privacy guarantee, from ``privacy.json`` (or the audit's summary)."""
    summary = (audit or {}).get("privacy") or {}
    if ledger is None and summary.get("dp"):
        ledger = summary
    lines = ["### Differential privacy", ""]
    if not ledger:
        if summary.get("dp") is False:
            lines.append(
                "This model was **trained without differential privacy**: no formal privacy "
                "guarantee limits what it may reveal about its training examples."
            )
        else:
            lines.append(
                "No privacy ledger (privacy.json) was published with this model, so it makes no "
                "differential-privacy claim: treat it as **trained without differential privacy**."
            )
        return "\n".join(lines)
    eps, delta = ledger.get("epsilon"), ledger.get("delta")
    if ledger.get("guarantee_void") or str(ledger.get("noise_source") or "").startswith("fixed by"):
        lines.append(
            "This model **has no privacy guarantee**: its DP noise and sampling were drawn from a "
            "fixed, known seed (testing only), so the ε its accounting gives does not hold."
        )
        return "\n".join(lines)
    accountant = str(ledger.get("accountant") or "unknown").upper()
    unit = ledger.get("unit") or "example"
    lines.append(
        f"This model was trained with differential privacy: **(ε = {_num(eps, 2)}, "
        f"δ = {_num(delta, 2)})-DP** at the {_md(unit)} level ({_md(accountant)} accountant)."
    )
    by_accountant = ledger.get("epsilon_by_accountant") or {}
    others = [
        f"{_md(str(name).upper())} ε = {_num(value, 2)}"
        for name, value in by_accountant.items()
        if str(name).upper() != accountant
    ]
    lines += ["", "| | |", "|---|---|"]
    lines.append(f"| ε (privacy loss) | {_num(eps, 3)} |")
    lines.append(f"| δ | {_num(delta, 2)} |")
    lines.append(
        f"| accountant | {_md(accountant)}{' (' + '; '.join(others) + ')' if others else ''} |"
    )
    for key, label in (
        ("noise_multiplier", "noise multiplier σ"),
        ("max_grad_norm", "clipping norm C"),
        ("sample_rate", "sampling rate q"),
        ("steps", "steps"),
    ):
        if key == "noise_multiplier" and ledger.get(key) is None and ledger.get("noise"):
            lines.append(f"| {label} | {_md(str(ledger['noise']).removeprefix('σ '))} |")
        elif key in ledger:
            lines.append(f"| {label} | {_num(ledger[key], 4) if key != 'steps' else ledger[key]} |")
    lines += [
        "",
        "(ε, δ)-DP means that adding or removing any one training example changes the "
        "probability of any outcome of training by at most a factor e^ε, plus δ. Smaller ε is "
        "a stronger guarantee.",
    ]
    return "\n".join(lines)


def _name(metric: Any, names: dict[str, str] | None) -> str:
    """A metric's display name from ``space_config.json`` (the audit report's).

    Without one (a caller that passes no names), the key with spaces for underscores, as
    audit.json names its checks.
    """
    return str((names or {}).get(str(metric)) or str(metric).replace("_", " "))


def _with_ci(entry: dict[str, Any]) -> str:
    """``0.304 (0.256–0.402)``: a value and its confidence interval, as the audit report writes it."""
    ci = entry.get("ci")
    text = _num(entry.get("value"))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" ({_num(ci[0])}–{_num(ci[1])})"
    return text


def _ci_percent(audit: dict[str, Any]) -> str:
    level = (audit.get("fairness") or {}).get("ci_level")
    return f"{round(float(level) * 100)}% " if isinstance(level, (int, float)) else ""


def fairness_markdown(
    audit: dict[str, Any] | None, *, top: int = 5, metric_names: dict[str, str] | None = None
) -> str:
    """The audit verdict, its checks and the largest gaps between groups.

    Args:
        audit: The model's ``audit/audit.json`` (None: not audited).
        top: How many of each slice's largest gaps to show.
        metric_names: Display names of the audit's metrics (``space_config.json``); metrics
            without one are shown by their key.
    """
    lines = ["### Fairness audit", ""]
    if not audit:
        lines.append("No fairness audit was published with this model.")
        return "\n".join(lines)
    verdict = audit.get("verdict") or {}
    status = str(verdict.get("status") or "unknown").upper().replace("_", " ")
    policy = audit.get("policy") or {}
    lines.append(f"**Verdict: {_md(status)}** (policy {_md(policy.get('name', 'unknown'))}).")
    if policy.get("description"):
        lines += ["", _md(policy["description"])]
    checks = verdict.get("checks") or []
    if checks:
        lines += ["", "| check | scope | value | rule | result |", "|---|---|---|---|---|"]
        for check in checks:
            result = {True: "pass", False: "**FAIL**", None: "n/a"}.get(check.get("passed"), "n/a")
            lines.append(
                f"| {_md(check.get('check', ''))} | {_md(check.get('scope', ''))} | "
                f"{_num(check.get('judged_value', check.get('value')))} | "
                f"{_md(check.get('rule', ''))} | {result} |"
            )
    for slice_ in (audit.get("fairness") or {}).get("slices") or []:
        disparities = slice_.get("disparities") or {}
        gaps = disparities.get("largest_gap") or {}
        rows = sorted(
            (
                (metric, gap)
                for metric, gap in gaps.items()
                if isinstance(gap, dict) and isinstance(gap.get("value"), (int, float))
            ),
            key=lambda item: -float(item[1]["value"]),
        )[:top]
        lines += ["", f"**Largest gaps between {_md(slice_.get('name', 'groups'))} groups**", ""]
        if not rows:
            lines.append(_md(slice_.get("disparities_note") or "No reportable gaps."))
            continue
        lines += [
            f"| metric | gap ({_ci_percent(audit)}confidence interval) | highest | lowest |",
            "|---|---|---|---|",
        ]
        for metric, gap in rows:
            lines.append(
                f"| {_md(_name(metric, metric_names))} | {_with_ci(gap)} | "
                f"{_md(gap.get('highest', ''))} | {_md(gap.get('lowest', ''))} |"
            )
        summary = [
            f"{_md(_name(key, metric_names))} {_with_ci(disparities[key])}"
            for key in ("equalized_odds_difference", "demographic_parity_difference")
            if (disparities.get(key) or {}).get("value") is not None
        ]
        if summary:
            lines += ["", ". ".join(summary) + "."]
    membership = audit.get("membership") or {}
    auc = (membership.get("auc") or {}).get("value") if isinstance(membership, dict) else None
    if auc is not None:
        lines += [
            "",
            f"Membership inference attack AUC: {_num(auc)} (0.5 means the attack cannot tell "
            "training examples from unseen ones).",
        ]
    return "\n".join(lines)


_VERDICT_HEADINGS = {
    "pass": "✅ Fairness audit: PASS",
    "fail": "⚠️ Fairness audit: FAIL",
    "inconclusive": "⚠️ Fairness audit: INCONCLUSIVE",
    "not_applicable": "ℹ️ Fairness audit: NOT APPLICABLE",
}
_LIMITS = {"≤": "the policy allows at most", "≥": "the policy requires at least"}


def _check_name(check: str, names: dict[str, str] | None) -> str:
    """A check's display name: audit.json writes ``equalized odds difference``, ``tpr gap``."""
    names = names or {}
    key = check.replace(" ", "_")
    if key in names:
        return names[key]
    if check.endswith(" gap") and check[: -len(" gap")] in names:
        return f"Largest {names[check[: -len(' gap')]]} gap"
    return check[:1].upper() + check[1:]


def _check_sentence(check: dict[str, Any], names: dict[str, str] | None) -> str:
    """One check in plain words: what was measured, where, and what the policy allows."""
    name = _check_name(str(check.get("check") or "check"), names)
    text = f"{_md(name)} ({_md(check.get('scope', ''))}) is {_with_ci(check)}"
    judged = check.get("judged_value")
    if check.get("judged_on") == "ci_bound" and judged is not None:
        text += f", judged on its interval's least favourable end, {_num(judged)}"
    rule = str(check.get("rule") or "")
    limit = _LIMITS.get(rule[:1])
    if limit and isinstance(check.get("threshold"), (int, float)):
        return f"{text}; {limit} {_num(check['threshold'])}."
    return f"{text}; the rule: {_md(rule)}."


def verdict_markdown(
    audit: dict[str, Any] | None, *, metric_names: dict[str, str] | None = None
) -> str:
    """The fairness verdict shown beside each prediction, with any failed checks in plain words.

    Args:
        audit: The model's ``audit/audit.json`` (None: not audited).
        metric_names: Display names of the audit's metrics (``space_config.json``).
    """
    if not audit:
        return (
            "### Fairness audit: none\n\nNo fairness audit was published with this model: "
            "nothing is known about how its mistakes differ between groups of people."
        )
    verdict = audit.get("verdict") or {}
    status = str(verdict.get("status") or "unknown").lower()
    policy = _md((audit.get("policy") or {}).get("name", "unknown"))
    checks = verdict.get("checks") or []
    lines = [f"### {_VERDICT_HEADINGS.get(status, 'Fairness audit: ' + _md(status.upper()))}", ""]
    if status == "fail":
        lines.append(
            f"This model **failed** its fairness audit (policy {policy}): weigh that before "
            "relying on its predictions, above all in decisions about people."
        )
        items = [_check_sentence(c, metric_names) for c in checks if c.get("passed") is False]
        items = items or [_md(item) for item in verdict.get("failed") or []]
        lines += ["", "Failed checks:", ""] + [f"- {item}" for item in items]
    elif status == "inconclusive":
        lines.append(
            f"No check of the {policy} policy failed, but these could not be evaluated "
            "(too few test rows or groups):"
        )
        items = [
            f"{_md(_check_name(str(c.get('check') or 'check'), metric_names))} "
            f"({_md(c.get('scope', ''))})"
            for c in checks
            if c.get("passed") is None
        ]
        items = items or [_md(item) for item in verdict.get("not_evaluable") or []]
        lines += [""] + [f"- {item}" for item in items]
    elif status == "not_applicable":
        lines.append(
            f"No check of the {policy} policy applies to this model: nothing is known about how "
            "its mistakes differ between groups of people."
        )
    elif status == "pass":
        lines.append(
            f"Every check of the {policy} policy passed on the test data. That is no guarantee "
            "of fair predictions on other data."
        )
    lines += ["", "The *Privacy & fairness* tab has the details."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- app


def _cleared() -> tuple[None, str]:
    """Empty prediction outputs: after an error, no earlier result may stay on screen."""
    return None, ""


def make_predict(
    classifier: Classifier | Callable[[Any], dict[str, float]],
    max_input_chars: int,
    *,
    images: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Callable[[Any], tuple[dict[str, float], str]]:
    """The event handler: size check, prediction, and errors that reveal nothing internal."""
    predict = classifier.probabilities if isinstance(classifier, Classifier) else classifier

    def classify(item: Any) -> tuple[dict[str, float], str]:
        try:
            if images:
                if item is None:
                    raise InputError("Please upload an image to classify.")
                if item.width * item.height > max_image_pixels:
                    raise InputError(
                        f"Your image has {item.width} x {item.height} pixels; this demo accepts at "
                        f"most {max_image_pixels:,} pixels. Please use a smaller image."
                    )
            else:
                item = item or ""
                if not item.strip():
                    raise InputError("Please type some text to classify.")
                if len(item) > max_input_chars:
                    raise InputError(
                        f"Your text is {len(item)} characters long; this demo accepts at most "
                        f"{max_input_chars}. Please shorten it."
                    )
            probs = predict(item)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception:
            logger.exception("classification failed")
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None
        table = ["| class | probability |", "|---|---|"] + [
            f"| {_md(label)} | {p:.4f} |"
            for label, p in sorted(probs.items(), key=lambda item: -item[1])
        ]
        return probs, "\n".join(table)

    return classify


def build_demo(
    config: dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    endpoint: str | None = None,
    classifier: Classifier | Callable[[Any], dict[str, float]] | None = None,
) -> gr.Blocks:
    """Load the model and its reports and lay out the two tabs (prediction, privacy/fairness).

    Args:
        config: The parsed ``space_config.json``.
        base_dir: Folder that relative local paths are resolved against (default: this file's).
        endpoint: Hub endpoint override (default: ``HF_ENDPOINT`` or huggingface.co).
        classifier: A ready classifier (or a ``text or image -> {label: probability}``
            function) to use instead of loading the model.
    """
    base = Path(base_dir) if base_dir is not None else Path(__file__).parent
    generation = config.get("task") == GENERATION
    model: Any = classifier
    if model is None:
        model = (
            load_generator(config, base_dir=base, endpoint=endpoint)
            if generation
            else load_classifier(config, base_dir=base, endpoint=endpoint)
        )
    names = config.get("metric_names") or {}
    try:
        ledger = _read_report(config, PRIVACY_FILE, base, endpoint)
        audit = _read_report(config, AUDIT_FILE, base, endpoint)
        reports = (
            privacy_markdown(ledger, audit) + "\n\n" + fairness_markdown(audit, metric_names=names)
        )
        verdict = verdict_markdown(audit, metric_names=names)
    except Exception:
        logger.exception("could not read the privacy and audit reports")
        reports = "The privacy and fairness reports of this model could not be read."
        verdict = (
            "### Fairness audit: unknown\n\nThe fairness audit of this model could not be read."
        )
    max_chars = int(config.get("max_input_chars") or DEFAULT_MAX_INPUT_CHARS)
    images = config.get("task") == IMAGES
    max_pixels = int(config.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)
    title = str(
        config.get("title")
        or ("Image classifier" if images else "Text generator" if generation else "Text classifier")
    )
    source = (
        f"`{config['model_repo_id']}` at revision `{str(config['model_revision'])[:12]}`"
        if config.get("model_repo_id")
        else "a local model folder"
    )
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {_md(title)}\n\nModel: {source}. Trained with hubtune.")
        if generation:
            _generation_tab(model, max_chars, verdict)
        else:
            with gr.Tab("Classify"):
                field: Any
                if images:
                    field = gr.Image(
                        label="Image",
                        type="pil",
                        image_mode="RGB",
                        sources=["upload", "clipboard"],
                        elem_id="input-image",
                    )
                else:
                    field = gr.Textbox(
                        label="Text",
                        lines=4,
                        placeholder="Type or paste a comment…",
                        info=f"Up to {max_chars} characters.",
                        elem_id="input-text",
                    )
                button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                with gr.Row():
                    with gr.Column(scale=3):
                        label = gr.Label(label="Prediction", elem_id="prediction")
                        table = gr.Markdown(elem_id="probabilities")
                    with gr.Column(scale=2):
                        # Beside every prediction: a confident answer says nothing about fairness.
                        gr.Markdown(verdict, elem_id="audit-verdict")
                handler = make_predict(model, max_chars, images=images, max_image_pixels=max_pixels)
                events = [
                    button.click(handler, inputs=field, outputs=[label, table], api_name="classify")
                ]
                if not images:
                    events.append(
                        field.submit(
                            handler, inputs=field, outputs=[label, table], api_visibility="private"
                        )
                    )
                for event in events:
                    event.failure(
                        _cleared, outputs=[label, table], api_visibility="private", queue=False
                    )
        with gr.Tab("Privacy & fairness"):
            gr.Markdown(reports, elem_id="privacy-fairness")
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def _generation_tab(
    generator: Generator | Callable[[str], str], max_chars: int, verdict: str
) -> None:
    """Prompt in, greedy continuation out (bounded new tokens), the audit verdict beside it."""
    with gr.Tab("Generate"):
        prompt = gr.Textbox(
            label="Prompt",
            lines=3,
            placeholder="Type the start of a text…",
            info=f"Up to {max_chars} characters.",
            elem_id="input-text",
        )
        button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Row():
            with gr.Column(scale=3):
                completion = gr.Textbox(label="Continuation", lines=4, elem_id="completion")
            with gr.Column(scale=2):
                gr.Markdown(verdict, elem_id="audit-verdict")
        handler = make_generate(generator, max_chars)
        events = [button.click(handler, inputs=prompt, outputs=completion, api_name="generate")]
        events.append(
            prompt.submit(handler, inputs=prompt, outputs=completion, api_visibility="private")
        )
        for event in events:
            event.failure(lambda: "", outputs=completion, api_visibility="private", queue=False)


def launch(
    demo: gr.Blocks,
    *,
    server_name: str | None = None,
    server_port: int | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Serve the demo with safe settings (no share link, no file access, no SSR/MCP/PWA)."""
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return demo.launch(
        share=False,
        server_name=server_name,
        server_port=server_port,
        prevent_thread_lock=prevent_thread_lock,
        show_error=False,
        allowed_paths=[],
        max_file_size="1kb",
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        quiet=quiet,
        theme=theme,
    )


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    launch(build_demo(load_config()))


if __name__ == "__main__":
    main()
