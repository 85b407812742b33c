"""Structured output on the worker: constraints compiled off the step thread and cached, one grammar matcher per
sequence fed every token it samples, and the batch's token masks computed in parallel on the host."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import llguidance.numpy
import numpy as np
import structlog
import torch

from pagedserve.contract.structured_output import StructuredOutput

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
        return cls(llguidance.LLTokenizer(str(path), n_vocab=vocab_size))

    def start(self, output: StructuredOutput) -> SequenceGrammar:
        """A sequence's grammar, its compilation started now (or found in the cache); nothing waits for it here."""
        key = output.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._pool.submit(self._compile, output)
                self._cache[key] = future
                if len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return SequenceGrammar(future)

    def _compile(self, output: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, output.checked_grammar(self.tokenizer), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_output: cannot be compiled: {matcher.get_error()}")
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """The grammar state of one sequence: the tokens it accepted so far, in order.

    Tokens are accepted as they reach the host (the compiled grammar may still be on its way: they are kept
    and fed to the matcher when it first exists). A token the grammar refuses (it can only come from a request
    that keeps generating past the grammar's end, with ignore_eos) leaves the matcher stopped; its masks then
    allow the end-of-sequence tokens alone, so the output can only run on to max_tokens.
    """

    def __init__(self, compiled: Future[llguidance.LLMatcher]) -> None:
        self._compiled = compiled
        self._matcher: llguidance.LLMatcher | None = None
        self._waiting: list[int] = []  # accepted before the matcher existed

    def accept(self, token_id: int) -> None:
        if self._matcher is None:
            self._waiting.append(token_id)
        elif not self._matcher.is_error() and not self._matcher.consume_token(token_id):
            _log_refusal(self._matcher, token_id)

    def compiled_matcher(self) -> llguidance.LLMatcher | None:
        """The matcher if the compilation is done (it is then brought up to date), else None; never waits. A failed
        compilation also gives None here: it is raised where the mask is needed."""
        if self._matcher is None and (not self._compiled.done() or self._compiled.exception() is not None):
            return None
        return self.matcher()

    def matcher(self) -> llguidance.LLMatcher:
        """The matcher after every accepted token, waiting for the compilation if it is still running."""
        if self._matcher is None:
            matcher = self._compiled.result().deep_copy()
            matcher.consume_tokens(self._waiting)
            self._matcher, self._waiting = matcher, []
        return self._matcher

    def fork(self) -> SequenceGrammar:
        """A copy with the same accepted tokens, for a sibling of an n > 1 request."""
        sibling = SequenceGrammar(self._compiled)
        if self._matcher is None:
            sibling._waiting = list(self._waiting)
        else:
            sibling._matcher = self._matcher.deep_copy()
        return sibling


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


def fill_token_masks(compiler: GrammarCompiler, grammars: list[SequenceGrammar], vocab_size: int) -> torch.Tensor:
    """[len(grammars), ceil(vocab_size / 32)] int32 bitmasks, bit t of row r set when grammar r allows token t
    next. Rows are filled by llguidance's threads in parallel, without the interpreter lock. A grammar listed twice
    (the first sample of an n > 1 request, before its siblings fork) is computed once and copied."""
    masks = llguidance.numpy.allocate_token_bitmask(len(grammars), vocab_size)
    words = masks.view(np.uint32)
    live = []
    first_row: dict[int, int] = {}
    copies = []
    for row, grammar in enumerate(grammars):
        if id(grammar) in first_row:
            copies.append((row, first_row[id(grammar)]))
            continue
        first_row[id(grammar)] = row
        matcher = grammar.matcher()
        if not matcher.is_error():
            live.append((matcher, row))
            continue
        words[row] = 0
        for token_id in compiler.tokenizer.eos_tokens:
            words[row, token_id // 32] |= np.uint32(1 << (token_id % 32))
    if live:
        llguidance.numpy.fill_next_token_bitmask_par(compiler.executor, live, masks)
    for row, source in copies:
        masks[row] = masks[source]
    return torch.from_numpy(masks)


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """Sets logits[rows[i], t] = -inf wherever bit t of masks[i] is clear.

    logits: [batch, vocab] float, written in place; rows: [R] int64 and masks: [R, ceil(vocab / 32)] int32, on
    logits' device. Plain tensor operations: no host round trip, and the same code on every device.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (masks.unsqueeze(-1) >> shifts) & 1  # [R, words, 32]: bit 0 of word w is token 32 w
    allowed = bits.reshape(masks.shape[0], -1)[:, : logits.shape[1]].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
