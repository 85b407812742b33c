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
    for a wake-up and returns every item put since the last call.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T, wake: bool = True) -> None:
        self._items.append(item)
        if not wake:
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take_all(self) -> list[T]:
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items = list(self._items)
        self._items.clear()
        return items
