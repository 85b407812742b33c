"""Errors of the values that cross the planes; each plane maps them to its own status codes."""

from __future__ import annotations


class PagedServeError(Exception):
    """Base of every error pagedserve reports to a caller."""


class InvalidArgumentError(PagedServeError, ValueError):
    """A prompt, sampling or step field is out of range (INVALID_ARGUMENT). The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
