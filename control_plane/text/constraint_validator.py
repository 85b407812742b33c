"""Checks that a request's output constraint compiles for the model's vocabulary, before anything is allocated."""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.text.tokenizer import Tokenizer

MAX_REMEMBERED = 4096  # constraints already found good (a repeated schema is not checked again)


class ConstraintValidator:
    """Asks the worker's grammar engine (llguidance, with the same tokenizer) whether a constraint compiles.

    A check parses the constraint and validates its grammar against the vocabulary (well under a millisecond for
    the JSON schemas of the tests, llama2's 32,000 tokens): the same steps as the worker's compilation, without
    building the matcher. Thread-safe; run it off the event loop, where it releases the interpreter lock.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend_json, n_vocab=vocab_size)
        self._lock = threading.Lock()
        self._known_good: OrderedDict[tuple[object, ...], None] = OrderedDict()

    def check(self, params: SamplingParams) -> None:
        """InvalidArgumentError naming structured_output and the engine's reason unless its constraint compiles."""
        output = params.structured_output
        if output is None:
            return
        key = output.cache_key
        with self._lock:
            if key in self._known_good:
                self._known_good.move_to_end(key)
                return
        output.checked_grammar(self._tokenizer)  # raises InvalidArgumentError
        with self._lock:
            self._known_good[key] = None
            if len(self._known_good) > MAX_REMEMBERED:
                self._known_good.popitem(last=False)
