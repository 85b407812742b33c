"""Serving, throughput and hardware-bound benchmarks (run as `python -m benchmarks.<name>` from the repository root)."""
