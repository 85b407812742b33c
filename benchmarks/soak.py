"""Soak test: `pagedserve serve` kept saturated for a bounded time while we abort requests and SIGKILL its worker;
reports hangs, lost or duplicated tokens, leaked blocks, and the time back to SERVING after each kill."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import report
from benchmarks.model_shapes import sampling_vocab_size
from pagedserve.control_plane.launch.worker_launcher import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc

DEFAULT_MODEL_DIR = report.REPO_ROOT.parent / "shared" / "models" / "stories260K"
RESTART_WINDOW_S = 600.0  # serve's window for --max-worker-restarts (WorkerSupervisorConfig)
FAILURE_PAUSE_S = 0.1  # a client loop waits this long after a failed request, so an outage is not a busy loop
_FINISH_OK = (generation_service_pb2.FINISH_REASON_LENGTH, generation_service_pb2.FINISH_REASON_STOP)
_SERVE_EVENTS = ("worker_failed", "lane_failed", "worker_restart_scheduled", "worker_restarted",
                 "worker_restart_failed", "worker_revival_failed", "worker_lane_abandoned", "all_workers_lost",
                 "server_exiting", "frontend_exited", "internal_error", "add_request_failed")


def _int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds


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
# One request and its checks


@dataclass(slots=True)
class RequestRecord:
    """One Generate call: what was asked, every chunk's tokens and sequence number, how it ended."""

    prompt_index: int
    max_tokens: int
    abort_after_tokens: int | None  # cancel once this many tokens arrived (0: after abort_delay_s); None: never
    start_s: float
    tokens: list[int] = field(default_factory=list)
    sequence_numbers: list[int] = field(default_factory=list)
    finish_reasons: list[int] = field(default_factory=list)  # per chunk, 0 until the last
    usage_tokens: int | None = None
    outcome: str = "pending"  # ok | aborted | unavailable | failed | hang
    error: str = ""
    end_s: float = 0.0
    last_chunk_s: float = 0.0


def first_difference(received: Sequence[int], expected: Sequence[int]) -> int | None:
    for index, (a, b) in enumerate(zip(received, expected, strict=False)):
        if a != b:
            return index
    return None if len(received) == len(expected) else min(len(received), len(expected))


def classify_tokens(received: Sequence[int], expected: Sequence[int], complete: bool) -> str | None:
    """None when received is right: equal to expected when complete, else a prefix of it. Otherwise how it is
    wrong: "lost" (tokens of expected skipped), "duplicated" (tokens repeated), "short", "extra" or "diverged"."""
    index = first_difference(received, expected)
    if index is None or (index == len(received) and not complete):
        return None
    if index == len(received):
        return "short"
    if index == len(expected):
        return "extra"
    tail = received[index:]
    for shift in range(1, 9):
        skipped = expected[index + shift:index + shift + len(tail)]
        if skipped and tail[:len(skipped)] == skipped:
            return "lost"
        repeated = expected[index - shift:index - shift + len(tail)] if index >= shift else []
        if repeated and tail[:len(repeated)] == repeated:
            return "duplicated"
    return "diverged"


def check_record(record: RequestRecord, reference: Sequence[int]) -> dict[str, Any] | None:
    """The defects of one request's stream against its prompt's reference, None when it has none: sequence numbers
    0, 1, 2, ... without gap or repeat; a normally finished request has exactly reference[:max_tokens], one final
    chunk (the last) and usage counting its tokens; any other has a prefix of the reference."""
    problems = []
    if record.sequence_numbers != list(range(len(record.sequence_numbers))):
        numbers = record.sequence_numbers
        kind = "repeat" if len(set(numbers)) < len(numbers) else "gap"
        problems.append(f"sequence_number {kind}: {numbers[:64]}")
    complete = record.outcome == "ok"
    expected = reference[:record.max_tokens]
    token_problem = classify_tokens(record.tokens, expected, complete)
    if token_problem is not None:
        problems.append(f"tokens {token_problem} at {first_difference(record.tokens, expected)}")
    if complete:
        finals = [i for i, reason in enumerate(record.finish_reasons) if reason]
        if finals != [len(record.finish_reasons) - 1]:
            problems.append(f"final chunks at {finals} of {len(record.finish_reasons)}")
        if record.usage_tokens != len(record.tokens):
            problems.append(f"usage.completion_tokens {record.usage_tokens} != {len(record.tokens)} received")
    if not problems:
        return None
    return {"outcome": record.outcome, "prompt_index": record.prompt_index, "max_tokens": record.max_tokens,
            "problems": problems, "token_problem": token_problem, "received": record.tokens[:160],
            "expected": list(expected[:160]), "sequence_numbers": record.sequence_numbers[:160]}


