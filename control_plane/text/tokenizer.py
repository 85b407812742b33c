"""The model's tokenizer: a Hugging Face fast tokenizer loaded from a local model directory."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

# PreTrainedTokenizerFast rather than AutoTokenizer: resolving a model-specific class through
# AutoTokenizer imports torch, which the control plane never loads.
from transformers import PreTrainedTokenizerFast

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class Tokenizer:
    """Text <-> token ids for one model, read from tokenizer.json and tokenizer_config.json.

    decode() is the backend's decode without clean-up of tokenization spaces, so that decoding a text
    piece by piece (IncrementalDetokenizer) can reproduce it exactly. Never downloads anything.
    """

    def __init__(self, model_dir: Path) -> None:
        self._hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        self._backend = self._hf.backend_tokenizer
        self._vocab_size = len(self._hf)
        added = self._backend.get_added_tokens_decoder()
        self._special_ids = tuple(sorted(i for i, token in added.items() if token.special))
        self._eos_token_ids = _read_eos_token_ids(model_dir, self._hf.eos_token_id)
        self._byte_token_ids = self._find_byte_token_ids()
        known_ids = frozenset(self._backend.get_vocab(with_added_tokens=True).values())
        self._visible_ids = {False: known_ids, True: known_ids - frozenset(self._special_ids)}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a sequence: generation_config.json's eos_token_id, else the tokenizer's EOS."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        token_id = self._hf.bos_token_id
        return None if token_id is None else int(token_id)

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of special tokens, sorted: those skip_special_tokens leaves out of decoded text."""
        return self._special_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Byte-fallback pieces (<0xE4> etc.): the decoder joins each run of them into UTF-8 as a whole,
        so a later byte piece can change how the earlier ones of its run decode."""
        return self._byte_token_ids

    def visible_ids(self, skip_special_tokens: bool) -> frozenset[int]:
        """Ids that decode() writes text for: every vocabulary piece (added tokens included), less the special
        tokens when skip_special_tokens; a set, for per-token membership tests."""
        return self._visible_ids[skip_special_tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds what the post-processor adds (a BOS for Llama)."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; ids outside the vocabulary decode to nothing."""
        return str(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str | None]:
        """The vocabulary piece of each id, None for ids outside the vocabulary."""
        return [self._backend.id_to_token(token_id) for token_id in token_ids]

    def _find_byte_token_ids(self) -> frozenset[int]:
        if not getattr(self._backend.model, "byte_fallback", False):
            return frozenset()
        vocab = self._backend.get_vocab(with_added_tokens=False)
        return frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))


def _read_eos_token_ids(model_dir: Path, tokenizer_eos_id: int | None) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and eos:
            return tuple(int(i) for i in eos)
    return () if tokenizer_eos_id is None else (int(tokenizer_eos_id),)
