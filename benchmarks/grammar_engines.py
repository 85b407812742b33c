"""Grammar engines measured on the same JSON schemas and tokenizers: compile time (cold p50/p99, cached), host time
of one token mask, and resident memory the compiled grammars add.

    python -m benchmarks.grammar_engines [--tokenizer DIR ...] [--steps 48]

Each engine walks every schema with a random sampler (a uniformly drawn allowed token per step, seeded), timing
each mask; both engines see the same schemas, tokenizers and number of steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import llguidance
import llguidance.numpy
import numpy as np
import torch
import xgrammar
from transformers import PreTrainedTokenizerFast

from benchmarks.json_schemas import SCHEMAS
from benchmarks.mask_batch import allowed_ids
from benchmarks.report import (
    DEFAULT_RESULT_DIR,
    markdown_report,
    markdown_table,
    result_stem,
    run_metadata,
    text_table,
    write_outputs,
)
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TOKENIZERS = (SHARED / "tokenizers" / "llama2", SHARED / "models" / "stories260K")


class Walk(Protocol):
    """One sequence's matcher under an engine: the allowed tokens now, and accepting one."""

    def allowed(self) -> np.ndarray: ...  # token ids
    def accept(self, token_id: int) -> bool: ...


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _LlguidanceWalk:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher, self._vocab_size = matcher, vocab_size
        self._mask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._mask)
        return allowed_ids(self._mask[0], self._vocab_size)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.consume_token(token_id)) and not self._matcher.is_stopped()


class _XgrammarWalk:
    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        self._matcher, self._vocab_size = matcher, vocab_size
        self._mask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> np.ndarray:
        self._matcher.fill_next_token_bitmask(self._mask)
        return allowed_ids(self._mask[0].numpy(), self._vocab_size)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id)) and not self._matcher.is_terminated()


def _llguidance_engine(tokenizer_dir: Path) -> tuple[Callable[[str], Any], Callable[[Any], Walk], int]:
    tokenizer = llguidance.LLTokenizer(str(tokenizer_dir / "tokenizer.json"))

    def compile_schema(schema: str) -> llguidance.LLMatcher:
        output = StructuredOutput(ConstraintKind.JSON_SCHEMA, schema, disable_any_whitespace=True)
        return llguidance.LLMatcher(tokenizer, output.checked_grammar(tokenizer), log_level=0)

    return compile_schema, lambda compiled: _LlguidanceWalk(compiled.deep_copy(), tokenizer.vocab_size), \
        tokenizer.vocab_size


def _xgrammar_engine(tokenizer_dir: Path, cached: xgrammar.GrammarCompiler | None = None,
                     ) -> tuple[Callable[[str], Any], Callable[[Any], Walk], int]:
    hf = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    info = xgrammar.TokenizerInfo.from_huggingface(hf)
    compiler = cached or xgrammar.GrammarCompiler(info, cache_enabled=False)
    return (lambda schema: compiler.compile_json_schema(schema, any_whitespace=False)), \
        (lambda compiled: _XgrammarWalk(xgrammar.GrammarMatcher(compiled), info.vocab_size)), info.vocab_size


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(engine: str, tokenizer_dir: Path, steps: int, seed: int) -> dict[str, Any]:
    """Compile every schema twice (cold, then cached) and walk each for up to `steps` tokens."""
    started = time.perf_counter()
    if engine == "llguidance":
        compile_schema, walk_of, _ = _llguidance_engine(tokenizer_dir)
        recompile = compile_schema
    else:
        compile_schema, walk_of, _ = _xgrammar_engine(tokenizer_dir)
        hf = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
        cached_compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf))
        recompile = _xgrammar_engine(tokenizer_dir, cached_compiler)[0]
    setup_s = time.perf_counter() - started
    schemas = [json.dumps(schema) for schema in SCHEMAS.values()]
    rss_before = _rss_bytes()
    cold_ms, compiled = [], []
    for schema in schemas:
        started = time.perf_counter()
        compiled.append(compile_schema(schema))
        cold_ms.append((time.perf_counter() - started) * 1e3)
    rss_after = _rss_bytes()
    cached_ms = _cached_ms(engine, schemas, compiled, recompile, walk_of)
    mask_us = _walk_all(compiled, walk_of, steps, random.Random(seed))
    return {
        "engine": engine, "tokenizer": tokenizer_dir.name, "num_schemas": len(schemas), "setup_s": setup_s,
        "compile_ms_p50": statistics.median(cold_ms), "compile_ms_p99": _percentile(cold_ms, 0.99),
        "cached_ms_p50": statistics.median(cached_ms), "mask_us_p50": statistics.median(mask_us),
        "mask_us_p99": _percentile(mask_us, 0.99), "num_masks": len(mask_us),
        "compiled_rss_mib": (rss_after - rss_before) / 2**20,
    }


def _cached_ms(engine: str, schemas: list[str], compiled: list[Any], recompile: Callable[[str], Any],
               walk_of: Callable[[Any], Walk]) -> list[float]:
    """A repeated schema: pagedserve keeps llguidance's compiled matcher and copies it (what walk_of does);
    xgrammar's compiler has its own cache, warmed by a first call."""
    times = []
    for schema, grammar in zip(schemas, compiled, strict=True):
        if engine == "xgrammar":
            recompile(schema)
        started = time.perf_counter()
        if engine == "xgrammar":
            recompile(schema)
        else:
            walk_of(grammar)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _walk_all(compiled: list[Any], walk_of: Callable[[Any], Walk], steps: int, rng: random.Random) -> list[float]:
    times = []
    for grammar in compiled:
        walk = walk_of(grammar)
        for _ in range(steps):
            started = time.perf_counter()
            allowed = walk.allowed()
            times.append((time.perf_counter() - started) * 1e6)
            if len(allowed) == 0 or not walk.accept(int(allowed[rng.randrange(len(allowed))])):
                break
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, action="append", help="a directory with tokenizer.json")
    parser.add_argument("--steps", type=int, default=48, help="most masks per schema walk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", type=Path, default=DEFAULT_RESULT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(engine, directory, args.steps, args.seed)
            for directory in args.tokenizer or DEFAULT_TOKENIZERS for engine in ("llguidance", "xgrammar")]
    headers = list(rows[0])
    table = [[row[key] for key in headers] for row in rows]
    print(text_table(headers, table))
    metadata = run_metadata("grammar-engines", "cpu")
    markdown = markdown_report("Grammar engines on the same JSON schemas", metadata,
                               [("Results (times per schema; masks on one thread)", markdown_table(headers, table))])
    for path in write_outputs(result_stem(args.result_dir, metadata), {"metadata": metadata, "runs": rows}, markdown):
        print(path)


if __name__ == "__main__":
    main()
