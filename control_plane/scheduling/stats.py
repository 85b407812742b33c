"""A snapshot of one scheduler's load and counters, for routing and metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int  # requests
    num_waiting: int  # requests, new or preempted by recompute
    num_swapped: int  # requests
    num_used_blocks: int  # device blocks held by some sequence
    num_total_blocks: int  # device blocks in the pool
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # cumulative, tokens
    prefix_cache_hits: int  # cumulative, tokens
    num_prompt_tokens: int  # cumulative, prompt tokens of requests that produced a first token
    num_generation_tokens: int  # cumulative, sampled tokens accepted
