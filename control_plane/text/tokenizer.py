"""The model's tokenizer: a Hugging Face fast tokenizer loaded from a local model directory."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers.pre_tokenizers import ByteLevel

# PreTrainedTokenizerFast rather than AutoTokenizer: resolving a model-specific class through
# AutoTokenizer imports torch, which the control plane never loads.
from transformers import PreTrainedTokenizerFast

from pagedserve.control_plane.text.piece_texts import PieceTexts

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# Most code points one character's canonical decomposition has (Unicode 15: 4, e.g. U+1F87), hence the most
# characters NFC or NFKC can compose into one.
_MAX_COMPOSED_CHARS = 4
# Normalizers and pre-tokenizers that keep every character of the text (they may add some).
_KEEPING_NORMALIZERS = frozenset({"Prepend", "NFD", "NFKD", "Lowercase", "ByteLevel"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts",
                                     "FixedLength"})


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
        self._added_token_ids = frozenset(added)
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
    def backend_json(self) -> str:
        """The tokenizers library's JSON form of this tokenizer (added tokens included), as grammar engines read it."""
        return str(self._backend.to_str())

    @property
    def bos_token_id(self) -> int | None:
        token_id = self._hf.bos_token_id
        return None if token_id is None else int(token_id)

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of special tokens, sorted: those skip_special_tokens leaves out of decoded text."""
        return self._special_ids

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens (special or not), which the decoder writes as they are."""
        return self._added_token_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Byte-fallback pieces (<0xE4> etc.): the decoder joins each run of them into UTF-8 as a whole,
        so a later byte piece can change how the earlier ones of its run decode."""
        return self._byte_token_ids

    def visible_ids(self, skip_special_tokens: bool) -> frozenset[int]:
        """Ids that decode() writes text for: every vocabulary piece (added tokens included), less the special
        tokens when skip_special_tokens; a set, for per-token membership tests."""
        return self._visible_ids[skip_special_tokens]

    @cached_property
    def piece_texts(self) -> PieceTexts | None:
        """What each plain piece adds to a decoded text, so a detokenizer steps over it without decoding; None when
        this tokenizer's decoder may write a piece differently after different tokens."""
        return PieceTexts.of(self._backend, self._added_token_ids)

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """L: the most characters of text one token can stand for, so a text of C characters has at least
        ceil(C / L) tokens; None when this tokenizer may drop or fuse characters without bound (an unknown-token
        run, a normalizer or pre-tokenizer that removes characters), so no length bound holds.

        L is the longest vocabulary piece in characters (a byte-fallback piece such as <0xE4> stands for at most
        one character, the space marker for one space, a byte-level symbol for one byte), times the most
        characters the normalizer can merge into one."""
        pieces = _longest_piece(self._backend, self._byte_token_ids)
        shrink = _normalizer_shrink(_state(self._backend.normalizer))
        if pieces is None or shrink is None or not _keeps_characters(_state(self._backend.pre_tokenizer)):
            return None
        return pieces * shrink

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds what the post-processor adds (a BOS for Llama), except a BOS
        before a text that already starts with one (a prompt templated beforehand, such as Llama 3's
        `<|begin_of_text|>...` or Llama 2's `<s>[INST]...`): it gets no second BOS. Releases the interpreter lock
        while it tokenizes (the batch call does, the single one does not), so a long text tokenized on another
        thread does not stall the caller's event loop."""
        encoding = self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        ids: list[int] = encoding.ids
        bos = self.bos_token_id
        # special_tokens_mask is 1 where the post-processor added the token, 0 where the text had it.
        is_doubled = bos is not None and ids[:2] == [bos, bos] and encoding.special_tokens_mask[:2] == [1, 0]
        if add_special_tokens and is_doubled:
            return ids[1:]
        return ids

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (tokenizer_config.json's chat_template, chat_template.jinja)."""
        return self._hf.chat_template is not None

    @property
    def special_token_names(self) -> frozenset[str]:
        """Names under which chat templates read the special tokens (bos_token, eos_token, ...)."""
        return frozenset(self._hf.special_tokens_map)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], chat_template: str | None,
        add_generation_prompt: bool, continue_final_message: bool, template_kwargs: Mapping[str, Any],
    ) -> str:
        """The conversation as prompt text, by transformers' apply_chat_template (Jinja in its immutable sandbox):
        with chat_template, else the model's (its tool-use variant when there are tools and it has one). Raises
        whatever the template raises."""
        return str(self._hf.apply_chat_template(
            [dict(m) for m in messages], tools=[dict(t) for t in tools] or None, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=False, **template_kwargs,
        ))

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


