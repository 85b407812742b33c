"""Soak load and faults: serve's workers, log and health, the client loops, the worker kills and their recovery."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.soak_checks import RequestRecord, check_record, run_one
from pagedserve.v1 import generation_service_pb2, generation_service_pb2_grpc

FAILURE_PAUSE_S = 0.1  # a client loop waits this long after a failed request, so an outage is not a busy loop
_SERVE_EVENTS = ("worker_failed", "lane_failed", "worker_restart_scheduled", "worker_restarted",
                 "worker_restart_failed", "worker_revival_failed", "worker_lane_abandoned", "all_workers_lost",
                 "server_exiting", "frontend_exited", "internal_error", "add_request_failed")


# ---------------------------------------------------------------------------------------------------------------
# The server process, its worker and its health


def worker_pids(serve_pid: int) -> list[int]:
    """Child processes of serve whose command line has ` worker ` (psutil when installed, else /proc, else ps)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        psutil = None
    if psutil is not None:
        children = psutil.Process(serve_pid).children()
        return [c.pid for c in children if " worker " in f" {' '.join(c.cmdline())} "]
    if Path("/proc").is_dir():
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if ppid == serve_pid and " worker " in f" {cmdline} ":
                pids.append(int(entry.name))
        return sorted(pids)
    listing = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in listing.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 3 and int(r[1]) == serve_pid and " worker " in f" {r[2]} "]


class ServeLog:
    """serve's log (its workers' lines included), read on from where the last read stopped: keeps the JSON events
    named in _SERVE_EVENTS or logged at level error, each with its epoch time as "t"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        data = data[:data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(data)
        for line in data.decode(errors="replace").splitlines():
            if not line.startswith("{") or not ('"level": "error"' in line or any(f'"{n}"' in line
                                                                                   for n in _SERVE_EVENTS)):
                continue
            try:
                event = json.loads(line)
                event["t"] = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
            self.events.append(event)
        return self.events

    def first(self, name: str, since_epoch_s: float) -> dict[str, Any] | None:
        return next((e for e in self.read() if e.get("event") == name and e["t"] >= since_epoch_s), None)


class HealthMonitor:
    """Polls grpc.health.v1 every poll_s and keeps each change of state with its monotonic time. States are
    SERVING, NOT_SERVING, ... or the RPC's error code (the server not answering)."""

    def __init__(self, address: str, poll_s: float) -> None:
        self._address, self._poll_s = address, poll_s
        self.changes: list[tuple[float, str]] = []
        self.num_polls = 0
        self._changed = asyncio.Event()

    @property
    def state(self) -> str:
        return self.changes[-1][1] if self.changes else "UNKNOWN"

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self._address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                started = time.monotonic()
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
                    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as error:
                    state = error.code().name
                self.num_polls += 1
                if state != self.state:
                    self.changes.append((time.monotonic(), state))
                    self._changed.set()
                    self._changed = asyncio.Event()
                await asyncio.sleep(max(0.0, self._poll_s - (time.monotonic() - started)))

    async def wait_for(self, predicate: Any, since_s: float, timeout_s: float) -> float | None:
        """The monotonic time of the first change at or after since_s whose state satisfies predicate, waiting up
        to timeout_s for it; None if none came."""
        deadline = time.monotonic() + timeout_s
        while True:
            for at_s, state in self.changes:
                if at_s >= since_s and predicate(state):
                    return at_s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def _is_serving(state: str) -> bool:
    return state == "SERVING"


# ---------------------------------------------------------------------------------------------------------------
# The run: references, load, kills, settling


def make_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(*args.prompt_len))]
            for _ in range(args.num_distinct_prompts)]


def prompt_kind(kinds: Sequence[str], index: int) -> str:
    """The request kind every request on prompt index has (the kinds take the prompts in turn)."""
    return kinds[index % len(kinds)]


