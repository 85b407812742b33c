"""What the leader of a tensor-parallel group tells the other ranks: each command it runs, broadcast before it runs.

A command travels over the group's host (gloo) group as one broadcast of FIRST_MESSAGE_BYTES, laid out
    | kind: 1 byte | payload length: 8 bytes, little endian | payload (its first FIRST_MESSAGE_BYTES - 9 bytes) |
and, when the payload is longer, a second broadcast of the rest. Payloads are the worker protocol's own protobuf
messages (InitCacheRequest, ExecuteRequest), encoded by the contract's codec: no other format crosses processes.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import numpy as np
import structlog
import torch

from pagedserve.contract import codec
from pagedserve.contract.step import StepPlan
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.parallel.group import ParallelGroup
from pagedserve.v1 import worker_service_pb2

log = structlog.get_logger()

FIRST_MESSAGE_BYTES = 16 << 10  # a decode step of a few hundred sequences fits in one broadcast
_HEADER_BYTES = 9
# While no command is sent for this long the leader sends a heartbeat, so that a follower whose leader is gone or
# hung fails its wait within the group timeout, and the leader notices a dead follower within this interval.
HEARTBEAT_INTERVAL_S = 0.5


class CommandKind(enum.IntEnum):
    """What a command asks each follower to do."""

    HEARTBEAT = 1  # nothing: the leader lives
    INIT_CACHE = 2  # Worker.init_cache(payload: InitCacheRequest)
    STEP = 3  # Worker.launch(payload: ExecuteRequest)
    RELEASE_CACHE = 4  # Worker.release_cache()
    STOP = 5  # leave the follower loop: the leader is stopping


def end_process_on_group_failure(error: BaseException, during: str) -> NoReturn:
    """A rank that fails inside or between collectives cannot rejoin its group: the others wait on it, or it on
    them. It logs why and ends its process at once, so the others' collectives fail (the peer is gone) and the
    group goes down as a unit; its supervisor starts the whole group again."""
    log.critical("tensor_parallel_group_failed", during=during, error=str(error), exc_info=error)
    os._exit(1)


@contextmanager
def fatal_in_group(group: ParallelGroup, during: str) -> Iterator[None]:
    """Under tensor parallelism, turns an exception raised in the block into end_process_on_group_failure: the other
    ranks already run the same command. Alone (one rank), exceptions pass as they are."""
    if group.size == 1:
        yield
        return
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure past the broadcast breaks the group
        end_process_on_group_failure(error, during)


class CommandChannel:
    """Both ends of the command broadcast: the leader sends, every other rank receives, in the same order."""

    def __init__(self, group: ParallelGroup) -> None:
        self._group = group
        self._buffer = torch.zeros(FIRST_MESSAGE_BYTES, dtype=torch.uint8)

    def send(self, kind: CommandKind, payload: bytes = b"") -> None:
        """Leader: broadcasts one command (blocks until the followers have it, within the group timeout)."""
        host = self._buffer.numpy()
        host[0] = kind
        host[1:_HEADER_BYTES] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
        first = min(len(payload), FIRST_MESSAGE_BYTES - _HEADER_BYTES)
        host[_HEADER_BYTES : _HEADER_BYTES + first] = np.frombuffer(payload[:first], dtype=np.uint8)
        self._group.broadcast_from_leader(self._buffer)
        if first < len(payload):
            rest = torch.from_numpy(np.frombuffer(payload[first:], dtype=np.uint8).copy())
            self._group.broadcast_from_leader(rest)

    def receive(self) -> tuple[CommandKind, bytes]:
        """Follower: waits for the leader's next command (RuntimeError once the group timeout passes)."""
        self._group.broadcast_from_leader(self._buffer)
        host = self._buffer.numpy()
        kind = CommandKind(int(host[0]))
        length = int.from_bytes(host[1:_HEADER_BYTES].tobytes(), "little")
        first = min(length, FIRST_MESSAGE_BYTES - _HEADER_BYTES)
        payload = host[_HEADER_BYTES : _HEADER_BYTES + first].tobytes()
        if first < length:
            rest = torch.empty(length - first, dtype=torch.uint8)
            self._group.broadcast_from_leader(rest)
            payload += rest.numpy().tobytes()
        return kind, payload


class GroupLeader:
    """Rank 0's side: announces each command to the followers before running it itself, and a heartbeat while
    idle. A broadcast that fails (a follower died or hung) ends this process: see end_process_on_group_failure.

    Every broadcast happens under the worker's lock (worker_lock): the worker calls init_cache, step and
    release_cache holding it, and the heartbeat takes it, so no heartbeat can slip between a command's broadcast
    and the collectives that command runs on the same groups (the followers run them in broadcast order). A
    heartbeat is skipped while the worker is busy: its followers are busy with the same command.
    """

    def __init__(self, group: ParallelGroup, worker_lock: threading.Lock) -> None:
        self._channel = CommandChannel(group)
        self._worker_lock = worker_lock
        self._last_sent_s = time.monotonic()
        self._is_stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True)
        self._heartbeat.start()

    def init_cache(self, request: CacheRequest) -> None:
        self._send(CommandKind.INIT_CACHE, codec.cache_request_to_proto(request).SerializeToString())

    def step(self, step: StepPlan) -> None:
        self._send(CommandKind.STEP, codec.step_plan_to_proto(step).SerializeToString())

    def release_cache(self) -> None:
        self._send(CommandKind.RELEASE_CACHE)

    def stop(self) -> None:
        """Stops the heartbeat and tells the followers to leave their loops (quietly, if they are gone already)."""
        self._is_stopped.set()
        self._heartbeat.join()
        with self._worker_lock:
            try:
                self._channel.send(CommandKind.STOP)
            except RuntimeError as error:
                log.info("tensor_parallel_stop_not_delivered", error=str(error))

    def _send(self, kind: CommandKind, payload: bytes = b"") -> None:
        """Under the worker's lock."""
        try:
            self._channel.send(kind, payload)
        except Exception as error:  # noqa: BLE001 - a follower is gone or hung
            end_process_on_group_failure(error, f"broadcasting {kind.name}")
        self._last_sent_s = time.monotonic()

    def _beat(self) -> None:
        while not self._is_stopped.wait(HEARTBEAT_INTERVAL_S / 2):
            if not self._worker_lock.acquire(blocking=False):
                continue  # a command runs: the followers run it too
            try:
                if time.monotonic() - self._last_sent_s >= HEARTBEAT_INTERVAL_S:
                    self._send(CommandKind.HEARTBEAT)
            finally:
                self._worker_lock.release()


def decode_cache_request(payload: bytes) -> CacheRequest:
    return codec.cache_request_from_proto(worker_service_pb2.InitCacheRequest.FromString(payload))


def decode_step(payload: bytes) -> StepPlan:
    return codec.step_plan_from_proto(worker_service_pb2.ExecuteRequest.FromString(payload))
