"""Chat templates: a conversation rendered into the prompt text its model was trained on.

Rendering is transformers' apply_chat_template (Jinja in its immutable sandbox), with the model's template or one
the operator gives (`--chat-template FILE_OR_STRING`, as vLLM's flag). The rendered text is then tokenized without
the tokenizer's own special tokens, as transformers and vLLM do: the template writes the BOS when its model wants
one, so a BOS is never doubled.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template

from pagedserve.control_plane.errors import FailedPreconditionError, InvalidArgumentError
from pagedserve.control_plane.text.tokenizer import Tokenizer

# Characters that make --chat-template's value a template rather than a path (vLLM's rule).
_TEMPLATE_CHARS = frozenset("{}\n")
# A template's error message is passed on to the caller, cut to this length.
MAX_TEMPLATE_ERROR_CHARS = 500
# Names a template kwarg may not take: apply_chat_template's own parameters (they would change how it renders or
# what it returns) and the variables it sets itself.
_RESERVED_KWARGS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {
    "self", "kwargs",
} | {"messages"}


def load_chat_template(value: str) -> str:
    """--chat-template's value as template text: the contents of the file it names; else the value itself, as given,
    when it reads as a template (it has a brace or a line break). ValueError when it looks like a path of no file,
    or the template does not compile. (vLLM also decodes backslash escapes in the value; that would change the
    escapes inside a template's own Jinja strings, so they are left alone here.)"""
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"chat template file {value!r} is not UTF-8 text") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL character, which no path has
        if not _TEMPLATE_CHARS & set(value):
            raise ValueError(f"chat template {value!r} looks like a path, but cannot be read: {exc}") from None
        text = value
    try:
        _compile_jinja_template(text)
    except Exception as exc:  # jinja2's TemplateSyntaxError, or what its extensions raise
        raise ValueError(f"chat template does not compile: {type(exc).__name__}: {exc}") from None
    return text


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation to render, in the shape chat templates read: OpenAI's messages and tools, as dicts.

    Invariants: at least one message; add_generation_prompt and continue_final_message not both; no template kwarg
    under a reserved name (apply_chat_template's own parameters, `messages`)."""

    messages: tuple[Mapping[str, Any], ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidArgumentError("messages", "must hold at least one message")
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidArgumentError(
                "continue_final_message",
                "cannot be combined with add_generation_prompt (set add_generation_prompt to false)",
            )
        reserved = sorted(_RESERVED_KWARGS & set(self.template_kwargs))
        if reserved:
            raise InvalidArgumentError("chat_template_kwargs", f"may not set {', '.join(reserved)}")


class ChatTemplate:
    """Renders conversations for one model: with the operator's template when one is given, else the model's.

    Rendering raises FailedPreconditionError when neither exists, and InvalidArgumentError with the template's own
    message when the template raises (a role it does not know, roles out of order, its raise_exception())."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._template = template

    @property
    def is_available(self) -> bool:
        return self._template is not None or self._tokenizer.has_chat_template

    def check_available(self) -> None:
        """FailedPreconditionError unless there is a template to render with."""
        if not self.is_available:
            raise FailedPreconditionError(
                "this model has no chat template: give one with `pagedserve serve --chat-template FILE_OR_STRING`, "
                "or send the rendered prompt to Generate"
            )

    def render(self, conversation: Conversation) -> str:
        """The conversation's prompt text."""
        self.check_available()
        special = sorted(self._tokenizer.special_token_names & set(conversation.template_kwargs))
        if special:
            raise InvalidArgumentError("chat_template_kwargs", f"may not set {', '.join(special)}")
        try:
            return self._tokenizer.render_chat(
                conversation.messages, conversation.tools, self._template, conversation.add_generation_prompt,
                conversation.continue_final_message, conversation.template_kwargs,
            )
        except Exception as exc:  # anything the template's code raises: its raise_exception(), undefined names
            message = f"{type(exc).__name__}: {exc}"
            if len(message) > MAX_TEMPLATE_ERROR_CHARS:
                message = message[:MAX_TEMPLATE_ERROR_CHARS] + "..."
            raise InvalidArgumentError("messages", f"the chat template failed: {message}") from None

    def prompt_token_ids(self, conversation: Conversation) -> list[int]:
        """The rendered prompt's token ids, without the tokenizer's special tokens (the template wrote those)."""
        return self._tokenizer.encode(self.render(conversation), add_special_tokens=False)
