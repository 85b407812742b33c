"""Roofline bounds: measured memory bandwidth and matmul rates, and the fastest a workload could run on them."""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.model_shapes import ModelShape, read_shape
from pagedserve.gpu_worker.models.fp8_linear import SCALED_MM_MIN_CAPABILITY

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP8_BYTES = 1


@dataclass(frozen=True, slots=True)
class HardwareRates:
    """What one device was measured to do, in the same run as the benchmark."""

    device_name: str
    memory_bandwidth_bytes_per_s: float  # bytes read + written per second by a large device copy
    matmul_flops_per_s: float  # large square GEMM: bf16 on CUDA, float32 on CPU
    fp8_matmul_flops_per_s: float  # the same GEMM in e4m3 on FP8 tensor cores; where there are none, the rate above

    def times(self, num_devices: int) -> HardwareRates:
        """num_devices such devices sharing each step perfectly (tensor parallelism with free communication): the
        bound a group of them could reach."""
        if num_devices == 1:
            return self
        return HardwareRates(f"{self.device_name} x{num_devices}", self.memory_bandwidth_bytes_per_s * num_devices,
                             self.matmul_flops_per_s * num_devices, self.fp8_matmul_flops_per_s * num_devices)


@dataclass(frozen=True, slots=True)
class StepCost:
    """Work of one engine step: it cannot finish faster than its bytes over bandwidth or its FLOPs over rate (the
    model dtype's FLOPs at its rate plus the FP8 linears' at theirs)."""

    bytes_moved: float
    flops: float
    fp8_flops: float = 0.0

    def time_s(self, rates: HardwareRates) -> float:
        compute_s = self.flops / rates.matmul_flops_per_s + self.fp8_flops / rates.fp8_matmul_flops_per_s
        return max(self.bytes_moved / rates.memory_bandwidth_bytes_per_s, compute_s)


@dataclass(frozen=True, slots=True)
class ElementBytes:
    """Bytes per element of what a step reads. `--quantization fp8` makes the decoder layers' linear weights one
    byte (norms, embeddings and the LM head keep the model dtype; the per-channel float32 scales, under 0.1 % of
    the bytes, are left out); `--quantize-lm-head` the LM head's too; `--kv-cache-dtype fp8` makes K and V one
    byte."""

    model: int
    layer_linear: int
    kv: int
    lm_head: int

    def matmul_weight_bytes(self, shape: ModelShape) -> int:
        """Bytes of the weights every token multiplies: each layer's linears and norms, and the LM head."""
        norms = 2 * shape.hidden_size
        per_layer = (shape.layer_parameters - norms) * self.layer_linear + norms * self.model
        return shape.num_layers * per_layer + shape.vocab_size * shape.hidden_size * self.lm_head

    def split_flops(self, layer_flops: float, lm_head_flops: float) -> tuple[float, float]:
        """The layers' and the LM head's matmul FLOPs as (model dtype, FP8): FP8 where the weights are (their rows
        are quantized per token and multiplied on FP8 tensor cores)."""
        fp8 = (layer_flops if self.layer_linear == FP8_BYTES else 0.0) + (
            lm_head_flops if self.lm_head == FP8_BYTES else 0.0)
        return layer_flops + lm_head_flops - fp8, fp8


@dataclass(frozen=True, slots=True)
class Workload:
    """N requests of input_len prompt tokens and output_len generated tokens, at most `concurrency` at once."""

    num_requests: int
    input_len: int
    output_len: int
    concurrency: int
    max_num_batched_tokens: int = 2048  # a prefill chunk per step reads the weights once

    @property
    def num_output_tokens(self) -> int:
        return self.num_requests * self.output_len


def dtype_bytes(dtype: str, fp8_weights: bool = False, fp8_kv: bool = False, fp8_lm_head: bool = False) -> ElementBytes:
    """Element widths of a model in dtype, with FP8 layer weights, an FP8 KV cache and / or an FP8 LM head."""
    model = _DTYPE_BYTES[dtype]
    return ElementBytes(model, FP8_BYTES if fp8_weights else model, FP8_BYTES if fp8_kv else model,
                        FP8_BYTES if fp8_lm_head else model)


def server_element_bytes(flags: Mapping[str, Any]) -> ElementBytes:
    """Element widths of what a served model's steps read, from the benchmark's server flags (its parsed arguments,
    or the config a record kept of them; flags that older records lack were off)."""
    return dtype_bytes(flags["dtype"], flags.get("quantization") == "fp8", flags.get("kv_cache_dtype") == "fp8",
                       bool(flags.get("quantize_lm_head")))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _median_time_s(fn: Callable[[], object], device: torch.device, warmups: int = 3, iterations: int = 10) -> float:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_hardware(device: torch.device) -> HardwareRates:
    """Times a 1 GiB copy and an 8192^3 bf16 GEMM on CUDA (64 MiB and 1024^3 float32 on CPU), and the GEMM in e4m3
    where the device has FP8 tensor cores; frees them after."""
    on_gpu = device.type == "cuda"
    num_bytes = (1 << 30) if on_gpu else (64 << 20)
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    copy_s = _median_time_s(functools.partial(target.copy_, source), device)
    del source, target
    n, gemm_dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=gemm_dtype, device=device, generator=generator)
    b = torch.randn(n, n, dtype=gemm_dtype, device=device, generator=generator)
    gemm_s = _median_time_s(functools.partial(torch.mm, a, b), device)
    fp8_gemm_s = gemm_s
    if on_gpu and torch.cuda.get_device_capability(device) >= SCALED_MM_MIN_CAPABILITY:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # _scaled_mm takes b column-major
        unit = torch.ones((), device=device)
        fp8_gemm_s = _median_time_s(
            functools.partial(torch._scaled_mm, a8, b8, scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16), device)
        del a8, b8
    del a, b
    if on_gpu:
        torch.cuda.empty_cache()
    return HardwareRates(device_name(device), 2 * num_bytes / copy_s, 2 * n**3 / gemm_s, 2 * n**3 / fp8_gemm_s)


