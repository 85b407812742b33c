"""Once a step's sampling is queued, the worker reads its tokens as they reach the host and fills its rows' next
masks before the next launch asks for them: the masks and tokens are those of filling them when asked, a token fed
since drops a mask filled early, and a failure there only leaves the masks to be filled as before."""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import llguidance
import llguidance.numpy
import pytest
import structlog
import torch
from structlog.testing import capture_logs

from benchmarks.json_schemas import SCHEMAS
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker import grammar as grammar_module
from pagedserve.gpu_worker import worker as worker_module
from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar, accept_tokens, fill_token_masks
from pagedserve.gpu_worker.worker import Worker
from tests.gpu_worker.harness import STORIES_DIR, load_worker
from tests.gpu_worker.test_overlapped_steps import BLOCK_SIZE, _run_one_at_a_time, _run_two_in_flight, _steps, _tokens

VOCAB_SIZE = 32000
ONCE = StructuredOutput(ConstraintKind.CHOICE, choices=("Once upon a time", "One day, a little girl"))


@pytest.fixture(scope="module")
def compiler(llama2_tokenizer_dir: Path) -> GrammarCompiler:
    built = GrammarCompiler.for_model(llama2_tokenizer_dir, VOCAB_SIZE)
    assert built is not None
    return built


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The worker's log lines: its logger is made anew, since a process-wide configuration that caches loggers (a
    server started in this process earlier) keeps used ones from reaching capture_logs."""
    monkeypatch.setattr(worker_module, "log", structlog.get_logger())
    with capture_logs() as captured:
        yield captured


def _schemas(compiler: GrammarCompiler) -> list[SequenceGrammar]:
    return [compiler.start(StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema),
                                            disable_any_whitespace=True), seq_id)
            for seq_id, schema in enumerate(list(SCHEMAS.values())[:8])]


def test_masks_filled_early_are_those_filled_when_asked(compiler: GrammarCompiler) -> None:
    early, asked = _schemas(compiler), _schemas(compiler)
    for _ in range(12):
        expected = fill_token_masks(compiler, asked, VOCAB_SIZE)
        grammar_module.fill_ready_masks(compiler, early)
        assert all(grammar.ready_mask is not None for grammar in early)
        masks = fill_token_masks(compiler, early, VOCAB_SIZE)
        assert torch.equal(masks, expected)
        assert all(grammar.ready_mask is None for grammar in early)  # taken once
        tokens = [_first_allowed(row) for row in expected]
        accept_tokens(compiler, list(zip(asked, tokens, strict=True)))
        accept_tokens(compiler, list(zip(early, tokens, strict=True)))


def _first_allowed(mask: torch.Tensor) -> int:
    words = mask.numpy().view("uint32")
    index = int(words.nonzero()[0][0])
    word = int(words[index])
    return index * 32 + (word & -word).bit_length() - 1


@pytest.mark.parametrize("feed", ["accept", "accept_tokens"])
def test_a_token_fed_after_an_early_fill_drops_its_mask(compiler: GrammarCompiler, feed: str) -> None:
    grammar, plain = compiler.start(ONCE, 0), compiler.start(ONCE, 1)
    assert grammar.matcher() is not None  # compiled: the early fill has a matcher to fill from
    grammar_module.fill_ready_masks(compiler, [grammar])
    assert grammar.ready_mask is not None
    first = compiler.tokenizer.tokenize_str("Once")[0]
    if feed == "accept":
        grammar.accept(first)
    else:
        accept_tokens(compiler, [(grammar, first)])
    plain.accept(first)
    assert grammar.ready_mask is None
    assert torch.equal(fill_token_masks(compiler, [grammar], VOCAB_SIZE),
                       fill_token_masks(compiler, [plain], VOCAB_SIZE))


def _fills_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker as before: each step's masks filled once the next launch asks for them."""
    monkeypatch.setattr(Worker, "_fill_masks_early", lambda *_: None)


@pytest.mark.parametrize("options", [
    pytest.param(SamplingParams(temperature=0.0, structured_output=ONCE), id="greedy"),
    pytest.param(SamplingParams(temperature=0.9, seed=5, structured_output=ONCE), id="seeded"),
])
def test_the_worker_s_tokens_are_those_of_a_worker_that_fills_masks_when_asked(
        options: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequences (a request with n = 2), six decode steps: the masks filled early replace those the next step
    would fill (the rows filled in all equal those filled without, plus the last step's two, which no step asks
    for)."""
    steps = _steps(options, num_decodes=6, fork_seq_ids=(2,))
    fill = llguidance.numpy.fill_next_token_bitmask_par
    rows_filled: list[int] = []

    def counted(executor: llguidance.LLExecutor, live: list[tuple[llguidance.LLMatcher, int]], masks: Any) -> None:
        rows_filled.append(len(live))
        fill(executor, live, masks)

    monkeypatch.setattr(llguidance.numpy, "fill_next_token_bitmask_par", counted)
    results = _run_two_in_flight(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    early = sum(rows_filled)
    rows_filled.clear()
    _fills_when_asked(monkeypatch)
    expected = _run_two_in_flight(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    for seq_id in (1, 2):
        assert _tokens(results, seq_id) == _tokens(expected, seq_id)
    assert early == sum(rows_filled) + 2


def test_an_early_fill_that_fails_is_logged_and_the_masks_are_filled_when_asked(
        monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("matcher pool down")

    steps = _steps(SamplingParams(temperature=0.0, structured_output=ONCE), num_decodes=4)
    with pytest.MonkeyPatch.context() as before:
        _fills_when_asked(before)
        expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    monkeypatch.setattr(worker_module, "fill_ready_masks", broken)
    results = _run_two_in_flight(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    assert "early_mask_fill_failed" in [entry["event"] for entry in logs]
    assert _tokens(results, 1) == _tokens(expected, 1)
