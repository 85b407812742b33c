"""`vllm bench serve` for pagedserve: random prompts streamed to a server over gRPC, and through the Shepherd Model
Gateway's OpenAI endpoint in front of it; TTFT/TPOT/ITL and throughput of each."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import transformers

from benchmarks import report
from benchmarks.child_process import stop, tethered_command
from benchmarks.client_runs import run_here, run_in_processes, run_requests
from benchmarks.gateway_process import running_gateway
from benchmarks.hardware_bound import (
    HardwareRates,
    Workload,
    bound_summary,
    percent_of_bound,
    server_element_bytes,
)
from benchmarks.host_cpu import host_cpu, read_cpu_times
from benchmarks.model_shapes import SHAPES, add_model_arguments, read_shape, sampling_vocab_size, write_model_dir
from benchmarks.random_dataset import BenchRequest, sample_random_requests
from benchmarks.serving_metrics import compute_metrics
from benchmarks.serving_paths import Endpoints, ServingPath, parse_paths, path_sender
from benchmarks.step_profile import step_profile
from benchmarks.structured_workload import ConstraintMode, constraints_for, parse_modes
from benchmarks.text_prompts import with_text_prompts
from pagedserve.clients.health_check import is_serving
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import generation_service_pb2, generation_service_pb2_grpc

_SUMMARY_HEADERS = ("path", "constraint", "concurrency", "req/s", "out tok/s", "total tok/s", "TTFT p50 ms",
                    "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "client CPU", "% of bound")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__)
    add_model_arguments(p, "model directory (config.json + tokenizer)")
    p.add_argument("--server", metavar="HOST:PORT", help="use a running server instead of starting one")
    p.add_argument("--paths", type=parse_paths, default=parse_paths("direct"),
                   help="comma-separated, each run at every level in turn: direct (our Generate over gRPC, prompt "
                        "ids), gateway (`smg launch --backend vllm` started in front of the same server, streamed "
                        "/v1/completions over HTTP; prompts are then text that tokenizes to the ids every path sends)")
    p.add_argument("--gateway-args", default="", help="more `smg launch` flags, one shell-quoted string")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="of the server's workers")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"], help="of the server's workers")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="the server's workers quantize the LM head too (with --quantization fp8)")
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
                        "one-schema (the same schema on every request), unique-schema (each request's schema "
                        "unique: every one compiled cold)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests before the first run")
    p.add_argument("--client-processes", type=report.positive_int, default=1,
                   help="client processes sharing each run's requests, concurrency and rate (one grpc.aio process "
                        "takes in about 32,000-36,500 streamed chunks a second: benchmarks.stream_capacity)")
    p.add_argument("--connections", type=report.positive_int, default=1,
                   help="direct path: channels each client process opens, each its own connection, requests taking "
                        "them in turn (a server's --frontend-processes share out connections, not streams)")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True,
                   help="measure this device and report throughput as a share of the roofline bound")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's, for the bound")
    p.add_argument("--save-detailed", action="store_true",
                   help="also record each request's output length and generated text")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the started server shards the model over (its --tensor-parallel-size); the bound is "
                        "that of as many devices as measured")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if ServingPath.GATEWAY in args.paths and args.structured_output != [ConstraintMode.NONE]:
        parser.error("the gateway path runs with --structured-output none only")
    return args


def wait_serving(address: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_serving(address, 1.0):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not serving after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)


@contextmanager
def server_process(
    model_dir: Path, args: argparse.Namespace, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`pagedserve serve` in a child process on a free loopback port: SIGTERM on exit, and tethered, so that it ends
    soon after this process however this one ends."""
    port = free_loopback_port()
    command = tethered_command("pagedserve.runtime.cli", [
        "serve", "--model", str(model_dir), "--load-format", args.load_format, "--dtype", args.dtype,
        "--kv-cache-dtype", args.kv_cache_dtype, "--quantization", args.quantization, "--host", "127.0.0.1",
        "--port", str(port), "--tensor-parallel-size", str(args.tensor_parallel_size),
        *(["--quantize-lm-head"] if args.quantize_lm_head else []), *shlex.split(args.serve_args),
    ])
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        stop(process, grace_s=30)


def text_tokenizer(model_dir: Path, args: argparse.Namespace) -> transformers.PreTrainedTokenizerBase | None:
    """The model's tokenizer where a path takes text prompts (the gateway), else None (prompts stay random ids)."""
    if ServingPath.GATEWAY not in args.paths:
        return None
    tokenizer: transformers.PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer


