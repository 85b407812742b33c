"""A sequence's next token mask, computed before its token is back from the device when its grammar allowed only one.

A row whose mask allows a single token samples that token whatever its logits: the mask sets every other logit to
-inf, and of the rest of a row's sampling only allowed_token_ids, the min-tokens bans and bad words can exclude a
token (biases are finite; penalties and temperature keep logits finite; top-k, top-p and min-p keep the most likely
token), which `samples` checks. A third of a JSON schema's masks are such (a key's closing quote, a colon: about
35 % of rows, 23 % of the fill's time, in benchmarks.mask_batch's walk). For those rows the worker's masks thread,
once it has queued a step's sampling, feeds each grammar its token and computes its next mask while the next launch
does its host work, instead of after the step's tokens reach the host, on the chain that decides when the next step
can sample (docs/structured-output.md). When the tokens come, each predicted grammar only checks its token
(SequenceGrammar.settle) and the next fill copies its mask.

Only rows that will sample again gain; a forced end-of-sequence token is not taken ahead (its sequence ends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import llguidance
import llguidance.numpy
import numpy as np
import torch

from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar
from pagedserve.gpu_worker.sampler import SamplingRow
from pagedserve.kernels.token_masks import mask_words


def forced_token(words: np.ndarray) -> int | None:
    """The one token a bitmask row (uint32 words, bit t of word t // 32: token t allowed) allows; None when it allows
    none or several."""
    if np.count_nonzero(words) != 1:
        return None
    index = int(words.argmax())
    word = int(words[index])
    return None if word & (word - 1) else index * 32 + word.bit_length() - 1


def samples(row: SamplingRow, token_id: int) -> bool:
    """Whether the row, its mask allowing token_id alone, samples it: nothing but its grammar excludes it."""
    params = row.params
    if params.allowed_token_ids and token_id not in params.allowed_token_ids:
        return False
    if len(row.output_token_ids) < params.min_tokens and token_id in row.banned_token_ids:
        return False
    return not row.bad_words_token_ids


class Forced(NamedTuple):
    """A grammar row whose mask allowed one token, which it samples."""

    grammar: SequenceGrammar
    matcher: llguidance.LLMatcher
    token_id: int


def forced_rows(compiler: GrammarCompiler, rows: Sequence[SamplingRow], masks: torch.Tensor) -> list[Forced]:
    """The grammar rows of a queued sampling (masks: the [rows, words] int32 host masks it samples under) whose mask
    allows one token that the row samples, each grammar once; an end-of-sequence token is left out (its sequence
    ends)."""
    words = masks.numpy().view(np.uint32)
    eos_tokens = set(compiler.tokenizer.eos_tokens)
    forced: list[Forced] = []
    seen: set[int] = set()
    for index, row in enumerate(rows):
        grammar = row.grammar
        if grammar is None or id(grammar) in seen:
            continue
        seen.add(id(grammar))  # the first sample of n > 1 lists the parent's grammar once a sibling
        matcher = grammar.compiled_matcher()
        if matcher is None or matcher.is_error():
            continue
        token_id = forced_token(words[index])
        if token_id is not None and token_id not in eos_tokens and samples(row, token_id):
            forced.append(Forced(grammar, matcher, token_id))
    return forced


def take_ahead(compiler: GrammarCompiler, forced: Sequence[Forced]) -> None:
    """Feeds each forced row's grammar its token and computes the mask after it, on llguidance's threads, and records
    both (SequenceGrammar.predict). Call before the step's tokens are fed to the grammars (they then settle the
    predictions)."""
    if not forced:
        return
    taken = llguidance.numpy.consume_token_par(compiler.executor, [(row.matcher, row.token_id) for row in forced])
    next_masks = np.empty((len(forced), mask_words(compiler.tokenizer.vocab_size)), dtype=np.int32)
    live = [(row.matcher, index) for index, (row, is_taken) in enumerate(zip(forced, taken, strict=True)) if is_taken]
    if live:
        llguidance.numpy.fill_next_token_bitmask_par(compiler.executor, live, next_masks)
    for index, (row, is_taken) in enumerate(zip(forced, taken, strict=True)):
        row.grammar.predict(row.token_id, next_masks[index] if is_taken else None)
