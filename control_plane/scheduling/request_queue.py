"""Waiting-request queues: the admission order of each scheduling policy."""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from pagedserve.control_plane.config import SchedulingPolicy
from pagedserve.control_plane.scheduling.request import Request


class RequestQueue(ABC):
    """Requests waiting to be admitted (new or preempted), iterated in admission order."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Queues a new request."""

    @abstractmethod
    def add_preempted(self, request: Request) -> None:
        """Queues a preempted request where it resumes before the requests admitted after it."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to admit; IndexError when empty."""

    @abstractmethod
    def pop(self) -> Request:
        """Removes and returns the next request to admit; IndexError when empty."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Takes a queued request out (abort); ValueError when absent."""

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    @abstractmethod
    def __len__(self) -> int: ...


class FcfsQueue(RequestQueue):
    """Arrival order; a preempted request goes back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


def priority_key(request: Request) -> tuple[int, float]:
    """Lower priority value first, then earlier arrival."""
    return (request.priority, request.arrival_time_s)


class PriorityQueue(RequestQueue):
    """Lower priority value first, then earlier arrival, then order of queueing."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (*priority_key(request), next(self._counter), request))

    def add_preempted(self, request: Request) -> None:
        # Its key already ranks it ahead of every later arrival of the same priority.
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        index = next((i for i, entry in enumerate(self._heap) if entry[3] is request), None)
        if index is None:
            raise ValueError(f"request {request.request_id} is not queued")
        self._heap[index] = self._heap[-1]
        self._heap.pop()
        heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))

    def __len__(self) -> int:
        return len(self._heap)


def make_request_queue(policy: SchedulingPolicy) -> RequestQueue:
    return FcfsQueue() if policy is SchedulingPolicy.FCFS else PriorityQueue()
