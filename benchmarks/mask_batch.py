"""Host time of one step's token masks for a batch of constrained rows, as the worker fills them: every row a JSON
schema of benchmarks.json_schemas at its own point of its document, one mask per row and step.

    python -m benchmarks.mask_batch [--batch 64] [--steps 200] [--threads 1,2,4,8,16] [--schemas corpus|one]
                                    [--replicas 1,16]

After one untimed walk, each mode walks the same seeded batch (a uniformly drawn allowed token per row and step;
a row whose document ends starts a new schema), so every mode computes the same masks, which a digest checks:
`serial` fills them one call per row on the calling thread, `pool N` in one call on llguidance's pool of N threads
(gpu_worker/grammar.py's path), `threads N` on N Python threads, each filling every N-th row one call at a time. Per
step it records the fill's wall time and the process's CPU time meanwhile, and for the serial mode the slowest row,
the floor of any parallel fill.

A row's matcher is a deep copy of its schema's compiled matcher, as in the worker. Copies of one compiled matcher
contend with each other when filled at once (on a 2-core host, 64 copies of one matcher filled on two threads took
longer than on one); `--replicas R` compiles each schema R times and gives row r replica r mod R. `--schemas one`
gives every row the same schema (one tool or response schema for all requests), `corpus` the 55 in turn.

`--slices` measures llguidance's token-trie slices, the tokenizer's partition of tokens by the regex each one
fully matches: a mask applies a whole slice at once where the lexer's state allows all of its regex, and walks it
token by token otherwise. `general` is llguidance's default (JSON string content of at most 10, at most 30, then any
number of bytes); `none` walks every token; `lengths` (the worker's, gpu_worker/token_slices.py) bounds string
content more finely (2, 4, 6, 8, 10, 15, 20, 30 bytes), so that a string whose `maxLength` leaves it fewer than 10
bytes still applies the shorter slices whole.
Slices change how a mask is computed, never what it holds: the digest check spans them too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from benchmarks.json_schemas import SCHEMAS
from benchmarks.model_shapes import DEFAULT_TOKENIZER_DIR
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
from pagedserve.gpu_worker.token_slices import TOKEN_SLICES

HEADERS = ["mode", "ms / step mean", "p50", "p99", "CPU ms / step", "slowest row ms (mean)"]


def allowed_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask row (bit t of word t // 32 set: token t allowed) allows, below vocab_size."""
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size])


Fill = Callable[[list[llguidance.LLMatcher], np.ndarray], None]  # every row's mask into its row of the array

SLICES: dict[str, list[str] | None] = {
    "general": None,  # llguidance's own default
    "none": [],
    "lengths": TOKEN_SLICES,  # the worker's
}


def walk(compiled: list[list[llguidance.LLMatcher]], batch: int, steps: int, vocab_size: int, seed: int,
         fill: Fill | None) -> dict[str, Any]:
    """One mode's run over the seeded batch (compiled[schema][replica]; fill None: one call per row on this thread,
    each timed): per-step wall and CPU seconds of the fill (the CPU of every thread of the process while the fill
    runs, not what its threads spin after it returns), the slowest row's for the serial mode, and a digest of every
    step's masks."""
    rng = random.Random(seed)
    schema_of = [row % len(compiled) for row in range(batch)]
    matchers = [compiled[index][row % len(compiled[index])].deep_copy() for row, index in enumerate(schema_of)]
    masks = llguidance.numpy.allocate_token_bitmask(batch, vocab_size)
    wall, cpu, slowest = [], [], []
    digest = hashlib.sha256()
    for _ in range(steps):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        if fill is None:
            rows = []
            for row, matcher in enumerate(matchers):
                row_start = time.perf_counter()
                llguidance.numpy.fill_next_token_bitmask(matcher, masks, row)
                rows.append(time.perf_counter() - row_start)
            slowest.append(max(rows))
        else:
            fill(matchers, masks)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
        digest.update(masks.tobytes())
        for row, matcher in enumerate(matchers):
            matcher.consume_token(int(rng.choice(allowed_ids(masks[row], vocab_size))))
            if matcher.is_stopped() or matcher.is_error():
                schema_of[row] = rng.randrange(len(compiled))
                replicas = compiled[schema_of[row]]
                matchers[row] = replicas[row % len(replicas)].deep_copy()
    return {"wall_s": wall, "cpu_s": cpu, "slowest_row_s": slowest, "masks_sha256": digest.hexdigest()}


def pool_fill(pool: llguidance.LLExecutor) -> Fill:
    """All rows in one call on llguidance's pool (the worker's way)."""
    return lambda matchers, masks: llguidance.numpy.fill_next_token_bitmask_par(
        pool, list(zip(matchers, range(len(matchers)), strict=True)), masks)


