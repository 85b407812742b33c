"""A grammar whose mask allowed one token takes it, and computes the mask after it, before the device's sample comes
back: the masks and tokens are those of feeding every token as it comes, a sampled token other than the predicted one
(which the sampler cannot choose) steps the matcher back and is said in the log, and a failure on the way fails the
rows' sequences, never a step or the worker."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import numpy as np
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
from pagedserve.gpu_worker.mask_lookahead import Forced, forced_rows, forced_token, samples, take_ahead
from pagedserve.gpu_worker.model_runner import MaskedRows
from pagedserve.gpu_worker.sampler import Sampler, SamplingRow
from tests.gpu_worker.harness import STORIES_DIR, load_worker
from tests.gpu_worker.test_overlapped_steps import BLOCK_SIZE, _run_one_at_a_time, _run_two_in_flight, _steps, _tokens

VOCAB_SIZE = 32000
WORDS = VOCAB_SIZE // 32
ONCE = StructuredOutput(ConstraintKind.CHOICE, choices=("Once upon a time", "One day, a little girl"))


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The log lines of the worker and its grammars: their loggers are made anew, since a process-wide configuration
    that caches loggers (a server started in this process earlier) keeps used ones from reaching capture_logs."""
    for module in (grammar_module, worker_module):
        monkeypatch.setattr(module, "log", structlog.get_logger())
    with capture_logs() as captured:
        yield captured


@pytest.fixture(scope="module")
def compiler(llama2_tokenizer_dir: Path) -> GrammarCompiler:
    built = GrammarCompiler.for_model(llama2_tokenizer_dir, VOCAB_SIZE)
    assert built is not None
    return built


def _row_allowing(*token_ids: int) -> np.ndarray:
    words = np.zeros(WORDS, dtype=np.uint32)
    for token_id in token_ids:
        words[token_id // 32] |= np.uint32(1 << (token_id % 32))
    return words


@pytest.mark.parametrize(("allowed", "expected"), [
    ((), None), ((0,), 0), ((31,), 31), ((32,), 32), ((31999,), 31999), ((4097,), 4097),
    ((5, 6), None), ((5, 64), None), ((31, 31999), None),
])
def test_a_forced_token_is_the_one_bit_of_its_mask(allowed: tuple[int, ...], expected: int | None) -> None:
    assert forced_token(_row_allowing(*allowed)) == expected


def test_a_row_samples_its_forced_token_unless_its_allowed_ids_bans_or_bad_words_exclude_it() -> None:
    def row(params: SamplingParams, outputs: list[int], banned: tuple[int, ...] = (),
            bad_words: tuple[tuple[int, ...], ...] = ()) -> SamplingRow:
        return SamplingRow.of(params, banned, [1, 2], outputs, bad_words_token_ids=bad_words)

    assert samples(row(SamplingParams(temperature=0.8, top_k=1, top_p=0.1, logit_bias={7: -100.0}), []), 7)
    assert samples(row(SamplingParams(allowed_token_ids=(7, 9)), []), 7)
    assert not samples(row(SamplingParams(allowed_token_ids=(9,)), []), 7)
    assert not samples(row(SamplingParams(min_tokens=2), [5], banned=(7,)), 7)
    assert samples(row(SamplingParams(min_tokens=2), [5, 6], banned=(7,)), 7)
    assert not samples(row(SamplingParams(), [], bad_words=((3, 7),)), 7)


def _schema_outputs() -> list[StructuredOutput]:
    return [StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema), disable_any_whitespace=True)
            for schema in list(SCHEMAS.values())[:12]]


def _allowed(mask: torch.Tensor) -> list[int]:
    bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:VOCAB_SIZE]
    return [int(token_id) for token_id in np.flatnonzero(bits)]


def _take_ahead(compiler: GrammarCompiler, grammars: list[SequenceGrammar], masks: torch.Tensor) -> int:
    """The worker's look-ahead over greedy rows of these grammars; how many took their token."""
    rows = [SamplingRow.of(SamplingParams(temperature=0.0), (), [1], [], grammar=grammar) for grammar in grammars]
    forced = forced_rows(compiler, rows, masks)
    take_ahead(compiler, forced)
    return len(forced)


def _once_forced(compiler: GrammarCompiler, seq_id: int) -> tuple[SequenceGrammar, torch.Tensor, int]:
    """A grammar of ONCE after "Once", whose mask allows one token: the grammar, that mask, the token."""
    grammar = compiler.start(ONCE, seq_id)
    grammar.accept(compiler.tokenizer.tokenize_str("Once")[0])
    masks = fill_token_masks(compiler, [grammar], VOCAB_SIZE)
    forced = forced_token(masks[0].numpy().view(np.uint32))
    assert forced is not None
    return grammar, masks, forced


