"""`vllm bench serve` for pagedserve: random prompts streamed over gRPC to a server, TTFT/TPOT/ITL and throughput."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from benchmarks.hardware_bound import HardwareRates, Workload, bound_summary, dtype_bytes, percent_of_bound
from benchmarks.model_shapes import SHAPES, add_model_arguments, read_shape, sampling_vocab_size, write_model_dir
from benchmarks.random_dataset import BenchRequest, sample_random_requests
from benchmarks.serving_metrics import RequestRecord, compute_metrics
from benchmarks.step_profile import step_profile
from benchmarks.structured_workload import constraints_for, parse_modes
from pagedserve.clients.health_check import is_serving
from pagedserve.control_plane.launch.worker_launcher import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc

_SUMMARY_HEADERS = ("constraint", "concurrency", "req/s", "out tok/s", "total tok/s", "TTFT p50 ms", "TTFT p99 ms",
                    "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "% of bound")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__)
    add_model_arguments(p, "model directory (config.json + tokenizer)")
    p.add_argument("--server", metavar="HOST:PORT", help="use a running server instead of starting one")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="of the server's workers")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"], help="of the server's workers")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "safetensors", "auto"])
    p.add_argument("--serve-args", default="", help="more `pagedserve serve` flags, one shell-quoted string")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals; inf: all at once")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--sweep-concurrency", help="comma-separated max concurrencies, run in turn, e.g. 1,4,16,64")
    p.add_argument("--prompts-per-concurrency", type=int,
                   help="in a sweep, run min(num_prompts, this x concurrency) prompts per level")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--structured-output", type=parse_modes, default=parse_modes("none"),
                   help="comma-separated constraints, each run at every concurrency: none, schema (a JSON schema on "
                        "every request, the corpus of benchmarks/json_schemas.py: compiled once each, then cached), "
                        "unique-schema (each request's schema unique: every one compiled cold)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests before the first run")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True,
                   help="measure this device and report throughput as a share of the roofline bound")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's, for the bound")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the started server shards the model over (its --tensor-parallel-size); the bound is "
                        "that of as many devices as measured")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return p


async def _wait_serving(address: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(is_serving, address, 1.0):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not serving after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
        await asyncio.sleep(0.2)


@contextmanager
def server_process(
    model_dir: Path, args: argparse.Namespace, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`pagedserve serve` in a child process on a free loopback port; SIGTERM on exit."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--model", str(model_dir),
               "--load-format", args.load_format, "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype,
               "--quantization", args.quantization, "--host", "127.0.0.1", "--port", str(port),
               "--tensor-parallel-size", str(args.tensor_parallel_size),
               *shlex.split(args.serve_args)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _send(stub: generation_service_pb2_grpc.GenerationServiceStub, request: BenchRequest,
                ignore_eos: bool, constraint: common_pb2.StructuredOutput | None) -> RequestRecord:
    params = common_pb2.SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=ignore_eos,
                                       structured_output=constraint)
    message = generation_service_pb2.GenerateRequest(sampling_params=params)
    message.token_ids.ids.extend(request.prompt_token_ids)
    record = RequestRecord(prompt_len=len(request.prompt_token_ids), start_s=time.perf_counter())
    try:
        async for chunk in stub.Generate(message):
            if chunk.token_ids:
                record.chunk_times_s.append(time.perf_counter())
                record.chunk_num_tokens.append(len(chunk.token_ids))
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    return record


async def run_requests(address: str, requests: Sequence[BenchRequest], request_rate: float,
                       max_concurrency: int | None, ignore_eos: bool, seed: int,
                       constraints: Sequence[common_pb2.StructuredOutput | None] | None = None,
                       ) -> tuple[list[RequestRecord], float]:
    """Sends every request (Poisson arrivals at request_rate, at most max_concurrency in flight), request i with
    constraints[i] when given; returns the records in request order and the wall time from the first send to the
    last reply."""
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    arrivals = random.Random(seed)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)

        async def limited(request: BenchRequest, constraint: common_pb2.StructuredOutput | None) -> RequestRecord:
            async with limit:
                return await _send(stub, request, ignore_eos, constraint)

        start = time.perf_counter()
        tasks = []
        for request, constraint in zip(requests, constraints or [None] * len(requests), strict=True):
            tasks.append(asyncio.create_task(limited(request, constraint)))
            if math.isfinite(request_rate):
                await asyncio.sleep(arrivals.expovariate(request_rate))
        records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - start


def concurrency_levels(args: argparse.Namespace) -> list[int | None]:
    if args.sweep_concurrency:
        return [int(level) for level in args.sweep_concurrency.split(",")]
    return [args.max_concurrency]


async def run_levels(address: str, model_dir: Path, args: argparse.Namespace,
                     rates: HardwareRates | None) -> list[dict[str, Any]]:
    """Warms up, then one run per concurrency level, each on its own prompts (so no level hits another's
    prefix cache)."""
    vocab_size = sampling_vocab_size(model_dir)
    shape = read_shape(model_dir)
    if args.num_warmups:
        warmups = sample_random_requests(args.num_warmups, args.random_input_len, 4, 0.0, vocab_size, args.seed - 1)
        await run_requests(address, warmups, math.inf, None, True, args.seed)
    runs = []
    plan = [(mode, level) for mode in args.structured_output for level in concurrency_levels(args)]
    for index, (mode, level) in enumerate(plan):
        num_prompts = args.num_prompts
        if level is not None and args.prompts_per_concurrency:
            num_prompts = min(num_prompts, args.prompts_per_concurrency * level)
        seed = args.seed + index
        requests = sample_random_requests(num_prompts, args.random_input_len, args.random_output_len,
                                          args.random_range_ratio, vocab_size, seed)
        before = await _server_status(address)
        records, duration_s = await run_requests(address, requests, args.request_rate, level, args.ignore_eos, seed,
                                                 constraints_for(mode, num_prompts, seed))
        run = {"structured_output": mode.value, "max_concurrency": level or num_prompts, "num_prompts": num_prompts,
               "seed": seed, "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
               "kv_cache_blocks": before.num_total_blocks}
        run.update(compute_metrics(records, duration_s))
        run["step_profile"] = step_profile(before, await _server_status(address))
        if rates is not None:
            workload = Workload(num_prompts, args.random_input_len, args.random_output_len, run["max_concurrency"],
                                args.max_num_batched_tokens)
            run.update(bound_summary(shape, dtype_bytes(args.dtype), rates, workload))
            run["percent_of_bound"] = percent_of_bound(duration_s, run["bound_s"])
        runs.append(run)
        print(f"{mode.value} max_concurrency={run['max_concurrency']}: {run['completed']} done, "
              f"{run['failed']} failed, {run['output_throughput']:.1f} output tokens/s", flush=True)
    return runs


async def _server_status(address: str) -> generation_service_pb2.GetServerStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        response: generation_service_pb2.GetServerStatusResponse = await stub.GetServerStatus(
            generation_service_pb2.GetServerStatusRequest())
        return response


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[r["structured_output"], r["max_concurrency"], r["request_throughput"], r["output_throughput"],
             r["total_token_throughput"],
             r["median_ttft_ms"], r["p99_ttft_ms"], r["median_tpot_ms"], r["median_itl_ms"], r["p99_itl_ms"],
             r.get("percent_of_bound", "-")] for r in runs]


async def _serve_and_run(model_dir: Path, args: argparse.Namespace, rates: HardwareRates | None,
                         log_path: Path) -> list[dict[str, Any]]:
    if args.server:
        return await run_levels(args.server, model_dir, args, rates)
    with server_process(model_dir, args, log_path) as (address, process):
        await _wait_serving(address, process, log_path, args.server_timeout)
        return await run_levels(address, model_dir, args, rates)


def _measure(args: argparse.Namespace) -> HardwareRates | None:
    if not args.bound:
        return None
    import torch

    from benchmarks.hardware_bound import measure_hardware

    rates = measure_hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return rates.times(args.tensor_parallel_size)


def _device_label(rates: HardwareRates | None) -> str:
    if rates is not None:
        return rates.device_name
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes <result-dir>/<date>-serving-<device>.{json,md,png}; returns the JSON record."""
    args = build_parser().parse_args(argv)
    rates = _measure(args)
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch:
        model_dir = args.model or write_model_dir(SHAPES[args.model_shape], Path(scratch) / args.model_shape,
                                                  args.tokenizer_dir)
        log_path = Path(scratch) / "server.log"
        try:
            runs = asyncio.run(_serve_and_run(model_dir, args, rates, log_path))
        finally:
            server_log = log_path.read_text()[-20000:] if log_path.exists() else ""
    metadata = report.run_metadata("serving", _device_label(rates))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["request_rate"] = config["request_rate"] if math.isfinite(args.request_rate) else "inf"
    config["structured_output"] = [mode.value for mode in args.structured_output]
    result: dict[str, Any] = {"metadata": metadata, "config": config, "model": model_dir.name,
                              "hardware": dataclasses.asdict(rates) if rates else None, "runs": runs}
    stem = report.result_stem(args.result_dir, metadata)
    rows = summary_rows(runs)
    markdown = report.markdown_report(f"Serving benchmark: {result['model']}", metadata, [
        ("Workload", f"{args.num_prompts} random prompts of {args.random_input_len} tokens in, "
                     f"{args.random_output_len} out (range ratio {args.random_range_ratio}), "
                     f"request rate {config['request_rate']}, ignore_eos {args.ignore_eos}.\n"),
        ("Results", report.markdown_table(_SUMMARY_HEADERS, rows)),
    ])
    paths = report.write_outputs(stem, result, markdown)
    plot = report.plot_serving(runs, stem.with_suffix(".png"))
    if any(run["failed"] for run in runs):
        print(f"some requests failed; server log tail:\n{server_log[-4000:]}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in [*paths, *([plot] if plot else [])]))
    print(report.text_table(_SUMMARY_HEADERS, rows))
    return result


if __name__ == "__main__":
    main()