async def generate(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: Sequence[int],
                   record: RequestRecord, abort_delay_s: float) -> None:
    """Streams one greedy request into record; cancels it as record.abort_after_tokens says."""
    params = common_pb2.SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True)
    message = generation_service_pb2.GenerateRequest(sampling_params=params)
    message.token_ids.ids.extend(prompt)
    call = stub.Generate(message)

    def abort() -> bool:
        if call.cancel():  # False once the call has ended: then it is read to its end like any other
            record.outcome = "aborted"
        return record.outcome == "aborted"

    timer = asyncio.get_running_loop().call_later(abort_delay_s, abort) if record.abort_after_tokens == 0 else None
    try:
        async for chunk in call:
            record.last_chunk_s = time.monotonic()
            record.tokens.extend(chunk.token_ids)
            record.sequence_numbers.append(chunk.sequence_number)
            record.finish_reasons.append(chunk.finish_reason)
            if chunk.HasField("usage"):
                record.usage_tokens = chunk.usage.completion_tokens
            if (record.abort_after_tokens and not chunk.finish_reason
                    and len(record.tokens) >= record.abort_after_tokens and abort()):
                break
        if record.outcome == "pending":
            last = record.finish_reasons[-1] if record.finish_reasons else 0
            record.outcome = "ok" if last in _FINISH_OK else "failed"
            if record.outcome == "failed":
                record.error = f"stream ended OK with finish_reason {last}"
    except asyncio.CancelledError:
        if record.outcome != "aborted":
            raise  # the deadline's cancellation, not ours
    except grpc.aio.AioRpcError as error:
        if record.outcome != "aborted":  # our own cancel may also end the call with CANCELLED
            record.error = f"{error.code().name}: {error.details()}"
            record.outcome = "unavailable" if error.code() == grpc.StatusCode.UNAVAILABLE else "failed"
    finally:
        if timer is not None:
            timer.cancel()


async def run_one(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: Sequence[int],
                  record: RequestRecord, abort_delay_s: float, deadline_s: float) -> RequestRecord:
    try:
        await asyncio.wait_for(generate(stub, prompt, record, abort_delay_s), deadline_s)
    except asyncio.TimeoutError:
        record.outcome = "hang"
        record.error = (f"no end within {deadline_s} s: {len(record.tokens)} tokens, last chunk "
                        f"{time.monotonic() - (record.last_chunk_s or record.start_s):.1f} s before the deadline")
    record.end_s = time.monotonic()
    return record


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


async def compute_references(stub: generation_service_pb2_grpc.GenerationServiceStub, prompts: list[list[int]],
                             max_tokens: int, deadline_s: float) -> list[list[int]]:
    """Each prompt's greedy tokens (ignore_eos, max_tokens), one request at a time on the quiet server; each must
    itself pass the stream checks. Greedy decoding makes reference[:k] what a request with max_tokens k gets."""
    references = []
    for index, prompt in enumerate(prompts):
        record = await run_one(stub, prompt, RequestRecord(index, max_tokens, None, time.monotonic()), 0.0,
                               deadline_s)
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
            record = RequestRecord(index, max_tokens, abort_after, time.monotonic())
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


# ---------------------------------------------------------------------------------------------------------------
# Summary and report


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"min": min(values) if values else None, "median": statistics.median(values) if values else None,
            "max": max(values) if values else None}