def sample_workload(num_prompts: int, input_len: int, output_len: int, args: argparse.Namespace, vocab_size: int,
                    seed: int, tokenizer: transformers.PreTrainedTokenizerBase | None) -> list[BenchRequest]:
    """The random requests of one run, made text that tokenizes back to their ids when tokenizer is given."""
    requests = sample_random_requests(num_prompts, input_len, output_len, args.random_range_ratio, vocab_size, seed)
    return requests if tokenizer is None else with_text_prompts(requests, tokenizer, vocab_size, seed)


def concurrency_levels(args: argparse.Namespace) -> list[int | None]:
    if args.sweep_concurrency:
        return [int(level) for level in args.sweep_concurrency.split(",")]
    return [args.max_concurrency]


async def run_levels(endpoints: Endpoints, model_dir: Path, args: argparse.Namespace,
                     rates: HardwareRates | None) -> list[dict[str, Any]]:
    """Warms up each path, then one run per constraint, concurrency level and path in turn, each on its own prompts
    (so no run hits another's prefix cache)."""
    vocab_size = sampling_vocab_size(model_dir)
    tokenizer = text_tokenizer(model_dir, args)
    for path in args.paths if args.num_warmups else []:
        warmups = sample_workload(args.num_warmups, args.random_input_len, 4, args, vocab_size, args.seed - 1,
                                  tokenizer)
        async with path_sender(path, endpoints, True, args.num_warmups) as send:
            await run_requests(send, warmups, math.inf, None, args.seed)
    runs = []
    plan = [(mode, level, path) for mode in args.structured_output for level in concurrency_levels(args)
            for path in args.paths]
    for index, (mode, level, path) in enumerate(plan):
        num_prompts = args.num_prompts
        if level is not None and args.prompts_per_concurrency:
            num_prompts = min(num_prompts, args.prompts_per_concurrency * level)
        seed = args.seed + index
        requests = sample_workload(num_prompts, args.random_input_len, args.random_output_len, args, vocab_size,
                                   seed, tokenizer)
        run = {"path": path.value, "structured_output": mode.value, "max_concurrency": level or num_prompts,
               "num_prompts": num_prompts, "seed": seed,
               "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf"}
        before = await _server_status(endpoints.server_address)
        run["kv_cache_blocks"] = before.num_total_blocks
        constraints = constraints_for(mode, num_prompts, seed)
        cpu_before = read_cpu_times()
        if args.client_processes > 1:
            client = await asyncio.to_thread(run_in_processes, path, endpoints, args.ignore_eos, requests,
                                             args.request_rate, level, seed, constraints, args.client_processes,
                                             args.connections)
        else:
            client = await run_here(path, endpoints, args.ignore_eos, requests, args.request_rate, level, seed,
                                    constraints, args.connections)
        records, duration_s = client.records, client.duration_s
        run.update(compute_metrics(records, duration_s))
        # The clients' CPU seconds per second of the run: near 1.0 a process, a client may be what limits it.
        run["client_cpu"] = client.cpu_s / duration_s
        run["client_processes"] = client.processes
        cpu_after = read_cpu_times()
        run["step_profile"] = step_profile(before, await _server_status(endpoints.server_address))
        if cpu_before is not None and cpu_after is not None:
            run["host_cpu"] = host_cpu(cpu_before, cpu_after)
        if args.save_detailed:
            run["output_lens"] = [r.output_len if r.is_success else None for r in records]
            run["generated_texts"] = [r.output_text if r.is_success else None for r in records]
        if rates is not None:
            workload = Workload(num_prompts, args.random_input_len, args.random_output_len, run["max_concurrency"],
                                args.max_num_batched_tokens)
            run.update(bound_summary(read_shape(model_dir), server_element_bytes(vars(args)), rates, workload))
            run["percent_of_bound"] = percent_of_bound(duration_s, run["bound_s"])
        runs.append(run)
        print(f"{path.value} {mode.value} max_concurrency={run['max_concurrency']}: {run['completed']} done, "
              f"{run['failed']} failed, {run['output_throughput']:.1f} output tokens/s; {_step_line(run)}", flush=True)
    return runs