async def compute_references(stub: generation_service_pb2_grpc.GenerationServiceStub, prompts: list[list[int]],
                             kinds: Sequence[str], max_tokens: int, deadline_s: float) -> list[list[int]]:
    """Each prompt's greedy tokens (its kind's sampling, ignore_eos, max_tokens), one request at a time on the quiet
    server; each must itself pass the stream checks. Greedy decoding makes reference[:k] what a request with
    max_tokens k gets."""
    references = []
    for index, prompt in enumerate(prompts):
        record = RequestRecord(index, prompt_kind(kinds, index), max_tokens, None, time.monotonic())
        record = await run_one(stub, prompt, record, 0.0, deadline_s)
        defect = check_record(record, record.tokens)
        if record.outcome != "ok" or len(record.tokens) != max_tokens or defect is not None:
            raise RuntimeError(f"reference of prompt {index} failed on the quiet server: {record.outcome} "
                               f"{record.error} {defect}")
        references.append(record.tokens)
    return references


@dataclass(slots=True)
class KillRecord:
    index: int
    at_s: float  # since the load began
    killed_pid: int | None
    not_serving_after_s: float | None = None
    back_to_serving_s: float | None = None  # kill to the first SERVING after the outage (the time back to SERVING)
    worker_restarted_after_s: float | None = None  # kill to serve's worker_restarted event
    restart_attempt: int | None = None
    restart_delay_s: float | None = None  # serve's backoff before this restart
    new_pids: list[int] = field(default_factory=list)
    recovered: bool = False
    note: str = ""


