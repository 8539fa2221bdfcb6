"""Chat conversations for the text-generation task: parsing, and rendering through a template.

A conversation is a list of messages ``{"role": ..., "content": ...}`` (the shape of the Hub's
chat data sets and of ``tokenizer.apply_chat_template``). In a data set it is a list column, or
a JSON string of that list (a CSV cell). :func:`parse_conversation` checks one and returns it in
a canonical form; the data layer keeps conversations as canonical JSON strings, so splitting,
hashing and caching treat them like any text column.

**Which tokens the loss covers.** The tokenizer's chat template renders the conversation to
text. To find the assistant's tokens without relying on ``{% generation %}`` markers (few
templates have them), :func:`segments` renders the conversation turn by turn: for each
assistant message ``i``, the text of ``messages[:i]`` with the generation prompt (what the model
sees before it answers) and the text of ``messages[:i + 1]``; what the second adds to the first
is the assistant's answer, its end-of-turn marker included. A template that rewrites earlier
turns when later ones are added (so the renderings are not prefixes of each other) is refused
with the turn it fails at: hubtune cannot then say which tokens are the assistant's.
"""

from __future__ import annotations

import json
from typing import Any

from hubtune.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(InputError, ValueError):
    """A value that is not a conversation, or a template that cannot render one (the message
    says what is wrong and what to do)."""


def parse_conversation(value: Any) -> list[dict[str, str]]:
    """A conversation (list of ``{role, content}``) from a list or its JSON text.

    Raises:
        ConversationError: not a list of messages with a known role and text content, or no
            assistant message (nothing for the model to learn).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConversationError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet / datasets
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise ConversationError(
            f"expected a non-empty list of messages, got {type(value).__name__}"
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {i} is not a {{'role': ..., 'content': ...}} mapping")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationError(f"message {i} has role {role!r}; known roles: {list(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(
                f"message {i} has {type(content).__name__} content; only text content is supported"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant message: nothing for the model to learn")
    return messages


def canonical(messages: list[dict[str, str]]) -> str:
    """The conversation as the JSON text the data layer stores (stable across runs)."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def require_template(tokenizer: Any) -> None:
    """Refuse a tokenizer without a chat template, saying how to give it one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(
            "data.columns.messages needs a chat template, and this model's tokenizer has none "
            "(tokenizer_config.json has no chat_template). Give one in model.chat_template (a Jinja "
            "template, e.g. the ChatML one in README 'Language models'), or use prompt + completion "
            "columns instead."
        )


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant)`` pieces, in order (joined: the whole
    rendering). See the module docstring."""
    require_template(tokenizer)
    whole = _render(tokenizer, messages, generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of `whole` already assigned
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (whole.startswith(after) and after.startswith(before) and len(before) >= done):
            raise ConversationError(
                f"the chat template does not render this conversation turn by turn (the text up to "
                f"message {i} is not a prefix of the whole), so the assistant's tokens cannot be "
                "told apart; set data.loss_on: all, or give model.chat_template"
            )
        if len(before) > done:
            pieces.append((whole[done : len(before)], False))
        pieces.append((whole[len(before) : len(after)], True))
        done = len(after)
    if done < len(whole):
        pieces.append((whole[done:], False))
    return [(text, labelled) for text, labelled in pieces if text]


def generation_prefix(tokenizer: Any, prompt: str) -> str:
    """What the model sees before it answers a single user message (generation prompt added)."""
    require_template(tokenizer)
    return _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)


# A minimal ChatML template (the format of Qwen and SmolLM2-Instruct), for base models that ship
# none; recipes give it (or their own) in model.chat_template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
