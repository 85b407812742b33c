"""Soak test: `pagedserve serve` kept saturated for a bounded time while we abort requests and SIGKILL its worker;
reports hangs, lost or duplicated tokens, leaked blocks, and the time back to SERVING after each kill."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from benchmarks.child_process import tethered_command
from benchmarks.model_shapes import sampling_vocab_size
from benchmarks.soak_checks import REQUEST_KINDS
from benchmarks.soak_faults import HealthMonitor, ServeLog, Soak, compute_references, make_prompts, settle
from benchmarks.soak_report import markdown, summarize
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import generation_service_pb2, generation_service_pb2_grpc

DEFAULT_MODEL_DIR = report.REPO_ROOT.parent / "shared" / "models" / "stories260K"
RESTART_WINDOW_S = 600.0  # serve's window for --max-worker-restarts (WorkerSupervisorConfig)


def _int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds


def _kinds(text: str) -> list[str]:
    kinds = text.split(",")
    if unknown := [kind for kind in kinds if kind not in REQUEST_KINDS]:
        raise argparse.ArgumentTypeError(f"unknown request kinds {unknown}; known: {', '.join(REQUEST_KINDS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (default: stories260K)")
    p.add_argument("--device", default="cpu", help="serve's --device (default cpu)")
    p.add_argument("--serve-args", default="", help="more `pagedserve serve` flags, one shell-quoted string")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server to start")
    p.add_argument("--duration-s", type=float, default=600.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32, help="requests kept in flight")
    p.add_argument("--abort-fraction", type=float, default=0.3, help="share of requests we cancel mid-stream")
    p.add_argument("--kill-every-s", type=float, default=120.0, help="SIGKILL the worker this often (0: never)")
    p.add_argument("--num-distinct-prompts", type=int, default=64, help="prompts drawn from, each with a reference")
    p.add_argument("--prompt-len", type=_int_range, default=(1, 256), metavar="MIN,MAX", help="prompt tokens")
    p.add_argument("--max-tokens", type=_int_range, default=(1, 128), metavar="MIN,MAX", help="max_tokens")
    p.add_argument("--kinds", type=_kinds, default=list(REQUEST_KINDS), metavar="KIND,...",
                   help="request kinds, taking the prompts in turn: plain (greedy), json (greedy under a JSON schema), "
                        "penalty (greedy with repetition, presence and frequency penalties)")
    p.add_argument("--request-deadline-s", type=float, default=60.0,
                   help="a request neither finished nor failed by then is a hang")
    p.add_argument("--recovery-timeout-s", type=float, default=120.0, help="a kill not recovered by then failed")
    p.add_argument("--settle-timeout-s", type=float, default=10.0,
                   help="after the load, seconds for the status to reach 0 used blocks, 0 running, 0 waiting")
    p.add_argument("--health-poll-s", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-file", type=Path, help="serve's log (default: serve.log in a new temporary directory)")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return p


# ---------------------------------------------------------------------------------------------------------------
# The command


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    """serve on loopback with local workers (so that serve restarts them), JSON logs; the restart limit raised when
    the kills would exceed serve's default of 5 tries in 10 minutes."""
    extra = shlex.split(args.serve_args)
    command = ["pagedserve", "serve", "--model", str(args.model), "--device", args.device, "--host", "127.0.0.1",
               "--port", str(port), "--log-format", "json"]
    if args.kill_every_s > 0 and "--max-worker-restarts" not in extra:
        num_kills = max(0, int((args.duration_s - 1e-9) // args.kill_every_s))
        in_window = min(num_kills, -(-int(RESTART_WINDOW_S) // max(1, int(args.kill_every_s))))
        if in_window > 5:
            command += ["--max-worker-restarts", str(in_window + 1)]
    return [*command, *extra]


def device_label(command: Sequence[str]) -> str:
    devices = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--device"]
    if devices and devices[-1] == "cpu":
        return "cpu"
    return report.local_device()


async def _wait_serving(address: str, serve: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    monitor = HealthMonitor(address, 0.2)
    task = asyncio.create_task(monitor.run())
    try:
        deadline = time.monotonic() + timeout_s
        while monitor.state != "SERVING":
            if serve.poll() is not None:
                raise RuntimeError(f"serve exited with {serve.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not serving after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
            await asyncio.sleep(0.2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def soak_server(args: argparse.Namespace, address: str, serve: subprocess.Popen[bytes],
                      log: ServeLog) -> dict[str, Any]:
    """References on the quiet server, then the soak, then the settling; returns the summary."""
    await _wait_serving(address, serve, log.path, args.server_timeout)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        info = await stub.GetModelInfo(generation_service_pb2.GetModelInfoRequest())
        if args.prompt_len[1] + args.max_tokens[1] > info.max_model_len:
            raise ValueError(f"--prompt-len and --max-tokens maxima exceed max_model_len {info.max_model_len}")
        prompts = make_prompts(args, min(info.vocab_size, sampling_vocab_size(args.model)))
        started = time.monotonic()
        references = await compute_references(stub, prompts, args.kinds, args.max_tokens[1],
                                              args.request_deadline_s * 4)
        print(f"[soak] {len(prompts)} references in {time.monotonic() - started:.1f} s; "
              f"load for {args.duration_s:.0f} s", flush=True)
        soak = Soak(args, address, serve, log, prompts, references)
        try:
            load_s = await soak.run(stub)
            status = await settle(stub, args.settle_timeout_s)
        finally:
            await soak.stop_monitor()
    summary = summarize(soak, load_s, status)
    summary["references_s"] = soak.start_s - started
    summary["serve_events"] = dict(Counter(e.get("event", "?") for e in log.read()))
    summary["serve_errors"] = [{k: v for k, v in e.items() if k != "t"} for e in log.events
                               if e.get("event") not in ("worker_failed",) and e.get("level") == "error"][:20]
    return summary


def stop_serve(serve: subprocess.Popen[bytes], pids: Sequence[int]) -> tuple[int | None, list[int]]:
    """SIGTERM to serve (it drains, stops its workers and exits 0); returns its exit code and the worker pids
    that still run 5 s later (then SIGKILLed, never left behind)."""
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    deadline = time.monotonic() + 5.0
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_running(pid)]
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return serve.returncode, alive


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the soak, writes <result-dir>/<date>-soak-<device>.{json,md}; returns the JSON record."""
    args = build_parser().parse_args(argv)
    log_path = args.log_file or Path(tempfile.mkdtemp(prefix="pagedserve-soak-")) / "serve.log"
    port = free_loopback_port()
    command = serve_command(args, port)
    # Taken before serve starts, since serve (and each worker it restarts) runs the checkout as it is then.
    metadata, modified_files = report.run_metadata("soak", device_label(command)), _modified_files()
    print(f"[soak] {shlex.join(command)}\n[soak] serve log: {log_path}", flush=True)
    with log_path.open("wb") as log_file:
        serve = subprocess.Popen(tethered_command("pagedserve.runtime.cli", command[1:]),
                                 stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = ServeLog(log_path)
    seen_pids: set[int] = set()
    try:
        summary = asyncio.run(soak_server(args, f"127.0.0.1:{port}", serve, log))
    finally:
        seen_pids.update(int(e["pid"]) for e in serve_events_named(log_path, "worker_started"))
        exit_code, orphans = stop_serve(serve, sorted(seen_pids))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(serve_command=shlex.join(command), log_file=str(log_path),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"), modified_files_at_start=modified_files,
                  commit_at_end=report.git_commit())
    result = {"metadata": metadata, "config": config, "model": args.model.name, "serve_exit_code": exit_code,
              "orphans": orphans, "summary": summary}
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result, markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    checks = summary["checks"]
    print(report.text_table(("check", "measured", "target", "passed"),
                            [[n, c["measured"], c["target"], c["passed"]] for n, c in checks.items()]))
    return result


def _modified_files() -> list[str] | None:
    """Tracked files that differ from HEAD (read only: no index refresh), None outside a checkout."""
    try:
        completed = subprocess.run(["git", "--no-optional-locks", "diff", "--name-only", "HEAD"], cwd=report.REPO_ROOT,
                                   capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.split()


def serve_events_named(log_path: Path, name: str) -> list[dict[str, Any]]:
    """Every event of serve's log called name (read whole: used once, at the end)."""
    needle = f'"event": "{name}"'
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if needle in line and line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


if __name__ == "__main__":
    sys.exit(0 if main()["summary"]["passed"] else 1)
