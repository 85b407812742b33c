"""The worker's grammar state: tokens advance matchers in parallel exactly as one by one, a compilation still
running keeps its tokens, and a refused token is logged and leaves only end-of-sequence allowed."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import llguidance
import pytest
import torch
from structlog.testing import capture_logs

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


def _tokens_of(compiler: GrammarCompiler, text: str) -> list[int]:
    return list(compiler.tokenizer.tokenize_str(text))


def test_parallel_accept_equals_one_token_at_a_time(compiler: GrammarCompiler) -> None:
    texts = list(CHOICES)
    tokens = [_tokens_of(compiler, text) for text in texts]
    together = [compiler.start(_choice()) for _ in texts]
    alone = [compiler.start(_choice()) for _ in texts]
    for position in range(max(map(len, tokens))):
        accepted = [(grammar, ids[position]) for grammar, ids in zip(together, tokens, strict=True)
                    if position < len(ids)]
        accept_tokens(compiler, accepted)
        for grammar, ids in zip(alone, tokens, strict=True):
            if position < len(ids):
                grammar.accept(ids[position])
        for batched, single in zip(together, alone, strict=True):
            assert _allowed(compiler, batched) == _allowed(compiler, single)
    assert all(grammar.matcher().is_accepting() for grammar in together)


def test_tokens_wait_for_a_compilation_still_running(compiler: GrammarCompiler) -> None:
    compiled: Future[llguidance.LLMatcher] = Future()
    grammar = SequenceGrammar(compiled)
    ids = _tokens_of(compiler, "green pear")
    accept_tokens(compiler, [(grammar, ids[0])])
    compiled.set_result(compiler.start(_choice()).matcher().deep_copy())
    accept_tokens(compiler, [(grammar, token_id) for token_id in ids[1:2]])
    for token_id in ids[2:]:
        grammar.accept(token_id)
    assert grammar.matcher().is_accepting()
    assert not grammar.matcher().is_error()


def test_a_refused_token_is_logged_and_leaves_only_end_of_sequence(compiler: GrammarCompiler) -> None:
    grammar = compiler.start(_choice())
    refused = _tokens_of(compiler, "purple")[0]
    assert refused not in _allowed(compiler, grammar)
    with capture_logs() as logs:
        accept_tokens(compiler, [(grammar, refused)])
    assert [entry["token_id"] for entry in logs if entry["event"] == "grammar_refused_token"] == [refused]
    assert _allowed(compiler, grammar) == set(compiler.tokenizer.eos_tokens)