def _state(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's tokenizer.json form; None when the pipeline has none."""
    return None if component is None else dict(json.loads(component.__getstate__()))


def _longest_piece(backend: Any, byte_token_ids: frozenset[int]) -> int | None:
    """Most characters one token covers, before normalization; None when unknown characters can be dropped
    (no unknown token) or fused into one unknown token, or an added token strips the whitespace beside it."""
    if backend.truncation is not None:
        return None  # a truncated encoding has fewer tokens than any bound
    model = backend.model
    kind = type(model).__name__
    has_all_bytes = bool(getattr(model, "byte_fallback", False)) and len(byte_token_ids) == 256
    vocab: Mapping[str, int] = backend.get_vocab(with_added_tokens=False)
    # Without byte pieces for every byte, an unknown character is dropped (no unknown token), fused with its
    # neighbours into one unknown token, or (not BPE) a whole word becomes one unknown token.
    can_drop = kind != "BPE" or getattr(model, "unk_token", None) is None or getattr(model, "fuse_unk", True)
    if can_drop and not (has_all_bytes or _has_byte_level_alphabet(backend, vocab)):
        return None
    longest = max((1 if i in byte_token_ids else len(piece) for piece, i in vocab.items()), default=1)
    for token in backend.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip:
            return None
        longest = max(longest, len(token.content))
    return longest


def _has_byte_level_alphabet(backend: Any, vocab: Mapping[str, int]) -> bool:
    """Whether a byte-level pre-tokenizer turns every text into symbols that are all vocabulary pieces."""
    state = _state(backend.pre_tokenizer)
    steps = state.get("pretokenizers", [state]) if state else []
    if not any(step.get("type") == "ByteLevel" for step in steps):
        return False
    return all(symbol in vocab for symbol in ByteLevel.alphabet())


def _normalizer_shrink(state: dict[str, Any] | None) -> int | None:
    """The most input characters the normalizer turns into one; None when it may remove characters."""
    if state is None:
        return 1
    kind = state.get("type")
    if kind == "Sequence":
        factor = 1
        for step in state.get("normalizers", []):
            step_factor = _normalizer_shrink(step)
            if step_factor is None:
                return None
            factor *= step_factor
        return factor
    if kind in _KEEPING_NORMALIZERS:
        return 1
    if kind in ("NFC", "NFKC"):
        return _MAX_COMPOSED_CHARS
    if kind == "Replace" and "String" in state.get("pattern", {}) and state.get("content"):
        return -(-len(state["pattern"]["String"]) // len(state["content"]))
    return None  # Strip, StripAccents, Nmt, Precompiled, Bert, a regex Replace: may remove characters


def _keeps_characters(state: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer passes every character on (splitting is fine, removing is not)."""
    if state is None:
        return True
    if state.get("type") == "Sequence":
        return all(_keeps_characters(step) for step in state.get("pretokenizers", []))
    return state.get("type") in _KEEPING_PRE_TOKENIZERS and state.get("behavior") != "Removed"


def _read_eos_token_ids(model_dir: Path, tokenizer_eos_id: int | None) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and eos:
            return tuple(int(i) for i in eos)
    return () if tokenizer_eos_id is None else (int(tokenizer_eos_id),)
