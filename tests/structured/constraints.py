"""Constraints of every kind and their independent checks (jsonschema, re, Lark-free parsing), shared by the
structured-output tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from benchmarks.json_schemas import SCHEMAS
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput

_FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@dataclass(frozen=True)
class Case:
    """A constraint and the reference that says whether a finished output satisfies it."""

    name: str
    constraint: StructuredOutput
    schema: dict[str, Any] | None = None  # JSON: validated with jsonschema
    pattern: str | None = None  # text: re.fullmatch
    structural: dict[str, Any] | None = None  # structural tag: every tagged segment validated

    def problem(self, text: str) -> str | None:
        """Why text does not satisfy the constraint, or None when it does."""
        if self.schema is not None:
            try:
                jsonschema.validate(json.loads(text), self.schema, format_checker=_FORMATS)
            except (ValueError, jsonschema.ValidationError) as error:
                return f"{self.name}: {str(error).splitlines()[0]} in {text!r}"
            return None
        if self.pattern is not None:
            return None if re.fullmatch(self.pattern, text, re.DOTALL) else f"{self.name}: {text!r} !~ {self.pattern}"
        assert self.structural is not None
        return _structural_problem(self.structural, text)


def _structural_problem(tag: dict[str, Any], text: str) -> str | None:
    for structure in tag["structures"]:
        begin, end = re.escape(structure["begin"]), re.escape(structure["end"])
        for match in re.finditer(f"{begin}(.*?){end}", text, re.DOTALL):
            try:
                jsonschema.validate(json.loads(match.group(1)), structure["schema"])
            except (ValueError, jsonschema.ValidationError) as error:
                return f"structural tag: {str(error).splitlines()[0]} in {match.group(1)!r}"
    return None


def json_schema_cases(all_compact: bool = False) -> list[Case]:
    """One case per schema; every other one compact (no whitespace between tokens), or all of them (greedy decoding
    of a random model would otherwise pick whitespace for ever)."""
    return [
        Case(name, StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema),
                                    disable_any_whitespace=all_compact or i % 2 == 0), schema=schema)
        for i, (name, schema) in enumerate(SCHEMAS.items())
    ]


TOOL_TAG = {
    "structures": [{"begin": "<call=add>", "schema": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"], "additionalProperties": False},
        "end": "</call>"}],
    "triggers": ["<call="],
}

# A small arithmetic grammar in GBNF (llama.cpp's EBNF) and its language as a regex, for checking.
ARITHMETIC_GBNF = 'root ::= term (("+" | "*") term){0,3}\nterm ::= [0-9] | "(" [0-9] ("+" | "-") [0-9] ")"'
ARITHMETIC_RE = r"(?:[0-9]|\([0-9][+-][0-9]\))(?:[+*](?:[0-9]|\([0-9][+-][0-9]\))){0,3}"
LARK_LIST = 'start: "[" item ("," item)* "]"\nitem: /[a-c]{1,2}/'


def other_cases() -> list[Case]:
    """Regexes, choices, grammars (GBNF and Lark), a structural tag and a bare JSON object."""
    regexes = {
        "phone": r"[0-9]{3}-[0-9]{4}",
        "iso_date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])",
        "yes_no": r"(yes|no)",
        "hex_color": r"#[0-9a-f]{6}",
        "word_list": r"[a-z]{1,5}( [a-z]{1,5}){0,2}",
    }
    cases = [Case(f"regex_{n}", StructuredOutput(ConstraintKind.REGEX, p), pattern=p) for n, p in regexes.items()]
    for name, choices in {"colors": ("red", "green", "blue"), "answers": ("yes", "no", "maybe later")}.items():
        cases.append(Case(f"choice_{name}", StructuredOutput(ConstraintKind.CHOICE, choices=choices),
                          pattern="|".join(map(re.escape, choices))))
    cases.append(Case("gbnf_arithmetic", StructuredOutput(ConstraintKind.GRAMMAR, ARITHMETIC_GBNF),
                      pattern=ARITHMETIC_RE))
    cases.append(Case("lark_list", StructuredOutput(ConstraintKind.GRAMMAR, LARK_LIST),
                      pattern=r"\[[a-c]{1,2}(,[a-c]{1,2})*\]"))
    cases.append(Case("json_object", StructuredOutput(ConstraintKind.JSON_OBJECT, disable_any_whitespace=True),
                      schema={"type": "object"}))
    cases.append(Case("structural_tag", StructuredOutput(ConstraintKind.STRUCTURAL_TAG, json.dumps(TOOL_TAG)),
                      structural=TOOL_TAG))
    return cases
