"""Architecture description parsed from a Hugging Face config.json, and the registry of supported architectures."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pagedserve.gpu_worker.errors import ModelLoadError


class Architecture(enum.Enum):
    """Supported Hugging Face architectures; all are the same decoder with different traits."""

    LLAMA = "LlamaForCausalLM"
    MISTRAL = "MistralForCausalLM"
    QWEN2 = "Qwen2ForCausalLM"
    QWEN3 = "Qwen3ForCausalLM"


@dataclass(frozen=True, slots=True)
class ArchitectureTraits:
    """How one architecture departs from the plain Llama decoder."""

    qkv_bias_always: bool = False  # Qwen2 has q/k/v biases whatever attention_bias says
    has_qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope


ARCHITECTURES: dict[Architecture, ArchitectureTraits] = {
    Architecture.LLAMA: ArchitectureTraits(),
    Architecture.MISTRAL: ArchitectureTraits(),
    Architecture.QWEN2: ArchitectureTraits(qkv_bias_always=True),
    Architecture.QWEN3: ArchitectureTraits(has_qk_norm=True),
}


@dataclass(frozen=True, slots=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency-dependent rope scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shapes and options the decoder needs; built by from_hf_config, never mutated."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    has_qkv_bias: bool
    has_qk_norm: bool
    config_dtype: str | None  # config.json's torch_dtype / dtype, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parses a config.json dict; raises ModelLoadError for architectures or options not supported."""
        names = hf.get("architectures") or []
        try:
            architecture = Architecture(names[0])
        except (IndexError, ValueError):
            supported = ", ".join(a.value for a in Architecture)
            raise ModelLoadError(f"unsupported architectures {names!r}; supported: {supported}") from None
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {hf['hidden_act']!r}")
        if hf.get("mlp_bias", False):
            raise ModelLoadError("mlp_bias is not supported")
        traits = ARCHITECTURES[architecture]
        num_heads = int(hf["num_attention_heads"])
        rope_theta, rope_scaling = _parse_rope(hf)
        return cls(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            has_qkv_bias=traits.qkv_bias_always or bool(hf.get("attention_bias", False)),
            has_qk_norm=traits.has_qk_norm,
            config_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        )


def _parse_rope(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """Reads rope settings from either layout: rope_parameters (newer) or rope_theta + rope_scaling (older)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
    return theta, Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
