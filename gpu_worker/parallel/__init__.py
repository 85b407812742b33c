"""Tensor parallelism: one model sharded over the ranks of a worker group."""
