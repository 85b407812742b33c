"""What a model directory tells vLLM's GetModelInfo and GetTokenizer: config.json's facts and the tokenizer files
(with the chat template) as one zip archive, so that a gateway needs no copy of the model."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The files a tokenizer (and its chat template) is rebuilt from, as Hugging Face lays them out; weights never.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json",
    "vocab.json", "merges.txt", "tokenizer.model", "tiktoken.model", "chat_template.json", "chat_template.jinja",
    "added_tokens.json",
)
TOKENIZER_FILE_SUFFIXES = (".jinja", ".tiktoken")
CHUNK_BYTES = 64 * 1024  # per GetTokenizerChunk


@dataclass(frozen=True, slots=True)
class TokenizerBundle:
    """The zip archive and its SHA-256 (hex), built once: the files do not change while the server runs."""

    data: bytes
    sha256: str

    def chunks(self) -> list[bytes]:
        return [self.data[start:start + CHUNK_BYTES] for start in range(0, len(self.data), CHUNK_BYTES)] or [b""]


def build_tokenizer_bundle(model_dir: Path) -> TokenizerBundle:
    """The tokenizer files of model_dir in a zip (stored names, fixed timestamps: the same files give the same
    bytes); FileNotFoundError when the directory has none."""
    names = sorted({path.name for path in model_dir.iterdir() if path.is_file() and (
        path.name in TOKENIZER_FILE_NAMES or path.name.endswith(TOKENIZER_FILE_SUFFIXES))})
    if not names:
        raise FileNotFoundError(f"no tokenizer files in {model_dir}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), (model_dir / name).read_bytes(),
                             compress_type=zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    return TokenizerBundle(data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True, slots=True)
class ModelConfigFacts:
    """config.json's fields that GetModelInfo reports (0 / "" where the file does not say)."""

    model_type: str = ""
    bos_token_id: int = 0
    pad_token_id: int = 0


def read_config_facts(model_dir: Path) -> ModelConfigFacts:
    path = model_dir / "config.json"
    if not path.is_file():
        return ModelConfigFacts()
    config: dict[str, Any] = json.loads(path.read_text())
    return ModelConfigFacts(
        model_type=str(config.get("model_type") or ""),
        bos_token_id=_first_id(config.get("bos_token_id")),
        pad_token_id=_first_id(config.get("pad_token_id")),
    )


def _first_id(value: object) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else 0
