"""What the engine reports about itself: each worker's lane (dead lanes' counters kept), their sum, its recent steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.engine.lane import StepTimes
from pagedserve.control_plane.scheduling.stats import SchedulerStats

RECENT_STEPS = 16384  # step records kept, newest last (a few MB)


class StepRecord(NamedTuple):
    """One step as its lane saw it: its size, the control plane's time on it and the worker's report (ms)."""

    step_id: int
    num_seqs: int
    num_tokens: int
    plan_ms: float
    apply_ms: float
    received_s: float  # time.perf_counter() when the result arrived
    worker_host_ms: float
    device_ms: float
    idle_ms: float  # 0 for the first step after the lane ran out of work (the device waited for work, not us)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    num_requests_running: int
    num_requests_waiting: int
    num_requests_swapped: int
    num_used_blocks: int
    num_total_blocks: int  # of the live lanes only: a dead worker's blocks cannot be used
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_steps: int
    control_plane_step_time_s: float
    worker_step_time_s: float
    worker_forward_time_s: float
    worker_idle_time_s: float


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker's lane as an operator sees it: its scheduler's figures, whose cumulative counters include those of
    the lanes the worker had before a restart (so they never go down), and the shape of its KV cache."""

    worker_id: str
    is_alive: bool
    stats: SchedulerStats
    cache_config: CacheConfig
    num_cpu_blocks: int  # the swap pool's size


@dataclass(slots=True)
class RetiredCounters:
    """Cumulative counters of the schedulers that one worker's dead lanes dropped."""

    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0

    def add(self, stats: SchedulerStats) -> None:
        self.num_preemptions += stats.num_preemptions
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.num_prompt_tokens += stats.num_prompt_tokens
        self.num_generation_tokens += stats.num_generation_tokens

    def carried(self, stats: SchedulerStats) -> SchedulerStats:
        """stats of the live scheduler with these counters added to its own."""
        return dataclasses.replace(
            stats,
            num_preemptions=self.num_preemptions + stats.num_preemptions,
            prefix_cache_queries=self.prefix_cache_queries + stats.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits + stats.prefix_cache_hits,
            num_prompt_tokens=self.num_prompt_tokens + stats.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens + stats.num_generation_tokens,
        )


def sum_status(workers: Sequence[WorkerStatus], num_steps: int, times: StepTimes,
               num_waiting_for_a_worker: int) -> EngineStatus:
    """The engine's status: current counts and cumulative counters over every worker, total blocks over the live
    ones; the requests whose worker failed, waiting for one to come back, count as waiting."""
    stats = [w.stats for w in workers]
    return EngineStatus(
        num_requests_running=sum(s.num_running for s in stats),
        num_requests_waiting=sum(s.num_waiting for s in stats) + num_waiting_for_a_worker,
        num_requests_swapped=sum(s.num_swapped for s in stats),
        num_used_blocks=sum(s.num_used_blocks for s in stats),
        num_total_blocks=sum(w.stats.num_total_blocks for w in workers if w.is_alive),
        num_preemptions=sum(s.num_preemptions for s in stats),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_prompt_tokens=sum(s.num_prompt_tokens for s in stats),
        num_generation_tokens=sum(s.num_generation_tokens for s in stats),
        num_steps=num_steps,
        control_plane_step_time_s=times.control_plane_s,
        worker_step_time_s=times.worker_step_s,
        worker_forward_time_s=times.worker_forward_s,
        worker_idle_time_s=times.worker_idle_s,
    )
