"""A follower rank (tp_rank > 0): runs every command its leader broadcasts, on its own slices of the model.

It serves no gRPC: the control plane talks to the leader only. It applies the same steps in the same order, so its
registry, pools and sampled tokens stay those of the leader (sampling is identical on every rank: the same logits,
gathered whole, and the same seeded generators). Like the leader it keeps one step in flight while it launches the
next, so a GPU follower does not wait for a step's tokens before queueing the next step.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import structlog

from pagedserve.gpu_worker.errors import WorkerError
from pagedserve.gpu_worker.parallel.commands import (
    CommandChannel,
    CommandKind,
    decode_cache_request,
    decode_step,
    end_process_on_group_failure,
)

if TYPE_CHECKING:
    from pagedserve.gpu_worker.launched_step import LaunchedStep
    from pagedserve.gpu_worker.worker import Worker

log = structlog.get_logger()


def run_follower(worker: Worker) -> None:
    """Runs the leader's commands until it sends STOP. A broadcast that fails (the leader died, or sent nothing
    within the group timeout) or a step that fails here ends the process (end_process_on_group_failure)."""
    channel = CommandChannel(worker.group)
    in_flight: deque[LaunchedStep] = deque()
    log.info("tensor_parallel_follower_ready", tp_rank=worker.group.rank, tp_size=worker.group.size)
    while True:
        try:
            kind, payload = channel.receive()
        except Exception as error:  # noqa: BLE001 - the leader is gone or silent
            end_process_on_group_failure(error, "waiting for the leader's next command")
        if kind is CommandKind.STOP:
            log.info("tensor_parallel_follower_stopping", tp_rank=worker.group.rank)
            return
        try:
            _run(worker, kind, payload, in_flight)
        except Exception as error:  # noqa: BLE001 - the leader ran this command: diverging breaks the group
            end_process_on_group_failure(error, f"running {kind.name}")


def _run(worker: Worker, kind: CommandKind, payload: bytes, in_flight: deque[LaunchedStep]) -> None:
    if kind is CommandKind.STEP:
        in_flight.append(worker.launch(decode_step(payload)))
        while len(in_flight) > 1:  # the older step's tokens are read while the newer one runs
            worker.finish(in_flight.popleft())
    elif kind is CommandKind.HEARTBEAT:
        while in_flight:
            worker.finish(in_flight.popleft())
    elif kind is CommandKind.INIT_CACHE:
        in_flight.clear()  # init_cache waits for them and drops them
        try:
            worker.init_cache(decode_cache_request(payload))
        except WorkerError as error:  # refused on every rank alike; the leader reports it to its caller
            log.warning("tensor_parallel_init_cache_refused", reason=str(error))
    elif kind is CommandKind.RELEASE_CACHE:
        in_flight.clear()
        worker.release_cache()
