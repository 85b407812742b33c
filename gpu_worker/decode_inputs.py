"""The decode graphs' inputs: static device buffers that every replay reads, written for each step straight from
page-locked host memory, so that a decode step's inputs cost two copies, one block-table copy and one gather."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.sequence_state import PENDING_TOKEN, ScheduledWork

# Host buffers in rotation: more than the steps a control plane keeps in flight (at most 8), so the wait before
# rewriting one is normally over already.
HOST_SLOTS = 9
# What padding rows hold in longs: token 0, position 0, slot -1 (no K/V written), table row 0, token row 0.
_PADDING = np.array([[0], [0], [-1], [0], [0]], dtype=np.int64)


class _HostSlot:
    """One step's inputs in host memory (page-locked on CUDA hosts), laid out as DecodeInputs' device buffers; its
    event marks the end of the copies that read it, so that it is rewritten only once they ran."""

    def __init__(self, size: int, num_ints: int, is_pinned: bool) -> None:
        self.is_pinned = is_pinned
        self.longs = torch.zeros(5, size, dtype=torch.int64, pin_memory=is_pinned)
        self.ints = torch.zeros(num_ints, dtype=torch.int32, pin_memory=is_pinned)
        self.event = torch.cuda.Event() if is_pinned else None

    def reserve(self, num_ints: int) -> None:
        """Waits until the copies that read the slot last have run; grows ints to hold num_ints."""
        if self.event is not None:
            self.event.synchronize()
        if len(self.ints) < num_ints:
            self.ints = torch.zeros(max(num_ints, 2 * len(self.ints)), dtype=torch.int32, pin_memory=self.is_pinned)


class DecodeInputs:
    """The inputs of the decode graphs for up to `size` sequences whose block tables are up to `max_blocks` wide.

    Device layout: longs [5, size] int64 holds per row the token id, position, KV slot, table row and token row
    (the table row for a token still on the device, else 0: the only rows of last_tokens that a step reads); ints int32
    holds seq_lens [size], then query_start_loc [size + 1], then the step's block tables as a dense [n, width]
    matrix, which one copy spreads into block_tables [size, max_blocks]. The graphs read input_ids, positions,
    slot_mapping, seq_lens, query_start_loc and block_tables: views that never move.

    Invariants: a step of n sequences padded to `padded` rows writes every row below `padded`. Rows n.. are
    padding: token 0 at position 0, slot -1 (no K/V written), seq_len 0 and no query row (query_start_loc stays at
    n), so they change no cache and attend to nothing. Their block_tables rows keep an earlier step's blocks, which
    nothing reads at seq_len 0. A host slot is rewritten only after the copies that read it.
    """

    def __init__(self, size: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.size = size
        self.block_size = block_size
        self.longs = torch.zeros(5, size, dtype=torch.int64, device=device)
        self.ints = torch.zeros(self._table_start + size * max_blocks, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.table_rows, self._token_rows = self.longs
        self.slot_mapping.fill_(-1)
        self.seq_lens = self.ints[:size]
        self.query_start_loc = self.ints[size : self._table_start]
        is_pinned = device.type == "cuda"
        self._slots = [_HostSlot(size, self._table_start + size, is_pinned) for _ in range(HOST_SLOTS)]
        self._next_slot = 0
        self._row_numbers = np.arange(size + 1, dtype=np.int64)

    @property
    def _table_start(self) -> int:
        return 2 * self.size + 1

    def stage(self, work: Sequence[ScheduledWork], tables: BlockTableArray, padded: int,
              last_tokens: torch.Tensor) -> None:
        """Queues the copies that make the buffers hold this decode step (one token each for n = len(work)
        sequences, 0 < n <= padded <= size, tables at most max_blocks wide) padded to `padded` rows. A token still
        on the device (PENDING_TOKEN) is gathered from last_tokens at its sequence's table row; no other row of
        last_tokens is read, so it need not reach the rows of sequences whose tokens are known."""
        num_seqs, size, block_size = len(work), self.size, self.block_size
        ends = np.fromiter((item.end for item in work), dtype=np.int64, count=num_seqs)
        rows = np.fromiter((item.state.table_row for item in work), dtype=np.int64, count=num_seqs)
        positions = ends - 1
        width = max(int(-(-ends.max() // block_size)), 1)
        block_tables = tables.gather(rows, width)
        blocks = block_tables[self._row_numbers[:num_seqs], positions // block_size].astype(np.int64)
        token_ids = np.fromiter(
            (item.state.token_id(position) for item, position in zip(work, positions.tolist(), strict=True)),
            dtype=np.int64, count=num_seqs)
        is_pending = token_ids == PENDING_TOKEN

        table_end = self._table_start + num_seqs * width
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        slot.reserve(table_end)
        longs, ints = slot.longs.numpy(), slot.ints.numpy()
        longs[:, num_seqs:padded] = _PADDING
        longs[0, :num_seqs] = token_ids
        longs[1, :num_seqs] = positions
        longs[2, :num_seqs] = blocks * block_size + positions % block_size
        longs[3, :num_seqs] = rows
        np.multiply(rows, is_pending, out=longs[4, :num_seqs])
        ints[:num_seqs] = ends
        ints[num_seqs:padded] = 0
        np.minimum(self._row_numbers[: padded + 1], num_seqs, out=ints[size : size + padded + 1])
        ints[self._table_start : table_end] = block_tables.reshape(-1)

        self.longs.copy_(slot.longs, non_blocking=True)
        self.ints[:table_end].copy_(slot.ints[:table_end], non_blocking=True)
        if slot.event is not None:
            slot.event.record()
        self.block_tables[:num_seqs, :width].copy_(self.ints[self._table_start : table_end].view(num_seqs, width))
        if is_pending.all():
            torch.index_select(last_tokens, 0, self.table_rows[:num_seqs], out=self.input_ids[:num_seqs])
        elif is_pending.any():
            ids = self.input_ids[:num_seqs]
            torch.where(ids == PENDING_TOKEN, last_tokens[self._token_rows[:num_seqs]], ids, out=ids)
