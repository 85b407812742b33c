"""One worker's scheduler: plans each step within one token budget and applies the step's results."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import structlog

from pagedserve.control_plane.block_manager import BlockManager, CachedPrefix
from pagedserve.control_plane.config import CacheConfig, PreemptionMode, SchedulerConfig
from pagedserve.control_plane.errors import InvalidArgumentError, ResourceExhaustedError
from pagedserve.control_plane.preemption import make_preemption_policy
from pagedserve.control_plane.request import (
    FinishReason,
    Request,
    RequestStatus,
    Sequence,
    SequenceDelta,
    check_stop,
    worker_sampling,
)
from pagedserve.control_plane.request_queue import make_request_queue
from pagedserve.control_plane.stats import SchedulerStats
from pagedserve.control_plane.step_plan import (
    BlockTableUpdate,
    NewSequencePlan,
    ScheduledSequencePlan,
    SequenceOutput,
    StepOutput,
    StepPlan,
    TokenLogprobs,
)

log = structlog.get_logger()

__all__ = ["Scheduler", "SchedulerStats"]


@dataclass(frozen=True, slots=True)
class _Work:
    """Tokens one sequence computes this step; prefix is set when the worker does not hold the sequence."""

    seq: Sequence
    num_new_tokens: int
    prefix: CachedPrefix | None

    @property
    def end(self) -> int:
        start = self.prefix.num_tokens if self.prefix else self.seq.num_computed_tokens
        return start + self.num_new_tokens


@dataclass(frozen=True, slots=True)
class _Expect:
    """What a planned step owes one sequence: a sampled token, and first tokens for forked siblings."""

    samples: bool
    fork_seq_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class _Step:
    """The decisions of one schedule() call so far."""

    budget: int
    num_seqs: int
    dropped_seq_ids: list[int]
    has_preempted: bool = False
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_sequences: list[NewSequencePlan] = field(default_factory=list)
    scheduled_sequences: list[ScheduledSequencePlan] = field(default_factory=list)
    expects: dict[int, _Expect] = field(default_factory=dict)
    scheduled: list[tuple[Request, Sequence]] = field(default_factory=list)

    def build(self, step_id: int) -> StepPlan:
        return StepPlan(
            step_id=step_id,
            dropped_seq_ids=tuple(self.dropped_seq_ids),
            swap_out=tuple(self.swap_out),
            swap_in=tuple(self.swap_in),
            block_copies=tuple(self.block_copies),
            new_sequences=tuple(self.new_sequences),
            scheduled_sequences=tuple(self.scheduled_sequences),
        )


class Scheduler:
    """Plans one worker's steps: each sequence's num_computed_tokens chases its num_tokens within
    max_num_batched_tokens; running requests first, then swapped ones, then waiting ones.

    Invariants: an unfinished request is in exactly one of waiting, running, swapped; a sequence holds a
    block table exactly while the worker holds its KV (device table: running, CPU table: swapped); a
    finished request holds no block. Progress advances at schedule time, so the next step can be planned
    before this one's result arrives; results for sequences that ended meanwhile are ignored.
    """

    def __init__(
        self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_gpu_blocks: int, num_cpu_blocks: int
    ) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.block_manager = BlockManager(
            num_gpu_blocks, num_cpu_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self._policy = make_preemption_policy(scheduler_config.scheduling_policy)
        self._waiting = make_request_queue(scheduler_config.scheduling_policy)
        self._swapped = make_request_queue(scheduler_config.scheduling_policy)
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self._seqs: dict[int, tuple[Request, Sequence]] = {}
        self._seq_ids = itertools.count()
        self._next_step_id = 0
        self._dropped: list[int] = []
        self._table_rewrites: set[int] = set()  # swapped-in sequences whose next plan rewrites the table
        self._expects: dict[int, dict[int, _Expect]] = {}  # step id -> seq id -> what the step owes it
        self._finished_deltas: list[SequenceDelta] = []  # finishes decided while planning, reported next
        self._num_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    # Requests in and out.

    def add_request(self, request: Request) -> None:
        """Queues the request; ResourceExhaustedError when the queue is full or its prompt can never fit."""
        max_model_len = self.config.max_model_len
        if max_model_len is not None and request.num_prompt_tokens > max_model_len:
            raise InvalidArgumentError(
                "prompt_token_ids", f"{request.num_prompt_tokens} tokens exceed max_model_len {max_model_len}"
            )
        if request.request_id in self._requests:
            raise InvalidArgumentError("request_id", f"{request.request_id!r} is already scheduled")
        if self.config.max_num_waiting is not None and len(self._waiting) >= self.config.max_num_waiting:
            raise ResourceExhaustedError(f"waiting queue is full ({self.config.max_num_waiting} requests)")
        if request.sampling_params.n > self.config.max_num_seqs:
            raise ResourceExhaustedError(
                f"n={request.sampling_params.n} sequences exceed max_num_seqs {self.config.max_num_seqs}"
            )
        block_size = self.cache_config.block_size
        num_blocks = -(-(request.num_prompt_tokens + 1) // block_size)
        if num_blocks > self.block_manager.gpu.num_blocks:
            raise ResourceExhaustedError(
                f"prompt of {request.num_prompt_tokens} tokens needs {num_blocks} KV blocks, "
                f"the pool has {self.block_manager.gpu.num_blocks}"
            )
        for index in range(request.sampling_params.n):
            seq = Sequence(seq_id=next(self._seq_ids), index=index, is_forked=index == 0)
            request.sequences.append(seq)
            self._seqs[seq.seq_id] = (request, seq)
        self._requests[request.request_id] = request
        self._waiting.add(request)

    def abort_request(self, request_id: str) -> None:
        """Frees the request's blocks now; the worker drops its sequences with the next plan."""
        request = self._requests.get(request_id)
        if request is None:
            return
        for seq in request.unfinished_sequences:
            seq.finish_reason = FinishReason.ABORT
            self._release(seq)
        self._end_request(request, RequestStatus.ABORTED)

    def finish_sequence(self, request_id: str, index: int, reason: FinishReason) -> None:
        """Ends one sequence (a stop string matched downstream); unknown or finished ones: no-op."""
        request = self._requests.get(request_id)
        if request is None or not 0 <= index < len(request.sequences):
            return
        seq = request.sequences[index]
        # A sibling not yet forked has produced nothing a stop string could match.
        if not seq.is_finished and seq.is_forked:
            self._finish(request, seq, reason, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_swapped=len(self._swapped),
            num_used_blocks=bm.gpu.num_used_blocks,
            num_total_blocks=bm.gpu.num_blocks,
            num_preemptions=self._num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )

    # Planning.

    def schedule(self) -> StepPlan:
        """Plans the next step. Its step_id advances only when the plan is not empty."""
        step = _Step(self.config.max_num_batched_tokens, self._num_running_seqs(), self._dropped)
        self._make_room_for_waiting(step)
        self._extend_running(step)
        if not step.has_preempted:
            self._resume_swapped(step)
            if not self._swapped:
                self._admit_waiting(step)
        self._cache_computed_blocks(step)
        self._dropped = []
        plan = step.build(self._next_step_id)
        if not plan.is_empty:
            self._next_step_id += 1
            if step.expects:
                self._expects[plan.step_id] = step.expects
        return plan

    def _num_running_seqs(self) -> int:
        return sum(r.num_seqs_reserved for r in self._running)

    def _make_room_for_waiting(self, step: _Step) -> None:
        """Preempts running requests the policy ranks below the next waiting one, until the latter fits."""
        if not self._waiting or self._swapped:
            return
        request = self._waiting.peek()
        while (victim := self._policy.pick_victim_for(request, self._running)) is not None:
            num_seqs = self._num_running_seqs() + request.num_seqs_reserved
            if num_seqs <= self.config.max_num_seqs and self._plan(request, step.budget) is not None:
                return
            self._preempt(victim, step)

    def _extend_running(self, step: _Step) -> None:
        """Schedules running requests in order; out of blocks, preempts the policy's victim and retries."""
        index = 0
        while index < len(self._running) and step.budget > 0:
            request = self._running[index]
            works = self._plan(request, step.budget)
            while works is None:
                if len(self._running) == 1:
                    # Alone and still short of blocks: it can never grow. Tokens still in flight arrive
                    # first, so a pipelined run ends it with the same tokens as a synchronous one.
                    if any(s.num_pending_tokens for s in request.live_sequences):
                        works = []
                    else:
                        self._finish_unfittable(request)
                    break
                victim = self._policy.pick_victim(self._running[index:])
                self._preempt(victim, step)
                step.has_preempted = True
                if victim is request:
                    break
                works = self._plan(request, step.budget)
            if works is not None:
                self._commit(request, works, step)
                index += 1

    def _resume_swapped(self, step: _Step) -> None:
        """Swaps requests back in, in queue order, while their blocks (and a block per sequence) fit."""
        bm = self.block_manager
        while self._swapped:
            request = self._swapped.peek()
            seq_ids = [s.seq_id for s in request.live_sequences if bm.has_table(s.seq_id)]
            if step.num_seqs + request.num_seqs_reserved > self.config.max_num_seqs:
                return
            if not bm.can_swap_in(seq_ids, len(seq_ids)):
                if not self._running:
                    self._swapped.pop()
                    self._finish_unfittable(request)
                    continue
                return
            self._swapped.pop()
            step.swap_in.extend(bm.swap_in(seq_ids))
            self._table_rewrites.update(seq_ids)
            self._start_running(request, step)
            works = self._plan(request, step.budget)
            if works:
                self._commit(request, works, step)

    def _admit_waiting(self, step: _Step) -> None:
        """Admits waiting requests in queue order while the budget, max_num_seqs and the blocks allow."""
        while self._waiting and step.budget > 0:
            request = self._waiting.peek()
            if step.num_seqs + request.num_seqs_reserved > self.config.max_num_seqs:
                return
            works = self._plan(request, step.budget)
            if works is None and not self._running:
                self._waiting.pop()
                self._finish_unfittable(request)
                continue
            if not works:
                return
            self._waiting.pop()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = sum(w.prefix.num_tokens for w in works if w.prefix)
            self._start_running(request, step)
            self._commit(request, works, step)

    def _start_running(self, request: Request, step: _Step) -> None:
        request.set_status(RequestStatus.RUNNING)
        self._running.append(request)
        step.num_seqs += request.num_seqs_reserved

    def _plan(self, request: Request, budget: int) -> list[_Work] | None:
        """Tokens each live sequence of request computes within budget; None when the blocks lack."""
        works = []
        for seq in request.live_sequences:
            if budget == 0:
                break
            prefix = None if self.block_manager.has_table(seq.seq_id) else self._find_prefix(request, seq)
            num_new = self._num_new_tokens(request, seq, prefix, budget)
            if num_new:
                works.append(_Work(seq, num_new, prefix))
                budget -= num_new
        bm = self.block_manager
        needed = sum(bm.num_blocks_needed(w.seq.seq_id, w.end, w.prefix) for w in works)
        needed += bm.num_copies_needed((w.seq.seq_id, w.seq.num_computed_tokens) for w in works if w.prefix is None)
        return works if needed <= bm.gpu.num_free_blocks else None

    def _find_prefix(self, request: Request, seq: Sequence) -> CachedPrefix:
        # Prompt log-probabilities need every prompt position computed, so such prompts skip the cache.
        if request.sampling_params.prompt_logprobs is not None and not request.is_prompt_done:
            return CachedPrefix((), (), 0, 0)
        return self.block_manager.find_cached_prefix(request.tokens(seq))

    def _num_new_tokens(self, request: Request, seq: Sequence, prefix: CachedPrefix | None, budget: int) -> int:
        computed = prefix.num_tokens if prefix else seq.num_computed_tokens
        remaining = request.num_tokens(seq) - computed
        if remaining <= 0 or self._reaches_limit(request, seq):
            return 0
        num_new = min(remaining, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        if num_new < remaining and not self.config.enable_chunked_prefill:
            return 0
        return num_new

    def _reaches_limit(self, request: Request, seq: Sequence) -> bool:
        """Whether the tokens seq has or will be sent already finish it by length: computing more would be
        wasted (the lag of pipelined planning must not run a sequence past max_tokens)."""
        num_outputs = len(seq.output_token_ids) + seq.num_pending_tokens
        if num_outputs == 0:
            return False
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and num_outputs >= max_tokens:
            return True
        max_model_len = self.config.max_model_len
        return max_model_len is not None and request.num_tokens(seq) >= max_model_len

    def _commit(self, request: Request, works: list[_Work], step: _Step) -> None:
        # Tables of new sequences first: it takes their cached prefix blocks out of the free queue before
        # any allocation could evict them.
        for work in works:
            if work.prefix is not None:
                self.block_manager.create_table(work.seq.seq_id, work.prefix)
                work.seq.num_computed_tokens = work.prefix.num_tokens
        for work in works:
            self._commit_seq(request, work, step)

    def _commit_seq(self, request: Request, work: _Work, step: _Step) -> None:
        seq, bm = work.seq, self.block_manager
        start = seq.num_computed_tokens
        change = bm.allocate_slots(seq.seq_id, start, start + work.num_new_tokens)
        if change is None:
            raise RuntimeError(f"sequence {seq.seq_id}: blocks counted free were not")
        step.block_copies.extend(change.copies)
        if work.prefix is not None:
            step.new_sequences.append(self._new_sequence_plan(request, seq, start, work.num_new_tokens))
            seq.is_on_worker = True
        else:
            updates: tuple[BlockTableUpdate, ...] = ()
            if seq.seq_id in self._table_rewrites:
                self._table_rewrites.discard(seq.seq_id)
                updates = (BlockTableUpdate(0, bm.block_ids(seq.seq_id)),)
            elif change.block_ids:
                updates = (BlockTableUpdate(change.start_index, change.block_ids),)
            step.scheduled_sequences.append(ScheduledSequencePlan(seq.seq_id, work.num_new_tokens, updates))
        seq.num_computed_tokens += work.num_new_tokens
        step.budget -= work.num_new_tokens
        step.scheduled.append((request, seq))
        samples = seq.num_computed_tokens == request.num_tokens(seq)
        forks: tuple[int, ...] = ()
        if samples:
            seq.num_pending_tokens += 1
            siblings = [s for s in request.sequences if not s.is_forked and not s.is_on_worker]
            for sibling in siblings:
                sibling.is_on_worker = True
            forks = tuple(s.seq_id for s in siblings)
        step.expects[seq.seq_id] = _Expect(samples, forks)

    def _new_sequence_plan(self, request: Request, seq: Sequence, start: int, num_new: int) -> NewSequencePlan:
        forks = tuple(s.seq_id for s in request.sequences if not s.is_forked) if seq.index == 0 else ()
        return NewSequencePlan(
            seq_id=seq.seq_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=tuple(seq.output_token_ids),
            sampling=worker_sampling(request, include_prompt_logprobs=not request.is_prompt_done),
            block_ids=self.block_manager.block_ids(seq.seq_id),
            num_computed_tokens=start,
            num_scheduled_tokens=num_new,
            fork_seq_ids=forks,
            sample_index=seq.index,
        )

    def _cache_computed_blocks(self, step: _Step) -> None:
        # Done after every admission of the step, so that no sequence reuses KV computed in the same step.
        for request, seq in step.scheduled:
            self._cache_blocks(request, seq)

    def _cache_blocks(self, request: Request, seq: Sequence) -> None:
        bm = self.block_manager
        known = request.num_prompt_tokens + len(seq.output_token_ids)
        num_full = min(seq.num_computed_tokens, known) // self.cache_config.block_size
        if bm.enable_prefix_caching and bm.has_table(seq.seq_id) and bm.num_hashed_blocks(seq.seq_id) < num_full:
            bm.cache_full_blocks(seq.seq_id, request.tokens(seq), seq.num_computed_tokens)

    # Preemption and endings.

    def _preempt(self, request: Request, step: _Step) -> None:
        """Evicts a running request: to the CPU pool in SWAP mode when it fits, else by recompute."""
        bm = self.block_manager
        self._running.remove(request)
        step.num_seqs -= request.num_seqs_reserved
        self._num_preemptions += 1
        seq_ids = [s.seq_id for s in request.live_sequences if bm.has_table(s.seq_id)]
        mode = self.config.preemption_mode
        if mode is PreemptionMode.SWAP and seq_ids and bm.can_swap_out(seq_ids):
            step.swap_out.extend(bm.swap_out(seq_ids))
            request.set_status(RequestStatus.SWAPPED)
            self._swapped.add(request)
        else:
            mode = PreemptionMode.RECOMPUTE
            self._reset_for_recompute(request)
            request.set_status(RequestStatus.PREEMPTED)
            self._waiting.add_preempted(request)
        emit = log.warning if self._num_preemptions % 50 == 1 else log.debug
        emit(
            "request_preempted",
            request_id=request.request_id,
            mode=mode.name,
            total_cumulative_preemption_cnt=self._num_preemptions,
            message=(
                f"Request {request.request_id} was preempted by {mode} because the KV cache has no free "
                "block left; raise gpu_memory_utilization or lower max_num_seqs or max_num_batched_tokens "
                f"to avoid it. total_cumulative_preemption_cnt={self._num_preemptions}"
            ),
        )

    def _reset_for_recompute(self, request: Request) -> None:
        """Forgets the request's KV; each sequence comes back under a new id (stale results then match
        nothing) with its known tokens to compute again."""
        for seq in request.unfinished_sequences:
            self._release(seq)
            seq.seq_id = next(self._seq_ids)
            seq.num_computed_tokens = 0
            seq.num_pending_tokens = 0
            self._seqs[seq.seq_id] = (request, seq)
        request.num_prompt_logprobs_to_skip = request.num_prompt_logprobs_delivered

    def _release(self, seq: Sequence) -> None:
        """Frees the sequence's blocks and forgets its id; the worker drops it with the next plan."""
        self.block_manager.free(seq.seq_id)
        if seq.is_on_worker:
            self._dropped.append(seq.seq_id)
            seq.is_on_worker = False
        self._seqs.pop(seq.seq_id, None)
        self._table_rewrites.discard(seq.seq_id)

    def _finish(self, request: Request, seq: Sequence, reason: FinishReason, stop_token_id: int | None) -> None:
        seq.finish_reason = reason
        seq.stop_token_id = stop_token_id
        self._release(seq)
        if not request.unfinished_sequences:
            self._end_request(request, RequestStatus.FINISHED)

    def _finish_unfittable(self, request: Request) -> None:
        """Ends a request that cannot grow even with the whole pool to itself (it is out of the queues)."""
        log.warning("request_exceeds_kv_pool", request_id=request.request_id)
        for seq in request.unfinished_sequences:
            self._finished_deltas.append(SequenceDelta(request.request_id, seq.index, (), (), (), FinishReason.LENGTH))
            self._finish(request, seq, FinishReason.LENGTH, None)

    def _end_request(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        elif request.status is RequestStatus.SWAPPED and request in self._swapped:
            self._swapped.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and request in self._waiting:
            self._waiting.remove(request)
        request.set_status(status)
        del self._requests[request.request_id]

    # Results.

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> list[SequenceDelta]:
        """Applies a step's sampled tokens (forks, stop checks, frees); returns what each sequence gained.
        Plans are answered in order; outputs of sequences that ended since their step was planned are ignored."""
        if output.step_id != plan.step_id:
            raise ValueError(f"output of step {output.step_id} applied to plan {plan.step_id}")
        deltas, self._finished_deltas = self._finished_deltas, []
        for seq_id, expect in self._expects.pop(plan.step_id, {}).items():
            owner = self._seqs.get(seq_id)
            if owner is not None:
                request, seq = owner
                deltas.extend(self._apply_output(request, seq, expect, output))
        return deltas

    def _apply_output(self, request: Request, seq: Sequence, expect: _Expect, output: StepOutput) -> list[SequenceDelta]:
        out = output.by_seq_id.get(seq.seq_id)
        prompt_logprobs = self._new_prompt_logprobs(request, out)
        if not expect.samples:
            if not prompt_logprobs:
                return []
            return [SequenceDelta(request.request_id, seq.index, (), (), prompt_logprobs, None)]
        out = _sampled(output, seq.seq_id)
        seq.num_pending_tokens -= 1
        if not request.is_prompt_done:
            request.is_prompt_done = True
            self._num_prompt_tokens += request.num_prompt_tokens
        siblings = self._fork(request, seq, expect.fork_seq_ids)
        deltas = [self._append_token(request, seq, out, prompt_logprobs)]
        for sibling in siblings:
            deltas.append(self._append_token(request, sibling, _sampled(output, sibling.seq_id), ()))
        return deltas

    def _fork(self, request: Request, parent: Sequence, fork_seq_ids: tuple[int, ...]) -> list[Sequence]:
        """Siblings share the parent's prompt blocks from now on (the worker forked them in that step)."""
        siblings = []
        for sibling in request.sequences:
            if sibling.seq_id in fork_seq_ids and not sibling.is_finished:
                self.block_manager.fork(parent.seq_id, sibling.seq_id, request.num_prompt_tokens)
                sibling.is_forked = True
                sibling.num_computed_tokens = request.num_prompt_tokens
                siblings.append(sibling)
        return siblings

    def _append_token(
        self, request: Request, seq: Sequence, out: SequenceOutput, prompt_logprobs: tuple[TokenLogprobs, ...]
    ) -> SequenceDelta:
        assert out.token_id is not None
        seq.output_token_ids.append(out.token_id)
        self._num_generation_tokens += 1
        stop = check_stop(request, seq, self.config.max_model_len)
        if stop is not None:
            self._finish(request, seq, *stop)
        else:
            self._cache_blocks(request, seq)
        logprobs = (out.logprobs,) if out.logprobs is not None else ()
        return SequenceDelta(
            request.request_id, seq.index, (out.token_id,), logprobs, prompt_logprobs,
            seq.finish_reason, seq.stop_token_id,
        )

    @staticmethod
    def _new_prompt_logprobs(request: Request, out: SequenceOutput | None) -> tuple[TokenLogprobs, ...]:
        if out is None or not out.prompt_logprobs:
            return ()
        skip = min(request.num_prompt_logprobs_to_skip, len(out.prompt_logprobs))
        request.num_prompt_logprobs_to_skip -= skip
        entries = out.prompt_logprobs[skip:]
        request.num_prompt_logprobs_delivered += len(entries)
        return entries


def _sampled(output: StepOutput, seq_id: int) -> SequenceOutput:
    out = output.by_seq_id.get(seq_id)
    if out is None or out.token_id is None:
        raise ValueError(f"step {output.step_id} returned no sampled token for sequence {seq_id}")
    return out
