"""A single-consumer channel on the event loop that wakes its consumer once per batch of items, not per item."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ItemChannel(Generic[T]):
    """Items put by the engine loop, taken in order by one consumer task.

    put() never blocks; with wake=False it only appends, leaving a waiting consumer asleep until a later put
    wakes it (an offline caller that wants the whole result is woken once, not once per step). take_all() waits
    for a wake-up and returns every item put since the last call; once the channel is closed it returns at once,
    and an empty list means there is nothing more.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._is_closed = False

    def put(self, item: T, wake: bool = True) -> None:
        self._items.append(item)
        if wake:
            self._wake()

    def close(self) -> None:
        """No more puts will come; wakes the consumer."""
        self._is_closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take_all(self) -> list[T]:
        if not self._items and not self._is_closed:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items = list(self._items)
        self._items.clear()
        return items
