"""`vllm bench throughput` for pagedserve's offline LLM API, with transformers baselines on the same prompts and
weights and every result as a share of the device's roofline bound."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.hardware_bound import (
    HardwareRates,
    Workload,
    bound_summary,
    device_name,
    dtype_bytes,
    measure_hardware,
    percent_of_bound,
)
from benchmarks.hf_baseline import (
    BackendRun,
    HFBackend,
    load_model,
    run_generate,
    run_generate_batch,
    save_seeded_weights,
)
from benchmarks.model_shapes import SHAPES, add_model_arguments, read_shape, sampling_vocab_size, write_model_dir
from benchmarks.random_dataset import BenchRequest, sample_random_requests
from benchmarks.step_profile import step_kinds, step_profile
from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.control_plane.config import EngineConfig, offline_step_budget

PAGEDSERVE = "pagedserve"
_HEADERS = ("backend", "requests", "output tokens", "elapsed s", "req/s", "out tok/s", "total tok/s",
            "% of bound", "pagedserve x")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    add_model_arguments(p, "model directory (config.json + tokenizer [+ safetensors])")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "safetensors", "auto"],
                   help="dummy: seeded random weights, saved once so every backend loads the same ones")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quantization", default="none", choices=["none", "fp8"], help="FP8 (e4m3) linear weights")
    p.add_argument("--quantize-lm-head", action="store_true", help="an FP8 LM head too (with --quantization fp8)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="FP8 (e4m3) KV cache")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget of a step (default: the LLM API's, offline_step_budget of the device)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=int)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB of KV cache on a CPU worker")
    p.add_argument("--max-steps-in-flight", type=int, default=EngineConfig().max_steps_in_flight)
    p.add_argument("--worker-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the worker in a child process (the LLM default) or on a thread of this one")
    p.add_argument("--hf-backends", default="hf-generate,hf-generate-batch",
                   help="comma-separated transformers baselines to run too (empty: none)")
    p.add_argument("--hf-num-prompts", type=int, default=100, help="the first N prompts go to the baselines")
    p.add_argument("--hf-batch-size", type=int, default=32, help="static batch size of hf-generate")
    p.add_argument("--hf-attn-implementation", default="sdpa", help="attention of hf-generate")
    p.add_argument("--hf-batch-attn-implementation", default="sdpa",
                   help="attention of hf-generate-batch (sdpa, paged|eager or a flash_attention_*)")
    p.add_argument("--hf-batch-num-blocks", type=int, help="KV blocks of hf-generate-batch (default: sized by it)")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs pagedserve shards the model over (a worker process each); the bound is of as many")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return p


def _resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_hf_baselines(model_dir: Path, requests: Sequence[BenchRequest], backends: Sequence[HFBackend],
                     args: argparse.Namespace, device: torch.device) -> list[BackendRun]:
    """Each baseline on the first hf_num_prompts requests; the model is freed before returning."""
    subset = requests[: args.hf_num_prompts]
    torch_dtype = getattr(torch, args.dtype)
    model = load_model(model_dir, torch_dtype, device, args.hf_attn_implementation)
    runs = []
    for backend in backends:
        if backend is HFBackend.GENERATE:
            runs.append(run_generate(model, subset, args.hf_batch_size, device, args.ignore_eos))
        else:
            runs.append(run_generate_batch(model, subset, args.hf_batch_attn_implementation, args.ignore_eos,
                                           args.hf_batch_num_blocks))
        print(f"{backend.value}: {runs[-1].output_tokens / runs[-1].elapsed_s:.1f} output tokens/s", flush=True)
    del model
    _free_device_memory(device)
    return runs


def run_pagedserve(model_dir: Path, requests: Sequence[BenchRequest], args: argparse.Namespace,
                   load_format: str, device: torch.device) -> BackendRun:
    """All requests through LLM.generate at once, after a short untimed warm-up on other prompts."""
    from pagedserve.clients.llm import LLM, SamplingParams
    from pagedserve.control_plane.config import CacheConfig, SchedulerConfig

    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len)
    cache = CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                        num_gpu_blocks_override=args.num_gpu_blocks_override,
                        kv_cache_memory_bytes=int(args.kv_cache_memory * (1 << 30)))
    with LLM(model_dir, dtype=DType(args.dtype), device=DeviceKind(device.type), load_format=LoadFormat(load_format),
             seed=args.seed, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
             quantize_lm_head=args.quantize_lm_head, scheduler_config=scheduler, cache_config=cache,
             engine_config=EngineConfig(max_steps_in_flight=args.max_steps_in_flight),
             worker_process=args.worker_process, tensor_parallel_size=args.tensor_parallel_size) as llm:
        warmups = sample_random_requests(2, 16, 4, 0.0, sampling_vocab_size(model_dir), args.seed - 1)
        llm.generate([r.prompt_token_ids for r in warmups], SamplingParams(max_tokens=4, temperature=0.0))
        params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=args.ignore_eos)
                  for r in requests]
        before, last_warmup_step = llm.status(), llm.recent_steps()[-1].step_id
        start = time.perf_counter()
        outputs = llm.generate([r.prompt_token_ids for r in requests], params)
        elapsed = time.perf_counter() - start
        profile = step_profile(before, llm.status())
        kinds = step_kinds([r for r in llm.recent_steps() if r.step_id > last_warmup_step])
    print("pagedserve step profile: " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()), flush=True)
    if kinds:
        print(report.text_table(list(kinds[0]), [list(kind.values()) for kind in kinds]), flush=True)
    _free_device_memory(device)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return BackendRun(PAGEDSERVE, len(requests), prompt_tokens, output_tokens, elapsed,
                      min(args.max_num_seqs, len(requests)), profile, kinds)



def _with_bounds(runs: Sequence[BackendRun], model_dir: Path, args: argparse.Namespace,
                 rates: HardwareRates | None) -> list[dict[str, Any]]:
    """Each run as a dict with its bound, its share of it and pagedserve's speed-up over it."""
    shape = read_shape(model_dir)
    records = [run.as_dict() for run in runs]
    ours = records[0]["output_tokens_per_s"]
    for record, run in zip(records, runs, strict=True):
        record["pagedserve_speedup"] = ours / record["output_tokens_per_s"]
        if rates is not None:
            workload = Workload(run.num_requests, args.input_len, args.output_len, run.concurrency,
                                args.max_num_batched_tokens)
            # The transformers baselines run in the model dtype; pagedserve's bound counts its FP8 bytes.
            is_ours = record["backend"] == PAGEDSERVE
            widths = dtype_bytes(args.dtype, is_ours and args.quantization == "fp8",
                                 is_ours and args.kv_cache_dtype == "fp8", is_ours and args.quantize_lm_head)
            record.update(bound_summary(shape, widths, rates, workload))
            record["percent_of_bound"] = percent_of_bound(run.elapsed_s, record["bound_s"])
    return records


