"""Every held sequence's block table as one row of a growable int32 matrix, so a step gathers its tables at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np


class BlockTableArray:
    """Rows of block ids, one per sequence; row r's first lengths[r] entries are valid, the rest are stale.

    Rows and columns double when full, so appends are amortised O(1) and a step's tables are one numpy gather
    instead of one Python loop per sequence.
    """

    def __init__(self, num_rows: int = 64, num_columns: int = 16) -> None:
        self.table = np.zeros((num_rows, num_columns), dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def add(self, block_ids: Sequence[int]) -> int:
        """A new row holding block_ids; returns its index."""
        if not self._free_rows:
            self._grow_rows()
        row = self._free_rows.pop()
        self.lengths[row] = 0
        self.update(row, 0, block_ids)
        return row

    def copy_row(self, row: int) -> int:
        """A new row with the same block ids as row (a forked sibling's own table)."""
        return self.add(self.table[row, : self.lengths[row]].tolist())

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def update(self, row: int, start_index: int, block_ids: Sequence[int]) -> None:
        """table[row][start_index : start_index + len(block_ids)] = block_ids; start_index <= current length."""
        end = start_index + len(block_ids)
        while end > self.table.shape[1]:
            self.table = np.concatenate([self.table, np.zeros_like(self.table)], axis=1)
        self.table[row, start_index:end] = block_ids
        self.lengths[row] = max(int(self.lengths[row]), end)

    def row(self, row: int) -> list[int]:
        """The valid block ids of row."""
        return cast("list[int]", self.table[row, : self.lengths[row]].tolist())

    def gather(self, rows: np.ndarray, num_columns: int) -> np.ndarray:
        """[len(rows), num_columns] int32 copy of the given rows' first columns (entries past a length are stale)."""
        return self.table[rows, :num_columns]

    def _grow_rows(self) -> None:
        num_rows = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)], axis=0)
        self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        self._free_rows.extend(range(2 * num_rows - 1, num_rows - 1, -1))
