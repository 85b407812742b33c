"""Named model shapes written as model directories (config.json + tokenizer) for dummy-weight benchmarks."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes of a Llama-architecture decoder; everything a benchmark needs to build or bound it."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layer_parameters(self) -> int:
        """Weights of one decoder layer: q, k, v, o projections, gate/up/down MLP and two norms."""
        d, qkv_out = self.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.resolved_head_dim
        attention = d * qkv_out + self.num_heads * self.resolved_head_dim * d
        return attention + 3 * d * self.intermediate_size + 2 * d

    @property
    def num_parameters(self) -> int:
        """All weights, counting a tied embedding once."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * self.layer_parameters + self.hidden_size

    @property
    def matmul_parameters(self) -> int:
        """Weights that multiply every token's activations: the layers and the LM head (not the embedding gather)."""
        return self.num_layers * self.layer_parameters + self.vocab_size * self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.resolved_head_dim * dtype_bytes

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face LlamaForCausalLM config.json in bfloat16."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.resolved_head_dim,
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        }
        if self.rope_scaling is not None:
            config["rope_scaling"] = dict(self.rope_scaling)
        return config

    @classmethod
    def from_hf_config(cls, name: str, hf: dict[str, Any]) -> ModelShape:
        """The shape of an existing config.json (Llama-like fields only)."""
        num_heads = int(hf["num_attention_heads"])
        return cls(
            name=name, hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads, num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            intermediate_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=hf.get("head_dim"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        )


SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama-3.2-1b", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                   rope_scaling=_LLAMA3_ROPE_SCALING, max_position_embeddings=131072),
        ModelShape("tinyllama-1.1b", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                   intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048),
        ModelShape("llama-3-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                   max_position_embeddings=8192),
    )
}


def write_model_dir(shape: ModelShape, destination: Path, tokenizer_dir: Path = DEFAULT_TOKENIZER_DIR) -> Path:
    """Writes destination/config.json for the shape and copies the tokenizer files beside it; returns destination."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "config.json").write_text(json.dumps(shape.to_hf_config(), indent=2) + "\n")
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, destination / name)
    return destination


def read_shape(model_dir: Path) -> ModelShape:
    """The shape of a model directory's config.json."""
    return ModelShape.from_hf_config(model_dir.name, json.loads((model_dir / "config.json").read_text()))


def sampling_vocab_size(model_dir: Path) -> int:
    """Random prompt ids are drawn below this: the smaller of the tokenizer's and the model's vocabularies."""
    from tokenizers import Tokenizer

    tokenizer_vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return min(tokenizer_vocab, read_shape(model_dir).vocab_size)


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model DIR or --model-shape NAME (exactly one), and --tokenizer-dir for a shape: a benchmark's model."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help=model_help)
    model.add_argument("--model-shape", choices=sorted(SHAPES), help="write a named shape to a temporary directory")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR, help="for --model-shape")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a model directory for a named shape (dummy weights).")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    path = write_model_dir(shape, args.output, args.tokenizer_dir)
    print(f"{path}: {shape.name}, {shape.num_parameters / 1e9:.3f} B parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