class Soak:
    """Holds the load (concurrency client loops), the kill schedule and what they recorded."""

    def __init__(self, args: argparse.Namespace, address: str, serve: subprocess.Popen[bytes], log: ServeLog,
                 prompts: list[list[int]], references: list[list[int]]) -> None:
        self.args, self.address, self.serve, self.log = args, address, serve, log
        self.prompts, self.references = prompts, references
        self.rng = random.Random(args.seed + 1)
        self.monitor = HealthMonitor(address, args.health_poll_s)
        self.records: list[RequestRecord] = []
        self.kills: list[KillRecord] = []
        self.start_s = self.end_s = 0.0
        self._monitor_task: asyncio.Task[None] | None = None

    async def run(self, stub: generation_service_pb2_grpc.GenerationServiceStub) -> float:
        """Runs the load and the kills; returns the load's wall time (to the end of its last request)."""
        self._monitor_task = asyncio.create_task(self.monitor.run())
        self.start_s = time.monotonic()
        self.end_s = self.start_s + self.args.duration_s
        killer = asyncio.create_task(self._kill_loop())
        await asyncio.gather(*(self._client_loop(stub) for _ in range(self.args.concurrency)))
        load_s = time.monotonic() - self.start_s
        await killer
        if self.monitor.state != "SERVING":
            await self.monitor.wait_for(_is_serving, time.monotonic(), self.args.recovery_timeout_s)
        return load_s

    async def stop_monitor(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task

    async def _client_loop(self, stub: generation_service_pb2_grpc.GenerationServiceStub) -> None:
        args, rng = self.args, self.rng
        while time.monotonic() < self.end_s:
            index = rng.randrange(len(self.prompts))
            max_tokens = rng.randint(*args.max_tokens)
            abort_after = rng.randrange(max_tokens) if rng.random() < args.abort_fraction else None
            record = RequestRecord(index, prompt_kind(args.kinds, index), max_tokens, abort_after, time.monotonic())
            self.records.append(record)
            await run_one(stub, self.prompts[index], record, rng.uniform(0.0, 0.05), args.request_deadline_s)
            if record.outcome in ("unavailable", "failed"):
                await asyncio.sleep(FAILURE_PAUSE_S)

    async def _kill_loop(self) -> None:
        if self.args.kill_every_s <= 0:
            return
        index = 1
        while (at_s := self.start_s + index * self.args.kill_every_s) < self.end_s:
            await asyncio.sleep(max(0.0, at_s - time.monotonic()))
            self.kills.append(await self._kill(index))
            index += 1

    async def _kill(self, index: int) -> KillRecord:
        """SIGKILLs one worker of serve, then waits for the outage, serve's worker_restarted and SERVING again."""
        pids = worker_pids(self.serve.pid)
        now_s = time.monotonic()
        if not pids:
            return KillRecord(index, now_s - self.start_s, None, note="no worker process of serve found")
        pid = self.rng.choice(pids)
        killed_s, killed_epoch_s = time.monotonic(), time.time()
        os.kill(pid, signal.SIGKILL)
        kill = KillRecord(index, killed_s - self.start_s, pid)
        print(f"[soak] kill {index}: SIGKILL worker pid {pid} at {kill.at_s:.1f} s", flush=True)
        timeout_s = self.args.recovery_timeout_s
        down_s = await self.monitor.wait_for(lambda state: state != "SERVING", killed_s, min(timeout_s, 5.0))
        if down_s is not None:
            kill.not_serving_after_s = down_s - killed_s
            up_s = await self.monitor.wait_for(_is_serving, down_s, timeout_s - (time.monotonic() - killed_s))
            kill.back_to_serving_s = None if up_s is None else up_s - killed_s
        deadline_s = killed_s + timeout_s
        while (restarted := self.log.first("worker_restarted", killed_epoch_s)) is None:
            if time.monotonic() > deadline_s or self.serve.poll() is not None:
                break
            await asyncio.sleep(0.2)
        if restarted is not None:
            kill.worker_restarted_after_s = restarted["t"] - killed_epoch_s
            scheduled = self.log.first("worker_restart_scheduled", killed_epoch_s)
            if scheduled is not None:
                kill.restart_attempt, kill.restart_delay_s = scheduled.get("attempt"), scheduled.get("delay_s")
        kill.new_pids = worker_pids(self.serve.pid) if self.serve.poll() is None else []
        kill.recovered = (restarted is not None and self.monitor.state == "SERVING" and pid not in kill.new_pids
                          and (down_s is None or kill.back_to_serving_s is not None))
        if not kill.recovered:
            kill.note = (f"not recovered within {timeout_s} s: health {self.monitor.state}, worker_restarted "
                         f"{'seen' if restarted else 'not seen'}, serve exit code {self.serve.poll()}")
        print(f"[soak] kill {index}: {'recovered' if kill.recovered else 'NOT RECOVERED'}, back to SERVING after "
              f"{kill.back_to_serving_s} s, new worker pids {kill.new_pids}", flush=True)
        return kill


async def settle(stub: generation_service_pb2_grpc.GenerationServiceStub, timeout_s: float) -> dict[str, Any]:
    """Polls GetServerStatus until 0 used blocks, 0 running, 0 waiting, 0 swapped, or timeout_s; returns the first
    and the last status read and how long it took."""
    started = time.monotonic()
    first: dict[str, Any] | None = None
    while True:
        try:
            status = await stub.GetServerStatus(generation_service_pb2.GetServerStatusRequest(), timeout=5.0)
            last: dict[str, Any] = {name: getattr(status, name) for name in (
                "num_used_blocks", "num_total_blocks", "num_requests_running", "num_requests_waiting",
                "num_requests_swapped", "num_preemptions", "generation_tokens", "num_steps")}
        except grpc.aio.AioRpcError as error:
            last = {"error": f"{error.code().name}: {error.details()}"}
        first = first or last
        is_idle = all(last.get(name) == 0 for name in (
            "num_used_blocks", "num_requests_running", "num_requests_waiting", "num_requests_swapped"))
        if is_idle or time.monotonic() - started > timeout_s:
            return {"first": first, "last": last, "is_idle": is_idle, "after_s": time.monotonic() - started}
        await asyncio.sleep(0.1)
