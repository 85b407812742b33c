"""Sizes one request's work for one step: the tokens each of its sequences computes, and whether blocks cover it."""

from __future__ import annotations

from pagedserve.control_plane.config import SchedulerConfig
from pagedserve.control_plane.scheduling.block_manager import BlockManager, CachedPrefix
from pagedserve.control_plane.scheduling.request import Request, Sequence
from pagedserve.control_plane.scheduling.step_builder import SeqWork


class WorkPlanner:
    """Decides how far each live sequence of a request advances within a token budget, from its computed
    tokens or, when the worker does not hold it, from its longest cached prefix.

    Invariants: it only reads (no block table, sequence or request changes); a plan it returns fits the device
    pool's free blocks at the time of the call; no sequence is planned past max_len tokens or its max_tokens.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_len: int) -> None:
        self._config = config
        self._block_manager = block_manager
        self._max_len = max_len

    def plan(self, request: Request, budget: int) -> list[SeqWork] | None:
        """Tokens each live sequence of request computes within budget; None when the blocks lack.

        Sequences the worker holds are planned all or none; sequences it does not hold yet (a request
        resumed after recompute) join while blocks last, so a wide request can resume a few at a time.
        """
        bm = self._block_manager
        works = self._candidate_works(request, budget)
        held = [w for w in works if w.prefix is None]
        needed = sum(bm.num_blocks_needed(w.seq.seq_id, w.end) for w in held)
        needed += bm.num_copies_needed((w.seq.seq_id, w.seq.num_computed_tokens) for w in held)
        if needed > bm.gpu.num_free_blocks:
            return None
        chosen = held
        for work in works:
            if work.prefix is not None:
                needed += bm.num_blocks_needed(work.seq.seq_id, work.end, work.prefix)
                if needed > bm.gpu.num_free_blocks:
                    break
                chosen.append(work)
        # New sequences of a request already holding blocks wait for them; a request holding none needs
        # room for at least one.
        holds_blocks = any(bm.has_table(s.seq_id) for s in request.live_sequences)
        return chosen if chosen or not works or holds_blocks else None

    def reaches_limit(self, request: Request, seq: Sequence) -> bool:
        """Whether the tokens seq has or will be sent already finish it by length: computing more would be
        wasted (the lag of pipelined planning must not run a sequence past max_tokens)."""
        num_outputs = len(seq.output_token_ids) + seq.num_pending_tokens
        return self.limit_reached(request, num_outputs, request.num_prompt_tokens + num_outputs)

    def limit_reached(self, request: Request, num_outputs: int, num_tokens: int) -> bool:
        """reaches_limit for a sequence of request with num_outputs sampled or pending, num_tokens in all."""
        if num_outputs == 0:
            return False
        max_tokens = request.sampling_params.max_tokens
        return (max_tokens is not None and num_outputs >= max_tokens) or num_tokens >= self._max_len

    def _candidate_works(self, request: Request, budget: int) -> list[SeqWork]:
        works = []
        for seq in request.live_sequences:
            if budget == 0:
                break
            prefix = None if self._block_manager.has_table(seq.seq_id) else self._find_prefix(request, seq)
            num_new = self._num_new_tokens(request, seq, prefix, budget)
            if num_new:
                works.append(SeqWork(seq, num_new, prefix))
                budget -= num_new
        return works

    def _find_prefix(self, request: Request, seq: Sequence) -> CachedPrefix:
        # Prompt log-probabilities need every prompt position computed, so such prompts skip the cache.
        if request.sampling_params.prompt_logprobs is not None and not request.is_prompt_done:
            return CachedPrefix((), (), 0, 0)
        return self._block_manager.find_cached_prefix(request.tokens(seq))

    def _num_new_tokens(self, request: Request, seq: Sequence, prefix: CachedPrefix | None, budget: int) -> int:
        computed = prefix.num_tokens if prefix else seq.num_computed_tokens
        remaining = request.num_tokens(seq) - computed
        if remaining <= 0 or self.reaches_limit(request, seq):
            return 0
        num_new = min(remaining, budget)
        if self._config.long_prefill_token_threshold:
            num_new = min(num_new, self._config.long_prefill_token_threshold)
        if num_new < remaining and not self._config.enable_chunked_prefill:
            return 0
        return num_new
