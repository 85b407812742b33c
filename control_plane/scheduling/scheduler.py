"""One worker's scheduler: plans each step within one token budget and applies the step's results."""

from __future__ import annotations

import time

import structlog

from pagedserve.contract.step import BlockTableUpdate, StepPlan, StepResult
from pagedserve.control_plane.config import CacheConfig, PreemptionMode, SchedulerConfig
from pagedserve.control_plane.errors import InvalidArgumentError, ResourceExhaustedError
from pagedserve.control_plane.scheduling.block_manager import BlockManager
from pagedserve.control_plane.scheduling.fit import (
    blocks_for,
    longest_sequence,
    never_fits_error,
    resumed_sequence,
    shortest_sequence,
)
from pagedserve.control_plane.scheduling.output_applier import OutputApplier
from pagedserve.control_plane.scheduling.preemption import make_preemption_policy
from pagedserve.control_plane.scheduling.request import (
    FinishReason,
    Request,
    RequestStatus,
    Sequence,
    SequenceDelta,
)
from pagedserve.control_plane.scheduling.request_queue import make_request_queue
from pagedserve.control_plane.scheduling.sequence_registry import SequenceRegistry
from pagedserve.control_plane.scheduling.stats import SchedulerStats
from pagedserve.control_plane.scheduling.step_builder import Expectation, SeqWork, StepBuilder
from pagedserve.control_plane.scheduling.work_planner import WorkPlanner

log = structlog.get_logger()

__all__ = ["Scheduler", "SchedulerStats"]


