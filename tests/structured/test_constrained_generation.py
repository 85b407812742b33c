"""Every finished output of a constrained request satisfies its constraint, checked by references that are not the
grammar engine (jsonschema, re), on a random-weight model (where nothing but the constraint makes an output valid)
and on stories260K; max_tokens is the only way an output ends unfinished."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.scheduling.request import FinishReason
from tests.structured.constraints import Case, json_schema_cases, other_cases

MAX_TOKENS = 200
CACHE = CacheConfig(kv_cache_memory_bytes=64 << 20, swap_space_bytes=0)


@pytest.fixture(scope="module")
def random_llm() -> Iterator[LLM]:
    with LLM(cache_config=CACHE, worker_process=False) as llm:  # the built-in model: random weights
        yield llm


@pytest.fixture(scope="module")
def stories_llm(stories260k_dir: Path) -> Iterator[LLM]:
    with LLM(stories260k_dir, cache_config=CACHE, worker_process=False) as llm:
        yield llm


def _run(llm: LLM, cases: list[Case], temperature: float) -> list[tuple[Case, str, FinishReason | None]]:
    """All cases in one batch; seeded, so a failure reproduces."""
    params = [
        SamplingParams(temperature=temperature, seed=index, max_tokens=MAX_TOKENS, structured_output=case.constraint)
        for index, case in enumerate(cases)
    ]
    outputs = llm.generate(["The answer is"] * len(cases), params)
    return [(case, out.outputs[0].text, out.outputs[0].finish_reason) for case, out in zip(cases, outputs, strict=True)]


def _check(results: list[tuple[Case, str, FinishReason | None]], min_finished: float) -> None:
    finished = [(case, text) for case, text, reason in results if reason is FinishReason.STOP]
    problems = [problem for case, text in finished if (problem := case.problem(text)) is not None]
    assert problems == []
    cut = [reason for _, _, reason in results if reason is not FinishReason.STOP]
    assert set(cut) <= {FinishReason.LENGTH}
    assert len(finished) >= min_finished * len(results), f"only {len(finished)} of {len(results)} finished"


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_every_json_schema_output_of_a_random_weight_model_is_valid(random_llm: LLM, temperature: float) -> None:
    cases = json_schema_cases(all_compact=temperature == 0.0)
    assert len(cases) >= 50
    _check(_run(random_llm, cases, temperature), min_finished=0.8)


def test_every_json_schema_output_of_stories260k_is_valid(stories_llm: LLM) -> None:
    # stories260K, free to add whitespace, writes newlines to max_tokens: compact JSON, so that most outputs end.
    _check(_run(stories_llm, json_schema_cases(all_compact=True), 1.0), min_finished=0.8)


@pytest.mark.parametrize("model", ["random", "stories"])
def test_regexes_choices_grammars_and_structural_tags_hold(model: str, request: pytest.FixtureRequest) -> None:
    llm = request.getfixturevalue(f"{model}_llm")
    # Free text (structural tags, an open JSON object, an unbounded list) may run to max_tokens; the rest end.
    _check(_run(llm, other_cases(), 1.0), min_finished=0.6)


def test_max_tokens_cuts_a_constrained_output_with_finish_reason_length(random_llm: LLM) -> None:
    case = next(c for c in json_schema_cases() if c.name == "company")
    output = random_llm.generate(["x"], SamplingParams(temperature=0.0, max_tokens=3,
                                                       structured_output=case.constraint))[0].outputs[0]
    assert (len(output.token_ids), output.finish_reason) == (3, FinishReason.LENGTH)
    assert output.text.lstrip().startswith("{")
