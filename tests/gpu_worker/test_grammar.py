"""The worker's grammar state: tokens advance matchers in parallel exactly as one by one, a compilation still
running keeps its tokens, a refused token is logged and leaves only end-of-sequence allowed, and a matcher that cannot
be had is one sequence's failure, never an exception out of the batch's masks."""

from __future__ import annotations

from collections.abc import MutableMapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import llguidance
import pytest
import torch
from structlog.testing import capture_logs

from pagedserve.contract.step import SequenceFailure
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar, accept_tokens, fill_token_masks

VOCAB_SIZE = 32000
CHOICES = ("red apple", "green pear", "blue plum")


@pytest.fixture(scope="module")
def compiler(llama2_tokenizer_dir: Path) -> GrammarCompiler:
    built = GrammarCompiler.for_model(llama2_tokenizer_dir, VOCAB_SIZE)
    assert built is not None
    return built


def _choice() -> StructuredOutput:
    return StructuredOutput(ConstraintKind.CHOICE, choices=CHOICES)


def _allowed(compiler: GrammarCompiler, grammar: SequenceGrammar) -> set[int]:
    mask = fill_token_masks(compiler, [grammar], VOCAB_SIZE)[0]
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:VOCAB_SIZE].nonzero().flatten().tolist())


def _matcher(grammar: SequenceGrammar) -> llguidance.LLMatcher:
    matcher = grammar.matcher()
    assert matcher is not None, grammar.failure
    return matcher


def _tokens_of(compiler: GrammarCompiler, text: str) -> list[int]:
    return list(compiler.tokenizer.tokenize_str(text))


def test_parallel_accept_equals_one_token_at_a_time(compiler: GrammarCompiler) -> None:
    texts = list(CHOICES)
    tokens = [_tokens_of(compiler, text) for text in texts]
    together = [compiler.start(_choice(), seq_id) for seq_id in range(len(texts))]
    alone = [compiler.start(_choice(), seq_id) for seq_id in range(len(texts))]
    for position in range(max(map(len, tokens))):
        accepted = [(grammar, ids[position]) for grammar, ids in zip(together, tokens, strict=True)
                    if position < len(ids)]
        accept_tokens(compiler, accepted)
        for grammar, ids in zip(alone, tokens, strict=True):
            if position < len(ids):
                grammar.accept(ids[position])
        for batched, single in zip(together, alone, strict=True):
            assert _allowed(compiler, batched) == _allowed(compiler, single)
    assert all(_matcher(grammar).is_accepting() for grammar in together)


