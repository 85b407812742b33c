"""The control plane's own cost per decode step (planning and applying results) at N sequences, on a CPU: the real
engine, scheduler and detokenizer against a worker that does no model work and answers each step at once.

    python -m benchmarks.engine_step_cost --num-seqs 256,1000 --tokenizer ../shared/tokenizers/llama2

Prints, per N and per output mode, the median plan_ms and apply_ms of the decode steps that ran all N sequences,
and a digest of every request's token ids and text, so that a change can show its output unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import logging
import pstats
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import SequenceOutput, StepPlan, StepResult
from pagedserve.control_plane.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedserve.control_plane.engine.engine import Engine, StepRecord
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import EngineOutput, RequestFailed
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.logs import LogFormat, configure_logging

# Sampled tokens come from ordinary word pieces of a 32k vocabulary (past the byte pieces and specials).
_FIRST_WORD_ID, _VOCAB_END = 300, 32000


class InstantWorker:
    """A StepTransport whose worker computes nothing: each sequence samples token_for(seq_id, num_outputs) when a
    step reaches the end of its known tokens, so the tokens depend only on the sequence, never on the timing."""

    def __init__(self) -> None:
        self._known: dict[int, int] = {}  # seq id -> its known tokens at the worker
        self._computed: dict[int, int] = {}
        self._outputs: dict[int, int] = {}  # seq id -> tokens it sampled
        self._results: deque[StepResult] = deque()

    async def send(self, plan: StepPlan) -> None:
        for seq_id in plan.dropped_seq_ids:
            del self._known[seq_id], self._computed[seq_id], self._outputs[seq_id]
        work = []
        for new in plan.new_sequences:
            self._known[new.seq_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            self._computed[new.seq_id] = new.num_computed_tokens
            self._outputs[new.seq_id] = len(new.output_token_ids)
            work.append((new.seq_id, new.num_scheduled_tokens))
        work.extend((s.seq_id, s.num_scheduled_tokens) for s in plan.scheduled_sequences)
        outputs = []
        for seq_id, num_tokens in work:
            self._computed[seq_id] += num_tokens
            if self._computed[seq_id] < self._known[seq_id]:
                outputs.append(SequenceOutput(seq_id, None))
                continue
            token_id = token_for(seq_id, self._outputs[seq_id])
            self._known[seq_id] += 1
            self._outputs[seq_id] += 1
            outputs.append(SequenceOutput(seq_id, token_id))
        self._results.append(StepResult(plan.step_id, tuple(outputs)))

    async def receive(self) -> StepResult:
        await asyncio.sleep(0)
        return self._results.popleft()


def token_for(seq_id: int, index: int) -> int:
    """A word piece that looks random but depends only on (seq_id, index)."""
    return _FIRST_WORD_ID + (seq_id * 7919 + index * 104729 + index * index * 31) % (_VOCAB_END - _FIRST_WORD_ID)


def prompt_for(index: int, prompt_len: int) -> tuple[int, ...]:
    return (1, *(token_for(1_000_000 + index, i) for i in range(prompt_len - 1)))


async def run_once(tokenizer: Tokenizer, num_seqs: int, prompt_len: int, output_len: int,
                   final_only: bool, stop: tuple[str, ...]) -> tuple[list[StepRecord], str, float]:
    """Generates num_seqs requests through one engine; returns its step records, the outputs' digest and the
    wall time (s)."""
    block_size = 16
    num_blocks = num_seqs * -(-(prompt_len + output_len + 8) // block_size)
    config = SchedulerConfig(max_num_batched_tokens=max(8192, prompt_len), max_num_seqs=num_seqs,
                             max_model_len=prompt_len + output_len + 8)
    scheduler = Scheduler(config, CacheConfig(block_size=block_size), num_blocks, 0)
    metrics = EngineMetrics("bench", prompt_len + output_len + 8, registry=CollectorRegistry())
    engine = Engine([("bench", scheduler, InstantWorker())], tokenizer, EngineConfig(), metrics)
    engine.start()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, stop=stop)
    # Streamed requests share one channel and its one consumer, as the frontend's relay reads them.
    shared: ItemChannel[EngineOutput] | None = None if final_only else ItemChannel()
    started = time.perf_counter()
    ids = [engine.add_request(prompt_for(i, prompt_len), params, final_only=final_only, outputs=shared)
           for i in range(num_seqs)]
    if shared is None:
        texts = await asyncio.gather(*(_collect(engine, request_id) for request_id in ids))
    else:
        texts = await _collect_shared(shared, ids)
    wall_s = time.perf_counter() - started
    records = engine.recent_steps()
    await engine.stop()
    return records, hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16], wall_s


async def _collect(engine: Engine, request_id: str) -> tuple[list[int], str, str]:
    token_ids: list[int] = []
    text: list[str] = []
    reason = ""
    async for item in engine.stream(request_id):
        token_ids.extend(item.chunk.token_ids)
        text.append(item.chunk.text)
        if item.chunk.finish_reason is not None:
            reason = item.chunk.finish_reason.name
    return token_ids, "".join(text), reason


async def _collect_shared(
    channel: ItemChannel[EngineOutput], request_ids: list[str],
) -> list[tuple[list[int], str, str]]:
    outputs: dict[str, tuple[list[int], list[str], list[str]]] = {rid: ([], [], []) for rid in request_ids}
    num_open = len(request_ids)
    while num_open:
        for item in await channel.take_all():
            if isinstance(item, RequestFailed):
                raise item.error
            token_ids, text, reason = outputs[item.chunk.request_id]
            token_ids.extend(item.chunk.token_ids)
            text.append(item.chunk.text)
            if item.chunk.finish_reason is not None:
                reason.append(item.chunk.finish_reason.name)
            num_open -= item.usage is not None
    return [(token_ids, "".join(text), "".join(reason)) for token_ids, text, reason in outputs.values()]


def decode_medians(records: list[StepRecord], num_seqs: int) -> dict[str, float]:
    """Median plan and apply time (ms) of the decode steps that ran all num_seqs sequences."""
    full = [r for r in records if r.num_seqs == num_seqs and r.num_tokens == num_seqs]
    if not full:
        raise ValueError(f"no decode step ran all {num_seqs} sequences")
    plan_ms = statistics.median(r.plan_ms for r in full)
    apply_ms = statistics.median(r.apply_ms for r in full)
    return {"decode_steps": len(full), "plan_ms": plan_ms, "apply_ms": apply_ms, "sum_ms": plan_ms + apply_ms}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--num-seqs", default="256,1000", help="comma-separated sequence counts")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--modes", default="offline,stream,stop",
                        help="offline: final_only, no stop strings (LLM.generate); stream: every chunk, text per step, "
                             "one shared channel (the frontend's relay); stop: offline with a stop string that "
                             "never matches (text per step)")
    parser.add_argument("--tokenizer", type=Path, default=Path("../shared/tokenizers/llama2"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best median is kept")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of the last run here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


_MODES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "offline": (True, ()), "stream": (False, ()), "stop": (True, ("\x00never\x00",)),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(LogFormat.CONSOLE, logging.WARNING)  # per-request engine events would drown the results
    tokenizer = Tokenizer(args.tokenizer)
    freeze_startup_objects()
    rows: list[dict[str, Any]] = []
    profiler = cProfile.Profile() if args.profile else None
    for mode in args.modes.split(","):
        final_only, stop = _MODES[mode]
        for num_seqs in (int(n) for n in args.num_seqs.split(",")):
            best: dict[str, Any] | None = None
            for _ in range(args.repeats):
                if profiler is not None:
                    profiler.enable()
                records, digest, wall_s = asyncio.run(
                    run_once(tokenizer, num_seqs, args.prompt_len, args.output_len, final_only, stop))
                if profiler is not None:
                    profiler.disable()
                row = {"mode": mode, "num_seqs": num_seqs, **decode_medians(records, num_seqs),
                       "wall_s": wall_s, "digest": digest}
                if best is not None and best["digest"] != digest:
                    raise RuntimeError(f"outputs differ between runs: {best['digest']} != {digest}")
                if best is None or row["sum_ms"] < best["sum_ms"]:
                    best = row
            assert best is not None
            rows.append(best)
            print(f"{mode:8} N={num_seqs:5}  plan {best['plan_ms']:6.2f} ms  apply {best['apply_ms']:6.2f} ms  "
                  f"({best['decode_steps']} decode steps, run {best['wall_s']:.2f} s)  outputs {digest}", flush=True)
    if profiler is not None:
        profiler.dump_stats(str(args.profile))
        pstats.Stats(str(args.profile), stream=sys.stdout).sort_stats("tottime").print_stats(25)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
