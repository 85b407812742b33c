"""The stream-capacity benchmark counts every chunk the server streams, and says what each side's CPU did."""

from __future__ import annotations

from benchmarks.stream_capacity import measure


def test_every_chunk_of_every_request_is_counted_at_each_concurrency() -> None:
    rows = measure([1, 4], num_requests=8, tokens=16)
    assert [(row["concurrency"], row["chunks"], row["failed"]) for row in rows] == [(1, 128, 0), (4, 128, 0)]
    for row in rows:
        assert row["chunks_per_s"] == row["chunks"] / row["seconds"]
        assert row["client_cpu"] > 0 and row["server_cpu"] > 0
