"""The serving benchmark's constraints: the corpus in turn, one schema for all, or one schema each."""

from __future__ import annotations

from benchmarks.json_schemas import SCHEMAS
from benchmarks.structured_workload import ConstraintMode, constraints_for


def _schemas(mode: ConstraintMode, count: int) -> list[str]:
    constraints = constraints_for(mode, count, seed=0)
    assert all(c is not None and c.disable_any_whitespace for c in constraints)
    return [c.json_schema for c in constraints if c is not None]


def test_schema_takes_the_corpus_in_turn() -> None:
    schemas = _schemas(ConstraintMode.SCHEMA, len(SCHEMAS) + 1)
    assert len(set(schemas)) == len(SCHEMAS) and schemas[0] == schemas[-1]


def test_one_schema_sends_the_same_schema_with_every_request() -> None:
    assert len(set(_schemas(ConstraintMode.ONE_SCHEMA, 10))) == 1


def test_unique_schema_gives_every_request_its_own() -> None:
    assert len(set(_schemas(ConstraintMode.UNIQUE_SCHEMA, 2 * len(SCHEMAS)))) == 2 * len(SCHEMAS)


def test_none_carries_no_constraint() -> None:
    assert constraints_for(ConstraintMode.NONE, 3, seed=0) == [None, None, None]
