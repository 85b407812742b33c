"""What one plain vocabulary piece adds to a decoded text, for decoders that write a piece the same wherever it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
_SPACE_MARKER = "\u2581"  # the "▁" that Metaspace tokenizers write for a space


class PieceTexts(dict[int, tuple[str, str] | None]):
    """token id -> (appended, alone), filled on first use; None for an id that is not a plain piece.

    A plain piece is a vocabulary piece, neither an added token nor shaped like a byte-fallback piece (<0xE4>),
    whose appended text does not end with U+FFFD. For every plain t and all ids whose decode qualifies (is
    non-empty and does not end with U+FFFD; see appends_pieces_independently):

        decode(ids + [t]) == decode(ids) + appended        alone == decode([t])

    so IncrementalDetokenizer can step over t without a decode call.
    """

    def __init__(self, backend: Any, added_token_ids: frozenset[int], anchor_id: int) -> None:
        super().__init__()
        self._backend = backend
        self._added_token_ids = added_token_ids
        self._anchor_id = anchor_id  # plain pieces are measured after it: any qualifying ids give the same text
        self._anchor_text: str = backend.decode([anchor_id])

    @classmethod
    def of(cls, backend: Any, added_token_ids: frozenset[int]) -> PieceTexts | None:
        """The piece texts of a tokenizers.Tokenizer; None when its decoder may write a piece differently after
        different tokens, or when no plain piece decodes on its own to a qualifying text."""
        decoder = backend.decoder
        if decoder is None or not appends_pieces_independently(json.loads(decoder.__getstate__())):
            return None
        anchor_ids = (i for i in range(backend.get_vocab_size(with_added_tokens=False))
                      if _is_plain(backend, added_token_ids, i) and _qualifies(backend.decode([i])))
        anchor_id = next(anchor_ids, None)
        return None if anchor_id is None else cls(backend, added_token_ids, anchor_id)

    def __missing__(self, token_id: int) -> tuple[str, str] | None:
        texts = self._texts(token_id) if _is_plain(self._backend, self._added_token_ids, token_id) else None
        self[token_id] = texts
        return texts

    def _texts(self, token_id: int) -> tuple[str, str] | None:
        text: str = self._backend.decode([self._anchor_id, token_id])
        appended = text[len(self._anchor_text) :]
        if not text.startswith(self._anchor_text) or appended.endswith(REPLACEMENT_CHAR):
            return None
        alone: str = self._backend.decode([token_id])
        return appended, appended if alone == appended else alone  # one string object when they are equal


def appends_pieces_independently(decoder: dict[str, Any]) -> bool:
    """Whether the decoder (its tokenizer.json form) writes a plain piece t after tokens `ids` as the same text
    whatever `ids` are, so long as decode(ids) is non-empty and does not end with U+FFFD. Accepted steps, in order:

    - Replace of ▁ by a space, Metaspace: per token, t is never the first one (a non-empty decode(ids) leaves a
      token in front of it), which is all Metaspace treats apart; on fused text they map character by character.
    - ByteFallback, before fusing: the byte run in front of t ends at t whatever t is, and the steps before it
      only write spaces, so t never turns into a byte piece.
    - Fuse; ByteLevel as the fusing step: it joins the tokens' bytes, and bytes decode the same in two parts
      when the first part ends on a whole character, as a text not ending with U+FFFD does.
    - Strip with stop 0, after fusing: it trims the start only, and a non-empty decode(ids) means it stopped
      before t.
    """
    is_fused = False
    for step in _steps(decoder):
        kind = step.get("type")
        if kind == "Replace":
            is_accepted = step.get("pattern") == {"String": _SPACE_MARKER} and step.get("content") == " "
        elif kind == "Metaspace":
            is_accepted = step.get("replacement") == _SPACE_MARKER
        elif kind == "ByteFallback":
            is_accepted = not is_fused
        elif kind in ("Fuse", "ByteLevel"):
            is_accepted, is_fused = kind == "Fuse" or not is_fused, True
        elif kind == "Strip":
            is_accepted = is_fused and step.get("stop") == 0
        else:
            is_accepted = False
        if not is_accepted:
            return False
    return True


def _steps(decoder: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if decoder.get("type") != "Sequence":
        yield decoder
        return
    for step in decoder.get("decoders", []):
        yield from _steps(step)


def _is_plain(backend: Any, added_token_ids: frozenset[int], token_id: int) -> bool:
    piece = backend.id_to_token(token_id)
    if piece is None or token_id in added_token_ids:
        return False
    return not (piece.startswith("<0x") and piece.endswith(">"))


def _qualifies(text: str) -> bool:
    return text != "" and not text.endswith(REPLACEMENT_CHAR)