def prefill_cost(shape: ModelShape, widths: ElementBytes, num_seqs: int, prompt_len: int, max_batched: int) -> StepCost:
    """Prefill of num_seqs prompts: weights read once per chunk of max_batched tokens, K/V written, causal attention,
    logits for each prompt's last token only."""
    tokens = num_seqs * prompt_len
    num_chunks = math.ceil(tokens / max_batched)
    layer_matmul = shape.num_layers * (shape.layer_parameters - 2 * shape.hidden_size)
    attention = 2 * shape.num_layers * shape.num_heads * shape.resolved_head_dim * prompt_len * (prompt_len + 1)
    lm_head_flops = 2 * shape.vocab_size * shape.hidden_size * num_seqs
    flops, fp8_flops = widths.split_flops(2 * layer_matmul * tokens, lm_head_flops)
    bytes_moved = num_chunks * widths.matmul_weight_bytes(shape) + tokens * shape.kv_bytes_per_token(widths.kv)
    return StepCost(bytes_moved, flops + num_seqs * attention, fp8_flops)


def decode_cost(shape: ModelShape, widths: ElementBytes, num_seqs: int, context_len: int) -> StepCost:
    """One decode step of num_seqs sequences, each attending to context_len tokens: all weights plus their K/V read."""
    kv_read = num_seqs * context_len * shape.kv_bytes_per_token(widths.kv)
    attention = 4 * shape.num_layers * shape.num_heads * shape.resolved_head_dim * context_len * num_seqs
    lm_head_flops = 2 * shape.vocab_size * shape.hidden_size * num_seqs
    flops, fp8_flops = widths.split_flops(2 * shape.matmul_parameters * num_seqs - lm_head_flops, lm_head_flops)
    return StepCost(widths.matmul_weight_bytes(shape) + kv_read, flops + attention, fp8_flops)


def _wave_time_s(
    shape: ModelShape, widths: ElementBytes, rates: HardwareRates, workload: Workload, num_seqs: int
) -> float:
    """num_seqs requests run together: one prefill (which yields the first token), then output_len - 1 decode steps."""
    total = prefill_cost(shape, widths, num_seqs, workload.input_len, workload.max_num_batched_tokens).time_s(rates)
    for step in range(1, workload.output_len):
        total += decode_cost(shape, widths, num_seqs, workload.input_len + step).time_s(rates)
    return total


def workload_bound_s(shape: ModelShape, widths: ElementBytes, rates: HardwareRates, workload: Workload) -> float:
    """Least time for the workload, modelled as waves of `concurrency` requests, each step at its roofline."""
    concurrency = max(1, min(workload.concurrency, workload.num_requests))
    full_waves, remainder = divmod(workload.num_requests, concurrency)
    total = full_waves * _wave_time_s(shape, widths, rates, workload, concurrency)
    if remainder:
        total += _wave_time_s(shape, widths, rates, workload, remainder)
    return total


def bound_summary(
    shape: ModelShape, widths: ElementBytes, rates: HardwareRates, workload: Workload
) -> dict[str, float]:
    """The bound as JSON fields: seconds and output tokens/s."""
    seconds = workload_bound_s(shape, widths, rates, workload)
    return {"bound_s": seconds, "bound_output_tokens_per_s": workload.num_output_tokens / seconds}


def percent_of_bound(measured_s: float, bound_s: float) -> float:
    """Throughput as a share of the bound's: the bound's time over the measured time, in percent."""
    return 100.0 * bound_s / measured_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure this device and bound a workload on a model directory.")
    parser.add_argument("--model", type=Path, required=True, help="model directory with a config.json")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPE_BYTES))
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--quantize-lm-head", action="store_true", help="count the LM head at one byte an element")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.quantize_lm_head and args.quantization != "fp8":
        parser.error("--quantize-lm-head needs --quantization fp8")
    rates = measure_hardware(torch.device(args.device))
    workload = Workload(args.num_prompts, args.input_len, args.output_len, args.concurrency,
                        args.max_num_batched_tokens)
    widths = dtype_bytes(args.dtype, args.quantization == "fp8", args.kv_cache_dtype == "fp8", args.quantize_lm_head)
    summary = bound_summary(read_shape(args.model), widths, rates, workload)
    print(json.dumps({"hardware": asdict(rates), "workload": asdict(workload), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
