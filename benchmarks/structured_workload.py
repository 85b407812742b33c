"""The constraint each request of a serving benchmark carries: none, a JSON schema of the shared corpus (compiled
once each, then served from the worker's cache), one schema for every request (as an application with one response
or tool schema sends them), or a schema made unique per request (every one compiled cold)."""

from __future__ import annotations

import enum
import json

from benchmarks.json_schemas import SCHEMAS
from pagedserve.v1 import common_pb2


class ConstraintMode(enum.Enum):
    NONE = "none"
    SCHEMA = "schema"  # request i: the corpus' schema i mod 55
    ONE_SCHEMA = "one-schema"  # every request the corpus' "contact" schema
    UNIQUE_SCHEMA = "unique-schema"  # the same schemas, each with a title of its own: nothing is cached


def parse_modes(text: str) -> list[ConstraintMode]:
    """Comma-separated mode names, run in turn."""
    return [ConstraintMode(name.strip()) for name in text.split(",")]


def constraints_for(mode: ConstraintMode, num_requests: int, seed: int) -> list[common_pb2.StructuredOutput | None]:
    """One constraint per request (compact JSON: the same number of tokens is generated with ignore_eos)."""
    if mode is ConstraintMode.NONE:
        return [None] * num_requests
    schemas = [SCHEMAS["contact"]] if mode is ConstraintMode.ONE_SCHEMA else list(SCHEMAS.values())
    result: list[common_pb2.StructuredOutput | None] = []
    for index in range(num_requests):
        schema = dict(schemas[index % len(schemas)])
        if mode is ConstraintMode.UNIQUE_SCHEMA:
            schema["title"] = f"request {seed}-{index}"
        result.append(common_pb2.StructuredOutput(json_schema=json.dumps(schema), disable_any_whitespace=True))
    return result
