"""The stream-capacity benchmark counts every chunk the server streams, and says what each side's CPU did."""

from __future__ import annotations

from benchmarks.stream_capacity import measure


def test_every_chunk_of_every_request_is_counted_at_each_concurrency() -> None:
    # 4,096 chunks a level: long enough for the server's CPU time, read in clock ticks, to register.
    rows = measure([1, 4], num_requests=32, tokens=128)
    assert [(row["concurrency"], row["chunks"], row["failed"]) for row in rows] == [(1, 4096, 0), (4, 4096, 0)]
    for row in rows:
        assert row["chunks_per_s"] == row["chunks"] / row["seconds"]
        assert row["client_cpu"] > 0 and row["server_cpu"] > 0
