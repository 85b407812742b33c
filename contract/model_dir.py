"""What a model directory must hold, checked before any process starts: standard library only, so it takes
milliseconds where loading the model would fail after seconds, deep inside a worker."""

from __future__ import annotations

import json
from pathlib import Path

# The Hugging Face architectures the worker's decoder implements (gpu_worker.models.model_config.Architecture;
# tests/contract/test_model_dir.py holds the two to the same list).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILE = "tokenizer.json"


class ModelDirError(ValueError):
    """A model or tokenizer directory that cannot be served; the message is one line saying what to do."""


def check_model_dir(model_dir: Path, needs_weights: bool = True) -> None:
    """Raises ModelDirError unless model_dir is a local Hugging Face directory of a supported architecture, with
    safetensors weights when needs_weights."""
    _check_is_dir(model_dir, "--model")
    architecture = _read_architecture(model_dir)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelDirError(f"--model {model_dir}: unsupported architecture {architecture}; pagedserve serves "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if needs_weights and not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
        found = " (it has PyTorch .bin weights, which pagedserve does not load)" if any(model_dir.glob("*.bin")) else ""
        raise ModelDirError(f"--model {model_dir}: no model.safetensors or model.safetensors.index.json{found}")


def check_tokenizer_dir(model_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """The directory to read the tokenizer from: tokenizer_dir if given, else model_dir. Raises ModelDirError
    unless it holds a Hugging Face fast tokenizer (tokenizer.json)."""
    flag, where = ("--model", model_dir) if tokenizer_dir is None else ("--tokenizer", tokenizer_dir)
    _check_is_dir(where, flag)
    if not (where / _TOKENIZER_FILE).is_file():
        hint = "; give --tokenizer DIR holding the model's tokenizer.json" if tokenizer_dir is None else ""
        raise ModelDirError(f"{flag} {where}: no {_TOKENIZER_FILE} (a Hugging Face fast tokenizer){hint}")
    return where


def _check_is_dir(path: Path, flag: str) -> None:
    if path.is_dir():
        return
    if path.exists():
        raise ModelDirError(f"{flag} {path}: not a directory")
    text = str(path)
    if not path.is_absolute() and text.count("/") == 1 and not text.startswith("."):
        raise ModelDirError(f"{flag} {path}: no such directory; pagedserve reads local directories only, to serve "
                            f"the hub's {text} download it first: hf download {text} --local-dir DIR")
    raise ModelDirError(f"{flag} {path}: no such directory")


def _read_architecture(model_dir: Path) -> str:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelDirError(f"--model {model_dir}: config.json is not readable JSON ({error})") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ModelDirError(f"--model {model_dir}: config.json names no architecture (\"architectures\")")
    return names[0]
