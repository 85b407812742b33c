"""The decode graphs' inputs: static device buffers that every replay reads, written for each step straight from
page-locked host memory, so that a decode step's inputs cost one copy and, when a token is still on the device, one
gather; the graphs spread the step's block tables themselves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.sequence_state import PENDING_TOKEN, ScheduledWork
from pagedserve.kernels.ops import KernelOps

# Host buffers in rotation: more than the steps a control plane keeps in flight (at most 8), so the wait before
# rewriting one is normally over already.
HOST_SLOTS = 9
# What padding rows hold in longs: token 0, position 0, slot -1 (no K/V written), table row 0, token row 0.
_PADDING = np.array([[0], [0], [-1], [0], [0]], dtype=np.int64)
# The packed tables' header: the step's number of sequences and table width.
_HEADER = 2


def _staged_buffer(size: int, num_ints: int, device: torch.device | None = None,
                   pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer, longs, ints): one int64 buffer holding longs [5, size] then num_ints int32, and views of both."""
    buffer = torch.zeros(5 * size + -(-num_ints // 2), dtype=torch.int64, device=device, pin_memory=pin_memory)
    return buffer, buffer[: 5 * size].view(5, size), buffer[5 * size :].view(torch.int32)[:num_ints]


class _HostSlot:
    """One step's inputs in host memory (page-locked on CUDA hosts), laid out as DecodeInputs' device buffer; its
    event marks the end of the copy that reads it, so that it is rewritten only once it ran."""

    def __init__(self, size: int, num_ints: int, is_pinned: bool) -> None:
        self.size = size
        self.is_pinned = is_pinned
        self.buffer, self.longs, self.ints = _staged_buffer(size, num_ints, pin_memory=is_pinned)
        self.event = torch.cuda.Event() if is_pinned else None

    def reserve(self, num_ints: int) -> None:
        """Waits until the copy that read the slot last has run; grows ints to hold num_ints."""
        if self.event is not None:
            self.event.synchronize()
        if len(self.ints) < num_ints:
            self.buffer, self.longs, self.ints = _staged_buffer(self.size, max(num_ints, 2 * len(self.ints)),
                                                                pin_memory=self.is_pinned)


class DecodeInputs:
    """The inputs of the decode graphs for up to `size` sequences whose block tables are up to `max_blocks` wide.

    Device layout, one int64 buffer: longs [5, size] holds per row the token id, position, KV slot, table row and
    token row (the table row for a token still on the device, else 0: the only rows of last_tokens that a step
    reads); then int32s: seq_lens [size], query_start_loc [size + 1], and the packed tables: the step's number of
    sequences and table width, then its block tables as a dense [n, width] matrix, which each graph spreads into
    block_tables [size, max_blocks] as its first launch (spread_tables). The graphs read input_ids, positions,
    slot_mapping, seq_lens, query_start_loc and block_tables: views that never move.

    Invariants: a step of n sequences padded to `padded` rows writes every row below `padded`. Rows n.. are
    padding: token 0 at position 0, slot -1 (no K/V written), seq_len 0 and no query row (query_start_loc stays at
    n), so they change no cache and attend to nothing. Their block_tables rows keep an earlier step's blocks, which
    nothing reads at seq_len 0. A host slot is rewritten only after the copy that read it.
    """

    def __init__(self, size: int, max_blocks: int, block_size: int, device: torch.device, ops: KernelOps) -> None:
        self.size = size
        self.block_size = block_size
        self._ops = ops
        self._buffer, self.longs, self.ints = _staged_buffer(size, self._packed_start + _HEADER + size * max_blocks,
                                                             device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.table_rows, self._token_rows = self.longs
        self.slot_mapping.fill_(-1)
        self.seq_lens = self.ints[:size]
        self.query_start_loc = self.ints[size : self._packed_start]
        self._packed = self.ints[self._packed_start :]
        is_pinned = device.type == "cuda"
        self._slots = [_HostSlot(size, self._packed_start + _HEADER + size, is_pinned) for _ in range(HOST_SLOTS)]
        self._next_slot = 0
        self._row_numbers = np.arange(size + 1, dtype=np.int64)

    @property
    def _packed_start(self) -> int:
        return 2 * self.size + 1

    def stage(self, work: Sequence[ScheduledWork], tables: BlockTableArray, padded: int,
              last_tokens: torch.Tensor) -> None:
        """Queues the copy that makes the buffers hold this decode step (one token each for n = len(work)
        sequences, 0 < n <= padded <= size, tables at most max_blocks wide) padded to `padded` rows, block_tables
        but for spread_tables. A token still on the device (PENDING_TOKEN) is gathered from last_tokens at its
        sequence's table row; no other row of last_tokens is read, so it need not reach the rows of sequences whose
        tokens are known."""
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

        packed_start = self._packed_start
        table_end = packed_start + _HEADER + num_seqs * width
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
        ints[packed_start] = num_seqs
        ints[packed_start + 1] = width
        ints[packed_start + _HEADER : table_end] = block_tables.reshape(-1)

        num_longs = 5 * size + -(-table_end // 2)
        self._buffer[:num_longs].copy_(slot.buffer[:num_longs], non_blocking=True)
        if slot.event is not None:
            slot.event.record()
        if is_pending.all():
            torch.index_select(last_tokens, 0, self.table_rows[:num_seqs], out=self.input_ids[:num_seqs])
        elif is_pending.any():
            ids = self.input_ids[:num_seqs]
            torch.where(ids == PENDING_TOKEN, last_tokens[self._token_rows[:num_seqs]], ids, out=ids)

    def spread_tables(self, padded: int) -> None:
        """Queues the spread of the staged step's block tables into block_tables (rows below its size; padded: the
        rows of the graph that replays it). It reads the step's size on the device, so a graph captures it once."""
        self._ops.spread_block_tables(self._packed, self.block_tables[:padded])
