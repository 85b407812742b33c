"""Scheduler test helpers: configured schedulers, requests, and a fake worker whose KV pool records tokens."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import Fork, SequenceOutput, StepPlan, StepResult, TokenLogprobs
from pagedserve.control_plane.config import CacheConfig, PreemptionMode, SchedulerConfig, SchedulingPolicy
from pagedserve.control_plane.scheduling.block_manager import BlockManager, Device
from pagedserve.control_plane.scheduling.request import FinishReason, Request, SequenceDelta
from pagedserve.control_plane.scheduling.scheduler import Scheduler

EOS = 2
VOCAB_SIZE = 1000

TokenFn = Callable[[Sequence[int], int], int]


def default_next_token(tokens: Sequence[int], sample_index: int) -> int:
    """Deterministic in the sequence's tokens and sample index; never EOS (EOS tests bring their own)."""
    token = (tokens[-1] * 7919 + len(tokens) * 104729 + sample_index * 131) % (VOCAB_SIZE - 3)
    return token + 3


def make_scheduler(
    num_blocks: int = 8,
    block_size: int = 4,
    num_cpu_blocks: int = 0,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    max_model_len: int | None = 1024,
    policy: SchedulingPolicy = SchedulingPolicy.FCFS,
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE,
    enable_prefix_caching: bool = True,
    **scheduler_fields: Any,
) -> Scheduler:
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        scheduling_policy=policy,
        preemption_mode=preemption_mode,
        **scheduler_fields,
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(scheduler_config, cache_config, num_blocks, num_cpu_blocks)


def make_request(
    request_id: str,
    prompt_token_ids: Sequence[int],
    max_tokens: int | None = 16,
    arrival_time_s: float = 0.0,
    priority: int = 0,
    **params: Any,
) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return Request(request_id, tuple(prompt_token_ids), sampling, (EOS,), arrival_time_s, priority)


def make_requests(
    num_requests: int,
    prompt_len: int,
    max_tokens: int | None = 16,
    first_token: int = 10,
    **params: Any,
) -> list[Request]:
    """Requests r0, r1, ... with distinct prompts of prompt_len tokens, arriving in order."""
    return [
        make_request(
            f"r{i}",
            [first_token + 100 * i + j for j in range(prompt_len)],
            max_tokens=max_tokens,
            arrival_time_s=float(i),
            **params,
        )
        for i in range(num_requests)
    ]


@dataclass(slots=True)
class _WorkerSeq:
    tokens: list[int]
    table: list[int]
    num_computed: int
    sample_index: int
    forks: tuple[Fork, ...]  # siblings still to be forked at the first sample
    num_prompt_logprobs: int = 0  # prompt positions to return log-probabilities for (0: none asked)


class PlanRejectedError(AssertionError):
    """A plan the worker contract rejects (the real worker answers INVALID_ARGUMENT); the fake is left untouched."""