def test_masks_computed_ahead_are_those_of_feeding_each_token_as_it_comes(compiler: GrammarCompiler) -> None:
    """Twelve JSON schemas walked side by side, a random allowed token a row and step, in two copies: one feeds each
    step's tokens as they come, the other first takes every forced token ahead."""
    outputs = _schema_outputs()
    plain = [compiler.start(output, seq_id) for seq_id, output in enumerate(outputs)]
    ahead = [compiler.start(output, seq_id) for seq_id, output in enumerate(outputs)]
    rng = random.Random(0)
    num_predicted = 0
    for _ in range(40):
        expected = fill_token_masks(compiler, plain, VOCAB_SIZE)
        masks = fill_token_masks(compiler, ahead, VOCAB_SIZE)
        assert torch.equal(masks, expected)
        tokens = [rng.choice(_allowed(row)) for row in expected]
        num_predicted += _take_ahead(compiler, ahead, masks)
        accept_tokens(compiler, list(zip(plain, tokens, strict=True)))
        accept_tokens(compiler, list(zip(ahead, tokens, strict=True)))
    assert num_predicted >= 40  # a key's closing quote, a colon: a third of a schema's masks or so


def test_a_sampled_token_other_than_the_predicted_one_steps_the_matcher_back(
        compiler: GrammarCompiler, logs: list[MutableMapping[str, Any]]) -> None:
    ahead, masks, forced = _once_forced(compiler, 1)
    plain = compiler.start(ONCE, 0)
    plain.accept(compiler.tokenizer.tokenize_str("Once")[0])
    assert _take_ahead(compiler, [ahead], masks) == 1
    other = next(token for token in range(3, VOCAB_SIZE) if token != forced)
    ahead.accept(other)
    assert [entry["event"] for entry in logs] == ["grammar_lookahead_missed", "grammar_refused_token"]
    assert logs[0]["predicted"] == forced and logs[0]["sampled"] == other
    plain.accept(other)
    assert torch.equal(fill_token_masks(compiler, [ahead], VOCAB_SIZE), fill_token_masks(compiler, [plain], VOCAB_SIZE))


def test_a_row_left_without_a_token_steps_back_what_it_took_ahead(compiler: GrammarCompiler,
                                                                   logs: list[MutableMapping[str, Any]]) -> None:
    grammar, before, _ = _once_forced(compiler, 0)
    _take_ahead(compiler, [grammar], before)
    assert not grammar.settle(None)
    assert [entry["event"] for entry in logs] == ["grammar_lookahead_missed"]
    assert torch.equal(fill_token_masks(compiler, [grammar], VOCAB_SIZE), before)


def test_a_mask_asked_for_before_the_token_taken_ahead_is_settled_fails_that_sequence_alone(
        compiler: GrammarCompiler) -> None:
    grammar, masks, _ = _once_forced(compiler, 3)
    other = compiler.start(ONCE, 4)
    _take_ahead(compiler, [grammar], masks)
    filled = fill_token_masks(compiler, [grammar, other], VOCAB_SIZE)
    assert grammar.failure is not None and "a mask was asked for before the token" in grammar.failure.message
    assert _allowed(filled[0]) == sorted(compiler.tokenizer.eos_tokens)
    assert torch.equal(filled[1], fill_token_masks(compiler, [compiler.start(ONCE, 5)], VOCAB_SIZE)[0])


def test_a_grammar_that_took_a_token_ahead_is_never_forked(compiler: GrammarCompiler) -> None:
    """Siblings are forked when their parent is added, before any of its samples; a fork after one would copy a
    matcher that is a token ahead of its outputs."""
    grammar, masks, _ = _once_forced(compiler, 0)
    _take_ahead(compiler, [grammar], masks)
    with pytest.raises(RuntimeError, match="sequence 0: cannot fork a grammar that took a token ahead"):
        grammar.fork(1)


