"""A request's output constraint (vLLM's structured_outputs) and its one translation into the grammar engine's form,
shared by the frontend, which checks that it compiles, and the worker, which enforces it."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import llguidance

from pagedserve.contract.errors import InvalidArgumentError

FIELD = "structured_output"
MAX_SPEC_CHARS = 256 * 1024  # a schema, regex, grammar or structural tag
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024


class ConstraintKind(enum.Enum):
    """Which of vLLM's StructuredOutputsParams constraints a request carries."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"
    STRUCTURAL_TAG = "structural_tag"


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """One constraint: its kind and text (the choices for CHOICE, nothing for JSON_OBJECT), plus vLLM's JSON options.

    Construction bounds the sizes (InvalidArgumentError naming the field); whether it compiles is grammar()'s
    question, asked once by the frontend before anything is allocated.
    """

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        where = f"{FIELD}.{self.kind.value}"
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidArgumentError(where, f"at most {MAX_SPEC_CHARS} characters, got {len(self.spec)}")
        if self.kind is ConstraintKind.CHOICE:
            if not 1 <= len(self.choices) <= MAX_CHOICES:
                raise InvalidArgumentError(where, f"needs 1 to {MAX_CHOICES} choices, got {len(self.choices)}")
            if not all(self.choices) or max(map(len, self.choices)) > MAX_CHOICE_CHARS:
                raise InvalidArgumentError(where, f"each choice non-empty and at most {MAX_CHOICE_CHARS} characters")
        elif self.kind is not ConstraintKind.JSON_OBJECT and not self.spec:
            raise InvalidArgumentError(where, "must not be empty")

    @property
    def cache_key(self) -> tuple[object, ...]:
        """Equal for constraints that compile to the same grammar (with one tokenizer)."""
        return (self.kind, self.spec, self.choices, self.disable_any_whitespace, self.disable_additional_properties)

    def grammar(self) -> str:
        """The llguidance grammar of this constraint; InvalidArgumentError naming the field when the text does not
        parse. The grammar still needs LLMatcher.validate_grammar with the model's tokenizer to be known good."""
        where = f"{FIELD}.{self.kind.value}"
        try:
            return self._grammar()
        except (ValueError, TypeError, KeyError, AssertionError) as error:  # what llguidance and json raise
            raise InvalidArgumentError(where, f"cannot be compiled: {_first_line(error)}") from None

    def checked_grammar(self, tokenizer: llguidance.LLTokenizer) -> str:
        """grammar(), checked against a model's vocabulary: InvalidArgumentError naming the field and the engine's
        message unless a matcher can be built from it."""
        grammar = self.grammar()
        message = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if message:
            raise InvalidArgumentError(f"{FIELD}.{self.kind.value}", f"cannot be compiled: {message[:500]}")
        return grammar

    def _grammar(self) -> str:
        kind = self.kind
        if kind is ConstraintKind.JSON_SCHEMA:
            schema = json.loads(self.spec)
            if self.disable_additional_properties:
                schema = _without_additional_properties(schema)
            return self._json_grammar(schema)
        if kind is ConstraintKind.JSON_OBJECT:
            return self._json_grammar({"type": "object"})
        if kind is ConstraintKind.REGEX:
            return str(llguidance.LLMatcher.grammar_from_regex(self.spec))
        if kind is ConstraintKind.CHOICE:
            return llguidance.grammar_from("choice", json.dumps(list(self.choices)))
        if kind is ConstraintKind.GRAMMAR:
            return llguidance.grammar_from("grammar", self.spec)
        return _structural_tag_grammar(self.spec)

    def _json_grammar(self, schema: Any) -> str:
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON schema is an object or a boolean")
        # vLLM's defaults: any whitespace between tokens unless disable_any_whitespace.
        options = {"whitespace_flexible": not self.disable_any_whitespace}
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options))  # type: ignore[arg-type]


def _structural_tag_grammar(spec: str) -> str:
    """vLLM's structural tag ({"structures": [{"begin", "schema", "end"}], "triggers": [...]}) as llguidance's
    StructTag grammar: free text, where each begin tag (which starts with one of the triggers) opens JSON of its
    schema closed by its end tag."""
    tag = json.loads(spec)
    triggers = tag["triggers"]
    tags = []
    for structure in tag["structures"]:
        begin = structure["begin"]
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"begin {begin!r} starts with none of the triggers {triggers}")
        tags.append(llguidance.StructTag(trigger=trigger, begin=begin, grammar=structure["schema"],
                                         end=structure["end"]))
    if not tags:
        raise ValueError("no structures")
    return llguidance.StructTag.to_grammar(tags)


def _without_additional_properties(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object schema that does not say otherwise."""
    if isinstance(schema, list):
        return [_without_additional_properties(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _without_additional_properties(value) for key, value in schema.items()}
    if (result.get("type") == "object" or "properties" in result) and "additionalProperties" not in result:
        result["additionalProperties"] = False
    return result


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]
