"""Incremental detokenization: one completion's token ids become text deltas as they are sampled."""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.control_plane.text.piece_texts import REPLACEMENT_CHAR
from pagedserve.control_plane.text.tokenizer import Tokenizer

CONTEXT_WINDOW = 5  # prompt tokens decoded in front of the output, so its first word gets its space


class IncrementalDetokenizer:
    """Text deltas of one completion, decoding only a few tokens per step.

    Invariant: the deltas of add_tokens() and finish(), concatenated, equal
    decode(context + output)[len(decode(context)):], the text the output adds to the end of the
    prompt; context is the prompt's last tokens up to its last whole visible token (see
    _context_ids). With a byte-level BPE tokenizer that is exactly decode(output); with a Metaspace
    tokenizer (Llama) it differs from decode(output) only by the space in front of the first output
    word, which decode() strips at the start of a text.

    Tokens in the text, as offsets into self._tokens (context first, then output):

        0 ... prefix_offset ........ read_offset ........... len(tokens)
              |<- already emitted ->|<- not emitted yet ->|

    Each step decodes tokens[prefix_offset:] and emits what it adds to the text of
    tokens[prefix_offset:read_offset] (the prefix gives the new tokens their leading space). Text is
    held back while it may still change: it ends with U+FFFD (a character cut short), or its last
    visible token is a byte-fallback piece (the decoder rejects a whole run of byte pieces when any
    byte of it is invalid, so a later piece can rewrite earlier ones).

    Most steps add one plain piece (see PieceTexts) after a step that emitted everything. When the
    prefix text is non-empty and does not end with U+FFFD, such a step takes the decoded text and
    the next prefix text from the tokenizer's PieceTexts instead of decoding: the same deltas and
    the same state, at about a tenth of the cost.
    """

    __slots__ = ("_tokenizer", "_skip_special_tokens", "_joined_ids", "_visible_ids", "_byte_ids", "_piece_texts",
                 "_tokens", "_prefix_offset", "_read_offset", "_prefix_text", "_last_visible_index")

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # vLLM's rule for fast tokenizers: with special tokens kept and spaces_between_special_tokens false, an added
        # token right after another is written with nothing between them, whatever the decoder would put there.
        is_joining = not skip_special_tokens and not spaces_between_special_tokens
        self._joined_ids = tokenizer.added_token_ids if is_joining else frozenset()
        self._visible_ids = tokenizer.visible_ids(skip_special_tokens)
        self._byte_ids = tokenizer.byte_token_ids
        # Joining decodes the text in parts, and a piece's text depends on the last part alone, which can be empty
        # when the prefix text is not: always decode.
        self._piece_texts = None if self._joined_ids else tokenizer.piece_texts
        self._tokens = self._context_ids(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)
        self._last_visible_index = len(self._tokens) - 1  # the context ends with a visible token

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Appends sampled tokens; returns the text they make certain (possibly empty)."""
        piece_texts, prefix_text = self._piece_texts, self._prefix_text
        if (piece_texts is not None and len(token_ids) == 1 and self._read_offset == len(self._tokens)
                and prefix_text and prefix_text[-1] != REPLACEMENT_CHAR):
            texts = piece_texts[token_ids[0]]
            if texts is not None:
                return self._add_piece(token_ids[0], *texts)
        visible_ids = self._visible_ids
        for token_id in token_ids:
            self._tokens.append(token_id)
            if token_id in visible_ids:
                self._last_visible_index = len(self._tokens) - 1
        if self._last_visible_index < self._read_offset:
            return ""
        if self._tokens[self._last_visible_index] in self._byte_ids:
            return ""
        text = self._decode(self._tokens[self._prefix_offset :])
        # Some decoders rewrite text at token boundaries; wait until the emitted prefix stands.
        if text.endswith(REPLACEMENT_CHAR) or not text.startswith(self._prefix_text):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """Releases the text still held back, once the completion has ended."""
        if len(self._tokens) == self._read_offset:
            return ""
        return self._advance(self._decode(self._tokens[self._prefix_offset :]))

    def _add_piece(self, token_id: int, appended: str, alone: str) -> str:
        """Appends one plain piece as add_tokens' decoding path would, with PieceTexts' texts for decode()'s."""
        self._tokens.append(token_id)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._last_visible_index = self._read_offset - 1
        self._prefix_text = alone
        return appended

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        return delta

    def _context_ids(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's tail, cut back to end on a whole visible token that is not a byte piece.

        The output then starts a fresh byte run and a fresh character, so decode(context) is a prefix
        of decode(context + output) whatever the output is.
        """
        context = list(prompt_token_ids[-CONTEXT_WINDOW:])
        while context and (
            not self._is_visible(context[-1])
            or context[-1] in self._byte_ids
            or self._decode(context).endswith(REPLACEMENT_CHAR)
        ):
            context.pop()
        return context

    def _is_visible(self, token_id: int) -> bool:
        return token_id in self._visible_ids

    def _decode(self, token_ids: Sequence[int]) -> str:
        joined, start, pieces = self._joined_ids, 0, []
        if not joined:  # the common case, twice per completion and step: one piece
            return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        for index in range(1, len(token_ids)):
            if token_ids[index] in joined and token_ids[index - 1] in joined:
                pieces.append(self._decode_piece(token_ids[start:index]))
                start = index
        pieces.append(self._decode_piece(token_ids[start:]))
        return "".join(pieces)

    def _decode_piece(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
