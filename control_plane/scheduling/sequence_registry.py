"""Live sequence ids of one worker and what that worker must be told about them (drops, table rewrites)."""

from __future__ import annotations

import itertools

from pagedserve.control_plane.scheduling.block_manager import BlockManager
from pagedserve.control_plane.scheduling.request import Request, Sequence


class SequenceRegistry:
    """Maps engine-wide sequence ids to live sequences.

    Invariants: an id names its sequence exactly while the sequence is live (a sequence recomputed after a
    preemption comes back under a new id, so results of steps planned before match nothing); an id the
    worker holds is dropped exactly once, in the next plan that carries drops; a released sequence holds no block.
    """

    def __init__(self, block_manager: BlockManager) -> None:
        self._block_manager = block_manager
        self._seqs: dict[int, tuple[Request, Sequence]] = {}
        self._ids = itertools.count()
        self._dropped: list[int] = []
        self._table_rewrites: set[int] = set()

    def add(self, request: Request, index: int) -> Sequence:
        """A new sequence of request; only the first one (index 0) computes the prompt."""
        seq = Sequence(seq_id=next(self._ids), index=index, is_forked=index == 0)
        self._seqs[seq.seq_id] = (request, seq)
        return seq

    def get(self, seq_id: int) -> tuple[Request, Sequence] | None:
        return self._seqs.get(seq_id)

    def release(self, seq: Sequence) -> None:
        """Frees the sequence's blocks and forgets its id; the worker drops it with the next plan."""
        self._block_manager.free(seq.seq_id)
        if seq.is_on_worker:
            self._dropped.append(seq.seq_id)
            seq.is_on_worker = False
        self._seqs.pop(seq.seq_id, None)
        self._table_rewrites.discard(seq.seq_id)

    def reset_for_recompute(self, request: Request, seq: Sequence) -> None:
        """Forgets seq's KV; it comes back under a new id with its known tokens to compute again."""
        self.release(seq)
        self._renew(request, seq)

    def adopt(self, request: Request) -> None:
        """Registers the unfinished sequences of a request that another scheduler held (its worker failed) under
        new ids, nothing computed and nothing on this worker: they come back with their known tokens to compute
        again. Their old ids belong to the other scheduler, so nothing is released here."""
        for seq in request.unfinished_sequences:
            seq.is_on_worker = False
            self._renew(request, seq)

    def _renew(self, request: Request, seq: Sequence) -> None:
        seq.seq_id = next(self._ids)
        seq.num_computed_tokens = 0
        seq.num_pending_tokens = 0  # sampled by steps whose results will never come: sampled again
        self._seqs[seq.seq_id] = (request, seq)
        request.num_prompt_logprobs_to_skip = request.num_prompt_logprobs_delivered

    @property
    def has_dropped(self) -> bool:
        """Whether some id still waits to be dropped by the worker."""
        return bool(self._dropped)

    def take_dropped(self) -> list[int]:
        """Ids the worker must drop, in the order they ended; each is returned once."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def rewrite_tables(self, seq_ids: list[int]) -> None:
        """Swapped-in sequences: their next plan entry rewrites the worker's whole table."""
        self._table_rewrites.update(seq_ids)

    def has_table_rewrite(self, seq_id: int) -> bool:
        return seq_id in self._table_rewrites

    def take_table_rewrite(self, seq_id: int) -> bool:
        if seq_id in self._table_rewrites:
            self._table_rewrites.discard(seq_id)
            return True
        return False
