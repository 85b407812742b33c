"""Builds a decoder from a Hugging Face model directory: config.json plus safetensors, or seeded dummy weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors import safe_open

from pagedserve.contract.model_format import DType, LoadFormat, Quantization
from pagedserve.gpu_worker import devices
from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.fp8_support import require_fp8_device
from pagedserve.gpu_worker.fp8_weights import (
    checkpoint_is_fp8,
    fp8_linear_bytes,
    load_fp8_checkpoint,
    quantize_linears,
    quantize_lm_head_of,
)
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.model_config import ModelConfig
from pagedserve.gpu_worker.parallel.group import SINGLE_RANK, ParallelGroup
from pagedserve.kernels.ops import KernelOps

log = structlog.get_logger()

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_DUMMY_STD = 0.02


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to run, with what the worker reports about it."""

    name: str
    model: DecoderForCausalLM
    config: ModelConfig
    dtype: torch.dtype
    weight_bytes: int


def read_model_config(model_dir: Path) -> ModelConfig:
    """Parses model_dir/config.json; ModelLoadError when absent or unsupported."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


def resolve_dtype(dtype: DType, config: ModelConfig) -> torch.dtype:
    """The dtype asked for, or for AUTO the config's dtype (float32 when it names none)."""
    if dtype is not DType.AUTO:
        return devices.torch_dtype(dtype)
    if config.config_dtype is None:
        return torch.float32
    try:
        return devices.torch_dtype(DType(config.config_dtype))
    except ValueError:
        raise ModelLoadError(f"unsupported config dtype {config.config_dtype!r}") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: the shards named by the index, or the single model.safetensors."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in shard_names]
    single = model_dir / _SINGLE_FILE
    return [single] if single.is_file() else []


def iter_safetensors(files: list[Path], model: DecoderForCausalLM | None = None,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every file (that model loads, when given), one tensor in memory at a
    time: only the slice model's rank holds is read from the file (a tensor-parallel rank reads its part of each
    weight). Without model every tensor comes whole (an FP8 checkpoint's scales, which model does not name)."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                is_loaded, part = (True, None) if model is None else model.weight_slice(name)
                if not is_loaded:
                    continue
                if part is None:
                    yield name, handle.get_tensor(name)
                    continue
                view = handle.get_slice(name)
                yield name, view[part.start : part.stop] if part.dim == 0 else view[:, part.start : part.stop]


def fill_dummy_weights(model: DecoderForCausalLM, seed: int) -> None:
    """Deterministic random weights for a seed: norms 1, everything else normal(0, 0.02).

    Values are drawn on the CPU in parameter-name order, so they are the same on any device.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, _DUMMY_STD, generator=generator)
            param.copy_(values)


def load_model(
    model_dir: Path, dtype: DType, device: torch.device, load_format: LoadFormat, seed: int, ops: KernelOps,
    quantization: Quantization = Quantization.NONE, group: ParallelGroup = SINGLE_RANK, quantize_lm_head: bool = False,
) -> LoadedModel:
    """Builds the decoder on device in the resolved dtype and fills its weights as load_format says: group.rank's
    slices of them under tensor parallelism (its config is then that rank's, see DecoderForCausalLM). Linear layers
    are FP8 when quantization says so (each rank quantizes its slices once loaded) or when the checkpoint is FP8
    (loaded as is, with one rank only). With FP8 weights, quantize_lm_head makes the LM head FP8 too (each rank its
    vocabulary rows)."""
    config = read_model_config(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    is_fp8_checkpoint = load_format is not LoadFormat.DUMMY and checkpoint_is_fp8(model_dir)
    fp8_weights = quantization is Quantization.FP8 or is_fp8_checkpoint
    if fp8_weights:
        require_fp8_device(device, "FP8 weights (--quantization fp8, or an FP8 checkpoint)")
    if quantize_lm_head and not fp8_weights:
        raise ModelLoadError("--quantize-lm-head needs FP8 weights: add --quantization fp8, or serve an FP8 checkpoint")
    if is_fp8_checkpoint and group.size > 1:
        raise ModelLoadError(f"{model_dir} is an FP8 checkpoint, which tensor parallelism cannot slice (its weights "
                             "are scaled per tensor); serve it with one rank, or quantize a model-dtype checkpoint "
                             "with --quantization fp8")
    with torch.no_grad():
        model = DecoderForCausalLM(config, ops, device, torch_dtype, group).eval()
        if load_format is LoadFormat.DUMMY:
            fill_dummy_weights(model, seed)
        else:
            files = safetensors_files(model_dir)
            if not files:
                raise ModelLoadError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {model_dir} (use load format dummy)")
            if is_fp8_checkpoint:
                load_fp8_checkpoint(model, iter_safetensors(files))  # one rank: whole
            else:
                model.load_weights(iter_safetensors(files, model))
        if quantization is Quantization.FP8:
            quantize_linears(model)
        if quantize_lm_head:
            quantize_lm_head_of(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model-dtype weights that quantizing freed go back to the device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + fp8_linear_bytes(model)
    log.info("model_loaded", architecture=config.architecture.value, dtype=str(torch_dtype).removeprefix("torch."),
             device=str(device), weight_bytes=weight_bytes, load_format=load_format.value,
             fp8_weights=fp8_weights, fp8_lm_head=quantize_lm_head, tp_rank=group.rank,
             tp_size=group.size)
    return LoadedModel(model_dir.resolve().name, model, model.config, torch_dtype, weight_bytes)
