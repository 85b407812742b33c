"""Which running request gives its blocks up when the pool runs out, per scheduling policy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pagedserve.control_plane.config import SchedulingPolicy
from pagedserve.control_plane.scheduling.request import Request
from pagedserve.control_plane.scheduling.request_queue import priority_key


class PreemptionPolicy(ABC):
    """Orders running requests for service and chooses victims among them."""

    @abstractmethod
    def order(self, running: list[Request]) -> None:
        """Sorts running (kept in admission order) into service order, in place; victims come from the tail."""

    @abstractmethod
    def pick_victim(self, running: Sequence[Request]) -> Request:
        """The request to preempt so that others can grow; running is not empty."""

    @abstractmethod
    def pick_victim_for(self, waiting: Request, running: Sequence[Request]) -> Request | None:
        """A running request to preempt so that `waiting` can be admitted, or None to let it wait."""


class NewestFirst(PreemptionPolicy):
    """FCFS: the most recently admitted request goes first; waiting requests never displace running ones."""

    def order(self, running: list[Request]) -> None:
        return None

    def pick_victim(self, running: Sequence[Request]) -> Request:
        return running[-1]

    def pick_victim_for(self, waiting: Request, running: Sequence[Request]) -> Request | None:
        return None


class LowestPriorityFirst(PreemptionPolicy):
    """PRIORITY: the lowest-priority (then latest) request goes first, also to make room for a waiting
    request of strictly higher priority."""

    def order(self, running: list[Request]) -> None:
        running.sort(key=priority_key)

    def pick_victim(self, running: Sequence[Request]) -> Request:
        return max(reversed(running), key=priority_key)

    def pick_victim_for(self, waiting: Request, running: Sequence[Request]) -> Request | None:
        if not running:
            return None
        victim = self.pick_victim(running)
        return victim if victim.priority > waiting.priority else None


def make_preemption_policy(policy: SchedulingPolicy) -> PreemptionPolicy:
    return NewestFirst() if policy is SchedulingPolicy.FCFS else LowestPriorityFirst()
