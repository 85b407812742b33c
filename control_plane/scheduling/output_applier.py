"""Applies a step's results to the sequences it was planned for: sampled tokens, forks, stop checks."""

from __future__ import annotations

from collections.abc import Callable

from pagedserve.contract.step import SequenceOutput, StepPlan, StepResult, TokenLogprobs
from pagedserve.control_plane.scheduling.block_manager import BlockManager
from pagedserve.control_plane.scheduling.request import (
    FinishReason,
    Request,
    Sequence,
    SequenceDelta,
    check_stop,
)
from pagedserve.control_plane.scheduling.sequence_registry import SequenceRegistry
from pagedserve.control_plane.scheduling.step_builder import Expectation

# finish(request, seq, reason, stop_token_id): ends seq and frees its blocks (and the request, once all ended).
FinishCallback = Callable[[Request, Sequence, FinishReason, int | None], None]
# cache_blocks(request, seq): adds seq's full blocks of known tokens to the prefix cache.
CacheBlocksCallback = Callable[[Request, Sequence], None]
# end(request): ends every sequence of the request (ABORT) and frees its blocks, as an abort does.
EndCallback = Callable[[Request], None]


class OutputApplier:
    """Keeps what each planned step owes its sequences until the step's result arrives, then applies it.

    Invariants: a step's expectations are applied at most once, and results come in plan order; a result for a
    sequence no longer live (finished, aborted, or recomputed under a new id) changes nothing; each sampled
    token is appended, counted and stop-checked (finishing its sequence at once) before the next sequence's; a
    sequence's failure ends its whole request at once, as an abort, and yields one delta that carries it.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        seqs: SequenceRegistry,
        max_len: int,
        finish: FinishCallback,
        cache_blocks: CacheBlocksCallback,
        end: EndCallback,
    ) -> None:
        self._block_manager = block_manager
        self._seqs = seqs
        self._max_len = max_len
        self._finish = finish
        self._cache_blocks = cache_blocks
        self._end = end
        self._expectations: dict[int, dict[int, Expectation]] = {}  # step id -> seq id -> what the step owes it
        self.num_prompt_tokens = 0  # of prompts whose first token was sampled
        self.num_generation_tokens = 0

    def expect(self, step_id: int, expectations: dict[int, Expectation]) -> None:
        """Records what the planned step step_id owes each of its sequences."""
        self._expectations[step_id] = expectations

    def apply(self, plan: StepPlan, output: StepResult) -> list[SequenceDelta]:
        """Applies a step's sampled tokens (forks, stop checks, frees); returns what each sequence gained.
        Plans are answered in order; outputs of sequences that ended since their step was planned are ignored."""
        if output.step_id != plan.step_id:
            raise ValueError(f"output of step {output.step_id} applied to plan {plan.step_id}")
        deltas: list[SequenceDelta] = []
        by_seq_id = output.by_seq_id
        for seq_id, expect in self._expectations.pop(plan.step_id, {}).items():
            owner = self._seqs.get(seq_id)
            if owner is None:
                continue
            request, seq = owner
            out = by_seq_id.get(seq_id)
            # The common decode case: one token sampled for seq alone, no prompt left to account for.
            if (expect.samples and not expect.fork_seq_ids and request.is_prompt_done and out is not None
                    and out.token_id is not None and not out.prompt_logprobs):
                seq.num_pending_tokens -= 1
                deltas.append(self._append_token(request, seq, out, ()))
            else:
                deltas.extend(self._apply_output(request, seq, expect, output))
        return deltas

    def _apply_output(
        self, request: Request, seq: Sequence, expect: Expectation, output: StepResult
    ) -> list[SequenceDelta]:
        out = output.by_seq_id.get(seq.seq_id)
        if out is not None and out.failure is not None:  # never on the fast path: a failure carries no token
            self._end(request)
            return [SequenceDelta(request.request_id, seq.index, (), (), (), FinishReason.ABORT, None, out.failure)]
        prompt_logprobs = self._new_prompt_logprobs(request, out)
        if not expect.samples:
            if not prompt_logprobs:
                return []
            return [SequenceDelta(request.request_id, seq.index, (), (), prompt_logprobs, None)]
        out = _sampled(output, seq.seq_id)
        seq.num_pending_tokens -= 1
        if not request.is_prompt_done:
            request.is_prompt_done = True
            self.num_prompt_tokens += request.num_prompt_tokens
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
                self._block_manager.fork(parent.seq_id, sibling.seq_id, request.num_prompt_tokens)
                sibling.is_forked = True
                sibling.num_computed_tokens = request.num_prompt_tokens
                siblings.append(sibling)
        return siblings

    def _append_token(
        self, request: Request, seq: Sequence, out: SequenceOutput, prompt_logprobs: tuple[TokenLogprobs, ...]
    ) -> SequenceDelta:
        assert out.token_id is not None
        seq.output_token_ids.append(out.token_id)
        self.num_generation_tokens += 1
        stop = check_stop(request, seq, self._max_len)
        if stop is not None:
            self._finish(request, seq, *stop)
        elif (len(request.prompt_token_ids) + len(seq.output_token_ids)) % self._block_manager.block_size == 0:
            # Its computed tokens reach past the new one, so its known tokens now fill one more block exactly
            # when they end on a block boundary (the blocks before were cached as their tokens became known).
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


def _sampled(output: StepResult, seq_id: int) -> SequenceOutput:
    out = output.by_seq_id.get(seq_id)
    if out is None or out.token_id is None:
        raise ValueError(f"step {output.step_id} returned no sampled token for sequence {seq_id}")
    return out
