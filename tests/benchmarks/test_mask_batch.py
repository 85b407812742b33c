"""The mask-batch benchmark: every way of filling a batch's masks fills the same masks, step by step."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llguidance

from benchmarks.json_schemas import SCHEMAS
from benchmarks.mask_batch import SLICES, pool_fill, threads_fill, walk
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput


def test_serial_pool_and_threads_fill_the_same_masks(llama2_tokenizer_dir: Path) -> None:
    vocab_size = 32000
    tokenizer = llguidance.LLTokenizer(str(llama2_tokenizer_dir / "tokenizer.json"), n_vocab=vocab_size)
    schemas = [SCHEMAS[name] for name in ("contact", "user")]
    grammars = [StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema)).checked_grammar(tokenizer)
                for schema in schemas]
    compiled = [[llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(2)] for grammar in grammars]
    with ThreadPoolExecutor(2) as threads:
        runs = [walk(compiled, batch=5, steps=12, vocab_size=vocab_size, seed=3, fill=fill)
                for fill in (None, pool_fill(llguidance.LLExecutor(2)), threads_fill(threads, 2))]
    assert len({run["masks_sha256"] for run in runs}) == 1
    assert all(len(run["wall_s"]) == len(run["cpu_s"]) == 12 for run in runs)
    assert len(runs[0]["slowest_row_s"]) == 12 and runs[1]["slowest_row_s"] == runs[2]["slowest_row_s"] == []


def test_every_slice_set_fills_the_same_masks(llama2_tokenizer_dir: Path) -> None:
    vocab_size = 32000
    schema = json.dumps(SCHEMAS["contact"])  # bounded strings: their last bytes are where the sets differ
    digests = set()
    for slices in SLICES.values():
        tokenizer = llguidance.LLTokenizer(str(llama2_tokenizer_dir / "tokenizer.json"), n_vocab=vocab_size,
                                           slices=slices)
        grammar = StructuredOutput(ConstraintKind.JSON_SCHEMA, schema).checked_grammar(tokenizer)
        compiled = [[llguidance.LLMatcher(tokenizer, grammar, log_level=0)]]
        digests.add(walk(compiled, batch=4, steps=40, vocab_size=vocab_size, seed=5, fill=None)["masks_sha256"])
    assert len(SLICES) == 3 and len(digests) == 1