def _rows(records: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[r["backend"], r["num_requests"], r["output_tokens"], r["elapsed_s"], r["requests_per_s"],
             r["output_tokens_per_s"], r["total_tokens_per_s"], r.get("percent_of_bound", "-"),
             r["pagedserve_speedup"]] for r in records]


def _benchmark(model_dir: Path, args: argparse.Namespace, device: torch.device) -> list[BackendRun]:
    requests = sample_random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                                      sampling_vocab_size(model_dir), args.seed)
    backends = [HFBackend(name) for name in args.hf_backends.split(",") if name]
    load_format = args.load_format
    if backends and load_format == "dummy":
        save_seeded_weights(model_dir, getattr(torch, args.dtype), device, args.seed)
        load_format = "safetensors"
    hf_runs = run_hf_baselines(model_dir, requests, backends, args, device) if backends else []
    return [run_pagedserve(model_dir, requests, args, load_format, device), *hf_runs]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every backend, writes <result-dir>/<date>-throughput-<device>.{json,md,png}; returns the JSON record."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensor_parallel_size > 1 and args.hf_backends:
        parser.error("the transformers baselines run on one device: give --hf-backends '' with --tensor-parallel-size")
    device = _resolve_device(args.device)
    if args.max_num_batched_tokens is None:
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        args.max_num_batched_tokens = offline_step_budget(memory)
    rates = measure_hardware(device).times(args.tensor_parallel_size) if args.bound else None
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch:
        if args.model_shape:
            model_dir = write_model_dir(SHAPES[args.model_shape], Path(scratch) / args.model_shape, args.tokenizer_dir)
        elif args.load_format == "dummy" and args.hf_backends:
            # Weights are saved beside the config, so work on a copy rather than write into the caller's directory.
            model_dir = write_model_dir(read_shape(args.model), Path(scratch) / args.model.name, args.model)
            (model_dir / "config.json").write_text((args.model / "config.json").read_text())
        else:
            model_dir = args.model
        records = _with_bounds(_benchmark(model_dir, args, device), model_dir, args, rates)
    metadata = report.run_metadata("throughput", device_name(device))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"metadata": metadata, "config": config, "model": model_dir.name,
              "hardware": dataclasses.asdict(rates) if rates else None, "backends": records}
    stem = report.result_stem(args.result_dir, metadata)
    markdown = report.markdown_report(f"Offline throughput: {model_dir.name}", metadata, [
        ("Workload", f"{args.num_prompts} random prompts ({args.hf_num_prompts} for the transformers baselines) of "
                     f"{args.input_len} tokens in, {args.output_len} out, greedy, ignore_eos {args.ignore_eos}, "
                     f"dtype {args.dtype} (pagedserve: quantization {args.quantization}, KV cache "
                     f"{args.kv_cache_dtype}; its bound counts those bytes); the same token ids and weights for "
                     "every backend.\n"),
        ("Results", report.markdown_table(_HEADERS, _rows(records))),
    ])
    paths = report.write_outputs(stem, result, markdown)
    plot = report.plot_throughput(records, stem.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in [*paths, *([plot] if plot else [])]))
    print(report.text_table(_HEADERS, _rows(records)))
    return result


if __name__ == "__main__":
    from pagedserve.runtime.logs import LogFormat, configure_logging

    configure_logging(LogFormat.CONSOLE, logging.WARNING)  # per-request engine events would drown the results
    main()