def _step_line(run: dict[str, Any]) -> str:
    """Where the run's steps went and how busy the host was, for the log: a slow run beside a fast one of the same
    code says here whether the worker's host time, the device's idle or the host itself differed."""
    profile = run["step_profile"]
    line = (f"worker {profile['worker_ms_per_step']:.2f} ms/step, forward {profile['forward_ms_per_step']:.2f}, "
            f"device idle {profile['idle_ms_per_step']:.2f}")
    if "host_cpu" in run:
        line += f"; host {run['host_cpu']['busy_cores']:.1f} cores busy, steal {run['host_cpu']['steal_percent']:.1f} %"
    return line


async def _server_status(address: str) -> generation_service_pb2.GetServerStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        response: generation_service_pb2.GetServerStatusResponse = await stub.GetServerStatus(
            generation_service_pb2.GetServerStatusRequest())
        return response


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[r["path"], r["structured_output"], r["max_concurrency"], r["request_throughput"], r["output_throughput"],
             r["total_token_throughput"],
             r["median_ttft_ms"], r["p99_ttft_ms"], r["median_tpot_ms"], r["median_itl_ms"], r["p99_itl_ms"],
             r["client_cpu"], r.get("percent_of_bound", "-")] for r in runs]


def _serve_and_run(model_dir: Path, args: argparse.Namespace, rates: HardwareRates | None,
                   scratch: Path) -> list[dict[str, Any]]:
    """Starts the server (unless --server names one) and the gateway where a path needs it, then runs every level;
    the logs go to scratch/server.log and scratch/gateway.log."""
    with ExitStack() as stack:
        address = args.server
        if not address:
            address, process = stack.enter_context(server_process(model_dir, args, scratch / "server.log"))
            wait_serving(address, process, scratch / "server.log", args.server_timeout)
        gateway_url = None
        if ServingPath.GATEWAY in args.paths:
            gateway_url = stack.enter_context(running_gateway(
                [f"grpc://{address}"], scratch / "gateway.log", shlex.split(args.gateway_args), args.server_timeout))
        return asyncio.run(run_levels(Endpoints(address, gateway_url), model_dir, args, rates))


def _measure(args: argparse.Namespace) -> HardwareRates | None:
    if not args.bound:
        return None
    import torch

    from benchmarks.hardware_bound import measure_hardware

    rates = measure_hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return rates.times(args.tensor_parallel_size)


def _device_label(rates: HardwareRates | None) -> str:
    return rates.device_name if rates is not None else report.local_device()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes <result-dir>/<date>-serving-<device>.{json,md,png}; returns the JSON record."""
    args = parse_args(argv)
    rates = _measure(args)
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch:
        model_dir = args.model or write_model_dir(SHAPES[args.model_shape], Path(scratch) / args.model_shape,
                                                  args.tokenizer_dir)
        try:
            runs = _serve_and_run(model_dir, args, rates, Path(scratch))
        finally:
            log_tails = {path.name: path.read_text()[-4000:] for path in sorted(Path(scratch).glob("*.log"))}
    metadata = report.run_metadata("serving", _device_label(rates))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["request_rate"] = config["request_rate"] if math.isfinite(args.request_rate) else "inf"
    config["structured_output"] = [mode.value for mode in args.structured_output]
    config["paths"] = [path.value for path in args.paths]
    result: dict[str, Any] = {"metadata": metadata, "config": config, "model": model_dir.name,
                              "hardware": dataclasses.asdict(rates) if rates else None, "runs": runs}
    stem = report.result_stem(args.result_dir, metadata)
    rows = summary_rows(runs)
    markdown = report.markdown_report(f"Serving benchmark: {result['model']}", metadata, [
        ("Workload", f"{args.num_prompts} random prompts of {args.random_input_len} tokens in, "
                     f"{args.random_output_len} out (range ratio {args.random_range_ratio}), "
                     f"request rate {config['request_rate']}, ignore_eos {args.ignore_eos}; paths "
                     f"{', '.join(config['paths'])} (direct: our Generate over gRPC; gateway: the Shepherd Model "
                     f"Gateway's /v1/completions in front of the same server).\n"),
        ("Results", report.markdown_table(_SUMMARY_HEADERS, rows)),
    ])
    paths = report.write_outputs(stem, result, markdown)
    plot = report.plot_serving(runs, stem.with_suffix(".png"))
    if any(run["failed"] for run in runs):
        for name, tail in log_tails.items():
            print(f"some requests failed; {name} tail:\n{tail}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in [*paths, *([plot] if plot else [])]))
    print(report.text_table(_SUMMARY_HEADERS, rows))
    return result


if __name__ == "__main__":
    main()
