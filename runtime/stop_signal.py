"""How a server process waits to be stopped: SIGINT or SIGTERM, or the process it depends on ending."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable


async def stopped_by_signal(ended: Awaitable[object] | None = None) -> bool:
    """Waits for SIGINT/SIGTERM (True) or for `ended` to complete (False), whichever comes first. The signals'
    default handling comes back afterwards, so a second one interrupts a shutdown that hangs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if ended is not None:
        waits.append(asyncio.ensure_future(ended))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return stop.is_set()