@pytest.mark.parametrize("seed", range(6))
def test_a_row_that_samples_its_forced_token_by_samples_does_so_in_the_sampler(seed: int) -> None:
    """samples() against the CPU sampler itself: rows of random temperatures, filters, penalties, biases, seeds,
    allowed ids and min-tokens bans, each with a mask of one random token."""
    vocab_size, rng = 40, random.Random(seed)
    grammar = cast(SequenceGrammar, object())  # stands for a grammar whose masks are computed ahead
    rows, forced = [], []
    for _ in range(64):
        token_id = rng.randrange(vocab_size)
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.3, 1.0, 1.7]), top_k=rng.choice([0, 1, 3]), top_p=rng.choice([1.0, 0.2]),
            min_p=rng.choice([0.0, 0.6]), repetition_penalty=rng.choice([1.0, 1.8]),
            frequency_penalty=rng.choice([0.0, 1.5]), presence_penalty=rng.choice([0.0, -1.0]),
            logit_bias=rng.choice([{}, {token_id: -100.0}, {token_id: 100.0}]), seed=rng.choice([None, 7]),
            allowed_token_ids=rng.choice([(), (token_id, 1), (2, 3)]), min_tokens=rng.choice([0, 3]))
        outputs = [rng.randrange(vocab_size) for _ in range(rng.randrange(5))] + [token_id]
        rows.append(SamplingRow.of(params, (token_id,), [1, 2], outputs, grammar=grammar))
        forced.append(token_id)
    masks = torch.from_numpy(np.stack([_row_allowing(token_id)[:2] for token_id in forced]).view(np.int32))
    logits = torch.randn(len(rows), vocab_size, generator=torch.Generator().manual_seed(seed))
    result = Sampler(vocab_size, torch.device("cpu")).start(logits, rows, masks).result()
    predicted = [index for index, (row, token_id) in enumerate(zip(rows, forced, strict=True))
                 if samples(row, token_id)]
    assert len(predicted) >= 10
    assert [result.token_ids[index] for index in predicted] == [forced[index] for index in predicted]
    assert not set(predicted) & result.no_choice


@pytest.mark.parametrize("options", [
    pytest.param(SamplingParams(temperature=0.0, structured_output=ONCE), id="greedy"),
    pytest.param(SamplingParams(temperature=0.9, seed=5, structured_output=ONCE), id="seeded"),
])
def test_the_worker_s_tokens_are_those_of_a_worker_that_never_looks_ahead(
        options: SamplingParams, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]) -> None:
    steps = _steps(options, num_decodes=6, fork_seq_ids=(2,))
    taken: list[int] = []

    def counted(compiler: GrammarCompiler, forced: list[Forced]) -> None:
        taken.append(len(forced))
        take_ahead(compiler, forced)

    monkeypatch.setattr(worker_module, "take_ahead", counted)
    results = _run_two_in_flight(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    assert sum(taken) >= 3  # "Once" forces " upon", " a", " time"
    assert not {"grammar_lookahead_missed", "grammar_refused_token"} & {entry["event"] for entry in logs}
    monkeypatch.setattr(worker_module, "forced_rows", lambda *_: [])
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    for seq_id in (1, 2):
        assert _tokens(results, seq_id) == _tokens(expected, seq_id)


def test_a_step_whose_tokens_were_read_first_takes_nothing_ahead() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    compiler = worker.registry.grammars
    assert compiler is not None
    steps = _steps(SamplingParams(temperature=0.0, structured_output=ONCE), num_decodes=1)
    first = worker.launch(steps[0])
    worker.finish(first)
    grammar = worker.registry.states[1].grammar
    assert grammar is not None
    masks = fill_token_masks(compiler, [grammar], compiler.tokenizer.vocab_size)
    forced = forced_token(masks[0].numpy().view(np.uint32))
    assert forced is not None  # "Once" or "One": either forces its next token
    masked = MaskedRows([SamplingRow.of(SamplingParams(temperature=0.0), (), [1], [], grammar=grammar)], masks)
    assert first.is_resolved
    worker._look_ahead(first, masked)
    assert not grammar.settle(forced)  # nothing was taken
    first.is_resolved = False  # as if the tokens were still on their way
    worker._look_ahead(first, masked)
    assert grammar.settle(forced)


def test_a_failure_taking_tokens_ahead_fails_those_sequences_and_not_the_step(
        monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("matcher pool down")

    monkeypatch.setattr(worker_module, "take_ahead", broken)
    steps = _steps(SamplingParams(temperature=0.0, structured_output=ONCE), num_decodes=2)
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    results = _run_one_at_a_time(worker, steps)
    assert "grammar_lookahead_failed" in [entry["event"] for entry in logs]
    failures = [output.failure for result in results[1:] for output in result.outputs]
    assert all(failure is not None and "lost its grammar state: RuntimeError: matcher pool down" in failure.message
               for failure in failures)
    grammar = worker.registry.states[1].grammar
    assert isinstance(grammar, SequenceGrammar) and grammar.failure is not None
