"""Stop strings over streamed text: hold back what could still become a stop, cut at the first match."""

from __future__ import annotations


class StopStringMatcher:
    """Finds the first stop string in one completion's text as it streams in, delta by delta.

    The first match is the one that ends earliest in the text; of stops ending at the same place,
    the longest. The result depends only on the text, never on how it was split into deltas.
    Invariant: the emitted text never contains characters past the cut, because a tail that is a
    proper prefix of some stop string (at most max(len(stop)) - 1 characters) stays held back.
    """

    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        if not all(stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = stop
        self._include_stop_str_in_output = include_stop_str_in_output
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        self._first_chars = frozenset(s[0] for s in stop)
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string found, or None while none has been."""
        return self._matched

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Adds a text delta; returns (text safe to emit now, the stop string matched or None).

        After a match, the completion is over: later deltas emit nothing.
        """
        if not self._stop:
            return delta, None
        if self._matched is not None:
            return "", None
        if not self._held and self._first_chars.isdisjoint(delta):
            # Nothing held and no stop's first character in the delta: no stop starts anywhere in it.
            return delta, None
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._matched = stop
            end = start + len(stop) if self._include_stop_str_in_output else start
            return text[:end], stop
        hold = self._partial_match_length(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], None

    def flush(self) -> str:
        """Releases the held text when the completion ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop): smallest is the first match
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        return None if best is None else (best[0] + best[1], best[2])

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        # Only tails that start with a stop's first character can be one; str.find jumps to them.
        start = len(text) - min(self._max_hold, len(text))
        while True:
            starts = [i for i in (text.find(c, start) for c in self._first_chars) if i >= 0]
            if not starts:
                return 0
            start = min(starts)
            tail = text[start:]
            if any(stop.startswith(tail) for stop in self._stop):
                return len(tail)
            start += 1