def summarize(soak: Soak, load_s: float, status: dict[str, Any]) -> dict[str, Any]:
    records = soak.records
    outcomes = Counter(r.outcome for r in records)
    defects = [d for r in records if (d := check_record(r, soak.references[r.prompt_index]))]
    hangs = [{"prompt_index": r.prompt_index, "max_tokens": r.max_tokens, "abort_after_tokens": r.abort_after_tokens,
              "started_at_s": r.start_s - soak.start_s, "error": r.error} for r in records if r.outcome == "hang"]
    tokens_ok = sum(len(r.tokens) for r in records if r.outcome == "ok")
    tokens_all = sum(len(r.tokens) for r in records)
    back = [k.back_to_serving_s for k in soak.kills if k.back_to_serving_s is not None]
    last = status["last"]
    leaked = {name: last.get(name) for name in ("num_used_blocks", "num_requests_running", "num_requests_waiting",
                                                  "num_requests_swapped")}
    kill_times = [k.at_s for k in soak.kills]
    outages = [(at - soak.start_s, state) for at, state in soak.monitor.changes if state != "SERVING"
               and at >= soak.start_s and not any(0 <= at - soak.start_s - t <= soak.args.recovery_timeout_s
                                                   for t in kill_times)]
    checks = {
        "hangs": (len(hangs), 0),
        "lost_or_duplicated": (len(defects), 0),
        "leaked_used_blocks": (leaked["num_used_blocks"], 0),
        "leaked_running": (leaked["num_requests_running"], 0),
        "leaked_waiting": (leaked["num_requests_waiting"], 0),
        "failed_otherwise": (outcomes["failed"], 0),
        "kills_not_recovered": (sum(not k.recovered for k in soak.kills), 0),
    }
    return {
        "load_s": load_s,
        "requests": {"total": len(records), "ok": outcomes["ok"], "aborted": outcomes["aborted"],
                     "unavailable": outcomes["unavailable"], "failed_otherwise": outcomes["failed"],
                     "hangs": outcomes["hang"]},
        "tokens": {"ok": tokens_ok, "all": tokens_all, "ok_per_s": tokens_ok / load_s,
                   "all_per_s": tokens_all / load_s},
        "defects": {"count": len(defects), "examples": defects[:20],
                    "by_kind": dict(Counter(f"{d['outcome']}:{d['token_problem'] or 'stream'}" for d in defects))},
        "hangs": hangs[:50],
        "errors": {outcome: dict(Counter(r.error for r in records if r.outcome == outcome).most_common(20))
                   for outcome in ("unavailable", "failed")},
        "status_after_load": status,
        "leaked": leaked,
        "kills": [dataclasses.asdict(k) for k in soak.kills],
        "back_to_serving_s": _spread(back),
        "health": {"num_polls": soak.monitor.num_polls, "outages_without_a_kill": outages[:20],
                   "changes": [(round(at - soak.start_s, 3), state) for at, state in soak.monitor.changes][:400]},
        "checks": {name: {"measured": measured, "target": target, "passed": measured == target}
                   for name, (measured, target) in checks.items()},
        "passed": all(measured == target for measured, target in checks.values()),
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summary, config = result["summary"], result["config"]
    checks = [[name, check["measured"], check["target"], "yes" if check["passed"] else "**NO**"]
              for name, check in summary["checks"].items()]
    back = summary["back_to_serving_s"]
    req, tok = summary["requests"], summary["tokens"]
    counts = [[req["total"], req["ok"], req["aborted"], req["unavailable"], req["failed_otherwise"], req["hangs"],
               f"{tok['all_per_s']:.1f}", f"{tok['ok_per_s']:.1f}"]]
    kills = [[k["index"], _num(k["at_s"], 1), k["killed_pid"], _num(k["not_serving_after_s"]),
              _num(k["back_to_serving_s"]), _num(k["worker_restarted_after_s"]), k["restart_delay_s"],
              k["new_pids"], "yes" if k["recovered"] else f"**NO** {k['note']}"] for k in summary["kills"]]
    workload = (f"`pagedserve serve` on {result['model']} (`{config['serve_command']}`), "
                f"{config['duration_s']:.0f} s of load at concurrency {config['concurrency']}: greedy streaming "
                f"Generate (ignore_eos) of {config['num_distinct_prompts']} distinct random prompts of "
                f"{config['prompt_len'][0]}-{config['prompt_len'][1]} tokens, max_tokens "
                f"{config['max_tokens'][0]}-{config['max_tokens'][1]}, {config['abort_fraction']:.0%} cancelled at a "
                f"random point; the worker SIGKILLed every {config['kill_every_s']:.0f} s. Each finished request is "
                f"checked against its prompt's reference, computed one request at a time on the quiet server "
                f"first. Request deadline {config['request_deadline_s']:.0f} s. Serve exit code on SIGTERM after "
                f"the run: {result['serve_exit_code']}; worker processes left behind: {result['orphans']}. "
                f"Checkout when serve started: the commit above plus {len(config['modified_files_at_start'] or [])} "
                f"modified tracked files (listed in the JSON); HEAD at the end: {config['commit_at_end'][:12]}.\n")
    sections = [
        ("Workload", workload),
        ("Targets", report.markdown_table(("check", "measured", "target", "passed"), checks)),
        ("Requests", report.markdown_table(("requests", "ok", "aborted by us", "UNAVAILABLE", "failed otherwise",
                                            "hangs", "tokens/s (all)", "tokens/s (ok)"), counts)),
        ("Kills", report.markdown_table(("kill", "at s", "pid", "NOT_SERVING after s", "SERVING after s",
                                         "worker_restarted after s", "serve backoff s", "new pid", "recovered"),
                                        kills)
         + f"\nTime back to SERVING: min {_num(back['min'])} s, median {_num(back['median'])} s, "
           f"max {_num(back['max'])} s.\n"),
    ]
    if summary["defects"]["count"] or summary["hangs"] or summary["errors"]["failed"]:
        details = json.dumps({"defects": summary["defects"]["examples"][:5], "hangs": summary["hangs"][:10],
                              "failed_otherwise": summary["errors"]["failed"]}, indent=1)
        sections.append(("Failures", f"```json\n{details}\n```\n"))
    title = f"Soak test: {result['model']} ({'passed' if summary['passed'] else 'FAILED'})"
    return report.markdown_report(title, result["metadata"], sections)


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
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


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
        references = await compute_references(stub, prompts, args.max_tokens[1], args.request_deadline_s * 4)
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
        serve = subprocess.Popen([sys.executable, "-m", "pagedserve.runtime.cli", *command[1:]],
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