class FakeWorker:
    """Executes plans as the worker contract says. Each KV slot stores the token id computed into it, and
    every step first checks that each sequence's already computed positions read back its own tokens, so
    a missing copy-on-write, a wrong swap or a reused block shows up as a mismatch."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
                 next_token: TokenFn = default_next_token) -> None:
        self.block_size = block_size
        self.gpu: list[list[int | None]] = [[None] * block_size for _ in range(num_gpu_blocks)]
        self.cpu: list[list[int | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.seqs: dict[int, _WorkerSeq] = {}
        self.next_token = next_token
        self.num_computed_tokens = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self._validate(plan)
        for seq_id in plan.dropped_seq_ids:
            del self.seqs[seq_id]
        for src, dst in plan.swap_out:
            self.cpu[dst] = list(self.gpu[src])
        for src, dst in plan.swap_in:
            self.gpu[dst] = list(self.cpu[src])
        for src, dst in plan.block_copies:
            self.gpu[dst] = list(self.gpu[src])
        work: list[tuple[int, int]] = []
        for new in plan.new_sequences:
            tokens = list(new.prompt_token_ids + new.output_token_ids)
            num_prompt_logprobs = len(new.prompt_token_ids) if new.sampling_params.prompt_logprobs is not None else 0
            self.seqs[new.seq_id] = _WorkerSeq(
                tokens, list(new.block_ids), new.num_computed_tokens, new.sample_index, new.forks, num_prompt_logprobs,
            )
            work.append((new.seq_id, new.num_scheduled_tokens))
        for scheduled in plan.scheduled_sequences:
            seq = self.seqs[scheduled.seq_id]
            for update in scheduled.block_table_updates:
                end = update.start_index + len(update.block_ids)
                assert update.start_index <= len(seq.table)
                seq.table[update.start_index : end] = update.block_ids
            work.append((scheduled.seq_id, scheduled.num_scheduled_tokens))
        for seq_id, _ in work:
            self._check_reads(seq_id)
        outputs = []
        for seq_id, num_tokens in work:
            outputs.extend(self._compute(seq_id, num_tokens))
        return StepResult(step_id=plan.step_id, outputs=tuple(outputs))

    def _validate(self, plan: StepPlan) -> None:
        """Rejects, before changing anything, a plan that drops or schedules a sequence the worker does not hold,
        schedules one twice, or sends one it already holds (as the real worker's registry does)."""
        alive = set(self.seqs)
        for seq_id in plan.dropped_seq_ids:
            if seq_id not in alive:
                raise PlanRejectedError(f"dropped_seq_ids names unknown sequence {seq_id}")
            alive.remove(seq_id)
        scheduled = set()
        for new in plan.new_sequences:
            for seq_id in (new.seq_id, *new.fork_seq_ids):
                if seq_id in alive:
                    raise PlanRejectedError(f"sequence {seq_id} sent twice")
                alive.add(seq_id)
            scheduled.add(new.seq_id)
        for item in plan.scheduled_sequences:
            if item.seq_id not in alive or item.seq_id not in self.seqs or item.seq_id in scheduled:
                raise PlanRejectedError(f"scheduled sequence {item.seq_id} is unknown or scheduled twice")
            scheduled.add(item.seq_id)

    def _slot(self, seq: _WorkerSeq, position: int) -> tuple[int, int]:
        return seq.table[position // self.block_size], position % self.block_size

    def _check_reads(self, seq_id: int) -> None:
        seq = self.seqs[seq_id]
        for position in range(seq.num_computed):
            block_id, offset = self._slot(seq, position)
            assert self.gpu[block_id][offset] == seq.tokens[position], (
                f"sequence {seq_id} reads a wrong KV at position {position} (block {block_id})"
            )

    def _compute(self, seq_id: int, num_tokens: int) -> list[SequenceOutput]:
        seq = self.seqs[seq_id]
        end = seq.num_computed + num_tokens
        assert end <= len(seq.tokens), f"sequence {seq_id} scheduled past its known tokens"
        for position in range(seq.num_computed, end):
            block_id, offset = self._slot(seq, position)
            self.gpu[block_id][offset] = seq.tokens[position]
        # A prompt log-probability per computed prompt position, its logprob naming the position.
        prompt_logprobs = tuple(
            TokenLogprobs(seq.tokens[p], -float(p), 1)
            for p in range(seq.num_computed, min(end, seq.num_prompt_logprobs))
        )
        seq.num_computed = end
        self.num_computed_tokens += num_tokens
        if end < len(seq.tokens):
            return [SequenceOutput(seq_id, None, prompt_logprobs=prompt_logprobs)]
        outputs = []
        for fork in seq.forks:
            child = _WorkerSeq(list(seq.tokens), list(seq.table), end, fork.sample_index, ())
            child.tokens.append(self.next_token(child.tokens, child.sample_index))
            self.seqs[fork.seq_id] = child
            outputs.append(SequenceOutput(fork.seq_id, child.tokens[-1]))
        seq.forks = ()
        seq.tokens.append(self.next_token(seq.tokens, seq.sample_index))
        return [SequenceOutput(seq_id, seq.tokens[-1], prompt_logprobs=prompt_logprobs), *outputs]


def make_worker(scheduler: Scheduler, next_token: TokenFn = default_next_token) -> FakeWorker:
    bm = scheduler.block_manager
    return FakeWorker(bm.gpu.num_blocks, bm.cpu.num_blocks, bm.block_size, next_token)


@dataclass(slots=True)
class RunResult:
    """Tokens and finish reasons per (request_id, index), every plan, and every delta, in order."""

    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    finish_reasons: dict[tuple[str, int], FinishReason] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)
    deltas: list[SequenceDelta] = field(default_factory=list)

    def add(self, deltas: list[SequenceDelta]) -> None:
        for delta in deltas:
            key = (delta.request_id, delta.completion_index)
            self.tokens.setdefault(key, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                assert key not in self.finish_reasons, f"{key} finished twice"
                self.finish_reasons[key] = delta.finish_reason
        self.deltas.extend(deltas)


def run(
    scheduler: Scheduler,
    worker: FakeWorker,
    steps_in_flight: int = 1,
    max_steps: int = 10_000,
    on_step: Callable[[int, StepPlan], None] | None = None,
) -> RunResult:
    """Drives schedule -> worker -> update until every request finished, keeping up to steps_in_flight
    plans outstanding (2: step N+1 is planned before step N's result is applied). on_step runs after each
    planned step, with its index."""
    result = RunResult()
    in_flight: deque[tuple[StepPlan, StepResult]] = deque()
    for _ in range(max_steps):
        while len(in_flight) < steps_in_flight:
            plan = scheduler.schedule()
            if plan.is_empty:
                break
            result.plans.append(plan)
            in_flight.append((plan, worker.execute(plan)))
            if on_step is not None:
                on_step(len(result.plans) - 1, plan)
        if not in_flight:
            assert not scheduler.has_unfinished_requests(), "requests left but nothing to schedule"
            return result
        plan, output = in_flight.popleft()
        result.add(scheduler.update_from_output(plan, output))
    raise AssertionError(f"not finished after {max_steps} steps")


def step_once(scheduler: Scheduler, worker: FakeWorker) -> tuple[StepPlan, list[SequenceDelta]]:
    plan = scheduler.schedule()
    return plan, scheduler.update_from_output(plan, worker.execute(plan))


def assert_block_invariants(bm: BlockManager) -> None:
    """free + used == total; each ref count equals its holders; free exactly when unreferenced; the cache
    map and the blocks' hashes agree."""
    holders = {Device.GPU: Counter[int](), Device.CPU: Counter[int]()}
    for seq_id in bm.seq_ids():
        holders[bm.device(seq_id)].update(bm.block_ids(seq_id))
    for device, pool in ((Device.GPU, bm.gpu), (Device.CPU, bm.cpu)):
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        assert len(set(pool.free_queue())) == pool.num_free_blocks
        for block_id in range(pool.num_blocks):
            assert pool.ref_count(block_id) == holders[device][block_id], f"{device} block {block_id}"
            assert pool.is_free(block_id) == (pool.ref_count(block_id) == 0)
            block_hash = pool.block_hash(block_id)
            if block_hash is not None:
                assert pool.lookup(block_hash) == block_id


def assert_scheduler_invariants(scheduler: Scheduler) -> None:
    """Block invariants, and only live sequences of unfinished requests hold tables."""
    bm = scheduler.block_manager
    assert_block_invariants(bm)
    live = {
        seq.seq_id
        for request_id in scheduler._requests
        for seq in scheduler._requests[request_id].unfinished_sequences
    }
    assert set(bm.seq_ids()) <= live
    stats = scheduler.stats
    assert stats.num_running + stats.num_waiting + stats.num_swapped == len(scheduler._requests)
