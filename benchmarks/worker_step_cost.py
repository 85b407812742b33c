"""The GPU worker's own host cost per decode step at N sequences, on a CPU: the real Worker, fed decode StepPlans
through the wire codec as the worker service receives them, with its model's forward pass timed apart.

    python -m benchmarks.worker_step_cost --num-seqs 1,64,256

Prints per N and sampling mode the median ms per decode step of each host stage (decode the plan's bytes, launch
without the forward pass, finish, encode the result's bytes), the forward pass's ms (excluded from the host sum),
and a digest of every sequence's tokens, so that a change can show its outputs unchanged.

The model has stories260K's shape (hidden 64, 512-token vocabulary) with one decoder layer of seeded random weights:
on a CPU the attention reference loops over sequences in Python, so each layer costs about 5 ms per step at 256
sequences and a real 5-layer forward pass would make a run five times longer for nothing measured. The forward pass
is timed on its own anyway (hooks around the model's forward and its logits) and left out; what remains is the
worker's Python and the small tensor work that a GPU would queue (the batch's numpy, sampling on [N, 512] logits).
Two things a GPU host differs in: each small tensor op there costs a launch rather than its CPU compute, and here the
forward pass leaves the CPU's caches cold for the stages after it, so fixed costs read higher than they would.
In the schema mode a step's sampling is deferred: the worker's masks thread computes the grammar masks (with
llguidance's threads) and then queues the sampling, so the launch does not wait for them, and the host stages count
the launching thread only. The next step's launch waits until that sampling is queued (LaunchedStep.sampling_queued),
which this mode's launch figure includes; on a CPU of few cores the mask threads share it with the main thread.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.json_schemas import SCHEMAS
from benchmarks.report import markdown_report, markdown_table, run_metadata, text_table, write_outputs
from pagedserve.contract import codec
from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import BlockTableUpdate, NewSequence, ScheduledSequence, StepPlan, StepResult
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.v1 import worker_service_pb2

STAGES = ("decode_ms", "launch_ms", "finish_ms", "encode_ms")
MODES: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    # No top-p/top-k: on a CPU their sort over the vocabulary would bury the host's share under compute a GPU queues.
    "random": SamplingParams(temperature=0.8),
    # Greedy under a JSON schema of the serving benchmark's corpus: each step's sampling waits for the grammar masks,
    # computed from the step before's tokens on the worker's masks thread.
    "schema": SamplingParams(temperature=0.0, structured_output=StructuredOutput(
        ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS["order"]))),
}


@dataclass(slots=True)
class _PlannedSequence:
    seq_id: int
    num_computed_tokens: int  # as planned: steps already sent count, their tokens may still be on their way
    block_ids: list[int] = field(default_factory=list)


class DecodePlanner:
    """Plays the control plane: one prefill step admits every sequence, then each decode step schedules every
    sequence for one token (the one sampled by the step before, which the worker substitutes) with a block appended
    when that token starts one, as the scheduler sends them. Blocks are handed out in order and never freed."""

    def __init__(self, num_seqs: int, prompt_len: int, block_size: int, params: SamplingParams,
                 vocab_size: int) -> None:
        self.block_size = block_size
        self.params = params
        self.prompts = [tuple(prompt_token(seq_id, i, vocab_size) for i in range(prompt_len))
                        for seq_id in range(num_seqs)]
        self.sequences = [_PlannedSequence(seq_id, 0) for seq_id in range(num_seqs)]
        self._next_block = 0
        self._next_step = 0

    def prefill(self) -> StepPlan:
        new = []
        for seq, prompt in zip(self.sequences, self.prompts, strict=True):
            self._cover(seq, len(prompt))
            new.append(NewSequence(seq.seq_id, prompt, (), self.params, tuple(seq.block_ids), 0, len(prompt)))
            seq.num_computed_tokens = len(prompt)
        return StepPlan(self._step_id(), new_sequences=tuple(new))

    def decode(self) -> StepPlan:
        scheduled = []
        for seq in self.sequences:
            start_index = len(seq.block_ids)
            self._cover(seq, seq.num_computed_tokens + 1)
            updates = (BlockTableUpdate(start_index, tuple(seq.block_ids[start_index:])),) \
                if len(seq.block_ids) > start_index else ()
            scheduled.append(ScheduledSequence(seq.seq_id, 1, updates))
            seq.num_computed_tokens += 1
        return StepPlan(self._step_id(), scheduled_sequences=tuple(scheduled))

    def drop_all(self) -> StepPlan:
        return StepPlan(self._step_id(), dropped_seq_ids=tuple(seq.seq_id for seq in self.sequences))

    def _cover(self, seq: _PlannedSequence, num_tokens: int) -> None:
        while len(seq.block_ids) * self.block_size < num_tokens:
            seq.block_ids.append(self._next_block)
            self._next_block += 1

    def _step_id(self) -> int:
        self._next_step += 1
        return self._next_step - 1


def prompt_token(seq_id: int, index: int, vocab_size: int) -> int:
    """A token past the specials (0-2) that looks random but depends only on (seq_id, index)."""
    return 3 + (seq_id * 7919 + index * 104729 + index * index * 31) % (vocab_size - 3)


def num_blocks_needed(num_seqs: int, num_tokens: int, block_size: int) -> int:
    return num_seqs * -(-num_tokens // block_size)


class ForwardClock:
    """Sums the time spent in a model's forward pass and logits (hooks around both); a CPU runs them synchronously,
    so that is their compute time. A profiler, when set, is paused during them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total_s = 0.0
        self.profiler: cProfile.Profile | None = None
        self._started = 0.0
        model.register_forward_pre_hook(lambda *_: self._start())
        model.register_forward_hook(lambda *_: self._stop())
        compute_logits = cast("Callable[[torch.Tensor], torch.Tensor]", model.compute_logits)

        def timed_logits(hidden: torch.Tensor) -> torch.Tensor:
            self._start()
            try:
                return compute_logits(hidden)
            finally:
                self._stop()

        model.__dict__["compute_logits"] = timed_logits  # found before the class's method: the runner calls it

    def take_s(self) -> float:
        """The time summed since the last call."""
        total, self.total_s = self.total_s, 0.0
        return total

    def _start(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()
        self._started = time.perf_counter()

    def _stop(self) -> None:
        self.total_s += time.perf_counter() - self._started
        if self.profiler is not None:
            self.profiler.enable()


@dataclass(slots=True)
class StepTimes:
    """One decode step's host stages (ms): decode_ms bytes to StepPlan; launch_ms Worker.launch less forward_ms;
    finish_ms Worker.finish; encode_ms StepResult to bytes. Also the control plane's side of the codec."""

    decode_ms: float = 0.0
    launch_ms: float = 0.0
    forward_ms: float = 0.0
    finish_ms: float = 0.0
    encode_ms: float = 0.0
    plan_encode_ms: float = 0.0
    result_decode_ms: float = 0.0

    @property
    def host_ms(self) -> float:
        return self.decode_ms + self.launch_ms + self.finish_ms + self.encode_ms


class WireWorker:
    """A Worker reached as the worker service reaches it: each plan goes through its bytes, each result back. A
    profiler, when set, sees the worker's stages only (not the control plane's codec, nor the forward pass)."""

    def __init__(self, worker: Worker, clock: ForwardClock) -> None:
        self.worker = worker
        self.clock = clock
        self.tokens: dict[int, list[int]] = {}

    def profile(self, profiler: cProfile.Profile | None) -> None:
        self.clock.profiler = profiler

    def launch(self, plan: StepPlan, times: StepTimes) -> LaunchedStep:
        started = time.perf_counter()
        data = codec.step_plan_to_proto(plan).SerializeToString()
        encoded = time.perf_counter()
        with self._profiled():
            decoded = codec.step_plan_from_proto(worker_service_pb2.ExecuteRequest.FromString(data))
            launching = time.perf_counter()
            self.clock.take_s()
            launched = self.worker.launch(decoded)
            forward_s = self.clock.take_s()
            done = time.perf_counter()
        times.plan_encode_ms = (encoded - started) * 1e3
        times.decode_ms = (launching - encoded) * 1e3
        times.forward_ms = forward_s * 1e3
        times.launch_ms = (done - launching - forward_s) * 1e3
        return launched

    def finish(self, launched: LaunchedStep, times: StepTimes) -> StepResult:
        started = time.perf_counter()
        with self._profiled():
            result = self.worker.finish(launched)
            finished = time.perf_counter()
            data = codec.step_result_to_proto(result).SerializeToString()
            encoded = time.perf_counter()
        received = codec.step_result_from_proto(worker_service_pb2.ExecuteResponse.FromString(data))
        times.finish_ms = (finished - started) * 1e3
        times.encode_ms = (encoded - finished) * 1e3
        times.result_decode_ms = (time.perf_counter() - encoded) * 1e3
        for output in received.outputs:
            if output.token_id is not None:
                self.tokens.setdefault(output.seq_id, []).append(output.token_id)
        return received

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        profiler = self.clock.profiler
        if profiler is not None:
            profiler.enable()
        try:
            yield
        finally:
            if profiler is not None:
                profiler.disable()


def write_one_layer_model(source: Path, directory: Path) -> Path:
    """A model directory holding source's config.json with one decoder layer (weights: seeded random), and its
    tokenizer.json (structured output needs it)."""
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    return directory


def load_worker(model_dir: Path, num_blocks: int, block_size: int, max_num_seqs: int) -> Worker:
    """The CPU worker as `pagedserve worker --device cpu --load-format dummy` runs it, its pool of num_blocks."""
    worker = Worker.load(WorkerConfig(model_dir=model_dir, dtype=DType.FLOAT32, device=DeviceKind.CPU,
                                      load_format=LoadFormat.DUMMY))
    worker.init_cache(CacheRequest(block_size=block_size, num_gpu_blocks_override=num_blocks,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max(8192, max_num_seqs)))
    return worker


def run_once(model_dir: Path, num_seqs: int, prompt_len: int, output_len: int, params: SamplingParams,
             depth: int, block_size: int = 16, profiler: cProfile.Profile | None = None,
             ) -> tuple[list[StepTimes], dict[int, list[int]]]:
    """Prefills num_seqs sequences, then runs output_len decode steps of all of them with up to depth steps launched
    and unfinished (a step is finished once `depth` are in flight, as the step pipeline overlaps them); returns each
    decode step's times and every sequence's tokens."""
    worker = load_worker(model_dir, num_blocks_needed(num_seqs, prompt_len + output_len + depth, block_size),
                         block_size, num_seqs)
    try:
        wire = WireWorker(worker, ForwardClock(worker.runner.model))
        planner = DecodePlanner(num_seqs, prompt_len, block_size, params, worker.loaded.config.vocab_size)
        wire.finish(wire.launch(planner.prefill(), StepTimes()), StepTimes())
        wire.profile(profiler)
        in_flight: deque[tuple[LaunchedStep, StepTimes]] = deque()
        times: list[StepTimes] = []
        for _ in range(output_len):
            times.append(StepTimes())
            in_flight.append((wire.launch(planner.decode(), times[-1]), times[-1]))
            if len(in_flight) >= depth:
                wire.finish(*in_flight.popleft())
        while in_flight:
            wire.finish(*in_flight.popleft())
        wire.profile(None)
        wire.finish(wire.launch(planner.drop_all(), StepTimes()), StepTimes())
    finally:
        worker.close()
    return times, wire.tokens


def digest(tokens: dict[int, list[int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]


def medians(times: list[StepTimes]) -> dict[str, float]:
    """Median ms of each stage over the decode steps, and of their host sum (the forward pass left out)."""
    if not times:
        raise ValueError("no decode step ran")
    names = (*STAGES, "host_ms", "forward_ms", "plan_encode_ms", "result_decode_ms")
    return {name: statistics.median(getattr(t, name) for t in times) for name in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--num-seqs", default="1,64,256", help="comma-separated sequence counts")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128, help="decode steps per run")
    parser.add_argument("--modes", default="greedy,random",
                        help="greedy: temperature 0; random: temperature 0.8, unseeded; schema: greedy under a JSON "
                             "schema")
    parser.add_argument("--depth", type=int, default=2,
                        help="steps launched and not yet finished before the oldest is finished (2: step N+1 is "
                             "launched before step N finishes, so its inputs are read on the device)")
    parser.add_argument("--model-config", type=Path, default=Path("../shared/models/stories260K"),
                        help="directory whose config.json gives the model's shape (one layer of it is run)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the run of least host_ms is kept")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write cProfile stats of every run's decode steps here (the worker's stages only)")
    parser.add_argument("--output-stem", type=Path, default=None,
                        help="write STEM.json and STEM.md (rows, commit, command)")
    return parser.parse_args(argv)


COLUMNS = ("mode", "num_seqs", "host_ms", *STAGES, "forward_ms", "plan_encode_ms", "result_decode_ms", "decode_steps",
           "digest")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as a CPU worker beside its control plane runs (runtime/cpu_threads.py)
    profiler = cProfile.Profile() if args.profile else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="worker-step-cost-") as directory:
        model_dir = write_one_layer_model(args.model_config, Path(directory))
        freeze_startup_objects()
        for mode in args.modes.split(","):
            for num_seqs in (int(n) for n in args.num_seqs.split(",")):
                rows.append(best_of(args, model_dir, mode, num_seqs, profiler))
                print(text_table(COLUMNS, [[rows[-1][c] for c in COLUMNS]]).splitlines()[-1], flush=True)
    print(text_table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows]))
    if profiler is not None:
        profiler.dump_stats(str(args.profile))
        pstats.Stats(str(args.profile), stream=sys.stdout).sort_stats("tottime").print_stats(30)
    if args.output_stem is not None:
        metadata = run_metadata("worker-step-cost", "cpu")
        table = markdown_table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
        page = markdown_report("Worker host cost per decode step (CPU)", metadata,
                               [("Median ms per decode step", table)])
        write_outputs(args.output_stem, {**metadata, "rows": rows}, page)
    return 0


def best_of(args: argparse.Namespace, model_dir: Path, mode: str, num_seqs: int,
            profiler: cProfile.Profile | None) -> dict[str, Any]:
    """The row of the run of least host_ms among args.repeats runs; greedy runs must agree on their tokens."""
    best: dict[str, Any] | None = None
    for _ in range(args.repeats):
        times, tokens = run_once(model_dir, num_seqs, args.prompt_len, args.output_len, MODES[mode], args.depth,
                                 profiler=profiler)
        row = {"mode": mode, "num_seqs": num_seqs, "decode_steps": len(times), **medians(times),
               "digest": digest(tokens)}
        if best is not None and mode == "greedy" and best["digest"] != row["digest"]:
            raise RuntimeError(f"greedy outputs differ between runs: {best['digest']} != {row['digest']}")
        if best is None or row["host_ms"] < best["host_ms"]:
            best = row
    assert best is not None
    return best


if __name__ == "__main__":
    raise SystemExit(main())
