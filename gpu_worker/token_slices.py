"""The token-trie slices the worker's grammar tokenizer is built with: a partition of the vocabulary by the regex
each token fully matches. A token mask applies a slice whole wherever the lexer's state allows all of its regex and
walks it token by token otherwise, so the slices decide what a mask costs, never what it holds.

llguidance's default bounds JSON string content at 10 and 30 bytes. Inside a string with a `maxLength`, once fewer
than 10 of its bytes remain the default's shortest slice no longer applies and the mask walks the trie: in the
benchmarks' schema corpus (every free string bounded) those walks are the costliest masks of a step. Finer bounds
keep a slice whole down to a string's last 2 bytes (benchmarks.mask_batch --slices; docs/structured-output.md has
the numbers)."""

from __future__ import annotations

JSON_STRING_BYTE = r'[^"\\\x00-\x1F\x7F]'  # a JSON string's bytes that need no escape
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]+"
STRING_CONTENT_BOUNDS = (2, 4, 6, 8, 10, 15, 20, 30)

TOKEN_SLICES: list[str] = [JSON_WHITESPACE, *(f"{JSON_STRING_BYTE}{{1,{n}}}" for n in STRING_CONTENT_BOUNDS),
                           f"{JSON_STRING_BYTE}+"]