def threads_fill(pool: ThreadPoolExecutor, shares: int) -> Fill:
    """Each of `shares` Python threads fills every shares-th row, one call per row (each releases the interpreter
    lock)."""
    def fill(matchers: list[llguidance.LLMatcher], masks: np.ndarray) -> None:
        def fill_share(share: int) -> None:
            for row in range(share, len(matchers), shares):
                llguidance.numpy.fill_next_token_bitmask(matchers[row], masks, row)

        list(pool.map(fill_share, range(shares)))

    return fill


def _row(mode: str, run: dict[str, Any]) -> list[object]:
    wall = sorted(run["wall_s"])
    return [mode, round(statistics.mean(wall) * 1e3, 3), round(wall[len(wall) // 2] * 1e3, 3),
            round(wall[min(len(wall) - 1, int(len(wall) * 0.99))] * 1e3, 3),
            round(statistics.mean(run["cpu_s"]) * 1e3, 3),
            round(statistics.mean(run["slowest_row_s"]) * 1e3, 3) if run["slowest_row_s"] else "-"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR,
                        help="a directory with tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=128_256,
                        help="the model's vocabulary, padding included (default: the llama-3.2-1b shape's)")
    parser.add_argument("--batch", type=int, default=64, help="constrained rows a step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", default="1,2,4,8,16", help="pool sizes to measure, comma-separated")
    parser.add_argument("--schemas", choices=("corpus", "one"), default="corpus",
                        help="every row the same schema (one), or the corpus' schemas in turn")
    parser.add_argument("--replicas", default="1", help="compilations of each schema to measure, comma-separated")
    parser.add_argument("--slices", default="general",
                        help=f"token-trie slice sets to measure, comma-separated, of {', '.join(SLICES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", type=Path, default=DEFAULT_RESULT_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.slices.split(",")) - set(SLICES)
    if unknown:
        parser.error(f"--slices: no set named {', '.join(sorted(unknown))} (choose from {', '.join(SLICES)})")

    schemas = list(SCHEMAS.values()) if args.schemas == "corpus" else [SCHEMAS["contact"]]
    threads = [int(t) for t in args.threads.split(",")]
    pools = {n: ThreadPoolExecutor(n) for n in threads}
    modes: list[tuple[str, Fill | None]] = [("serial", None)]
    modes += [(f"pool {n}", pool_fill(llguidance.LLExecutor(n))) for n in threads]
    modes += [(f"threads {n}", threads_fill(pools[n], n)) for n in threads]
    runs = {}
    for slices in dict.fromkeys(args.slices.split(",")):  # each set once: its rows are named by it
        tokenizer = llguidance.LLTokenizer(str(args.tokenizer / "tokenizer.json"), n_vocab=args.vocab_size,
                                           slices=SLICES[slices])
        # As benchmarks.structured_workload sends them to the server.
        grammars = [StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema), disable_any_whitespace=True)
                    .checked_grammar(tokenizer) for schema in schemas]
        for replicas in (int(r) for r in args.replicas.split(",")):
            compiled = [[llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(replicas)]
                        for grammar in grammars]
            # Untimed: whatever the compiled matchers build lazily on their first walk, every timed mode finds built.
            walk(compiled, args.batch, args.steps, args.vocab_size, args.seed, None)
            for mode, fill in modes:
                label = f"{mode}, {replicas} replica{'s' if replicas > 1 else ''}"
                runs[label if slices == "general" else f"{label}, {slices} slices"] = walk(
                    compiled, args.batch, args.steps, args.vocab_size, args.seed, fill)
    for pool in pools.values():
        pool.shutdown()
    if len({run["masks_sha256"] for run in runs.values()}) != 1:
        raise SystemExit("the modes filled different masks: " + str({m: r["masks_sha256"] for m, r in runs.items()}))
    rows = [_row(mode, run) for mode, run in runs.items()]
    print(text_table(HEADERS, rows))

    metadata = run_metadata("mask-batch", f"cpu-{len(os.sched_getaffinity(0))}-cores")
    config = {key: str(value) for key, value in vars(args).items()}
    markdown = markdown_report(f"Token masks of {args.batch} constrained rows a step ({args.schemas})", metadata,
                               [("Configuration", markdown_table(["option", "value"], list(config.items()))),
                                ("Results", markdown_table(HEADERS, rows))])
    result = {"metadata": metadata, "config": config, "rows": [dict(zip(HEADERS, row, strict=True)) for row in rows],
              "runs": runs}
    for path in write_outputs(result_stem(args.result_dir, metadata), result, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