def test_a_row_without_a_grammar_allows_every_token_beside_constrained_rows(compiler: GrammarCompiler) -> None:
    grammar = compiler.start(_choice(), 0)
    masks = fill_token_masks(compiler, [None, grammar, None], VOCAB_SIZE)
    assert masks.shape == (3, VOCAB_SIZE // 32)
    assert bool((masks[[0, 2]] == -1).all())
    assert torch.equal(masks[1], fill_token_masks(compiler, [grammar], VOCAB_SIZE)[0])
    assert 0 < len(_allowed(compiler, grammar)) < VOCAB_SIZE


def test_masks_fill_a_buffer_given_to_them_every_word_of_it(compiler: GrammarCompiler) -> None:
    grammar = compiler.start(_choice(), 0)
    buffer = torch.full((2, VOCAB_SIZE // 32), 12345, dtype=torch.int32)
    filled = fill_token_masks(compiler, [grammar, None], VOCAB_SIZE, out=buffer)
    assert filled is buffer
    assert torch.equal(buffer, fill_token_masks(compiler, [grammar, None], VOCAB_SIZE))
    with pytest.raises(ValueError, match=r"out must be a contiguous \[1, 1000\] int32 tensor"):
        fill_token_masks(compiler, [grammar], VOCAB_SIZE, out=buffer)


def test_tokens_wait_for_a_compilation_still_running(compiler: GrammarCompiler) -> None:
    compiled: Future[llguidance.LLMatcher] = Future()
    grammar = SequenceGrammar(compiled, seq_id=0)
    ids = _tokens_of(compiler, "green pear")
    accept_tokens(compiler, [(grammar, ids[0])])
    compiled.set_result(_matcher(compiler.start(_choice(), seq_id=1)).deep_copy())
    accept_tokens(compiler, [(grammar, token_id) for token_id in ids[1:2]])
    for token_id in ids[2:]:
        grammar.accept(token_id)
    assert _matcher(grammar).is_accepting()
    assert not _matcher(grammar).is_error()


def test_a_refused_token_is_logged_and_leaves_only_end_of_sequence(compiler: GrammarCompiler) -> None:
    grammar = compiler.start(_choice(), seq_id=0)
    refused = _tokens_of(compiler, "purple")[0]
    assert refused not in _allowed(compiler, grammar)
    with capture_logs() as logs:
        accept_tokens(compiler, [(grammar, refused)])
    assert [entry["token_id"] for entry in logs if entry["event"] == "grammar_refused_token"] == [refused]
    assert _allowed(compiler, grammar) == set(compiler.tokenizer.eos_tokens)


def _eos_only(compiler: GrammarCompiler) -> torch.Tensor:
    mask = torch.zeros(-(-VOCAB_SIZE // 32), dtype=torch.int32)
    for token_id in compiler.tokenizer.eos_tokens:
        mask[token_id // 32] |= 1 << (token_id % 32)
    return mask


def _failures(logs: list[MutableMapping[str, Any]]) -> list[tuple[object, object]]:
    return [(entry["seq_id"], entry["error"]) for entry in logs if entry["event"] == "grammar_compile_failed"]


def test_a_constraint_the_worker_cannot_compile_fails_its_sequence_alone(compiler: GrammarCompiler) -> None:
    # A special token the frontend's tokenizer may have and this one (Llama 2's) has not.
    unknown = StructuredOutput(ConstraintKind.GRAMMAR, 'start: "yes" <|marker|>')
    good, bad = compiler.start(_choice(), seq_id=1), compiler.start(unknown, seq_id=2)
    with capture_logs() as logs:
        masks = fill_token_masks(compiler, [good, bad, bad], VOCAB_SIZE)
        fill_token_masks(compiler, [bad], VOCAB_SIZE)
        accept_tokens(compiler, [(bad, 5)])
        sibling = bad.fork(seq_id=3)
    eos_only = _eos_only(compiler)
    assert bad.failure is not None and bad.failure.field == "structured_output.grammar"
    assert bad.failure.message.startswith("cannot be compiled: ") and 'unknown special token: "<|marker|>"' in (
        bad.failure.message)
    assert _failures(logs) == [(2, f"structured_output.grammar: {bad.failure.message}")]  # once, however often asked
    assert torch.equal(masks[1], eos_only) and torch.equal(masks[2], eos_only)
    assert torch.equal(masks[0], fill_token_masks(compiler, [compiler.start(_choice(), 4)], VOCAB_SIZE)[0])
    assert (sibling.failure, sibling.matcher()) == (bad.failure, None)


def test_a_failed_compilation_is_tried_again_by_the_next_sequence(compiler: GrammarCompiler) -> None:
    unknown = StructuredOutput(ConstraintKind.GRAMMAR, 'start: "no" <|other|>')
    first = compiler.start(unknown, seq_id=1)
    assert first.matcher() is None
    second = compiler.start(unknown, seq_id=2)
    assert second._compiled is not first._compiled  # a new compilation, not the cached failure


class _Uncopyable:
    def deep_copy(self) -> llguidance.LLMatcher:
        raise MemoryError("matcher copy")


def test_a_matcher_that_cannot_be_copied_fails_its_sequence_with_the_reason(compiler: GrammarCompiler) -> None:
    compiled: Future[llguidance.LLMatcher] = Future()
    compiled.set_result(cast(llguidance.LLMatcher, _Uncopyable()))
    grammar = SequenceGrammar(compiled, seq_id=7)
    with capture_logs() as logs:
        mask = fill_token_masks(compiler, [grammar], VOCAB_SIZE)[0]
    message = "no matcher can be created for it on the worker: MemoryError: matcher copy"
    assert grammar.failure == SequenceFailure("structured_output", message)
    assert _failures(logs) == [(7, f"structured_output: {message}")]
    assert torch.equal(mask, _eos_only(compiler))
