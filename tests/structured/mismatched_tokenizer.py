"""A tokenizer for the frontend that differs from the worker's in one special token, so that a constraint naming it
passes the frontend's check and fails the worker's compilation: the real way a worker-side compile can fail (the
worker reads its model directory's tokenizer.json, the control plane reads --tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput

MARKER = "<|marker|>"
# Compiles with the marked tokenizer; stories260K's own has no such special token.
MARKED = StructuredOutput(ConstraintKind.GRAMMAR, f'start: "yes" {MARKER}')


def write_marked_tokenizer(stories260k_dir: Path, destination: Path) -> Path:
    """stories260K's tokenizer files in destination, with the byte piece <0x00> (never produced by text without a
    NUL) renamed to the special token MARKER: the same ids for every other text, the same vocabulary size."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(stories260k_dir / name, destination / name)
    tokenizer = json.loads((stories260k_dir / "tokenizer.json").read_text())
    token_id = tokenizer["model"]["vocab"].pop("<0x00>")
    tokenizer["model"]["vocab"][MARKER] = token_id
    tokenizer["added_tokens"].append({"id": token_id, "content": MARKER, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (destination / "tokenizer.json").write_text(json.dumps(tokenizer))
    return destination
