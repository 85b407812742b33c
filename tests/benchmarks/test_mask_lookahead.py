"""The mask-lookahead benchmark: a walk that takes forced tokens ahead fills the masks of one that does not, and
takes some."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.json_schemas import SCHEMAS
from benchmarks.mask_lookahead import walk
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker.grammar import GrammarCompiler


def test_a_walk_taking_forced_tokens_ahead_fills_the_masks_of_one_that_does_not(llama2_tokenizer_dir: Path) -> None:
    vocab_size = 32000
    compiler = GrammarCompiler.for_model(llama2_tokenizer_dir, vocab_size)
    assert compiler is not None
    outputs = [StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS[name]), disable_any_whitespace=True)
               for name in ("contact", "user")]
    plain, ahead = (walk(compiler, outputs, batch=5, steps=30, vocab_size=vocab_size, seed=3, ahead=is_ahead)
                    for is_ahead in (False, True))
    assert plain["masks_sha256"] == ahead["masks_sha256"]
    assert sum(ahead["taken"]) > 0
