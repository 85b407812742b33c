"""Structured output on the worker: constraints compiled off the step thread and cached, one grammar matcher per
sequence fed every token it samples, and the batch's token masks computed in parallel on the host."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import llguidance.numpy
import numpy as np
import structlog
import torch

from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.step import SequenceFailure
from pagedserve.contract.structured_output import FIELD, StructuredOutput
from pagedserve.gpu_worker.token_slices import TOKEN_SLICES
from pagedserve.kernels.token_masks import mask_words

log = structlog.get_logger()
COMPILE_THREADS = 2  # compilation releases the interpreter lock, so it runs beside the step thread
MAX_MATCHER_THREADS = 16  # llguidance's own pool: a batch's masks and token advances, without the interpreter lock
MAX_CACHED_GRAMMARS = 1024


def matcher_threads() -> int:
    """Threads for a batch's masks: the cores this process may run on, up to MAX_MATCHER_THREADS. A batch of 64
    constrained rows at about 0.1 ms per mask (more inside long free strings) must finish within one forward
    pass, which is what keeps the step pipeline from stalling (docs/structured-output.md)."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_MATCHER_THREADS))


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary on a thread pool, cached by constraint (the tokenizer is
    the worker's one), so a grammar compiles while its prompt is prefilled and once for every request that
    repeats it.

    A compiled grammar is a matcher in its start state; each sequence takes a copy (llguidance's deep_copy shares
    the compiled lexer and parser tables).
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[object, ...], Future[llguidance.LLMatcher]] = OrderedDict()
        self.executor = llguidance.LLExecutor(matcher_threads())

    @classmethod
    def for_model(cls, model_dir: Path, vocab_size: int) -> GrammarCompiler | None:
        """The compiler for the tokenizer.json in model_dir, whose ids run to vocab_size (the model's, padding
        included); None when the directory has no tokenizer."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        return cls(llguidance.LLTokenizer(str(path), n_vocab=vocab_size, slices=TOKEN_SLICES))

    def start(self, output: StructuredOutput, seq_id: int) -> SequenceGrammar:
        """Sequence seq_id's grammar, its compilation started now (or found in the cache); nothing waits for it here.
        A compilation that failed is not kept: the next sequence with that constraint tries again."""
        key = output.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self._compile, output)
                self._cache[key] = future
                if len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return SequenceGrammar(future, seq_id)

    def _compile(self, output: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, output.checked_grammar(self.tokenizer), log_level=0)
        if matcher.is_error():
            raise InvalidArgumentError(f"{FIELD}.{output.kind.value}", f"cannot be compiled: {matcher.get_error()}")
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """The grammar state of one sequence: the tokens it accepted so far, in order.

    Tokens are accepted as they reach the host (the compiled grammar may still be on its way: they are kept
    and fed to the matcher when it first exists). A token the grammar refused (it can only come from a request
    that keeps generating past the grammar's end, with ignore_eos) leaves the matcher stopped; its masks then
    allow the end-of-sequence tokens alone, so the output can only run on to max_tokens.

    A sequence whose matcher cannot be had (the compilation failed, or its copy did) has a `failure` instead, said
    once in the log (`grammar_compile_failed`; for n > 1 siblings, by the sequence that forked them); its masks also
    allow end-of-sequence alone, and its outputs carry the failure rather than a token, so that its request ends with
    it while the other rows of its steps go on.
    """

    def __init__(self, compiled: Future[llguidance.LLMatcher], seq_id: int) -> None:
        self._compiled = compiled
        self.seq_id = seq_id
        self._matcher: llguidance.LLMatcher | None = None
        self._waiting: list[int] = []  # accepted before the matcher existed
        self.failure: SequenceFailure | None = None  # why this sequence has no matcher; set at most once
        # False for a sibling forked before its compilation ended: the failure they share is its parent's to report.
        self._reports_compile_failure = True

    def accept(self, token_id: int) -> None:
        if self.failure is not None:
            return
        if self._matcher is None:
            self._waiting.append(token_id)
        elif not self._matcher.is_error() and not self._matcher.consume_token(token_id):
            _log_refusal(self._matcher, token_id)

    def compiled_matcher(self) -> llguidance.LLMatcher | None:
        """The matcher if the compilation is done (it is then brought up to date), else None; never waits. None
        too for a sequence that has no matcher (`failure`)."""
        if self._matcher is None and not self._compiled.done():
            return None
        return self.matcher()

    def matcher(self) -> llguidance.LLMatcher | None:
        """The matcher after every accepted token, waiting for the compilation if it is still running; None when the
        sequence can have none (`failure` says why)."""
        if self._matcher is None and self.failure is None:
            try:
                compiled = self._compiled.result()
            except InvalidArgumentError as error:  # the engine's refusal, said as the frontend would have said it
                self._fail(SequenceFailure(error.field, error.message), self._reports_compile_failure)
                return None
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                self._fail(SequenceFailure(FIELD, f"cannot be compiled on the worker: {reason}"),
                           self._reports_compile_failure)
                return None
            self._matcher = self._copy(compiled)
            if self._matcher is not None:
                self._matcher.consume_tokens(self._waiting)
                self._waiting = []
        return self._matcher

    def fork(self, seq_id: int) -> SequenceGrammar:
        """A copy with the same accepted tokens, for sibling seq_id of an n > 1 request."""
        sibling = SequenceGrammar(self._compiled, seq_id)
        if self.failure is not None:
            sibling.failure = self.failure
        elif self._matcher is None:
            sibling._waiting = list(self._waiting)
            sibling._reports_compile_failure = False
        else:
            sibling._matcher = sibling._copy(self._matcher)
        return sibling

    def _copy(self, matcher: llguidance.LLMatcher) -> llguidance.LLMatcher | None:
        try:
            return matcher.deep_copy()
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            self._fail(SequenceFailure(FIELD, f"no matcher can be created for it on the worker: {reason}"))
            return None

    def _fail(self, failure: SequenceFailure, is_reported: bool = True) -> None:
        self.failure = failure
        if is_reported:
            log.warning("grammar_compile_failed", seq_id=self.seq_id, error=f"{failure.field}: {failure.message}")


def accept_tokens(compiler: GrammarCompiler, accepted: list[tuple[SequenceGrammar, int]]) -> None:
    """Feeds each grammar its next token (each grammar listed once). Grammars whose matcher exists advance on
    llguidance's threads in parallel; the others keep the token for when their compilation is done."""
    live = []
    for grammar, token_id in accepted:
        matcher = grammar.compiled_matcher()
        if matcher is None:
            grammar.accept(token_id)
        elif not matcher.is_error():
            live.append((matcher, token_id))
    if not live:
        return
    for (matcher, token_id), is_accepted in zip(
            live, llguidance.numpy.consume_token_par(compiler.executor, live), strict=True):
        if not is_accepted:
            _log_refusal(matcher, token_id)


def _log_refusal(matcher: llguidance.LLMatcher, token_id: int) -> None:
    """A token the grammar refused stops its matcher (masks then allow only end-of-sequence): said once, here."""
    log.warning("grammar_refused_token", token_id=token_id, reason=matcher.get_error())


def fill_token_masks(compiler: GrammarCompiler, grammars: Sequence[SequenceGrammar | None], vocab_size: int,
                     pin_memory: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """[len(grammars), ceil(vocab_size / 32)] int32 bitmasks, bit t of row r set when grammar r allows token t
    next; a row without a grammar (None) allows every token. Rows are filled by llguidance's threads in parallel,
    without the interpreter lock. A grammar listed twice (the first sample of an n > 1 request, before its siblings
    fork) is computed once and copied. A grammar that stopped or has no matcher (its `failure`) allows the
    end-of-sequence tokens alone; this never raises for one sequence's grammar. pin_memory: in page-locked memory,
    which a GPU copies from without staging it first. out: a contiguous host tensor of that shape to fill instead of
    a new one.

    The host work is numpy's and llguidance's, not torch's: a torch fill of a batch's masks (over 32K words) runs on
    torch's OpenMP threads, which spin for milliseconds after it and so take the cores that llguidance's threads and
    the worker's own threads need at every step."""
    shape = (len(grammars), mask_words(vocab_size))
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.int32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {list(shape)} int32 tensor, got {tuple(out.shape)} {out.dtype}")
    masks = out if out is not None else torch.empty(shape, dtype=torch.int32, pin_memory=pin_memory)
    array = masks.numpy()
    array.fill(-1)
    words = array.view(np.uint32)
    live = []
    first_row: dict[int, int] = {}
    copies = []
    for row, grammar in enumerate(grammars):
        if grammar is None:
            continue
        if id(grammar) in first_row:
            copies.append((row, first_row[id(grammar)]))
            continue
        first_row[id(grammar)] = row
        matcher = grammar.matcher()
        if matcher is not None and not matcher.is_error():
            live.append((matcher, row))
            continue
        words[row] = 0
        for token_id in compiler.tokenizer.eos_tokens:
            words[row, token_id // 32] |= np.uint32(1 << (token_id % 32))
    if live:
        llguidance.numpy.fill_next_token_bitmask_par(compiler.executor, live, array)
    for row, source in copies:
        array[row] = array[source]
    return masks
