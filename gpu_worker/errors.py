"""Domain errors of the worker; service.py maps each to one gRPC status code."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker reports to its caller."""


class CacheNotInitializedError(WorkerError):
    """A step arrived before InitCache allocated the KV pools (FAILED_PRECONDITION)."""


class InvalidStepError(WorkerError):
    """A step names an unknown sequence, a block out of range or impossible token counts (INVALID_ARGUMENT)."""


class InvalidCacheRequestError(WorkerError):
    """InitCache arguments cannot give a usable pool (INVALID_ARGUMENT)."""


class ModelLoadError(WorkerError):
    """The model directory is missing files, has an unsupported architecture or mismatched weights."""
