"""Host time a constrained step's chain spends on its grammars, with and without forced tokens taken ahead
(gpu_worker/mask_lookahead.py): every row a JSON schema of benchmarks.json_schemas, walked as the worker walks it.

    python -m benchmarks.mask_lookahead [--batch 64] [--steps 300] [--vocab-size 128256]

Each step of a mode feeds the rows their last tokens (accept_tokens) and fills their masks (fill_token_masks): the
chain from one step's tokens on the host to the next sampling, which `chain` times. With `ahead`, forced_rows and
take_ahead then run as the worker runs them once the sampling is queued, timed apart (`off the chain`): they take
the forced tokens and fill the masks after them, so the next step's chain feeds and fills only the other rows. Both
modes walk the same seeded tokens (a uniformly drawn allowed token a row, as a random-weight model's greedy choice
under the mask is; a row whose document ends starts a new schema) and must fill the same masks, which a digest
checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.json_schemas import SCHEMAS
from benchmarks.mask_batch import require_same_masks
from benchmarks.model_shapes import DEFAULT_TOKENIZER_DIR
from benchmarks.report import DEFAULT_RESULT_DIR, write_host_table
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar, accept_tokens, fill_token_masks
from pagedserve.gpu_worker.mask_lookahead import forced_rows, take_ahead
from pagedserve.gpu_worker.sampler import SamplingRow

PARAMS = SamplingParams(temperature=0.0)
HEADERS = ["mode", "chain ms / step mean", "p50", "p90", "off the chain ms / step", "rows taken ahead / step"]


def walk(compiler: GrammarCompiler, outputs: list[StructuredOutput], batch: int, steps: int, vocab_size: int,
         seed: int, ahead: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    grammars: list[SequenceGrammar] = []
    for row in range(batch):
        grammars.append(compiler.start(outputs[row % len(outputs)], row))
    tokens: list[int | None] = [None] * batch
    chain, off_chain, taken = [], [], []
    digest = hashlib.sha256()
    for _ in range(steps):
        start = time.perf_counter()
        accept_tokens(compiler, [(grammar, token) for grammar, token in zip(grammars, tokens, strict=True)
                                 if token is not None])
        masks = fill_token_masks(compiler, grammars, vocab_size)
        chain.append(time.perf_counter() - start)
        digest.update(masks.numpy().tobytes())
        if ahead:
            rows = [SamplingRow.of(PARAMS, (), [1], [], grammar=grammar) for grammar in grammars]
            start = time.perf_counter()
            forced = forced_rows(compiler, rows, masks)
            take_ahead(compiler, forced)
            taken.append(len(forced))
            off_chain.append(time.perf_counter() - start)
        bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
        for row, grammar in enumerate(grammars):
            tokens[row] = int(rng.choice(np.flatnonzero(bits[row])))
            if tokens[row] in compiler.tokenizer.eos_tokens:  # the document ended: the row starts a new schema
                grammars[row] = compiler.start(outputs[rng.randrange(len(outputs))], grammar.seq_id)
                tokens[row] = None
    return {"chain_s": chain, "off_chain_s": off_chain, "taken": taken, "masks_sha256": digest.hexdigest()}


def _row(mode: str, run: dict[str, Any]) -> list[object]:
    chain = sorted(run["chain_s"])
    return [mode, round(statistics.mean(chain) * 1e3, 3), round(chain[len(chain) // 2] * 1e3, 3),
            round(chain[int(len(chain) * 0.9)] * 1e3, 3),
            round(statistics.mean(run["off_chain_s"]) * 1e3, 3) if run["off_chain_s"] else "-",
            round(statistics.mean(run["taken"]), 1) if run["taken"] else "-"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR,
                        help="a directory with tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=128_256,
                        help="the model's vocabulary, padding included (default: the llama-3.2-1b shape's)")
    parser.add_argument("--batch", type=int, default=64, help="constrained rows a step")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="each mode's walk, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", type=Path, default=DEFAULT_RESULT_DIR)
    args = parser.parse_args(argv)

    compiler = GrammarCompiler.for_model(args.tokenizer, args.vocab_size)
    if compiler is None:
        parser.error(f"--tokenizer: no tokenizer.json in {args.tokenizer}")
    # As benchmarks.structured_workload sends them to the server.
    outputs = [StructuredOutput(ConstraintKind.JSON_SCHEMA, json.dumps(schema), disable_any_whitespace=True)
               for schema in SCHEMAS.values()]
    walk(compiler, outputs, args.batch, args.steps, args.vocab_size, args.seed, False)  # compiles, untimed
    runs = {}
    for round_index in range(args.rounds):
        for mode in ("feed then fill", "ahead"):
            runs[f"{mode}, round {round_index + 1}"] = walk(compiler, outputs, args.batch, args.steps,
                                                            args.vocab_size, args.seed, mode == "ahead")
    compiler.close()
    require_same_masks(runs)
    rows = [_row(mode, run) for mode, run in runs.items()]
    title = f"A constrained step's grammar chain, {args.batch} rows, forced tokens taken ahead or not"
    write_host_table(args, "mask-lookahead", title, HEADERS, rows, runs)


if __name__ == "__main__":
    main()
