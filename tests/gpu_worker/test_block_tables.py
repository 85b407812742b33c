"""BlockTableArray: rows grow, updates overwrite or append, freed rows are reused, gathers are exact."""

from __future__ import annotations

import numpy as np

from pagedserve.gpu_worker.block_tables import BlockTableArray


def test_rows_and_columns_grow_past_the_initial_size() -> None:
    tables = BlockTableArray(num_rows=1, num_columns=2)
    rows = [tables.add(list(range(i, i + 5))) for i in range(3)]

    assert [tables.row(r) for r in rows] == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]


def test_update_overwrites_an_entry_and_appends() -> None:
    tables = BlockTableArray()
    row = tables.add([4, 5, 6])
    tables.update(row, 1, [9])
    tables.update(row, 3, [7, 8])

    assert tables.row(row) == [4, 9, 6, 7, 8]


def test_freed_row_is_reused_with_its_new_table_only() -> None:
    tables = BlockTableArray(num_rows=2)
    first = tables.add([1, 2, 3])
    tables.free(first)
    again = tables.add([8])

    assert (again, tables.row(again)) == (first, [8])


def test_copied_row_is_independent_of_the_original() -> None:
    tables = BlockTableArray()
    row = tables.add([1, 2])
    copy = tables.copy_row(row)
    tables.update(copy, 1, [5])

    assert (tables.row(row), tables.row(copy)) == ([1, 2], [1, 5])


def test_gather_returns_the_rows_in_the_order_asked() -> None:
    tables = BlockTableArray()
    rows = [tables.add([1, 2]), tables.add([3]), tables.add([4, 5])]

    gathered = tables.gather(np.array([rows[2], rows[0]]), 2)

    assert gathered.tolist() == [[4, 5], [1, 2]] and gathered.dtype == np.int32