class Scheduler:
    """Plans one worker's steps: each sequence's num_computed_tokens chases its num_tokens within
    max_num_batched_tokens; running requests first, then swapped ones, then waiting ones.

    Invariants: an unfinished request is in exactly one of waiting, running, swapped; a sequence holds a
    block table exactly while the worker holds its KV (device table: running, CPU table: swapped); a
    finished request holds no block. Progress advances at schedule time, so the next step can be planned
    before this one's result arrives; results for sequences that ended meanwhile are ignored.
    It owns the queues and the step's decisions; WorkPlanner sizes each request's work, OutputApplier applies
    each step's results.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
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
        self._seqs = SequenceRegistry(self.block_manager)
        self._next_step_id = 0
        # A sequence ends (LENGTH) before it outgrows the whole pool: its known tokens, all but the last
        # one computed, must fit there alone, or it could never resume after a preemption.
        pool_len = num_gpu_blocks * cache_config.block_size + 1
        max_len = min(scheduler_config.max_model_len or pool_len, pool_len)
        self._planner = WorkPlanner(scheduler_config, self.block_manager, max_len)
        self._outputs = OutputApplier(self.block_manager, self._seqs, max_len, self._finish, self._cache_blocks,
                                      lambda request: self.abort_request(request.request_id))
        self._num_preemptions = 0
        # The last plan's sequences whose computed blocks are not registered for prefix reuse yet (see schedule).
        self._uncached: list[tuple[Request, Sequence]] = []

    # Requests in and out.

    def add_request(self, request: Request) -> None:
        """Queues the request; ResourceExhaustedError when the queue is full, NeverFitsError when the pool can
        never hold it."""
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
        if not self.can_ever_hold(request):
            raise never_fits_error(request, self.cache_config.block_size, self.block_manager.gpu.num_blocks)
        request.sequences.extend(self._seqs.add(request, index) for index in range(request.sampling_params.n))
        self._requests[request.request_id] = request
        self._waiting.add(request)

    def adopt(self, request: Request) -> None:
        """Takes over a request from the scheduler of a worker that failed: its unfinished sequences are computed
        again here from their known tokens (prompt and outputs), ahead of new requests, as after a preemption by
        recompute; greedy and seeded ones go on with the tokens they would have had. ValueError unless
        can_resume(request)."""
        if request.is_finished or request.request_id in self._requests:
            raise ValueError(f"request {request.request_id}: finished, or already scheduled here")
        if not self.can_resume(request):
            raise ValueError(f"request {request.request_id}: does not fit this worker")
        self._seqs.adopt(request)
        self._requests[request.request_id] = request
        if request.status is RequestStatus.WAITING:
            self._waiting.add(request)
            return
        if request.status is not RequestStatus.PREEMPTED:
            request.set_status(RequestStatus.PREEMPTED)
        self._waiting.add_preempted(request)

    def can_resume(self, request: Request) -> bool:
        """Whether this worker takes a request another worker ran: its n within max_num_seqs, and its pool holds
        each unfinished sequence with its known tokens and one more (fit.resumed_sequence)."""
        return (request.sampling_params.n <= self.config.max_num_seqs
                and blocks_for(resumed_sequence(request), self.cache_config.block_size)
                <= self.block_manager.gpu.num_blocks)

    def can_ever_hold(self, request: Request) -> bool:
        """Whether this worker's pool holds the prompt and min_tokens of a sequence of the request: if not, it
        can never run here (fit.py)."""
        return blocks_for(shortest_sequence(request), self.cache_config.block_size) <= self.block_manager.gpu.num_blocks

    def can_hold_to_the_end(self, request: Request) -> bool:
        """Whether this worker's pool holds the request's longest possible sequence, so that no sequence of it is
        cut short by the pool (LENGTH before max_tokens)."""
        num_tokens = longest_sequence(request, self.config.max_model_len)
        return blocks_for(num_tokens, self.cache_config.block_size) <= self.block_manager.gpu.num_blocks

    def abort_request(self, request_id: str) -> None:
        """Frees the request's blocks now; the worker drops its sequences with the next plan."""
        self.cache_planned_blocks()
        request = self._requests.get(request_id)
        if request is None:
            return
        for seq in request.unfinished_sequences:
            seq.finish_reason = FinishReason.ABORT
            self._seqs.release(seq)
        self._end_request(request, RequestStatus.ABORTED)

    def finish_sequence(self, request_id: str, index: int, reason: FinishReason) -> None:
        """Ends one sequence (a stop string matched downstream); unknown or finished ones: no-op."""
        self.cache_planned_blocks()
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
            num_prompt_tokens=self._outputs.num_prompt_tokens,
            num_generation_tokens=self._outputs.num_generation_tokens,
        )

    # Planning.

    @property
    def has_pending_drops(self) -> bool:
        """Whether sequences that ended still wait for a plan to drop them on the worker."""
        return self._seqs.has_dropped

    def schedule(self, drops_alone: bool = True) -> StepPlan:
        """Plans the next step. Its step_id advances only when the plan is not empty. drops_alone False: a plan
        that would only drop sequences is not made (an empty plan comes back), and the drops wait for the next.
        The blocks the plan computes join the prefix cache in cache_planned_blocks, which every entry point that
        reads or frees block tables calls first, this one included: the caller can send the plan before it pays
        for hashing them (the 64 blocks of a 1,024-token prompt take a few hundred microseconds)."""
        self.cache_planned_blocks()
        step = StepBuilder(self.config.max_num_batched_tokens, self._num_running_seqs())
        self._make_room_for_waiting(step)
        self._extend_running(step)
        if not step.has_preempted:
            self._resume_swapped(step)
            if not self._swapped:
                self._admit_waiting(step)
        self._uncached = step.to_cache
        dropped = self._seqs.take_dropped() if drops_alone or not step.is_empty else []
        plan = step.build(self._next_step_id, dropped)
        if not plan.is_empty:
            self._next_step_id += 1
            if step.expectations:
                self._outputs.expect(plan.step_id, step.expectations)
        return plan

    def _num_running_seqs(self) -> int:
        return sum(r.num_seqs_reserved for r in self._running)

    def _make_room_for_waiting(self, step: StepBuilder) -> None:
        """Preempts running requests the policy ranks below the next waiting one, until the latter fits."""
        if not self._waiting or self._swapped:
            return
        request = self._waiting.peek()
        while (victim := self._policy.pick_victim_for(request, self._running)) is not None:
            num_seqs = self._num_running_seqs() + request.num_seqs_reserved
            if num_seqs <= self.config.max_num_seqs and self._planner.plan(request, step.budget) is not None:
                return
            self._preempt(victim, step)

    def _extend_running(self, step: StepBuilder) -> None:
        """Schedules running requests in the policy's order; out of blocks, preempts the policy's victim
        among those not yet scheduled and retries."""
        self._policy.order(self._running)
        index = 0
        while index < len(self._running) and step.budget > 0:
            request = self._running[index]
            if self._extend_by_one_token(request, step):
                index += 1
                continue
            works = self._planner.plan(request, step.budget)
            while works is None:
                if len(self._running) == 1:
                    # Alone, its sequences together outgrow the pool: some of them wait for the others.
                    self._preempt_sequence(request, step)
                    works = self._planner.plan(request, step.budget)
                    continue
                victim = self._policy.pick_victim(self._running[index:])
                self._preempt(victim, step)
                step.has_preempted = True
                if victim is request:
                    break
                works = self._planner.plan(request, step.budget)
            if works is not None:
                self._commit(request, works, step)
                index += 1

    def _extend_by_one_token(self, request: Request, step: StepBuilder) -> bool:
        """Plans and commits the common decode case at a fraction of the general path's cost: a request of one
        sequence, held by the worker, whose one token to compute is its last sampled one. Returns False, having
        changed nothing, when the case does not apply or its slot needs a copy, or a block while none is free;
        the general path (which preempts) decides then. Its outcome equals the general path's."""
        sequences = request.sequences
        if len(sequences) != 1:
            return False
        seq = sequences[0]
        seq_id, num_computed = seq.seq_id, seq.num_computed_tokens
        num_outputs = len(seq.output_token_ids) + seq.num_pending_tokens
        num_tokens = len(request.prompt_token_ids) + num_outputs
        if (num_tokens - num_computed != 1 or self._seqs.has_table_rewrite(seq_id)
                or self._planner.limit_reached(request, num_outputs, num_tokens)):
            return False
        appended = self.block_manager.append_slot(seq_id, num_computed)
        if appended is None:
            return False
        step.add_scheduled(seq_id, 1, BlockTableUpdate(num_computed // self.cache_config.block_size, appended)
                           if appended else None)
        seq.num_computed_tokens = num_tokens
        seq.num_pending_tokens += 1
        # Its known tokens are all computed now; the last of them completes a block only at a block boundary
        # (earlier blocks were cached when their tokens became known or computed), so only then is there any
        # block to cache.
        step.record(request, seq, 1, _SAMPLES, needs_caching=num_tokens % self.cache_config.block_size == 0)
        return True

    def _resume_swapped(self, step: StepBuilder) -> None:
        """Swaps requests back in, in queue order, while their blocks (and a block per sequence) fit."""
        bm = self.block_manager
        while self._swapped:
            request = self._swapped.peek()
            seq_ids = [s.seq_id for s in request.live_sequences if bm.has_table(s.seq_id)]
            if step.num_seqs + request.num_seqs_reserved > self.config.max_num_seqs:
                return
            # A block per sequence to grow into, unless it has the pool to itself (it fit there before).
            if not bm.can_swap_in(seq_ids, len(seq_ids) if self._running else 0):
                return
            self._swapped.pop()
            step.swap_in.extend(bm.swap_in(seq_ids))
            self._seqs.rewrite_tables(seq_ids)
            self._start_running(request, step)
            works = self._planner.plan(request, step.budget)
            if works:
                self._commit(request, works, step)

    def _admit_waiting(self, step: StepBuilder) -> None:
        """Admits waiting requests in queue order while the budget, max_num_seqs and the blocks allow."""
        while self._waiting and step.budget > 0:
            request = self._waiting.peek()
            if step.num_seqs + request.num_seqs_reserved > self.config.max_num_seqs:
                return
            works = self._planner.plan(request, step.budget)
            if not works:
                return
            self._waiting.pop()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = sum(w.prefix.num_tokens for w in works if w.prefix)
                request.first_scheduled_time_s = time.monotonic()
            self._start_running(request, step)
            self._commit(request, works, step)

    def _start_running(self, request: Request, step: StepBuilder) -> None:
        request.set_status(RequestStatus.RUNNING)
        self._running.append(request)
        step.num_seqs += request.num_seqs_reserved

    def _commit(self, request: Request, works: list[SeqWork], step: StepBuilder) -> None:
        # Tables of new sequences first: it takes their cached prefix blocks out of the free queue before
        # any allocation could evict them.
        for work in works:
            if work.prefix is not None:
                self.block_manager.create_table(work.seq.seq_id, work.prefix)
                work.seq.num_computed_tokens = work.prefix.num_tokens
        for work in works:
            self._commit_seq(request, work, step)

    def _commit_seq(self, request: Request, work: SeqWork, step: StepBuilder) -> None:
        seq, bm = work.seq, self.block_manager
        change = bm.allocate_slots(seq.seq_id, seq.num_computed_tokens, work.end)
        if change is None:
            raise RuntimeError(f"sequence {seq.seq_id}: blocks counted free were not")
        step.block_copies.extend(change.copies)
        if work.prefix is not None:
            step.add_new(request, seq, bm.block_ids(seq.seq_id), work.num_new_tokens)
            seq.is_on_worker = True
        elif self._seqs.take_table_rewrite(seq.seq_id):
            step.add_scheduled(seq.seq_id, work.num_new_tokens, BlockTableUpdate(0, bm.block_ids(seq.seq_id)))
        else:
            update = BlockTableUpdate(change.start_index, change.block_ids) if change.block_ids else None
            step.add_scheduled(seq.seq_id, work.num_new_tokens, update)
        seq.num_computed_tokens = work.end
        forks: tuple[int, ...] = ()
        samples = seq.num_computed_tokens == request.num_tokens(seq)
        if samples:
            seq.num_pending_tokens += 1
            siblings = [s for s in request.sequences if not s.is_forked and not s.is_on_worker]
            for sibling in siblings:
                sibling.is_on_worker = True
            forks = tuple(s.seq_id for s in siblings)
        step.record(request, seq, work.num_new_tokens, Expectation(samples, forks))

    def cache_planned_blocks(self) -> None:
        """Registers the full blocks the last plan computes for prefix reuse. Deferred from schedule but done
        before anything else reads or frees block tables, so no sequence reuses KV computed in its own step."""
        uncached, self._uncached = self._uncached, []
        for request, seq in uncached:
            self._cache_blocks(request, seq)

    def _cache_blocks(self, request: Request, seq: Sequence) -> None:
        bm = self.block_manager
        known = request.num_prompt_tokens + len(seq.output_token_ids)
        num_full = min(seq.num_computed_tokens, known) // self.cache_config.block_size
        if bm.enable_prefix_caching and bm.has_table(seq.seq_id) and bm.num_hashed_blocks(seq.seq_id) < num_full:
            bm.cache_full_blocks(seq.seq_id, request.tokens(seq), seq.num_computed_tokens)

    # Preemption and endings.

    def _preempt(self, request: Request, step: StepBuilder) -> None:
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
            for seq in request.unfinished_sequences:
                self._seqs.reset_for_recompute(request, seq)
            request.set_status(RequestStatus.PREEMPTED)
            self._waiting.add_preempted(request)
        self._log_preemption(request, mode)

    def _log_preemption(self, request: Request, mode: PreemptionMode) -> None:
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

    def _preempt_sequence(self, request: Request, step: StepBuilder) -> None:
        """Recomputes the request's last sequence holding blocks later; never its only one (a sequence
        alone always fits the pool, see max_len in __init__)."""
        held = [s for s in request.live_sequences if self.block_manager.has_table(s.seq_id)]
        if len(held) < 2:
            raise RuntimeError(f"request {request.request_id} does not fit the KV pool alone")
        self._num_preemptions += 1
        step.has_preempted = True
        self._seqs.reset_for_recompute(request, held[-1])
        self._log_preemption(request, PreemptionMode.RECOMPUTE)

    def _finish(self, request: Request, seq: Sequence, reason: FinishReason, stop_token_id: int | None) -> None:
        seq.finish_reason = reason
        seq.stop_token_id = stop_token_id
        self._seqs.release(seq)
        if not request.unfinished_sequences:
            self._end_request(request, RequestStatus.FINISHED)

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

    def update_from_output(self, plan: StepPlan, output: StepResult) -> list[SequenceDelta]:
        """Applies a step's sampled tokens (forks, stop checks, frees); returns what each sequence gained.
        Plans are answered in order; outputs of sequences that ended since their step was planned are ignored."""
        self.cache_planned_blocks()
        return self._outputs.apply(plan, output)


_SAMPLES = Expectation(samples=True)

